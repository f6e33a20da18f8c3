//! What an upload may cost the host: each compile runs as a job in a child
//! `weir` process that is killed at its deadline, stopped at its memory
//! limit, never more of them at once than allowed, and leaves no artifact
//! unless the module was accepted; one client cannot hold every upload slot.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use weir_e2e::*;

use crate::api::{ADMIN, api_host_with, bearer, post, refusal, stalled_upload};

/// A component whose one core function has `instructions` additions: slow
/// and memory-hungry to compile as the count grows, and refused once
/// compiled (it exports no `handle`). `salt` makes distinct digests.
fn component_with_long_function(instructions: usize, salt: u32) -> Result<Vec<u8>> {
    let mut body = String::with_capacity(instructions * 60);
    for i in 0..instructions {
        let constant = (i as u32) ^ salt;
        body.push_str(&format!(
            "(local.set 0 (i32.add (local.get 0) (i32.const {constant})))\n"
        ));
    }
    Ok(wat::parse_str(format!(
        "(component (core module (func (export \"f\") (param i32) (result i32) {body} (local.get 0))))"
    ))?)
}

/// Long enough that compiling it takes the debug `weir` many times the
/// 1 s deadline of the tests below, and far more memory than their limit.
const SLOW: usize = 400_000;

/// Compile jobs alive for the host whose artifact cache is `artifacts`.
fn compile_jobs_alive(artifacts: &Path) -> Result<usize> {
    Ok(compile_job_pids(artifacts)?.len())
}

/// The process ids of the compile jobs alive for the host whose artifact
/// cache is `artifacts`.
fn compile_job_pids(artifacts: &Path) -> Result<Vec<i32>> {
    let dir = artifacts.display().to_string();
    let mut alive = Vec::new();
    for entry in std::fs::read_dir("/proc")?.filter_map(|e| e.ok()) {
        // A process may end while it is read: then it is not alive.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_job = args.iter().any(|a| *a == b"compile-module");
        let pid = entry.file_name().to_string_lossy().parse::<i32>();
        if is_job
            && args.contains(&dir.as_bytes())
            && let Ok(pid) = pid
        {
            alive.push(pid);
        }
    }
    Ok(alive)
}

/// What compiles leave in the artifact cache `dir`: artifacts and job
/// files, by path relative to it.
fn files_under(dir: &Path) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if next != dir || path.extension().is_some_and(|e| e == "cwasm") {
                files.push(path.strip_prefix(dir)?.display().to_string());
            }
        }
    }
    files.sort();
    Ok(files)
}

async fn upload(address: SocketAddr, bytes: &[u8]) -> Result<HttpResponse> {
    post(address, "/v1/modules", ADMIN, "application/wasm", bytes).await
}

/// A compile past `api.compile_timeout_secs` is killed before the upload
/// is answered, leaves no artifact (so the same bytes are compiled, and
/// refused, again), and gives its slot back.
#[sqlx::test(migrations = false)]
async fn a_compile_past_its_deadline_is_stopped_and_leaves_nothing(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.compile_timeout_secs = 1;
        api.concurrent_compiles = 1;
    })
    .await?;
    let slow = component_with_long_function(SLOW, 0)?;
    for attempt in ["the first upload", "the same bytes again"] {
        let response = upload(address, &slow).await?;
        let (status, code, message) = refusal(&response)?;
        assert_eq!(
            (status, code.as_str()),
            (422, "invalid_module"),
            "{attempt}: {message}"
        );
        assert!(
            message.contains("longer than 1 s") && message.contains("stopped"),
            "{attempt}: {message}"
        );
        assert_eq!(
            compile_jobs_alive(stack.artifacts.path())?,
            0,
            "{attempt}: the job is gone when the upload is answered"
        );
        assert_eq!(
            files_under(stack.artifacts.path())?,
            Vec::<String>::new(),
            "{attempt}: no artifact, no job file"
        );
    }
    // The one compile slot is free again.
    let passthrough = std::fs::read(component("passthrough")?)?;
    let accepted = upload(address, &passthrough).await?;
    assert_eq!(accepted.status, 201, "{accepted:?}");
    assert_eq!(files_under(stack.artifacts.path())?.len(), 1);
    host.stop().await
}

