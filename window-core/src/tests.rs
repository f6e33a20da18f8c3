//! The window core against a batch computation written here: fixed cases
//! for lateness, and thousands of random event sets, each in a random
//! arrival order within the out-of-orderness bound, with the core's
//! bookkeeping serialized and restored at random points (as a commit and a
//! restart would). Seeds are printed on failure.

use std::collections::BTreeMap;

use super::*;
use crate::test_rng::Rng;

/// An event: key, event time, value.
type Input = (String, i64, i64);

/// What a consumer of the firings ends up with: per (key, window), the sum
/// of the values of its last firing and that firing's number.
type Results = BTreeMap<(String, Window), (i64, u32)>;

/// Plays the driver: keeps each part's events, sums a firing's parts, and
/// drops what the core expires. `restart_every` serializes and restores
/// the core (and so every piece of its state) every that many events.
struct Driver {
    core: WindowCore,
    parts: BTreeMap<(String, i64), Vec<i64>>,
    results: Results,
    too_late: Vec<Input>,
    /// Update firings seen.
    updates: usize,
}

impl Driver {
    fn new(settings: WindowSettings) -> Self {
        Self {
            core: WindowCore::new(settings),
            parts: BTreeMap::new(),
            results: BTreeMap::new(),
            too_late: Vec::new(),
            updates: 0,
        }
    }

    /// Places an event; false if it was too late.
    fn event(&mut self, (key, time, value): &Input) -> bool {
        match self.core.place(key, *time, 0) {
            Placement::Pane { pane } => self
                .parts
                .entry((key.clone(), pane))
                .or_default()
                .push(*value),
            Placement::Session { window, absorbed } => {
                let mut merged = vec![*value];
                for old in absorbed {
                    let part = (key.clone(), old.start_ms);
                    merged.extend(self.parts.remove(&part).unwrap_or_default());
                    // A merged session supersedes what the absorbed ones fired.
                    self.results.remove(&(key.clone(), old));
                }
                self.parts
                    .entry((key.clone(), window.start_ms))
                    .or_default()
                    .extend(merged);
            }
            Placement::OutOfRange => panic!("{time} is in range"),
            Placement::TooLate { .. } => {
                self.too_late.push((key.clone(), *time, *value));
                return false;
            }
        }
        true
    }

    fn take(&mut self, advance: Advance) {
        for firing in advance.firings {
            self.updates += usize::from(firing.is_update());
            let sum = firing
                .parts
                .iter()
                .flat_map(|p| self.parts.get(&(firing.key.clone(), *p)))
                .flatten()
                .sum();
            let previous = self
                .results
                .insert((firing.key.clone(), firing.window), (sum, firing.firing));
            // A merged session counts on from what it absorbed.
            if let Some((_, before)) = previous {
                assert_eq!(
                    firing.firing,
                    before + 1,
                    "firing numbers count on: {firing:?}"
                );
            }
        }
        for part in advance.expired {
            self.parts.remove(&part);
        }
    }

    /// Each window's sum in its last firing.
    fn sums(&self) -> BTreeMap<(String, Window), i64> {
        self.results
            .iter()
            .map(|(w, (sum, _))| (w.clone(), *sum))
            .collect()
    }

    fn restart(&mut self) {
        let saved = serde_json::to_string(&self.core).expect("serializes");
        self.core = serde_json::from_str(&saved).expect("deserializes");
    }
}

