//! `enrich`: a stateless function that adds totals to an order.
//!
//! Input: a JSON object `{"order_id": string, "items": [{"sku", "qty", "price_cents"}], ...}`.
//! Output, on `orders.enriched`: the same object with every original field plus
//! `total_cents` (sum of qty * price_cents) and `item_count` (sum of qty). Anything
//! else is rejected, so the host dead-letters it with the reason.

use serde::Deserialize;
use serde_json::{Map, Value};
use weir_sdk::{Error, Event, emit, log, trace};

/// Where enriched orders go.
pub const OUTPUT_SUBJECT: &str = "orders.enriched";

#[derive(Deserialize)]
struct Item {
    #[allow(dead_code)] // required in the input, not used in the totals
    sku: String,
    qty: u32,
    price_cents: u64,
}

#[weir_sdk::handler]
fn handle(event: Event) -> Result<(), Error> {
    let Value::Object(mut order) = event.json::<Value>()? else {
        return Err(Error::reject("order is not a JSON object"));
    };
    let span = trace::span("totals");
    let (total_cents, item_count) = totals(&order)?;
    span.set_attribute("item_count", &item_count.to_string());
    drop(span);
    log::debug(&format!(
        "order {}: {item_count} items, {total_cents} cents",
        event.key
    ));
    order.insert("total_cents".to_owned(), total_cents.into());
    order.insert("item_count".to_owned(), item_count.into());
    emit::publish_json(OUTPUT_SUBJECT, &order)
}

/// `(total_cents, item_count)` of a valid order.
fn totals(order: &Map<String, Value>) -> Result<(u64, u64), Error> {
    match order.get("order_id") {
        Some(Value::String(_)) => {}
        Some(_) => return Err(Error::reject("order_id is not a string")),
        None => return Err(Error::reject("order_id is missing")),
    }
    let items = order
        .get("items")
        .ok_or_else(|| Error::reject("items is missing"))?;
    let items = Vec::<Item>::deserialize(items).map_err(|e| {
        Error::reject(format!(
            "items is not a list of {{sku: string, qty: u32, price_cents: u64}}: {e}"
        ))
    })?;

    let overflow = || Error::reject("order total overflows u64");
    let (mut total_cents, mut item_count) = (0u64, 0u64);
    for item in &items {
        let line = u64::from(item.qty)
            .checked_mul(item.price_cents)
            .ok_or_else(overflow)?;
        total_cents = total_cents.checked_add(line).ok_or_else(overflow)?;
        item_count = item_count
            .checked_add(u64::from(item.qty))
            .ok_or_else(overflow)?;
    }
    Ok((total_cents, item_count))
}

#[cfg(all(test, not(target_arch = "wasm32")))] // the harness is native-only
mod tests {
    use super::{OUTPUT_SUBJECT, handle};
    use serde_json::{Value, json};
    use weir_sdk::Error;
    use weir_sdk::testing::{Harness, event};

    fn run(payload: &[u8]) -> (Harness, Result<(), Error>) {
        let mut h = Harness::new();
        let result = h.call(handle, event("orders.new", "o-1", payload));
        (h, result)
    }

    fn run_json(order: &Value) -> (Harness, Result<(), Error>) {
        run(&serde_json::to_vec(order).expect("serializable"))
    }

    fn reason(result: Result<(), Error>) -> String {
        match result {
            Err(Error::Reject(reason)) => reason,
            other => panic!("expected a reject, got {other:?}"),
        }
    }

    #[test]
    fn valid_order_gets_exact_totals_and_keeps_its_fields() {
        let order = json!({
            "order_id": "o-1",
            "customer": {"id": 7, "tier": "gold"},
            "items": [
                {"sku": "a", "qty": 2, "price_cents": 1999},
                {"sku": "b", "qty": 3, "price_cents": 250, "note": "gift"},
                {"sku": "c", "qty": 0, "price_cents": 100000}
            ]
        });
        let (h, result) = run_json(&order);
        result.expect("valid order");

        let [out] = h.emitted() else {
            panic!("expected exactly one output, got {:?}", h.emitted());
        };
        assert_eq!(out.subject, OUTPUT_SUBJECT);
        let mut expected = order.clone();
        expected["total_cents"] = json!(2 * 1999 + 3 * 250);
        expected["item_count"] = json!(5);
        assert_eq!(out.json::<Value>(), expected);
        let [span] = h.spans() else {
            panic!("expected one span, got {:?}", h.spans());
        };
        assert_eq!(span.name, "totals");
        assert_eq!(span.attributes, [("item_count".into(), "5".into())]);
        assert_eq!(
            h.logs(),
            [(
                weir_sdk::log::Level::Debug,
                "order o-1: 5 items, 4748 cents".into()
            )]
        );
    }

    #[test]
    fn empty_items_give_zero_totals() {
        let (h, result) = run_json(&json!({"order_id": "o-2", "items": []}));
        result.expect("valid order");
        let out: Value = h.emitted()[0].json();
        assert_eq!(
            (out["total_cents"].clone(), out["item_count"].clone()),
            (json!(0), json!(0))
        );
    }

    #[test]
    fn malformed_json_is_rejected_with_no_output() {
        let (h, result) = run(b"{\"order_id\": \"o-1\", \"items\": [");
        assert!(reason(result).starts_with("payload is not valid JSON"));
        assert!(h.emitted().is_empty());
    }

    #[test]
    fn missing_items_is_rejected() {
        let (h, result) = run_json(&json!({"order_id": "o-1"}));
        assert_eq!(reason(result), "items is missing");
        assert!(h.emitted().is_empty());
    }

    #[test]
    fn ill_typed_fields_are_rejected() {
        let cases = [
            json!([1, 2]),
            json!({"items": []}),
            json!({"order_id": 5, "items": []}),
            json!({"order_id": "o", "items": {}}),
            json!({"order_id": "o", "items": [{"sku": "a", "qty": -1, "price_cents": 1}]}),
            json!({"order_id": "o", "items": [{"sku": "a", "qty": 1}]}),
        ];
        for order in cases {
            let (h, result) = run_json(&order);
            assert!(
                matches!(result, Err(Error::Reject(_))),
                "{order}: {result:?}"
            );
            assert!(h.emitted().is_empty());
        }
    }

    #[test]
    fn overflowing_total_is_rejected() {
        let order = json!({"order_id": "o", "items": [
            {"sku": "a", "qty": 2, "price_cents": u64::MAX / 2 + 1}
        ]});
        let (h, result) = run_json(&order);
        assert_eq!(reason(result), "order total overflows u64");
        assert!(h.emitted().is_empty());
    }
}
