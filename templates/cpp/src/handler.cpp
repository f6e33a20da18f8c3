// {{name}}: counts the events of each key and publishes the running count to
// {{name}}.counts. An event that is not JSON is rejected (the host
// dead-letters it with the reason).
#include <cstdlib>

#include "weir.hpp"
#include "weir_json.h"

namespace {

const char *const OUTPUT_SUBJECT = "{{name}}.counts";

weir::Result handle(const weir::Event &event) {
  if (!weir_json_valid(weir::bytes(event.payload))) return weir::reject("payload is not valid JSON");
  int64_t count = 0;
  if (auto stored = weir::state::get("count"); stored && !weir_json_int(weir::bytes(*stored), &count)) {
    return weir::reject("state entry \"count\" is not an integer");
  }
  count++;
  weir::state::set("count", std::to_string(count));
  char *key = weir_json_quote(weir::bytes(event.key));
  std::string out = std::string("{\"key\":") + key + ",\"count\":" + std::to_string(count) +
                    ",\"sequence\":" + std::to_string(event.sequence) + "}";
  free(key);
  weir::emit::publish_json(OUTPUT_SUBJECT, out);
  return weir::ok();
}

}  // namespace

WEIR_CPP_HANDLER(handle)
