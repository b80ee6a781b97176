//! A real kube-apiserver for the Kubernetes datastore tests, from the binary named by
//! `KUBE_APISERVER_BIN`, with its own etcd, on loopback, with Margay's CRDs installed.
//!
//! The API server runs with `--watch-cache=false`, so that watches are served from etcd and a
//! compaction of its etcd is seen as `410 Gone`, and with `--etcd-compaction-interval=0`, so that
//! only the tests compact.

use crate::etcd::EtcdProcess;
use crate::ports::free_port;
use crate::process::{log_tail, temp_dir, Managed};
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The variable naming a kube-apiserver binary (v1.19 or newer).
pub const APISERVER_ENV: &str = "KUBE_APISERVER_BIN";

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const CRD_TIMEOUT: Duration = Duration::from_secs(60);

/// The kube-apiserver binary: the one `KUBE_APISERVER_BIN` names, else `kube-apiserver` on
/// `PATH`.
pub fn apiserver_binary() -> Option<PathBuf> {
    if let Some(named) = std::env::var_os(APISERVER_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(named));
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("kube-apiserver"))
        .find(|p| p.is_file())
}

/// The kube-apiserver binary for a test that needs one. Without one the test does not run:
/// it prints a `SKIPPED` line (once per test process) and gets `None`, except under `CI=true`,
/// where a missing API server fails the test, so that a green CI always means the Kubernetes
/// tests ran.
pub fn require_apiserver(suite: &str) -> Option<PathBuf> {
    if let Some(bin) = apiserver_binary() {
        return Some(bin);
    }
    let why = format!(
        "no kube-apiserver: set {APISERVER_ENV} to a kube-apiserver v1.20+ binary or put one on PATH (docs/datastore.md says how to build one)"
    );
    if crate::ci() {
        panic!("{suite} must run under CI=true, but there is {why}");
    }
    crate::skipped(suite, &why);
    None
}

/// The directory of the committed CRD manifests, `charts/margay/crds`.
pub fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/margay/crds")
}

/// How the API server decides who may do what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authorization {
    /// Every authenticated request is allowed: for tests of the datastore itself.
    AlwaysAllow,
    /// RBAC, as in a real cluster: for tests that run components under the chart's
    /// ServiceAccounts and Roles.
    Rbac,
}

/// How to start an API server: [`ApiServerProcess::start_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub authorization: Authorization,
    /// Install Margay's CRDs (else the test does, with helm say).
    pub crds: bool,
    /// Write every request to an audit log, for [`ApiServerProcess::forbidden`]. Benchmarks
    /// turn it off: a cluster does not log every request by default.
    pub audit: bool,
    /// The address it serves on (and advertises, and has in its certificate): loopback, or an
    /// address of this network namespace that components in other namespaces reach.
    pub listen: IpAddr,
}

impl Options {
    /// RBAC on, Margay's CRDs installed, every request audited: a cluster as a test of the
    /// chart's roles wants it.
    pub const RBAC: Options = Options {
        authorization: Authorization::Rbac,
        crds: true,
        audit: true,
        listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
}

/// A running kube-apiserver. Dropping it stops the API server, then its etcd.
///
/// Every request is written to an audit log, so that a test can find each request the server
/// refused with 403 ([`ApiServerProcess::forbidden`]) whatever the client did with the answer.
#[derive(Debug)]
pub struct ApiServerProcess {
    process: Managed,
    port: u16,
    version: String,
    options: Options,
    token_file: PathBuf,
    etcd: EtcdProcess,
    // Declared last: removed after the process has stopped.
    dir: tempfile::TempDir,
}

impl ApiServerProcess {
    /// Starts etcd and the API server from `bin` (every request allowed), waits for `/readyz`,
    /// and installs every CRD in [`crd_dir`].
    pub async fn start(bin: &Path) -> Result<ApiServerProcess> {
        let options = Options {
            authorization: Authorization::AlwaysAllow,
            ..Options::RBAC
        };
        ApiServerProcess::start_with(bin, options).await
    }

    /// Like [`start`](Self::start), with the `options` given.
    pub async fn start_with(bin: &Path, options: Options) -> Result<ApiServerProcess> {
        if !bin.is_file() {
            bail!("{APISERVER_ENV}={} is not a file", bin.display());
        }
        let version = apiserver_version(bin)?;
        let etcd = EtcdProcess::start().await?;
        let dir = temp_dir("margay-apiserver-")?;
        let sa_key = dir.path().join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stdin(Stdio::null())
            .output()
            .context("running openssl to make the service-account key (apt-get install openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl genrsa failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = format!(
            "margay-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{token},margay-admin,margay-admin,\"system:masters\"\n"),
        )?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &token)?;

