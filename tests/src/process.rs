//! A child process that is stopped by its PID, never by name.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a process gets to exit after SIGTERM before it is sent SIGKILL.
pub(crate) const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) struct Managed {
    name: &'static str,
    child: Option<Child>,
}

impl Managed {
    pub(crate) fn new(name: &'static str, child: Child) -> Managed {
        Managed {
            name,
            child: Some(child),
        }
    }

    pub(crate) fn stopped(name: &'static str) -> Managed {
        Managed { name, child: None }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited (it is then reaped).
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        match self.child.as_mut()?.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => None,
        }
    }

    pub(crate) fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            // The child is ours and not yet reaped, so the PID cannot have been reused.
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGTERM, then SIGKILL after [`GRACE`]; waits for the exit without blocking the runtime.
    pub(crate) async fn stop(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                self.child = None;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(
            process = self.name,
            "did not exit after SIGTERM; sending SIGKILL"
        );
        self.kill();
    }

    /// SIGKILL and reap: a crash, as far as the process can tell.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The blocking form of [`stop`](Self::stop), for `Drop`.
    pub(crate) fn stop_blocking(&mut self) {
        if self.child.is_none() {
            return;
        }
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// The last lines of a log file, to explain why a process did not come up.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A temporary directory in RAM when the machine has one (etcd fsyncs every write), else in
/// the default temporary directory.
pub(crate) fn temp_dir(prefix: &str) -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new().prefix(prefix).tempdir_in(shm) {
            return Ok(d);
        }
    }
    tempfile::Builder::new().prefix(prefix).tempdir()
}
