/* weir_component.h: weir.h's backend inside a component, over the bindings
 * that wit-bindgen generates from Weir's wit/ (`weir build` generates them
 * into the build directory and puts them on the include path). Included by
 * weir.h; not used directly. */
#ifndef WEIR_COMPONENT_H
#define WEIR_COMPONENT_H

#include "event_handler.h"

static inline event_handler_string_t weir__string(const char *s) {
  event_handler_string_t out = {(uint8_t *)s, strlen(s)};
  return out;
}

static inline weir_bytes weir__bytes(event_handler_string_t s) {
  weir_bytes b = {s.ptr, s.len};
  return b;
}

static inline bool weir_state_get(const char *name, weir_buffer *value) {
  event_handler_string_t n = weir__string(name);
  event_handler_list_u8_t got;
  if (!weir_function_state_get(&n, &got)) return false;
  /* An empty list comes as a dangling non-null pointer: not free()'s. */
  value->ptr = got.len ? got.ptr : NULL;
  value->len = got.len;
  return true;
}

static inline void weir_state_set(const char *name, const void *data, size_t len) {
  event_handler_string_t n = weir__string(name);
  event_handler_list_u8_t v = {(uint8_t *)data, len};
  weir_function_state_set(&n, &v);
}

static inline void weir_state_delete(const char *name) {
  event_handler_string_t n = weir__string(name);
  weir_function_state_delete(&n);
}

static inline void weir_emit_with_headers(const char *subject, const void *data, size_t len,
                                          const weir_header *headers, size_t header_count) {
  event_handler_string_t s = weir__string(subject);
  event_handler_list_u8_t p = {(uint8_t *)data, len};
  event_handler_tuple2_string_string_t *pairs = NULL;
  if (header_count) {
    pairs = (event_handler_tuple2_string_string_t *)malloc(header_count * sizeof *pairs);
    if (pairs == NULL) abort();
    for (size_t i = 0; i < header_count; i++) {
      pairs[i].f0.ptr = (uint8_t *)headers[i].name.ptr;
      pairs[i].f0.len = headers[i].name.len;
      pairs[i].f1.ptr = (uint8_t *)headers[i].value.ptr;
      pairs[i].f1.len = headers[i].value.len;
    }
  }
  event_handler_list_tuple2_string_string_t h = {pairs, header_count};
  weir_function_emit_publish(&s, &p, &h);
  free(pairs);
}

static inline void weir_log_text(weir_level level, const char *message) {
  event_handler_string_t m = weir__string(message);
  weir_function_log_log((weir_function_log_level_t)level, &m);
}

static inline uint32_t weir_span_enter(const char *name) {
  event_handler_string_t n = weir__string(name);
  return weir_function_trace_enter_span(&n);
}

static inline void weir_span_set(uint32_t span, const char *key, const char *value) {
  if (span == 0) return;
  event_handler_string_t k = weir__string(key), v = weir__string(value);
  weir_function_trace_set_attribute(span, &k, &v);
}

static inline void weir_span_exit(uint32_t span) {
  if (span != 0) weir_function_trace_exit_span(span);
}

/* Calls `handler` for the host's event and hands its result back. */
static inline bool weir__export(weir_result (*handler)(const weir_event *), event_handler_event_t *raw,
                                event_handler_error_t *err) {
  weir_header *headers = NULL;
  if (raw->headers.len) {
    headers = (weir_header *)malloc(raw->headers.len * sizeof *headers);
    if (headers == NULL) abort();
    for (size_t i = 0; i < raw->headers.len; i++) {
      headers[i].name = weir__bytes(raw->headers.ptr[i].f0);
      headers[i].value = weir__bytes(raw->headers.ptr[i].f1);
    }
  }
  weir_event event = {weir__bytes(raw->subject), weir__bytes(raw->key),
                      {raw->payload.ptr, raw->payload.len}, headers, raw->headers.len,
                      raw->event_time_ms, raw->sequence};
  weir_result result = handler(&event);
  free(headers);
  event_handler_event_free(raw);
  if (result.outcome == WEIR_OK) {
    weir_result_free(&result);
    return true;
  }
  const char *reason = result.reason ? result.reason : "";
  err->tag = result.outcome == WEIR_REJECT ? WEIR_FUNCTION_TYPES_ERROR_REJECT
                                           : WEIR_FUNCTION_TYPES_ERROR_RETRY;
  /* The bindings free the reason after the host has read it. */
  event_handler_string_dup(result.outcome == WEIR_REJECT ? &err->val.reject : &err->val.retry,
                           reason);
  weir_result_free(&result);
  return false;
}

/* Declares `fn` (weir_result fn(const weir_event *)) as the component's
 * handler: the export of the `event-handler` world. */
#define WEIR_HANDLER(fn)                                                                    \
  bool exports_event_handler_handle(event_handler_event_t *raw, event_handler_error_t *err) { \
    return weir__export(fn, raw, err);                                                      \
  }

#endif /* WEIR_COMPONENT_H */
