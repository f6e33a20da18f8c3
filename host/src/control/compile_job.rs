//! Compiles an uploaded component in a child `weir` process: the tracked
//! job behind `POST /v1/modules`.
//!
//! A compile inside the host could not be stopped at its deadline (a
//! wasmtime compile has no cancellation point) and its memory was the
//! host's. In a child process it has a memory limit of its own
//! (`RLIMIT_DATA`) and a budget of CPU time (`RLIMIT_CPU`, all its threads
//! together: the timeout times the cores, what the job could use in that
//! time on an idle machine), and it holds its slot until it is gone.
//!
//! The budget is CPU time, not wall-clock time, so that a compile on a
//! loaded machine, which gets a share of the cores and takes longer for it,
//! is not refused for the load: what it costs is the same. A wall-clock
//! guard of [`WALL_CLOCK_FACTOR`] times the timeout stops a job that makes
//! no progress at all. Its artifact is written beside the cache under a job name and
//! moved into the cache only when the job succeeded, so a killed or failed
//! compile leaves nothing behind to be loaded later.
//!
//! Parent and child speak through the command line, the files and the
//! exit status: 0 compiled, [`EXIT_INVALID`] the bytes are not a valid
//! component (stderr says why), [`EXIT_OUT_OF_MEMORY`] or an abort on an
//! allocation the limit refused, anything else a failed job.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::sandbox::{self, Sandbox, SandboxConfig};

/// The hidden `weir` subcommand a job runs.
pub const SUBCOMMAND: &str = "compile-module";

/// The child's exit code for bytes that are not a valid component
/// (`EX_DATAERR`; not 2, which is clap's for a command line it refuses, so
/// a host and a compile program that disagree on flags is the host's
/// failure, not the tenant's).
pub const EXIT_INVALID: i32 = 65;

/// The child's exit code for a compile its memory limit stopped, where the
/// refused allocation came back as an error rather than an abort.
pub const EXIT_OUT_OF_MEMORY: i32 = 66;

/// A job is stopped after this many times its CPU budget in wall-clock
/// time, however little CPU it used: a job that cannot run at all.
pub const WALL_CLOCK_FACTOR: u32 = 10;

/// The most of the child's stderr kept for the error message.
const STDERR_LIMIT: u64 = 16 * 1024;

/// Why a compile job produced no artifact.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("{0}")]
    Invalid(String),
    #[error("compiling the component took longer than {} s (used up its {cpu_secs} CPU-seconds); it was stopped", .timeout.as_secs())]
    Timeout { timeout: Duration, cpu_secs: u64 },
    /// Not the module's fault: the machine did not run the job.
    #[error("compiling the component made too little progress in {} s on a busy host; it was stopped", .0.as_secs())]
    Stalled(Duration),
    #[error("compiling the component needed more than {} MiB of memory; it was stopped", .0 / (1024 * 1024))]
    OutOfMemory(u64),
    #[error("{0}")]
    Host(String),
}

/// The jobs of one host: at most `slots` at once, each bounded in CPU time
/// and memory.
#[derive(Debug, Clone)]
pub struct Compiler {
    /// The `weir` binary that runs the jobs.
    program: PathBuf,
    memory_limit: u64,
    /// CPU time a job may use.
    timeout: Duration,
    slots: Arc<Semaphore>,
}

impl Compiler {
    pub fn new(program: PathBuf, concurrent: usize, timeout: Duration, memory_limit: u64) -> Self {
        Self {
            program,
            memory_limit,
            timeout,
            slots: Arc::new(Semaphore::new(concurrent.max(1))),
        }
    }

    /// Compiles `bytes` (of `digest`) into `sandbox`'s artifact cache. The
    /// job runs as a task of its own: if the caller goes away (a client
    /// that disconnects, a host that stops), the job still ends at its
    /// deadline and holds its slot until its process is reaped.
    pub async fn compile(
        &self,
        sandbox: &Arc<Sandbox>,
        digest: &str,
        bytes: bytes::Bytes,
    ) -> Result<(), CompileError> {
        let (compiler, sandbox, digest) = (self.clone(), sandbox.clone(), digest.to_string());
        tokio::spawn(async move {
            let _slot = compiler
                .slots
                .acquire()
                .await
                .map_err(|e| CompileError::Host(e.to_string()))?;
            let job = JobFiles::new(sandbox.config(), &digest)?;
            tokio::fs::write(&job.input, &bytes)
                .await
                .map_err(|e| host_error("writing the job's input", &job.input, e))?;
            compiler.run(sandbox.config(), &job).await?;
            let artifact = sandbox.artifact_path(&digest);
            tokio::fs::rename(&job.output, &artifact)
                .await
                .map_err(|e| host_error("moving the artifact into the cache", &artifact, e))
        })
        .await
        .map_err(|e| CompileError::Host(format!("the compile task failed: {e}")))?
    }

