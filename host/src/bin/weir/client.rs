//! The `weir fn` and `weir rollout` client commands: calls to the `/v1` API
//! of a running host, printed as tables (or `--json` for scripts). The API
//! URL, token and namespace come from flags or `WEIR_API_URL`,
//! `WEIR_TOKEN` and `WEIR_NAMESPACE`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// Records asked for per call by `fn logs` through the API.
pub const RECORDS_PAGE: usize = 1_000;

/// Where and as whom the client calls.
#[derive(Debug, Args, Clone)]
pub struct Api {
    /// Base URL of a host's API.
    #[arg(
        long,
        env = "WEIR_API_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    api_url: String,
    /// Bearer token.
    #[arg(long, env = "WEIR_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Namespace of the functions.
    #[arg(
        long,
        short,
        env = "WEIR_NAMESPACE",
        default_value = "default",
        global = true
    )]
    namespace: String,
    /// Print the API's JSON instead of a table (errors too, on stderr).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds one call may take before the CLI gives up (an upload, which
    /// also waits for its compile: ten times this).
    #[arg(
        long,
        env = "WEIR_API_TIMEOUT_SECS",
        default_value_t = 30,
        global = true
    )]
    timeout_secs: u64,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Serve with `--stable`, and `--canary` for `--weight` % of the keys.
    /// Without a canary it is an instant switch (blue/green).
    Set {
        name: String,
        #[arg(long)]
        stable: u32,
        #[arg(long, requires = "weight")]
        canary: Option<u32>,
        /// Percent of keys (by a stable hash) the canary takes.
        #[arg(long, requires = "canary")]
        weight: Option<u8>,
    },
    /// Make the canary the stable version.
    Promote { name: String },
    /// Send every key back to the stable version.
    Rollback { name: String },
    /// Which versions serve, the versions there are, and their calls.
    Status { name: String },
}

/// `weir fn deploy`: upload, bind, version, serve.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The component file (`wasm32-wasip2`).
    module: PathBuf,
    /// Function name: lowercase letters, digits and `-`.
    #[arg(long)]
    name: String,
    /// JetStream stream to consume.
    #[arg(long)]
    stream: String,
    /// Subject filter within the stream.
    #[arg(long)]
    subject: String,
    /// Where the key comes from: `json:/pointer`, `header:Name` or
    /// `token:N` (subject token).
    #[arg(long)]
    key: String,
    /// A subject the function may publish to; repeat for more.
    #[arg(long = "output")]
    outputs: Vec<String>,
    /// Events fetched and committed together.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Make the version but keep the serving one (switch later with
    /// `weir rollout set`).
    #[arg(long)]
    hold: bool,
    /// Reprocess the stream from this sequence when the version starts
    /// serving; the function's state is cleared first.
    #[arg(long)]
    replay_from_sequence: Option<u64>,
}

/// How long connecting to the API may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A call the API answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiRefusal {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Api {
    /// Whether output (errors included) should be JSON.
    pub fn wants_json(&self) -> bool {
        self.json
    }

    /// A client that gives up on an unreachable host after
    /// [`CONNECT_TIMEOUT`] and on a mute one after `--timeout-secs`.
    fn client(&self) -> Result<reqwest::Client> {
        Ok(reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(std::time::Duration::from_secs(self.timeout_secs))
            .build()?)
    }

    /// How long an upload may take: its body, then its compile on the host.
    fn upload_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout_secs.saturating_mul(10))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_url.trim_end_matches('/'))
    }

    fn function_path(&self, name: &str) -> String {
        format!("/v1/namespaces/{}/functions/{name}", self.namespace)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request
            .send()
            .await
            .with_context(|| format!("calling the Weir API at {}", self.api_url))?;
        let status = response.status();
        let text = response.text().await?;
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if !status.is_success() {
            return Err(ApiRefusal {
                status: status.as_u16(),
                code: body["error"].as_str().unwrap_or("unknown").to_string(),
                message: body["message"].as_str().unwrap_or("no message").to_string(),
            }
            .into());
        }
        Ok(body)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.client()?.get(self.url(path))).await
    }

    /// Whether calls carry a token: `fn logs` then reads through the API.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// One page of a function's `kind` (`logs` or `dead-letters`) records:
    /// after `after_seq`, or from `since_ms`, or all that is kept.
    pub async fn records(
        &self,
        name: &str,
        kind: &str,
        after_seq: Option<u64>,
        since_ms: Option<i64>,
    ) -> Result<Value> {
        let mut path = format!("{}/{kind}?limit={RECORDS_PAGE}", self.function_path(name));
        match (after_seq, since_ms) {
            (Some(after), _) => path.push_str(&format!("&after_seq={after}")),
            (None, Some(since)) => path.push_str(&format!("&since_ms={since}")),
            (None, None) => {}
        }
        self.get(&path).await
    }

    fn print(&self, body: &Value, table: impl FnOnce(&Value) -> String) {
        if self.json {
            println!("{body}");
        } else {
            print!("{}", table(body));
        }
    }
}

