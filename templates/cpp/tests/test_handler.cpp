// Unit tests, natively: `weir test` compiles this with -DWEIR_TESTING.
#include "../src/handler.cpp"

static weir_result send(const char *key, const char *payload, uint64_t sequence) {
  weir_event e = weir_test_event("in", key, payload, 0, sequence);
  return weir_test_call(weir_handler, &e);
}

WEIR_TEST(counts_each_key_and_publishes_the_count) {
  WEIR_CHECK(send("a", "{\"n\": 1}", 1).outcome == WEIR_OK);
  WEIR_CHECK(send("b", "{\"n\": 1}", 2).outcome == WEIR_OK);
  WEIR_CHECK(send("a", "{\"n\": 1}", 3).outcome == WEIR_OK);
  WEIR_CHECK(strcmp(weir_test_state("a", "count"), "2") == 0);
  const weir_test_output *last = weir_test_emitted(2);
  const char *want = "{\"key\":\"a\",\"count\":2,\"sequence\":3}";
  WEIR_CHECK(last != NULL && strcmp(last->subject, OUTPUT_SUBJECT) == 0);
  WEIR_CHECK(last->payload.len == strlen(want) && memcmp(last->payload.ptr, want, last->payload.len) == 0);
}

WEIR_TEST(an_event_that_is_not_json_is_rejected_and_changes_nothing) {
  weir_test_set_state("a", "count", "5");
  weir_result r = send("a", "{oops", 1);
  WEIR_CHECK(r.outcome == WEIR_REJECT);
  weir_result_free(&r);
  WEIR_CHECK(strcmp(weir_test_state("a", "count"), "5") == 0);
  WEIR_CHECK(weir_test_emitted_count() == 0);
}
