//! The batch protocol, with no I/O: what to run, in which order, and what to
//! commit, publish and tell JetStream afterwards.
//!
//! A [`Batch`] is planned from the deliveries (one [`Record`] each, its
//! [`Outcome`] never missing), learns which redeliveries are already applied,
//! hands out the events to run one at a time in stream order, takes each
//! result, and is settled into an ordered list of [`Effect`]s that the driver
//! in [`super`] performs. The simulation in `sim.rs` drives the same type and
//! crashes before and after every effect.
//!
//! Rules held here, and nowhere else:
//! - a sequence delivered twice in one batch runs once; the copy gets the
//!   same ack as the original;
//! - per-key order: once an event of a key will be delivered again (a retry,
//!   a breaker deferral, a host failure), the key's later events in the batch
//!   wait too, and [`KeyGuard`] keeps them waiting in later batches until
//!   that event is decided;
//! - a host-side failure, a stop, a full byte budget or a key that waits is
//!   a deferral: it spends no attempt and never counts against the guest;
//! - the effects come in one order: commit, then publish (outputs, then dead
//!   letters), then acks.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::ack::{AckDecision, decide};
use crate::config::RetryPolicy;
use crate::outcome::{EventOutcome, Failure};

/// Delay before a deferred event (a stop, a host failure, a full budget) is
/// delivered again.
pub const REDELIVER_DELAY: Duration = Duration::from_secs(1);

/// What the core needs of one delivery.
#[derive(Debug, Clone)]
pub struct Intake {
    pub sequence: u64,
    /// JetStream's delivery count: 1 on the first delivery, and also on a
    /// redelivery by a server that lost its consumer state.
    pub delivered: u64,
    /// The event's key, or why it has none.
    pub key: Result<String, Failure>,
    /// Which version (lane) handles it.
    pub lane: usize,
    /// Deliveries of this event that were deferrals, not attempts.
    pub deferred: u64,
}

/// Why an event was handed back without a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferReason {
    /// The version's circuit breaker refused the call.
    Breaker,
    /// An earlier event of the same key waits for a retry.
    KeyWaits,
    /// The host failed around the call (no instance slot, a crashed task).
    HostFailure,
    /// The worker is stopping or switching.
    Stopping,
    /// The batch's output bytes reached its budget.
    BudgetFull,
    /// The batch could not be committed and was handed back whole.
    GivenBack,
}

impl DeferReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeferReason::Breaker => "deferred",
            DeferReason::KeyWaits => "key-waits",
            DeferReason::HostFailure => "host-failure",
            DeferReason::Stopping => "stopping",
            DeferReason::BudgetFull => "budget-full",
            DeferReason::GivenBack => "given-back",
        }
    }
}

/// What became of one delivery so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Planned to run, not run yet. Settling turns any left into a deferral.
    ToRun,
    /// Ran and succeeded.
    Applied { wrote: bool, outputs: usize },
    /// A redelivery whose effect is already committed.
    AlreadyApplied,
    /// The event or the guest failed.
    Failed(Failure),
    /// Handed back without a decision.
    Deferred {
        retry_after: Duration,
        reason: DeferReason,
    },
    /// The same sequence as an earlier record of this batch.
    Duplicate { of: usize },
}

/// One delivery and what became of it.
#[derive(Debug, Clone)]
pub struct Record {
    pub sequence: u64,
    /// The attempt this delivery is (deferrals do not count).
    pub attempt: u64,
    pub key: Option<String>,
    pub lane: usize,
    pub outcome: Outcome,
    /// Earlier events of its key still out when the batch was planned, and
    /// how long until the last of them is due back: it runs only once those
    /// in this batch are decided and none of the rest remain.
    waits_for: Option<(Vec<u64>, Duration)>,
}

/// What a run of one event gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunResult {
    /// The guest ran: its result, whether it wrote state, its outputs and
    /// their bytes.
    Invoked(Result<(bool, usize, usize), Failure>),
    /// The breaker refused the call.
    Refused { retry_after: Duration },
    /// The host failed around the call; not the guest's doing.
    HostFailed,
}

