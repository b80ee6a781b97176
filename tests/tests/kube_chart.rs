//! The chart and the CRDs against a real kube-apiserver, the way a user meets them: the CRDs
//! are accepted and structural, the server refuses the pools a schema can refuse, every rendered
//! object of every value set passes a server-side dry run, and `helm install`, `upgrade` and
//! `uninstall` work.
//!
//! The API server comes from `KUBE_APISERVER_BIN` or `PATH`; without one these tests say
//! SKIPPED, and under `CI=true` they fail.

use margay_testkit::apiserver::{require_apiserver, Options};
use margay_testkit::chart::{self, run_kubectl, NAMESPACE};
use margay_testkit::ApiServerProcess;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const SUITE: &str = "chart and CRDs on a real API server";

async fn server(crds: bool) -> Option<(ApiServerProcess, tempfile::TempDir, PathBuf)> {
    let bin = require_apiserver(SUITE)?;
    let api = ApiServerProcess::start_with(
        &bin,
        Options {
            crds,
            ..Options::RBAC
        },
    )
    .await
    .expect("starting kube-apiserver");
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("admin.kubeconfig");
    api.write_kubeconfig(&kubeconfig, None).expect("kubeconfig");
    Some((api, dir, kubeconfig))
}

fn kubectl_json(kubeconfig: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let text = run_kubectl(kubeconfig, &all, "").expect("kubectl get");
    serde_json::from_str(&text).expect("kubectl prints JSON")
}

#[tokio::test]
async fn every_crd_is_established_and_structural() {
    let Some((api, _dir, kubeconfig)) = server(true).await else {
        return;
    };
    let crds = kubectl_json(&kubeconfig, &["get", "crd"]);
    let mut names = Vec::new();
    for crd in crds["items"].as_array().expect("items") {
        let name = crd["metadata"]["name"].as_str().unwrap_or("").to_owned();
        let conditions = crd["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let status = |t: &str| {
            conditions
                .iter()
                .find(|c| c["type"] == t)
                .map(|c| c["status"].as_str().unwrap_or("").to_owned())
        };
        assert_eq!(
            status("Established").as_deref(),
            Some("True"),
            "{name}: {conditions:?}"
        );
        assert_eq!(
            status("NamesAccepted").as_deref(),
            Some("True"),
            "{name}: {conditions:?}"
        );
        assert!(
            status("NonStructuralSchema").is_none(),
            "{name} ({}): {conditions:?}",
            api.version()
        );
        names.push(name);
    }
    let committed = margay_testkit::apiserver::read_crds(&margay_testkit::apiserver::crd_dir())
        .expect("committed CRDs");
    assert_eq!(names.len(), committed.len(), "{names:?}");
}

/// A pool as `kubectl apply` gets it from a user.
fn pool_yaml(name: &str, spec: &str) -> String {
    format!("apiVersion: margay.io/v1\nkind: IPPool\nmetadata:\n  name: {name}\nspec: {spec}\n")
}

#[tokio::test]
async fn the_server_refuses_the_pools_the_schema_can_check() {
    let Some((api, _dir, kubeconfig)) = server(true).await else {
        return;
    };
    // (spec, the field the refusal must name, a word of the reason)
    let mut cases = vec![
        ("{cidr: 10.300.0.0/16}", "spec.cidr", "should match"),
        ("{cidr: not-a-cidr}", "spec.cidr", "should match"),
        ("{cidr: 10.1.0.0}", "spec.cidr", "should match"),
        ("{cidr: 10.1.0.0/33}", "spec.cidr", "should match"),
        ("{cidr: 'fd00::/129'}", "spec.cidr", "should match"),
        (
            "{cidr: 10.1.0.0/16, blockSize: 200}",
            "spec.blockSize",
            "less than or equal to 128",
        ),
        (
            "{cidr: 10.1.0.0/16, blockSize: 8}",
            "spec.blockSize",
            "greater than or equal to 20",
        ),
        (
            "{cidr: 10.1.0.0/16, ipipMode: Sometimes}",
            "spec.ipipMode",
            "Unsupported value",
        ),
        (
            "{cidr: 10.1.0.0/16, vxlanMode: always}",
            "spec.vxlanMode",
            "Unsupported value",
        ),
        (
            "{cidr: 10.1.0.0/16, allowedUses: []}",
            "spec.allowedUses",
            "at least 1",
        ),
        (
            "{cidr: 10.1.0.0/16, allowedUses: [Pods]}",
            "spec.allowedUses",
            "Unsupported value",
        ),
        (
            "{cidr: 10.1.0.0/16, natOutgoing: sure}",
            "spec.natOutgoing",
            "boolean",
        ),
        (
            "{cidr: 10.1.0.0/16, blockSize: 26.5}",
            "spec.blockSize",
            "integer",
        ),
    ];
    // What needs more than one field: the CEL rules, where the server enforces them (older
    // servers store such pools and the controller marks them Valid=False; see the lab's
    // invalid-pool scenario).
    if api.enforces_cel() {
        cases.extend([
            (
                "{cidr: 10.1.0.0/16, ipipMode: Always, vxlanMode: CrossSubnet}",
                "spec",
                "cannot both be enabled",
            ),
            (
                "{cidr: 'fd00:10::/64', ipipMode: Always}",
                "spec",
                "ipipMode carries only IPv4",
            ),
            (
                "{cidr: 'fd00:10::/64', blockSize: 122, vxlanMode: Always}",
                "spec",
                "does not carry IPv6 in VXLAN",
            ),
            (
                "{cidr: 10.1.0.0/16, blockSize: 100}",
                "spec",
                "blockSize must be 20 to 32 for an IPv4 pool",
            ),
            (
                "{cidr: 'fd00:10::/64', blockSize: 26}",
                "spec",
                "116 to 128 for an IPv6 pool",
            ),
            ("{cidr: 10.1.0.0/28}", "spec", "smaller than one block"),
            (
                "{cidr: 10.1.0.0/16, allowedUses: [Workload, LoadBalancer]}",
                "spec",
                "LoadBalancer is not supported",
            ),
        ]);
    } else {
        println!(
            "{}: CEL rules are not enforced before 1.25; the schema's other checks are tested",
            api.version()
        );
    }
    for (spec, field, reason) in cases {
        // --validate=false: the refusal must come from the server, not from kubectl.
        let err = run_kubectl(
            &kubeconfig,
            &["apply", "--validate=false", "-f", "-"],
            &pool_yaml("bad", spec),
        )
        .expect_err(spec)
        .to_string();
        assert!(
            err.contains("IPPool")
                && err.contains("bad")
                && err.contains(field)
                && err.contains(reason),
            "{spec}: the refusal must name the object, {field} and why: {err}"
        );
    }
    // Nothing of them was stored.
    let pools = kubectl_json(&kubeconfig, &["get", "ippools"]);
    assert_eq!(pools["items"].as_array().map(Vec::len), Some(0), "{pools}");
    // A good pool goes in, dual-stack spellings included.
    for (name, spec) in [
        ("v4", "{cidr: 10.1.0.0/16}"),
        ("v6", "{cidr: 'fd00:10::/64', blockSize: 122}"),
        ("v6short", "{cidr: '::ffff:0:0/96', blockSize: 120}"),
    ] {
        run_kubectl(&kubeconfig, &["apply", "-f", "-"], &pool_yaml(name, spec))
            .unwrap_or_else(|e| panic!("{spec} refused: {e}"));
    }
}

