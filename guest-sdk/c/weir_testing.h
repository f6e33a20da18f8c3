/* weir_testing.h: weir.h's backend for native unit tests (-DWEIR_TESTING),
 * and a small test runner. Included by weir.h; not used directly.
 *
 * A test program is one translation unit: it includes the handler's source
 * (`#include "../src/handler.c"`), then declares tests with WEIR_TEST(name)
 * and checks with WEIR_CHECK(cond); this header supplies main(). Like the
 * host, weir_test_call scopes state to the event's key and keeps a call's
 * state writes and outputs only if it returns weir_ok(); log lines are kept
 * either way, as are spans (with their parents and attributes), and a
 * state name the host would refuse (over 256 bytes) fails the call
 * whatever the handler returns. */
#ifndef WEIR_TESTING_H
#define WEIR_TESTING_H

#define WEIR_MAX_STATE_NAME_BYTES 256

typedef struct weir_test_entry {
  char *key;
  char *name;
  weir_buffer value;
} weir_test_entry;

/* A record a successful call published. */
typedef struct weir_test_output {
  char *subject;
  weir_buffer payload;
  char *header_names[4];
  char *header_values[4];
  size_t header_count;
} weir_test_output;

typedef struct weir_test_log {
  weir_level level;
  char *text;
} weir_test_log;

/* A span a call opened (failed calls' too), in the order opened. */
typedef struct weir_test_span {
  char *name;
  /* Index in the harness's spans of the enclosing span, or -1. */
  long parent;
  char *attribute_keys[8];
  char *attribute_values[8];
  size_t attribute_count;
  bool closed;
} weir_test_span;

#define WEIR__VEC(T) struct { T *items; size_t len, cap; }
#define WEIR__PUSH(v, x)                                                              \
  do {                                                                                \
    if ((v).len == (v).cap) {                                                         \
      (v).cap = (v).cap ? (v).cap * 2 : 8;                                            \
      (v).items = (__typeof__((v).items))realloc((v).items, (v).cap * sizeof *(v).items); \
      if ((v).items == NULL) abort();                                                 \
    }                                                                                 \
    (v).items[(v).len++] = (x);                                                       \
  } while (0)

static struct {
  WEIR__VEC(weir_test_entry) state; /* committed, every key */
  WEIR__VEC(weir_test_output) emitted;
  WEIR__VEC(weir_test_log) logs;
  WEIR__VEC(weir_test_span) spans;
  /* The spans of the call in progress still open, innermost last. */
  WEIR__VEC(size_t) open;
  /* The call in progress. */
  bool in_call;
  const char *key;
  WEIR__VEC(weir_test_entry) call_state;
  WEIR__VEC(weir_test_output) call_emitted;
  const char *refused;
} weir__h;

static inline char *weir__dup(const char *s) {
  return weir_cstr(weir_str(s));
}

static inline weir_buffer weir__copy(const void *data, size_t len) {
  weir_buffer b = {(uint8_t *)malloc(len ? len : 1), len};
  if (b.ptr == NULL) abort();
  if (len) memcpy(b.ptr, data, len);
  return b;
}

static inline void weir__in_call(void) {
  if (!weir__h.in_call) {
    fprintf(stderr, "weir: state, emit, log and trace work only inside weir_test_call\n");
    abort();
  }
}

static inline weir_test_entry *weir__find(const char *name) {
  for (size_t i = 0; i < weir__h.call_state.len; i++) {
    if (strcmp(weir__h.call_state.items[i].name, name) == 0) return &weir__h.call_state.items[i];
  }
  return NULL;
}

static inline bool weir_state_get(const char *name, weir_buffer *value) {
  weir__in_call();
  weir_test_entry *e = weir__find(name);
  if (e == NULL) return false;
  *value = weir__copy(e->value.ptr, e->value.len);
  return true;
}

static inline void weir_state_set(const char *name, const void *data, size_t len) {
  weir__in_call();
  if (strlen(name) > WEIR_MAX_STATE_NAME_BYTES) {
    if (weir__h.refused == NULL) weir__h.refused = "state name is longer than 256 bytes";
    return;
  }
  weir_test_entry *e = weir__find(name);
  if (e != NULL) {
    weir_buffer_free(&e->value);
    e->value = weir__copy(data, len);
    return;
  }
  weir_test_entry added = {weir__dup(weir__h.key), weir__dup(name), weir__copy(data, len)};
  WEIR__PUSH(weir__h.call_state, added);
}

static inline void weir__entry_free(weir_test_entry *e) {
  free(e->key);
  free(e->name);
  weir_buffer_free(&e->value);
}

static inline void weir_state_delete(const char *name) {
  weir__in_call();
  weir_test_entry *e = weir__find(name);
  if (e == NULL) return;
  weir__entry_free(e);
  *e = weir__h.call_state.items[--weir__h.call_state.len];
}

