//! Canary judgement: a worker adds its lanes' calls to the shared version
//! statistics and rolls its canary back when it fails more than the
//! rollout allows compared with the stable version.

use std::time::Duration;

use super::FunctionWorker;

/// How often a worker adds its calls to the shared version statistics.
const STATS_EVERY: Duration = Duration::from_secs(1);

/// The deployment a worker runs, so it can roll a failing canary back and
/// report each version's calls.
#[derive(Debug, Clone)]
pub struct DeploymentLink {
    pub store: crate::control::store::ControlStore,
    pub namespace: String,
    pub name: String,
    pub rollout: crate::control::store::Rollout,
}

impl FunctionWorker {
    /// Adds the lanes' calls to the shared statistics (at most every
    /// [`STATS_EVERY`]) and rolls the canary back when it fails more than the
    /// rollout allows compared with the stable version.
    pub(super) async fn watch_canary(&mut self) {
        let Some(link) = self.deployment.clone() else {
            return;
        };
        if self.last_stats.elapsed() >= STATS_EVERY {
            self.last_stats = std::time::Instant::now();
            for lane in &mut self.lanes {
                let (Some(number), delta) = (lane.number, lane.unreported) else {
                    continue;
                };
                if delta.0 == 0 {
                    continue;
                }
                match link
                    .store
                    .add_stats(&link.namespace, &link.name, number, delta)
                    .await
                {
                    Ok(()) => lane.unreported = (0, 0, 0),
                    Err(error) => tracing::debug!(%error, "version statistics not recorded"),
                }
            }
        }
        let (Some(stable), Some(canary)) = (self.lanes.first(), self.lanes.get(1)) else {
            return;
        };
        if self.rolled_back || canary.seen.0 < u64::from(link.rollout.rollback_min_calls) {
            return;
        }
        let rate = |(calls, failures): (u64, u64)| {
            if calls == 0 {
                0.0
            } else {
                failures as f64 * 100.0 / calls as f64
            }
        };
        let (canary_rate, stable_rate) = (rate(canary.seen), rate(stable.seen));
        if canary_rate <= stable_rate + link.rollout.rollback_margin {
            return;
        }
        let reason = format!(
            "version {} failed {canary_rate:.1} % of {} calls; version {} failed {stable_rate:.1} %; the margin is {} points",
            canary.number.unwrap_or_default(),
            canary.seen.0,
            stable.number.unwrap_or_default(),
            link.rollout.rollback_margin
        );
        tracing::warn!(function = %self.name, %reason, "rolling the canary back");
        let expected = (
            stable.number.unwrap_or_default(),
            canary.number.unwrap_or_default(),
        );
        match link
            .store
            .rollback_if(&link.namespace, &link.name, expected, &reason)
            .await
        {
            // Not ours to roll back any more: the rollout has changed.
            Ok(_) | Err(crate::control::store::StoreError::NoCanary(_)) => self.rolled_back = true,
            Err(error) => {
                tracing::warn!(function = %self.name, %error, "cannot roll the canary back yet")
            }
        }
    }
}
