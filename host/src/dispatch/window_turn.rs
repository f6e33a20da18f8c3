//! The driver's part of a windowed function's batch, after its events
//! ran: the watermark advances, the state of the keys whose windows fire
//! is loaded, the firings run on a blocking thread with the lanes'
//! instances, and the batch is told what to commit for the windows
//! ([`super::windowed`] holds the window side of the run itself).

use std::time::SystemTime;

use bytes::Bytes;
use opentelemetry::{Context, KeyValue};
use tokio_util::sync::CancellationToken;

use super::lanes::{LaneRun, Ran, lane_for};
use super::window_records::firing_records;
use super::windowed::WindowRun;
use super::{FunctionWorker, InHand, Stop, hold};
use crate::output::OutputRecord;
use crate::sandbox::World;
use crate::windows::WindowKind;
use crate::windows::merges::PaneMerges;

/// Most bytes of merged sliding-window panes a function keeps between
/// batches; past it they are dropped and merged again as windows fire.
const MAX_MERGED_BYTES: usize = 64 << 20;

impl FunctionWorker {
    /// What earlier batches merged of an incremental sliding function's
    /// panes, for the next batch. It is kept only while it matches the
    /// committed state: the batch gives it back only after the commit of
    /// what it fired (see `perform`), and a batch handed back drops it, so
    /// it never holds what a batch that did not commit folded.
    pub(super) fn take_pane_merges(&mut self) -> Option<PaneMerges<Bytes>> {
        let Some(window) = &self.spec.window else {
            return None;
        };
        let WindowKind::Sliding { size_ms, .. } = window.kind else {
            return None;
        };
        if self.lanes[0].code.world() != World::IncrementalWindow {
            return None;
        }
        Some(
            self.pane_merges
                .take()
                .unwrap_or_else(|| PaneMerges::new(size_ms, MAX_MERGED_BYTES)),
        )
    }

