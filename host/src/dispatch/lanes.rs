//! The versions a worker runs side by side (its lanes: the stable version
//! and maybe a canary), which lane a key goes to, and running a planned
//! batch on their warm instances on a blocking thread.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::batch::{Batch, RunResult};
use super::windowed::WindowRun;
use crate::breaker::{Breaker, CallResult, Permit, SystemClock, Transition};
use crate::config::FunctionSpec;
use crate::outcome::{Failure, FailureKind};
use crate::sandbox::{
    Event, FunctionCode, FunctionInstance, InstanceSettings, Invocation, InvocationDiagnostics,
};
use crate::state::BatchView;

/// A version for a worker to run.
#[derive(Debug)]
pub struct VersionCode {
    pub code: FunctionCode,
    pub settings: InstanceSettings,
    pub instance: Option<FunctionInstance>,
    pub number: Option<i32>,
}

/// One version a worker runs: its code, warm instance, circuit breaker and
/// metrics.
pub(super) struct Lane {
    /// `v<N>` for a deployed version, else the module digest's first 12
    /// hex digits: the `version` metric label.
    pub version: String,
    /// The deployed version number, for functions deployed through the API.
    pub number: Option<i32>,
    pub code: FunctionCode,
    pub settings: InstanceSettings,
    /// Taken while a batch runs on the blocking thread.
    pub instance: Option<FunctionInstance>,
    /// Taken while a batch runs on the blocking thread.
    pub breaker: Option<Breaker>,
    pub metrics: WorkerMetrics,
    /// Calls, failures and microseconds not yet added to the shared
    /// statistics.
    pub unreported: (i64, i64, i64),
    /// Calls and failures since this worker started: the auto-rollback
    /// compares them.
    pub seen: (u64, u64),
}

impl Lane {
    pub fn new(function: &str, version: VersionCode) -> Self {
        // Deployed versions by number (two may share a module); configured
        // functions by module digest.
        let label = match version.number {
            Some(number) => format!("v{number}"),
            None => version_of(&version.code),
        };
        let metrics = WorkerMetrics::new(function, &label);
        metrics.breaker_state.set(0.0);
        Self {
            breaker: Some(Breaker::new(
                version.settings.breaker.clone(),
                Arc::new(SystemClock),
            )),
            version: label,
            number: version.number,
            code: version.code,
            settings: version.settings,
            instance: version.instance,
            metrics,
            unreported: (0, 0, 0),
            seen: (0, 0),
        }
    }
}

/// Which lane a key goes to: the canary (1) when the key's stable hash
/// falls below `weight` percent, else the stable version (0). The hash is
/// FNV-1a, the same on every host and across restarts, so a key stays on
/// one version for as long as the weight does not change.
pub fn lane_for(key: &str, weight: u8) -> usize {
    if weight == 0 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    usize::from(hash % 100 < u64::from(weight))
}

