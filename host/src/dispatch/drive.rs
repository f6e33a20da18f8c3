//! Driving one batch through the protocol: plan it, look up redeliveries,
//! load state, run the events on a blocking thread (extending ack
//! deadlines and the lease meanwhile), settle it, and perform its effects
//! in order — commit, publish, ack — or hand it back.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::AckKind;
use opentelemetry::Context;
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, Effect, Intake, Outcome, PlanSettings, REDELIVER_DELAY, Settlement};
use super::lanes::{self, LaneRun, Ran, lane_for};
use super::support::{DeferralChange, deferral_changes, extend_deadlines, note_deferrals, pause};
use super::windowed::{BOOK_KEY, WindowRun};
use super::{BATCH_BYTE_BUDGET, FunctionWorker, InHand, Stop, hold, observe};
use crate::ack::AckDecision;
use crate::breaker::{Breaker, SystemClock};
use crate::crash::{self, CrashPoint};
use crate::ingest::Delivery;
use crate::output::OutputRecord;
use crate::sandbox::{Event, Invocation};
use crate::state::{BatchCommit, BatchView};
use crate::traces::EventTrace;

impl FunctionWorker {
    /// Plans, runs and settles one batch.
    pub(super) async fn process(
        &mut self,
        deliveries: Vec<Delivery>,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let metrics = &self.lanes[0].metrics;
        metrics.in_flight.set(deliveries.len() as f64);
        // A windowed function's idle tick is no batch.
        if !deliveries.is_empty() {
            metrics.batch_size.record(deliveries.len() as f64);
        }
        if let Some(last) = deliveries.last() {
            self.pending = last.pending;
            metrics.consumer_pending.set(last.pending as f64);
        }
        let (intake, mut hand) = self.take_in(deliveries);
        let result = self.process_taken(intake, &mut hand, cancel).await;
        if matches!(result, Err(Stop::Fenced)) {
            // Another host owns the function now and reads from the same
            // consumer: what this one took (after waking from a pause,
            // say) goes back at once, not after the ack wait, by which
            // time the new owner's windows would have moved past it.
            for message in &hand.messages {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
        }
        self.lanes[0].metrics.in_flight.set(0.0);
        result
    }

    /// Plans, runs and settles the batch taken in.
    async fn process_taken(
        &mut self,
        intake: Vec<Intake>,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let settings = PlanSettings {
            policy: self.spec.retry.clone(),
            byte_budget: BATCH_BYTE_BUDGET,
            wait_grace: self.ack_wait() * 2 + Duration::from_secs(5),
            highest_applied: self.highest_applied,
        };
        let (batch, lookup) = Batch::plan(intake, &self.guard, &settings, Instant::now());
        let Some((batch, view)) = self.prepare(batch, &lookup, hand, cancel).await? else {
            return Ok(());
        };
        let Some(ran) = self.run_events(batch, view, hand, cancel).await? else {
            return Ok(());
        };
        let Some(ran) = self.run_windows(ran, hand, cancel).await? else {
            return Ok(());
        };
        let Ran {
            mut batch,
            view,
            mut invocations,
            mut windows,
            ..
        } = ran;
        // Merged panes stay valid when the batch changed no window; else
        // only once its commit is made.
        let mut merges = windows.as_mut().and_then(|w| w.merges.take());
        if batch.window_work().is_none() {
            self.pane_merges = merges.take();
        }
        self.observe_run(&batch, hand, &invocations).await;
        let (window_records, window_parents) = match windows {
            Some(windows) => self.observe_firings(windows).await,
            None => Default::default(),
        };
        let settlement = batch.settle();
        self.perform(
            &mut batch,
            Settled {
                settlement,
                view,
                window_records,
                window_parents,
                merges,
            },
            &mut invocations,
            hand,
            cancel,
        )
        .await
    }

    /// Looks up the redeliveries in `lookup`, publishes the outbox if one
    /// was applied already, and loads the state of the events to run.
    /// `None` when stopped first: the batch was handed back.
    async fn prepare(
        &mut self,
        mut batch: Batch,
        lookup: &[u64],
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<Option<(Batch, BatchView)>, Stop> {
        let what = "reading applied sequences";
        let applied = hold(
            &self.name,
            self.ack_wait(),
            what,
            &hand.messages,
            cancel,
            || self.state.already_applied(&self.name, lookup),
        )
        .await;
        let applied = match applied {
            Ok(applied) => applied,
            Err(Stop::Cancelled) => {
                self.hand_back_batch(&mut batch, hand, cancel).await?;
                return Ok(None);
            }
            Err(stop) => return Err(stop),
        };
        batch.applied(&applied);
        if batch.has_already_applied() {
            self.flush_outbox(None, cancel).await?;
        }
        let mut keys: Vec<&str> = batch
            .records()
            .iter()
            .filter(|r| r.outcome == Outcome::ToRun)
            .filter_map(|r| r.key.as_deref())
            .collect();
        if self.spec.window.is_some() {
            keys.push(BOOK_KEY);
        }
        let load_started = SystemTime::now();
        let (state, name, epoch) = (&self.state, &self.name, self.epoch);
        let view = hold(
            &self.name,
            self.ack_wait(),
            "loading state",
            &hand.messages,
            cancel,
            || state.view(name, epoch, &keys),
        )
        .await;
        drop(keys);
        let view = match view {
            Ok(view) => view,
            Err(Stop::Cancelled) => {
                self.hand_back_batch(&mut batch, hand, cancel).await?;
                return Ok(None);
            }
            Err(stop) => return Err(stop),
        };
        self.record_step(&hand.traces, &batch, "state.load", load_started, |o| {
            *o == Outcome::ToRun
        });
        Ok(Some((batch, view)))
    }

    /// Splits deliveries into what the protocol needs and what the driver
    /// keeps.
    fn take_in(&self, deliveries: Vec<Delivery>) -> (Vec<Intake>, InHand) {
        let started = SystemTime::now();
        let mut intake = Vec::with_capacity(deliveries.len());
        let mut hand = InHand {
            messages: Vec::with_capacity(deliveries.len()),
            traces: Vec::with_capacity(deliveries.len()),
            events: Vec::with_capacity(deliveries.len()),
        };
        for delivery in deliveries {
            let lane = match &delivery.event {
                Ok(event) => lane_for(&event.key, self.canary_weight),
                Err(_) => 0,
            };
            hand.traces.push(self.start_trace(&delivery, lane, started));
            let (key, event) = match delivery.event {
                Ok(event) => (Ok(event.key.clone()), Some(event)),
                Err(failure) => (Err(failure), None),
            };
            intake.push(Intake {
                sequence: delivery.sequence,
                delivered: delivery.delivered,
                key,
                lane,
                deferred: self.deferrals.get(&delivery.sequence).copied().unwrap_or(0),
            });
            hand.events.push(event);
            hand.messages.push(delivery.message);
        }
        (intake, hand)
    }

    /// Runs the batch on a blocking thread. Meanwhile the messages' ack
    /// deadlines are extended and the lease renewed; a lost lease or a stop
    /// ends the run between events. `Ok(None)`: the run task failed (a host
    /// bug) and the batch was handed back.
    async fn run_events(
        &mut self,
        batch: Batch,
        view: BatchView,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<Option<Ran>, Stop> {
        let lanes: Vec<LaneRun> = self.lanes.iter_mut().map(LaneRun::take).collect();
        let events: Vec<Option<(Event, bool)>> = hand
            .events
            .iter_mut()
            .zip(&hand.traces)
            .map(|(event, trace)| {
                let traced = trace.as_ref().is_some_and(EventTrace::is_sampled);
                event.take().map(|e| (e, traced))
            })
            .collect();
        let windows = self.spec.window.clone().map(|settings| {
            let times = events
                .iter()
                .map(|e| e.as_ref().map(|(e, _)| e.event_time_ms))
                .collect();
            // As long as a key waits for an event that is out, or an
            // open breaker keeps the stream waiting.
            let hold_for = self.ack_wait() * 2
                + Duration::from_millis(self.spec.retry.max_backoff_ms)
                + Duration::from_millis(self.spec.breaker.wait_in_open_ms)
                + Duration::from_secs(5);
            let hold_for_ms = i64::try_from(hold_for.as_millis()).unwrap_or(i64::MAX);
            let merges = self.take_pane_merges();
            WindowRun::new(
                settings,
                self.lanes[0].code.world(),
                times,
                hold_for_ms,
                merges,
            )
        });
        let stop = cancel.child_token();
        let stop_run = stop.clone();
        let task = tokio::task::spawn_blocking(move || {
            lanes::run_batch(batch, lanes, view, events, windows, &stop_run)
        });
        let (joined, fenced) = self.keep_alive(task, hand, &stop).await;
        let mut ran = match joined {
            Ok(ran) => ran,
            Err(error) => {
                self.recover_from_failed_run(&error.to_string(), hand, cancel)
                    .await;
                return Ok(None);
            }
        };
        self.return_lanes(&mut ran);
        for (lane, transition) in std::mem::take(&mut ran.transitions) {
            self.observe_transition(lane, &transition);
        }
        if fenced {
            return Err(Stop::Fenced);
        }
        Ok(Some(ran))
    }

    /// Waits for a blocking `task` of the batch, extending the messages'
    /// ack deadlines and renewing the lease meanwhile; a lost lease fires
    /// `stop` (the task stops between calls). Also says whether it was lost.
    pub(super) async fn keep_alive<T>(
        &mut self,
        mut task: tokio::task::JoinHandle<T>,
        hand: &InHand,
        stop: &CancellationToken,
    ) -> (Result<T, tokio::task::JoinError>, bool) {
        let ack_wait = Duration::from_millis(self.spec.ack_wait_ms);
        let tick = (ack_wait / 3).min(self.owner_lease / 3);
        let mut fenced = false;
        let joined = loop {
            tokio::select! {
                joined = &mut task => break joined,
                _ = tokio::time::sleep(tick) => {
                    extend_deadlines(&hand.messages).await;
                    if self.renew_lease_if_due().await.is_err() {
                        fenced = true;
                        stop.cancel();
                    }
                }
            }
        };
        (joined, fenced)
    }

    /// Puts the instances and breakers a run took back on the lanes.
    pub(super) fn return_lanes(&mut self, ran: &mut Ran) {
        for (lane, run) in self.lanes.iter_mut().zip(&mut ran.lanes) {
            lane.instance = run.instance.take();
            lane.breaker = run.breaker.take();
        }
    }

    /// The run task panicked: a host bug, not the guest's. Nothing is
    /// decided; the batch goes back without spending attempts, and the
    /// breakers start again closed.
    pub(super) async fn recover_from_failed_run(
        &mut self,
        error: &str,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) {
        tracing::error!(function = %self.name, %error, "invocation task failed; the batch is handed back and the circuit breakers start again closed");
        for lane in &mut self.lanes {
            lane.breaker = Some(Breaker::new(
                lane.settings.breaker.clone(),
                Arc::new(SystemClock),
            ));
            lane.metrics.breaker_state.set(0.0);
        }
        let sequences = hand
            .messages
            .iter()
            .filter_map(|m| m.info().ok())
            .map(|i| i.stream_sequence);
        note_deferrals(
            &mut self.deferrals,
            sequences
                .map(|s| (s, DeferralChange::Deferred))
                .collect::<Vec<_>>(),
        );
        for message in &hand.messages {
            let _ = message.ack_with(AckKind::Nak(Some(REDELIVER_DELAY))).await;
        }
        pause(cancel, REDELIVER_DELAY).await;
    }

    /// Metrics, spans and log lines of each invocation.
    async fn observe_run(
        &mut self,
        batch: &Batch,
        hand: &InHand,
        invocations: &[Option<Invocation>],
    ) {
        for (index, invocation) in invocations.iter().enumerate() {
            let Some(invocation) = invocation else {
                continue;
            };
            let record = &batch.records()[index];
            let key = record.key.as_deref().unwrap_or_default();
            self.observe_invocation(
                record.lane,
                record.sequence,
                key,
                hand.traces[index].as_ref(),
                invocation,
            )
            .await;
        }
    }

    /// Performs a settled batch's effects in order.
    async fn perform(
        &mut self,
        batch: &mut Batch,
        settled: Settled,
        invocations: &mut [Option<Invocation>],
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let Settled {
            settlement,
            view,
            mut window_records,
            mut window_parents,
            mut merges,
        } = settled;
        let mut effects = settlement.effects;
        let mut view = Some(view);
        let mut committed = None;
        let mut next = 0;
        while let Some(effect) = effects.get_mut(next) {
            next += 1;
            match effect {
                Effect::Commit {
                    batch_id,
                    through_seq,
                    applied,
                } => {
                    let (batch_id, through_seq) = (*batch_id, *through_seq);
                    let applied = std::mem::take(applied);
                    let mut outbox = self.gather(batch, &effects, invocations, hand, false).0;
                    if batch.window_work().is_some() {
                        outbox.extend(window_records.iter().cloned());
                    }
                    let commit = BatchCommit {
                        epoch: self.epoch,
                        batch_id,
                        through_seq,
                        published: self.published.clone(),
                        deltas: view.take().map(BatchView::into_deltas).unwrap_or_default(),
                        applied,
                        outbox,
                    };
                    match self.commit(&commit, batch, hand, cancel).await {
                        Ok(()) => {
                            committed = Some(batch_id);
                            if batch.window_work().is_some() {
                                self.pane_merges = merges.take();
                            }
                        }
                        Err(end) => match self.after_failed_commit(end, batch, hand, cancel).await?
                        {
                            Some(again) => {
                                effects = again.effects;
                                next = 0;
                            }
                            None => return Ok(()),
                        },
                    }
                }
                Effect::Publish { .. } => {
                    // With no commit to fence it, an owner paused past its
                    // lease finds out before it publishes (a dead letter
                    // of an event the new owner may apply).
                    if committed.is_none() {
                        self.renew_lease_if_due().await?;
                    }
                    let (mut records, parents) =
                        self.gather(batch, &effects, invocations, hand, true);
                    let dead = self.dead_letters(batch, &effects, hand);
                    records.extend(dead.0);
                    let mut parents: Vec<Option<Context>> =
                        parents.into_iter().chain(dead.1).collect();
                    if batch.window_work().is_some() {
                        parents.append(&mut window_parents);
                        records.append(&mut window_records);
                    }
                    if !self
                        .publish_settled(&mut records, parents, committed, batch, hand, cancel)
                        .await?
                    {
                        return Ok(());
                    }
                    if let Some(id) = committed {
                        self.published.push(id);
                    }
                }
                Effect::Ack(acks) => {
                    let acks = std::mem::take(acks);
                    // An owner that was paused past its lease (and holds a
                    // batch with no commit to fence it) finds out here,
                    // before it tells JetStream anything.
                    self.renew_lease_if_due().await?;
                    self.acknowledge(batch, &acks, hand).await
                }
            }
        }
        Ok(())
    }

    /// What follows a commit that did not happen: a stop hands the batch
    /// back; a refusal fails the one writer (`Some`: the batch settled again)
    /// or isolates the batch's events and hands it back; a fence ends the
    /// turn. `None`: the batch is done with.
    async fn after_failed_commit(
        &mut self,
        end: CommitEnd,
        batch: &mut Batch,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<Option<Settlement>, Stop> {
        let reason = match end {
            CommitEnd::Stop(Stop::Cancelled) => {
                self.hand_back_batch(batch, hand, cancel).await?;
                return Ok(None);
            }
            CommitEnd::Stop(stop) => return Err(stop),
            CommitEnd::Refused(reason) => reason,
        };
        if batch.records().is_empty() {
            // Window work alone (an idle advance): no event to blame, and
            // handing nothing back would try again for ever.
            return Err(Stop::Refused(format!(
                "the database refused the window bookkeeping: {reason}"
            )));
        }
        if let Some(again) = batch.commit_refused(&reason) {
            return Ok(Some(again));
        }
        self.isolating = batch.records().iter().map(|r| r.sequence).collect();
        self.isolating_since = Instant::now();
        tracing::warn!(function = %self.name, %reason, events = self.isolating.len(), "the database refused the batch's state; running its events one at a time to find the one");
        self.hand_back_batch(batch, hand, cancel).await?;
        Ok(None)
    }

    /// The output records of the settlement's publish, in record order:
    /// copies for the outbox, or (`take`, for the publish itself) the
    /// outputs themselves.
    fn gather(
        &self,
        batch: &Batch,
        effects: &[Effect],
        invocations: &mut [Option<Invocation>],
        hand: &InHand,
        take: bool,
    ) -> (Vec<OutputRecord>, Vec<Option<Context>>) {
        let Some(Effect::Publish { outputs, .. }) =
            effects.iter().find(|e| matches!(e, Effect::Publish { .. }))
        else {
            return Default::default();
        };
        let mut gathered = (
            Vec::with_capacity(outputs.len()),
            Vec::with_capacity(outputs.len()),
        );
        for &index in outputs {
            let Some(Invocation {
                result: Ok(handled),
                ..
            }) = &mut invocations[index]
            else {
                continue;
            };
            let outputs = if take {
                std::mem::take(&mut handled.outputs)
            } else {
                handled.outputs.clone()
            };
            self.event_outputs(
                &batch.records()[index],
                &hand.messages[index],
                hand.traces[index].as_ref(),
                outputs,
                &mut gathered,
            );
        }
        gathered
    }

    /// The dead letters of the settlement's publish.
    fn dead_letters(
        &self,
        batch: &Batch,
        effects: &[Effect],
        hand: &InHand,
    ) -> (Vec<OutputRecord>, Vec<Option<Context>>) {
        let Some(Effect::Publish { dead_letters, .. }) =
            effects.iter().find(|e| matches!(e, Effect::Publish { .. }))
        else {
            return Default::default();
        };
        dead_letters
            .iter()
            .map(|&index| {
                let trace = hand.traces[index].as_ref();
                (
                    self.dead_letter(&batch.records()[index], &hand.messages[index], trace),
                    trace.map(|t| t.context().clone()),
                )
            })
            .unzip()
    }

    /// Commits, holding the batch through transient failures.
    async fn commit(
        &mut self,
        commit: &BatchCommit,
        batch: &Batch,
        hand: &InHand,
        cancel: &CancellationToken,
    ) -> Result<(), CommitEnd> {
        crash::reached(CrashPoint::AfterInvoke);
        let started = Instant::now();
        let commit_started = SystemTime::now();
        // When the attempt that succeeded was sent (`hold` may try again).
        let attempt_sent = std::sync::Mutex::new(started);
        let done = hold(
            &self.name,
            self.ack_wait(),
            "committing state",
            &hand.messages,
            cancel,
            || {
                if let Ok(mut sent) = attempt_sent.lock() {
                    *sent = Instant::now();
                }
                self.state.commit(&self.name, commit, self.owner_lease)
            },
        )
        .await;
        match done {
            Ok(()) => {}
            Err(Stop::Refused(reason)) => return Err(CommitEnd::Refused(reason)),
            Err(stop) => return Err(CommitEnd::Stop(stop)),
        }
        // The commit renewed the lease when its statement ran, which may
        // be long before this host sees the answer (a pause): count from
        // when the attempt was sent, so that a late answer never makes the
        // lease look fresher than it is.
        self.lease_renewed = attempt_sent.into_inner().unwrap_or(started);
        self.published.clear();
        self.lanes[0]
            .metrics
            .commit_seconds
            .record(started.elapsed().as_secs_f64());
        self.record_step(&hand.traces, batch, "state.commit", commit_started, |o| {
            matches!(o, Outcome::Applied { .. })
        });
        self.highest_applied = self.highest_applied.max(commit.highest_applied());
        crash::reached(CrashPoint::AfterCommit);
        Ok(())
    }

    /// Publishes a settled batch's records. After a commit, a transient
    /// failure is retried until published or stopped (`Err(Cancelled)`:
    /// the outbox keeps the rows, the inputs stay unacked). Without one,
    /// the batch is handed back (`Ok(false)`).
    async fn publish_settled(
        &mut self,
        records: &mut Vec<OutputRecord>,
        parents: Vec<Option<Context>>,
        committed: Option<u64>,
        batch: &mut Batch,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<bool, Stop> {
        let ack_wait = Duration::from_millis(self.spec.ack_wait_ms);
        let mut extended = Instant::now();
        let mut parents = parents;
        loop {
            let error = match self
                .publish_records(records, std::mem::take(&mut parents))
                .await
            {
                Ok(()) => break,
                Err(error) => error,
            };
            if committed.is_none() {
                // Nothing is committed: redelivery runs the events again
                // and the message ids drop what did get through.
                tracing::warn!(function = %self.name, %error, "publishing failed; the batch will be delivered again");
                self.hand_back_batch(batch, hand, cancel).await?;
                return Ok(false);
            }
            tracing::warn!(function = %self.name, %error, "publishing committed outputs failed; retrying");
            if extended.elapsed() >= ack_wait / 3 {
                extend_deadlines(&hand.messages).await;
                extended = Instant::now();
            }
            if !pause(cancel, REDELIVER_DELAY).await {
                return Err(Stop::Cancelled);
            }
        }
        crash::reached(CrashPoint::AfterPublish);
        Ok(true)
    }

    /// Tells JetStream what became of each delivery, and finishes spans.
    async fn acknowledge(
        &mut self,
        batch: &Batch,
        acks: &[(usize, AckDecision)],
        hand: &mut InHand,
    ) {
        self.count_outcomes(batch);
        let changes = deferral_changes(batch, acks);
        if !self.isolating.is_empty() {
            for (sequence, change) in &changes {
                if *change == DeferralChange::Done {
                    self.isolating.remove(sequence);
                }
            }
        }
        note_deferrals(&mut self.deferrals, changes);
        batch.acked(&mut self.guard, acks, Instant::now());
        for &(index, decision) in acks {
            let kind = match decision {
                AckDecision::Ack => AckKind::Ack,
                AckDecision::Nak { delay } => AckKind::Nak(Some(delay)),
                AckDecision::DeadLetter => AckKind::Term,
            };
            if let Err(error) = hand.messages[index].ack_with(kind).await {
                // JetStream delivers it again; the applied set or the message
                // ids keep that from doubling anything.
                tracing::warn!(function = %self.name, sequence = batch.records()[index].sequence, %error, "ack failed");
            }
        }
        for (trace, record) in hand.traces.iter_mut().zip(batch.records()) {
            if let Some(trace) = trace.take() {
                let (outcome, error) = observe::outcome_label(&record.outcome);
                trace.finish(outcome, error, SystemTime::now());
            }
        }
    }

    /// Hands the whole batch back to JetStream: nothing was committed, no
    /// delivery is an attempt.
    pub(super) async fn hand_back_batch(
        &mut self,
        batch: &mut Batch,
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        tracing::warn!(function = %self.name, events = batch.records().len(), "batch not committed; it will be delivered again");
        let acks = batch.give_back();
        self.acknowledge(batch, &acks, hand).await;
        pause(cancel, REDELIVER_DELAY).await;
        Ok(())
    }
}

/// A settled batch and what its effects carry.
struct Settled {
    settlement: Settlement,
    view: BatchView,
    /// The records of the windows it fired, and the trace of each.
    window_records: Vec<crate::output::OutputRecord>,
    window_parents: Vec<Option<Context>>,
    /// What its firings merged of sliding windows' panes: the worker's
    /// again once the commit of its window work is made.
    merges: Option<crate::windows::merges::PaneMerges<bytes::Bytes>>,
}

/// Why a commit did not happen.
enum CommitEnd {
    Stop(Stop),
    /// The database refused the data for good.
    Refused(String),
}
