//! `sensor-average`: the average temperature of each sensor per minute of
//! event time — a tumbling window, folded incrementally (a window of a
//! million readings is two numbers).
//!
//! Bind it with `key = { json_pointer = "/sensor" }`, `event_time =
//! { json_pointer = "/ts" }` and `window.kind = { tumbling = { size_ms =
//! 60000 } }`. Input `{"sensor": "s1", "ts": 1700000000000, "celsius":
//! 21.5}`; each closed minute publishes an [`Average`] to
//! [`AVERAGE_SUBJECT`] (again, as an update, if late readings change it).

use serde::{Deserialize, Serialize};
use weir_sdk::window::{Firing, IncrementalWindow};
use weir_sdk::{Error, Event, emit};

/// Where averages go.
pub const AVERAGE_SUBJECT: &str = "sensors.average";

#[derive(Deserialize)]
struct Reading {
    celsius: f64,
}

/// A minute's readings so far.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Readings {
    count: u64,
    sum: f64,
}

/// The record published per sensor and minute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Average {
    pub sensor: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub readings: u64,
    pub celsius: f64,
    /// 0 on time; 1, 2, ... for updates after late readings.
    pub firing: u32,
}

pub struct SensorAverage;

impl IncrementalWindow for SensorAverage {
    type Accumulator = Readings;

    fn fold(readings: &mut Readings, event: &Event) -> Result<(), Error> {
        let reading: Reading = event.json()?;
        if !reading.celsius.is_finite() {
            return Err(Error::reject("celsius must be a finite number"));
        }
        readings.count += 1;
        readings.sum += reading.celsius;
        Ok(())
    }

    fn merge(earlier: Readings, later: Readings) -> Readings {
        Readings {
            count: earlier.count + later.count,
            sum: earlier.sum + later.sum,
        }
    }

    fn fire(firing: &Firing, readings: Readings) -> Result<(), Error> {
        if readings.count == 0 {
            return Ok(());
        }
        emit::publish_json(
            AVERAGE_SUBJECT,
            &Average {
                sensor: firing.key.clone(),
                start_ms: firing.start_ms,
                end_ms: firing.end_ms,
                readings: readings.count,
                celsius: readings.sum / readings.count as f64,
                firing: firing.number,
            },
        )
    }
}

weir_sdk::incremental_window!(SensorAverage);

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use weir_sdk::testing::{Placed, WindowHarness, WindowKind, WindowSettings, event};

    fn settings() -> WindowSettings {
        WindowSettings {
            kind: WindowKind::Tumbling { size_ms: 60_000 },
            out_of_orderness_ms: 5_000,
            allowed_lateness_ms: 60_000,
            idle_timeout_ms: 60_000,
            late_subject: None,
        }
    }

    fn reading(sensor: &str, ts: i64, celsius: f64) -> Event {
        let payload = format!(r#"{{"sensor":"{sensor}","ts":{ts},"celsius":{celsius}}}"#);
        event("sensors.readings", sensor, payload).with_time(ts)
    }

    #[test]
    fn averages_each_minute_and_updates_after_a_late_reading() {
        let mut h =
            WindowHarness::<weir_sdk::testing::Incremental<SensorAverage>>::incremental(settings());
        for (ts, celsius) in [(1_000, 20.0), (30_000, 22.0), (61_000, 30.0)] {
            assert_eq!(h.event(reading("s1", ts, celsius)), Ok(Placed::InWindow));
        }
        // 61 s less 5 s of out-of-orderness: the first minute is not closed yet.
        assert!(h.fire_due().is_empty());
        h.event(reading("s1", 70_000, 30.0)).expect("folds");
        assert_eq!(h.fire_due(), vec![Ok(())]);
        let first: Average = h.take_emitted()[0].json();
        assert_eq!((first.readings, first.celsius, first.firing), (2, 21.0, 0));
        // A late reading of the first minute: an update.
        h.event(reading("s1", 59_000, 27.0)).expect("folds");
        assert_eq!(h.fire_due(), vec![Ok(())]);
        let update: Average = h.take_emitted()[0].json();
        assert_eq!(
            (update.readings, update.celsius, update.firing),
            (3, 23.0, 1)
        );
    }

    #[test]
    fn a_bad_reading_is_rejected_and_counts_nowhere() {
        let mut h =
            WindowHarness::<weir_sdk::testing::Incremental<SensorAverage>>::incremental(settings());
        let bad = event("sensors.readings", "s1", r#"{"celsius":"hot"}"#).with_time(1_000);
        assert!(matches!(h.event(bad), Err(Error::Reject(_))));
        h.event(reading("s1", 2_000, 10.0)).expect("folds");
        h.advance_watermark_to(60_000);
        let average: Average = h.take_emitted()[0].json();
        assert_eq!((average.readings, average.celsius), (1, 10.0));
    }
}
