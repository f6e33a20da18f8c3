//! The state store against real Postgres: a commit is visible to a cold
//! store, applied sequences are found until pruned, the outbox keeps each
//! batch's outputs until that batch is deleted, ownership is fenced by
//! epoch, and data Postgres refuses is a permanent error.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_host::output::OutputRecord;
use weir_host::state::{BatchCommit, StateError, StateStore};

const LEASE: Duration = Duration::from_secs(30);

fn output(id: &str) -> OutputRecord {
    OutputRecord {
        subject: "out".into(),
        payload: Bytes::from_static(b"x"),
        headers: vec![("h".into(), "v".into())],
        msg_id: id.into(),
    }
}

#[sqlx::test(migrations = false)]
async fn commit_dedup_prune_and_outbox(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    let pool = sqlx::PgPool::connect_with(db).await?;
    let store = StateStore::open(pool.clone(), 1 << 20).await?;
    let function: Arc<str> = Arc::from("f");
    let epoch = store
        .claim(&function, "a", LEASE)
        .await?
        .expect("free")
        .epoch;
    let (progress, created) = store.progress(&function, "inc1").await?;
    assert!(created && progress.incarnation == "inc1" && progress.highest_applied == 0);

    let mut view = store.view(&function, epoch, &["a", "b"]).await?;
    view.begin_event("a");
    view.set("n".into(), Bytes::from_static(b"1"));
    view.finish_event(true);
    view.begin_event("b");
    view.set("n".into(), Bytes::from_static(b"2"));
    view.finish_event(true);
    let commit = BatchCommit {
        epoch,
        batch_id: 1,
        through_seq: 10,
        published: vec![],
        deltas: view.into_deltas(),
        applied: vec![1, 2, 3, 10],
        outbox: vec![output("weir:f:10:0")],
    };
    store.commit(&function, &commit, LEASE).await?;
    // The same commit again (an ambiguous failure, retried) changes nothing.
    store.commit(&function, &commit, LEASE).await?;
    // A second batch; the first one's publish is acknowledged.
    let second = BatchCommit {
        epoch,
        batch_id: 11,
        through_seq: 11,
        published: vec![1],
        applied: vec![11],
        outbox: vec![output("weir:f:11:0")],
        ..BatchCommit::default()
    };
    store.commit(&function, &second, LEASE).await?;

    // A second store has a cold cache: it reads what was committed.
    let cold = StateStore::open(pool, 1 << 20).await?;
    let mut view = cold.view(&function, epoch, &["a", "b", "c"]).await?;
    view.begin_event("a");
    assert_eq!(view.get("n"), Some(Bytes::from_static(b"1")));
    view.begin_event("b");
    assert_eq!(view.get("n"), Some(Bytes::from_static(b"2")));
    view.begin_event("c");
    assert_eq!(view.get("n"), None);

    let (progress, created) = cold.progress(&function, "other").await?;
    assert!(!created, "the row exists");
    assert_eq!(
        (progress.highest_applied, progress.incarnation.as_str()),
        (11, "inc1")
    );
    assert_eq!(
        cold.already_applied(&function, &[1, 2, 3, 4, 10, 11, 12])
            .await?,
        HashSet::from([1, 2, 3, 10, 11])
    );
    assert_eq!(cold.prune_applied(&function, 3).await?, 3);
    assert_eq!(
        cold.already_applied(&function, &[1, 2, 3, 10]).await?,
        HashSet::from([10])
    );
    cold.record_resume(&function, 3).await?;
    let (progress, _) = cold.progress(&function, "other").await?;
    assert_eq!((progress.highest_applied, progress.resume_seq), (11, 3));

    // Only the batch whose publish was not acknowledged is left.
    let outbox = cold.outbox(&function).await?;
    assert_eq!(outbox.len(), 1);
    assert_eq!((outbox[0].batch, outbox[0].through_seq), (11, 11));
    assert_eq!(outbox[0].records, vec![output("weir:f:11:0")]);
    cold.delete_outbox(&function, epoch, &[11]).await?;
    assert!(cold.outbox(&function).await?.is_empty());
    // Another function's state and progress are its own.
    assert!(cold.already_applied("g", &[1, 10]).await?.is_empty());
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn a_fenced_owner_commits_nothing(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    let pool = sqlx::PgPool::connect_with(db).await?;
    let store = StateStore::open(pool, 1 << 20).await?;
    let function: Arc<str> = Arc::from("f");
    let short = Duration::from_millis(200);
    let first = store.claim(&function, "a", short).await?.expect("free");
    assert!(first.clean, "no owner before");
    let first = first.epoch;
    assert_eq!(
        store.claim(&function, "b", short).await?,
        None,
        "a's lease is live"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = store
        .claim(&function, "b", LEASE)
        .await?
        .expect("a's lease lapsed");
    assert!(!second.clean, "a stopped renewing without releasing");
    let second = second.epoch;
    assert!(second > first);

    // The new owner has a batch in its outbox, not yet published.
    let pending = BatchCommit {
        epoch: second,
        batch_id: 4,
        through_seq: 4,
        applied: vec![4],
        outbox: vec![output("weir:f:4:0")],
        ..BatchCommit::default()
    };
    store.commit(&function, &pending, LEASE).await?;

    // The first owner wakes and commits, claiming batch 4 published:
    // refused, nothing written, nothing deleted.
    let mut view = store.view(&function, first, &["k"]).await?;
    view.begin_event("k");
    view.set("n".into(), Bytes::from_static(b"stale"));
    view.finish_event(true);
    let stale = BatchCommit {
        epoch: first,
        batch_id: 5,
        through_seq: 5,
        deltas: view.into_deltas(),
        published: vec![4],
        applied: vec![5],
        outbox: vec![output("weir:f:5:0")],
    };
    let refused = store.commit(&function, &stale, LEASE).await;
    assert!(
        matches!(refused, Err(StateError::Fenced { .. })),
        "{refused:?}"
    );
    assert!(!store.renew(&function, first, LEASE).await?);
    assert!(store.renew(&function, second, LEASE).await?);
    assert!(store.already_applied(&function, &[5]).await?.is_empty());
    let outbox = store.outbox(&function).await?;
    assert_eq!(outbox.len(), 1, "only the new owner's batch");
    assert_eq!(outbox[0].records, vec![output("weir:f:4:0")]);
    let view = store.view(&function, second, &["k"]).await?;
    assert!(view.into_deltas().is_empty());

    // A graceful stop releases at once: the next claim needs no wait, and
    // knows the hand-over was clean.
    store.release(&function, second).await?;
    let third = store.claim(&function, "c", LEASE).await?.expect("released");
    assert!(third.clean);
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn data_postgres_refuses_is_permanent(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let pool = sqlx::PgPool::connect_with(db).await?;
    let store = StateStore::open(pool, 1 << 20).await?;
    let function: Arc<str> = Arc::from("f");
    let epoch = store
        .claim(&function, "a", LEASE)
        .await?
        .expect("free")
        .epoch;
    let mut view = store
        .view(&function, epoch, &["bad\u{0}key"])
        .await
        .map_or_else(
            |error| {
                assert!(error.is_permanent(), "{error}");
                None
            },
            Some,
        );
    if let Some(view) = view.as_mut() {
        view.begin_event("bad\u{0}key");
        view.set("n".into(), Bytes::from_static(b"1"));
        view.finish_event(true);
    }
    let commit = BatchCommit {
        epoch,
        batch_id: 1,
        through_seq: 1,
        deltas: view.map(|v| v.into_deltas()).unwrap_or_default(),
        applied: vec![1],
        outbox: vec![OutputRecord {
            subject: "out\u{0}".into(),
            ..output("weir:f:1:0")
        }],
        ..BatchCommit::default()
    };
    let error = store
        .commit(&function, &commit, LEASE)
        .await
        .expect_err("U+0000 in text");
    assert!(error.is_permanent(), "{error}");
    // A fence is not permanent in that sense: it is its own outcome.
    assert!(
        !StateError::Fenced {
            function: "f".into(),
            epoch: 1
        }
        .is_permanent()
    );
    Ok(())
}