    /// A windowed function's work after its events: the watermark moves
    /// on, due windows fire (their keys' state loaded first), expired parts
    /// go, and the batch is told what to commit for it. `None`: stopped or
    /// short of an instance, the batch was handed back.
    pub(super) async fn run_windows(
        &mut self,
        mut ran: Ran,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<Option<Ran>, Stop> {
        let Some(windows) = ran.windows.as_mut() else {
            return Ok(Some(ran));
        };
        if let Some(reason) = windows.broken().map(str::to_string) {
            self.hand_back_batch(&mut ran.batch, hand, cancel).await?;
            return Err(Stop::Refused(reason));
        }
        ran.settle_holds();
        let Some(windows) = ran.windows.as_mut() else {
            return Ok(Some(ran));
        };
        let mut advance = match cancel.is_cancelled() {
            true => Default::default(),
            false => windows.advance(),
        };
        if !self
            .load_window_keys(&mut ran, &advance, hand, cancel)
            .await?
        {
            return Ok(None);
        }
        if !advance.firings.is_empty() {
            let firings = std::mem::take(&mut advance.firings);
            match self.run_firings(ran, firings, hand, cancel).await? {
                Some(fired) => ran = fired,
                None => return Ok(None),
            }
        }
        match ran.close_windows(&advance.expired) {
            Ok(Some(work)) => ran.batch.add_window_work(work),
            Ok(None) => {}
            Err(reason) => {
                self.hand_back_batch(&mut ran.batch, hand, cancel).await?;
                return Err(Stop::Refused(reason));
            }
        }
        Ok(Some(ran))
    }

    /// Loads the state of the keys whose windows fire or expire that the
    /// batch's view lacks. `false`: stopped first, the batch was handed
    /// back.
    async fn load_window_keys(
        &mut self,
        ran: &mut Ran,
        advance: &crate::windows::Advance,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<bool, Stop> {
        let mut missing: Vec<&str> = advance
            .firings
            .iter()
            .map(|f| f.key.as_str())
            .chain(advance.expired.iter().map(|(key, _)| key.as_str()))
            .filter(|key| !ran.view.has_key(key))
            .collect();
        if missing.is_empty() {
            return Ok(true);
        }
        missing.sort_unstable();
        missing.dedup();
        let (state, name, epoch) = (&self.state, &self.name, self.epoch);
        let loaded = hold(
            &self.name,
            self.ack_wait(),
            "loading the state of windows that fire",
            &hand.messages,
            cancel,
            || state.view(name, epoch, &missing),
        )
        .await;
        match loaded {
            Ok(loaded) => {
                ran.view.include(loaded);
                Ok(true)
            }
            Err(Stop::Cancelled) => {
                self.hand_back_batch(&mut ran.batch, hand, cancel).await?;
                Ok(false)
            }
            Err(stop) => Err(stop),
        }
    }

    /// What the batch's firings did: each counts like a call (metrics, the
    /// canary's statistics, the guest's log lines under sequence 0) and
    /// ends its trace, a root `fire <function>` span with the window in its
    /// attributes. Returns the firings' records and, for each, the trace
    /// its publish continues.
    pub(super) async fn observe_firings(
        &mut self,
        mut windows: WindowRun,
    ) -> (Vec<OutputRecord>, Vec<Option<Context>>) {
        let mut contexts = Vec::with_capacity(windows.fired.len());
        for (index, (firing, invocation)) in windows.fired.iter().enumerate() {
            let trace = windows.firing_traces.get_mut(index).and_then(Option::take);
            let lane = lane_for(&firing.key, self.canary_weight);
            self.observe_invocation(lane, 0, &firing.key, trace.as_ref(), invocation)
                .await;
            let Some(trace) = trace else {
                contexts.push(None);
                continue;
            };
            contexts.push(Some(trace.context().clone()));
            if trace.is_sampled() {
                trace.set_attributes(vec![
                    KeyValue::new("weir.function", self.name.to_string()),
                    KeyValue::new("weir.window.key", firing.key.clone()),
                    KeyValue::new("weir.window.start_ms", firing.window.start_ms),
                    KeyValue::new("weir.window.end_ms", firing.window.end_ms),
                    KeyValue::new("weir.window.firing", i64::from(firing.firing)),
                ]);
            }
            let (outcome, error) = match &invocation.result {
                Ok(_) => ("fired", None),
                Err(failure) => (failure.kind.as_str(), Some(failure.message.as_str())),
            };
            trace.finish(outcome, error, invocation.started + invocation.took);
        }
        let records = firing_records(
            &mut windows.fired,
            &self.msg_scope,
            &self.name,
            &self.dead_letter_subject,
        );
        records
            .into_iter()
            .map(|(which, record)| (record, contexts.get(which).cloned().flatten()))
            .unzip()
    }

    /// Hands `firings` to the guest on a blocking thread, with the lanes'
    /// instances. `None`: the run failed or found no instance, and the
    /// batch was handed back.
    async fn run_firings(
        &mut self,
        mut ran: Ran,
        firings: Vec<crate::windows::Firing>,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<Option<Ran>, Stop> {
        if let Some(windows) = ran.windows.as_mut() {
            let now = SystemTime::now();
            windows.firing_traces = firings
                .iter()
                .map(|_| self.tracing.start_firing(&self.name, now))
                .collect();
        }
        ran.lanes = self.lanes.iter_mut().map(LaneRun::take).collect();
        let weight = self.canary_weight;
        let task = tokio::task::spawn_blocking(move || {
            let fired = ran.fire(firings, weight);
            (ran, fired)
        });
        let (joined, fenced) = self.keep_alive(task, hand, &cancel.child_token()).await;
        let (mut ran, fired) = match joined {
            Ok(done) => done,
            Err(error) => {
                self.recover_from_failed_run(&error.to_string(), hand, cancel)
                    .await;
                return Ok(None);
            }
        };
        self.return_lanes(&mut ran);
        if fenced {
            return Err(Stop::Fenced);
        }
        if !fired {
            tracing::warn!(function = %self.name, "no instance for a window that fires; the batch waits");
            self.hand_back_batch(&mut ran.batch, hand, cancel).await?;
            return Ok(None);
        }
        Ok(Some(ran))
    }
}
