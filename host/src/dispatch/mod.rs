//! Dispatch: runs one function over its consumer, a batch at a time, as the
//! one owner of the function's state.
//!
//! The protocol itself has no I/O: [`batch`] plans a batch, decides each
//! event and returns the effects in order. This module is the driver that
//! performs them:
//!
//! 1. **Own.** Claim the function (a new owner epoch) or stand by while
//!    another host's lease is live. Every commit is conditional on the
//!    epoch; a commit that finds it taken ends this host's turn (fenced).
//! 2. **Open.** Read the progress row (its stream identity must match the
//!    stream's: a moved or re-created stream is refused), open the consumer
//!    (a missing one is recreated above the last recorded ack floor), and
//!    publish what a previous owner committed but may not have published.
//! 3. **Per batch.** Look up redeliveries in the applied set → load state →
//!    run the events on a blocking thread (progress acks and lease renewals
//!    meanwhile; a stop is honoured between events) → commit → publish →
//!    ack, nak or terminate each delivery.
//!
//! Per phase, a failure or a stop does this:
//! - lookup, load: a transient error holds the batch (ack deadlines
//!   extended) and retries; a stop hands the batch back (no attempt spent);
//! - run: a stop hands the rest back; a host-side failure defers the event;
//! - commit: transient → hold and retry (re-running a commit is harmless);
//!   the database refusing the data → the one writer is dead-lettered, or
//!   with several writers the batch goes back and runs one event at a time;
//!   fenced → stop processing without acking; a stop → hand back (an
//!   ambiguous commit's outbox rows are published by the next owner);
//! - publish: after a commit, transient → retry until published or stopped
//!   (the outbox keeps the rows, the inputs stay unacked); without a commit
//!   → hand back; a record JetStream refuses for good → dead letter or trim;
//! - ack: errors are ignored; a redelivery finds the event applied.

mod batch;
mod canary;
mod deliver;
mod lanes;
mod observe;
#[cfg(test)]
mod sim;
mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, AckKind, Message};
use opentelemetry::Context;
use tokio_util::sync::CancellationToken;

use crate::ack::AckDecision;
use crate::breaker::{Breaker, SystemClock};
use crate::config::{FunctionSpec, GuestLogConfig};
use crate::crash::{self, CrashPoint};
use crate::guest_logs::GuestLogSink;
use crate::health::Readiness;
use crate::ingest::{Delivery, Ingest};
use crate::output::OutputRecord;
use crate::sandbox::{Event, Invocation};
use crate::state::{BatchCommit, BatchView, StateError, StateStore};
use crate::traces::{EventTrace, Tracing};

use batch::{Batch, Effect, Intake, KeyGuard, Outcome, PlanSettings, REDELIVER_DELAY, Settlement};
pub use canary::DeploymentLink;
pub use deliver::is_broker_header;
use lanes::{Lane, LaneRun, Ran};
pub use lanes::{VersionCode, instance_settings, lane_for, version_of};
use support::{DeferralChange, Held, extend_deadlines, hold_until_done, note_deferrals, pause};

/// Output bytes one batch may hold before the rest of it waits for the next.
const BATCH_BYTE_BUDGET: usize = 64 << 20;
/// Applied sequences are considered for pruning after this many batches.
const PRUNE_EVERY_BATCHES: u64 = 200;

/// What every function's worker shares with the others.
#[derive(Clone)]
pub struct WorkerEnv {
    pub state: StateStore,
    pub js: jetstream::Context,
    pub dead_letter_prefix: String,
    pub tracing: Tracing,
    pub guest_logs: GuestLogConfig,
    /// Where the worker reports its status for `/status`.
    pub readiness: Arc<Readiness>,
    /// This host's name as an owner of functions: unique per process.
    pub owner_id: Arc<str>,
    /// How long a claim on a function lasts without renewal.
    pub owner_lease: Duration,
}

impl WorkerEnv {
    /// The largest message the NATS server takes.
    pub fn max_payload(&self) -> usize {
        match self.js.client().server_info().max_payload {
            // Not known yet: the server default.
            0 => 1024 * 1024,
            known => known,
        }
    }

