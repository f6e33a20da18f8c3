//! Event-time windows against a batch computation written here, on a real
//! nats-server and Postgres: in order, out of order within the bound, late
//! within the allowed lateness (an update), too late (the late subject);
//! sessions that merge; an idle stream closing its windows; and a host
//! killed at every crash point and at random, restarted, and exact.
//!
//! Outputs are checked by message id and by content: every window's final
//! result equals the reference, each (window, firing number) was published
//! under one id with one content, and no firing number is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::process::{HostProcess, log_tail, signal};
use weir_e2e::*;
use weir_host::config::{FunctionSpec, HostConfig, KeySource, TimeSource};
use weir_host::crash::CrashPoint;
use weir_host::dispatch::window_headers;
use weir_host::windows::{WindowKind, WindowSettings};

/// One input event.
#[derive(Debug, Clone)]
pub(crate) struct Ev {
    pub(crate) id: u64,
    pub(crate) key: String,
    pub(crate) ts: i64,
    pub(crate) value: i64,
}

impl Ev {
    pub(crate) fn payload(&self) -> Vec<u8> {
        serde_json::json!({"id": self.id, "key": self.key, "ts": self.ts, "value": self.value})
            .to_string()
            .into_bytes()
    }
}

/// A window of a key: (key, start, end).
type WindowId = (String, i64, i64);

/// What a window holds: its event ids, sorted.
pub(crate) type Contents = BTreeMap<WindowId, Vec<u64>>;

pub(crate) fn settings(kind: WindowKind, bound: i64, lateness: i64) -> WindowSettings {
    WindowSettings {
        kind,
        out_of_orderness_ms: bound,
        allowed_lateness_ms: lateness,
        idle_timeout_ms: 60_000,
        late_subject: Some("windows.late".into()),
    }
}

pub(crate) fn window_config(
    stack: &Stack,
    component_name: &str,
    window: WindowSettings,
) -> Result<HostConfig> {
    let function = FunctionSpec {
        event_time: TimeSource::JsonPointer("/ts".into()),
        outputs: vec!["windows.out".into()],
        batch_size: 20,
        window: Some(window),
        ..FunctionSpec::new(
            "win",
            component(component_name)?,
            "EVENTS",
            "events.>",
            KeySource::JsonPointer("/key".into()),
        )
    };
    Ok(stack.config(
        vec![
            stream("EVENTS", &["events.>"]),
            stream("WINDOWS", &["windows.>"]),
        ],
        vec![function],
    ))
}

/// The windows an event at `ts` falls in (tumbling and sliding).
fn windows_of(kind: WindowKind, ts: i64) -> Vec<(i64, i64)> {
    let (size, slide) = match kind {
        WindowKind::Tumbling { size_ms } => (size_ms, size_ms),
        WindowKind::Sliding { size_ms, slide_ms } => (size_ms, slide_ms),
        WindowKind::Session { .. } => unreachable!("sessions are computed apart"),
    };
    let mut start = ts.div_euclid(slide) * slide;
    let mut windows = Vec::new();
    while start + size > ts {
        windows.push((start, start + size));
        start -= slide;
    }
    windows
}

/// The batch computation: the events in stream order, each placed in the
/// windows that still take it at the watermark its arrival finds (the
/// highest event time before it less the bound); with `rejects`, a value
/// of 13 is rejected by the function (`window-sum` folds) and counts
/// nowhere. Returns every window's contents and the ids too late for all
/// of their windows.
pub(crate) fn reference(
    settings: &WindowSettings,
    events: &[Ev],
    rejects: bool,
) -> (Contents, BTreeSet<u64>) {
    let counted = |e: &&Ev| !rejects || e.value != 13;
    let mut contents = Contents::new();
    let mut too_late = BTreeSet::new();
    let mut watermark = i64::MIN;
    if let WindowKind::Session { gap_ms } = settings.kind {
        // Within the bound and with no lateness nothing is late: sessions
        // are the runs of a key's events closer than the gap.
        let mut by_key: BTreeMap<&str, Vec<(i64, u64)>> = BTreeMap::new();
        for event in events.iter().filter(counted) {
            by_key
                .entry(&event.key)
                .or_default()
                .push((event.ts, event.id));
        }
        for (key, mut times) in by_key {
            times.sort();
            let mut current: Option<(i64, i64, Vec<u64>)> = None;
            for (ts, id) in times {
                current = match current {
                    Some((start, end, mut ids)) if ts < end => {
                        ids.push(id);
                        Some((start, end.max(ts + gap_ms), ids))
                    }
                    done => {
                        if let Some((start, end, ids)) = done {
                            contents.insert((key.to_string(), start, end), ids);
                        }
                        Some((ts, ts + gap_ms, vec![id]))
                    }
                };
            }
            if let Some((start, end, ids)) = current {
                contents.insert((key.to_string(), start, end), ids);
            }
        }
    } else {
        for event in events.iter().filter(counted) {
            let open: Vec<(i64, i64)> = windows_of(settings.kind, event.ts)
                .into_iter()
                .filter(|(_, end)| end + settings.allowed_lateness_ms > watermark)
                .collect();
            if open.is_empty() {
                too_late.insert(event.id);
                continue;
            }
            for (start, end) in open {
                contents
                    .entry((event.key.clone(), start, end))
                    .or_default()
                    .push(event.id);
            }
            watermark = watermark.max(event.ts - settings.out_of_orderness_ms);
        }
    }
    for ids in contents.values_mut() {
        ids.sort_unstable();
    }
    (contents, too_late)
}

