//! The Helm chart as tests use it: `helm` and `kubectl` from `.tools/bin` (put there by
//! `scripts/get-helm.sh`), renders of the chart, and the value sets under `charts/margay/ci/`.

use anyhow::{bail, Context, Result};
use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The namespace every test renders and installs the chart into.
pub const NAMESPACE: &str = "margay-system";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn tool(name: &str) -> PathBuf {
    let p = root().join(".tools/bin").join(name);
    assert!(
        p.is_file(),
        "{name} is not installed at {}: run scripts/get-helm.sh (scripts/setup.sh does)",
        p.display()
    );
    p
}

/// The helm binary.
pub fn helm() -> PathBuf {
    tool("helm")
}

/// The kubectl binary.
pub fn kubectl() -> PathBuf {
    tool("kubectl")
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    root().join("charts/margay")
}

/// The value sets a platform team would try: the defaults, then each file under
/// `charts/margay/ci/` on its own, by file name.
pub fn value_sets() -> Vec<(String, Vec<PathBuf>)> {
    let mut sets = vec![("default".to_string(), vec![])];
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("charts/margay/ci")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    for f in files {
        sets.push((
            f.file_name().unwrap().to_string_lossy().into_owned(),
            vec![f],
        ));
    }
    sets
}

/// The chart's text as `helm template` renders it with `values` files, or helm's error text.
pub fn render_text(values: &[PathBuf], include_crds: bool) -> Result<String, String> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "margay"]).arg(chart_dir());
    cmd.args(["--namespace", NAMESPACE]);
    if include_crds {
        cmd.arg("--include-crds");
    }
    for v in values {
        cmd.arg("-f").arg(v);
    }
    let out = cmd.output().expect("helm runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8(out.stdout).expect("utf-8"))
}

/// Every object the chart renders with `values`, or helm's error text.
pub fn render(values: &[PathBuf], include_crds: bool) -> Result<Vec<Value>, String> {
    let text = render_text(values, include_crds)?;
    Ok(serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v = <Value as serde::Deserialize>::deserialize(d).expect("rendered YAML parses");
            (!v.is_null()).then_some(v)
        })
        .collect())
}

/// Runs kubectl with `args` against the cluster of `kubeconfig`, `stdin` on its standard
/// input; its standard output, or an error with what it said.
pub fn run_kubectl(kubeconfig: &Path, args: &[&str], stdin: &str) -> Result<String> {
    use std::io::Write;
    let mut child = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting kubectl")?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs what the chart renders with `values` (CRDs excluded: the API server harness
/// installs them) into the cluster of `kubeconfig`, as an administrator would with kubectl.
pub fn apply(kubeconfig: &Path, values: &[PathBuf]) -> Result<()> {
    let text = render_text(values, false).map_err(|e| anyhow::anyhow!("helm template: {e}"))?;
    run_kubectl(kubeconfig, &["create", "namespace", NAMESPACE], "").or_else(|e| {
        if e.to_string().contains("AlreadyExists") {
            Ok(String::new())
        } else {
            Err(e)
        }
    })?;
    run_kubectl(kubeconfig, &["apply", "-f", "-"], &text)?;
    Ok(())
}

/// Creates Pod `namespace/name` with `annotations`, as the scheduler would have it before the
/// kubelet runs the CNI plugin. These clusters run no controller manager, so the namespace's
/// `default` ServiceAccount, which admission insists on, is made here, and no token is mounted.
pub fn create_pod(
    kubeconfig: &Path,
    namespace: &str,
    name: &str,
    node: &str,
    annotations: &[(&str, &str)],
) -> Result<()> {
    let pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": annotations.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect::<serde_json::Map<_, _>>(),
        },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": false,
            "containers": [{"name": "main", "image": "registry.invalid/pause"}],
        },
    });
    let account = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "default", "namespace": namespace},
    });
    run_kubectl(kubeconfig, &["apply", "-f", "-"], &account.to_string())?;
    run_kubectl(kubeconfig, &["apply", "-f", "-"], &pod.to_string())?;
    Ok(())
}
