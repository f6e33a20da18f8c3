/* enrich's unit tests, natively (cc -DWEIR_TESTING), no Wasm. */
#include "../src/handler.c"

static weir_result run(const char *payload) {
  weir_event e = weir_test_event("orders.new", "o-1", payload, 0, 1);
  return weir_test_call(weir_handler, &e);
}

static bool rejected(const char *payload, const char *reason) {
  weir_result r = run(payload);
  bool ok = r.outcome == WEIR_REJECT && (reason == NULL || strcmp(r.reason, reason) == 0);
  if (!ok) fprintf(stderr, "  %s -> %d %s\n", payload, r.outcome, r.reason ? r.reason : "");
  weir_result_free(&r);
  return ok && weir_test_emitted_count() == 0;
}

static bool emitted_is(const char *want) {
  const weir_test_output *out = weir_test_emitted(0);
  if (out == NULL || out->payload.len != strlen(want) || memcmp(out->payload.ptr, want, out->payload.len) != 0) {
    if (out) fprintf(stderr, "  got %.*s\n", (int)out->payload.len, (const char *)out->payload.ptr);
    return false;
  }
  return true;
}

WEIR_TEST(a_valid_order_gets_exact_totals_and_keeps_its_fields) {
  weir_result r = run("{\"order_id\": \"o-1\", \"customer\": {\"id\": 7, \"tier\": \"gold\"}, \"items\": ["
                      "{\"sku\": \"a\", \"qty\": 2, \"price_cents\": 1999},"
                      "{\"sku\": \"b\", \"qty\": 3, \"price_cents\": 250, \"note\": \"gift\"},"
                      "{\"sku\": \"c\", \"qty\": 0, \"price_cents\": 100000}]}");
  WEIR_CHECK(r.outcome == WEIR_OK);
  WEIR_CHECK(weir_test_emitted_count() == 1);
  WEIR_CHECK(strcmp(weir_test_emitted(0)->subject, "orders.enriched") == 0);
  WEIR_CHECK(emitted_is("{\"order_id\":\"o-1\",\"customer\":{\"id\": 7, \"tier\": \"gold\"},\"items\":["
                        "{\"sku\": \"a\", \"qty\": 2, \"price_cents\": 1999},"
                        "{\"sku\": \"b\", \"qty\": 3, \"price_cents\": 250, \"note\": \"gift\"},"
                        "{\"sku\": \"c\", \"qty\": 0, \"price_cents\": 100000}],"
                        "\"total_cents\":4748,\"item_count\":5}"));
  WEIR_CHECK(weir_test_log_count() == 1);
  WEIR_CHECK(strcmp(weir_test_log_line(0)->text, "order o-1: 5 items, 4748 cents") == 0);
}

WEIR_TEST(empty_items_give_zero_totals_and_old_totals_are_replaced) {
  WEIR_CHECK(run("{\"order_id\":\"o-2\",\"items\":[],\"total_cents\":99}").outcome == WEIR_OK);
  WEIR_CHECK(emitted_is("{\"order_id\":\"o-2\",\"items\":[],\"total_cents\":0,\"item_count\":0}"));
}

WEIR_TEST(malformed_json_is_rejected_with_no_output) {
  WEIR_CHECK(rejected("{\"order_id\": \"o-1\", \"items\": [", "payload is not valid JSON"));
  WEIR_CHECK(rejected("{\"a\":1} x", "payload is not valid JSON"));
}

WEIR_TEST(missing_items_is_rejected) {
  WEIR_CHECK(rejected("{\"order_id\": \"o-1\"}", "items is missing"));
}

WEIR_TEST(ill_typed_fields_are_rejected) {
  const char *cases[] = {
      "[1, 2]",
      "{\"items\": []}",
      "{\"order_id\": 5, \"items\": []}",
      "{\"order_id\": \"o\", \"items\": {}}",
      "{\"order_id\": \"o\", \"items\": [{\"sku\": \"a\", \"qty\": -1, \"price_cents\": 1}]}",
      "{\"order_id\": \"o\", \"items\": [{\"sku\": \"a\", \"qty\": 1}]}",
      "{\"order_id\": \"o\", \"items\": [{\"sku\": \"a\", \"qty\": 1.5, \"price_cents\": 1}]}",
      "{\"order_id\": \"o\", \"items\": [{\"sku\": \"a\", \"qty\": 4294967296, \"price_cents\": 1}]}",
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) WEIR_CHECK(rejected(cases[i], NULL));
}

WEIR_TEST(an_overflowing_total_is_rejected) {
  WEIR_CHECK(rejected("{\"order_id\": \"o\", \"items\": [{\"sku\": \"a\", \"qty\": 2, \"price_cents\": 9223372036854775808}]}",
                      "order total overflows u64"));
}

WEIR_TEST(totals_up_to_u64_max_are_exact) {
  WEIR_CHECK(run("{\"order_id\":\"o\",\"items\":[{\"sku\":\"a\",\"qty\":1,\"price_cents\":18446744073709551615}]}").outcome == WEIR_OK);
  WEIR_CHECK(emitted_is("{\"order_id\":\"o\",\"items\":[{\"sku\":\"a\",\"qty\":1,\"price_cents\":18446744073709551615}],"
                        "\"total_cents\":18446744073709551615,\"item_count\":1}"));
}