        let mut me = ApiServerProcess {
            process: Managed::stopped("kube-apiserver"),
            port: 0,
            version,
            options,
            token_file,
            etcd,
            dir,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            me.port = free_port()?;
            match me.launch(bin).await {
                Ok(()) => break,
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        if options.crds {
            me.install_crds(&crd_dir()).await?;
        }
        Ok(me)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("kube-apiserver.log")
    }

    async fn launch(&mut self, bin: &Path) -> Result<()> {
        let d = self.dir.path();
        let sa_key = d.join("sa.key");
        let mut args = vec![
            format!("--etcd-servers={}", self.etcd.endpoint()),
            format!("--bind-address={}", self.options.listen),
            format!("--advertise-address={}", self.options.listen),
            format!("--secure-port={}", self.port),
            format!("--cert-dir={}", d.join("certs").display()),
            match self.options.authorization {
                Authorization::AlwaysAllow => "--authorization-mode=AlwaysAllow".into(),
                Authorization::Rbac => "--authorization-mode=RBAC".into(),
            },
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", sa_key.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--watch-cache=false".into(),
            "--etcd-compaction-interval=0".into(),
            "--profiling=false".into(),
        ];
        if self.options.audit {
            args.push(format!(
                "--audit-policy-file={}",
                d.join("audit-policy.yaml").display()
            ));
            args.push(format!("--audit-log-path={}", self.audit_log().display()));
            args.push("--audit-log-format=json".into());
        }
        if minor_version(&self.version).is_some_and(|m| m < 24) {
            // Before 1.24 an insecure port 8080 opens by default; two test servers would fight
            // over it.
            args.push("--insecure-port=0".into());
        }
        // One line per request, once its answer is known: enough to see every refusal.
        std::fs::write(
            d.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n  - level: Metadata\n",
        )?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.process = Managed::new("kube-apiserver", child);

        let client = self.client()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.process.exited() {
                bail!(
                    "kube-apiserver exited during startup ({status}); last lines of {}:\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path(), 40)
                );
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            if let Ok(Ok(text)) =
                tokio::time::timeout(Duration::from_secs(2), client.request_text(req)).await
            {
                if text.trim() == "ok" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver on port {} not ready within {READY_TIMEOUT:?}; last lines of {}:\n{}",
                    self.port,
                    self.log_path().display(),
                    log_tail(&self.log_path(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// A client with admin rights that accepts the server's self-signed certificate.
    pub fn client(&self) -> Result<kube::Client> {
        let mut config = kube::Config::new(self.url().parse()?);
        config.accept_invalid_certs = true;
        config.auth_info.token_file = Some(self.token_file.display().to_string());
        Ok(kube::Client::try_from(config)?)
    }

    /// The server's address, e.g. `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!(
            "https://{}",
            std::net::SocketAddr::new(self.options.listen, self.port)
        )
    }

    /// Writes a kubeconfig for this server that authenticates with `token` (the admin's when
    /// `None`) and verifies the server's certificate, as a component or kubectl reads it.
    pub fn write_kubeconfig(&self, path: &Path, token: Option<&str>) -> Result<()> {
        let token = match token {
            Some(t) => t.to_owned(),
            None => std::fs::read_to_string(&self.token_file)?,
        };
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            // The self-signed serving certificate the server made in --cert-dir, with its CA,
            // verified as a cluster's kubeconfig verifies its API server.
            "clusters": [{"name": "test", "cluster": {
                "server": self.url(),
                "certificate-authority": self.dir.path().join("certs/apiserver.crt"),
            }}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
            "current-context": "test",
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// A token of ServiceAccount `namespace/name`, from the TokenRequest API, valid for an hour.
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        let req = http::Request::post(format!(
            "/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
        ))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 3600},
        }))?)?;
        let answer: Value =
            self.client()?.request(req).await.with_context(|| {
                format!("requesting a token of ServiceAccount {namespace}/{name}")
            })?;
        answer["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the TokenRequest answer has no token: {answer}"))
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// Every request the server refused with 403 so far whose user name starts with
    /// `user_prefix` (e.g. `system:serviceaccount:margay-system:`), one line each: user, verb,
    /// URI.
    pub fn forbidden(&self, user_prefix: &str) -> Result<Vec<String>> {
        if !self.options.audit {
            bail!("this API server keeps no audit log (Options::audit)");
        }
        let text = match std::fs::read_to_string(self.audit_log()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).context("reading the API server's audit log"),
        };
        let mut out = Vec::new();
        for line in text.lines() {
            let event: Value = serde_json::from_str(line)
                .with_context(|| format!("an audit log line that is not JSON: {line}"))?;
            let user = event["user"]["username"].as_str().unwrap_or("");
            if event["responseStatus"]["code"] == 403 && user.starts_with(user_prefix) {
                out.push(format!(
                    "{user} {} {}",
                    event["verb"].as_str().unwrap_or("?"),
                    event["requestURI"].as_str().unwrap_or("?")
                ));
            }
        }
        Ok(out)
    }

    /// The server's version string, e.g. `Kubernetes v1.28.3`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the server enforces the `x-kubernetes-validations` (CEL) rules of CRDs: on by
    /// default from Kubernetes 1.25.
    pub fn enforces_cel(&self) -> bool {
        minor_version(&self.version).is_some_and(|m| m >= 25)
    }

    /// The API server's etcd, e.g. to compact it.
    pub fn etcd(&self) -> &EtcdProcess {
        &self.etcd
    }

    /// Creates every CRD in the YAML files of `dir` and waits until each is established and
    /// served.
    pub async fn install_crds(&self, dir: &Path) -> Result<()> {
        let crds = read_crds(dir)?;
        let client = self.client()?;
        let base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
        for crd in &crds {
            let req = http::Request::post(base)
                .header("content-type", "application/json")
                .body(serde_json::to_vec(crd)?)?;
            client
                .request_text(req)
                .await
                .with_context(|| format!("creating CRD {}", crd["metadata"]["name"]))?;
        }
        let deadline = Instant::now() + CRD_TIMEOUT;
        for crd in &crds {
            let name = crd["metadata"]["name"].as_str().unwrap_or_default();
            let plural = crd["spec"]["names"]["plural"].as_str().unwrap_or_default();
            let group = crd["spec"]["group"].as_str().unwrap_or_default();
            let version = crd["spec"]["versions"][0]["name"].as_str().unwrap_or("v1");
            loop {
                let established = async {
                    let req = http::Request::get(format!("{base}/{name}")).body(Vec::new())?;
                    let v: Value = client.request(req).await?;
                    let ok = v["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Established" && c["status"] == "True");
                    let req =
                        http::Request::get(format!("/apis/{group}/{version}/{plural}?limit=1"))
                            .body(Vec::new())?;
                    let served = client.request_text(req).await.is_ok();
                    anyhow::Ok(ok && served)
                };
                if established.await.unwrap_or(false) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("CRD {name} not established and served within {CRD_TIMEOUT:?}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }
}

/// Every CRD document in the `.yaml`/`.yml` files of `dir`, in file-name order.
pub fn read_crds(dir: &Path) -> Result<Vec<Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading CRD directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut crds = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).with_context(|| format!("parsing {}", f.display()))?;
            if v.is_null() {
                continue;
            }
            if v["kind"] != "CustomResourceDefinition" {
                bail!(
                    "{} holds a {} where a CRD was expected",
                    f.display(),
                    v["kind"]
                );
            }
            crds.push(v);
        }
    }
    if crds.is_empty() {
        bail!(
            "no CRD manifests in {}: generate them with `cargo run -p margay-api --bin margay-crdgen`",
            dir.display()
        );
    }
    Ok(crds)
}

