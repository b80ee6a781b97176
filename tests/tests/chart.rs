//! The Helm chart, checked the way a platform team would before merging it: `helm lint
//! --strict`, renders with the default values and every value set under `charts/margay/ci/`,
//! and properties of every rendered object.

use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm() -> PathBuf {
    let p = root().join(".tools/bin/helm");
    assert!(
        p.is_file(),
        "helm is not installed at {}: run scripts/get-helm.sh (scripts/setup.sh does)",
        p.display()
    );
    p
}

fn chart() -> PathBuf {
    root().join("charts/margay")
}

/// Renders the chart with `values` files; returns every object, or helm's error text.
fn render(values: &[PathBuf], include_crds: bool) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "margay"]).arg(chart());
    cmd.args(["--namespace", "margay-system"]);
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
    let text = String::from_utf8(out.stdout).expect("utf-8");
    Ok(serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v = <Value as serde::Deserialize>::deserialize(d).expect("rendered YAML parses");
            (!v.is_null()).then_some(v)
        })
        .collect())
}

fn value_sets() -> Vec<(String, Vec<PathBuf>)> {
    let mut sets = vec![("default".to_string(), vec![])];
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
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
}
