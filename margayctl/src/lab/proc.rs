//! Processes and namespaces of the lab: daemons started inside a namespace with their output
//! in a log file, remembered by PID, and stopped by PID only after checking that the PID still
//! runs the program the lab started.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon the lab started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Daemon {
    pub name: String,
    pub pid: u32,
    /// The program's file name, checked against `/proc/<pid>/cmdline` before any signal.
    pub program: String,
    /// The process's start time (clock ticks since boot, `/proc/<pid>/stat` field 22): with the
    /// PID it names one process for good, so a PID reused by someone else's process is never
    /// signalled.
    #[serde(default)]
    pub start_time: u64,
    pub log: PathBuf,
}

/// The start time of process `pid`, if it exists.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// Runs `ip <args>`, failing with its error output.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n <ns> <args>`.
pub fn ip_in(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    ip(&full)
}

/// Runs a program inside a namespace and waits for it.
pub fn exec_in(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .with_context(|| format!("running {program} in {ns}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `program args` inside `ns` in a session of its own (it outlives margayctl), with
/// stdout and stderr appended to `log`.
pub fn spawn_daemon(
    name: &str,
    ns: &str,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<Daemon> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} in {ns}", program.display()))?;
    // `ip netns exec` execs the program, so the PID (and its start time) is the daemon's.
    Ok(Daemon {
        name: name.to_owned(),
        pid: child.id(),
        start_time: start_time(child.id()).unwrap_or(0),
        program: program
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        log: log.to_owned(),
    })
}

/// Whether `pid` runs `program` (and is not a zombie).
pub fn is_running(d: &Daemon) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{}/cmdline", d.pid)) else {
        return false;
    };
    let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let exe = String::from_utf8_lossy(first);
    let runs = exe.rsplit('/').next() == Some(d.program.as_str())
        && (d.start_time == 0 || start_time(d.pid) == Some(d.start_time));
    let zombie = std::fs::read_to_string(format!("/proc/{}/stat", d.pid))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true);
    runs && !zombie
}

/// Stops a daemon: SIGTERM, then SIGKILL after `grace`. Never signals a PID that no longer
/// runs the lab's program.
pub fn stop(d: &Daemon, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if !is_running(d) {
        return;
    }
    let pid = Pid::from_raw(d.pid as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_running(d) {
            reap(d.pid);
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_running(d) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    reap(d.pid);
}

/// Kills a daemon at once (SIGKILL), as a crash would.
pub fn kill_now(d: &Daemon) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    if is_running(d) {
        let _ = kill(Pid::from_raw(d.pid as i32), Signal::SIGKILL);
        reap(d.pid);
    }
}

/// Collects the exit status of a child of this process, if it is one.
fn reap(pid: u32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let _ = waitpid(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(WaitPidFlag::WNOHANG),
    );
}

/// Every named network namespace whose name starts with `prefix`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a thread that has entered the lab namespace `ns`, and returns its result.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = PathBuf::from(format!("/var/run/netns/{ns}"));
    margay_kernel::netns::run_in(&path, f).map_err(Into::into)
}

/// Moves the calling thread into namespace `ns` for good. Sockets it opens afterwards (and
/// threads it starts) live there.
pub fn enter_netns(ns: &str) -> Result<()> {
    let path = format!("/var/run/netns/{ns}");
    let fd = File::open(&path).with_context(|| format!("opening {path}: is the lab up?"))?;
    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {path}"))
}