/// Keeps a key's later events waiting while an earlier one is still out,
/// across batches. Held in memory by the owner: each wait lapses in case
/// its event never comes back to this host.
#[derive(Debug, Default, Clone)]
pub struct KeyGuard {
    /// Key → its events that will come back: sequence → (when it is due
    /// back, when the wait for it lapses).
    waiting: HashMap<String, std::collections::BTreeMap<u64, (Instant, Instant)>>,
    /// Events a previous owner may still hold (delivered to it and not yet
    /// decided), by sequence: a new owner runs no later event of their key
    /// before them.
    inherited: std::collections::BTreeMap<u64, String>,
    /// When the inherited events stop holding their keys.
    inherited_lapse: Option<Instant>,
}

impl KeyGuard {
    /// A guard for a new turn: `inherited` are the (sequence, key) of the
    /// events between the consumer's ack floor and its last delivery, which
    /// the previous owner may still hold; they hold their keys until decided
    /// or until `lapse`.
    pub fn inheriting(inherited: impl IntoIterator<Item = (u64, String)>, lapse: Instant) -> Self {
        let inherited: std::collections::BTreeMap<u64, String> = inherited.into_iter().collect();
        Self {
            inherited_lapse: (!inherited.is_empty()).then_some(lapse),
            inherited,
            waiting: HashMap::new(),
        }
    }

    /// What an event of `key` at `sequence` must wait for: the earlier
    /// events of its key still out, and how long until they are due back.
    /// `None` if it may run.
    fn wait_for(&self, key: &str, sequence: u64, now: Instant) -> Option<(Vec<u64>, Duration)> {
        let mut blockers = Vec::new();
        let mut due_in = Duration::ZERO;
        if let Some(out) = self.waiting.get(key) {
            for (blocker, (due, lapse)) in out.range(..sequence) {
                if *lapse > now {
                    blockers.push(*blocker);
                    due_in = due_in.max(due.saturating_duration_since(now));
                }
            }
        }
        if self.inherited_lapse.is_some_and(|lapse| lapse > now) {
            let inherited = self.inherited.range(..sequence);
            let before = blockers.len();
            blockers.extend(inherited.filter(|(_, k)| *k == key).map(|(s, _)| *s));
            if blockers.len() > before {
                due_in = due_in.max(REDELIVER_DELAY);
            }
        }
        (!blockers.is_empty()).then_some((blockers, due_in))
    }

    /// Forgets inherited events at or below the consumer's ack floor: they
    /// were decided.
    pub fn passed_floor(&mut self, ack_floor: u64) {
        self.inherited = self.inherited.split_off(&(ack_floor + 1));
    }

    /// Whether no key waits and no inherited event is out.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.inherited.is_empty()
    }
}

/// The protocol of one batch.
#[derive(Debug)]
pub struct Batch {
    records: Vec<Record>,
    /// Indices of records to run, in stream order.
    order: Vec<usize>,
    next: usize,
    /// Keys whose remaining events in this batch wait.
    held: HashSet<String>,
    output_bytes: usize,
    byte_budget: usize,
    policy: RetryPolicy,
    now: Instant,
    /// How long after its retry delay a key's wait lapses.
    wait_grace: Duration,
    /// Windows that fired or expired after the events ran.
    window_work: Option<WindowWork>,
    /// Records that became deferrals or retries since last asked
    /// ([`Batch::take_new_naks`]).
    new_naks: Vec<usize>,
}

/// What a windowed function's watermark advance left to commit and
/// publish beside the events' own effects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowWork {
    /// The outbox batch id to commit under when no event commits (an idle
    /// advance, or a batch of events that changed nothing): unique per
    /// function, and above every stream sequence.
    pub commit_id: u64,
    /// Whether firings have records to publish.
    pub publishes: bool,
}

/// The `through_seq` of a commit made for window work alone: never at or
/// below an ack floor, so its rows are published by whoever finds them.
pub const WINDOW_THROUGH_SEQ: u64 = i64::MAX as u64;
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub policy: RetryPolicy,
    /// Output bytes after which the rest of the batch waits for the next.
    pub byte_budget: usize,
    /// How long after its retry delay a key's wait lapses.
    pub wait_grace: Duration,
    /// Sequences at or below this may have been applied by an earlier run.
    pub highest_applied: u64,
}