    /// Runs the child until it exits or its deadline passes; the slot is
    /// held (by the caller) until the child is gone either way.
    async fn run(&self, config: &SandboxConfig, job: &JobFiles) -> Result<(), CompileError> {
        let mut child = tokio::process::Command::new(&self.program)
            .arg(SUBCOMMAND)
            .arg("--input")
            .arg(&job.input)
            .arg("--output")
            .arg(&job.output)
            .arg("--memory-limit")
            .arg(self.memory_limit.to_string())
            .arg("--cpu-limit-secs")
            .arg(self.cpu_limit_secs().to_string())
            .args(JobArgs::from(config).to_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| host_error("starting a compile job", &self.program, e))?;
        let stderr = child.stderr.take();
        let read_stderr = async move {
            let mut kept = Vec::new();
            if let Some(mut stderr) = stderr {
                let _ = (&mut stderr)
                    .take(STDERR_LIMIT)
                    .read_to_end(&mut kept)
                    .await;
                // The rest is drained, not cut off: a child whose stderr
                // closed would fail on its next line for that reason alone.
                let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            }
            String::from_utf8_lossy(&kept).into_owned()
        };
        let wall_clock = self.timeout.saturating_mul(WALL_CLOCK_FACTOR);
        let waited = tokio::time::timeout(wall_clock, async {
            let (status, text) = tokio::join!(child.wait(), read_stderr);
            (status, text)
        })
        .await;
        let Ok((status, stderr)) = waited else {
            // Killed and reaped before the slot is given back.
            let _ = child.kill().await;
            return Err(CompileError::Stalled(wall_clock));
        };
        let status =
            status.map_err(|e| host_error("waiting for a compile job", &self.program, e))?;
        if status.success() {
            return Ok(());
        }
        // RLIMIT_CPU sends SIGXCPU at the budget (the job does not catch
        // it). Another SIGKILL is not ours to explain (the kernel's OOM
        // killer, an operator): a host error, below, not the module's.
        {
            use std::os::unix::process::ExitStatusExt;
            if status.signal() == Some(libc::SIGXCPU) {
                return Err(CompileError::Timeout {
                    timeout: self.timeout,
                    cpu_secs: self.cpu_limit_secs(),
                });
            }
        }
        let stderr = stderr.trim().to_string();
        if status.code() == Some(EXIT_INVALID) {
            return Err(CompileError::Invalid(stderr));
        }
        // Rust's allocation-failure handler aborts with this message.
        if status.code() == Some(EXIT_OUT_OF_MEMORY) || stderr.contains("memory allocation of") {
            return Err(CompileError::OutOfMemory(self.memory_limit));
        }
        Err(CompileError::Host(format!(
            "the compile job failed ({status}): {stderr}"
        )))
    }
}

impl Compiler {
    /// CPU seconds a job may use, all its threads together: the timeout on
    /// every core (Cranelift compiles a component's functions in parallel).
    fn cpu_limit_secs(&self) -> u64 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        self.timeout.as_secs().max(1).saturating_mul(cores)
    }
}

fn host_error(what: &str, path: &Path, error: std::io::Error) -> CompileError {
    CompileError::Host(format!("{what} ({}): {error}", path.display()))
}

/// A job's input and output files, removed when the job is over (the output
/// is gone already when it was moved into the cache).
struct JobFiles {
    input: PathBuf,
    output: PathBuf,
}

impl JobFiles {
    fn new(config: &SandboxConfig, digest: &str) -> Result<Self, CompileError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = config.artifact_dir.join("jobs");
        std::fs::create_dir_all(&dir)
            .map_err(|e| host_error("creating the job directory", &dir, e))?;
        let name = format!(
            "{digest}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Ok(Self {
            input: dir.join(format!("{name}.wasm")),
            output: dir.join(format!("{name}.cwasm")),
        })
    }
}

impl Drop for JobFiles {
    fn drop(&mut self) {
        for path in [&self.input, &self.output] {
            if let Err(error) = std::fs::remove_file(path)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %path.display(), %error, "could not remove a compile job's file");
            }
        }
    }
}

/// The sandbox settings a job's engine is made with, as its command line
/// carries them.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct JobArgs {
    #[arg(long)]
    artifact_dir: PathBuf,
    #[arg(long)]
    max_instances: u32,
    #[arg(long)]
    max_memory_bytes: usize,
    #[arg(long)]
    max_wasm_stack_bytes: usize,
    #[arg(long, action = clap::ArgAction::Set)]
    epoch_interruption: bool,
}

