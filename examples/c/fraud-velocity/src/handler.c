/* fraud-velocity: alerts when a card is used more than THRESHOLD times within
 * WINDOW_MS of event time. The same function as examples/fraud-velocity (Rust).
 *
 * The binding keys events by /card and takes event time from /ts. Per card it
 * keeps, as JSON state: `count` (every transaction seen), `max_ts` (the latest
 * event time seen) and `recent` (the sorted event times later than
 * max_ts - WINDOW_MS). An event at t alerts when more than THRESHOLD of the
 * kept times fall in (t - WINDOW_MS, t]. */
#include "weir.h"
#include "weir_json.h"

#define THRESHOLD 5
#define WINDOW_MS 60000
#define ALERT_SUBJECT "alerts.velocity"

typedef struct times {
  int64_t *items;
  size_t len;
} times;

/* The state entry `name` as text, or false if it is missing. */
static bool state_text(const char *name, weir_buffer *out) {
  return weir_state_get(name, out);
}

/* a - b, held at the ends of int64_t as Rust's saturating_sub is. */
static int64_t sat_sub(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) return b > 0 ? INT64_MIN : INT64_MAX;
  return r;
}

/* Reads an unsigned integer entry; a missing one is 0. */
static weir_result read_count(const char *name, uint64_t *out) {
  weir_buffer raw;
  *out = 0;
  if (!state_text(name, &raw)) return weir_ok();
  weir_bytes text = {raw.ptr, raw.len};
  bool ok = weir_json_uint(text, UINT64_MAX, out);
  weir_buffer_free(&raw);
  return ok ? weir_ok() : weir_reject("state entry \"%s\" is not valid JSON for a u64", name);
}

/* Reads an integer entry; a missing one is `fallback`. */
static weir_result read_int(const char *name, int64_t fallback, int64_t *out) {
  weir_buffer raw;
  *out = fallback;
  if (!state_text(name, &raw)) return weir_ok();
  weir_bytes text = {raw.ptr, raw.len};
  bool ok = weir_json_int(text, out);
  weir_buffer_free(&raw);
  return ok ? weir_ok() : weir_reject("state entry \"%s\" is not valid JSON for an integer", name);
}

static weir_result read_times(const char *name, times *out) {
  weir_buffer raw;
  out->items = NULL;
  out->len = 0;
  if (!state_text(name, &raw)) return weir_ok();
  weir_bytes text = {raw.ptr, raw.len};
  weir_json walk;
  weir_bytes element;
  bool ok = weir_json_valid(text) && weir_json_enter(text, '[', &walk);
  while (ok && weir_json_next_element(&walk, &element)) {
    int64_t t;
    ok = weir_json_int(element, &t);
    if (!ok) break;
    out->items = realloc(out->items, (out->len + 1) * sizeof *out->items);
    if (out->items == NULL) abort();
    out->items[out->len++] = t;
  }
  weir_buffer_free(&raw);
  if (!ok) {
    free(out->items);
    return weir_reject("state entry \"%s\" is not valid JSON for a list of integers", name);
  }
  return weir_ok();
}

/* The index of the first element of sorted `xs` greater than `x`. */
static size_t upper_bound(const times *xs, int64_t x) {
  size_t lo = 0, hi = xs->len;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (xs->items[mid] <= x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

static void write_int(const char *name, int64_t value) {
  char text[24];
  int n = snprintf(text, sizeof text, "%lld", (long long)value);
  weir_state_set(name, text, (size_t)n);
}

static void write_times(const char *name, const times *xs) {
  size_t cap = 2 + xs->len * 21, len = 0;
  char *text = malloc(cap);
  if (text == NULL) abort();
  text[len++] = '[';
  for (size_t i = 0; i < xs->len; i++) {
    len += (size_t)snprintf(text + len, cap - len, i ? ",%lld" : "%lld", (long long)xs->items[i]);
  }
  text[len++] = ']';
  weir_state_set(name, text, len);
  free(text);
}

static weir_result handle(const weir_event *event) {
  /* The binding extracted card and time; only the JSON itself is checked. */
  if (!weir_json_valid(event->payload)) return weir_reject("payload is not valid JSON");
  int64_t t = event->event_time_ms, max_ts;
  uint64_t count;
  weir_result r = read_count("count", &count);
  if (r.outcome != WEIR_OK) return r;
  r = read_int("max_ts", t, &max_ts);
  if (r.outcome != WEIR_OK) return r;
  if (t > max_ts) max_ts = t;
  times recent;
  r = read_times("recent", &recent);
  if (r.outcome != WEIR_OK) return r;
  /* Insert t after equal times, then drop those at or before max_ts - WINDOW_MS. */
  size_t at = upper_bound(&recent, t);
  recent.items = realloc(recent.items, (recent.len + 1) * sizeof *recent.items);
  if (recent.items == NULL) abort();
  memmove(recent.items + at + 1, recent.items + at, (recent.len - at) * sizeof *recent.items);
  recent.items[at] = t;
  recent.len++;
  size_t expired = upper_bound(&recent, sat_sub(max_ts, WINDOW_MS));
  memmove(recent.items, recent.items + expired, (recent.len - expired) * sizeof *recent.items);
  recent.len -= expired;
  size_t in_window = upper_bound(&recent, t) - upper_bound(&recent, sat_sub(t, WINDOW_MS));
  char *count_text = weir_format("%llu", (unsigned long long)(count == UINT64_MAX ? count : count + 1));
  weir_state_set("count", count_text, strlen(count_text));
  free(count_text);
  write_int("max_ts", max_ts);
  write_times("recent", &recent);
  free(recent.items);
  if (in_window > THRESHOLD) {
    char *card = weir_json_quote(event->key);
    char *alert = weir_format("{\"card\":%s,\"sequence\":%llu,\"event_time_ms\":%lld,\"in_window\":%zu}",
                              card, (unsigned long long)event->sequence, (long long)t, in_window);
    free(card);
    weir_emit_json(ALERT_SUBJECT, alert, strlen(alert));
    free(alert);
  }
  return weir_ok();
}

WEIR_HANDLER(handle)