impl Batch {
    /// Plans a batch. Returns it and the sequences whose applied status must
    /// be looked up (pass the answer to [`Batch::applied`]).
    pub fn plan(
        intake: Vec<Intake>,
        guard: &KeyGuard,
        settings: &PlanSettings,
        now: Instant,
    ) -> (Self, Vec<u64>) {
        let mut lookup = Vec::new();
        let mut records = Vec::with_capacity(intake.len());
        for delivery in intake {
            let attempt = delivery.delivered.saturating_sub(delivery.deferred).max(1);
            let (key, outcome) = match delivery.key {
                Err(failure) => (None, Outcome::Failed(failure)),
                Ok(key) => (Some(key), Outcome::ToRun),
            };
            // A redelivery may be of an event whose batch committed but was
            // not acked. The delivery count alone cannot tell: a server that
            // lost its consumer state delivers again with a count of 1.
            if outcome == Outcome::ToRun
                && (delivery.delivered > 1 || delivery.sequence <= settings.highest_applied)
            {
                lookup.push(delivery.sequence);
            }
            records.push(Record {
                sequence: delivery.sequence,
                attempt,
                key,
                lane: delivery.lane,
                outcome,
                waits_for: None,
            });
        }
        // Stream order (a stable sort keeps delivery order among copies of
        // one sequence): the first copy runs, later ones follow it.
        let mut order: Vec<usize> = (0..records.len()).collect();
        order.sort_by_key(|&i| records[i].sequence);
        for pair in 1..order.len() {
            let (first, copy) = (order[pair - 1], order[pair]);
            if records[first].sequence == records[copy].sequence {
                let of = match records[first].outcome {
                    Outcome::Duplicate { of } => of,
                    _ => first,
                };
                records[copy].outcome = Outcome::Duplicate { of };
            }
        }
        order.retain(|&i| records[i].outcome == Outcome::ToRun);
        let mut batch = Self {
            records,
            order,
            next: 0,
            held: HashSet::new(),
            output_bytes: 0,
            byte_budget: settings.byte_budget,
            policy: settings.policy.clone(),
            now,
            wait_grace: settings.wait_grace,
            window_work: None,
            new_naks: Vec::new(),
        };
        batch.hold_guarded_keys(guard);
        (batch, lookup)
    }

    /// Events whose key waits for an earlier event that is still out. They
    /// come back just after it is due, so that even a new owner gets them
    /// in order.
    fn hold_guarded_keys(&mut self, guard: &KeyGuard) {
        for &index in &self.order {
            let record = &mut self.records[index];
            let Some(key) = &record.key else { continue };
            record.waits_for = guard.wait_for(key, record.sequence, self.now);
        }
    }

    /// Whether record `index` still waits for an earlier event of its key:
    /// one not in this batch, or one in it that is not decided for good.
    fn still_waits(&self, index: usize) -> Option<Duration> {
        let (blockers, due_in) = self.records[index].waits_for.as_ref()?;
        let decided = |sequence: &u64| {
            self.records.iter().enumerate().any(|(i, r)| {
                r.sequence == *sequence
                    && !matches!(r.outcome, Outcome::ToRun | Outcome::Duplicate { .. })
                    && !matches!(self.decision(i), AckDecision::Nak { .. })
            })
        };
        (!blockers.iter().all(decided)).then_some(*due_in)
    }

    /// Marks the records whose sequence is in `applied` as already applied.
    pub fn applied(&mut self, applied: &HashSet<u64>) {
        for record in &mut self.records {
            if record.outcome == Outcome::ToRun && applied.contains(&record.sequence) {
                record.outcome = Outcome::AlreadyApplied;
            }
        }
    }

    /// Whether some delivery is of an event already applied: before it is
    /// acked, the outbox must be published (its commit's publish may be
    /// what is pending).
    pub fn has_already_applied(&self) -> bool {
        self.records
            .iter()
            .any(|r| r.outcome == Outcome::AlreadyApplied)
    }

