/* weir.h: write Weir stream functions in C (and C++, through weir.hpp).
 *
 * A handler is `weir_result handle(const weir_event *event)`, declared with
 * WEIR_HANDLER(handle) in one source file. It returns weir_ok(), or
 * weir_retry(...) for a passing failure (the host backs off and delivers the
 * event again) or weir_reject(...) for an event that can never succeed (it is
 * dead-lettered now, with the reason). A failed call's state writes and
 * outputs are not applied.
 *
 * Header-only. Built into a component (`weir build`), it calls the
 * `weir:function` imports through the bindings wit-bindgen generates from
 * Weir's wit/ (event_handler.h). Built natively with -DWEIR_TESTING, the same
 * calls act on the in-memory harness of weir_testing.h, so a handler's unit
 * tests run with the host's semantics and no Wasm.
 *
 * Strings from the host are not NUL-terminated: they are weir_bytes. */
#ifndef WEIR_H
#define WEIR_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A run of bytes owned by someone else (the event, a literal). */
typedef struct weir_bytes {
  const uint8_t *ptr;
  size_t len;
} weir_bytes;

/* Bytes the caller owns and frees with weir_buffer_free. */
typedef struct weir_buffer {
  uint8_t *ptr;
  size_t len;
} weir_buffer;

typedef struct weir_header {
  weir_bytes name;
  weir_bytes value;
} weir_header;

/* One input record, with the key and time the binding extracted. */
typedef struct weir_event {
  weir_bytes subject;
  weir_bytes key;
  weir_bytes payload;
  const weir_header *headers;
  size_t header_count;
  int64_t event_time_ms;
  /* The JetStream stream sequence: unique per stream, stable across redelivery. */
  uint64_t sequence;
} weir_event;

typedef enum weir_outcome { WEIR_OK = 0, WEIR_RETRY = 1, WEIR_REJECT = 2 } weir_outcome;

/* What a handler returns; `reason` (malloc'd, NUL-terminated) for a failure. */
typedef struct weir_result {
  weir_outcome outcome;
  char *reason;
} weir_result;

typedef enum weir_level {
  WEIR_TRACE = 0,
  WEIR_DEBUG = 1,
  WEIR_INFO = 2,
  WEIR_WARN = 3,
  WEIR_ERROR = 4
} weir_level;

static inline weir_bytes weir_str(const char *s) {
  weir_bytes b = {(const uint8_t *)s, strlen(s)};
  return b;
}

static inline bool weir_bytes_eq(weir_bytes b, const char *s) {
  size_t n = strlen(s);
  return b.len == n && (n == 0 || memcmp(b.ptr, s, n) == 0);
}

static inline void weir_buffer_free(weir_buffer *b) {
  free(b->ptr);
  b->ptr = NULL;
  b->len = 0;
}

/* A malloc'd NUL-terminated copy of `b`. */
static inline char *weir_cstr(weir_bytes b) {
  char *s = (char *)malloc(b.len + 1);
  if (s == NULL) abort();
  if (b.len) memcpy(s, b.ptr, b.len);
  s[b.len] = '\0';
  return s;
}

static inline char *weir__vformat(const char *format, va_list args) {
  va_list copy;
  va_copy(copy, args);
  int n = vsnprintf(NULL, 0, format, copy);
  va_end(copy);
  if (n < 0) n = 0;
  char *text = (char *)malloc((size_t)n + 1);
  if (text == NULL) abort();
  vsnprintf(text, (size_t)n + 1, format, args);
  return text;
}

/* A printf-formatted, malloc'd string. */
static inline char *weir_format(const char *format, ...) {
  va_list args;
  va_start(args, format);
  char *text = weir__vformat(format, args);
  va_end(args);
  return text;
}

static inline weir_result weir_ok(void) {
  weir_result r = {WEIR_OK, NULL};
  return r;
}

/* A passing failure; the reason is printf-formatted. */
static inline weir_result weir_retry(const char *format, ...) {
  va_list args;
  va_start(args, format);
  weir_result r = {WEIR_RETRY, weir__vformat(format, args)};
  va_end(args);
  return r;
}

/* The event can never succeed; the reason is printf-formatted. */
static inline weir_result weir_reject(const char *format, ...) {
  va_list args;
  va_start(args, format);
  weir_result r = {WEIR_REJECT, weir__vformat(format, args)};
  va_end(args);
  return r;
}

static inline void weir_result_free(weir_result *r) {
  free(r->reason);
  r->reason = NULL;
}

/* The first header called `name`, in any case. */
static inline bool weir_event_header(const weir_event *e, const char *name, weir_bytes *value) {
  size_t n = strlen(name);
  for (size_t i = 0; i < e->header_count; i++) {
    weir_bytes h = e->headers[i].name;
    if (h.len != n) continue;
    size_t j = 0;
    while (j < n) {
      char a = (char)h.ptr[j], b = name[j];
      if (a >= 'A' && a <= 'Z') a = (char)(a - 'A' + 'a');
      if (b >= 'A' && b <= 'Z') b = (char)(b - 'A' + 'a');
      if (a != b) break;
      j++;
    }
    if (j == n) {
      *value = e->headers[i].value;
      return true;
    }
  }
  return false;
}

/* The host's side, by backend: state of the current key, outputs, logs, spans. */
static inline bool weir_state_get(const char *name, weir_buffer *value);
static inline void weir_state_set(const char *name, const void *data, size_t len);
static inline void weir_state_delete(const char *name);
static inline void weir_emit_with_headers(const char *subject, const void *data, size_t len,
                                          const weir_header *headers, size_t header_count);
static inline void weir_log_text(weir_level level, const char *message);
static inline uint32_t weir_span_enter(const char *name);
static inline void weir_span_set(uint32_t span, const char *key, const char *value);
static inline void weir_span_exit(uint32_t span);

static inline void weir_emit(const char *subject, const void *data, size_t len) {
  weir_emit_with_headers(subject, data, len, NULL, 0);
}

/* Publishes `json` (already encoded) with content-type: application/json. */
static inline void weir_emit_json(const char *subject, const char *json, size_t len) {
  weir_header h = {weir_str("content-type"), weir_str("application/json")};
  weir_emit_with_headers(subject, json, len, &h, 1);
}

static inline void weir_log(weir_level level, const char *format, ...) {
  va_list args;
  va_start(args, format);
  char *text = weir__vformat(format, args);
  va_end(args);
  weir_log_text(level, text);
  free(text);
}

#ifdef __cplusplus
}
#endif

#ifdef WEIR_TESTING
#include "weir_testing.h"
#else
#include "weir_component.h"
#endif

#endif /* WEIR_H */
