/* enrich: a stateless function that adds totals to an order. The same
 * function as examples/enrich (Rust).
 *
 * Input: a JSON object {"order_id": string, "items": [{"sku", "qty",
 * "price_cents"}], ...}. Output, on orders.enriched: the same object with
 * every original member (as written) plus total_cents (sum of qty *
 * price_cents) and item_count (sum of qty). Anything else is rejected, so
 * the host dead-letters it with the reason. */
#include "weir.h"
#include "weir_json.h"

#define OUTPUT_SUBJECT "orders.enriched"
#define SHAPE "items is not a list of {sku: string, qty: u32, price_cents: u64}"

/* An item's fields: an object's members, or (as serde reads a struct from
 * a sequence) an array of exactly [sku, qty, price_cents]. */
static bool item_fields(weir_bytes item, weir_bytes *sku, weir_bytes *qty, weir_bytes *price) {
  if (weir_json_kind(item) == '{') {
    return weir_json_member(item, "sku", sku) && weir_json_member(item, "qty", qty) &&
           weir_json_member(item, "price_cents", price);
  }
  weir_json walk;
  weir_bytes extra;
  return weir_json_enter(item, '[', &walk) && weir_json_next_element(&walk, sku) &&
         weir_json_next_element(&walk, qty) && weir_json_next_element(&walk, price) &&
         !weir_json_next_element(&walk, &extra);
}

/* Does a member after `walk`'s position have the key `name` (as written)?
 * serde keeps the last of duplicate keys. */
static bool repeated_later(weir_json walk, weir_bytes name) {
  weir_bytes key, value;
  while (weir_json_next_member(&walk, &key, &value)) {
    if (key.len == name.len && memcmp(key.ptr, name.ptr, name.len) == 0) return true;
  }
  return false;
}

/* (total_cents, item_count) of a valid order. */
static weir_result totals(weir_bytes order, uint64_t *total_cents, uint64_t *item_count) {
  weir_bytes value;
  if (!weir_json_member(order, "order_id", &value)) return weir_reject("order_id is missing");
  if (weir_json_kind(value) != '"') return weir_reject("order_id is not a string");
  weir_bytes items;
  if (!weir_json_member(order, "items", &items)) return weir_reject("items is missing");
  weir_json walk;
  if (!weir_json_enter(items, '[', &walk)) return weir_reject(SHAPE);
  weir_bytes item;
  *total_cents = 0;
  *item_count = 0;
  while (weir_json_next_element(&walk, &item)) {
    weir_bytes sku, qty_text, price_text;
    uint64_t qty, price, line;
    if (!item_fields(item, &sku, &qty_text, &price_text) || weir_json_kind(sku) != '"' ||
        !weir_json_uint(qty_text, UINT32_MAX, &qty) || !weir_json_uint(price_text, UINT64_MAX, &price)) {
      return weir_reject(SHAPE);
    }
    if (__builtin_mul_overflow(qty, price, &line) || __builtin_add_overflow(*total_cents, line, total_cents) ||
        __builtin_add_overflow(*item_count, qty, item_count)) {
      return weir_reject("order total overflows u64");
    }
  }
  return weir_ok();
}

static weir_result handle(const weir_event *event) {
  if (!weir_json_valid(event->payload)) return weir_reject("payload is not valid JSON");
  weir_json walk;
  if (!weir_json_enter(event->payload, '{', &walk)) return weir_reject("order is not a JSON object");
  uint64_t total_cents, item_count;
  uint32_t span = weir_span_enter("totals");
  weir_result r = totals(event->payload, &total_cents, &item_count);
  if (r.outcome != WEIR_OK) {
    weir_span_exit(span);
    return r;
  }
  char count_text[24];
  snprintf(count_text, sizeof count_text, "%llu", (unsigned long long)item_count);
  weir_span_set(span, "item_count", count_text);
  weir_span_exit(span);
  char *key = weir_cstr(event->key);
  weir_log(WEIR_DEBUG, "order %s: %llu items, %llu cents", key, (unsigned long long)item_count,
           (unsigned long long)total_cents);
  free(key);

  /* Every member as written (the last of duplicates), but the two this
   * function sets. The members take at most the payload's length. */
  char *tail = weir_format("\"total_cents\":%llu,\"item_count\":%llu}", (unsigned long long)total_cents,
                           (unsigned long long)item_count);
  size_t cap = event->payload.len + strlen(tail) + 2, len = 0;
  char *out = malloc(cap);
  if (out == NULL) abort();
  out[len++] = '{';
  weir_bytes name, value;
  while (weir_json_next_member(&walk, &name, &value)) {
    if (weir_json_string_is(name, "total_cents") || weir_json_string_is(name, "item_count") ||
        repeated_later(walk, name)) {
      continue;
    }
    if (len > 1) out[len++] = ',';
    memcpy(out + len, name.ptr, name.len);
    len += name.len;
    out[len++] = ':';
    memcpy(out + len, value.ptr, value.len);
    len += value.len;
  }
  if (len > 1) out[len++] = ',';
  memcpy(out + len, tail, strlen(tail));
  len += strlen(tail);
  free(tail);
  weir_emit_json(OUTPUT_SUBJECT, out, len);
  free(out);
  return weir_ok();
}

WEIR_HANDLER(handle)
