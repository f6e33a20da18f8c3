// fraud-velocity: alerts when a card is used more than THRESHOLD times within
// WINDOW_MS of event time. The same function as examples/fraud-velocity (Rust).
//
// The binding keys events by /card and takes event time from /ts. Per card it
// keeps, as JSON state: `count` (every transaction seen), `max_ts` (the latest
// event time seen) and `recent` (the sorted event times later than
// max_ts - WINDOW_MS). An event at t alerts when more than THRESHOLD of the
// kept times fall in (t - WINDOW_MS, t].
#include <algorithm>
#include <cstdio>

#include "weir.hpp"
#include "weir_json.h"

namespace {

constexpr size_t THRESHOLD = 5;
constexpr int64_t WINDOW_MS = 60000;
const char *const ALERT_SUBJECT = "alerts.velocity";

// a - b, held at the ends of int64_t as Rust's saturating_sub is.
int64_t sat_sub(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r)) return b > 0 ? INT64_MIN : INT64_MAX;
  return r;
}

// An integer entry, `fallback` if missing; false if it is not an integer.
bool read_int(const char *name, int64_t fallback, int64_t &out) {
  auto text = weir::state::get(name);
  out = fallback;
  return !text || weir_json_int(weir::bytes(*text), &out);
}

// A list-of-integers entry, empty if missing; false if it is not one.
bool read_times(const char *name, std::vector<int64_t> &out) {
  auto text = weir::state::get(name);
  if (!text) return true;
  weir_bytes json = weir::bytes(*text);
  weir_json walk;
  weir_bytes element;
  if (!weir_json_valid(json) || !weir_json_enter(json, '[', &walk)) return false;
  while (weir_json_next_element(&walk, &element)) {
    int64_t t;
    if (!weir_json_int(element, &t)) return false;
    out.push_back(t);
  }
  return true;
}

std::string list(const std::vector<int64_t> &xs) {
  std::string out = "[";
  for (size_t i = 0; i < xs.size(); i++) out += (i ? "," : "") + std::to_string(xs[i]);
  return out + "]";
}

size_t in_range(const std::vector<int64_t> &xs, int64_t above, int64_t at_most) {
  return static_cast<size_t>(std::upper_bound(xs.begin(), xs.end(), at_most) -
                             std::upper_bound(xs.begin(), xs.end(), above));
}

weir::Result handle(const weir::Event &event) {
  // The binding extracted card and time; only the JSON itself is checked.
  if (!weir_json_valid(weir::bytes(event.payload))) return weir::reject("payload is not valid JSON");
  int64_t t = event.event_time_ms, max_ts;
  uint64_t count = 0;
  if (auto text = weir::state::get("count"); text && !weir_json_uint(weir::bytes(*text), UINT64_MAX, &count)) {
    return weir::reject("state entry \"count\" is not valid JSON for a u64");
  }
  if (!read_int("max_ts", t, max_ts)) return weir::reject("state entry \"max_ts\" is not valid JSON for an integer");
  max_ts = std::max(max_ts, t);
  std::vector<int64_t> recent;
  if (!read_times("recent", recent)) {
    return weir::reject("state entry \"recent\" is not valid JSON for a list of integers");
  }
  recent.insert(std::upper_bound(recent.begin(), recent.end(), t), t);
  recent.erase(recent.begin(), std::upper_bound(recent.begin(), recent.end(), sat_sub(max_ts, WINDOW_MS)));
  size_t in_window = in_range(recent, sat_sub(t, WINDOW_MS), t);
  weir::state::set("count", std::to_string(count == UINT64_MAX ? count : count + 1));
  weir::state::set("max_ts", std::to_string(max_ts));
  weir::state::set("recent", list(recent));
  if (in_window > THRESHOLD) {
    char *card = weir_json_quote(weir::bytes(event.key));
    std::string alert = std::string("{\"card\":") + card + ",\"sequence\":" + std::to_string(event.sequence) +
                        ",\"event_time_ms\":" + std::to_string(t) + ",\"in_window\":" + std::to_string(in_window) + "}";
    free(card);
    weir::emit::publish_json(ALERT_SUBJECT, alert);
  }
  return weir::ok();
}

}  // namespace

WEIR_CPP_HANDLER(handle)