static inline void weir_emit_with_headers(const char *subject, const void *data, size_t len,
                                          const weir_header *headers, size_t header_count) {
  weir__in_call();
  weir_test_output out = {weir__dup(subject), weir__copy(data, len), {0}, {0}, 0};
  for (size_t i = 0; i < header_count && i < 4; i++) {
    out.header_names[i] = weir_cstr(headers[i].name);
    out.header_values[i] = weir_cstr(headers[i].value);
    out.header_count++;
  }
  WEIR__PUSH(weir__h.call_emitted, out);
}

static inline void weir_log_text(weir_level level, const char *message) {
  weir__in_call();
  weir_test_log line = {level, weir__dup(message)};
  WEIR__PUSH(weir__h.logs, line);
}

static inline uint32_t weir_span_enter(const char *name) {
  weir__in_call();
  long parent = weir__h.open.len ? (long)weir__h.open.items[weir__h.open.len - 1] : -1;
  weir_test_span span = {weir__dup(name), parent, {0}, {0}, 0, false};
  WEIR__PUSH(weir__h.spans, span);
  WEIR__PUSH(weir__h.open, weir__h.spans.len - 1);
  return (uint32_t)weir__h.spans.len; /* handles start at 1; 0 is the inert handle */
}

/* Where `span` is among the open spans, or the count of them. */
static inline size_t weir__open_at(uint32_t span) {
  size_t at = 0;
  while (at < weir__h.open.len && weir__h.open.items[at] != (size_t)span - 1) at++;
  return at;
}

static inline void weir_span_set(uint32_t span, const char *key, const char *value) {
  if (span == 0 || weir__open_at(span) == weir__h.open.len) return;
  weir_test_span *s = &weir__h.spans.items[span - 1];
  if (s->attribute_count < 8) {
    s->attribute_keys[s->attribute_count] = weir__dup(key);
    s->attribute_values[s->attribute_count++] = weir__dup(value);
  }
}

/* Closes `span` and every span opened inside it that is still open. */
static inline void weir_span_exit(uint32_t span) {
  size_t at = weir__open_at(span);
  if (span == 0 || at == weir__h.open.len) return;
  for (size_t i = at; i < weir__h.open.len; i++) weir__h.spans.items[weir__h.open.items[i]].closed = true;
  weir__h.open.len = at;
}

/* Stores `value` under (`key`, `name`) before a test's calls. */
static inline void weir_test_set_state(const char *key, const char *name, const char *value) {
  weir_test_entry e = {weir__dup(key), weir__dup(name), weir__copy(value, strlen(value))};
  WEIR__PUSH(weir__h.state, e);
}

/* The committed value under (`key`, `name`) as a NUL-terminated string
 * owned by the harness, or NULL. */
static inline const char *weir_test_state(const char *key, const char *name) {
  for (size_t i = 0; i < weir__h.state.len; i++) {
    weir_test_entry *e = &weir__h.state.items[i];
    if (strcmp(e->key, key) == 0 && strcmp(e->name, name) == 0) {
      e->value.ptr = (uint8_t *)realloc(e->value.ptr, e->value.len + 1);
      if (e->value.ptr == NULL) abort();
      e->value.ptr[e->value.len] = '\0';
      return (const char *)e->value.ptr;
    }
  }
  return NULL;
}

/* An event as the host would pass it (payload and strings borrowed). */
static inline weir_event weir_test_event(const char *subject, const char *key, const char *payload,
                                         int64_t event_time_ms, uint64_t sequence) {
  weir_event e = {weir_str(subject), weir_str(key), weir_str(payload), NULL, 0,
                  event_time_ms, sequence};
  return e;
}

static inline void weir__output_free(weir_test_output *o) {
  free(o->subject);
  weir_buffer_free(&o->payload);
  for (size_t h = 0; h < o->header_count; h++) free(o->header_names[h]), free(o->header_values[h]);
}

/* Runs `handler` on `event` as one host call; the result's reason is the
 * caller's to free (weir_result_free). */
