//! The native test harness, driven through a `#[weir_sdk::handler]` fn.
#![cfg(not(target_arch = "wasm32"))]

use weir_sdk::log::Level;
use weir_sdk::testing::{Harness, event};
use weir_sdk::{Error, Event, emit, log, state};

/// Counts events per key, echoes the count, and fails on the payload "fail" after
/// writing and emitting, to show that a failed call's effects are dropped.
#[weir_sdk::handler]
fn counter(event: Event) -> Result<(), Error> {
    let seen: u64 = state::get_json("seen")?.unwrap_or(0) + 1;
    state::set_json("seen", &seen)?;
    state::set("last", &event.payload);
    emit::publish_json("counts", &seen)?;
    log::info(&format!("{} seen {seen} times", event.key));
    if event.payload == b"fail" {
        log::warn("failing on purpose");
        return Err(Error::retry("asked to fail"));
    }
    if event.payload == b"forget" {
        state::delete("seen");
        state::delete("last");
    }
    Ok(())
}

#[test]
fn state_is_scoped_to_the_event_key() {
    let mut h = Harness::new();
    h.call(counter, event("in", "a", "x")).expect("ok");
    h.call(counter, event("in", "a", "y")).expect("ok");
    h.call(counter, event("in", "b", "z")).expect("ok");
    assert_eq!(h.json_state::<u64>("a", "seen"), Some(2));
    assert_eq!(h.json_state::<u64>("b", "seen"), Some(1));
    assert_eq!(h.state("a", "last"), Some(b"y".to_vec()));
    assert_eq!(h.state("c", "seen"), None);
}

#[test]
fn emitted_records_and_logs_are_recorded() {
    let mut h = Harness::new().with_json_state("a", "seen", &41u64);
    h.call(counter, event("in", "a", "x")).expect("ok");
    let [out] = h.emitted() else {
        panic!("expected one record, got {:?}", h.emitted());
    };
    assert_eq!(out.subject, "counts");
    assert_eq!(out.json::<u64>(), 42);
    assert_eq!(
        out.headers,
        [("content-type".to_owned(), "application/json".to_owned())]
    );
    assert_eq!(h.logs(), [(Level::Info, "a seen 42 times".to_owned())]);
    assert_eq!(h.take_emitted().len(), 1);
    assert!(h.emitted().is_empty());
}

#[test]
fn a_failed_call_keeps_no_writes_and_no_records() {
    let mut h = Harness::new().with_state("a", "last", b"before");
    let result = h.call(counter, event("in", "a", "fail"));
    assert_eq!(result, Err(Error::Retry("asked to fail".to_owned())));
    assert_eq!(h.state("a", "seen"), None);
    assert_eq!(h.state("a", "last"), Some(b"before".to_vec()));
    assert!(h.emitted().is_empty());
    assert_eq!(h.logs().len(), 2, "log lines of a failed call are kept");
}

#[test]
fn deletes_apply() {
    let mut h = Harness::new();
    h.call(counter, event("in", "a", "x")).expect("ok");
    h.call(counter, event("in", "a", "forget")).expect("ok");
    assert_eq!(h.state("a", "seen"), None);
    assert_eq!(h.state("a", "last"), None);
}

#[test]
fn corrupt_json_state_is_a_reject_naming_the_entry() {
    let mut h = Harness::new().with_state("a", "seen", b"{oops");
    let Err(Error::Reject(reason)) = h.call(counter, event("in", "a", "x")) else {
        panic!("expected a reject");
    };
    assert!(
        reason.starts_with("state entry \"seen\" is not valid JSON"),
        "{reason}"
    );
    assert_eq!(h.state("a", "seen"), Some(b"{oops".to_vec()));
}

#[test]
fn closures_work_as_handlers() {
    let mut h = Harness::new();
    h.call(
        |e: Event| {
            emit::publish("echo", &e.payload, &e.headers);
            Ok(())
        },
        event("in", "k", "p").with_header("h", "v"),
    )
    .expect("ok");
    assert_eq!(h.emitted()[0].headers, [("h".to_owned(), "v".to_owned())]);
}

#[test]
#[should_panic(expected = "use weir_sdk::testing::Harness")]
fn state_outside_a_harness_panics_clearly() {
    let _ = state::get("x");
}

#[test]
fn a_panicking_handler_does_not_leave_a_call_behind() {
    let mut h = Harness::new();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.call(|_| panic!("boom"), event("in", "a", "x"))
    }));
    assert!(caught.is_err());
    let after = std::panic::catch_unwind(|| state::get("x"));
    assert!(after.is_err(), "no call is active after the panic");
}

/// Opens an outer span with an inner one inside; leaves a third open on "leak".
#[weir_sdk::handler]
fn traced(event: Event) -> Result<(), Error> {
    let outer = weir_sdk::trace::span("outer");
    outer.set_attribute("key", &event.key);
    {
        let inner = weir_sdk::trace::span("inner");
        inner.set_attribute("step", "1");
    }
    if event.payload == b"leak" {
        std::mem::forget(weir_sdk::trace::span("left-open"));
    }
    Ok(())
}

#[test]
fn spans_nest_and_close() {
    let mut h = Harness::new();
    h.call(traced, event("in", "a", "x")).expect("ok");
    h.call(traced, event("in", "b", "leak")).expect("ok");
    let spans: Vec<_> = h
        .spans()
        .iter()
        .map(|s| (s.name.as_str(), s.parent, s.closed))
        .collect();
    assert_eq!(
        spans,
        [
            ("outer", None, true),
            ("inner", Some(0), true),
            ("outer", None, true),
            ("inner", Some(2), true),
            // Forgotten, but closed with its parent `outer`.
            ("left-open", Some(2), true),
        ]
    );
    assert_eq!(h.spans()[0].attributes, [("key".into(), "a".into())]);
    assert_eq!(h.spans()[1].attributes, [("step".into(), "1".into())]);
}