/// The windows' sums computed from the whole event set at once.
fn reference(settings: &WindowSettings, events: &[Input]) -> BTreeMap<(String, Window), i64> {
    let mut sums = BTreeMap::new();
    match settings.kind {
        WindowKind::Tumbling { size_ms } | WindowKind::Sliding { size_ms, .. } => {
            let slide = match settings.kind {
                WindowKind::Sliding { slide_ms, .. } => slide_ms,
                _ => size_ms,
            };
            for (key, time, value) in events {
                let mut start = time.div_euclid(slide) * slide;
                while start + size_ms > *time {
                    let window = Window {
                        start_ms: start,
                        end_ms: start + size_ms,
                    };
                    *sums.entry((key.clone(), window)).or_insert(0) += value;
                    start -= slide;
                }
            }
        }
        WindowKind::Session { gap_ms } => {
            let mut by_key: BTreeMap<&str, Vec<(i64, i64)>> = BTreeMap::new();
            for (key, time, value) in events {
                by_key.entry(key).or_default().push((*time, *value));
            }
            for (key, mut times) in by_key {
                times.sort();
                let mut current: Option<(Window, i64)> = None;
                for (time, value) in times {
                    current = match current {
                        Some((w, sum)) if time < w.end_ms => Some((
                            Window {
                                start_ms: w.start_ms,
                                end_ms: w.end_ms.max(time + gap_ms),
                            },
                            sum + value,
                        )),
                        done => {
                            if let Some((w, sum)) = done {
                                sums.insert((key.to_string(), w), sum);
                            }
                            let w = Window {
                                start_ms: time,
                                end_ms: time + gap_ms,
                            };
                            Some((w, value))
                        }
                    };
                }
                if let Some((w, sum)) = current {
                    sums.insert((key.to_string(), w), sum);
                }
            }
        }
    }
    sums
}

fn settings(
    kind: WindowKind,
    out_of_orderness_ms: i64,
    allowed_lateness_ms: i64,
) -> WindowSettings {
    WindowSettings {
        kind,
        out_of_orderness_ms,
        allowed_lateness_ms,
        idle_timeout_ms: 60_000,
        late_subject: None,
    }
}

fn event(key: &str, time: i64, value: i64) -> Input {
    (key.to_string(), time, value)
}

#[test]
fn a_late_event_within_the_lateness_updates_its_window_and_a_later_one_is_refused() {
    let mut driver = Driver::new(settings(WindowKind::Tumbling { size_ms: 10 }, 0, 5));
    driver.event(&event("k", 1, 1));
    driver.event(&event("k", 12, 10));
    let advance = driver.core.advance(0);
    assert_eq!(advance.firings.len(), 1);
    assert!(!advance.firings[0].is_update());
    driver.take(advance);
    // Watermark 12: [0, 10) fired, and takes late data until 15.
    driver.event(&event("k", 3, 2));
    let advance = driver.core.advance(0);
    assert_eq!(advance.firings.len(), 1);
    assert!(advance.firings[0].is_update());
    driver.take(advance);
    let first = Window {
        start_ms: 0,
        end_ms: 10,
    };
    assert_eq!(driver.results[&("k".to_string(), first)], (3, 1));
    driver.event(&event("k", 20, 100));
    match driver.core.place("k", 4, 0) {
        Placement::TooLate {
            behind_watermark_ms,
            watermark_ms,
        } => assert_eq!((behind_watermark_ms, watermark_ms), (16, 20)),
        other => panic!("{other:?}"),
    }
    // [0, 10) is gone, with its pane.
    let advance = driver.core.advance(0);
    assert!(
        advance.expired.contains(&("k".to_string(), 0)),
        "{advance:?}"
    );
}

#[test]
fn sessions_merge_when_an_event_bridges_them_and_never_split() {
    let mut driver = Driver::new(settings(WindowKind::Session { gap_ms: 10 }, 100, 0));
    driver.event(&event("u", 0, 1));
    driver.event(&event("u", 18, 1));
    driver.event(&event("u", 40, 1));
    // 9 is within the gap of both [0, 10) and [18, 28): one session [0, 28).
    assert_eq!(
        driver.core.place("u", 9, 0),
        Placement::Session {
            window: Window {
                start_ms: 0,
                end_ms: 28
            },
            absorbed: vec![
                Window {
                    start_ms: 0,
                    end_ms: 10
                },
                Window {
                    start_ms: 18,
                    end_ms: 28
                }
            ],
        }
    );
    driver.parts.insert(("u".into(), 0), vec![1, 1, 1]);
    driver.parts.remove(&("u".to_string(), 18));
    let advance = driver.core.advance_watermark_to(i64::MAX);
    driver.take(advance);
    let whole = Window {
        start_ms: 0,
        end_ms: 28,
    };
    let last = Window {
        start_ms: 40,
        end_ms: 50,
    };
    assert_eq!(driver.results[&("u".to_string(), last)], (1, 0));
    assert_eq!(driver.results.len(), 2, "{:?}", driver.results);
    assert_eq!(driver.results[&("u".to_string(), whole)], (3, 0));
}

