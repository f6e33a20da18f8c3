//! The example functions written in TypeScript, Python, C and C++, each deployed
//! through the API the way a user would (upload, binding, version), must
//! give exactly what the Rust ones give: `fraud-velocity`'s per-card counts
//! and alerts, and `enrich`'s outputs and dead letters, each exactly once.
//! The components come from `cargo xtask build-guests`.

use anyhow::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;

use crate::enrich::{assert_enriched_exactly, orders, wait_for_enriched};
use crate::fraud::{
    Tx, assert_alerts_exact, drained_of, expected, stored_counts_of, transactions, wait_for_alerts,
};

const ADMIN: &str = "weir_bootstrap_for_language_tests";

/// Uploads `language`'s build of example `example` and deploys it as
/// function `name` of namespace `shop` with `binding`.
async fn deploy(
    address: std::net::SocketAddr,
    language: &str,
    example: &str,
    name: &str,
    binding: serde_json::Value,
) -> Result<()> {
    let digest = upload_file(address, ADMIN, &language_component(language, example)?).await?;
    let function = format!("/v1/namespaces/shop/functions/{name}");
    api_call(address, ADMIN, "PUT", &function, binding).await?;
    let body = serde_json::json!({"module": digest});
    api_call(
        address,
        ADMIN,
        "POST",
        &format!("{function}/versions"),
        body,
    )
    .await?;
    Ok(())
}

async fn fraud_velocity_is_exact(db: &PgConnectOptions, language: &str) -> Result<()> {
    let stack = Stack::start(db).await?;
    let streams = vec![
        stream("CARDS", &["cards.>"]),
        stream("ALERTS", &["alerts.>"]),
    ];
    let (host, address) = api_host(&stack, streams, ADMIN).await?;
    let name = format!("fraud-{language}");
    let binding = serde_json::json!({
        "stream": "CARDS", "subject": "cards.tx",
        "key": {"json_pointer": "/card"}, "event_time": {"json_pointer": "/ts"},
        "outputs": ["alerts.velocity"], "batch_size": 500,
    });
    deploy(address, language, "fraud-velocity", &name, binding).await?;

    let txs = transactions(500, 40, 7);
    let sequences = publish_all(&stack.js, "cards.tx", txs.iter().map(Tx::payload)).await?;
    let expected = expected(&txs, &sequences);
    assert!(expected.alerts.len() > 100, "{}", expected.alerts.len());
    let pool = stack.pool().await?;
    let runs_as = format!("shop_{name}");
    drained_of(&pool, &runs_as, txs.len()).await?;
    wait_for_alerts(&stack, expected.alerts.len()).await?;
    host.stop().await?;

    assert_eq!(stored_counts_of(&pool, &runs_as).await?, expected.counts);
    assert_alerts_exact(&stack, &expected).await?;
    assert_eq!(
        stream_len(&stack.js, weir_host::serve::DEAD_LETTER_STREAM).await?,
        0
    );
    Ok(())
}

async fn enrich_is_exact(db: &PgConnectOptions, language: &str) -> Result<()> {
    let stack = Stack::start(db).await?;
    let streams = vec![
        stream("ORDERS", &["orders.created"]),
        stream("ENRICHED", &["orders.enriched"]),
    ];
    let (host, address) = api_host(&stack, streams, ADMIN).await?;
    let name = format!("enrich-{language}");
    let binding = serde_json::json!({
        "stream": "ORDERS", "subject": "orders.created",
        "key": {"json_pointer": "/order_id"},
        "outputs": ["orders.enriched"], "batch_size": 100,
    });
    deploy(address, language, "enrich", &name, binding).await?;

    let orders = orders();
    let sequences = publish_all(&stack.js, "orders.created", orders.inputs.clone()).await?;
    wait_for_enriched(&stack, &orders).await?;
    host.stop().await?;
    let dead_letters = format!("weir.dlq.shop.{name}");
    assert_enriched_exactly(
        &stack,
        &orders,
        &sequences,
        &dead_letters,
        &format!("shop_{name}"),
    )
    .await
}

#[sqlx::test(migrations = false)]
async fn fraud_velocity_in_typescript_is_exact(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    fraud_velocity_is_exact(&db, "ts").await
}

#[sqlx::test(migrations = false)]
async fn fraud_velocity_in_python_is_exact(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    fraud_velocity_is_exact(&db, "python").await
}

#[sqlx::test(migrations = false)]
async fn enrich_in_typescript_is_exact_and_dead_letters_bad_orders(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    enrich_is_exact(&db, "ts").await
}

#[sqlx::test(migrations = false)]
async fn enrich_in_python_is_exact_and_dead_letters_bad_orders(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    enrich_is_exact(&db, "python").await
}

#[sqlx::test(migrations = false)]
async fn fraud_velocity_in_c_is_exact(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    fraud_velocity_is_exact(&db, "c").await
}

#[sqlx::test(migrations = false)]
async fn enrich_in_c_is_exact_and_dead_letters_bad_orders(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    enrich_is_exact(&db, "c").await
}

#[sqlx::test(migrations = false)]
async fn fraud_velocity_in_cpp_is_exact(_pool: PgPoolOptions, db: PgConnectOptions) -> Result<()> {
    fraud_velocity_is_exact(&db, "cpp").await
}

#[sqlx::test(migrations = false)]
async fn enrich_in_cpp_is_exact_and_dead_letters_bad_orders(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    enrich_is_exact(&db, "cpp").await
}