fn apiserver_version(bin: &Path) -> Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || v.is_empty() {
        return Err(anyhow!(
            "{} --version failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(v)
}

/// The minor version of "Kubernetes v1.28.3".
fn minor_version(version: &str) -> Option<u32> {
    let v = version.rsplit(' ').next()?.trim_start_matches('v');
    v.split('.').nth(1)?.parse().ok()
}

impl Drop for ApiServerProcess {
    fn drop(&mut self) {
        self.process.stop_blocking();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_version_of_version_strings() {
        assert_eq!(minor_version("Kubernetes v1.19.16"), Some(19));
        assert_eq!(minor_version("Kubernetes v1.33.0-rc.1"), Some(33));
        assert_eq!(minor_version("garbage"), None);
    }

    #[test]
    fn read_crds_needs_manifests_and_says_how_to_make_them() {
        let d = tempfile::tempdir().unwrap();
        let e = read_crds(d.path()).unwrap_err();
        assert!(e.to_string().contains("margay-crdgen"), "{e}");
        std::fs::write(
            d.path().join("a.yaml"),
            "---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: ippools.margay.io\n---\n",
        )
        .unwrap();
        let crds = read_crds(d.path()).unwrap();
        assert_eq!(crds.len(), 1);
        assert_eq!(crds[0]["metadata"]["name"], "ippools.margay.io");
        std::fs::write(d.path().join("b.yaml"), "kind: ConfigMap\n").unwrap();
        assert!(read_crds(d.path()).is_err());
    }
}