/// The binding's `key` from `json:/p`, `header:H` or `token:N`.
fn key_source(text: &str) -> Result<Value> {
    match text.split_once(':') {
        Some(("json", pointer)) => Ok(json!({"json_pointer": pointer})),
        Some(("header", name)) => Ok(json!({"header": name})),
        Some(("token", index)) => Ok(json!({"subject_token": index.parse::<usize>()?})),
        _ => bail!("--key must be json:/pointer, header:Name or token:N, not `{text}`"),
    }
}

pub async fn deploy(api: &Api, args: DeployArgs) -> Result<()> {
    let bytes = std::fs::read(&args.module)
        .with_context(|| format!("reading {}", args.module.display()))?;
    let client = api.client()?;
    let module = api
        .send(
            client
                .post(api.url("/v1/modules"))
                .header("content-type", "application/wasm")
                // Sending and compiling a large component take longer.
                .timeout(api.upload_timeout())
                .body(bytes),
        )
        .await
        .context("uploading the module")?;
    let digest = module["digest"].as_str().context("the module's digest")?;
    let path = api.function_path(&args.name);
    // Settings made earlier through the API (limits, retry, breaker, ...)
    // stay; the flags replace what they name.
    let mut binding = match api.get(&path).await {
        Ok(existing) => existing["binding"].clone(),
        Err(_) => json!({}),
    };
    binding["stream"] = json!(args.stream);
    binding["subject"] = json!(args.subject);
    binding["key"] = key_source(&args.key)?;
    binding["outputs"] = json!(args.outputs);
    if let Some(batch_size) = args.batch_size {
        binding["batch_size"] = json!(batch_size);
    }
    api.send(client.put(api.url(&path)).json(&binding))
        .await
        .context("binding the function")?;
    let mut request = json!({"module": digest});
    if let Some(sequence) = args.replay_from_sequence {
        request["replay_from"] = json!({"sequence": sequence});
    }
    let version = api
        .send(
            client
                .post(api.url(&format!("{path}/versions")))
                .json(&request),
        )
        .await
        .context("making the version")?;
    let number = version["version"].as_u64().context("the version number")?;
    let mut serving = !args.hold;
    if !args.hold {
        api.send(
            client
                .put(api.url(&format!("{path}/rollout")))
                .json(&json!({"stable": number})),
        )
        .await
        .context("switching to the new version")?;
    } else {
        // A function's first version serves at once, held or not.
        serving = api.get(&path).await?["stable"].as_u64() == Some(number);
    }
    let summary = json!({
        "namespace": api.namespace, "name": args.name, "version": number,
        "module": digest, "serving": serving,
    });
    api.print(&summary, |_| {
        format!(
            "deployed {}/{} version {number} (module {}){}\n",
            api.namespace,
            args.name,
            &digest[..12.min(digest.len())],
            if !serving {
                ", not serving yet"
            } else {
                ", serving"
            }
        )
    });
    Ok(())
}

pub async fn list(api: &Api) -> Result<()> {
    let body = api
        .get(&format!("/v1/namespaces/{}/functions", api.namespace))
        .await?;
    api.print(&body, |body| {
        let mut out = format!("{:<32} {}\n", "NAME", "SERVING");
        for function in body["functions"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{:<32} {}\n",
                function["name"].as_str().unwrap_or(""),
                version_text(&function["stable"])
            ));
        }
        out
    });
    Ok(())
}

pub async fn show(api: &Api, name: &str) -> Result<()> {
    let body = api.get(&api.function_path(name)).await?;
    api.print(&body, |body| {
        let binding = &body["binding"];
        let mut out = format!(
            "{}/{}\n  stream   {}\n  subject  {}\n  key      {}\n  outputs  {}\n  serving  {}\n",
            body["namespace"].as_str().unwrap_or(""),
            body["name"].as_str().unwrap_or(""),
            binding["stream"].as_str().unwrap_or(""),
            binding["subject"].as_str().unwrap_or(""),
            binding["key"],
            binding["outputs"],
            version_text(&body["stable"]),
        );
        out.push_str(&versions_table(body));
        out
    });
    Ok(())
}

