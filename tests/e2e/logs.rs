//! Guest logs: `log` calls, stdout and stderr reach `weir fn logs` (the real
//! binary), with `--follow` showing new lines live, and a flooding guest is
//! cut to the per-invocation and per-function bounds, with the drops counted.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use weir_e2e::process::weir_binary;
use weir_e2e::*;
use weir_host::config::{FunctionSpec, KeySource};
use weir_host::guest_logs::LogRecord;

fn misbehave(name: &str, subject: &str) -> Result<FunctionSpec> {
    Ok(FunctionSpec {
        outputs: vec!["fixture.out".into()],
        ..FunctionSpec::new(
            name,
            component("misbehave")?,
            "CHATTY",
            subject,
            KeySource::SubjectToken(2),
        )
    })
}

async fn weir_fn_logs(nats_url: &str, args: &[&str]) -> Result<String> {
    Ok(weir_fn_logs_with_notes(nats_url, args).await?.0)
}

/// What `weir fn logs` printed, and what it noted on stderr.
async fn weir_fn_logs_with_notes(nats_url: &str, args: &[&str]) -> Result<(String, String)> {
    let output = tokio::process::Command::new(weir_binary()?)
        .args(["fn", "logs"])
        .args(args)
        .args(["--nats-url", nats_url])
        .env_remove("WEIR_TOKEN")
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "weir fn logs failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

#[sqlx::test(migrations = false)]
async fn weir_fn_logs_shows_log_calls_stdout_and_stderr(
    _pool: PgPoolOptions,
    db: PgConnectOptions,
) -> Result<()> {
    let stack = Stack::start(&db).await?;
    let health: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut config = stack.config(
        vec![
            stream("CHATTY", &["chatty.>"]),
            stream("FIXTURE_OUT", &["fixture.out"]),
        ],
        vec![
            misbehave("talker", "chatty.talk.*")?,
            misbehave("flooder", "chatty.flood.*")?,
        ],
    );
    config.guest_logs.lines_per_second = 30;
    config.health_listen = Some(health);
    let host = stack.host(config).await?;
    let url = stack.nats.url();

    for key in ["a", "b", "c"] {
        stack
            .js
            .publish(format!("chatty.talk.{key}"), r#"{"do":"chatty"}"#.into())
            .await?
            .await?;
    }
    eventually(Duration::from_secs(60), "three outputs", || async {
        Ok(stream_len(&stack.js, "FIXTURE_OUT").await? == 3)
    })
    .await?;
    // Core NATS publishes: give the server a moment to store the last line.
    eventually(Duration::from_secs(10), "nine log lines", || async {
        Ok(stream_len(&stack.js, weir_host::guest_logs::LOG_STREAM).await? == 9)
    })
    .await?;

    let shown = weir_fn_logs(&url, &["talker"]).await?;
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines.len(), 9, "{shown}");
    for (i, key) in ["a", "b", "c"].iter().enumerate() {
        let sequence = i + 1;
        let of_event: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains(&format!("key={key} seq={sequence} ")))
            .collect();
        assert_eq!(of_event.len(), 3, "{shown}");
        assert!(
            of_event[0].contains(&format!(
                "INFO  key={key} seq={sequence} [log] chatty event {sequence}"
            )),
            "{shown}"
        );
        assert!(
            of_event[1].contains(&format!(
                "INFO  key={key} seq={sequence} [stdout] stdout of event {sequence}"
            )),
            "{shown}"
        );
        assert!(
            of_event[2].contains(&format!(
                "WARN  key={key} seq={sequence} [stderr] stderr of event {sequence}"
            )),
            "{shown}"
        );
    }
    // Nothing kept: nothing printed, and a note on where a deployed
    // function's lines are.
    let (shown, note) = weir_fn_logs_with_notes(&url, &["nobody"]).await?;
    assert_eq!(shown, "");
    assert!(note.contains("set WEIR_TOKEN"), "{note}");

    // --follow: a line written after the reader started shows up.
    let mut follower = tokio::process::Command::new(weir_binary()?)
        .args([
            "fn", "logs", "talker", "--follow", "--json", "--since", "1h",
        ])
        .args(["--nats-url", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut followed = BufReader::new(follower.stdout.take().context("stdout")?).lines();
    let mut seen = Vec::new();
    while seen.len() < 9 {
        let line = tokio::time::timeout(Duration::from_secs(30), followed.next_line())
            .await
            .context("the kept lines")??
            .context("follower ended")?;
        seen.push(serde_json::from_str::<LogRecord>(&line)?);
    }
    stack
        .js
        .publish("chatty.talk.d", r#"{"do":"chatty"}"#.into())
        .await?
        .await?;
    let line = tokio::time::timeout(Duration::from_secs(30), followed.next_line())
        .await
        .context("a live line")??
        .context("follower ended")?;
    let live: LogRecord = serde_json::from_str(&line)?;
    assert_eq!(
        (
            live.function.as_str(),
            live.key.as_str(),
            live.sequence,
            live.level.as_str(),
            live.source.as_str(),
            live.message.as_str()
        ),
        ("talker", "d", 4, "info", "log", "chatty event 4")
    );
    assert_eq!(live.version.len(), 12);
    follower.kill().await?;

    // A flood: 1,000 lines in one call. 100 survive the per-invocation
    // bound; the function's bucket (burst 2 × 30) lets 60 of those out.
    stack
        .js
        .publish("chatty.flood.x", r#"{"do":"flood"}"#.into())
        .await?
        .await?;
    eventually(Duration::from_secs(60), "the flood handled", || async {
        Ok(stream_len(&stack.js, "FIXTURE_OUT").await? == 5)
    })
    .await?;
    let (status, body) = http_get(health, "/metrics").await?;
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))?;
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get("function") == Some("flooder"))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("weir_guest_log_lines_total"), Some(60.0));
    assert_eq!(value("weir_guest_log_lines_dropped_total"), Some(940.0));
    eventually(
        Duration::from_secs(10),
        "the flood's lines stored",
        || async {
            let shown = weir_fn_logs(&url, &["flooder"]).await?;
            Ok(shown.lines().filter(|l| l.contains("flood line")).count() == 60)
        },
    )
    .await?;
    host.stop().await
}