    /// The next record to run, in stream order; records of a key that waits
    /// are deferred on the way. `None` when nothing is left to run.
    pub fn next_run(&mut self) -> Option<usize> {
        while let Some(&index) = self.order.get(self.next) {
            self.next += 1;
            let over_budget = self.output_bytes >= self.byte_budget;
            if self.records[index].outcome != Outcome::ToRun {
                continue;
            }
            let waits = self.still_waits(index);
            let record = &mut self.records[index];
            // Most batches hold no key: skip hashing every event's key then.
            let held =
                !self.held.is_empty() && record.key.as_ref().is_some_and(|k| self.held.contains(k));
            let deferral = match (waits, held, over_budget) {
                // Come back just after what it waits for is due, so that
                // even a new owner gets them in order.
                (Some(due_in), _, _) => {
                    Some((due_in + Duration::from_millis(100), DeferReason::KeyWaits))
                }
                (None, true, _) => Some((REDELIVER_DELAY, DeferReason::KeyWaits)),
                (None, false, true) => Some((REDELIVER_DELAY, DeferReason::BudgetFull)),
                (None, false, false) => None,
            };
            if let Some((retry_after, reason)) = deferral {
                if let Some(key) = &record.key {
                    self.held.insert(key.clone());
                }
                record.outcome = Outcome::Deferred {
                    retry_after,
                    reason,
                };
                self.new_naks.push(index);
                continue;
            }
            return Some(index);
        }
        None
    }

    /// Records the result of running record `index`.
    pub fn ran(&mut self, index: usize, result: RunResult) {
        let record = &mut self.records[index];
        record.outcome = match result {
            RunResult::Invoked(Ok((wrote, outputs, bytes))) => {
                self.output_bytes = self.output_bytes.saturating_add(bytes);
                Outcome::Applied { wrote, outputs }
            }
            RunResult::Invoked(Err(failure)) => Outcome::Failed(failure),
            RunResult::Refused { retry_after } => Outcome::Deferred {
                retry_after,
                reason: DeferReason::Breaker,
            },
            RunResult::HostFailed => Outcome::Deferred {
                retry_after: REDELIVER_DELAY,
                reason: DeferReason::HostFailure,
            },
        };
        let comes_back = matches!(self.decision(index), AckDecision::Nak { .. });
        if comes_back {
            self.new_naks.push(index);
            if let Some(key) = &self.records[index].key {
                self.held.insert(key.clone());
            }
        }
    }

