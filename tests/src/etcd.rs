//! A real etcd for tests: one single-member cluster per [`EtcdProcess`], on free loopback
//! ports, with its data in a temporary directory.

use crate::ports::free_ports;
use crate::process::{log_tail, temp_dir, Managed};
use anyhow::{bail, Context, Result};
use margay_api::store::etcd::{EtcdBackend, EtcdConfig, EtcdTls};
use margay_api::Revision;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd gets to answer after it is started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd. Dropping it stops the process and removes its data.
#[derive(Debug)]
pub struct EtcdProcess {
    process: Managed,
    bin: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Serves clients over TLS with a certificate of its own test CA.
    tls: bool,
    /// Addresses besides 127.0.0.1 that clients may reach etcd on (e.g. a test fabric's host
    /// side), on the same port.
    extra_listen: Vec<std::net::IpAddr>,
    // Declared last: removed after the process has stopped.
    dir: tempfile::TempDir,
}

/// The etcd binary: `$ETCD_BIN`, else `/usr/bin/etcd`, else `etcd` on `PATH`.
pub fn etcd_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("ETCD_BIN={} does not exist", p.display());
    }
    let default = Path::new("/usr/bin/etcd");
    if default.is_file() {
        return Ok(default.to_owned());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "etcd is not installed: these tests need an etcd v3 server binary; install it with \
         `apt-get install etcd-server` or point ETCD_BIN at one"
    )
}

