//! The Helm chart, checked the way a platform team would before merging it: `helm lint
//! --strict`, renders with the default values and every value set under `charts/margay/ci/`,
//! and properties of every rendered object.

use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

use margay_testkit::chart::{helm, render, value_sets};

fn chart() -> PathBuf {
    margay_testkit::chart::chart_dir()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or("")
}

fn name(v: &Value) -> &str {
    s(v, &["metadata", "name"]).as_str().unwrap_or("")
}

fn pod_spec(v: &Value) -> Option<&Value> {
    matches!(kind(v), "DaemonSet" | "Deployment" | "StatefulSet")
        .then(|| s(v, &["spec", "template", "spec"]))
}

#[test]
fn helm_lint_strict_passes() {
    let out = Command::new(helm())
        .args(["lint", "--strict"])
        .arg(chart())
        .output()
        .expect("helm runs");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_value_set_renders_and_every_container_is_bounded_and_probed() {
    let sets = value_sets();
    assert!(
        sets.len() >= 6,
        "default plus at least five value sets, have {}",
        sets.len()
    );
    for (set, files) in sets {
        let objs = render(&files, false).unwrap_or_else(|e| panic!("{set}: {e}"));
        for o in objs.iter() {
            let Some(spec) = pod_spec(o) else { continue };
            let containers = spec["containers"].as_sequence().into_iter().flatten();
            let inits = spec["initContainers"].as_sequence().into_iter().flatten();
            for c in containers.clone().chain(inits) {
                let cname = c["name"].as_str().unwrap_or("");
                let r = &c["resources"];
                assert!(
                    r["requests"].is_mapping() && r["limits"]["memory"].as_str().is_some(),
                    "{set}: {} {}/{cname} needs requests and a memory limit",
                    kind(o),
                    name(o)
                );
                assert_eq!(
                    c["securityContext"]["allowPrivilegeEscalation"],
                    Value::Bool(false),
                    "{set}: {cname}"
                );
            }
            // Every long-running container serves health endpoints and is probed on them.
            for c in containers {
                let cname = c["name"].as_str().unwrap_or("");
                for probe in ["livenessProbe", "readinessProbe"] {
                    assert!(
                        c[probe]["httpGet"]["path"].as_str().is_some(),
                        "{set}: {cname} has no {probe}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_node_agent_has_exactly_the_host_access_it_needs() {
    let objs = render(&[], false).expect("render");
    let ds = objs
        .iter()
        .find(|o| kind(o) == "DaemonSet")
        .expect("DaemonSet");
    let spec = pod_spec(ds).unwrap();
    assert_eq!(spec["hostNetwork"], Value::Bool(true));
    assert_eq!(
        spec["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    assert_eq!(
        spec["tolerations"][0]["operator"].as_str(),
        Some("Exists"),
        "tolerates every taint"
    );
    assert_eq!(
        s(
            ds,
            &["spec", "updateStrategy", "rollingUpdate", "maxUnavailable"]
        )
        .as_u64(),
        Some(1)
    );
    let host_paths: BTreeSet<&str> = spec["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from([
            "/opt/cni/bin",
            "/etc/cni/net.d",
            "/var/lib/margay",
            "/proc/sys/net"
        ]),
        "host mounts differ from those the chart README lists"
    );
    let agent = &spec["containers"][0];
    assert_eq!(agent["securityContext"]["privileged"], Value::Bool(false));
    let caps: BTreeSet<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        caps,
        BTreeSet::from(["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE"])
    );
    assert_eq!(
        agent["securityContext"]["capabilities"]["drop"][0].as_str(),
        Some("ALL")
    );
    let init = &spec["initContainers"][0];
    assert_eq!(init["command"][0].as_str(), Some("margay-cni"));
    assert_eq!(init["command"][1].as_str(), Some("install"));
    assert!(agent["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|p| p["name"].as_str() == Some("metrics")));
}

#[test]
fn no_role_grants_everything() {
    for (set, files) in value_sets() {
        for o in render(&files, false).expect("render") {
            if !matches!(kind(&o), "ClusterRole" | "Role") {
                continue;
            }
            for rule in o["rules"].as_sequence().into_iter().flatten() {
                for field in ["verbs", "resources", "apiGroups"] {
                    for v in rule[field].as_sequence().into_iter().flatten() {
                        assert_ne!(
                            v.as_str(),
                            Some("*"),
                            "{set}: {} {} grants * in {field}",
                            kind(&o),
                            name(&o)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_chart_ships_exactly_the_generated_crds() {
    let objs = render(&[], true).expect("render with CRDs");
    let rendered: Vec<serde_json::Value> = objs
        .iter()
        .filter(|o| kind(o) == "CustomResourceDefinition")
        .map(|o| serde_json::to_value(o).unwrap())
        .collect();
    let generated: Vec<serde_json::Value> = margay_api::crd::all()
        .into_iter()
        .map(|c| serde_json::to_value(c).unwrap())
        .collect();
    assert_eq!(rendered.len(), generated.len());
    for g in &generated {
        assert!(
            rendered.contains(g),
            "CRD {} in the chart differs from the Rust types; run margay-crdgen",
            g["metadata"]["name"]
        );
    }
}

/// The binaries a Dockerfile's final stage copies into /usr/local/bin.
fn shipped_binaries(dockerfile: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("images").join(dockerfile)).expect("Dockerfile");
    text.lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|dest| dest.strip_prefix("/usr/local/bin/"))
        .map(String::from)
        .collect()
}

#[test]
fn the_conflist_names_binaries_the_node_image_ships() {
    let bins = shipped_binaries("node.Dockerfile");
    for (set, files) in value_sets() {
        let objs = render(&files, false).expect("render");
        let cm = objs
            .iter()
            .find(|o| kind(o) == "ConfigMap" && name(o) == "margay-cni-config")
            .expect("CNI ConfigMap");
        let conflist: serde_json::Value =
            serde_json::from_str(cm["data"]["conflist"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{set}: the conflist is not JSON: {e}"));
        for p in conflist["plugins"].as_array().unwrap() {
            let t = p["type"].as_str().unwrap();
            assert!(
                bins.contains(t),
                "{set}: plugin type {t} is not in the node image ({bins:?})"
            );
            if let Some(ipam) = p["ipam"]["type"].as_str() {
                assert!(
                    bins.contains(ipam),
                    "{set}: IPAM type {ipam} is not in the node image"
                );
            }
        }
        // The binaries the workloads run are shipped too.
        for o in &objs {
            let Some(spec) = pod_spec(o) else { continue };
            let image_file = match name(o) {
                "margay-node" => "node.Dockerfile",
                "margay-ipam-controller" => "ipam-controller.Dockerfile",
                "margay-bgpd" => "bgpd.Dockerfile",
                other => panic!("{set}: unexpected workload {other}"),
            };
            let shipped = shipped_binaries(image_file);
            let all = spec["containers"]
                .as_sequence()
                .into_iter()
                .flatten()
                .chain(spec["initContainers"].as_sequence().into_iter().flatten());
            for c in all {
                let cmd = c["command"][0].as_str().unwrap();
                assert!(
                    shipped.contains(cmd),
                    "{set}: {} runs {cmd}, which {image_file} does not ship",
                    name(o)
                );
            }
        }
    }
}

#[test]
fn values_of_the_wrong_type_or_unknown_keys_are_rejected() {
    let data = root().join("tests/data/chart");
    let err =
        render(&[data.join("wrong-type-values.yaml")], false).expect_err("wrong type accepted");
    assert!(err.contains("mtu") && err.contains("Invalid type"), "{err}");
    let err =
        render(&[data.join("unknown-key-values.yaml")], false).expect_err("unknown key accepted");
    assert!(err.contains("ippools"), "{err}");
}

#[test]
fn install_time_resources_are_never_touched_by_upgrades() {
    for (set, files) in value_sets() {
        for o in render(&files, false).expect("render") {
            if o["apiVersion"].as_str() == Some("margay.io/v1") {
                assert_eq!(
                    s(&o, &["metadata", "annotations", "helm.sh/hook"]).as_str(),
                    Some("post-install"),
                    "{set}: {} {} must be created by the post-install hook only",
                    kind(&o),
                    name(&o)
                );
            }
        }
    }
}

#[test]
fn route_reflector_wiring_is_rendered_only_when_enabled() {
    let default = render(&[], false).expect("render");
    assert!(!default.iter().any(|o| name(o) == "margay-bgpd"));
    let rr = render(&[chart().join("ci/route-reflectors-values.yaml")], false).expect("render");
    assert!(rr
        .iter()
        .any(|o| kind(o) == "StatefulSet" && name(o) == "margay-bgpd"));
    let peers: Vec<&Value> = rr.iter().filter(|o| kind(o) == "BGPPeer").collect();
    assert!(peers.iter().any(
        |p| s(p, &["spec", "peerSelector"]).as_str() == Some("has(margay.io/route-reflector)")
    ));
    let cfg = rr.iter().find(|o| kind(o) == "BGPConfiguration").unwrap();
    assert_eq!(
        s(cfg, &["spec", "nodeToNodeMeshEnabled"]),
        &Value::Bool(false)
    );
    // The reflector's BGP address is the node's (it runs in the host's network namespace).
    let sts = rr.iter().find(|o| kind(o) == "StatefulSet").unwrap();
    let spec = pod_spec(sts).unwrap();
    assert_eq!(spec["hostNetwork"], Value::Bool(true));
    let env = spec["containers"][0]["env"].as_sequence().unwrap();
    let ip = env
        .iter()
        .find(|e| e["name"].as_str() == Some("MARGAY_IP"))
        .expect("MARGAY_IP");
    assert_eq!(
        ip["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        Some("status.hostIP")
    );
}

/// The cargo that runs this test (cargo sets `CARGO` for the processes it starts).
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned()));
    c.current_dir(root());
    c
}

/// Every binary target of every workspace package, by package, from `cargo metadata`.
fn workspace_binaries() -> BTreeMap<String, BTreeSet<String>> {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let bins = p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect();
            (p["name"].as_str().unwrap().to_owned(), bins)
        })
        .collect()
}

/// Every container and init container of a workload.
fn all_containers(spec: &Value) -> impl Iterator<Item = &Value> {
    spec["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_sequence().into_iter().flatten())
}

#[test]
fn every_container_runs_a_binary_a_workspace_crate_builds() {
    let built: BTreeSet<String> = workspace_binaries().into_values().flatten().collect();
    let mut seen = BTreeSet::new();
    for (set, files) in value_sets() {
        for o in render(&files, false).expect("render") {
            let Some(spec) = pod_spec(&o) else { continue };
            for c in all_containers(spec) {
                let cmd = c["command"][0].as_str().unwrap_or_else(|| {
                    panic!("{set}: {} has a container without a command", name(&o))
                });
                assert!(
                    built.contains(cmd),
                    "{set}: {} runs {cmd}, which no workspace crate builds (binaries: {built:?})",
                    name(&o)
                );
                seen.insert(cmd.to_owned());
            }
        }
    }
    // The route reflector is among them (the ci value set turns it on).
    assert!(seen.contains("margay-bgpd"), "{seen:?}");
}

#[test]
fn every_binary_an_image_ships_is_built_by_its_dockerfile() {
    let bins = workspace_binaries();
    for dockerfile in [
        "node.Dockerfile",
        "ipam-controller.Dockerfile",
        "bgpd.Dockerfile",
    ] {
        let text =
            std::fs::read_to_string(root().join("images").join(dockerfile)).expect("Dockerfile");
        let build = text
            .lines()
            .find(|l| l.contains("cargo build"))
            .unwrap_or_else(|| panic!("{dockerfile} runs no cargo build"));
        let words: Vec<&str> = build.split_whitespace().collect();
        let built: BTreeSet<&String> = words
            .windows(2)
            .filter(|w| w[0] == "-p")
            .flat_map(|w| {
                bins.get(w[1]).unwrap_or_else(|| {
                    panic!("{dockerfile} builds {}, not a workspace package", w[1])
                })
            })
            .collect();
        for shipped in shipped_binaries(dockerfile) {
            assert!(
                built.contains(&shipped),
                "{dockerfile} copies {shipped}, which its `cargo build` does not build"
            );
        }
    }
    assert!(shipped_binaries("bgpd.Dockerfile").contains("margay-bgpd"));
}

/// margay-bgpd, built by cargo: no crate depends on a binary crate, so this test builds it.
fn margay_bgpd() -> PathBuf {
    let out = cargo()
        .args([
            "build",
            "-p",
            "margay-bgpd",
            "--bin",
            "margay-bgpd",
            "--message-format=json",
        ])
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo build -p margay-bgpd failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "margay-bgpd")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the margay-bgpd executable")
}

/// Whether `word` occurs in `text` as a whole token (not inside a longer name).
fn has_token(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

#[test]
fn margay_bgpd_accepts_the_flags_and_environment_the_chart_gives_it() {
    let bin = margay_bgpd();
    let help = Command::new(&bin)
        .arg("--help")
        .output()
        .expect("margay-bgpd runs");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let mut checked = 0;
    for (set, files) in value_sets() {
        for o in render(&files, false).expect("render") {
            if !(kind(&o) == "StatefulSet" && name(&o) == "margay-bgpd") {
                continue;
            }
            let c = &pod_spec(&o).unwrap()["containers"][0];
            let argv: Vec<&str> = c["command"]
                .as_sequence()
                .unwrap()
                .iter()
                .chain(c["args"].as_sequence().into_iter().flatten())
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(argv[0], "margay-bgpd");
            for flag in argv[1..].iter().filter(|a| a.starts_with("--")) {
                let flag = flag.split('=').next().unwrap();
                assert!(
                    has_token(&help, flag),
                    "{set}: the chart passes {flag}, which margay-bgpd --help does not list"
                );
            }
            // Every variable the chart sets is one margay-bgpd reads (its help names each).
            let mut run = Command::new(&bin);
            run.args(&argv[1..]).arg("--check").env_clear();
            for e in c["env"].as_sequence().unwrap() {
                let var = e["name"].as_str().unwrap();
                assert!(
                    has_token(&help, var),
                    "{set}: the chart sets {var} for margay-bgpd, which does not read it (not in --help)"
                );
                // The values, with the downward-API fields as the kubelet fills them in.
                let value = match (
                    e["value"].as_str(),
                    e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
                ) {
                    (Some(v), _) => v.to_owned(),
                    (None, Some("spec.nodeName")) => "rr-1".into(),
                    (None, Some("status.hostIP")) => "10.0.0.5".into(),
                    (None, Some("metadata.namespace")) => "margay-system".into(),
                    _ => {
                        panic!("{set}: env {var} comes from {e:?}, which this test cannot fill in")
                    }
                };
                run.env(var, value);
            }
            // ... and the settings they make are valid: `--check` validates without connecting.
            let out = run.output().expect("margay-bgpd runs");
            assert!(
                out.status.success(),
                "{set}: margay-bgpd {argv:?} --check refused the chart's settings: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "no value set renders the route reflectors");
}

#[test]
fn the_metrics_service_selects_every_workload_and_its_ports() {
    for (set, files) in value_sets() {
        let objs = render(&files, false).expect("render");
        let svc = objs
            .iter()
            .find(|o| kind(o) == "Service" && name(o) == "margay-metrics")
            .expect("margay-metrics Service");
        let selector = s(svc, &["spec", "selector"]).as_mapping().unwrap();
        let mut container_ports = BTreeSet::new();
        for o in &objs {
            let Some(spec) = pod_spec(o) else { continue };
            let labels = s(o, &["spec", "template", "metadata", "labels"]);
            for (k, v) in selector {
                assert_eq!(
                    &labels[k.as_str().unwrap()],
                    v,
                    "{set}: the margay-metrics Service does not select {} pods ({k:?})",
                    name(o)
                );
            }
            for c in all_containers(spec) {
                for p in c["ports"].as_sequence().into_iter().flatten() {
                    container_ports.insert(p["containerPort"].as_u64().unwrap());
                }
            }
        }
        for p in s(svc, &["spec", "ports"]).as_sequence().unwrap() {
            let port = p["targetPort"].as_u64().unwrap();
            assert!(
                container_ports.contains(&port),
                "{set}: margay-metrics port {} targets {port}, which no container declares",
                p["name"].as_str().unwrap_or("")
            );
        }
    }
}