/// The compile budget is CPU time: a job that is held up (a loaded
/// machine, here stopped outright with SIGSTOP for longer than the budget)
/// is not refused for the wall-clock time it waited, only for CPU it used.
#[sqlx::test(migrations = false)]
async fn a_paused_compile_is_not_refused_for_wall_clock_time(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.compile_timeout_secs = 2;
    })
    .await?;
    // Well within the CPU budget; the job is caught while its process
    // starts.
    let module = component_with_long_function(2_000, 77)?;
    let uploading = tokio::spawn(async move { upload(address, &module).await });
    let artifacts = stack.artifacts.path().to_path_buf();
    let mut paused = None;
    while paused.is_none() && !uploading.is_finished() {
        paused = compile_job_pids(&artifacts)?.first().copied();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let pid = paused.context("caught the compile job while it ran")?;
    // SAFETY: kill sends a signal to a process this test found; nothing
    // else is touched.
    #[allow(unsafe_code)]
    let stopped = unsafe { libc::kill(pid, libc::SIGSTOP) };
    anyhow::ensure!(stopped == 0, "SIGSTOP: {}", std::io::Error::last_os_error());
    tokio::time::sleep(Duration::from_secs(3)).await;
    #[allow(unsafe_code)]
    let resumed = unsafe { libc::kill(pid, libc::SIGCONT) };
    anyhow::ensure!(resumed == 0, "SIGCONT: {}", std::io::Error::last_os_error());
    let response = uploading.await??;
    // The module compiled; it is refused for what it is (it exports no
    // `handle`), not for the time its job was held up.
    let (status, code, message) = refusal(&response)?;
    assert_eq!(
        (status, code.as_str()),
        (422, "invalid_module"),
        "{message}"
    );
    assert!(
        !message.contains("longer than") && !message.contains("progress"),
        "{message}"
    );
    host.stop().await
}

/// A compile that needs more memory than `api.compile_memory_bytes` is
/// stopped by its own limit and refused with a message that says so; the
/// host, whose memory it never was, goes on accepting uploads.
#[sqlx::test(migrations = false)]
async fn a_compile_past_its_memory_limit_is_refused(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.compile_memory_bytes = COMPILE_MEMORY;
        api.compile_timeout_secs = 600;
    })
    .await?;
    let hungry = component_with_long_function(SLOW, 1)?;
    let response = upload(address, &hungry).await?;
    let (status, code, message) = refusal(&response)?;
    assert_eq!(
        (status, code.as_str()),
        (422, "invalid_module"),
        "{message}"
    );
    assert!(
        message.contains("more than") && message.contains("MiB of memory"),
        "{message}"
    );
    assert_eq!(files_under(stack.artifacts.path())?, Vec::<String>::new());
    // An ordinary component compiles within the same limit.
    let passthrough = std::fs::read(component("passthrough")?)?;
    let accepted = upload(address, &passthrough).await?;
    assert_eq!(accepted.status, 201, "{accepted:?}");
    host.stop().await
}

/// The memory limit of the test above: enough for the example components,
/// far too little for [`SLOW`].
const COMPILE_MEMORY: u64 = 256 << 20;

/// However many uploads arrive at once, no more than
/// `api.concurrent_compiles` compile jobs run at any moment (watched from
/// `/proc` while they run), and refused modules leave no artifact.
#[sqlx::test(migrations = false)]
async fn concurrent_compiles_never_exceed_the_limit(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.concurrent_compiles = 2;
        api.concurrent_uploads = 6;
        api.concurrent_uploads_per_client = 6;
        api.compile_timeout_secs = 600;
    })
    .await?;
    let modules: Vec<Vec<u8>> = (0..5)
        .map(|salt| component_with_long_function(MEDIUM, salt + 10))
        .collect::<Result<_>>()?;
    let artifacts = stack.artifacts.path().to_path_buf();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watching = done.clone();
    let watch = tokio::spawn(async move {
        let mut most = 0;
        while !watching.load(std::sync::atomic::Ordering::Relaxed) {
            most = most.max(compile_jobs_alive(&artifacts)?);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok::<usize, anyhow::Error>(most)
    });
    let responses = futures::future::join_all(modules.iter().map(|m| upload(address, m))).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let most = watch.await??;
    assert!(
        (1..=2).contains(&most),
        "{most} compile jobs ran at once; the limit is 2"
    );
    for response in responses {
        let (status, _, message) = refusal(&response?)?;
        assert_eq!(status, 422, "{message}");
        assert!(message.contains("event-handler"), "{message}");
    }
    assert_eq!(
        files_under(stack.artifacts.path())?,
        Vec::<String>::new(),
        "refused modules keep no artifact"
    );
    host.stop().await
}

/// The per-test size that makes jobs overlap in
/// [`concurrent_compiles_never_exceed_the_limit`].
const MEDIUM: usize = 40_000;

