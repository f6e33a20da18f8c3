//! `weir fn logs <name>`: a function's guest log lines: what is kept (or the
//! last `--since`), then, with `--follow`, new lines as hosts publish them.
//! With a token (`WEIR_TOKEN`) they are read through a host's API, for the
//! namespace the token is for (and `--dead-letters` shows the function's
//! dead letters instead); without one, straight from the `WEIR_LOGS` stream
//! with NATS credentials (functions of a config file, the dev stack).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::jetstream::{self, consumer};
use clap::Args;
use futures::StreamExt;
use weir_host::guest_logs::{LOG_STREAM, LogRecord, log_subject};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The function whose lines to show.
    name: String,
    /// Keep printing lines as they arrive, until Ctrl-C.
    #[arg(long, short)]
    follow: bool,
    /// Only lines from the last DURATION: `30s`, `5m`, `2h`, `1d`.
    #[arg(long, value_parser = parse_duration)]
    since: Option<Duration>,
    /// Print each line as its JSON record.
    #[arg(long)]
    json: bool,
    /// Show the function's dead letters instead (through the API).
    #[arg(long)]
    dead_letters: bool,
    /// NATS server the hosts publish to.
    #[arg(long, env = "WEIR_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The hosts' `guest_logs.subject_prefix`.
    #[arg(long, default_value = "weir.logs")]
    subject_prefix: String,
}

impl LogsArgs {
    /// The same reading, of the function's dead letters.
    pub fn showing_dead_letters(self) -> Self {
        Self {
            dead_letters: true,
            ..self
        }
    }
}

/// How long the reader waits for more lines before deciding it has read
/// everything kept (without `--follow`).
const CAUGHT_UP_WAIT: Duration = Duration::from_secs(1);