static inline weir_result weir_test_call(weir_result (*handler)(const weir_event *),
                                         const weir_event *event) {
  if (weir__h.in_call) {
    fprintf(stderr, "weir: weir_test_call cannot be nested\n");
    abort();
  }
  char *key = weir_cstr(event->key);
  weir__h.in_call = true;
  weir__h.key = key;
  weir__h.refused = NULL;
  for (size_t i = 0; i < weir__h.state.len; i++) {
    weir_test_entry *e = &weir__h.state.items[i];
    if (strcmp(e->key, key) != 0) continue;
    weir_test_entry copy = {weir__dup(e->key), weir__dup(e->name), weir__copy(e->value.ptr, e->value.len)};
    WEIR__PUSH(weir__h.call_state, copy);
  }
  weir_result result = handler(event);
  weir__h.in_call = false;
  /* Spans left open close when the invocation returns. */
  for (size_t i = 0; i < weir__h.open.len; i++) weir__h.spans.items[weir__h.open.items[i]].closed = true;
  weir__h.open.len = 0;
  if (weir__h.refused != NULL) {
    weir_result_free(&result);
    result = weir_reject("state limit: %s", weir__h.refused);
  }
  if (result.outcome == WEIR_OK) {
    for (size_t i = 0; i < weir__h.state.len;) {
      if (strcmp(weir__h.state.items[i].key, key) == 0) {
        weir__entry_free(&weir__h.state.items[i]);
        weir__h.state.items[i] = weir__h.state.items[--weir__h.state.len];
      } else {
        i++;
      }
    }
    for (size_t i = 0; i < weir__h.call_state.len; i++) WEIR__PUSH(weir__h.state, weir__h.call_state.items[i]);
    for (size_t i = 0; i < weir__h.call_emitted.len; i++) WEIR__PUSH(weir__h.emitted, weir__h.call_emitted.items[i]);
  } else {
    for (size_t i = 0; i < weir__h.call_state.len; i++) weir__entry_free(&weir__h.call_state.items[i]);
    for (size_t i = 0; i < weir__h.call_emitted.len; i++) weir__output_free(&weir__h.call_emitted.items[i]);
  }
  weir__h.call_state.len = 0;
  weir__h.call_emitted.len = 0;
  free(key);
  return result;
}

static inline size_t weir_test_emitted_count(void) { return weir__h.emitted.len; }

static inline const weir_test_output *weir_test_emitted(size_t i) {
  return i < weir__h.emitted.len ? &weir__h.emitted.items[i] : NULL;
}

static inline size_t weir_test_log_count(void) { return weir__h.logs.len; }

static inline size_t weir_test_span_count(void) { return weir__h.spans.len; }

static inline const weir_test_span *weir_test_span_at(size_t i) {
  return i < weir__h.spans.len ? &weir__h.spans.items[i] : NULL;
}

static inline const weir_test_log *weir_test_log_line(size_t i) {
  return i < weir__h.logs.len ? &weir__h.logs.items[i] : NULL;
}

/* Clears state, outputs and logs: each test starts from nothing. */
static inline void weir_test_reset(void) {
  for (size_t i = 0; i < weir__h.state.len; i++) weir__entry_free(&weir__h.state.items[i]);
  for (size_t i = 0; i < weir__h.emitted.len; i++) weir__output_free(&weir__h.emitted.items[i]);
  for (size_t i = 0; i < weir__h.logs.len; i++) free(weir__h.logs.items[i].text);
  for (size_t i = 0; i < weir__h.spans.len; i++) {
    weir_test_span *span = &weir__h.spans.items[i];
    free(span->name);
    for (size_t a = 0; a < span->attribute_count; a++) free(span->attribute_keys[a]), free(span->attribute_values[a]);
  }
  weir__h.state.len = 0;
  weir__h.emitted.len = 0;
  weir__h.logs.len = 0;
  weir__h.spans.len = 0;
}

/* In testing builds the handler is only named: tests call it through
 * weir_test_call(weir_handler, &event). */
#define WEIR_HANDLER(fn) static weir_result (*const weir_handler)(const weir_event *) = fn;

/* The runner. */
typedef void (*weir__test_fn)(void);
static struct {
  const char *names[256];
  weir__test_fn fns[256];
  size_t count;
  int failed;
} weir__tests;

static inline void weir__register(const char *name, weir__test_fn fn) {
  if (weir__tests.count < 256) {
    weir__tests.names[weir__tests.count] = name;
    weir__tests.fns[weir__tests.count++] = fn;
  }
}

#define WEIR_TEST(name)                                                         \
  static void name(void);                                                       \
  __attribute__((constructor)) static void weir__register_##name(void) {        \
    weir__register(#name, name);                                                \
  }                                                                             \
  static void name(void)

#define WEIR_CHECK(cond)                                                         \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "  %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      weir__tests.failed = 1;                                                    \
      return;                                                                    \
    }                                                                            \
  } while (0)

int main(void) {
  int failures = 0;
  for (size_t i = 0; i < weir__tests.count; i++) {
    weir_test_reset();
    weir__tests.failed = 0;
    weir__tests.fns[i]();
    printf("%s %s\n", weir__tests.failed ? "FAIL" : "ok  ", weir__tests.names[i]);
    failures += weir__tests.failed;
  }
  printf("%zu tests, %d failed\n", weir__tests.count, failures);
  return failures ? 1 : 0;
}

#endif /* WEIR_TESTING_H */