#[test]
fn an_idle_stream_closes_its_windows_on_processing_time() {
    let mut core = WindowCore::new(WindowSettings {
        idle_timeout_ms: 1_000,
        ..settings(WindowKind::Tumbling { size_ms: 60_000 }, 0, 0)
    });
    core.place("k", 5_000, 100_000);
    assert!(core.advance(100_500).firings.is_empty());
    // Idle from 101,000 on: event time flows with processing time.
    assert!(core.advance(155_999).firings.is_empty());
    assert_eq!(core.advance(156_000).firings.len(), 1);
}

#[test]
fn a_sliding_event_goes_to_one_pane_however_small_the_slide() {
    let mut core = WindowCore::new(settings(
        WindowKind::Sliding {
            size_ms: 10_000,
            slide_ms: 100,
        },
        0,
        0,
    ));
    assert_eq!(core.place("k", 12_345, 0), Placement::Pane { pane: 12_300 });
    let firings = core.advance_watermark_to(i64::MAX).firings;
    assert_eq!(firings.len(), 100, "every window over the pane fires");
    assert!(firings.iter().all(|f| f.parts == vec![12_300]));
}

fn kinds(rng: &mut Rng) -> WindowKind {
    match rng.below(3) {
        0 => WindowKind::Tumbling {
            size_ms: 1 + rng.below(50) as i64,
        },
        1 => {
            let slide = 1 + rng.below(20) as i64;
            WindowKind::Sliding {
                size_ms: slide * (1 + rng.below(6) as i64),
                slide_ms: slide,
            }
        }
        _ => WindowKind::Session {
            gap_ms: 1 + rng.below(30) as i64,
        },
    }
}

/// Events in an arrival order that keeps within `bound`: each is at most
/// `bound` behind the highest time before it (negative times included).
fn arrivals(rng: &mut Rng, bound: i64) -> Vec<Input> {
    let mut highest = rng.below(200) as i64 - 100;
    (0..rng.below(120))
        .map(|_| {
            let time = highest - rng.below(bound as u64 + 1) as i64 + rng.below(15) as i64;
            highest = highest.max(time);
            let key = format!("k{}", rng.below(4));
            (key, time, 1 + rng.below(9) as i64)
        })
        .collect()
}

#[test]
fn any_order_within_the_bound_gives_the_batch_results_exactly() {
    for seed in 1..=3_000u64 {
        let mut rng = Rng::seeded(seed);
        let bound = rng.below(40) as i64;
        let settings = settings(kinds(&mut rng), bound, rng.below(20) as i64);
        let events = arrivals(&mut rng, bound);
        let mut driver = Driver::new(settings.clone());
        for event in &events {
            driver.event(event);
            if rng.chance(300) {
                let advance = driver.core.advance(0);
                assert!(
                    advance.firings.iter().all(|f| !f.is_update()),
                    "seed {seed}: nothing is late within the bound"
                );
                driver.take(advance);
            }
            if rng.chance(100) {
                driver.restart();
            }
        }
        let advance = driver.core.advance_watermark_to(i64::MAX);
        driver.take(advance);
        assert!(
            driver.too_late.is_empty(),
            "seed {seed}: {:?}",
            driver.too_late
        );
        assert!(
            driver.results.values().all(|(_, firing)| *firing == 0),
            "seed {seed}: each window fired once"
        );
        let got = driver.sums();
        assert_eq!(
            got,
            reference(&settings, &events),
            "seed {seed}, {settings:?}"
        );
        assert!(driver.parts.is_empty(), "seed {seed}: every part expired");
        assert!(
            driver.core.keys.is_empty(),
            "seed {seed}: no bookkeeping left"
        );
    }
}