    /// This process's owner id. A host that holds the lock on
    /// `state_dir/owner.lock` is `<host name>-<that directory>`: the same
    /// again after a restart, so a killed host's restart reclaims its
    /// functions at once instead of waiting out its own lease (the old
    /// process is gone: the lock died with it). Another process with the
    /// same directory (a second `weir serve` on the same config) cannot
    /// take the lock and gets a random id, so it stands by. Keep the
    /// returned lock for the life of the process.
    pub fn owner_identity(state_dir: &std::path::Path) -> (Arc<str>, Option<std::fs::File>) {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let host = match host.trim() {
            "" => "host".to_string(),
            name => name.to_string(),
        };
        let lock = std::fs::create_dir_all(state_dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(state_dir.join("owner.lock"))
            })
            .ok()
            .filter(|file| file.try_lock().is_ok());
        let id = match &lock {
            Some(_) => format!("{host}:{}", state_dir.display()),
            None => format!("{host}-{}-{}", std::process::id(), random_hex()),
        };
        (Arc::from(id), lock)
    }
}

impl std::fmt::Debug for WorkerEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerEnv").finish_non_exhaustive()
    }
}

/// Eight random bytes as hex.
fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    // Without an OS random source the time is unique enough for an id.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (nanos as u64).to_le_bytes();
    }
    hex::encode(bytes)
}

/// Why a worker's turn as owner ended.
#[derive(Debug)]
enum Stop {
    /// Asked to stop (shutdown, a switch, the function removed).
    Cancelled,
    /// Another host claimed the function.
    Fenced,
    /// The consumer was deleted: open it again (at the recorded position)
    /// in a new turn.
    Reopen,
    /// Cannot run as configured; says what to do.
    Refused(String),
}

/// Everything one function's worker needs.
pub struct FunctionWorker {
    name: Arc<str>,
    /// The stable version first, then the canary if there is one.
    lanes: Vec<Lane>,
    /// Share of keys, in percent, the canary lane takes.
    canary_weight: u8,
    /// Where the function was deployed from, for rollbacks and statistics.
    deployment: Option<DeploymentLink>,
    spec: FunctionSpec,
    state: StateStore,
    js: jetstream::Context,
    dead_letter_subject: String,
    max_payload: usize,
    owner_id: Arc<str>,
    owner_lease: Duration,
    /// The owner epoch of this turn; 0 before the first claim.
    epoch: u64,
    lease_renewed: Instant,
    /// What output message ids are scoped by: the function and the
    /// incarnation of its progress, the same across versions and restarts,
    /// new after a replay or a re-creation.
    msg_scope: String,
    /// The highest committed stream sequence: a message at or below it may
    /// have been applied.
    highest_applied: u64,
    /// Committed batches whose publish is acknowledged but whose outbox
    /// rows are still there: deleted with the next commit, or when idle.
    published: Vec<u64>,
    /// After a commit the database refused, batches of one event until
    /// past this sequence.
    isolate_through: u64,
    guard: KeyGuard,
    /// An ack floor and when it was read: the next prune's bound.
    prune_floor: Option<(Instant, u64)>,
    batches: u64,
    tracing: Tracing,
    logs: GuestLogSink,
    /// How many deliveries of each event in flight were deferrals.
    deferrals: HashMap<u64, u64>,
    readiness: Arc<Readiness>,
    pending: u64,
    last_stats: Instant,
    /// This worker already rolled its canary back; the host replaces it.
    rolled_back: bool,
}

impl std::fmt::Debug for FunctionWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionWorker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The deliveries of a batch, split: what JetStream is answered on, the
/// spans, and the events to run (by record index).
struct InHand {
    messages: Vec<Message>,
    traces: Vec<Option<EventTrace>>,
    events: Vec<Option<Event>>,
}

impl FunctionWorker {
    /// A worker of `spec` running `stable`, and `canary` for `weight`
    /// percent of the keys.
    pub fn new(
        spec: FunctionSpec,
        stable: VersionCode,
        canary: Option<(VersionCode, u8)>,
        deployment: Option<DeploymentLink>,
        env: &WorkerEnv,
    ) -> Self {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let canary_weight = canary.as_ref().map_or(0, |(_, weight)| *weight);
        let lanes: Vec<Lane> = std::iter::once(stable)
            .chain(canary.map(|(code, _)| code))
            .map(|version| Lane::new(&spec.name, version))
            .collect();
        Self {
            logs: GuestLogSink::new(
                &env.guest_logs,
                name.clone(),
                lanes[0].version.clone(),
                env.js.client(),
            ),
            lanes,
            canary_weight,
            deployment,
            tracing: env.tracing.clone(),
            deferrals: HashMap::new(),
            readiness: env.readiness.clone(),
            pending: 0,
            last_stats: Instant::now(),
            rolled_back: false,
            dead_letter_subject: format!("{}.{}", env.dead_letter_prefix, spec.name),
            max_payload: env.max_payload(),
            owner_id: env.owner_id.clone(),
            owner_lease: env.owner_lease,
            epoch: 0,
            lease_renewed: Instant::now(),
            msg_scope: spec.name.clone(),
            name,
            spec,
            state: env.state.clone(),
            js: env.js.clone(),
            highest_applied: 0,
            published: Vec::new(),
            isolate_through: 0,
            guard: KeyGuard::default(),
            prune_floor: None,
            batches: 0,
        }
    }

