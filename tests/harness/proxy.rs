//! A TCP fault proxy for tests: sits between the host and NATS or Postgres
//! and, on command, adds latency, blackholes traffic (connections stay open,
//! bytes stop moving), refuses new connections, or resets every open one.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass bytes through.
    None,
    /// Hold every chunk this long before passing it on.
    Latency(Duration),
    /// Keep connections open but pass nothing, in either direction.
    Blackhole,
    /// Close new connections at once (existing ones are unaffected).
    Refuse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Setting {
    fault: Fault,
    /// Bumped by `reset`: connections from an older generation are closed.
    generation: u64,
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    setting: watch::Sender<Setting>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (setting, watcher) = watch::channel(Setting {
            fault: Fault::None,
            generation: 0,
        });
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let watcher = watcher.clone();
                let current = *watcher.borrow();
                if current.fault == Fault::Refuse {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up = pump(
                        client_read,
                        server_write,
                        watcher.clone(),
                        current.generation,
                    );
                    let down = pump(server_read, client_write, watcher, current.generation);
                    // Either direction ending (or a reset) closes both.
                    tokio::select! {
                        _ = up => {},
                        _ = down => {},
                    }
                });
            }
        });
        Ok(Self {
            address,
            setting,
            task,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn set(&self, fault: Fault) {
        self.setting.send_modify(|s| s.fault = fault);
    }

    /// Closes every open connection (clients see a reset or EOF).
    pub fn reset(&self) {
        self.setting.send_modify(|s| s.generation += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut setting: watch::Receiver<Setting>,
    generation: u64,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            _ = reset(&mut setting, generation) => return,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let current = *setting.borrow();
            if current.generation != generation {
                return;
            }
            match current.fault {
                Fault::Blackhole => {
                    if setting.changed().await.is_err() {
                        return;
                    }
                }
                Fault::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Fault::None | Fault::Refuse => break,
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// Resolves when the setting's generation moves past `generation`.
async fn reset(setting: &mut watch::Receiver<Setting>, generation: u64) {
    loop {
        if setting.borrow().generation != generation {
            return;
        }
        if setting.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