/// One client address may have `api.concurrent_uploads_per_client`
/// uploads in flight: past that it gets 429 while another address is still
/// served.
#[sqlx::test(migrations = false)]
async fn one_client_cannot_hold_every_upload_slot(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.concurrent_uploads = 2;
        api.concurrent_uploads_per_client = 1;
    })
    .await?;
    // 127.0.0.1 sends half a body and waits.
    let slow = stalled_upload(address, 500).await?;
    let passthrough = std::fs::read(component("passthrough")?)?;
    let auth = bearer(ADMIN);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/wasm"),
    ];
    let from = |source: Ipv4Addr| {
        let passthrough = passthrough.clone();
        async move {
            http_request_from(
                Some(source),
                address,
                "POST",
                "/v1/modules",
                &headers,
                &passthrough,
            )
            .await
        }
    };
    eventually(
        Duration::from_secs(10),
        "the slow upload to hold 127.0.0.1's slot",
        || async { Ok(from(Ipv4Addr::new(127, 0, 0, 1)).await?.status == 429) },
    )
    .await?;
    let refused = from(Ipv4Addr::new(127, 0, 0, 1)).await?;
    let (status, code, message) = refusal(&refused)?;
    assert_eq!((status, code.as_str()), (429, "uploads_busy"), "{message}");
    assert!(message.contains("from this address"), "{message}");
    // Another client still has a slot.
    let served = from(Ipv4Addr::new(127, 0, 0, 2)).await?;
    assert_eq!(served.status, 201, "{served:?}");
    drop(slow);
    host.stop().await
}

/// A namespace's quota is decided once per place: two uploads at once
/// that each fit alone cannot both be stored when only one place is left
/// (both pass the early check while the other compiles), and the refused
/// one keeps no artifact.
#[sqlx::test(migrations = false)]
async fn two_uploads_at_once_cannot_both_take_the_last_place(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.module_quota_count = 1;
    })
    .await?;
    let passthrough = std::fs::read(component("passthrough")?)?;
    let counter = std::fs::read(component("counter")?)?;
    let (first, second) = tokio::join!(upload(address, &passthrough), upload(address, &counter));
    let mut statuses = [first?.status, second?.status];
    statuses.sort();
    assert_eq!(statuses, [201, 409], "exactly one is stored");
    assert_eq!(
        files_under(stack.artifacts.path())?.len(),
        1,
        "only the stored module's artifact is kept"
    );
    host.stop().await
}

/// An upload whose body stops arriving is refused with 408 after
/// `api.upload_body_timeout_secs`, and its slot is free again.
#[sqlx::test(migrations = false)]
async fn a_stalled_upload_body_is_refused_and_frees_its_slot(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.upload_body_timeout_secs = 1;
        api.concurrent_uploads = 1;
    })
    .await?;
    let mut stalled = stalled_upload(address, 100).await?;
    // The answer comes while the connection is still open: the host gave
    // up on the body, not the client on the host.
    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer[..read]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"timeout\""), "{answer}");
    // The one upload slot is free.
    let passthrough = std::fs::read(component("passthrough")?)?;
    let accepted = upload(address, &passthrough).await?;
    assert_eq!(accepted.status, 201, "{accepted:?}");
    host.stop().await
}

/// A stored module always has its artifact: one that went missing (a
/// release racing an upload of the same bytes, a wiped cache) is compiled
/// again by the next upload's job, so no host has to compile it itself.
#[sqlx::test(migrations = false)]
async fn an_upload_restores_a_missing_artifact(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |_| {}).await?;
    let passthrough = std::fs::read(component("passthrough")?)?;
    assert_eq!(upload(address, &passthrough).await?.status, 201);
    let artifacts = files_under(stack.artifacts.path())?;
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    std::fs::remove_file(stack.artifacts.path().join(&artifacts[0]))?;
    let again = upload(address, &passthrough).await?;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(files_under(stack.artifacts.path())?, artifacts);
    host.stop().await
}

