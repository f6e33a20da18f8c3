// enrich: a stateless function that adds totals to an order. The same
// function as examples/enrich (Rust).
//
// Input: a JSON object {"order_id": string, "items": [{"sku", "qty",
// "price_cents"}], ...}. Output, on orders.enriched: the same object with
// every original member (as written) plus total_cents (sum of qty *
// price_cents) and item_count (sum of qty). Anything else is rejected, so
// the host dead-letters it with the reason.
#include <cstdint>

#include "weir.hpp"
#include "weir_json.h"

namespace {

const char *const OUTPUT_SUBJECT = "orders.enriched";
const char *const SHAPE = "items is not a list of {sku: string, qty: u32, price_cents: u64}";

// The last member `name` of `object` (as serde reads duplicate keys).
std::optional<weir_bytes> member(weir_bytes object, const char *name) {
  weir_bytes value;
  if (!weir_json_member(object, name, &value)) return std::nullopt;
  return value;
}

// An item's fields: an object's members, or (as serde reads a struct from a
// sequence) an array of exactly [sku, qty, price_cents].
bool item_fields(weir_bytes item, weir_bytes &sku, weir_bytes &qty, weir_bytes &price) {
  if (weir_json_kind(item) == '{') {
    return weir_json_member(item, "sku", &sku) && weir_json_member(item, "qty", &qty) &&
           weir_json_member(item, "price_cents", &price);
  }
  weir_json walk;
  weir_bytes extra;
  return weir_json_enter(item, '[', &walk) && weir_json_next_element(&walk, &sku) &&
         weir_json_next_element(&walk, &qty) && weir_json_next_element(&walk, &price) &&
         !weir_json_next_element(&walk, &extra);
}

// Does a member after `walk`'s position have the key `name` (as written)?
bool repeated_later(weir_json walk, weir_bytes name) {
  weir_bytes key, value;
  while (weir_json_next_member(&walk, &key, &value)) {
    if (weir::view(key) == weir::view(name)) return true;
  }
  return false;
}

struct Totals {
  uint64_t total_cents = 0;
  uint64_t item_count = 0;
};

// The totals of a valid order, or the reason it is not one.
std::optional<std::string> totals(weir_bytes order, Totals &out) {
  auto id = member(order, "order_id");
  if (!id) return "order_id is missing";
  if (weir_json_kind(*id) != '"') return "order_id is not a string";
  auto items = member(order, "items");
  if (!items) return "items is missing";
  weir_json walk;
  if (!weir_json_enter(*items, '[', &walk)) return SHAPE;
  weir_bytes item;
  while (weir_json_next_element(&walk, &item)) {
    weir_bytes sku, qty_text, price_text;
    uint64_t qty, price, line;
    if (!item_fields(item, sku, qty_text, price_text) || weir_json_kind(sku) != '"' ||
        !weir_json_uint(qty_text, UINT32_MAX, &qty) || !weir_json_uint(price_text, UINT64_MAX, &price)) {
      return SHAPE;
    }
    if (__builtin_mul_overflow(qty, price, &line) ||
        __builtin_add_overflow(out.total_cents, line, &out.total_cents) ||
        __builtin_add_overflow(out.item_count, qty, &out.item_count)) {
      return "order total overflows u64";
    }
  }
  return std::nullopt;
}

weir::Result handle(const weir::Event &event) {
  weir_bytes payload = weir::bytes(event.payload);
  if (!weir_json_valid(payload)) return weir::reject("payload is not valid JSON");
  weir_json walk;
  if (!weir_json_enter(payload, '{', &walk)) return weir::reject("order is not a JSON object");
  Totals sums;
  {
    weir::Span span("totals");
    if (auto problem = totals(payload, sums)) return weir::reject(*problem);
    span.set("item_count", std::to_string(sums.item_count));
  }
  weir::log::debug("order " + std::string(event.key) + ": " + std::to_string(sums.item_count) + " items, " +
                   std::to_string(sums.total_cents) + " cents");
  // Every member as written (the last of duplicates), but the two this
  // function sets.
  std::string out = "{";
  weir_bytes name, value;
  while (weir_json_next_member(&walk, &name, &value)) {
    if (weir_json_string_is(name, "total_cents") || weir_json_string_is(name, "item_count") ||
        repeated_later(walk, name)) {
      continue;
    }
    if (out.size() > 1) out += ',';
    out.append(weir::view(name)).append(":").append(weir::view(value));
  }
  out += (out.size() > 1 ? "," : "");
  out += "\"total_cents\":" + std::to_string(sums.total_cents) + ",\"item_count\":" +
         std::to_string(sums.item_count) + "}";
  weir::emit::publish_json(OUTPUT_SUBJECT, out);
  return weir::ok();
}

}  // namespace

WEIR_CPP_HANDLER(handle)