/// The firings on `windows.out`, checked: per (window, firing number) one
/// message id and one content, numbers without gaps. Returns each
/// window's last result, and how many firings were updates.
pub(crate) async fn final_results(stack: &Stack) -> Result<(Contents, usize)> {
    let mut firings: BTreeMap<(WindowId, u64), (String, Vec<u64>)> = BTreeMap::new();
    for message in read_stream(&stack.js, "WINDOWS").await? {
        if message.subject.as_str() != "windows.out" {
            continue;
        }
        let out: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let window: WindowId = (
            out["key"].as_str().context("key")?.to_string(),
            out["start"].as_i64().context("start")?,
            out["end"].as_i64().context("end")?,
        );
        let firing = out["firing"].as_u64().context("firing")?;
        assert_eq!(
            header(&message, window_headers::FIRING),
            firing.to_string(),
            "the firing number is in the headers"
        );
        let mut ids: Vec<u64> = serde_json::from_value(out["ids"].clone())?;
        ids.sort_unstable();
        let id = header(&message, "Nats-Msg-Id");
        match firings.get(&(window.clone(), firing)) {
            None => {
                firings.insert((window, firing), (id, ids));
            }
            Some((seen_id, seen_ids)) => {
                assert_eq!(&id, seen_id, "{window:?} firing {firing} under two ids");
                assert_eq!(
                    &ids, seen_ids,
                    "{window:?} firing {firing} with two contents"
                );
            }
        }
    }
    let updates = firings.keys().filter(|(_, firing)| *firing > 0).count();
    let mut last: BTreeMap<WindowId, (u64, Vec<u64>)> = BTreeMap::new();
    for ((window, firing), (_, ids)) in firings {
        let expected_number = last.get(&window).map_or(0, |(n, _)| n + 1);
        assert_eq!(firing, expected_number, "{window:?}: no firing is skipped");
        last.insert(window, (firing, ids));
    }
    let last = last.into_iter().map(|(w, (_, ids))| (w, ids)).collect();
    Ok((last, updates))
}

/// The ids on the late subject, each with its lateness headers.
async fn late_ids(stack: &Stack) -> Result<BTreeSet<u64>> {
    let mut ids = BTreeSet::new();
    for message in read_stream(&stack.js, "WINDOWS").await? {
        if message.subject.as_str() != "windows.late" {
            continue;
        }
        let behind: i64 = header(&message, window_headers::LATE_BEHIND).parse()?;
        assert!(behind > 0, "a late event is behind the watermark");
        let input: serde_json::Value = serde_json::from_slice(&message.payload)?;
        assert!(ids.insert(input["id"].as_u64().context("id")?), "late once");
    }
    Ok(ids)
}

/// The events, then one far later on key "end" that moves the watermark
/// past every window of the test (its own window never closes).
pub(crate) fn with_closer(mut events: Vec<Ev>) -> Vec<Ev> {
    let last = events.iter().map(|e| e.ts).max().unwrap_or(0);
    events.push(Ev {
        id: 1_000_000,
        key: "end".into(),
        ts: last + 1_000_000,
        value: 0,
    });
    events
}

