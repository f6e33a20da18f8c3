// weir.hpp: write Weir stream functions in C++17, over weir.h.
//
//   #include "weir.hpp"
//
//   static weir::Result handle(const weir::Event &event) {
//     auto seen = weir::state::get("seen");             // std::optional<std::string>
//     weir::state::set("seen", "1");
//     weir::Span span("work");                          // closed when it goes out of scope
//     weir::emit::publish_json("orders.seen", "{}");
//     return weir::ok();                                // or weir::retry(...) / weir::reject(...)
//   }
//   WEIR_CPP_HANDLER(handle)
//
// Built with `weir build` (clang++ for wasm32-wasi with libc++, no
// exceptions); tested natively with -DWEIR_TESTING and weir.h's runner, as
// in C.
#ifndef WEIR_HPP
#define WEIR_HPP

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "weir.h"

namespace weir {

using Result = weir_result;

inline std::string_view view(weir_bytes b) {
  return {reinterpret_cast<const char *>(b.ptr), b.len};
}

inline weir_bytes bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t *>(s.data()), s.size()};
}

/// One input record, with the key and time the binding extracted.
struct Event {
  explicit Event(const weir_event &raw)
      : subject(view(raw.subject)),
        key(view(raw.key)),
        payload(view(raw.payload)),
        event_time_ms(raw.event_time_ms),
        sequence(raw.sequence),
        raw_(&raw) {}

  std::string_view subject;
  std::string_view key;
  std::string_view payload;
  int64_t event_time_ms;
  uint64_t sequence;

  /// The first header called `name`, in any case.
  std::optional<std::string_view> header(const std::string &name) const {
    weir_bytes value;
    if (!weir_event_header(raw_, name.c_str(), &value)) return std::nullopt;
    return view(value);
  }

  const weir_event &raw() const { return *raw_; }

 private:
  const weir_event *raw_;
};

inline Result ok() { return weir_ok(); }
inline Result retry(const std::string &reason) { return weir_retry("%s", reason.c_str()); }
inline Result reject(const std::string &reason) { return weir_reject("%s", reason.c_str()); }

namespace state {
/// This key's entry `name`, if any.
inline std::optional<std::string> get(const std::string &name) {
  weir_buffer value;
  if (!weir_state_get(name.c_str(), &value)) return std::nullopt;
  std::string out(reinterpret_cast<const char *>(value.ptr), value.len);
  weir_buffer_free(&value);
  return out;
}
inline void set(const std::string &name, std::string_view value) {
  weir_state_set(name.c_str(), value.data(), value.size());
}
inline void remove(const std::string &name) { weir_state_delete(name.c_str()); }
}  // namespace state

namespace emit {
inline void publish(const std::string &subject, std::string_view payload,
                    const std::vector<std::pair<std::string, std::string>> &headers = {}) {
  std::vector<weir_header> raw;
  raw.reserve(headers.size());
  for (const auto &[name, value] : headers) raw.push_back({bytes(name), bytes(value)});
  weir_emit_with_headers(subject.c_str(), payload.data(), payload.size(), raw.data(), raw.size());
}
/// `json` (already encoded) with content-type: application/json.
inline void publish_json(const std::string &subject, std::string_view json) {
  weir_emit_json(subject.c_str(), json.data(), json.size());
}
}  // namespace emit

namespace log {
inline void write(weir_level level, const std::string &message) { weir_log_text(level, message.c_str()); }
inline void trace(const std::string &m) { write(WEIR_TRACE, m); }
inline void debug(const std::string &m) { write(WEIR_DEBUG, m); }
inline void info(const std::string &m) { write(WEIR_INFO, m); }
inline void warn(const std::string &m) { write(WEIR_WARN, m); }
inline void error(const std::string &m) { write(WEIR_ERROR, m); }
}  // namespace log

/// A span of the handler's own work, closed (with any opened inside it)
/// when it goes out of scope.
class Span {
 public:
  explicit Span(const std::string &name) : handle_(weir_span_enter(name.c_str())) {}
  Span(const Span &) = delete;
  Span &operator=(const Span &) = delete;
  ~Span() { weir_span_exit(handle_); }
  void set(const std::string &key, const std::string &value) {
    weir_span_set(handle_, key.c_str(), value.c_str());
  }

 private:
  uint32_t handle_;
};

}  // namespace weir

/// Declares `fn` (weir::Result fn(const weir::Event &)) as the handler.
#define WEIR_CPP_HANDLER(fn)                                 \
  static weir_result weir__cpp_handler(const weir_event *e) { \
    return fn(weir::Event(*e));                              \
  }                                                          \
  WEIR_HANDLER(weir__cpp_handler)

#endif  // WEIR_HPP
