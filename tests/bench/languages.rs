//! `fraud-velocity` written in Rust, TypeScript, Python, C and C++, measured side by
//! side in one run: the component's size, its compile time (what an upload's
//! compile job does), the time to instantiate it from the compiled
//! artifact, and the fraud workload's events/s and host CPU-µs per event
//! (rounds interleaved, each on a fresh stream of the same backlog).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use async_nats::jetstream;
use weir_e2e::*;
use weir_host::config::Limits;
use weir_host::sandbox::{FunctionInstance, InstanceSettings, Sandbox, SandboxConfig, precompile};

use super::{FraudRun, median, process_cpu, weir_fraud_with};

/// Compiles measured per language, and instantiations.
const COMPILES: usize = 3;
const INSTANTIATIONS: usize = 20;

struct Language {
    label: &'static str,
    module: PathBuf,
}

fn languages() -> Result<Vec<Language>> {
    Ok(vec![
        Language {
            label: "rust",
            module: component("fraud-velocity")?,
        },
        Language {
            label: "typescript",
            module: language_component("ts", "fraud-velocity")?,
        },
        Language {
            label: "python",
            module: language_component("python", "fraud-velocity")?,
        },
        Language {
            label: "c",
            module: language_component("c", "fraud-velocity")?,
        },
        Language {
            label: "c++",
            module: language_component("cpp", "fraud-velocity")?,
        },
    ])
}

/// Wall-clock and CPU seconds (this process, all threads) of the median
/// compile of `bytes`, as a compile job would do it.
fn compile_cost(bytes: &[u8], scratch: &std::path::Path) -> Result<(f64, f64)> {
    let config = SandboxConfig {
        artifact_dir: scratch.to_path_buf(),
        ..SandboxConfig::default()
    };
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..COMPILES {
        let cpu_before = process_cpu();
        let started = Instant::now();
        precompile(&config, bytes)?;
        wall.push(started.elapsed().as_secs_f64());
        cpu.push(process_cpu().saturating_sub(cpu_before).as_secs_f64());
    }
    Ok((median(&wall), median(&cpu)))
}

/// Median µs to instantiate `module` from its cached artifact (the artifact
/// is made, and cached in `artifacts`, first).
fn instantiate_cost(module: &std::path::Path, artifacts: &std::path::Path) -> Result<f64> {
    let sandbox = Sandbox::new(&SandboxConfig {
        artifact_dir: artifacts.to_path_buf(),
        ..SandboxConfig::default()
    })?;
    let code = sandbox.load_file(module)?;
    let settings = InstanceSettings {
        function: "fraud".into(),
        allowed_outputs: vec!["alerts.velocity".to_string()].into(),
        deadline: std::time::Duration::from_secs(10),
        limits: Limits::default(),
        max_record_bytes: 1 << 20,
        breaker: Default::default(),
    };
    let mut times = Vec::new();
    for _ in 0..INSTANTIATIONS {
        let started = Instant::now();
        let instance = FunctionInstance::new(&code, &settings)?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
        drop(instance);
    }
    Ok(median(&times))
}

pub async fn run(
    nats: &NatsServer,
    js: &jetstream::Context,
    url: &str,
    pool: &sqlx::PgPool,
    artifacts: &std::path::Path,
    events: usize,
    rounds: usize,
) -> Result<()> {
    let languages = languages()?;
    // The schema, which the first host would make; the runs below poll it
    // from their start.
    weir_host::state::StateStore::open(pool.clone(), 1 << 20).await?;
    let scratch = tempdir::TempDir::new("weir-bench-compiles")?;
    println!("fraud-velocity per language: {events} events per run, {rounds} rounds");
    for language in &languages {
        let bytes = std::fs::read(&language.module)?;
        let (wall, cpu) = compile_cost(&bytes, scratch.path())?;
        // Also caches the artifact where the hosts below find it, so their
        // runs do not include a compile.
        let instantiate = instantiate_cost(&language.module, artifacts)?;
        println!(
            "{:<10} component {:>8.1} KB | compile {wall:>6.2} s wall, {cpu:>6.2} CPU-s (median of {COMPILES}) | instantiate {instantiate:>8.0} µs (median of {INSTANTIATIONS})",
            language.label,
            bytes.len() as f64 / 1e3,
        );
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); languages.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); languages.len()];
    for round in 0..rounds {
        for (i, language) in languages.iter().enumerate() {
            let tag = format!("{}-{round}", language.label);
            let fraud = FraudRun {
                tag: &tag,
                module: language.module.clone(),
                events,
            };
            let (rate, us) = weir_fraud_with(nats, js, url, pool, artifacts, fraud).await?;
            println!(
                "round {}: {:<10} {rate:>8.0} ev/s ({us:.1} CPU-µs/ev)",
                round + 1,
                language.label
            );
            rates[i].push(rate);
            cpu[i].push(us);
        }
    }
    let rust_rate = median(&rates[0]);
    let rust_cpu = median(&cpu[0]);
    for (i, language) in languages.iter().enumerate() {
        println!(
            "median {:<10} {:>8.0} ev/s ({:.2}x rust), {:>6.1} CPU-µs/ev ({:.2}x rust)",
            language.label,
            median(&rates[i]),
            median(&rates[i]) / rust_rate,
            median(&cpu[i]),
            median(&cpu[i]) / rust_cpu
        );
    }
    Ok(())
}
