//! The lab, end to end: each scenario on a fresh lab (`lab up`, `lab scenario`, `lab down`),
//! run through the real margayctl binary as a user runs it, on etcd and again on the
//! Kubernetes datastore (`--datastore kubernetes`: a real kube-apiserver with RBAC, every
//! component as its chart ServiceAccount). Needs root, and a kube-apiserver for the Kubernetes
//! half (`KUBE_APISERVER_BIN` or `PATH`; without one those tests say SKIPPED, and fail under
//! `CI=true`). The tests in this file share the lab's fixed namespace names, and the CI profile
//! runs them one at a time.

use std::process::{Command, Output};
use std::time::Instant;

fn margayctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_margayctl"))
        .args(args)
        .output()
        .expect("margayctl runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Brings the lab down when dropped, so a failing test leaves nothing behind.
struct Lab;

impl Lab {
    fn up(args: &[&str]) -> Option<Lab> {
        if !margay_testkit::root_or_skip("lab test") {
            return None;
        }
        if args.contains(&"kubernetes") {
            margay_testkit::apiserver::require_apiserver("lab on the Kubernetes datastore")?;
        }
        // A lab left by an interrupted run would make `up` refuse.
        let _ = margayctl(&["lab", "down"]);
        let t = Instant::now();
        let mut full = vec!["lab", "up"];
        full.extend_from_slice(args);
        let out = margayctl(&full);
        let lab = Lab;
        assert!(
            out.status.success(),
            "lab up {args:?} failed:\n{}",
            text(&out)
        );
        let s = text(&out);
        assert!(s.contains("full reachability"), "{s}");
        assert_nothing_forbidden();
        println!(
            "lab up {args:?}: {:.1} s\n{}",
            t.elapsed().as_secs_f64(),
            s.lines().last().unwrap_or("")
        );
        Some(lab)
    }

    fn scenario(&self, name: &str) -> String {
        let out = margayctl(&["lab", "scenario", name]);
        let s = text(&out);
        assert!(out.status.success(), "scenario {name} failed:\n{s}");
        println!("{s}");
        assert_nothing_forbidden();
        s
    }
}

/// On the Kubernetes datastore: the API server refused no request of a component running as
/// its chart ServiceAccount (node agents, CNI plugin, controllers), per its audit log.
fn assert_nothing_forbidden() {
    let Ok(text) = std::fs::read_to_string("/run/margay-lab/kube/audit.log") else {
        return; // etcd datastore: no API server
    };
    let refused: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["responseStatus"]["code"] == 403)
        .filter(|e| {
            e["user"]["username"]
                .as_str()
                .is_some_and(|u| u.starts_with("system:serviceaccount:margay-system:"))
        })
        .map(|e| {
            format!(
                "{} {} {}",
                e["user"]["username"], e["verb"], e["requestURI"]
            )
        })
        .collect();
    assert!(
        refused.is_empty(),
        "the API server refused the chart's ServiceAccounts:\n{}",
        refused.join("\n")
    );
}