impl From<&SandboxConfig> for JobArgs {
    fn from(config: &SandboxConfig) -> Self {
        Self {
            artifact_dir: config.artifact_dir.clone(),
            max_instances: config.max_instances,
            max_memory_bytes: config.max_memory_bytes,
            max_wasm_stack_bytes: config.max_wasm_stack_bytes,
            epoch_interruption: config.epoch_interruption,
        }
    }
}

impl JobArgs {
    fn to_args(&self) -> Vec<String> {
        vec![
            "--artifact-dir".into(),
            self.artifact_dir.display().to_string(),
            "--max-instances".into(),
            self.max_instances.to_string(),
            "--max-memory-bytes".into(),
            self.max_memory_bytes.to_string(),
            "--max-wasm-stack-bytes".into(),
            self.max_wasm_stack_bytes.to_string(),
            "--epoch-interruption".into(),
            self.epoch_interruption.to_string(),
        ]
    }

    fn sandbox_config(&self) -> SandboxConfig {
        SandboxConfig {
            artifact_dir: self.artifact_dir.clone(),
            max_instances: self.max_instances,
            max_memory_bytes: self.max_memory_bytes,
            max_wasm_stack_bytes: self.max_wasm_stack_bytes,
            epoch_interruption: self.epoch_interruption,
        }
    }
}

/// The child's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    /// Bytes of data memory the job may use (`RLIMIT_DATA`).
    #[arg(long)]
    memory_limit: u64,
    /// CPU seconds the job may use (`RLIMIT_CPU`).
    #[arg(long)]
    cpu_limit_secs: u64,
    #[command(flatten)]
    sandbox: JobArgs,
}

/// The child's side: limits its own memory, compiles, writes the artifact.
/// Returns the process exit code.
pub fn run_child(args: &ChildArgs) -> i32 {
    // No core file when the CPU limit ends the job: it would be as large
    // as the compile's memory.
    let limited = limit(libc::RLIMIT_DATA, args.memory_limit, args.memory_limit)
        .and_then(|()| limit(libc::RLIMIT_CORE, 0, 0))
        .and_then(|()| {
            let seconds = args.cpu_limit_secs;
            limit(libc::RLIMIT_CPU, seconds, seconds.saturating_add(1))
        });
    if let Err(error) = limited {
        eprintln!("cannot limit the compile job: {error}");
        return 1;
    }
    let bytes = match std::fs::read(&args.input) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("reading {}: {error}", args.input.display());
            return 1;
        }
    };
    match sandbox::precompile(&args.sandbox.sandbox_config(), &bytes) {
        Ok(artifact) => match std::fs::write(&args.output, artifact) {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("writing {}: {error}", args.output.display());
                1
            }
        },
        Err(sandbox::SandboxError::Invalid { reason, .. }) => {
            eprintln!("{reason}");
            // An mmap the limit refused comes back as ENOMEM.
            if reason.contains("Cannot allocate memory") {
                EXIT_OUT_OF_MEMORY
            } else {
                EXIT_INVALID
            }
        }
        Err(other) => {
            eprintln!("{other}");
            1
        }
    }
}

/// Sets this process's `resource` limit to `soft` (and `hard`).
/// `RLIMIT_DATA` counts the heap and private writable mappings: what a
/// compile allocates. `RLIMIT_CPU` is the job's budget; it also ends a job
/// that outlives the host that would have killed it.
fn limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct passed by reference and changes
    // only this process's limit.
    #[allow(unsafe_code)]
    let done = unsafe { libc::setrlimit(resource, &limit) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: JobArgs,
    }

    #[test]
    fn job_args_carry_the_sandbox_settings_unchanged() {
        let config = SandboxConfig {
            artifact_dir: PathBuf::from("/tmp/a b"),
            max_instances: 7,
            max_memory_bytes: 123_456,
            max_wasm_stack_bytes: 65_536,
            epoch_interruption: false,
        };
        let args = JobArgs::from(&config);
        let parsed =
            Command::try_parse_from(std::iter::once("job".to_string()).chain(args.to_args()))
                .expect("parses");
        assert_eq!(parsed.args, args);
        let round_trip = parsed.args.sandbox_config();
        assert_eq!(
            (
                round_trip.artifact_dir,
                round_trip.max_instances,
                round_trip.max_memory_bytes,
                round_trip.max_wasm_stack_bytes,
                round_trip.epoch_interruption
            ),
            (PathBuf::from("/tmp/a b"), 7, 123_456, 65_536, false)
        );
    }
}
