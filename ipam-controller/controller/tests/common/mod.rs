//! What the controller's process tests share: a `margay-ipam-controller` replica.
#![allow(dead_code)]

use margay_testkit::{free_port, http_get};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A controller replica, killed (by its PID) when dropped.
pub struct Replica {
    child: Child,
    /// Its metrics and probe endpoint.
    pub addr: SocketAddr,
    log: PathBuf,
}

impl Replica {
    /// Starts `margay-ipam-controller` as `identity`, a pass every second, leadership held for
    /// `lease`, its endpoint on a free loopback port, with `env` (the datastore) and its output
    /// in `<dir>/<identity>.log`.
    pub fn start(identity: &str, lease: Duration, dir: &Path, env: &[(&str, &str)]) -> Replica {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().expect("port"))
            .parse()
            .expect("address");
        let log = dir.join(format!("{identity}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_margay-ipam-controller"))
            .args(["--interval", "1s"])
            .args(["--lease-duration", &format!("{}s", lease.as_secs())])
            .args(["--identity", identity, "--metrics-addr", &addr.to_string()])
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("starting margay-ipam-controller");
        Replica { child, addr, log }
    }

    /// `GET path` from its endpoint; `None` (said on stderr) when it does not answer.
    pub fn probe(&self, path: &str) -> Option<(u16, String)> {
        match http_get(self.addr, path) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("GET {path} from {}: {e}", self.addr);
                None
            }
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Err(e) = self.child.kill() {
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "kill: {e}");
        }
        self.child.wait().expect("reaping the controller");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}