#[test]
fn event_times_past_year_9999_or_before_year_1_are_refused_without_overflow() {
    for kind in [
        WindowKind::Tumbling { size_ms: 7 },
        WindowKind::Sliding {
            size_ms: 10_000_000,
            slide_ms: 1_000,
        },
        WindowKind::Session {
            gap_ms: MAX_SPAN_MS,
        },
    ] {
        let settings = settings(kind, MAX_SPAN_MS, MAX_SPAN_MS);
        assert_eq!(settings.problem(), None);
        let mut core = WindowCore::new(settings);
        for time in [i64::MIN, i64::MAX, *EVENT_TIME_RANGE_MS.end() + 1] {
            assert_eq!(core.place("k", time, 0), Placement::OutOfRange);
        }
        for time in [*EVENT_TIME_RANGE_MS.start(), *EVENT_TIME_RANGE_MS.end()] {
            assert!(!matches!(core.place("k", time, 0), Placement::OutOfRange));
        }
        let fired = core.advance_watermark_to(i64::MAX);
        assert!(!fired.firings.is_empty(), "{kind:?}");
    }
}

#[test]
fn late_events_update_or_go_late_and_the_rest_match_the_batch() {
    let (mut updates, mut too_late) = (0, 0);
    for seed in 1..=3_000u64 {
        let mut rng = Rng::seeded(seed);
        let settings = settings(kinds(&mut rng), 0, rng.below(30) as i64);
        // Well past the bound: many events are late.
        let events = arrivals(&mut rng, 60);
        let mut driver = Driver::new(settings.clone());
        let mut kept = Vec::new();
        for event in &events {
            if driver.event(event) {
                kept.push(event.clone());
            }
            if rng.chance(500) {
                let advance = driver.core.advance(0);
                driver.take(advance);
            }
            if rng.chance(100) {
                driver.restart();
            }
        }
        let advance = driver.core.advance_watermark_to(i64::MAX);
        driver.take(advance);
        updates += driver.updates;
        too_late += driver.too_late.len();
        let got = driver.sums();
        let expected = reference(&settings, &kept);
        match settings.kind {
            // An event is kept only if its one window still takes updates:
            // its last firing holds everything kept.
            WindowKind::Tumbling { .. } => assert_eq!(got, expected, "seed {seed}, {settings:?}"),
            // A session past its lateness is gone: a late event beside it
            // starts another rather than reopening it. Each kept event is
            // in exactly one final session.
            WindowKind::Session { .. } => {
                let per_key = |sums: &BTreeMap<(String, Window), i64>| {
                    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
                    for ((key, _), sum) in sums {
                        *totals.entry(key.clone()).or_default() += sum;
                    }
                    totals
                };
                assert_eq!(
                    per_key(&got),
                    per_key(&expected),
                    "seed {seed}, {settings:?}\ngot {got:?}\nexpected {expected:?}\nevents {events:?}\nkept {kept:?}"
                );
            }
            WindowKind::Sliding { .. } => {
                // A window past its lateness keeps the result it had then:
                // events too late for it but not for a later window of the
                // same pane count only in those later windows.
                for (window, sum) in &got {
                    let full = expected.get(window).copied().unwrap_or(0);
                    assert!(*sum <= full, "seed {seed}: {window:?} {sum} > {full}");
                }
                for (window, sum) in &expected {
                    if let Some(got_sum) = got.get(window) {
                        assert!(got_sum <= sum, "seed {seed}");
                    }
                }
                assert!(
                    got.keys().all(|w| expected.contains_key(w)),
                    "seed {seed}: no window out of nothing"
                );
            }
        }
    }
    assert!(
        updates > 1_000 && too_late > 1_000,
        "{updates} updates, {too_late} too late: both cases are exercised"
    );
}