pub async fn remove(api: &Api, name: &str) -> Result<()> {
    let client = api.client()?;
    api.send(client.delete(api.url(&api.function_path(name))))
        .await?;
    let body = json!({"namespace": api.namespace, "name": name, "removed": true});
    api.print(&body, |_| format!("removed {}/{name}\n", api.namespace));
    Ok(())
}

pub async fn rollout(api: &Api, command: RolloutCommand) -> Result<()> {
    match command {
        RolloutCommand::Set {
            name,
            stable,
            canary,
            weight,
        } => {
            let client = api.client()?;
            let path = format!("{}/rollout", api.function_path(&name));
            let request =
                json!({"stable": stable, "canary": canary, "weight": weight.unwrap_or(0)});
            let body = api.send(client.put(api.url(&path)).json(&request)).await?;
            api.print(&body, |_| match canary {
                Some(canary) => format!(
                    "{}/{name} serves version {stable}, and version {canary} for {}% of keys\n",
                    api.namespace,
                    weight.unwrap_or(0)
                ),
                None => format!("{}/{name} now serves version {stable}\n", api.namespace),
            });
        }
        RolloutCommand::Promote { name } => end_canary(api, &name, "promote").await?,
        RolloutCommand::Rollback { name } => end_canary(api, &name, "rollback").await?,
        RolloutCommand::Status { name } => {
            let body = api.get(&api.function_path(&name)).await?;
            api.print(&body, |body| {
                let mut out = format!(
                    "{}/{name} serves version {}",
                    api.namespace,
                    version_text(&body["stable"]),
                );
                if let Some(canary) = body["rollout"]["canary"].as_u64() {
                    out.push_str(&format!(
                        ", and version {canary} for {}% of keys",
                        body["rollout"]["weight"]
                    ));
                }
                out.push('\n');
                if let Some(reason) = body["rolled_back"].as_str() {
                    out.push_str(&format!("  last canary rolled back: {reason}\n"));
                }
                out.push_str(&versions_table(body));
                out
            });
        }
    }
    Ok(())
}

/// `promote` or `rollback` the canary of `name`.
async fn end_canary(api: &Api, name: &str, action: &str) -> Result<()> {
    let client = api.client()?;
    let path = format!("{}/rollout/{action}", api.function_path(name));
    let body = api.send(client.post(api.url(&path))).await?;
    api.print(&body, |body| {
        format!(
            "{}/{name} now serves version {}\n",
            api.namespace,
            version_text(&body["stable"])
        )
    });
    Ok(())
}

fn version_text(version: &Value) -> String {
    version
        .as_u64()
        .map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn versions_table(function: &Value) -> String {
    let stable = function["stable"].as_u64();
    let canary = function["rollout"]["canary"].as_u64();
    let stats = function["stats"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "  {:<8} {:<14} {:<8} {:>8} {:>8} {:>10}\n",
        "VERSION", "MODULE", "SERVING", "CALLS", "FAILED", "MEAN µs"
    );
    for version in function["versions"].as_array().into_iter().flatten() {
        let number = version["version"].as_u64();
        let module = version["module"].as_str().unwrap_or("");
        let serving = if number == stable {
            "stable"
        } else if number.is_some() && number == canary {
            "canary"
        } else {
            "-"
        };
        let stat = stats.iter().find(|s| s["version"].as_u64() == number);
        let field = |name: &str| stat.and_then(|s| s[name].as_i64()).unwrap_or(0);
        out.push_str(&format!(
            "  {:<8} {:<14} {:<8} {:>8} {:>8} {:>10}\n",
            version_text(&version["version"]),
            &module[..12.min(module.len())],
            serving,
            field("calls"),
            field("failures"),
            field("mean_micros")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_sources() {
        assert_eq!(
            key_source("json:/card").ok(),
            Some(json!({"json_pointer": "/card"}))
        );
        assert_eq!(
            key_source("header:Key").ok(),
            Some(json!({"header": "Key"}))
        );
        assert_eq!(
            key_source("token:1").ok(),
            Some(json!({"subject_token": 1}))
        );
        assert!(key_source("card").is_err());
        assert!(key_source("token:x").is_err());
    }
}