/// Why a launch failed: a port taken meanwhile is worth another try on other ports.
enum LaunchError {
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl EtcdProcess {
    /// Starts etcd and waits until it answers requests.
    pub async fn start() -> Result<EtcdProcess> {
        EtcdProcess::start_inner(false, Vec::new()).await
    }

    /// Starts etcd listening on 127.0.0.1 and also on `ips` (addresses of this namespace, such
    /// as the host end of a test fabric), so that processes in other network namespaces the
    /// test made can reach it at [`endpoint_on`](Self::endpoint_on).
    pub async fn start_listening_on(ips: &[std::net::IpAddr]) -> Result<EtcdProcess> {
        EtcdProcess::start_inner(false, ips.to_vec()).await
    }

    /// The client URL on one of the extra listen addresses.
    pub fn endpoint_on(&self, ip: std::net::IpAddr) -> String {
        match ip {
            std::net::IpAddr::V6(a) => format!("http://[{a}]:{}", self.client_port),
            a => format!("http://{a}:{}", self.client_port),
        }
    }

    /// Starts etcd serving clients over TLS (`https://`), with a serving certificate for
    /// 127.0.0.1 signed by a CA made for it ([`ca_file`](Self::ca_file)). Needs `openssl`.
    pub async fn start_with_tls() -> Result<EtcdProcess> {
        EtcdProcess::start_inner(true, Vec::new()).await
    }

    async fn start_inner(tls: bool, extra_listen: Vec<std::net::IpAddr>) -> Result<EtcdProcess> {
        let bin = etcd_binary()?;
        let dir = temp_dir("margay-etcd-").context("creating etcd's temporary directory")?;
        let [client_port, peer_port] = free_ports::<2>()?;
        let mut etcd = EtcdProcess {
            process: Managed::stopped("etcd"),
            bin,
            client_port,
            peer_port,
            tls,
            extra_listen,
            dir,
        };
        if tls {
            make_certificates(etcd.dir.path())?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            match etcd.launch().await {
                Ok(()) => return Ok(etcd),
                Err(LaunchError::PortTaken(e)) if attempt < 5 => {
                    tracing::info!("etcd could not bind its ports ({e:#}); retrying on others");
                    // The member's identity includes its peer URL: start from an empty dir.
                    let _ = std::fs::remove_dir_all(etcd.data_dir());
                    [etcd.client_port, etcd.peer_port] = free_ports::<2>()?;
                }
                Err(LaunchError::PortTaken(e)) | Err(LaunchError::Other(e)) => return Err(e),
            }
        }
    }

    fn launch_args(&self) -> Vec<String> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut args = vec![
            "--name=margay-test".into(),
            format!("--data-dir={}", self.data_dir().display()),
            format!(
                "--listen-client-urls={}",
                std::iter::once(client.clone())
                    .chain(self.extra_listen.iter().map(|ip| self.endpoint_on(*ip)))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=margay-test={peer}"),
            "--initial-cluster-state=new".into(),
            // A single member elects itself; short timers make startup fast.
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
            "--snapshot-count=10000".into(),
            // Progress notifications (bookmarks) often enough that tests meet them.
            "--experimental-watch-progress-notify-interval=2s".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
            "--log-level=warn".into(),
        ];
        if self.tls {
            let d = self.dir.path();
            args.push(format!("--cert-file={}", d.join("server.pem").display()));
            args.push(format!("--key-file={}", d.join("server.key").display()));
        }
        args
    }

    async fn launch(&mut self) -> Result<(), LaunchError> {
        let log_path = self.log_path();
        let open_log = || {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .with_context(|| format!("opening {}", log_path.display()))
        };
        let log = open_log().map_err(LaunchError::Other)?;
        let log2 = log.try_clone().map_err(|e| LaunchError::Other(e.into()))?;
        let child = Command::new(&self.bin)
            .args(self.launch_args())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))
            .map_err(LaunchError::Other)?;
        self.process = Managed::new("etcd", child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<(), LaunchError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let endpoint = self.endpoint();
        loop {
            if let Some(status) = self.process.exited() {
                let tail = log_tail(&self.log_path(), 30);
                let e = anyhow::anyhow!(
                    "etcd exited during startup ({status}); last lines of {}:\n{tail}",
                    self.log_path().display()
                );
                return Err(if tail.contains("address already in use") {
                    LaunchError::PortTaken(e)
                } else {
                    LaunchError::Other(e)
                });
            }
            if answers(self.client()).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.process.kill();
                return Err(LaunchError::Other(anyhow::anyhow!(
                    "etcd at {endpoint} did not answer within {READY_TIMEOUT:?}; last lines of {}:\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path(), 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:40123` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The CA certificate (PEM) that signed the serving certificate of a TLS etcd.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.path().join("ca.pem"))
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's own log (stdout and stderr), kept across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Stops etcd: SIGTERM to its PID, SIGKILL if it has not exited after a grace period.
    pub async fn stop(&mut self) {
        self.process.stop().await;
    }

    /// Kills etcd with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts etcd again on the same ports with the same data, after [`stop`](Self::stop) or
    /// [`kill`](Self::kill) (a running etcd is stopped first).
    pub async fn restart(&mut self) -> Result<()> {
        self.process.stop().await;
        match self.launch().await {
            Ok(()) => Ok(()),
            Err(LaunchError::PortTaken(e)) => {
                Err(e.context("restarting etcd: its port was taken while it was down"))
            }
            Err(LaunchError::Other(e)) => Err(e.context("restarting etcd")),
        }
    }

    /// A plain etcd client (trusting the test CA of a TLS etcd).
    pub async fn client(&self) -> Result<etcd_client::Client> {
        let mut opts = etcd_client::ConnectOptions::new();
        if let Some(ca) = self.ca_file() {
            let pem = std::fs::read(&ca)?;
            opts = opts.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(pem)),
            );
        }
        Ok(etcd_client::Client::connect([self.endpoint()], Some(opts)).await?)
    }

    /// A Margay backend on this etcd, under key prefix `prefix` (e.g. `/margay/v1/`).
    pub async fn backend(&self, prefix: &str) -> Result<EtcdBackend> {
        Ok(EtcdBackend::connect(self.config(prefix)).await?)
    }

    /// The backend configuration for this etcd, to adjust timeouts before connecting.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        let mut cfg = EtcdConfig::new([self.endpoint()]).with_prefix(prefix);
        cfg.tls = self.ca_file().map(|ca_file| EtcdTls {
            ca_file,
            cert_file: None,
            key_file: None,
            server_name: None,
        });
        cfg
    }

    /// Compacts the store's history before `revision` and waits until it is applied.
    pub async fn compact(&self, revision: Revision) -> Result<()> {
        let mut client = self.client().await?;
        client
            .compact(
                revision as i64,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .with_context(|| format!("compacting etcd at revision {revision}"))?;
        Ok(())
    }

    /// The store's current revision.
    pub async fn revision(&self) -> Result<Revision> {
        let mut client = self.client().await?;
        let resp = client.status().await?;
        Ok(resp.header().map(|h| h.revision()).unwrap_or(0) as Revision)
    }
}

/// Whether etcd serves a read within a second.
async fn answers(client: impl std::future::Future<Output = Result<etcd_client::Client>>) -> bool {
    let attempt = async {
        let mut c = client.await?;
        anyhow::Ok(c.get("margay-testkit-ready", None).await?)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(_))
    )
}

/// A CA and a serving certificate for 127.0.0.1 signed by it, in `dir`.
fn make_certificates(dir: &Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .context("running openssl to make test certificates (apt-get install openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\n",
    )?;
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=margay-test-ca",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ])
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.process.stop_blocking();
    }
}