/// Waits until the final results match the reference (without the
/// closer's window); returns them and how many firings were updates.
pub(crate) async fn wait_for_reference(
    stack: &Stack,
    expected: &Contents,
) -> Result<(Contents, usize)> {
    let mut expected = expected.clone();
    expected.retain(|(key, _, _), _| key != "end");
    let expected = &expected;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (mut got, updates) = final_results(stack).await?;
        got.retain(|(key, _, _), _| key != "end");
        if &got == expected {
            return Ok((got, updates));
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = expected
                .iter()
                .filter(|(w, ids)| got.get(*w) != Some(ids))
                .collect();
            let extra: Vec<_> = got.keys().filter(|w| !expected.contains_key(*w)).collect();
            anyhow::bail!(
                "window results differ: expected but not got {missing:?}; got unexpected {extra:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Events on three keys, event time moving on 10 ms per event on average,
/// published out of order within `bound` (each at most that far behind
/// the highest before it), with a few rejected ones (value 13), and
/// `late` events sent well behind the watermark.
pub(crate) fn events(count: u64, bound: i64, late: u64, seed: u64) -> Vec<Ev> {
    let mut rng = crate::fraud::Lcg::new(seed);
    let mut now = 10_000i64;
    let mut events = Vec::new();
    for id in 1..=count {
        now += rng.below(20) as i64;
        let ts = now - rng.below(bound as u64 + 1) as i64;
        let value = match rng.below(25) {
            0 => 13,
            v => v as i64,
        };
        events.push(Ev {
            id,
            key: format!("k{}", rng.below(3)),
            ts,
            value,
        });
        if late > 0 && id % (count / late).max(1) == 0 {
            // Behind by a random amount: some within the lateness, some past it.
            let behind = bound + 1 + rng.below(3_000) as i64;
            events.push(Ev {
                id: 500_000 + id,
                key: format!("k{}", rng.below(3)),
                ts: now - behind,
                value: 1 + rng.below(9) as i64,
            });
        }
    }
    events
}

async fn run_against_reference(
    db: &PgConnectOptions,
    component_name: &str,
    window: WindowSettings,
    inputs: Vec<Ev>,
) -> Result<()> {
    let stack = Stack::start(db).await?;
    let host = stack
        .host(window_config(&stack, component_name, window.clone())?)
        .await?;
    let inputs = with_closer(inputs);
    publish_all(&stack.js, "events.in", inputs.iter().map(Ev::payload)).await?;
    let rejects = component_name == "window-sum";
    let (expected, too_late) = reference(&window, &inputs, rejects);
    assert!(expected.len() > 5, "the test has windows: {expected:?}");
    let (_, updates) = wait_for_reference(&stack, &expected).await?;
    if window.allowed_lateness_ms > 0 {
        assert!(
            updates > 0,
            "late events within the lateness updated windows"
        );
    }
    eventually(Duration::from_secs(30), "late events", || async {
        Ok(late_ids(&stack).await? == too_late)
    })
    .await?;
    let dead = read_stream(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?;
    let rejected: BTreeSet<u64> = inputs
        .iter()
        .filter(|e| rejects && e.value == 13)
        .map(|e| e.id)
        .collect();
    let dead_ids: BTreeSet<u64> = dead
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.payload)?["id"]
                .as_u64()
                .context("id")
        })
        .collect::<Result<_>>()?;
    assert_eq!(
        dead_ids, rejected,
        "each rejected event dead-lettered, nothing else"
    );
    host.stop().await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn tumbling_windows_in_and_out_of_order_late_and_too_late_match_the_batch(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let window = settings(WindowKind::Tumbling { size_ms: 1_000 }, 300, 1_500);
    let mut inputs = events(300, 300, 30, 7);
    // A key with a line break: it goes into message ids and headers.
    for (id, ts) in [(900_001, 10_100), (900_002, 10_400)] {
        inputs.insert(
            0,
            Ev {
                id,
                key: "line\nbreak".into(),
                ts,
                value: 4,
            },
        );
    }
    let (_, too_late) = reference(&window, &with_closer(inputs.clone()), true);
    assert!(!too_late.is_empty(), "some events are too late");
    run_against_reference(&db, "window-sum", window, inputs).await
}

#[sqlx::test(migrations = false)]
async fn sliding_windows_made_of_panes_match_the_batch(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let window = settings(
        WindowKind::Sliding {
            size_ms: 1_000,
            slide_ms: 250,
        },
        200,
        0,
    );
    run_against_reference(&db, "window-sum", window, events(200, 200, 0, 11)).await
}

#[sqlx::test(migrations = false)]
async fn buffered_sessions_merge_when_an_event_bridges_them(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    // Spread out ten times (bound included), so that keys have many
    // sessions of a 100 ms gap.
    let window = settings(WindowKind::Session { gap_ms: 100 }, 5_000, 0);
    // Two sessions of key "u", then the event that bridges them arrives
    // later (within the bound): one session holds all three.
    let mut inputs = vec![
        Ev {
            id: 1,
            key: "u".into(),
            ts: 10_000,
            value: 1,
        },
        Ev {
            id: 2,
            key: "u".into(),
            ts: 10_180,
            value: 1,
        },
        Ev {
            id: 3,
            key: "u".into(),
            ts: 10_090,
            value: 1,
        },
    ];
    inputs.extend(
        events(150, 400, 0, 3)
            .into_iter()
            .map(|e| Ev { ts: e.ts * 10, ..e }),
    );
    let (expected, _) = reference(&window, &with_closer(inputs.clone()), false);
    assert!(
        expected.contains_key(&("u".to_string(), 10_000, 10_280)),
        "the reference merges them: {expected:?}"
    );
    run_against_reference(&db, "window-events", window, inputs).await
}

#[sqlx::test(migrations = false)]
async fn an_idle_stream_closes_its_windows_after_the_idle_timeout(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let window = WindowSettings {
        idle_timeout_ms: 1_000,
        ..settings(WindowKind::Tumbling { size_ms: 5_000 }, 0, 0)
    };
    let host = stack
        .host(window_config(&stack, "window-sum", window.clone())?)
        .await?;
    // Event times in the present: a minute's window, and nothing after it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let inputs: Vec<Ev> = (1..=5)
        .map(|id| Ev {
            id,
            key: "quiet".into(),
            ts: now + id as i64,
            value: 2,
        })
        .collect();
    publish_all(&stack.js, "events.in", inputs.iter().map(Ev::payload)).await?;
    let (expected, _) = reference(&window, &inputs, true);
    // The window ends within 5 s of now; with no event after it the
    // watermark moves on with processing time once a second has passed.
    let (got, _) = wait_for_reference(&stack, &expected).await?;
    assert_eq!(got.len(), 1);
    host.stop().await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn windows_survive_kills_at_every_crash_point_and_restarts_exactly(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    // Windows of 100 ms and 20 events (~200 ms) a batch: nearly every
    // batch fires windows, so every crash point finds firings in flight.
    let window = settings(WindowKind::Tumbling { size_ms: 100 }, 200, 0);
    survive_kills(&db, window, events(600, 200, 0, 5)).await?;
    Ok(())
}

/// Sliding windows read panes that earlier firings merged (kept between
/// batches): late events within the lateness change panes of windows
/// that fired, and kills drop what was merged. Results stay exact.
#[sqlx::test(migrations = false)]
async fn sliding_windows_with_late_updates_survive_kills_exactly(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let sliding = WindowKind::Sliding {
        size_ms: 400,
        slide_ms: 100,
    };
    // The lateness is far above what the watermark moves in a batch.
    let window = settings(sliding, 200, 1_500);
    let updates = survive_kills(&db, window, events(600, 200, 40, 11)).await?;
    assert!(updates > 0, "late events updated windows that fired");
    Ok(())
}

/// Runs `events` (and a closer) through `window-sum` while the host is
/// killed at each crash point twice, SIGKILLed at random five times and
/// stopped gracefully once; the final results must be the reference.
/// Returns how many firings were updates.
async fn survive_kills(
    db: &PgConnectOptions,
    window: WindowSettings,
    events: Vec<Ev>,
) -> Result<usize> {
    let stack = Stack::start(db).await?;
    let dir = tempdir::TempDir::new("weir-windows")?;
    let config = window_config(&stack, "window-sum", window.clone())?;
    for (name, subjects) in [("EVENTS", "events.>"), ("WINDOWS", "windows.>")] {
        ensure_stream(&stack.js, name, &[subjects]).await?;
    }
    let inputs = with_closer(events);
    let (expected, _) = reference(&window, &inputs, true);
    let producer = {
        let js = stack.js.clone();
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let mut sequences = Vec::new();
            for chunk in inputs.chunks(50) {
                sequences
                    .extend(publish_all(&js, "events.in", chunk.iter().map(Ev::payload)).await?);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(sequences)
        })
    };
    let mut rng = crate::fraud::Lcg::new(9);
    let mut host = HostProcess::start(&config, dir.path(), &[])?;
    for point in CrashPoint::ALL
        .iter()
        .cycle()
        .take(CrashPoint::ALL.len() * 2)
    {
        host.kill();
        host = HostProcess::start(
            &config,
            dir.path(),
            &[
                ("WEIR_CRASH_POINT", point.name().to_string()),
                ("WEIR_CRASH_AFTER", (1 + rng.below(6)).to_string()),
            ],
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !host.has_exited() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the host never reached crash point {}\n{}",
                point.name(),
                log_tail(dir.path(), 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for _ in 0..5 {
        host = HostProcess::start(&config, dir.path(), &[])?;
        tokio::time::sleep(Duration::from_millis(200 + rng.below(400))).await;
        host.kill();
    }
    // A graceful stop in the middle too.
    host = HostProcess::start(&config, dir.path(), &[])?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Err(error) = signal(host.pid(), "TERM") {
        anyhow::bail!("cannot stop the host: {error}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !host.has_exited() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the host did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host = HostProcess::start(&config, dir.path(), &[])?;
    producer.await??;
    let (_, updates) = wait_for_reference(&stack, &expected)
        .await
        .map_err(|e| e.context(log_tail(dir.path(), 60)))?;
    host.kill();
    Ok(updates)
}

/// The SDK-built example: per sensor and minute, the average of exactly
/// the readings of that minute.
#[sqlx::test(migrations = false)]
async fn the_sensor_average_example_averages_each_minute(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let function = FunctionSpec {
        event_time: TimeSource::JsonPointer("/ts".into()),
        outputs: vec!["sensors.average".into()],
        window: Some(settings(WindowKind::Tumbling { size_ms: 60_000 }, 5_000, 0)),
        ..FunctionSpec::new(
            "sensor-average",
            component("sensor-average")?,
            "READINGS",
            "sensors.readings",
            KeySource::JsonPointer("/sensor".into()),
        )
    };
    let config = stack.config(
        vec![
            stream("READINGS", &["sensors.readings"]),
            stream("AVERAGES", &["sensors.average", "windows.late"]),
        ],
        vec![function],
    );
    let host = stack.host(config).await?;
    // Two sensors, a reading every 7 s for five minutes, then one far later.
    let mut readings = Vec::new();
    let mut expected: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
    for (i, ts) in (0..300_000i64).step_by(7_000).enumerate() {
        for sensor in ["s1", "s2"] {
            let celsius = 15.0 + (i % 11) as f64 + if sensor == "s2" { 0.5 } else { 0.0 };
            readings.push(serde_json::json!({"sensor": sensor, "ts": ts, "celsius": celsius}));
            let minute = expected
                .entry((sensor.to_string(), ts / 60_000 * 60_000))
                .or_default();
            minute.0 += 1;
            minute.1 += celsius;
        }
    }
    readings.push(serde_json::json!({"sensor": "s1", "ts": 10_000_000, "celsius": 0.0}));
    publish_all(
        &stack.js,
        "sensors.readings",
        readings.iter().map(|r| r.to_string().into_bytes()),
    )
    .await?;
    let averages = || async {
        let mut got: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
        for message in read_stream(&stack.js, "AVERAGES").await? {
            let average: serde_json::Value = serde_json::from_slice(&message.payload)?;
            let sensor = average["sensor"].as_str().context("sensor")?.to_string();
            let start = average["start_ms"].as_i64().context("start")?;
            let count = average["readings"].as_u64().context("readings")?;
            let celsius = average["celsius"].as_f64().context("celsius")?;
            got.insert((sensor, start), (count, celsius));
        }
        anyhow::Ok(got)
    };
    eventually(
        Duration::from_secs(60),
        "every minute's average",
        || async { Ok(averages().await?.len() == expected.len()) },
    )
    .await?;
    let got = averages().await?;
    for (minute, (count, sum)) in &expected {
        let (got_count, got_average) = got[minute];
        assert_eq!(got_count, *count, "{minute:?}");
        assert!(
            (got_average - sum / *count as f64).abs() < 1e-9,
            "{minute:?}"
        );
    }
    host.stop().await?;
    Ok(())
}

/// An event retried for a while (its fold asks for a retry until a wall
/// clock time) holds the watermark: events of other keys flowing past it
/// do not make it too late, and its window, when it closes, holds it.
#[sqlx::test(migrations = false)]
async fn a_retried_event_holds_the_watermark_until_it_is_applied(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let window = settings(WindowKind::Tumbling { size_ms: 1_000 }, 0, 0);
    let mut config = window_config(&stack, "window-sum", window)?;
    config.functions[0].retry = weir_host::config::RetryPolicy {
        max_attempts: 10,
        initial_backoff_ms: 200,
        max_backoff_ms: 1_000,
    };
    let host = stack.host(config).await?;
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        + 2_500;
    let waits =
        serde_json::json!({"id": 1, "key": "a", "ts": 1_500, "value": 5, "retry_until_ms": until});
    let mut payloads = vec![waits.to_string().into_bytes()];
    // Other keys move on by ten windows meanwhile.
    for id in 2..=40u64 {
        let ev = Ev {
            id,
            key: "b".into(),
            ts: 1_000 + id as i64 * 250,
            value: 1,
        };
        payloads.push(ev.payload());
    }
    publish_all(&stack.js, "events.in", payloads).await?;
    let expected_a: Vec<u64> = vec![1];
    eventually(
        Duration::from_secs(60),
        "the held event's window",
        || async {
            let (got, _) = final_results(&stack).await?;
            Ok(got.get(&("a".to_string(), 1_000, 2_000)) == Some(&expected_a))
        },
    )
    .await?;
    assert!(late_ids(&stack).await?.is_empty(), "nothing was too late");
    let (got, _) = final_results(&stack).await?;
    // Key b's windows before the last are complete: 4 events each.
    for start in (2_000..10_000).step_by(1_000) {
        let ids = got.get(&("b".to_string(), start, start + 1_000));
        assert_eq!(ids.map(Vec::len), Some(4), "window {start} of b: {ids:?}");
    }
    host.stop().await?;
    Ok(())
}

/// Bad inputs to a window function without a late subject: a key the
/// host keeps for itself, an event time past year 9999 and an event too
/// late for every window are each dead-lettered with a clear kind and
/// reason, and the windows of the good events are exact.
#[sqlx::test(migrations = false)]
async fn bad_window_inputs_are_dead_lettered_and_lose_nothing(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let window = WindowSettings {
        late_subject: None,
        ..settings(WindowKind::Tumbling { size_ms: 1_000 }, 0, 0)
    };
    let host = stack
        .host(window_config(&stack, "window-sum", window.clone())?)
        .await?;
    let good: Vec<Ev> = (1..=20u64)
        .map(|id| Ev {
            id,
            key: "k".into(),
            ts: 10_000 + id as i64 * 100,
            value: 1,
        })
        .collect();
    let bad = [
        (101, "\u{1}windows", 10_500, "bad-event", "U+0001"),
        (
            102,
            "k",
            999_999_999_999_999,
            "bad-event",
            "years 1 to 9999",
        ),
        (103, "k", 1_000, "too-late", "behind the watermark"),
    ];
    // The good events, the bad ones, then the closer of the good ones.
    let mut inputs = with_closer(good.clone());
    let closer = inputs.pop().context("the closer")?;
    inputs.extend(bad.iter().map(|(id, key, ts, _, _)| Ev {
        id: *id,
        key: key.to_string(),
        ts: *ts,
        value: 1,
    }));
    inputs.push(closer);
    publish_all(&stack.js, "events.in", inputs.iter().map(Ev::payload)).await?;
    let (mut expected, _) = reference(&window, &with_closer(good), true);
    expected.retain(|(key, _, _), _| key != "end");
    wait_for_reference(&stack, &expected).await?;
    let mut dead = BTreeMap::new();
    eventually(Duration::from_secs(30), "three dead letters", || async {
        Ok(stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await? >= 3)
    })
    .await?;
    for message in read_stream(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await? {
        let input: serde_json::Value = serde_json::from_slice(&message.payload)?;
        let id = input["id"].as_u64().context("id")?;
        let kind = header(&message, "Weir-Error-Kind");
        let reason = header(&message, "Weir-Error");
        anyhow::ensure!(dead.insert(id, (kind, reason)).is_none(), "{id} twice");
    }
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for (id, _, _, kind, reason) in bad {
        let (got_kind, got_reason) = &dead[&id];
        assert_eq!(got_kind, kind, "event {id}");
        assert!(got_reason.contains(reason), "event {id}: {got_reason}");
    }
    host.stop().await?;
    Ok(())
}
