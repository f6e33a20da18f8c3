//! Restarts: a host stopped gracefully mid-stream and started again loses
//! nothing and applies nothing twice; state written before a restart is read
//! back from Postgres by a host with a cold cache.

use std::time::Duration;

use anyhow::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;

use crate::fraud::{
    Tx, assert_alerts_exact, drained, expected, fraud_host, stored_alerts, stored_counts,
    transactions, wait_for_alerts,
};

#[sqlx::test(migrations = false)]
async fn graceful_stop_mid_stream_then_restart_is_exact(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let pool = stack.pool().await?;
    let host = stack.host(fraud_host(&stack, 100)?).await?;

    // The producer is still publishing when the host stops, so the stop
    // is mid-stream by construction.
    let txs = transactions(200, 50, 11);
    let (first, second) = txs.split_at(txs.len() / 2);
    let mut sequences = publish_all(&stack.js, "cards.tx", first.iter().map(Tx::payload)).await?;
    eventually(Duration::from_secs(60), "some progress", || async {
        Ok(stored_counts(&pool).await?.values().sum::<u64>() > 0)
    })
    .await?;
    let producer = {
        let js = stack.js.clone();
        let second: Vec<Tx> = second.to_vec();
        tokio::spawn(
            async move { publish_all(&js, "cards.tx", second.iter().map(Tx::payload)).await },
        )
    };
    host.stop().await?;
    let applied_at_stop = stored_counts(&pool).await?.values().sum::<u64>();
    sequences.extend(producer.await??);
    assert!(
        (applied_at_stop as usize) < txs.len(),
        "the host must stop before the end of the stream"
    );

    let host = stack.host(fraud_host(&stack, 100)?).await?;
    drained(&pool, txs.len()).await?;
    let expected = expected(&txs, &sequences);
    wait_for_alerts(&stack, expected.alerts.len()).await?;
    host.stop().await?;

    assert_eq!(
        stored_counts(&pool).await?,
        expected.counts,
        "nothing lost, nothing twice"
    );
    assert_alerts_exact(&stack, &expected).await?;
    Ok(())
}

#[sqlx::test(migrations = false)]
async fn state_survives_a_restart_with_a_cold_cache(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let pool = stack.pool().await?;
    let tx = |ts: i64| Tx {
        card: "card-x".into(),
        ts,
        amount_cents: 500,
    };

    // Five transactions inside one minute: at the threshold, no alert yet.
    let host = stack.host(fraud_host(&stack, 10)?).await?;
    let before: Vec<Tx> = (0..5).map(|i| tx(1_000_000 + i * 1_000)).collect();
    let mut sequences = publish_all(&stack.js, "cards.tx", before.iter().map(Tx::payload)).await?;
    drained(&pool, 5).await?;
    host.stop().await?;
    assert_eq!(stored_alerts(&stack.js).await?, vec![]);

    // A new host has an empty cache: the sixth transaction in the same
    // minute alerts only if the first five are read back from Postgres.
    let host = stack.host(fraud_host(&stack, 10)?).await?;
    let after = [tx(1_010_000)];
    sequences.extend(publish_all(&stack.js, "cards.tx", after.iter().map(Tx::payload)).await?);
    drained(&pool, 6).await?;
    wait_for_alerts(&stack, 1).await?;
    host.stop().await?;

    assert_eq!(
        stored_alerts(&stack.js).await?,
        vec![("card-x".to_string(), sequences[5], 6)]
    );
    assert_eq!(stored_counts(&pool).await?.get("card-x"), Some(&6));
    Ok(())
}