impl Drop for Lab {
    fn drop(&mut self) {
        let state = std::fs::read_to_string("/run/margay-lab/state.json").unwrap_or_default();
        let out = margayctl(&["lab", "down"]);
        if std::thread::panicking() {
            return;
        }
        assert!(out.status.success(), "lab down failed:\n{}", text(&out));
        let left: Vec<String> = std::fs::read_dir("/var/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("mgl-"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "lab down left namespaces: {left:?}");
        // Every process the lab recorded is gone (or a zombie awaiting its reaper).
        let v: serde_json::Value = serde_json::from_str(&state).unwrap_or_default();
        for d in v["daemons"].as_array().into_iter().flatten() {
            let pid = d["pid"].as_u64().unwrap_or(0);
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let running = !stat.is_empty()
                && !stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z');
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = cmd.contains(d["program"].as_str().unwrap_or("?"));
            assert!(
                !(running && ours),
                "lab down left {} (pid {pid}) running",
                d["name"]
            );
        }
    }
}

#[test]
fn lab_up_status_and_down() {
    let Some(_lab) = Lab::up(&[]) else { return };
    let out = margayctl(&["lab", "status"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    for want in ["node1", "node3", "pod-node2-1", "10.244."] {
        assert!(s.contains(want), "status lacks {want}:\n{s}");
    }
}

#[test]
fn lab_scenario_pod_churn() {
    let Some(lab) = Lab::up(&[]) else { return };
    let s = lab.scenario("pod-churn");
    assert!(s.contains("ipam check: clean"), "{s}");
}

#[test]
fn lab_scenario_pool_edit() {
    let Some(lab) = Lab::up(&[]) else { return };
    lab.scenario("pool-edit");
}

#[test]
fn lab_scenario_node_loss() {
    let Some(lab) = Lab::up(&[]) else { return };
    lab.scenario("node-loss");
}

#[test]
fn lab_scenario_mesh_to_rr() {
    let Some(lab) = Lab::up(&[]) else { return };
    lab.scenario("mesh-to-rr");
}

#[test]
fn lab_scenario_external_access_without_encapsulation() {
    let Some(lab) = Lab::up(&["--encap", "none"]) else {
        return;
    };
    lab.scenario("external-access");
}

#[test]
fn lab_scenario_nat_and_communities() {
    let Some(lab) = Lab::up(&[]) else { return };
    lab.scenario("nat");
    let s = lab.scenario("communities");
    assert!(s.contains("(65010,77)") && s.contains("gone"), "{s}");
}

#[test]
fn lab_with_margay_bgpd_as_route_reflector() {
    let Some(lab) = Lab::up(&["--router", "margay", "--encap", "none"]) else {
        return;
    };
    lab.scenario("external-access");
}

#[test]
fn lab_dual_stack_full_matrix_in_both_families() {
    dual_stack(&["--ipv6"]);
}

/// Dual stack: every pod has an address of each family, and every pod reaches every address
/// (across nodes in one subnet directly, to node 3's subnet through the BIRD ToR, which
/// learned the IPv6 blocks over the same sessions).
fn dual_stack(args: &[&str]) {
    let Some(_lab) = Lab::up(args) else {
        return;
    };
    // `lab status` exits non-zero unless the matrix, both families, is full.
    let out = margayctl(&["lab", "status"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("fd00:10:244:") && s.contains("pod-node3-1 v6"),
        "{s}"
    );
}

// ===== the same on the Kubernetes datastore =====

const KUBE: &[&str] = &["--datastore", "kubernetes"];

fn kube<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = KUBE.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn lab_kubernetes_up_status_gc_failover_and_invalid_pool() {
    let Some(lab) = Lab::up(KUBE) else { return };
    let out = margayctl(&["lab", "status"]);
    let s = text(&out);
    assert!(out.status.success(), "{s}");
    for want in ["node1", "node3", "pod-node2-1", "10.244."] {
        assert!(s.contains(want), "status lacks {want}:\n{s}");
    }
    let s = lab.scenario("gc-deleted-pod");
    assert!(s.contains("released"), "{s}");
    let s = lab.scenario("leader-failover");
    assert!(s.contains("leads"), "{s}");
    let s = lab.scenario("invalid-pool");
    assert!(
        s.contains("Valid=False") && s.contains("was refused"),
        "{s}"
    );
}

#[test]
fn lab_kubernetes_dual_stack_full_matrix_in_both_families() {
    dual_stack(&kube(&["--ipv6"]));
}

#[test]
fn lab_kubernetes_scenario_pod_churn() {
    let Some(lab) = Lab::up(KUBE) else { return };
    let s = lab.scenario("pod-churn");
    assert!(s.contains("ipam check: clean"), "{s}");
}

#[test]
fn lab_kubernetes_scenario_pool_edit() {
    let Some(lab) = Lab::up(KUBE) else { return };
    lab.scenario("pool-edit");
}

#[test]
fn lab_kubernetes_scenario_node_loss() {
    let Some(lab) = Lab::up(KUBE) else { return };
    lab.scenario("node-loss");
}

#[test]
fn lab_kubernetes_scenario_mesh_to_rr() {
    let Some(lab) = Lab::up(KUBE) else { return };
    lab.scenario("mesh-to-rr");
}

#[test]
fn lab_kubernetes_scenario_nat_and_communities() {
    let Some(lab) = Lab::up(KUBE) else { return };
    lab.scenario("nat");
    let s = lab.scenario("communities");
    assert!(s.contains("(65010,77)") && s.contains("gone"), "{s}");
}

#[test]
fn lab_kubernetes_scenario_external_access_without_encapsulation() {
    let Some(lab) = Lab::up(&kube(&["--encap", "none"])) else {
        return;
    };
    lab.scenario("external-access");
}

#[test]
fn lab_kubernetes_with_margay_bgpd_as_route_reflector() {
    let Some(lab) = Lab::up(&kube(&["--router", "margay", "--encap", "none"])) else {
        return;
    };
    lab.scenario("external-access");
}

#[test]
fn lab_scenario_invalid_pool_on_etcd() {
    let Some(lab) = Lab::up(&[]) else { return };
    let s = lab.scenario("invalid-pool");
    assert!(
        s.contains("Valid=False") && s.contains("was refused"),
        "{s}"
    );
}