#[test]
fn an_undone_event_leaves_no_trace_in_the_results() {
    for seed in 1..=2_000u64 {
        let mut rng = Rng::seeded(seed);
        let bound = rng.below(40) as i64;
        let settings = settings(kinds(&mut rng), bound, 0);
        let events = arrivals(&mut rng, bound);
        let mut driver = Driver::new(settings.clone());
        let mut kept = Vec::new();
        for event in &events {
            let undo = driver.core.undo_point(&event.0);
            let before = driver.core.clone();
            // A failed event: placed, then put back before its contents
            // were stored (the driver stores nothing of it).
            if rng.chance(4) {
                let _ = driver.core.place(&event.0, event.1, 0);
                driver.core.undo(undo);
                assert_eq!(driver.core, before, "seed {seed}: undo restores the core");
                continue;
            }
            if driver.event(event) {
                kept.push(event.clone());
            }
            if rng.chance(300) {
                let advance = driver.core.advance(0);
                driver.take(advance);
            }
        }
        let advance = driver.core.advance_watermark_to(i64::MAX);
        driver.take(advance);
        let got = driver.sums();
        assert_eq!(
            got,
            reference(&settings, &kept),
            "seed {seed}, {settings:?}"
        );
    }
}

#[test]
fn a_cap_holds_the_watermark_and_lifting_it_catches_up() {
    let mut core = WindowCore::new(settings(WindowKind::Tumbling { size_ms: 10 }, 0, 0));
    core.cap_watermark(Some(15));
    core.place("a", 12, 0);
    core.place("b", 100, 0);
    assert_eq!(core.watermark_ms(), 15, "held at the cap");
    // An event at the cap's time is still on time for its window.
    assert!(matches!(core.place("c", 15, 0), Placement::Pane { .. }));
    // Idle flow stops at the cap too.
    core.advance(1_000_000);
    assert_eq!(core.watermark_ms(), 15);
    core.cap_watermark(None);
    assert_eq!(core.watermark_ms(), 100, "caught up with the events seen");
}

#[test]
fn the_bookkeeping_grows_with_the_panes_not_with_the_overlap() {
    let sliding = WindowKind::Sliding {
        size_ms: 10_000,
        slide_ms: 100,
    };
    let mut core = WindowCore::new(settings(sliding, 0, 0));
    let keys = 1_000;
    for key in 0..keys {
        core.place(&format!("k{key}"), 20_000 + key * 7, 0);
    }
    // Each pane is in 100 windows, half of them fired by now.
    core.advance_watermark_to(26_000);
    let stored = serde_json::to_vec(&core).expect("serializes").len();
    assert!(
        stored < 80 * keys as usize,
        "{stored} bytes for {keys} keys of one pane each"
    );
}

/// Bookkeeping as the version before `due_through_ms` wrote it: no such
/// field, the windows under `keys`, and a mark for every window over a
/// pane that was not due yet.
fn as_written_before_due_through(core: &WindowCore) -> WindowCore {
    let mut stored = serde_json::to_value(core).expect("serializes");
    let watermark = core.watermark_ms();
    let (size, slide) = match core.settings().kind {
        WindowKind::Sliding { size_ms, slide_ms } => (size_ms, slide_ms),
        other => panic!("sliding only here, not {other:?}"),
    };
    let object = stored.as_object_mut().expect("an object");
    object.remove("due_through_ms");
    let keys = object.remove("key_windows").expect("key_windows");
    object.insert("keys".to_string(), keys);
    for windows in object["keys"].as_object_mut().expect("keys").values_mut() {
        let panes = &mut windows["Panes"];
        let starts: Vec<i64> = panes["panes"]
            .as_array()
            .expect("panes")
            .iter()
            .flat_map(|pane| {
                let pane = pane.as_i64().expect("a pane start");
                let latest = pane.div_euclid(slide) * slide;
                (0..)
                    .map(move |n| latest - n * slide)
                    .take_while(move |s| s + size > pane)
            })
            .filter(|start| start + size > watermark)
            .collect();
        for start in starts {
            panes["windows"][start.to_string()] = serde_json::json!({"firings": 0, "late": false});
        }
    }
    serde_json::from_value(stored).expect("the old form opens")
}