    /// Runs until `cancel` fires, then returns after the batch in hand is
    /// settled (or handed back) and ownership is released. While another
    /// host owns the function, stands by.
    pub async fn run(mut self, cancel: CancellationToken) {
        tracing::info!(function = %self.name, digest = %self.lanes[0].code.digest(), canary = ?self.lanes.get(1).map(|l| l.code.digest()), weight = self.canary_weight, "function started");
        let owner = metrics::gauge!("weir_function_owned", "function" => self.name.to_string());
        while let Some(epoch) = self.claim(&cancel).await {
            self.epoch = epoch;
            owner.set(1.0);
            let ended = self.serve_turn(&cancel).await;
            owner.set(0.0);
            match ended {
                Stop::Cancelled => {
                    self.finish_turn().await;
                    break;
                }
                Stop::Reopen => {
                    self.finish_turn().await;
                }
                Stop::Fenced => {
                    metrics::counter!("weir_ownership_lost_total", "function" => self.name.to_string()).increment(1);
                    tracing::warn!(function = %self.name, epoch, "lost ownership of the function to another host: its batch in hand is dropped uncommitted; standing by");
                }
                Stop::Refused(reason) => {
                    tracing::error!(function = %self.name, %reason, "the function cannot run");
                    self.finish_turn().await;
                    cancel.cancelled().await;
                    break;
                }
            }
        }
        tracing::info!(function = %self.name, "function stopped");
    }

    /// Claims the function: its new epoch, or `None` once cancelled. Stands
    /// by while another host's lease is live.
    async fn claim(&mut self, cancel: &CancellationToken) -> Option<u64> {
        let mut told = false;
        loop {
            match self
                .state
                .claim(&self.name, &self.owner_id, self.owner_lease)
                .await
            {
                Ok(Some(epoch)) => {
                    if told {
                        // Worth a warning: the owner before stopped renewing.
                        tracing::warn!(function = %self.name, epoch, "took over the function");
                    }
                    self.lease_renewed = Instant::now();
                    return Some(epoch);
                }
                Ok(None) if !told => {
                    told = true;
                    tracing::warn!(function = %self.name, "another host owns the function; standing by until its lease lapses");
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(function = %self.name, %error, "cannot claim the function yet")
                }
            }
            if !pause(cancel, self.owner_lease / 4).await {
                return None;
            }
        }
    }

    /// One turn as owner: open, then batches until stopped or fenced.
    async fn serve_turn(&mut self, cancel: &CancellationToken) -> Stop {
        let mut ingest = match self.open(cancel).await {
            Ok(ingest) => ingest,
            Err(stop) => return stop,
        };
        if let Err(stop) = self.flush_outbox(Some(&mut ingest), cancel).await {
            return stop;
        }
        self.report_status();
        loop {
            if cancel.is_cancelled() {
                return Stop::Cancelled;
            }
            if let Err(stop) = self.renew_lease_if_due().await {
                return stop;
            }
            // An open breaker: leave the backlog in JetStream until probes
            // may go through. (The stable version's breaker: a canary's
            // holds only its keys.)
            if let Some(wait) = self.lanes[0].breaker.as_ref().and_then(Breaker::open_for) {
                if !pause(cancel, wait.min(self.owner_lease / 3)).await {
                    return Stop::Cancelled;
                }
                continue;
            }
            let Some(deliveries) = ingest.next_batch(cancel, self.call_budget()).await else {
                return Stop::Cancelled;
            };
            if ingest.is_lost() {
                return Stop::Reopen;
            }
            if deliveries.is_empty() {
                self.tidy_outbox().await;
                continue;
            }
            if let Err(stop) = self.process(deliveries, cancel).await {
                return stop;
            }
            self.after_batch(&mut ingest, cancel).await;
        }
    }