/// A module's release racing a version made of it: one of the two wins
/// cleanly, every time — released and the version refused as naming an
/// unknown module (422), or the version made and the release refused as
/// the module being in use (409) — never a 5xx, and never a version left
/// naming a module that is gone.
#[sqlx::test(migrations = false)]
async fn a_release_racing_a_new_version_lets_exactly_one_win(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let streams = vec![stream("SHOP", &["shop.>"])];
    let (host, address) = api_host_with(&stack, streams, |api| {
        api.requests_per_second = 100_000;
    })
    .await?;
    let passthrough = std::fs::read(component("passthrough")?)?;
    let function = "/v1/namespaces/shop/functions/racer";
    let binding =
        serde_json::json!({"stream": "SHOP", "subject": "shop.in", "key": {"header": "k"}});
    api_call(address, ADMIN, "PUT", function, binding).await?;
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let uploaded = upload(address, &passthrough).await?;
        assert!(uploaded.status < 300, "{uploaded:?}");
        let digest = uploaded.json()?["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let release = async {
            let path = format!("/v1/modules/{digest}");
            http_request(
                address,
                "DELETE",
                &path,
                &[("Authorization", &bearer(ADMIN))],
                &[],
            )
            .await
        };
        let version = async {
            let body = serde_json::json!({"module": digest}).to_string();
            post(
                address,
                &format!("{function}/versions"),
                ADMIN,
                "application/json",
                body.as_bytes(),
            )
            .await
        };
        let (released, made) = tokio::join!(release, version);
        let (released, made) = (released?, made?);
        let outcome = (released.status, made.status);
        assert!(
            outcome == (204, 422) || outcome == (409, 201),
            "release {released:?}, version {made:?}"
        );
        *outcomes.entry(outcome).or_insert(0) += 1;
        if outcome == (409, 201) {
            // Roll the function back to no version, so the next round's
            // release can win.
            let auth = bearer(ADMIN);
            let headers = [("Authorization", auth.as_str())];
            let deleted = http_request(address, "DELETE", function, &headers, &[]).await?;
            assert_eq!(deleted.status, 204, "{deleted:?}");
            let binding =
                serde_json::json!({"stream": "SHOP", "subject": "shop.in", "key": {"header": "k"}});
            api_call(address, ADMIN, "PUT", function, binding).await?;
        }
    }
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_versions v WHERE NOT EXISTS (SELECT 1 FROM weir_modules m WHERE m.digest = v.module_digest)",
    )
    .fetch_one(&stack.pool().await?)
    .await?;
    assert_eq!(orphans, 0, "outcomes {outcomes:?}");
    host.stop().await
}

/// This process's resident memory (the host runs in it), in bytes.
fn resident_bytes() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?;
    Ok(kib * 1024)
}

/// Most the host's resident memory may grow while 50 clients each send an
/// unauthenticated 40 MiB upload at once: an upload is refused on its
/// headers, so its body costs the host at most what hyper buffers of it.
const FLOOD_RESIDENT_BOUND: u64 = 64 << 20;

/// Fifty anonymous clients stream 40 MiB module bodies at once (2 GB in
/// all, which a host that read bodies before checking tokens would buffer):
/// each is refused with 401, and the host's resident memory, sampled from
/// `/proc` throughout, stays within [`FLOOD_RESIDENT_BOUND`] of where it
/// started.
#[sqlx::test(migrations = false)]
async fn an_anonymous_upload_flood_costs_the_host_no_body_memory(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start(&db).await?;
    let (host, address) = api_host_with(&stack, vec![], |api| {
        api.requests_per_second_per_client = 100_000;
    })
    .await?;
    let before = resident_bytes()?;
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (peak, sampling) = (peak.clone(), sampling.clone());
        async move {
            while !sampling.is_cancelled() {
                if let Ok(now) = resident_bytes() {
                    peak.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let body_bytes: u64 = 40 << 20;
    // One chunk, sent again and again: the clients hold no bodies of their own.
    let chunk = std::sync::Arc::new(vec![0u8; 1 << 20]);
    let clients = (0..50).map(|_| {
        let chunk = chunk.clone();
        async move {
            let stream = tokio::net::TcpStream::connect(address).await?;
            let (mut reader, mut writer) = stream.into_split();
            let head = format!(
                "POST /v1/modules HTTP/1.1\r\nHost: weir\r\nContent-Type: application/wasm\r\nContent-Length: {body_bytes}\r\n\r\n"
            );
            writer.write_all(head.as_bytes()).await?;
            // The body goes out while the answer is awaited: the host may
            // answer and close at once, or leave the body unread.
            let writing = async {
                for _ in 0..(body_bytes >> 20) {
                    if writer.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                std::future::pending::<()>().await
            };
            let mut answer = vec![0u8; 1024];
            let reading = tokio::time::timeout(Duration::from_secs(30), reader.read(&mut answer));
            let read = tokio::select! {
                read = reading => read?,
                () = writing => unreachable!("writing never ends"),
            };
            // A host that closes with the body unread may reset the
            // connection before its answer is read: refused all the same.
            anyhow::Ok(match read {
                Ok(read) => String::from_utf8_lossy(&answer[..read]).to_string(),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                    String::new()
                }
                Err(error) => return Err(error.into()),
            })
        }
    });
    let answers = futures::future::join_all(clients).await;
    sampling.cancel();
    sampler.await?;
    for answer in answers {
        let answer = answer?;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 401"),
            "{answer}"
        );
    }
    let grew = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    assert!(
        grew < FLOOD_RESIDENT_BOUND,
        "resident memory grew by {} MiB during the flood",
        grew >> 20
    );
    host.check()?;
    host.stop().await
}