/// The function's metric handles, registered once at start-up.
pub(super) struct WorkerMetrics {
    pub invocations: metrics::Counter,
    pub invocation_seconds: metrics::Histogram,
    pub dead_letters: metrics::Counter,
    pub retries: metrics::Counter,
    pub commit_seconds: metrics::Histogram,
    pub batch_size: metrics::Histogram,
    pub in_flight: metrics::Gauge,
    pub consumer_pending: metrics::Gauge,
    pub breaker_state: metrics::Gauge,
    pub labels: [(&'static str, String); 2],
}

impl WorkerMetrics {
    fn new(function: &str, version: &str) -> Self {
        let labels = [
            ("function", function.to_string()),
            ("version", version.to_string()),
        ];
        Self {
            invocations: metrics::counter!("weir_invocations_total", &labels),
            invocation_seconds: metrics::histogram!("weir_invocation_seconds", &labels),
            dead_letters: metrics::counter!("weir_dead_letters_total", &labels),
            retries: metrics::counter!("weir_retries_total", &labels),
            commit_seconds: metrics::histogram!("weir_commit_seconds", &labels),
            batch_size: metrics::histogram!("weir_batch_size", &labels),
            in_flight: metrics::gauge!("weir_in_flight", &labels),
            consumer_pending: metrics::gauge!("weir_consumer_pending", &labels),
            breaker_state: metrics::gauge!("weir_breaker_state", &labels),
            labels,
        }
    }
}

/// Room kept in every output for the headers Weir adds (message id, trace
/// context) on top of what the guest publishes.
const WEIR_HEADER_ROOM: usize = 1024;

/// The sandbox settings of a function's instances, for a NATS server that
/// takes messages of up to `max_payload` bytes.
pub fn instance_settings(spec: &FunctionSpec, max_payload: usize) -> InstanceSettings {
    InstanceSettings {
        function: Arc::from(spec.name.as_str()),
        allowed_outputs: spec.outputs.clone().into(),
        deadline: Duration::from_millis(spec.limits.deadline_ms),
        limits: spec.limits.clone(),
        max_record_bytes: max_payload.saturating_sub(WEIR_HEADER_ROOM),
        breaker: spec.breaker.clone(),
    }
}

/// The `version` label of a function: its module digest's first 12 hex
/// digits.
pub fn version_of(code: &FunctionCode) -> String {
    code.digest().chars().take(12).collect()
}

/// One lane's code and taken state, on the blocking thread.
pub(super) struct LaneRun {
    pub code: FunctionCode,
    pub settings: InstanceSettings,
    pub instance: Option<FunctionInstance>,
    pub breaker: Option<Breaker>,
}

impl LaneRun {
    /// Takes a lane's instance and breaker for a run.
    pub fn take(lane: &mut Lane) -> Self {
        Self {
            code: lane.code.clone(),
            settings: lane.settings.clone(),
            instance: lane.instance.take(),
            breaker: lane.breaker.take(),
        }
    }
}

/// What one batch's run on the blocking thread gives back.
pub(super) struct Ran {
    pub batch: Batch,
    pub lanes: Vec<LaneRun>,
    pub view: BatchView,
    /// By record index: the invocation of each record that ran.
    pub invocations: Vec<Option<Invocation>>,
    /// Breaker transitions, with the lane they happened in.
    pub transitions: Vec<(usize, Transition)>,
    /// A windowed function's bookkeeping and firings.
    pub windows: Option<WindowRun>,
}

/// Runs the batch's events in the order the batch gives them, on the
/// current thread (a blocking one): each one handled, or (`windows`)
/// placed in its window. Stops between events once `stop` fires; the rest
/// is handed back by the batch.
pub(super) fn run_batch(
    batch: Batch,
    lanes: Vec<LaneRun>,
    view: BatchView,
    mut events: Vec<Option<(Event, bool)>>,
    windows: Option<WindowRun>,
    stop: &CancellationToken,
) -> Ran {
    let mut ran = Ran {
        invocations: (0..events.len()).map(|_| None).collect(),
        batch,
        lanes,
        view,
        transitions: Vec::new(),
        windows,
    };
    if let Some(windows) = &mut ran.windows {
        windows.open_book(&mut ran.view);
    }
    while let Some(index) = ran.batch.next_run() {
        if stop.is_cancelled() {
            ran.batch.stop_running();
            break;
        }
        let Some((event, traced)) = events[index].take() else {
            ran.batch.ran(index, RunResult::HostFailed);
            continue;
        };
        let lane = ran.batch.records()[index].lane;
        let result = match ran.windows.is_some() {
            true => ran.place_in_window(index, lane, &event, traced),
            false => ran.run_guarded(index, lane, |live| live.handle(&event, traced)),
        };
        ran.batch.ran(index, result);
    }
    ran
}

impl Ran {
    /// Asks the lane's breaker, makes the call, and tells the breaker how
    /// it went.
    pub(super) fn run_guarded(
        &mut self,
        index: usize,
        lane: usize,
        call: impl FnOnce(&mut FunctionInstance) -> Invocation,
    ) -> RunResult {
        if let Some(breaker) = &mut self.lanes[lane].breaker {
            let (permit, transition) = breaker.try_acquire();
            self.transitions.extend(transition.map(|t| (lane, t)));
            if let Permit::Refused { retry_after } = permit {
                return RunResult::Refused { retry_after };
            }
        }
        let Some(invocation) = self.run_one(lane, call) else {
            if let Some(breaker) = &mut self.lanes[lane].breaker {
                breaker.release();
            }
            return RunResult::HostFailed;
        };
        if let Some(breaker) = &mut self.lanes[lane].breaker {
            match &invocation.result {
                Err(failure) if !failure.kind.counts_against_function() => breaker.release(),
                result => {
                    let transition = breaker.record(CallResult {
                        failed: result.is_err(),
                        duration: invocation.took,
                    });
                    self.transitions.extend(transition.map(|t| (lane, t)));
                }
            }
        }
        let result = match &invocation.result {
            Ok(handled) => Ok((
                handled.wrote,
                handled.outputs.len(),
                handled
                    .outputs
                    .iter()
                    .map(|o| o.payload.len() + o.subject.len())
                    .sum(),
            )),
            Err(failure) => Err(failure.clone()),
        };
        self.invocations[index] = Some(invocation);
        RunResult::Invoked(result)
    }

    /// Makes one call on the lane's warm instance, or a new one if there is
    /// none or the last one trapped. `None` when the host could not provide
    /// an instance (no pool slot): not the guest's doing.
    pub(super) fn run_one(
        &mut self,
        lane: usize,
        call: impl FnOnce(&mut FunctionInstance) -> Invocation,
    ) -> Option<Invocation> {
        let run = &mut self.lanes[lane];
        let live = match run.instance.take() {
            Some(live) if !live.is_poisoned() => Ok(live),
            _ => FunctionInstance::new(&run.code, &run.settings),
        };
        let mut live = match live {
            Ok(live) => live,
            Err(error) if error.is_host_side() => {
                tracing::warn!(function = %run.settings.function, %error, "no instance for the call; the event waits");
                return None;
            }
            Err(error) => {
                return Some(Invocation {
                    result: Err(Failure::new(FailureKind::Trap, error.to_string())),
                    started: SystemTime::now(),
                    took: Duration::ZERO,
                    diagnostics: InvocationDiagnostics::default(),
                });
            }
        };
        live.begin_batch(std::mem::take(&mut self.view));
        let invocation = call(&mut live);
        self.view = live.end_batch();
        self.lanes[lane].instance = Some(live);
        Some(invocation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_stable_and_weighted() {
        assert_eq!(lane_for("any", 0), 0);
        assert_eq!(lane_for("any", 100), 1);
        let canary = (0..5000)
            .filter(|i| lane_for(&format!("key-{i}"), 20) == 1)
            .count();
        assert!((800..1200).contains(&canary), "{canary} of 5000");
        assert_eq!(lane_for("key-7", 20), lane_for("key-7", 20));
    }
}
