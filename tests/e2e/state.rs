//! The state store against real Postgres: a commit is visible to a cold
//! store, applied sequences are found until pruned, and the outbox keeps a
//! batch's outputs until cleared.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Result;
use bytes::Bytes;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_host::output::OutputRecord;
use weir_host::state::{BatchCommit, StateStore};

#[sqlx::test(migrations = false)]
async fn commit_dedup_prune_and_outbox(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    let pool = sqlx::PgPool::connect_with(db).await?;
    let store = StateStore::open(pool.clone(), 1 << 20).await?;
    let function: Arc<str> = Arc::from("f");

    let mut view = store.view(&function, &["a", "b"]).await?;
    view.begin_event("a");
    view.set("n".into(), Bytes::from_static(b"1"));
    view.finish_event(true);
    view.begin_event("b");
    view.set("n".into(), Bytes::from_static(b"2"));
    view.finish_event(true);
    let output = OutputRecord {
        subject: "out".into(),
        payload: Bytes::from_static(b"x"),
        headers: vec![("h".into(), "v".into())],
        msg_id: "weir:f:10:0".into(),
    };
    let commit = BatchCommit {
        deltas: view.into_deltas(),
        applied: vec![1, 2, 3, 10],
        outbox: vec![output.clone()],
    };
    store.commit(&function, &commit).await?;
    // The same commit again (an ambiguous failure, retried) changes nothing.
    store.commit(&function, &commit).await?;

    // A second store has a cold cache: it reads what was committed.
    let cold = StateStore::open(pool, 1 << 20).await?;
    let mut view = cold.view(&function, &["a", "b", "c"]).await?;
    view.begin_event("a");
    assert_eq!(view.get("n"), Some(Bytes::from_static(b"1")));
    view.begin_event("b");
    assert_eq!(view.get("n"), Some(Bytes::from_static(b"2")));
    view.begin_event("c");
    assert_eq!(view.get("n"), None);

    assert_eq!(cold.highest_applied(&function).await?, 10);
    assert_eq!(
        cold.already_applied(&function, &[1, 2, 3, 4, 10, 11])
            .await?,
        HashSet::from([1, 2, 3, 10])
    );
    assert_eq!(cold.prune_applied(&function, 3).await?, 3);
    assert_eq!(
        cold.already_applied(&function, &[1, 2, 3, 10]).await?,
        HashSet::from([10])
    );
    // Pruning forgets sequences, not progress.
    assert_eq!(cold.highest_applied(&function).await?, 10);

    assert_eq!(cold.outbox(&function).await?, vec![output]);
    cold.clear_outbox(&function).await?;
    assert!(cold.outbox(&function).await?.is_empty());
    // Another function's state and progress are its own.
    assert_eq!(cold.highest_applied("g").await?, 0);
    assert!(cold.already_applied("g", &[1, 10]).await?.is_empty());
    Ok(())
}
