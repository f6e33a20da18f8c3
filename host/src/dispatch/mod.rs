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
mod drive;
mod lanes;
mod observe;
#[cfg(test)]
mod sim;
mod support;
mod turn;
mod window_parts;
mod window_records;
mod window_turn;
mod windowed;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, Message};
use tokio_util::sync::CancellationToken;

use crate::config::{FunctionSpec, GuestLogConfig};
use crate::guest_logs::GuestLogSink;
use crate::health::Readiness;
use crate::sandbox::Event;
use crate::state::{StateError, StateStore};
use crate::traces::{EventTrace, Tracing};

use batch::KeyGuard;
pub use canary::DeploymentLink;
pub use deliver::is_broker_header;
use lanes::Lane;
pub use lanes::{VersionCode, instance_settings, lane_for, version_of};
use support::{Held, hold_until_done};
pub use window_records::window_headers;

/// Output bytes one batch may hold before the rest of it waits for the next.
const BATCH_BYTE_BUDGET: usize = 64 << 20;
/// Longest a function runs one event per batch to find the event whose
/// state the database refused.
const ISOLATE_AT_MOST: Duration = Duration::from_secs(300);
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
    /// The previous owner handed the function over cleanly.
    clean_claim: bool,
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
    /// After a commit the database refused: its events, which run one per
    /// batch until each is decided (or [`ISOLATE_AT_MOST`] has passed).
    isolating: std::collections::BTreeSet<u64>,
    isolating_since: Instant,
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
    /// An incremental sliding function's merged panes between batches.
    pane_merges: Option<crate::windows::merges::PaneMerges<bytes::Bytes>>,
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
                spec.record_subject(&env.guest_logs.subject_prefix),
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
            dead_letter_subject: spec.record_subject(&env.dead_letter_prefix),
            max_payload: env.max_payload(),
            owner_id: env.owner_id.clone(),
            owner_lease: env.owner_lease,
            epoch: 0,
            clean_claim: true,
            lease_renewed: Instant::now(),
            msg_scope: spec.name.clone(),
            name,
            spec,
            state: env.state.clone(),
            js: env.js.clone(),
            highest_applied: 0,
            published: Vec::new(),
            isolating: Default::default(),
            isolating_since: Instant::now(),
            guard: KeyGuard::default(),
            prune_floor: None,
            batches: 0,
            pane_merges: None,
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
                // Not released: the next turn takes the events back itself.
                Stop::Reopen => self.tidy_outbox().await,
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
