//! The lab's Kubernetes datastore (`lab up --datastore kubernetes`): a real kube-apiserver with
//! RBAC on, beside etcd in the infrastructure namespace; Margay's CRDs and RBAC applied from
//! the rendered chart; a kubeconfig per component with its own ServiceAccount's token; and the
//! kubelet's part (Node registration, Pod objects made before CNI ADD and deleted through the
//! API).
//!
//! The API server binary comes from `KUBE_APISERVER_BIN` or `PATH`, helm and kubectl from
//! `PATH` or `.tools/bin` of the checkout (`scripts/get-helm.sh`), the chart from the checkout.

use super::{plan, proc};
use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The API server's port in the infrastructure namespace.
pub const PORT: u16 = 6443;
/// The namespace the chart's ServiceAccounts live in.
pub const NAMESPACE: &str = "margay-system";
/// The kinds of the rendered chart the lab applies: the CRDs and the RBAC. The workloads are
/// the lab's own processes.
const APPLIED_KINDS: &[&str] = &[
    "CustomResourceDefinition",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

pub fn dir() -> PathBuf {
    Path::new(plan::STATE_DIR).join("kube")
}

pub fn url() -> String {
    format!("https://{}:{PORT}", plan::INFRA_ADDR)
}

/// The API server's audit log: one JSON line per answered request.
pub fn audit_log() -> PathBuf {
    dir().join("audit.log")
}

/// The kubeconfig of a component (`admin`, `margay-node`, `margay-cni`,
/// `margay-ipam-controller`).
pub fn kubeconfig(who: &str) -> PathBuf {
    dir().join(format!("{who}.kubeconfig"))
}

fn checkout(bin_dir: &Path) -> Option<PathBuf> {
    // target/debug/margayctl → the checkout.
    let root = bin_dir.parent()?.parent()?;
    root.join("charts/margay").is_dir().then(|| root.to_owned())
}

/// `name` on PATH, else in the checkout's `.tools/bin`.
fn tool(name: &str, bin_dir: &Path) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    }) {
        return Ok(p);
    }
    checkout(bin_dir)
        .map(|r| r.join(".tools/bin").join(name))
        .filter(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} is not on PATH nor in .tools/bin: run scripts/get-helm.sh"))
}

pub fn apiserver_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KUBE_APISERVER_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("kube-apiserver"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!("--datastore kubernetes needs a kube-apiserver binary: set KUBE_APISERVER_BIN or put one on PATH (docs/datastore.md)")
        })
}

/// kubectl as the lab's administrator; standard output, or an error with what it said.
pub fn kubectl(bin_dir: &Path, args: &[&str], stdin: &str) -> Result<String> {
    kubectl_as(bin_dir, "admin", args, stdin)
}

/// kubectl with the kubeconfig of `who`.
pub fn kubectl_as(bin_dir: &Path, who: &str, args: &[&str], stdin: &str) -> Result<String> {
    let mut child = Command::new(tool("kubectl", bin_dir)?)
        .arg("--kubeconfig")
        .arg(kubeconfig(who))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_kubeconfig(who: &str, token: &str) -> Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {
            "server": url(),
            "certificate-authority": dir().join("certs/apiserver.crt"),
        }}],
        "users": [{"name": who, "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": who}}],
        "current-context": "lab",
    });
    let path = kubeconfig(who);
    std::fs::write(&path, serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Starts the API server in the infrastructure namespace (RBAC on) and waits until it is
/// ready. The caller records the daemon.
pub fn start_apiserver() -> Result<proc::Daemon> {
    let bin = apiserver_binary()?;
    let d = dir();
    std::fs::create_dir_all(&d)?;
    let key = d.join("sa.key");
    let out = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .stdin(Stdio::null())
        .output()
        .context("running openssl for the ServiceAccount signing key")?;
    if !out.status.success() {
        bail!("openssl genrsa: {}", String::from_utf8_lossy(&out.stderr));
    }
    let token = format!(
        "lab-admin-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    std::fs::write(
        d.join("tokens.csv"),
        format!("{token},lab-admin,lab-admin,\"system:masters\"\n"),
    )?;
    write_kubeconfig("admin", &token)?;
    let version = Command::new(&bin).arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let mut args = vec![
        format!("--etcd-servers={}", plan::etcd_endpoint()),
        "--etcd-prefix=/kubernetes".into(),
        "--bind-address=0.0.0.0".into(),
        format!("--advertise-address={}", plan::INFRA_ADDR),
        format!("--secure-port={PORT}"),
        format!("--cert-dir={}", d.join("certs").display()),
        "--authorization-mode=RBAC".into(),
        format!("--token-auth-file={}", d.join("tokens.csv").display()),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-account-key-file={}", key.display()),
        format!("--service-account-signing-key-file={}", key.display()),
        "--service-cluster-ip-range=10.96.0.0/16".into(),
        "--profiling=false".into(),
        // Every request, once answered, to `audit.log`: a refusal (403) of any component
        // shows there whatever the component did with it.
        format!(
            "--audit-policy-file={}",
            d.join("audit-policy.yaml").display()
        ),
        format!("--audit-log-path={}", audit_log().display()),
        "--audit-log-format=json".into(),
    ];
    std::fs::write(
        d.join("audit-policy.yaml"),
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n  - level: Metadata\n",
    )?;
    let minor: Option<u32> = version
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|v| v.trim_start_matches('v').split('.').nth(1)?.parse().ok());
    if minor.is_some_and(|m| m < 24) {
        args.push("--insecure-port=0".into());
    }
    let daemon = proc::spawn_daemon(
        "kube-apiserver",
        plan::INFRA_NS,
        &bin,
        &args,
        &[],
        &Path::new(plan::STATE_DIR).join("kube-apiserver.log"),
    )?;
    Ok(daemon)
}