#[test]
fn bookkeeping_of_the_previous_version_opens_and_fires_each_window_as_before() {
    for seed in 1..=500u64 {
        let mut rng = Rng::seeded(seed);
        let kind = WindowKind::Sliding {
            size_ms: 5 + rng.below(40) as i64,
            slide_ms: 1 + rng.below(5) as i64,
        };
        let settings = settings(kind, rng.below(10) as i64, rng.below(20) as i64);
        let events = arrivals(&mut rng, 30);
        let half = events.len() / 2;
        let mut core = WindowCore::new(settings);
        for event in &events[..half] {
            core.place(&event.0, event.1, 0);
        }
        core.advance(0);
        let written = serde_json::to_value(&core).expect("serializes");
        assert!(
            written.get("keys").is_none(),
            "a host from before requires `keys`: it must refuse this form, not misread it"
        );
        let mut old = as_written_before_due_through(&core);
        let rest = |core: &mut WindowCore| {
            let mut fired = Vec::new();
            for (i, (key, time, _)) in events[half..].iter().enumerate() {
                fired.push(format!("{:?}", core.place(key, *time, 0)));
                if i % 7 == 0 {
                    fired.extend(core.advance(0).firings.iter().map(|f| format!("{f:?}")));
                }
            }
            let last = core.advance_watermark_to(i64::MAX);
            fired.extend(last.firings.iter().map(|f| format!("{f:?}")));
            fired
        };
        assert_eq!(rest(&mut old), rest(&mut core), "seed {seed}");
    }
}

/// Merges that are associative and not commutative: concatenation.
fn concat(merges: &mut usize) -> impl FnMut(&String, &String) -> Result<String, ()> + '_ {
    move |earlier, later| {
        *merges += 1;
        Ok(format!("{earlier}{later}"))
    }
}

#[test]
fn merged_panes_equal_the_panes_merged_in_order_with_few_merges() {
    use crate::merges::PaneMerges;
    for seed in 1..=2_000u64 {
        let mut rng = Rng::seeded(seed);
        let slide = 1 + rng.below(5) as i64;
        let size = slide * (1 + rng.below(12) as i64);
        let mut panes: BTreeMap<(String, i64), String> = BTreeMap::new();
        let keys = 1 + rng.below(3);
        for n in 0..rng.below(200) {
            let key = format!("k{}", rng.below(keys));
            let pane = rng.below(60) as i64 - 20;
            panes
                .entry((key, pane))
                .or_default()
                .push(char::from(b'a' + (n % 26) as u8));
        }
        // Now and then a budget small enough to be hit.
        let budget = match rng.chance(300) {
            true => 20 + rng.below(400) as usize,
            false => usize::MAX,
        };
        let mut merged = PaneMerges::new(size, budget);
        let (mut merges, mut firings, mut changes) = (0, 0, 0);
        let changing = rng.chance(500);
        for start in (-40..60).filter(|s| s % slide == 0) {
            for key in (0..keys).map(|k| format!("k{k}")) {
                if changing && rng.chance(250) {
                    // Late data into a pane of a window that fired.
                    let pane = start + rng.below(size as u64) as i64 - size / 2;
                    panes.entry((key.clone(), pane)).or_default().push('!');
                    merged.changed(&key, pane);
                    changes += 1;
                }
                let window: Vec<(i64, String)> = panes
                    .range((key.clone(), start)..(key.clone(), start + size))
                    .map(|((_, pane), text)| (*pane, text.clone()))
                    .collect();
                let expected = (!window.is_empty())
                    .then(|| window.iter().map(|(_, t)| t.as_str()).collect::<String>());
                let got = merged.window(&key, start, &window, concat(&mut merges));
                assert_eq!(
                    got,
                    Ok(expected),
                    "seed {seed}: {key} at {start}, size {size}"
                );
                assert!(
                    merged.kept_bytes() <= budget,
                    "seed {seed}: past the budget"
                );
                firings += usize::from(!window.is_empty());
            }
            if rng.chance(100) {
                merged.forget_ended(start - size);
            }
        }
        if changes == 0 && budget == usize::MAX {
            // Each pane is merged into its chunk's tails once and into a
            // head once, and each firing merges a tail with a head, unless
            // the budget made it start over.
            let bound = firings + 2 * panes.len();
            assert!(
                merges <= bound,
                "seed {seed}: {merges} merges for {firings} firings of {} panes",
                panes.len()
            );
        }
    }
}