    /// The records that will be delivered again (deferred, or failed and
    /// to be retried) since the last call, in the order they became so.
    pub fn take_new_naks(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.new_naks)
    }

    /// Stops running: what was not run yet is handed back (a stop or a
    /// switch; no attempt spent).
    pub fn stop_running(&mut self) {
        for &index in &self.order[self.next.min(self.order.len())..] {
            let record = &mut self.records[index];
            if record.outcome == Outcome::ToRun {
                record.outcome = Outcome::Deferred {
                    retry_after: REDELIVER_DELAY,
                    reason: DeferReason::Stopping,
                };
                self.new_naks.push(index);
            }
        }
        self.next = self.order.len();
    }

    /// Window work to commit (and publish) with the batch.
    pub fn add_window_work(&mut self, work: WindowWork) {
        self.window_work = Some(work);
    }

    /// The window work the batch commits, if any.
    pub fn window_work(&self) -> Option<WindowWork> {
        self.window_work
    }

    /// The records, by delivery position.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// What JetStream is told about record `index`.
    pub fn decision(&self, index: usize) -> AckDecision {
        let record = &self.records[index];
        match &record.outcome {
            Outcome::ToRun => AckDecision::Nak {
                delay: REDELIVER_DELAY,
            },
            Outcome::Applied { .. } => AckDecision::Ack,
            Outcome::AlreadyApplied => AckDecision::Ack,
            Outcome::Failed(failure) => decide(
                &EventOutcome::Failed(failure.clone()),
                record.attempt,
                &self.policy,
            ),
            Outcome::Deferred { retry_after, .. } => AckDecision::Nak {
                delay: *retry_after,
            },
            Outcome::Duplicate { of } => self.decision(*of),
        }
    }

    /// Whether record `index`'s delivery ends without a decision (it does
    /// not count as an attempt).
    pub fn is_deferral(&self, index: usize) -> bool {
        match &self.records[index].outcome {
            Outcome::ToRun | Outcome::Deferred { .. } => true,
            Outcome::Duplicate { of } => self.is_deferral(*of),
            _ => false,
        }
    }

    /// Ends the run phase: the ordered effects. (Key waits change when the
    /// acks are performed: [`Batch::acked`].)
    pub fn settle(&mut self) -> Settlement {
        self.stop_running();
        let wrote: Vec<usize> = self.indices(|o| matches!(o, Outcome::Applied { wrote: true, .. }));
        let with_outputs: Vec<usize> =
            self.indices(|o| matches!(o, Outcome::Applied { outputs, .. } if *outputs > 0));
        let acks: Vec<(usize, AckDecision)> = (0..self.records.len())
            .map(|i| (i, self.decision(i)))
            .collect();
        let dead_letters: Vec<usize> = acks
            .iter()
            .filter(|&&(i, decision)| {
                decision == AckDecision::DeadLetter
                    && !matches!(self.records[i].outcome, Outcome::Duplicate { .. })
            })
            .map(|&(i, _)| i)
            .collect();
        let mut effects = Vec::with_capacity(3);
        if !wrote.is_empty() {
            let sequences = || {
                wrote
                    .iter()
                    .chain(&with_outputs)
                    .map(|&i| self.records[i].sequence)
            };
            // A windowed batch commits under the book's own counter: its
            // firings make it more than its events, which may come again.
            let batch_id = match self.window_work {
                Some(work) => work.commit_id,
                None => sequences().min().unwrap_or(0),
            };
            effects.push(Effect::Commit {
                batch_id,
                through_seq: sequences().max().unwrap_or(0),
                applied: wrote.iter().map(|&i| self.records[i].sequence).collect(),
            });
        } else if let Some(work) = self.window_work {
            effects.push(Effect::Commit {
                batch_id: work.commit_id,
                through_seq: WINDOW_THROUGH_SEQ,
                applied: Vec::new(),
            });
        }
        let window_publishes = self.window_work.is_some_and(|w| w.publishes);
        if !with_outputs.is_empty() || !dead_letters.is_empty() || window_publishes {
            effects.push(Effect::Publish {
                outputs: with_outputs,
                dead_letters,
            });
        }
        effects.push(Effect::Ack(acks));
        Settlement { effects }
    }

    fn indices(&self, pick: impl Fn(&Outcome) -> bool) -> Vec<usize> {
        let mut picked = Vec::with_capacity(self.records.len());
        picked.extend((0..self.records.len()).filter(|&i| pick(&self.records[i].outcome)));
        picked
    }

    /// The acks were performed at `now`: a key waits for every one of its
    /// events that will come back (from `now`, however long the commit or
    /// publish before took); an event that is decided stops holding it.
    pub fn acked(&self, guard: &mut KeyGuard, acks: &[(usize, AckDecision)], now: Instant) {
        for &(index, decision) in acks {
            let record = &self.records[index];
            if !matches!(decision, AckDecision::Nak { .. }) {
                guard.inherited.remove(&record.sequence);
            }
            let Some(key) = &record.key else { continue };
            match decision {
                AckDecision::Nak { delay } => {
                    let due = now + delay;
                    let out = guard.waiting.entry(key.clone()).or_default();
                    out.insert(record.sequence, (due, due + self.wait_grace));
                }
                // The common case touches nothing unless the key waits.
                AckDecision::Ack | AckDecision::DeadLetter => {
                    if let Some(out) = guard.waiting.get_mut(key) {
                        out.remove(&record.sequence);
                    }
                }
            }
        }
        if guard.waiting.is_empty() && guard.inherited.is_empty() {
            return;
        }
        for out in guard.waiting.values_mut() {
            out.retain(|_, (_, lapse)| *lapse > now);
        }
        guard.waiting.retain(|_, out| !out.is_empty());
        if guard.inherited_lapse.is_some_and(|lapse| lapse <= now) {
            guard.inherited.clear();
        }
    }

    /// Hands the whole batch back (a commit that cannot be made now): no
    /// decision, no attempt. Its keys wait for it once the naks are
    /// performed ([`Batch::acked`]).
    pub fn give_back(&mut self) -> Vec<(usize, AckDecision)> {
        for record in &mut self.records {
            if !matches!(record.outcome, Outcome::Duplicate { .. }) {
                record.outcome = Outcome::Deferred {
                    retry_after: REDELIVER_DELAY,
                    reason: DeferReason::GivenBack,
                };
            }
        }
        (0..self.records.len())
            .map(|i| (i, self.decision(i)))
            .collect()
    }

    /// The commit was refused for good (data the database will not store).
    /// With one writer in the batch, that event is the cause: it fails for
    /// good and the batch settles again without it. With several, `None`:
    /// hand the batch back and run it one event at a time.
    /// Window work goes too: a later batch does it again from the
    /// committed bookkeeping.
    pub fn commit_refused(&mut self, reason: &str) -> Option<Settlement> {
        self.window_work = None;
        let writers = self.indices(|o| matches!(o, Outcome::Applied { wrote: true, .. }));
        let [writer] = writers[..] else {
            return None;
        };
        self.records[writer].outcome = Outcome::Failed(Failure::new(
            crate::outcome::FailureKind::Refused,
            format!("its state changes were refused by the database: {reason}"),
        ));
        Some(self.settle())
    }
}

