//! The `weir` binary run as a child process, so a test can SIGKILL it,
//! pause it, or arm a crash point, and start it again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};
use weir_host::config::HostConfig;

/// The `weir` binary: `WEIR_BIN`, or the debug build in the target dir.
pub fn weir_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEIR_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = crate::target_dir().join("debug/weir");
    if !path.exists() {
        bail!(
            "{} is missing: build it with `cargo build -p weir-host --bin weir` (cargo xtask test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A `weir serve` process.
pub struct HostProcess {
    child: Child,
}

impl HostProcess {
    /// Writes `config` to `dir/weir.toml` and starts `weir serve` on it with
    /// the extra environment `env`; its output is appended to `dir/weir.log`.
    pub fn start(config: &HostConfig, dir: &Path, env: &[(&str, String)]) -> Result<Self> {
        let config_path = dir.join("weir.toml");
        std::fs::write(
            &config_path,
            toml::to_string(config).context("config as TOML")?,
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("weir.log"))?;
        let mut command = Command::new(weir_binary()?);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("WEIR_LOG", "warn")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log));
        for (name, value) in env {
            command.env(name, value);
        }
        die_with_parent(&mut command);
        Ok(Self {
            child: command.spawn().context("starting weir serve")?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited (for instance at a crash point).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Makes the child receive SIGKILL when the thread that started it exits,
/// so a test process that is itself killed leaves no host (holding its
/// database open) or nats-server behind.
pub(crate) fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls prctl(2), which is async-signal-safe.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// The last `lines` lines of the host log in `dir` (see [`HostProcess::start`]),
/// for a failing test to show what the host said.
pub fn log_tail(dir: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(dir.join("weir.log")).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!(
        "host log (last {} lines):\n{}",
        all.len() - start,
        all[start..].join("\n")
    )
}

/// Sends `signal` (e.g. `STOP`, `CONT`, `TERM`) to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed");
    }
    Ok(())
}
