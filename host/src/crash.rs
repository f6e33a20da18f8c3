//! Named crash points for fault-injection tests.
//!
//! The host aborts the process (as abruptly as a SIGKILL: no unwinding, no
//! flush, no graceful stop) when it reaches the point named by
//! `WEIR_CRASH_POINT` for the `WEIR_CRASH_AFTER`-th time (default: the
//! first). Without `WEIR_CRASH_POINT`, which is the default, every point is a
//! single relaxed load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where in a batch the host can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The batch ran in the sandbox; nothing is committed yet.
    AfterInvoke,
    /// State, applied sequences and outbox are committed; nothing published.
    AfterCommit,
    /// Outputs are published; no input is acked.
    AfterPublish,
}

impl CrashPoint {
    pub const ALL: [CrashPoint; 3] = [
        CrashPoint::AfterInvoke,
        CrashPoint::AfterCommit,
        CrashPoint::AfterPublish,
    ];

    /// The name `WEIR_CRASH_POINT` uses.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::AfterInvoke => "after-invoke",
            CrashPoint::AfterCommit => "after-commit",
            CrashPoint::AfterPublish => "after-publish",
        }
    }
}

struct Armed {
    point: String,
    after: u64,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let point = std::env::var("WEIR_CRASH_POINT").ok()?;
            let after = std::env::var("WEIR_CRASH_AFTER")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            tracing::warn!(
                point,
                after,
                "crash point armed: this host will abort on purpose"
            );
            Some(Armed {
                point,
                after,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Aborts the process if `point` is the armed one and its turn has come.
pub fn reached(point: CrashPoint) {
    let Some(armed) = armed() else { return };
    if armed.point == point.name() && armed.seen.fetch_add(1, Ordering::Relaxed) + 1 == armed.after
    {
        eprintln!("weir: crashing on purpose at {}", point.name());
        std::process::abort();
    }
}