    /// How many events the next batch may take: the stable breaker's budget,
    /// or one at a time while isolating a commit the database refused.
    fn call_budget(&self) -> usize {
        if self.isolate_through > self.highest_applied {
            return 1;
        }
        self.lanes[0]
            .breaker
            .as_ref()
            .map_or(usize::MAX, Breaker::call_budget)
    }

    /// Bookkeeping between batches: status, canary, pruning, outbox.
    async fn after_batch(&mut self, ingest: &mut Ingest, cancel: &CancellationToken) {
        self.report_status();
        // A worker being replaced must not judge a rollout that may already
        // have changed.
        if !cancel.is_cancelled() {
            self.watch_canary().await;
        }
        self.batches += 1;
        if self.batches.is_multiple_of(PRUNE_EVERY_BATCHES) {
            self.prune_applied(ingest).await;
        }
        if self.pending == 0 {
            self.tidy_outbox().await;
        }
    }

    /// Reads the progress row, checks the stream is the one the progress
    /// counts in, and opens the consumer.
    async fn open(&mut self, cancel: &CancellationToken) -> Result<Ingest, Stop> {
        let incarnation = random_hex();
        let (progress, created) = hold(
            &self.name,
            self.ack_wait(),
            "reading progress",
            &[],
            cancel,
            || self.state.progress(&self.name, &incarnation),
        )
        .await?;
        let (mut ingest, identity) = loop {
            match Ingest::open(&self.js, &self.spec, progress.resume_seq).await {
                Ok(opened) => break opened,
                Err(error) => {
                    tracing::warn!(function = %self.name, %error, "cannot open the function's consumer yet");
                    if !pause(cancel, Duration::from_secs(1)).await {
                        return Err(Stop::Cancelled);
                    }
                }
            }
        };
        match &progress.stream {
            Some((stream, created_ns))
                if *stream != identity.name || *created_ns != identity.created_ns =>
            {
                return Err(Stop::Refused(format!(
                    "its applied sequences count in stream `{stream}` (created at {created_ns} ns), but it is bound to stream `{}` (created at {} ns): sequences of one stream mean nothing in another. Deploy a version that replays the stream (`weir fn deploy --replay-from-sequence 1`) to start over on it, or bind the function to its old stream",
                    identity.name, identity.created_ns
                )));
            }
            Some(_) => {}
            None => {
                hold(
                    &self.name,
                    self.ack_wait(),
                    "recording the stream",
                    &[],
                    cancel,
                    || {
                        self.state
                            .record_stream(&self.name, &identity.name, identity.created_ns)
                    },
                )
                .await?;
            }
        }
        if created {
            tracing::info!(function = %self.name, stream = %identity.name, "new function: progress recorded");
        }
        self.msg_scope = match progress.incarnation.as_str() {
            "" => self.spec.name.clone(),
            incarnation => format!("{}.{incarnation}", self.spec.name),
        };
        self.highest_applied = progress.highest_applied;
        self.published.clear();
        // An ack floor read from an earlier consumer says nothing about this
        // one.
        self.prune_floor = None;
        self.guard = self.inherit_waits(&mut ingest).await;
        Ok(ingest)
    }

    fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.spec.ack_wait_ms)
    }

    /// The key waits a new turn starts with: events a previous owner (or
    /// this host's previous turn) may still hold hold their keys, until
    /// decided or until they could have come back twice over.
    async fn inherit_waits(&mut self, ingest: &mut Ingest) -> KeyGuard {
        let limit = self.spec.batch_size.saturating_mul(4).max(1000);
        let outstanding = match ingest.outstanding(limit).await {
            Ok(outstanding) => {
                // An event whose effect is committed holds nothing back.
                let sequences: Vec<u64> = outstanding.iter().map(|(s, _)| *s).collect();
                match self.state.already_applied(&self.name, &sequences).await {
                    Ok(applied) => outstanding
                        .into_iter()
                        .filter(|(s, _)| !applied.contains(s))
                        .collect(),
                    Err(_) => outstanding,
                }
            }
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot read the events still out; order per key across this takeover is not kept");
                Vec::new()
            }
        };
        if !outstanding.is_empty() {
            tracing::info!(function = %self.name, events = outstanding.len(), "events of an earlier owner are still out; their keys wait for them");
        }
        let lapse = Duration::from_millis(self.spec.ack_wait_ms) * 2
            + Duration::from_millis(self.spec.retry.max_backoff_ms)
            + Duration::from_secs(5);
        KeyGuard::inheriting(outstanding, Instant::now() + lapse)
    }

    /// Publishes what an earlier owner committed but may not have
    /// published, batch by batch, deleting each batch's rows once stored.
    /// With `ingest`, batches whose inputs are all acked are known to be
    /// published and only deleted; without, every batch is published (before
    /// acking redeliveries found applied: their commit's publish may be
    /// what is pending).
    async fn flush_outbox(
        &mut self,
        ingest: Option<&mut Ingest>,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let batches = hold(
            &self.name,
            self.ack_wait(),
            "reading the outbox",
            &[],
            cancel,
            || self.state.outbox(&self.name),
        )
        .await?;
        if batches.is_empty() {
            return Ok(());
        }
        // Inputs are acked only after their outputs are stored (a
        // redelivery found applied is acked only after this flush): a batch
        // whose inputs are all at or below the ack floor was published.
        let floor = match ingest {
            Some(ingest) => ingest.ack_floor().await.unwrap_or(0),
            None => 0,
        };
        for outbox in batches {
            let (batch, mut records) = (outbox.batch, outbox.records);
            if outbox.through_seq <= floor {
                self.published.push(batch);
                continue;
            }
            tracing::info!(function = %self.name, batch, outputs = records.len(), "publishing outputs committed by an earlier run");
            let parents = vec![None; records.len()];
            while let Err(error) = self.publish_records(&mut records, parents.clone()).await {
                tracing::warn!(function = %self.name, %error, "publishing committed outputs failed; retrying");
                if !pause(cancel, REDELIVER_DELAY).await {
                    return Err(Stop::Cancelled);
                }
            }
            self.published.push(batch);
        }
        self.tidy_outbox().await;
        Ok(())
    }

    /// Deletes the outbox rows of published batches now (idle, or
    /// stopping) instead of with the next commit.
    async fn tidy_outbox(&mut self) {
        if self.published.is_empty() {
            return;
        }
        match self
            .state
            .delete_outbox(&self.name, self.epoch, &self.published)
            .await
        {
            Ok(()) => self.published.clear(),
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot delete published outbox rows yet")
            }
        }
    }

    /// The end of a turn that was not fenced: published rows go, and the
    /// function is released so a standby takes over at once.
    async fn finish_turn(&mut self) {
        self.tidy_outbox().await;
        if let Err(error) = self.state.release(&self.name, self.epoch).await {
            tracing::warn!(function = %self.name, %error, "cannot release the function; another host takes over when the lease lapses");
        }
    }

    /// Renews the lease once a third of it has passed.
    async fn renew_lease_if_due(&mut self) -> Result<(), Stop> {
        if self.lease_renewed.elapsed() < self.owner_lease / 3 {
            return Ok(());
        }
        match self
            .state
            .renew(&self.name, self.epoch, self.owner_lease)
            .await
        {
            Ok(true) => {
                self.lease_renewed = Instant::now();
                Ok(())
            }
            Ok(false) => Err(Stop::Fenced),
            // An outage: the commit's own epoch check still fences.
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot renew the function's lease");
                Ok(())
            }
        }
    }

    /// Plans, runs and settles one batch.
    async fn process(
        &mut self,
        deliveries: Vec<Delivery>,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let metrics = &self.lanes[0].metrics;
        metrics.in_flight.set(deliveries.len() as f64);
        metrics.batch_size.record(deliveries.len() as f64);
        if let Some(last) = deliveries.last() {
            self.pending = last.pending;
            metrics.consumer_pending.set(last.pending as f64);
        }
        let (intake, mut hand) = self.take_in(deliveries);
        let ack_wait = Duration::from_millis(self.spec.ack_wait_ms);
        let settings = PlanSettings {
            policy: self.spec.retry.clone(),
            byte_budget: BATCH_BYTE_BUDGET,
            wait_grace: ack_wait * 2 + Duration::from_secs(5),
            highest_applied: self.highest_applied,
        };
        let (mut batch, lookup) = Batch::plan(intake, &self.guard, &settings, Instant::now());
        let applied = hold(
            &self.name,
            self.ack_wait(),
            "reading applied sequences",
            &hand.messages,
            cancel,
            || self.state.already_applied(&self.name, &lookup),
        )
        .await;
        let applied = match applied {
            Ok(applied) => applied,
            Err(Stop::Cancelled) => return self.hand_back(batch, hand, cancel).await,
            Err(stop) => return Err(stop),
        };
        batch.applied(&applied);
        if batch.has_already_applied() {
            self.flush_outbox(None, cancel).await?;
        }
        let keys: Vec<String> = batch
            .records()
            .iter()
            .filter(|r| r.outcome == Outcome::ToRun)
            .filter_map(|r| r.key.clone())
            .collect();
        let load_started = SystemTime::now();
        let view = hold(
            &self.name,
            self.ack_wait(),
            "loading state",
            &hand.messages,
            cancel,
            || {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let state = self.state.clone();
                let name = self.name.clone();
                let epoch = self.epoch;
                async move { state.view(&name, epoch, &keys).await }
            },
        )
        .await;
        let view = match view {
            Ok(view) => view,
            Err(Stop::Cancelled) => return self.hand_back(batch, hand, cancel).await,
            Err(stop) => return Err(stop),
        };
        self.record_step(&hand.traces, &batch, "state.load", load_started, |o| {
            *o == Outcome::ToRun
        });
        let Some(ran) = self.run_events(batch, view, &mut hand, cancel).await? else {
            return Ok(());
        };
        let Ran {
            mut batch,
            view,
            invocations,
            ..
        } = ran;
        self.observe_run(&batch, &hand, &invocations).await;
        let settlement = batch.settle(&mut self.guard);
        let result = self
            .perform(
                &mut batch,
                settlement,
                view,
                &invocations,
                &mut hand,
                cancel,
            )
            .await;
        self.lanes[0].metrics.in_flight.set(0.0);
        result
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
        let stop = cancel.child_token();
        let stop_run = stop.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            lanes::run_batch(batch, lanes, view, events, &stop_run)
        });
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
        let mut ran = match joined {
            Ok(ran) => ran,
            Err(error) => {
                self.recover_from_failed_run(&error.to_string(), hand, cancel)
                    .await;
                return Ok(None);
            }
        };
        for (lane, run) in self.lanes.iter_mut().zip(&mut ran.lanes) {
            lane.instance = run.instance.take();
            lane.breaker = run.breaker.take();
        }
        for (lane, transition) in std::mem::take(&mut ran.transitions) {
            self.observe_transition(lane, &transition);
        }
        if fenced {
            return Err(Stop::Fenced);
        }
        Ok(Some(ran))
    }

    /// The run task panicked: a host bug, not the guest's. Nothing is
    /// decided; the batch goes back without spending attempts, and the
    /// breakers start again closed.
    async fn recover_from_failed_run(
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
        settlement: Settlement,
        view: BatchView,
        invocations: &[Option<Invocation>],
        hand: &mut InHand,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        let mut effects = settlement.effects;
        let mut view = Some(view);
        let mut committed = None;
        let mut next = 0;
        while let Some(effect) = effects.get(next).cloned() {
            next += 1;
            match effect {
                Effect::Commit {
                    batch_id,
                    through_seq,
                    applied,
                } => {
                    let outbox = self.gather(batch, &effects, invocations, hand).0;
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
                        Ok(()) => committed = Some(batch_id),
                        Err(CommitEnd::Stop(Stop::Cancelled)) => {
                            return self.hand_back_batch(batch, hand, cancel).await;
                        }
                        Err(CommitEnd::Stop(stop)) => return Err(stop),
                        Err(CommitEnd::Refused(reason)) => {
                            match batch.commit_refused(&reason, &mut self.guard) {
                                Some(again) => {
                                    effects = again.effects;
                                    next = 0;
                                }
                                None => {
                                    self.isolate_through = batch
                                        .records()
                                        .iter()
                                        .map(|r| r.sequence)
                                        .max()
                                        .unwrap_or(0);
                                    tracing::warn!(function = %self.name, %reason, through = self.isolate_through, "the database refused the batch's state; running it one event at a time to find the event");
                                    return self.hand_back_batch(batch, hand, cancel).await;
                                }
                            }
                        }
                    }
                }
                Effect::Publish { .. } => {
                    let (mut records, parents) = self.gather(batch, &effects, invocations, hand);
                    let dead = self.dead_letters(batch, &effects, hand);
                    records.extend(dead.0);
                    let parents = parents.into_iter().chain(dead.1).collect();
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
                Effect::Ack(acks) => self.acknowledge(batch, &acks, hand).await,
            }
        }
        Ok(())
    }

    /// The output records of the settlement's publish, in record order.
    fn gather(
        &self,
        batch: &Batch,
        effects: &[Effect],
        invocations: &[Option<Invocation>],
        hand: &InHand,
    ) -> (Vec<OutputRecord>, Vec<Option<Context>>) {
        let mut gathered = (Vec::new(), Vec::new());
        let Some(Effect::Publish { outputs, .. }) =
            effects.iter().find(|e| matches!(e, Effect::Publish { .. }))
        else {
            return gathered;
        };
        for &index in outputs {
            let Some(Invocation {
                result: Ok(handled),
                ..
            }) = &invocations[index]
            else {
                continue;
            };
            self.event_outputs(
                &batch.records()[index],
                &hand.messages[index],
                hand.traces[index].as_ref(),
                handled.outputs.clone(),
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
        let done = hold(
            &self.name,
            self.ack_wait(),
            "committing state",
            &hand.messages,
            cancel,
            || self.state.commit(&self.name, commit, self.owner_lease),
        )
        .await;
        match done {
            Ok(()) => {}
            Err(Stop::Refused(reason)) => return Err(CommitEnd::Refused(reason)),
            Err(stop) => return Err(CommitEnd::Stop(stop)),
        }
        self.lease_renewed = Instant::now();
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
        let changes: Vec<(u64, DeferralChange)> = acks
            .iter()
            .map(|&(index, decision)| {
                let change = match decision {
                    _ if batch.is_deferral(index) => DeferralChange::Deferred,
                    AckDecision::Nak { .. } => DeferralChange::Retried,
                    _ => DeferralChange::Done,
                };
                (batch.records()[index].sequence, change)
            })
            .collect();
        note_deferrals(&mut self.deferrals, changes);
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

    /// Hands a batch back before it was run.
    async fn hand_back(
        &mut self,
        mut batch: Batch,
        mut hand: InHand,
        cancel: &CancellationToken,
    ) -> Result<(), Stop> {
        self.hand_back_batch(&mut batch, &mut hand, cancel).await
    }

    /// Hands the whole batch back to JetStream: nothing was committed, no
    /// delivery is an attempt.
    async fn hand_back_batch(
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

    /// Records the consumer's ack floor (a lost consumer is recreated above
    /// it) and forgets applied sequences at or below a floor read at least
    /// [`support::PRUNE_LAG`] ago. A nats-server that crashes can come back
    /// with an older ack floor and deliver those messages again; the lag
    /// keeps their rows until that can no longer happen.
    async fn prune_applied(&mut self, ingest: &mut Ingest) {
        let floor = match ingest.ack_floor().await {
            Ok(floor) => floor,
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "reading the ack floor failed");
                return;
            }
        };
        self.guard.passed_floor(floor);
        let (due, next) = support::prune_bound(self.prune_floor, Instant::now(), floor);
        self.prune_floor = next;
        if let Some(old_floor) = due {
            if let Err(error) = self.state.record_resume(&self.name, old_floor).await {
                tracing::warn!(function = %self.name, %error, "recording the ack floor failed");
                return;
            }
            if let Err(error) = self.state.prune_applied(&self.name, old_floor).await {
                tracing::warn!(function = %self.name, %error, "pruning applied sequences failed");
            }
        }
    }
}

/// Runs a step of `function` until it succeeds (see [`hold_until_done`]);
/// a stop ends the turn, a fence too, and a permanent error refuses.
async fn hold<T, F, Fut>(
    function: &str,
    ack_wait: Duration,
    what: &str,
    messages: &[Message],
    cancel: &CancellationToken,
    op: F,
) -> Result<T, Stop>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StateError>>,
{
    let permanent = |e: &StateError| matches!(e, StateError::Fenced { .. }) || e.is_permanent();
    match hold_until_done(function, what, messages, ack_wait, cancel, permanent, op).await {
        Ok(done) => Ok(done),
        Err(Held::Cancelled) => Err(Stop::Cancelled),
        Err(Held::Permanent(StateError::Fenced { .. })) => Err(Stop::Fenced),
        Err(Held::Permanent(error)) => Err(Stop::Refused(format!("{what}: {error}"))),
    }
}

/// Why a commit did not happen.
enum CommitEnd {
    Stop(Stop),
    /// The database refused the data for good.
    Refused(String),
}
