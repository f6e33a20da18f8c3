//! Start-up while a service is down: the host waits, says what it waits for
//! on `/readyz` (and in its log), and processes everything once the service
//! is back.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::proxy::{Fault, FaultProxy};
use weir_e2e::*;

use crate::faults::{counter_config, create_streams, inputs, produce, verify};

async fn readiness(address: SocketAddr) -> Result<(u16, String)> {
    http_get(address, "/readyz").await
}

async fn waits_for(
    service: &str,
    stack: &Stack,
    config: weir_host::config::HostConfig,
    proxy: &FaultProxy,
) -> Result<()> {
    let health: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let config = weir_host::config::HostConfig {
        health_listen: Some(health),
        ..config
    };
    proxy.set(Fault::Refuse);
    let host = RunningHost::start(config);
    eventually(
        Duration::from_secs(30),
        "readiness to name the missing service",
        || async {
            Ok(match readiness(health).await {
                Ok((503, body)) => body.contains(service),
                _ => false,
            })
        },
    )
    .await?;
    assert_eq!(
        http_get(health, "/healthz").await?.0,
        200,
        "alive while waiting"
    );
    // Still waiting a moment later: nothing gives up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    host.check()?;
    assert_eq!(readiness(health).await?.0, 503);

    create_streams(stack).await?;
    let inputs = inputs(20, 50);
    produce(stack.nats.url(), inputs.clone()).await?;
    proxy.set(Fault::None);
    eventually(
        Duration::from_secs(30),
        "the host to become ready",
        || async {
            Ok(readiness(health)
                .await
                .is_ok_and(|(status, _)| status == 200))
        },
    )
    .await?;
    verify(stack, &inputs).await?;
    host.stop().await
}

#[sqlx::test(migrations = false)]
async fn the_host_waits_for_nats_and_says_so(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let proxy = FaultProxy::start(stack.nats.address()).await?;
    let config = counter_config(
        &stack,
        format!("nats://{}", proxy.address()),
        stack.database_url.clone(),
    )?;
    waits_for("nats", &stack, config, &proxy).await
}

#[sqlx::test(migrations = false)]
async fn the_host_waits_for_postgres_and_says_so(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let proxy = FaultProxy::start(([127, 0, 0, 1], db.get_port()).into()).await?;
    let database_url = stack.database_url_via(&db, proxy.address().port());
    let config = counter_config(&stack, stack.nats.url(), database_url)?;
    waits_for("postgres", &stack, config, &proxy).await
}