/// Waits for `/readyz` (run from inside the infrastructure namespace).
pub fn wait_ready(bin_dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match kubectl(bin_dir, &["get", "--raw", "/readyz"], "") {
            Ok(s) if s.trim() == "ok" => return Ok(()),
            r => {
                if Instant::now() > deadline {
                    bail!(
                        "the API server was not ready within 90 s ({r:?}); see {}/kube-apiserver.log",
                        plan::STATE_DIR
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Applies the chart's CRDs and RBAC, rendered by helm as a user's install renders them, and
/// writes a kubeconfig with its own ServiceAccount token for each component.
pub fn install_chart(bin_dir: &Path, with_bgpd: bool) -> Result<()> {
    let chart = checkout(bin_dir)
        .map(|r| r.join("charts/margay"))
        .or_else(|| Some(PathBuf::from("charts/margay")).filter(|p| p.is_dir()))
        .ok_or_else(|| anyhow!("the chart (charts/margay) is not found beside the binaries or in the current directory"))?;
    let mut cmd = Command::new(tool("helm", bin_dir)?);
    cmd.args(["template", "margay"])
        .arg(&chart)
        .args(["--namespace", NAMESPACE, "--include-crds"]);
    if with_bgpd {
        cmd.args(["--set", "routeReflectors.enabled=true"]);
    }
    let out = cmd.output().context("running helm template")?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <serde_json::Value as serde::Deserialize>::deserialize(doc)?;
        if v["kind"]
            .as_str()
            .is_some_and(|k| APPLIED_KINDS.contains(&k))
        {
            docs.push(v);
        }
    }
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs});
    kubectl(bin_dir, &["create", "namespace", NAMESPACE], "")?;
    // --validate=false: kubectl checks the CRDs against the server's own OpenAPI, and servers
    // before v1.25 do not know `x-kubernetes-validations` (they drop it and run the rest of
    // the schema, which is what Margay wants of them).
    kubectl(
        bin_dir,
        &["apply", "--validate=false", "-f", "-"],
        &list.to_string(),
    )?;
    kubectl(
        bin_dir,
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        "",
    )?;
    let mut accounts = vec!["margay-node", "margay-cni", "margay-ipam-controller"];
    if with_bgpd {
        accounts.push("margay-bgpd");
    }
    for sa in accounts {
        let token = kubectl(
            bin_dir,
            // A month: the lab has no token refresher.
            &["create", "token", sa, "-n", NAMESPACE, "--duration=720h"],
            "",
        )?;
        write_kubeconfig(sa, token.trim())?;
    }
    pod_namespace(bin_dir, "default")
}

/// Makes `namespace` ready for Pods: the namespace and its `default` ServiceAccount, which
/// admission insists on and no controller manager makes here. Either may exist already.
pub fn pod_namespace(bin_dir: &Path, namespace: &str) -> Result<()> {
    let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "default", "namespace": namespace}},
    ]});
    kubectl(bin_dir, &["apply", "-f", "-"], &objects.to_string()).map(drop)
}

/// Registers a Kubernetes Node with `labels`, as a kubelet does.
pub fn register_node(bin_dir: &Path, name: &str, labels: &[(&str, &str)]) -> Result<()> {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
    });
    kubectl(bin_dir, &["apply", "-f", "-"], &node.to_string()).map(drop)
}

/// Creates Pod `namespace/name` on `node` with `annotations`, as the scheduler leaves it for
/// the kubelet.
pub fn create_pod(
    bin_dir: &Path,
    namespace: &str,
    name: &str,
    node: &str,
    annotations: &[(&str, &str)],
) -> Result<()> {
    let annotations: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"nodeName": node, "automountServiceAccountToken": false,
                 "containers": [{"name": "main", "image": "registry.invalid/lab"}]},
    });
    kubectl(bin_dir, &["apply", "-f", "-"], &pod.to_string()).map(drop)
}

/// Deletes Pod `namespace/name` through the API at once (no kubelet runs here to finish a
/// graceful deletion).
pub fn delete_pod(bin_dir: &Path, namespace: &str, name: &str) -> Result<()> {
    kubectl(
        bin_dir,
        &[
            "delete",
            "pod",
            name,
            "-n",
            namespace,
            "--grace-period=0",
            "--force",
            "--ignore-not-found",
        ],
        "",
    )
    .map(drop)
}

/// The holder of the controller's leader Lease, if any.
pub fn lease_holder(bin_dir: &Path) -> Result<Option<String>> {
    match kubectl(
        bin_dir,
        &[
            "get",
            "lease",
            "margay-ipam-controller",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        "",
    ) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.to_string().contains("NotFound") => Ok(None),
        Err(e) => Err(e),
    }
}
