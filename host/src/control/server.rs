//! Serves the API's router over HTTP/1.1, connection by connection, with
//! what `axum::serve` does not bound: a client has `header_read_timeout` to
//! send its request headers (a connection trickling a byte a second is
//! closed, not kept forever), and the peer address reaches the handlers for
//! the per-client limit. On shutdown, connections finish the request in
//! hand (within 10 s) and close.

use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

/// Serves `app` on `listener` until `shutdown`, then waits for the open
/// connections to finish their requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(%error, "API: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut request| {
                request.extensions_mut().insert(ConnectInfo(peer));
                app.clone().call(request)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    // A request in hand may finish; a client sending its
                    // body a byte a minute may not hold the host's stop.
                    match tokio::time::timeout(DRAIN_GRACE, connection).await {
                        Ok(served) => served,
                        Err(_) => return,
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "API connection ended");
            }
        });
    }
    // New clients are refused at once rather than left in the backlog.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// How long a connection may take to finish its request once the API
/// stops.
const DRAIN_GRACE: Duration = Duration::from_secs(10);
