//! The real `margay` plugin with the Kubernetes datastore, on a real kube-apiserver with RBAC,
//! authenticated as the chart's `margay-cni` ServiceAccount: ADD, CHECK and DEL of a pod whose
//! Pod object the test creates (as the scheduler would), an error that names the pool and the
//! reason for a pod whose annotation asks for an invalid pool, and not one request refused.
//!
//! Needs root (network namespaces) and a kube-apiserver (`KUBE_APISERVER_BIN` or `PATH`);
//! without either it says SKIPPED, and under `CI=true` it fails.

mod common;

use common::*;
use margay_cni::spec::code;
use margay_testkit::apiserver::{require_apiserver, Options};
use margay_testkit::chart::{self, run_kubectl, NAMESPACE};
use margay_testkit::ApiServerProcess;
use serde_json::{json, Value};

#[test]
fn netns_kubernetes_datastore_under_the_chart_service_account() {
    if !can_run("netns_kubernetes_datastore_under_the_chart_service_account") {
        return;
    }
    let Some(bin) = require_apiserver("CNI plugin with the Kubernetes datastore") else {
        return;
    };
    let rt = runtime();
    let api = rt
        .block_on(ApiServerProcess::start_with(&bin, Options::RBAC))
        .expect("starting kube-apiserver");
    let dir = tempfile::tempdir().expect("temp dir");
    let admin = dir.path().join("admin.kubeconfig");
    api.write_kubeconfig(&admin, None).expect("kubeconfig");
    chart::apply(&admin, &[]).expect("installing the chart's objects");
    let token = rt
        .block_on(api.service_account_token(NAMESPACE, "margay-cni"))
        .expect("token");
    let kubeconfig = dir.path().join("cni.kubeconfig");
    api.write_kubeconfig(&kubeconfig, Some(&token))
        .expect("kubeconfig");
    // A pool every server takes (no schema or CEL rule sees host bits) and Margay refuses.
    let bad = "apiVersion: margay.io/v1\nkind: IPPool\nmetadata: {name: host-bits}\nspec: {cidr: 10.10.0.1/16}\n";
    run_kubectl(&admin, &["apply", "-f", "-"], bad).expect("host-bits");

    let node = Node::new();
    let state = tempfile::tempdir().expect("state dir");
    let conf = json!({
        "cniVersion": "1.1.0",
        "name": "k8s-pod-network",
        "type": "margay",
        "nodename": "node-a",
        "datastore_type": "kubernetes",
        "kubernetes": {"kubeconfig": kubeconfig},
        "mtu": 1400,
        "ipam": {"type": "margay-ipam"},
        "state_dir": state.path(),
        "node_netns": node.ns.path(),
    });

    let web = Pod::new("web");
    chart::create_pod(&admin, &web.namespace, &web.name, "node-a", &[]).expect("pod web");
    let added = cni("ADD", &web, &conf).ok();
    let addr = added["ips"][0]["address"].as_str().unwrap_or("").to_owned();
    assert!(
        addr.starts_with("10.244.") && addr.ends_with("/32"),
        "{added}"
    );
    assert_eq!(web.ipv4().as_deref(), Some(addr.trim_end_matches("/32")));
    assert!(ping(&web.ns, NODE_IP, 3), "the pod cannot reach its node");
    check(&web, &conf, &added).ok();

    // The pod asks for the refused pool: the error names it and why, and nothing is allocated.
    let picky = Pod::new("picky");
    chart::create_pod(
        &admin,
        &picky.namespace,
        &picky.name,
        "node-a",
        &[("margay.io/ipv4pools", r#"["host-bits"]"#)],
    )
    .expect("pod picky");
    let run = cni("ADD", &picky, &conf);
    let err = run.err(code::INVALID_CONFIG);
    let text = format!("{} {}", err["msg"], err["details"]);
    assert!(
        text.contains("host-bits") && text.contains("spec.cidr"),
        "{err}"
    );
    assert!(picky.ipv4().is_none());

    let handles = |admin| -> Vec<Value> {
        let text = run_kubectl(admin, &["get", "ipamhandles", "-o", "json"], "").expect("handles");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        v["items"].as_array().cloned().unwrap_or_default()
    };
    assert_eq!(handles(&admin).len(), 1, "only web holds an address");
    cni("DEL", &picky, &conf).ok();
    cni("DEL", &web, &conf).ok();
    assert!(handles(&admin).is_empty(), "DEL released web's address");

    let refused = api
        .forbidden("system:serviceaccount:margay-system:")
        .expect("audit log");
    assert!(
        refused.is_empty(),
        "the API server refused requests of margay-cni:\n{}",
        refused.join("\n")
    );
}
