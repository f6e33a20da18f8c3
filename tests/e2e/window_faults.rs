//! Event-time windows under the faults of the data path: an owner paused
//! mid-stream, with a commit in flight, while a standby takes over (and
//! fenced when it wakes). The deployment faults are in `window_deploys`,
//! which shares the checks here.
//!
//! Results are judged by the batch reference of `windows.rs`: every
//! window's final result equals it, each (window, firing number) was
//! published under one message id with one content, no firing number is
//! skipped, nothing was too late and the dead letters are the rejected
//! events, each once.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::process::{HostProcess, log_tail, signal};
use weir_e2e::*;
use weir_host::windows::{WindowKind, WindowSettings};

use crate::protocol::logged;
use crate::windows::{
    Contents, Ev, events, final_results, reference, settings, wait_for_reference, window_config,
    with_closer,
};

/// The windows that the first events of the stream (`prefix`) close by
/// themselves: what must have fired, and with what, once they are applied.
pub(crate) fn closed_by(window: &WindowSettings, prefix: &[Ev]) -> Contents {
    let (mut contents, _) = reference(window, prefix, true);
    let highest = prefix
        .iter()
        .filter(|e| e.value != 13)
        .map(|e| e.ts)
        .max()
        .unwrap_or(i64::MIN);
    let watermark = highest.saturating_sub(window.out_of_orderness_ms);
    contents.retain(|(_, _, end), _| *end <= watermark);
    contents
}

/// Waits until every window of `expected` has fired with exactly its
/// contents (checked as `final_results` checks every firing).
pub(crate) async fn wait_for_windows(stack: &Stack, expected: &Contents, what: &str) -> Result<()> {
    eventually(Duration::from_secs(90), what, || async {
        let (got, _) = final_results(stack).await?;
        Ok(expected
            .iter()
            .all(|(window, ids)| got.get(window) == Some(ids)))
    })
    .await
}

/// The ids of the events on the late subject, in arrival order.
pub(crate) async fn late_ids(stack: &Stack) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for message in read_stream(&stack.js, "WINDOWS").await? {
        if message.subject.as_str() == "windows.late" {
            let input: serde_json::Value = serde_json::from_slice(&message.payload)?;
            ids.push(input["id"].as_u64().context("a late event's id")?);
        }
    }
    Ok(ids)
}

/// [`wait_for_reference`], failing with the late events and host logs.
pub(crate) async fn wait_exact(stack: &Stack, expected: &Contents, dirs: &[&Path]) -> Result<()> {
    let Err(error) = wait_for_reference(stack, expected).await else {
        return Ok(());
    };
    let logs: Vec<String> = dirs.iter().map(|dir| log_tail(dir, 40)).collect();
    Err(error.context(format!(
        "events on the late subject: {:?}\n{}",
        late_ids(stack).await?,
        logs.join("\n")
    )))
}

