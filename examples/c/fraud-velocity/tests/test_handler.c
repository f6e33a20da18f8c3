/* fraud-velocity's unit tests, natively (cc -DWEIR_TESTING), no Wasm. */
#include "../src/handler.c"

static weir_result txn(const char *card, int64_t ts, uint64_t seq) {
  char payload[128];
  snprintf(payload, sizeof payload, "{\"card\":\"%s\",\"amount_cents\":1250,\"ts\":%lld}", card, (long long)ts);
  weir_event e = weir_test_event("payments", card, payload, ts, seq);
  return weir_test_call(weir_handler, &e);
}

static bool payload_is(size_t i, const char *want) {
  const weir_test_output *out = weir_test_emitted(i);
  return out != NULL && out->payload.len == strlen(want) && memcmp(out->payload.ptr, want, out->payload.len) == 0;
}

WEIR_TEST(five_in_a_minute_do_not_alert_and_the_sixth_does) {
  int64_t times[] = {0, 10000, 20000, 30000, 40000};
  for (int i = 0; i < 5; i++) WEIR_CHECK(txn("c1", 1000000 + times[i], (uint64_t)i + 1).outcome == WEIR_OK);
  WEIR_CHECK(weir_test_emitted_count() == 0);
  WEIR_CHECK(txn("c1", 1059999, 6).outcome == WEIR_OK);
  WEIR_CHECK(weir_test_emitted_count() == 1);
  WEIR_CHECK(strcmp(weir_test_emitted(0)->subject, "alerts.velocity") == 0);
  WEIR_CHECK(payload_is(0, "{\"card\":\"c1\",\"sequence\":6,\"event_time_ms\":1059999,\"in_window\":6}"));
  WEIR_CHECK(weir_test_emitted(0)->header_count == 1);
  WEIR_CHECK(strcmp(weir_test_emitted(0)->header_values[0], "application/json") == 0);
}

WEIR_TEST(the_window_excludes_its_start) {
  int64_t times[] = {0, 10000, 20000, 30000, 40000, WINDOW_MS};
  for (int i = 0; i < 6; i++) txn("c1", times[i], (uint64_t)i);
  WEIR_CHECK(weir_test_emitted_count() == 0);
  WEIR_CHECK(strcmp(weir_test_state("c1", "recent"), "[10000,20000,30000,40000,60000]") == 0);
}

WEIR_TEST(every_transaction_over_the_threshold_alerts_and_cards_are_separate) {
  for (int i = 0; i < 8; i++) {
    txn("c1", i * 1000, (uint64_t)i);
    txn("c2", i * 20000, 100 + (uint64_t)i);
  }
  WEIR_CHECK(weir_test_emitted_count() == 3);
  WEIR_CHECK(payload_is(2, "{\"card\":\"c1\",\"sequence\":7,\"event_time_ms\":7000,\"in_window\":8}"));
  WEIR_CHECK(strcmp(weir_test_state("c1", "count"), "8") == 0);
  WEIR_CHECK(strcmp(weir_test_state("c2", "count"), "8") == 0);
  WEIR_CHECK(strcmp(weir_test_state("c2", "recent"), "[100000,120000,140000]") == 0);
}

WEIR_TEST(out_of_order_times_count_against_their_own_window) {
  int64_t times[] = {10000, 60000, 20000, 50000, 30000, 40000};
  for (int i = 0; i < 6; i++) txn("c1", times[i], (uint64_t)i);
  WEIR_CHECK(weir_test_emitted_count() == 0);
  WEIR_CHECK(strcmp(weir_test_state("c1", "max_ts"), "60000") == 0);
  txn("c1", 65000, 7);
  WEIR_CHECK(weir_test_emitted_count() == 1);
  WEIR_CHECK(payload_is(0, "{\"card\":\"c1\",\"sequence\":7,\"event_time_ms\":65000,\"in_window\":7}"));
  /* Far too late: counted, but dropped at once and alone in its window. */
  txn("c1", 1000, 8);
  WEIR_CHECK(strcmp(weir_test_state("c1", "count"), "8") == 0);
  WEIR_CHECK(strcmp(weir_test_state("c1", "recent"), "[10000,20000,30000,40000,50000,60000,65000]") == 0);
  WEIR_CHECK(weir_test_emitted_count() == 1);
}

WEIR_TEST(a_rejected_event_leaves_state_untouched) {
  for (int i = 0; i < 3; i++) txn("c1", i * 1000, (uint64_t)i);
  weir_event bad = weir_test_event("payments", "c1", "{\"card\": \"c1\", ", 5000, 9);
  weir_result r = weir_test_call(weir_handler, &bad);
  WEIR_CHECK(r.outcome == WEIR_REJECT);
  WEIR_CHECK(strstr(r.reason, "not valid JSON") != NULL);
  weir_result_free(&r);
  WEIR_CHECK(strcmp(weir_test_state("c1", "count"), "3") == 0);
  WEIR_CHECK(weir_test_emitted_count() == 0);
}

WEIR_TEST(corrupt_state_is_rejected_and_kept) {
  weir_test_set_state("c1", "recent", "[1, 2,");
  weir_result r = txn("c1", 5000, 1);
  WEIR_CHECK(r.outcome == WEIR_REJECT);
  WEIR_CHECK(strstr(r.reason, "\"recent\"") != NULL);
  weir_result_free(&r);
  WEIR_CHECK(strcmp(weir_test_state("c1", "recent"), "[1, 2,") == 0);
  WEIR_CHECK(weir_test_state("c1", "count") == NULL);
}
