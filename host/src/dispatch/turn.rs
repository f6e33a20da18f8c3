//! A worker's turn as the function's owner: claiming it (or standing by),
//! opening the consumer and checking the stream's identity, publishing
//! what an earlier owner left in the outbox, renewing the lease, tidying
//! published outbox rows and pruning applied sequences between batches.

use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use tokio_util::sync::CancellationToken;

use super::batch::{KeyGuard, REDELIVER_DELAY};
use super::support::{self, pause};
use super::{FunctionWorker, ISOLATE_AT_MOST, PRUNE_EVERY_BATCHES, Stop, hold, random_hex};
use crate::breaker::Breaker;
use crate::ingest::Ingest;

impl FunctionWorker {
    /// Claims the function: its new epoch, or `None` once cancelled. Stands
    /// by while another host's lease is live.
    pub(super) async fn claim(&mut self, cancel: &CancellationToken) -> Option<u64> {
        let mut told = false;
        loop {
            // Counted from before the statement is sent: see `commit`.
            let asked = Instant::now();
            match self
                .state
                .claim(&self.name, &self.owner_id, self.owner_lease)
                .await
            {
                Ok(Some(claim)) => {
                    self.clean_claim = claim.clean;
                    let epoch = claim.epoch;
                    if told {
                        // Worth a warning: the owner before stopped renewing.
                        tracing::warn!(function = %self.name, epoch, "took over the function");
                    }
                    self.lease_renewed = asked;
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
    pub(super) async fn serve_turn(&mut self, cancel: &CancellationToken) -> Stop {
        let mut ingest = match self.open(cancel).await {
            Ok(ingest) => ingest,
            Err(stop) => return stop,
        };
        if let Some(reason) = self.world_problem() {
            return Stop::Refused(reason);
        }
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
            // A pause may have fallen between the last renewal and the
            // pull: an owner fenced meanwhile gives what it pulled back at
            // once, before running any of it.
            if let Err(stop) = self.renew_lease_if_due().await {
                for delivery in &deliveries {
                    let _ = delivery.message.ack_with(AckKind::Nak(None)).await;
                }
                return stop;
            }
            if deliveries.is_empty() {
                // An idle stream still closes its windows.
                if self.spec.window.is_some()
                    && let Err(stop) = self.process(Vec::new(), cancel).await
                {
                    return stop;
                }
                self.tidy_outbox().await;
                continue;
            }
            if let Err(stop) = self.process(deliveries, cancel).await {
                return stop;
            }
            self.after_batch(&mut ingest, cancel).await;
        }
    }

    /// Why the function's versions cannot run on its binding: a window
    /// function without window settings, or the other way round, or a
    /// canary of another world than the stable version's.
    fn world_problem(&self) -> Option<String> {
        let world = self.lanes[0].code.world();
        if self.lanes.iter().any(|lane| lane.code.world() != world) {
            return Some(format!(
                "the canary implements another world than the stable version ({world:?}); deploy it as a new function"
            ));
        }
        match (world.is_windowed(), self.spec.window.is_some()) {
            (true, false) => Some(format!(
                "the component implements a `weir:window` world ({world:?}) but the binding has no `window` settings"
            )),
            (false, true) => Some(
                "the binding has `window` settings but the component implements the per-event `weir:function/event-handler` world; build it against `weir:window`".to_string(),
            ),
            _ => None,
        }
    }

    /// How many events the next batch may take: the stable breaker's budget,
    /// or one at a time while isolating a commit the database refused.
    pub(super) fn call_budget(&self) -> usize {
        if !self.isolating.is_empty() && self.isolating_since.elapsed() < ISOLATE_AT_MOST {
            return 1;
        }
        self.lanes[0]
            .breaker
            .as_ref()
            .map_or(usize::MAX, Breaker::call_budget)
    }

    /// Bookkeeping between batches: status, canary, pruning, outbox.
    pub(super) async fn after_batch(&mut self, ingest: &mut Ingest, cancel: &CancellationToken) {
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
    pub(super) async fn open(&mut self, cancel: &CancellationToken) -> Result<Ingest, Stop> {
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
        // Another owner may have changed the panes since this worker's
        // last turn.
        self.pane_merges = None;
        // An ack floor read from an earlier consumer says nothing about this
        // one.
        self.prune_floor = None;
        if self.clean_claim {
            self.guard = self.inherit_waits(&mut ingest).await;
            return Ok(ingest);
        }
        // The previous owner stopped with events in hand: take them back
        // now, in stream order (no key then needs to wait for them).
        self.guard = KeyGuard::default();
        match ingest.reopen_above_floor(&self.js, &self.spec).await {
            Ok((ingest, 0)) => Ok(ingest),
            Ok((ingest, again)) => {
                tracing::warn!(function = %self.name, events = again, "the previous owner stopped with events in hand; reading them again in stream order");
                metrics::counter!("weir_takeover_redeliveries_total", "function" => self.name.to_string()).increment(again);
                Ok(ingest)
            }
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot take back the previous owner's events; opening again");
                Err(Stop::Reopen)
            }
        }
    }

    pub(super) fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.spec.ack_wait_ms)
    }

    /// The key waits a new turn starts with: events a previous owner (or
    /// this host's previous turn) may still hold hold their keys, until
    /// decided or until they could have come back twice over.
    pub(super) async fn inherit_waits(&mut self, ingest: &mut Ingest) -> KeyGuard {
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
    pub(super) async fn flush_outbox(
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
            if self.published.contains(&batch) {
                continue;
            }
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
    pub(super) async fn tidy_outbox(&mut self) {
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
    pub(super) async fn finish_turn(&mut self) {
        self.tidy_outbox().await;
        if let Err(error) = self.state.release(&self.name, self.epoch).await {
            tracing::warn!(function = %self.name, %error, "cannot release the function; another host takes over when the lease lapses");
        }
    }

    /// Renews the lease once a third of it has passed.
    pub(super) async fn renew_lease_if_due(&mut self) -> Result<(), Stop> {
        if self.lease_renewed.elapsed() < self.owner_lease / 3 {
            return Ok(());
        }
        // Counted from before the statement is sent: see `commit`.
        let asked = Instant::now();
        match self
            .state
            .renew(&self.name, self.epoch, self.owner_lease)
            .await
        {
            Ok(true) => {
                self.lease_renewed = asked;
                Ok(())
            }
            Ok(false) => Err(Stop::Fenced),
            // An outage: the commit's own epoch check still fences, but an
            // owner that cannot renew past its lease must assume another
            // host took over, and stop holding events it may no longer own.
            Err(error) if self.lease_renewed.elapsed() >= self.owner_lease => {
                tracing::warn!(function = %self.name, %error, "cannot renew the function's lease and it has lapsed; standing by");
                Err(Stop::Fenced)
            }
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot renew the function's lease");
                Ok(())
            }
        }
    }

    /// Records the consumer's ack floor (a lost consumer is recreated above
    /// it) and forgets applied sequences at or below a floor read at least
    /// [`support::PRUNE_LAG`] ago. A nats-server that crashes can come back
    /// with an older ack floor and deliver those messages again; the lag
    /// keeps their rows until that can no longer happen.
    pub(super) async fn prune_applied(&mut self, ingest: &mut Ingest) {
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