/// Nothing went to the late subject (every event was within the bound),
/// and the dead letters are the rejected events (value 13), each once.
pub(crate) async fn only_rejects_dead_lettered(stack: &Stack, inputs: &[Ev]) -> Result<()> {
    assert_eq!(
        late_ids(stack).await?,
        Vec::<u64>::new(),
        "no event was too late"
    );
    let rejected: Vec<u64> = inputs
        .iter()
        .filter(|e| e.value == 13)
        .map(|e| e.id)
        .collect();
    assert!(!rejected.is_empty(), "the inputs have rejected events");
    let dead_ids = || async {
        let mut ids = Vec::new();
        for message in read_stream(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await? {
            let input: serde_json::Value = serde_json::from_slice(&message.payload)
                .context("a dead letter that is not an input event")?;
            ids.push(input["id"].as_u64().context("a dead letter's id")?);
        }
        ids.sort_unstable();
        anyhow::Ok(ids)
    };
    eventually(Duration::from_secs(30), "the dead letters", || async {
        Ok(dead_ids().await?.len() >= rejected.len())
    })
    .await?;
    assert_eq!(
        dead_ids().await?,
        rejected,
        "each rejected event dead-lettered once, nothing else"
    );
    Ok(())
}

/// Publishes `inputs` to `events.in` in chunks of `chunk`, pausing between.
pub(crate) fn produce(
    js: &async_nats::jetstream::Context,
    inputs: &[Ev],
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Result<()>> {
    let js = js.clone();
    let inputs = inputs.to_vec();
    tokio::spawn(async move {
        for part in inputs.chunks(chunk) {
            publish_all(&js, "events.in", part.iter().map(Ev::payload)).await?;
            tokio::time::sleep(pause).await;
        }
        anyhow::Ok(())
    })
}

pub(crate) async fn ensure_window_streams(stack: &Stack) -> Result<()> {
    for (name, subjects) in [("EVENTS", "events.>"), ("WINDOWS", "windows.>")] {
        ensure_stream(&stack.js, name, &[subjects]).await?;
    }
    Ok(())
}

/// Stops the host `pid` with the commit of a batch in flight: the test
/// holds the owner row of `win`, so that the host's next commit statement
/// waits for it; once one does, the host is stopped and the row let go.
/// The statement then commits (and extends the lease) while the host,
/// stopped, cannot see it end: a pause between a commit and its answer.
async fn pause_mid_commit(stack: &Stack, pid: u32) -> Result<()> {
    let pool = stack.pool().await?;
    let mut holding = pool.begin().await?;
    sqlx::query("SELECT 1 FROM weir_owners WHERE function_name = 'win' FOR UPDATE")
        .execute(&mut *holding)
        .await?;
    let commit_waits = || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND wait_event_type = 'Lock' AND query LIKE '%WITH fence AS%'",
        )
        .fetch_one(&pool)
        .await?;
        anyhow::Ok(waiting > 0)
    };
    eventually(Duration::from_secs(30), "a commit waiting", commit_waits).await?;
    signal(pid, "STOP")?;
    holding.rollback().await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_paused_window_owner_is_fenced_and_its_windows_stay_exact(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (a_dir, b_dir) = (
        tempdir::TempDir::new("weir-window-owner-a")?,
        tempdir::TempDir::new("weir-window-owner-b")?,
    );
    // Windows of 200 ms and ~10 ms of event time per event: a batch of 20
    // closes about one window per key, so firings are nearly always in hand.
    let window = settings(WindowKind::Tumbling { size_ms: 200 }, 200, 0);
    let config = window_config(&stack, "window-sum", window.clone())?;
    ensure_window_streams(&stack).await?;
    let inputs = with_closer(events(1_500, 200, 0, 23));
    let (expected, _) = reference(&window, &inputs, true);
    let a = HostProcess::start(&config, a_dir.path(), &[])?;
    wait_for_consumer(&stack.js, "EVENTS", "weir-win").await?;
    // Some 15 s of publishing: the stream still flows when A is paused.
    let producer = produce(&stack.js, &inputs, 15, Duration::from_millis(100));
    eventually(Duration::from_secs(60), "A's first firings", || async {
        Ok(!final_results(&stack).await?.0.is_empty())
    })
    .await?;
    let b = HostProcess::start(&config, b_dir.path(), &[])?;
    let long = Duration::from_secs(60);
    logged(b_dir.path(), "another host owns the function", long).await?;

    // A stops dead mid-stream, windows open, with the commit of a batch
    // (and its firings) in flight; B takes over once A's lease lapses and
    // goes on firing.
    pause_mid_commit(&stack, a.pid()).await?;
    anyhow::ensure!(!producer.is_finished(), "the stream flows at the pause");
    logged(b_dir.path(), "took over the function", long).await?;
    let at_takeover = stream_len(&stack.js, "WINDOWS").await?;
    eventually(long, "B's firings", || async {
        Ok(stream_len(&stack.js, "WINDOWS").await? > at_takeover + 10)
    })
    .await?;
    // A wakes up beside B: it must find itself fenced, and commit nothing.
    signal(a.pid(), "CONT")?;
    logged(a_dir.path(), "lost ownership of the function", long).await?;
    producer.await??;
    wait_exact(&stack, &expected, &[a_dir.path(), b_dir.path()]).await?;
    only_rejects_dead_lettered(&stack, &inputs).await?;
    drop((a, b));
    Ok(())
}
