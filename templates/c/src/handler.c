/* {{name}}: counts the events of each key and publishes the running count
 * to {{name}}.counts. An event that is not JSON is rejected (the host
 * dead-letters it with the reason). */
#include "weir.h"
#include "weir_json.h"

#define OUTPUT_SUBJECT "{{name}}.counts"

static weir_result handle(const weir_event *event) {
  if (!weir_json_valid(event->payload)) return weir_reject("payload is not valid JSON");
  int64_t count = 0;
  weir_buffer stored;
  if (weir_state_get("count", &stored)) {
    weir_bytes text = {stored.ptr, stored.len};
    bool ok = weir_json_int(text, &count);
    weir_buffer_free(&stored);
    if (!ok) return weir_reject("state entry \"count\" is not an integer");
  }
  count++;
  char *text = weir_format("%lld", (long long)count);
  weir_state_set("count", text, strlen(text));
  free(text);
  char *key = weir_json_quote(event->key);
  char *out = weir_format("{\"key\":%s,\"count\":%lld,\"sequence\":%llu}", key, (long long)count,
                          (unsigned long long)event->sequence);
  weir_emit_json(OUTPUT_SUBJECT, out, strlen(out));
  free(key);
  free(out);
  return weir_ok();
}

WEIR_HANDLER(handle)
