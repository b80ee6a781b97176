//! margay-ipam-controller on a real kube-apiserver with RBAC on, authenticated as the chart's
//! `margay-ipam-controller` ServiceAccount with exactly the chart's Roles: two replicas elect a
//! leader, the leader marks every pool (invalid ones with the reason, each on its own), the
//! other takes over within the lease duration when the leader is killed with SIGKILL, and the
//! API server refuses none of their requests.
//!
//! The API server comes from `KUBE_APISERVER_BIN` or `PATH`; without one the test says
//! SKIPPED, and under `CI=true` it fails.

use margay_testkit::apiserver::{require_apiserver, Options};
use margay_testkit::chart::{self, run_kubectl, NAMESPACE};
use margay_testkit::ApiServerProcess;
mod common;

use common::Replica;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(4);

/// A replica authenticated by `kubeconfig` (the chart's ServiceAccount).
fn start(kubeconfig: &Path, identity: &str, dir: &Path) -> Replica {
    let kubeconfig = kubeconfig.display().to_string();
    Replica::start(
        identity,
        LEASE,
        dir,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("MARGAY_DATASTORE_TYPE", "kubernetes"),
            ("POD_NAMESPACE", NAMESPACE),
        ],
    )
}

fn get_json(kubeconfig: &Path, args: &[&str]) -> Value {
    let mut all = vec!["get"];
    all.extend(args);
    all.extend(["-o", "json"]);
    serde_json::from_str(&run_kubectl(kubeconfig, &all, "").expect("kubectl get")).expect("JSON")
}

fn holder(admin: &Path) -> Option<String> {
    let args = [
        "get",
        "lease",
        "margay-ipam-controller",
        "-n",
        NAMESPACE,
        "-o",
        "json",
    ];
    match run_kubectl(admin, &args, "") {
        Ok(text) => {
            let lease: Value = serde_json::from_str(&text).expect("JSON");
            lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
        }
        Err(e) if e.to_string().contains("NotFound") => None,
        Err(e) => panic!("reading the lease: {e}"),
    }
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The `Valid` condition of each pool: name → (status, reason, message).
fn validity(admin: &Path) -> Vec<(String, String, String, String)> {
    let pools = get_json(admin, &["ippools"]);
    pools["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let c = p["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Valid")?
                .clone();
            let s = |v: &Value| v.as_str().unwrap_or("").to_owned();
            Some((
                s(&p["metadata"]["name"]),
                s(&c["status"]),
                s(&c["reason"]),
                s(&c["message"]),
            ))
        })
        .collect()
}

#[tokio::test]
async fn replicas_under_the_chart_service_account_validate_pools_and_fail_over() {
    let Some(bin) = require_apiserver("margay-ipam-controller under RBAC") else {
        return;
    };
    let api = ApiServerProcess::start_with(&bin, Options::RBAC)
        .await
        .expect("starting kube-apiserver");
    let dir = tempfile::tempdir().expect("temp dir");
    let admin = dir.path().join("admin.kubeconfig");
    api.write_kubeconfig(&admin, None).expect("kubeconfig");
    chart::apply(&admin, &[]).expect("installing the chart's objects");
    let token = api
        .service_account_token(NAMESPACE, "margay-ipam-controller")
        .await
        .expect("token");
    let sa = dir.path().join("controller.kubeconfig");
    api.write_kubeconfig(&sa, Some(&token)).expect("kubeconfig");

    // Pools a user applies with kubectl that a server without CEL takes; Margay refuses each
    // on its own. `default-ipv4` comes from the chart.
    let bad = [
        (
            "block-33",
            "{cidr: 10.10.0.0/16, blockSize: 33}",
            "spec.blockSize",
        ),
        ("host-bits", "{cidr: 10.9.0.1/16}", "spec.cidr"),
        (
            "two-encaps",
            "{cidr: 10.11.0.0/16, ipipMode: Always, vxlanMode: Always}",
            "spec.vxlanMode",
        ),
        (
            "bad-selector",
            "{cidr: 10.12.0.0/16, nodeSelector: 'zone =='}",
            "spec.nodeSelector",
        ),
        ("tiny", "{cidr: 10.13.0.0/28}", "spec.blockSize"),
        (
            "inner",
            "{cidr: 10.244.8.0/24}",
            "overlaps the older pool(s) default-ipv4",
        ),
    ];
    // A server that runs CEL (v1.25 on) refuses some of them itself: those are left out.
    // No schema or CEL rule sees host bits, so that one always gets through.
    let mut bad = bad.to_vec();
    bad.retain(|(name, spec, _)| {
        let yaml = format!(
            "apiVersion: margay.io/v1\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {spec}\n"
        );
        match run_kubectl(&admin, &["apply", "-f", "-"], &yaml) {
            Ok(_) => true,
            Err(e) if e.to_string().contains("is invalid") && *name != "host-bits" => false,
            Err(e) => panic!("{name}: {e}"),
        }
    });

    let mut a = start(&sa, "replica-a", dir.path());
    let first = wait_for("a leader", Duration::from_secs(30), || {
        holder(&admin).filter(|h| h == "replica-a")
    });
    assert_eq!(first, "replica-a");
    let mut b = start(&sa, "replica-b", dir.path());

    let seen = wait_for("every pool marked", Duration::from_secs(30), || {
        let v = validity(&admin);
        (v.len() == bad.len() + 1).then_some(v)
    });
    for (name, status, reason, message) in &seen {
        match bad.iter().find(|(n, _, _)| n == name) {
            None => assert_eq!((name.as_str(), status.as_str()), ("default-ipv4", "True")),
            Some((_, _, why)) => {
                assert_eq!(status, "False", "{name}: {reason} {message}");
                assert!(message.contains(why), "{name}: {message}");
            }
        }
    }
    let table = run_kubectl(&admin, &["get", "ippools"], "").expect("get ippools");
    let default_row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("default-ipv4"))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(default_row.get(2..4), Some(&["True", "26"][..]), "{table}");

    // The leader dies without a word; the other replica leads within the lease duration.
    let killed = Instant::now();
    a.kill();
    let next = wait_for("a new leader", LEASE + Duration::from_secs(5), || {
        holder(&admin).filter(|h| h == "replica-b")
    });
    assert_eq!(next, "replica-b");
    let took = killed.elapsed();
    assert!(
        took <= LEASE + Duration::from_secs(3),
        "took over after {took:?}"
    );
    // And it works as leader: a pool fixed by the user turns valid.
    let fixed = "apiVersion: margay.io/v1\nkind: IPPool\nmetadata: {name: host-bits}\nspec: {cidr: 10.9.0.0/16}\n";
    run_kubectl(&admin, &["apply", "-f", "-"], fixed).expect("fixing host-bits");
    wait_for(
        "the fixed pool marked valid",
        Duration::from_secs(20),
        || {
            validity(&admin)
                .into_iter()
                .find(|(n, s, _, _)| n == "host-bits" && s == "True")
        },
    );

    let refused = api
        .forbidden("system:serviceaccount:margay-system:")
        .expect("audit log");
    assert!(
        refused.is_empty(),
        "the API server refused requests of the chart's ServiceAccounts:\n{}\nreplica-b's log:\n{}",
        refused.join("\n"),
        b.log()
    );
    b.kill();
}