/// What the driver does after a batch ran, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// One transaction, conditional on the owner epoch: the state changes
    /// of the applied events, their sequences, and the batch's outputs in
    /// the outbox under `batch_id` (the lowest sequence among the events it
    /// commits or publishes for: each event commits at most once, so no two
    /// commits share it) with `through_seq` (the highest).
    Commit {
        batch_id: u64,
        through_seq: u64,
        applied: Vec<u64>,
    },
    /// Publish the outputs of these records, then a dead letter for each of
    /// these.
    Publish {
        outputs: Vec<usize>,
        dead_letters: Vec<usize>,
    },
    /// Tell JetStream, per record.
    Ack(Vec<(usize, AckDecision)>),
}

/// The effects of a settled batch.
#[derive(Debug, Clone)]
pub struct Settlement {
    pub effects: Vec<Effect>,
}

#[cfg(test)]
impl Settlement {
    /// Whether the batch commits.
    pub fn commits(&self) -> bool {
        self.effects
            .iter()
            .any(|e| matches!(e, Effect::Commit { .. }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::FailureKind;

    fn settings() -> PlanSettings {
        PlanSettings {
            policy: RetryPolicy {
                max_attempts: 3,
                initial_backoff_ms: 100,
                max_backoff_ms: 1000,
            },
            byte_budget: 1000,
            wait_grace: Duration::from_secs(30),
            highest_applied: 0,
        }
    }

    fn intake(sequence: u64, key: &str) -> Intake {
        Intake {
            sequence,
            delivered: 1,
            key: Ok(key.into()),
            lane: 0,
            deferred: 0,
        }
    }

    fn settle_and_ack(batch: &mut Batch, guard: &mut KeyGuard, now: Instant) {
        let settlement = batch.settle();
        if let Some(Effect::Ack(acks)) = settlement.effects.last() {
            batch.acked(guard, acks, now);
        }
    }

    fn run_all(batch: &mut Batch, mut result: impl FnMut(&Record) -> RunResult) -> Vec<u64> {
        let mut ran = Vec::new();
        while let Some(i) = batch.next_run() {
            ran.push(batch.records()[i].sequence);
            let r = result(&batch.records()[i]);
            batch.ran(i, r);
        }
        ran
    }

    #[test]
    fn runs_in_stream_order_and_a_duplicate_once() {
        let now = Instant::now();
        let guard = KeyGuard::default();
        let input = vec![
            intake(3, "a"),
            intake(1, "b"),
            intake(3, "a"),
            intake(2, "a"),
        ];
        let (mut batch, lookup) = Batch::plan(input, &guard, &settings(), now);
        assert!(lookup.is_empty());
        let ran = run_all(&mut batch, |_| RunResult::Invoked(Ok((true, 1, 10))));
        assert_eq!(ran, vec![1, 2, 3]);
        let settlement = batch.settle();
        assert_eq!(
            settlement.effects[0],
            Effect::Commit {
                batch_id: 1,
                through_seq: 3,
                applied: vec![3, 1, 2]
            }
        );
        assert_eq!(batch.decision(2), AckDecision::Ack);
    }

    #[test]
    fn a_retried_event_holds_its_key_in_this_batch_and_the_next() {
        let now = Instant::now();
        let mut guard = KeyGuard::default();
        let input = vec![intake(1, "a"), intake(2, "a"), intake(3, "b")];
        let (mut batch, _) = Batch::plan(input, &guard, &settings(), now);
        let ran = run_all(&mut batch, |r| {
            if r.sequence == 1 {
                RunResult::Invoked(Err(Failure::new(FailureKind::Trap, "boom")))
            } else {
                RunResult::Invoked(Ok((true, 0, 0)))
            }
        });
        assert_eq!(ran, vec![1, 3], "2 waits behind 1");
        settle_and_ack(&mut batch, &mut guard, now);
        assert!(batch.is_deferral(1) && !batch.is_deferral(0));
        // Next batch: 2 alone still waits for 1; 1 runs again.
        let (mut next, _) = Batch::plan(vec![intake(2, "a")], &guard, &settings(), now);
        assert!(run_all(&mut next, |_| RunResult::HostFailed).is_empty());
        let (mut next, _) = Batch::plan(
            vec![intake(1, "a"), intake(2, "a")],
            &guard,
            &settings(),
            now,
        );
        assert_eq!(
            run_all(&mut next, |_| RunResult::Invoked(Ok((true, 0, 0)))),
            vec![1, 2]
        );
        settle_and_ack(&mut next, &mut guard, now);
        assert!(guard.is_empty());
    }

    #[test]
    fn host_failures_and_refusals_are_deferrals() {
        let now = Instant::now();
        let input = vec![intake(1, "a"), intake(2, "b")];
        let (mut batch, _) = Batch::plan(input, &KeyGuard::default(), &settings(), now);
        batch.next_run();
        batch.ran(0, RunResult::HostFailed);
        batch.next_run();
        batch.ran(
            1,
            RunResult::Refused {
                retry_after: Duration::from_millis(700),
            },
        );
        batch.settle();
        assert!(batch.is_deferral(0) && batch.is_deferral(1));
        assert_eq!(
            batch.decision(1),
            AckDecision::Nak {
                delay: Duration::from_millis(700)
            }
        );
    }

    #[test]
    fn a_full_budget_defers_the_rest() {
        let now = Instant::now();
        let input = vec![intake(1, "a"), intake(2, "b"), intake(3, "c")];
        let (mut batch, _) = Batch::plan(input, &KeyGuard::default(), &settings(), now);
        let ran = run_all(&mut batch, |_| RunResult::Invoked(Ok((false, 1, 600))));
        assert_eq!(ran, vec![1, 2]);
        assert!(batch.is_deferral(2));
    }

    #[test]
    fn a_refused_commit_fails_its_only_writer() {
        let now = Instant::now();
        let input = vec![intake(1, "a"), intake(2, "b")];
        let (mut batch, _) = Batch::plan(input, &KeyGuard::default(), &settings(), now);
        run_all(&mut batch, |r| {
            RunResult::Invoked(Ok((r.sequence == 2, usize::from(r.sequence == 1), 5)))
        });
        batch.settle();
        let again = batch.commit_refused("0x00").expect("one writer");
        assert!(!again.commits());
        assert_eq!(batch.decision(1), AckDecision::DeadLetter);
        assert_eq!(batch.decision(0), AckDecision::Ack);
    }

    #[test]
    fn redeliveries_and_old_sequences_are_looked_up() {
        let now = Instant::now();
        let mut again = intake(9, "a");
        again.delivered = 2;
        let input = vec![intake(4, "a"), again, intake(11, "b")];
        let settings = PlanSettings {
            highest_applied: 5,
            ..settings()
        };
        let (mut batch, lookup) = Batch::plan(input, &KeyGuard::default(), &settings, now);
        assert_eq!(lookup, vec![4, 9]);
        batch.applied(&HashSet::from([4]));
        assert_eq!(batch.records()[0].outcome, Outcome::AlreadyApplied);
    }
}