pub async fn run(api: &crate::client::Api, args: LogsArgs) -> Result<()> {
    if api.has_token() {
        return through_api(api, &args).await;
    }
    if args.dead_letters {
        bail!(
            "dead letters are read through the API: set WEIR_TOKEN (and WEIR_API_URL, WEIR_NAMESPACE)"
        );
    }
    let client = async_nats::connect(args.nats_url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", args.nats_url))?;
    let js = jetstream::new(client);
    let stream = match js.get_stream(LOG_STREAM).await {
        Ok(stream) => stream,
        Err(error) => bail!(
            "no `{LOG_STREAM}` stream at {} ({error}): no Weir host has run against this NATS server yet",
            args.nats_url
        ),
    };
    let deliver_policy = match args.since {
        Some(since) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::now_utc()
                .checked_sub(time::Duration::try_from(since).unwrap_or(time::Duration::MAX))
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        },
        None => consumer::DeliverPolicy::All,
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: log_subject(&args.subject_prefix, &args.name),
            deliver_policy,
            ..Default::default()
        })
        .await
        .context("reading the log stream")?;
    let mut messages = consumer
        .messages()
        .await
        .context("reading the log stream")?;
    let mut stdout = std::io::stdout().lock();
    let mut printed = 0u64;
    loop {
        let next = if args.follow {
            messages.next().await
        } else {
            match tokio::time::timeout(CAUGHT_UP_WAIT, messages.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        let Some(message) = next else { break };
        let message = message.context("reading the log stream")?;
        print_line(&mut stdout, &message.payload, args.json)?;
        printed += 1;
        let caught_up = message
            .info()
            .map(|info| info.pending == 0)
            .unwrap_or(false);
        if caught_up && !args.follow {
            break;
        }
    }
    if printed == 0 {
        // The likeliest reason: a function deployed through the API, whose
        // lines are kept under its namespace and read with a token.
        eprintln!(
            "no log lines kept for `{}` in {LOG_STREAM}; a function deployed through the API is read with a token: set WEIR_TOKEN (and WEIR_API_URL, WEIR_NAMESPACE)",
            args.name
        );
    }
    Ok(())
}

/// Pages of records from the API; with `--follow`, asks again after the
/// last sequence once a second.
async fn through_api(api: &crate::client::Api, args: &LogsArgs) -> Result<()> {
    let kind = if args.dead_letters {
        "dead-letters"
    } else {
        "logs"
    };
    let since_ms = args.since.map(|since| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        i64::try_from(now.saturating_sub(since).as_millis()).unwrap_or(i64::MAX)
    });
    let mut after: Option<u64> = None;
    let mut stdout = std::io::stdout().lock();
    loop {
        let page = api.records(&args.name, kind, after, since_ms).await?;
        let records = page["records"].as_array().cloned().unwrap_or_default();
        for record in &records {
            let payload = record["payload"].as_str().unwrap_or_default();
            if args.dead_letters {
                print_dead_letter(&mut stdout, record, args.json)?;
            } else {
                print_line(&mut stdout, payload.as_bytes(), args.json)?;
            }
        }
        // An empty first page says nothing of where to follow from: keep
        // asking by time until something arrives.
        if !records.is_empty() {
            after = page["last_seq"].as_u64().or(after);
        }
        if records.len() >= crate::client::RECORDS_PAGE {
            continue;
        }
        if !args.follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `seq=7 reason="…" payload`, or the API's JSON record.
fn print_dead_letter(
    out: &mut impl std::io::Write,
    record: &serde_json::Value,
    json: bool,
) -> Result<()> {
    if json {
        writeln!(out, "{record}")?;
        return Ok(out.flush()?);
    }
    let headers = record["headers"].as_object().cloned().unwrap_or_default();
    let weir: Vec<String> = headers
        .iter()
        .filter(|(name, _)| name.starts_with("Weir-"))
        .map(|(name, value)| format!("{name}={}", value.as_str().unwrap_or_default()))
        .collect();
    let payload = record["payload"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            record["payload_hex"]
                .as_str()
                .map(|hex| format!("hex:{hex}"))
        })
        .unwrap_or_default();
    writeln!(out, "seq={} {} {payload}", record["seq"], weir.join(" "))?;
    Ok(out.flush()?)
}

fn print_line(out: &mut impl std::io::Write, payload: &[u8], json: bool) -> Result<()> {
    if json {
        out.write_all(payload)?;
        writeln!(out)?;
        return Ok(out.flush()?);
    }
    match serde_json::from_slice::<LogRecord>(payload) {
        Ok(record) => writeln!(out, "{}", format_record(&record))?,
        Err(_) => writeln!(out, "{}", String::from_utf8_lossy(payload))?,
    }
    Ok(out.flush()?)
}

/// `2026-11-21T23:59:01.123Z INFO  key=card-7 seq=42 [log] message trace=…`
fn format_record(record: &LogRecord) -> String {
    let mut line = format!(
        "{} {:<5} key={} seq={} [{}] {}",
        utc_millis(record.time_ms),
        record.level.to_uppercase(),
        record.key,
        record.sequence,
        record.source,
        record.message
    );
    if let Some(trace_id) = &record.trace_id {
        line.push_str(&format!(" trace={trace_id}"));
    }
    line
}

/// Milliseconds since the epoch as an RFC 3339 UTC time.
fn utc_millis(time_ms: i64) -> String {
    let nanos = i128::from(time_ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => time_ms.to_string(),
    }
}

/// `30s`, `5m`, `2h` or `1d`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let problem = || format!("`{text}` is not a duration like 30s, 5m, 2h or 1d");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(problem)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| problem())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(problem()),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5w").is_err());
    }

    #[test]
    fn records_print_as_one_line() {
        let record = LogRecord {
            time_ms: 1_795_305_541_123,
            level: "warn".into(),
            source: "stdout".into(),
            function: "f".into(),
            version: "abc".into(),
            key: "card-7".into(),
            sequence: 42,
            trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
            message: "slow lookup".into(),
        };
        assert_eq!(
            format_record(&record),
            "2026-11-21T23:59:01.123Z WARN  key=card-7 seq=42 [stdout] slow lookup trace=0af7651916cd43dd8448eb211c80319c"
        );
    }
}