#[tokio::test]
async fn every_value_set_passes_a_server_side_dry_run() {
    let Some((_api, _dir, kubeconfig)) = server(true).await else {
        return;
    };
    run_kubectl(&kubeconfig, &["create", "namespace", NAMESPACE], "").expect("namespace");
    // metrics-values.yaml renders a ServiceMonitor, whose CRD the Prometheus Operator brings
    // on a real cluster; here a stand-in of the same group and kind that takes any spec.
    run_kubectl(&kubeconfig, &["apply", "-f", "-"], SERVICE_MONITOR_CRD)
        .expect("ServiceMonitor CRD");
    run_kubectl(
        &kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
        ],
        "",
    )
    .expect("ServiceMonitor CRD established");
    for (set, files) in chart::value_sets() {
        let text = chart::render_text(&files, false).unwrap_or_else(|e| panic!("{set}: {e}"));
        let out = run_kubectl(
            &kubeconfig,
            &["apply", "--dry-run=server", "-f", "-"],
            &text,
        )
        .unwrap_or_else(|e| panic!("{set}: the server refused the rendered chart: {e}"));
        let applied = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        let objects = chart::render(&files, false).expect("render").len();
        assert_eq!(applied, objects, "{set}: {out}");
    }
}

const SERVICE_MONITOR_CRD: &str = "
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: servicemonitors.monitoring.coreos.com
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
";

fn helm(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new(chart::helm())
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CACHE_HOME", kubeconfig.with_file_name("helm-cache"))
        .env("HELM_CONFIG_HOME", kubeconfig.with_file_name("helm-config"))
        .env("HELM_DATA_HOME", kubeconfig.with_file_name("helm-data"))
        .args(args)
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn helm_installs_upgrades_and_uninstalls_the_chart() {
    // No CRDs beforehand: helm installs them from the chart's crds/, as on a new cluster.
    let Some((_api, _dir, kubeconfig)) = server(false).await else {
        return;
    };
    let chart_dir = chart::chart_dir();
    let chart_dir = chart_dir.to_str().expect("utf-8 path");
    helm(
        &kubeconfig,
        &[
            "install",
            "margay",
            chart_dir,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
        ],
    );
    let crds = kubectl_json(&kubeconfig, &["get", "crd"]);
    assert_eq!(
        crds["items"].as_array().map(Vec::len),
        Some(margay_api::crd::all().len()),
        "helm installed every CRD"
    );
    let pools = kubectl_json(&kubeconfig, &["get", "ippools"]);
    let names: Vec<&str> = pools["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    assert_eq!(names, ["default-ipv4"], "the default pool");
    // `kubectl get ippools` shows the columns users read.
    let table = run_kubectl(&kubeconfig, &["get", "ippools"], "").expect("get ippools");
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "CIDR", "VALID", "BLOCK", "IPIP", "VXLAN", "NAT", "DISABLED"],
        "{table}"
    );

    let two_pools = chart::chart_dir().join("ci/two-pools-values.yaml");
    helm(
        &kubeconfig,
        &[
            "upgrade",
            "margay",
            chart_dir,
            "--namespace",
            NAMESPACE,
            "-f",
            two_pools.to_str().expect("utf-8 path"),
        ],
    );
    let deploy = kubectl_json(
        &kubeconfig,
        &[
            "get",
            "deployment",
            "margay-ipam-controller",
            "-n",
            NAMESPACE,
        ],
    );
    assert_eq!(deploy["metadata"]["name"], "margay-ipam-controller");

    helm(
        &kubeconfig,
        &["uninstall", "margay", "--namespace", NAMESPACE],
    );
    let left = kubectl_json(
        &kubeconfig,
        &[
            "get",
            "daemonsets,deployments,serviceaccounts",
            "-n",
            NAMESPACE,
        ],
    );
    let workloads: Vec<&str> = left["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("margay"))
        })
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert!(workloads.is_empty(), "left after uninstall: {workloads:?}");
}
