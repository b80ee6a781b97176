//! A table of bad inputs, each run through the real `margay` binary, each answered with the
//! spec's (or Margay's documented) error code, one JSON error on stdout, a non-zero exit, and
//! nothing left behind.

mod common;

use common::*;
use margay_cni::spec::code;
use serde_json::{json, Value};

struct Case {
    what: &'static str,
    env: Vec<(&'static str, String)>,
    stdin: Vec<u8>,
    code: u32,
}

#[test]
fn netns_bad_inputs_get_the_spec_error_codes() {
    if !can_run("netns_bad_inputs_get_the_spec_error_codes") {
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    let good = lab.conf("1.1.0");
    let pod = Pod::new("bad");
    // A container that already has eth0.
    let busy = Pod::new("busy");
    ip(
        &busy.ns,
        &[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ],
    );

    let conf_with = |f: &dyn Fn(&mut Value)| -> Vec<u8> {
        let mut c = good.clone();
        f(&mut c);
        c.to_string().into_bytes()
    };
    let env = |cmd: &str| pod_env(cmd, &pod);
    let env_without = |cmd: &str, drop: &str| -> Vec<(&'static str, String)> {
        pod_env(cmd, &pod)
            .into_iter()
            .filter(|(k, _)| *k != drop)
            .collect()
    };
    let env_with = |cmd: &str, key: &'static str, v: &str| -> Vec<(&'static str, String)> {
        let mut e: Vec<(&'static str, String)> = pod_env(cmd, &pod)
            .into_iter()
            .filter(|(k, _)| *k != key)
            .collect();
        e.push((key, v.to_owned()));
        e
    };
    let good_bytes = good.to_string().into_bytes();
    let prev = json!({"cniVersion": "1.1.0", "ips": [{"address": "10.244.0.9/32"}]});

    let cases = vec![
        Case {
            what: "invalid JSON",
            env: env("ADD"),
            stdin: b"{not json".to_vec(),
            code: code::DECODE_FAILURE,
        },
        Case {
            what: "empty stdin on ADD",
            env: env("ADD"),
            stdin: Vec::new(),
            code: code::DECODE_FAILURE,
        },
        Case {
            what: "JSON that is not an object",
            env: env("ADD"),
            stdin: b"[1,2]".to_vec(),
            code: code::DECODE_FAILURE,
        },
        Case {
            what: "no cniVersion",
            env: env("ADD"),
            stdin: conf_with(&|c| {
                c.as_object_mut().unwrap().remove("cniVersion");
            }),
            code: code::DECODE_FAILURE,
        },
        Case {
            what: "mtu of the wrong type",
            env: env("ADD"),
            stdin: conf_with(&|c| c["mtu"] = json!("big")),
            code: code::DECODE_FAILURE,
        },
        Case {
            what: "missing CNI_COMMAND",
            env: env_without("ADD", "CNI_COMMAND"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "unknown CNI_COMMAND",
            env: env_with("ADD", "CNI_COMMAND", "ATTACH"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "unknown version 0.2.0",
            env: env("ADD"),
            stdin: conf_with(&|c| c["cniVersion"] = json!("0.2.0")),
            code: code::INCOMPATIBLE_VERSION,
        },
        Case {
            what: "unknown version 2.0.0",
            env: env("ADD"),
            stdin: conf_with(&|c| c["cniVersion"] = json!("2.0.0")),
            code: code::INCOMPATIBLE_VERSION,
        },
        Case {
            what: "malformed version",
            env: env("ADD"),
            stdin: conf_with(&|c| c["cniVersion"] = json!("1.1")),
            code: code::INCOMPATIBLE_VERSION,
        },
        Case {
            what: "missing CNI_CONTAINERID",
            env: env_without("ADD", "CNI_CONTAINERID"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "container ID starting with '-'",
            env: env_with("ADD", "CNI_CONTAINERID", "-abc"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "container ID with '/'",
            env: env_with("DEL", "CNI_CONTAINERID", "a/b"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "missing CNI_IFNAME",
            env: env_without("ADD", "CNI_IFNAME"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "CNI_IFNAME longer than 15",
            env: env_with("ADD", "CNI_IFNAME", "eth0123456789abc"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "CNI_IFNAME with '/'",
            env: env_with("ADD", "CNI_IFNAME", "eth/0"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "missing CNI_NETNS on ADD",
            env: env_without("ADD", "CNI_NETNS"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "non-existent netns on ADD",
            env: env_with("ADD", "CNI_NETNS", "/var/run/netns/mgc-does-not-exist"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "netns that is a plain file",
            env: env_with("ADD", "CNI_NETNS", "/etc/hostname"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "CNI_ARGS pair without '='",
            env: env_with("ADD", "CNI_ARGS", "K8S_POD_NAME"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "unknown CNI_ARGS key without IgnoreUnknown",
            env: env_with("ADD", "CNI_ARGS", "K8S_POD_NAME=x;FOO=bar"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "IgnoreUnknown that is not a boolean",
            env: env_with("ADD", "CNI_ARGS", "IgnoreUnknown=maybe"),
            stdin: good_bytes.clone(),
            code: code::INVALID_ENVIRONMENT,
        },
        Case {
            what: "interface already present",
            env: pod_env("ADD", &busy),
            stdin: good_bytes.clone(),
            code: code::INTERFACE_EXISTS,
        },
        Case {
            what: "network without a name",
            env: env("ADD"),
            stdin: conf_with(&|c| c["name"] = json!("")),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "mtu below 68",
            env: env("ADD"),
            stdin: conf_with(&|c| c["mtu"] = json!(20)),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "veth prefix too long",
            env: env("ADD"),
            stdin: conf_with(&|c| c["veth_prefix"] = json!("calico")),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "unknown datastore_type",
            env: env("ADD"),
            stdin: conf_with(&|c| c["datastore_type"] = json!("consul")),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "etcd without endpoints",
            env: env("ADD"),
            stdin: conf_with(&|c| {
                c.as_object_mut().unwrap().remove("etcd_endpoints");
            }),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "etcd endpoint that is not a URL",
            env: env("ADD"),
            stdin: conf_with(&|c| c["etcd_endpoints"] = json!("127.0.0.1:2379")),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "unknown log_level",
            env: env("ADD"),
            stdin: conf_with(&|c| c["log_level"] = json!("loud")),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "ipam without a type",
            env: env("ADD"),
            stdin: conf_with(&|c| c["ipam"] = json!({"type": ""})),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "runtimeConfig.mac that is not a MAC",
            env: env("ADD"),
            stdin: conf_with(&|c| c["runtimeConfig"] = json!({"mac": "ee:ee"})),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "runtimeConfig.ips that is not an address",
            env: env("ADD"),
            stdin: conf_with(&|c| c["runtimeConfig"] = json!({"ips": ["10.0.0.300"]})),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "node_netns that is not a namespace",
            env: env("ADD"),
            stdin: conf_with(&|c| c["node_netns"] = json!("/etc/hostname")),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "IPv4 pool that does not exist",
            env: env("ADD"),
            stdin: conf_with(&|c| c["ipam"]["ipv4_pools"] = json!(["no-such-pool"])),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "delegated IPAM plugin not on CNI_PATH",
            env: env("ADD"),
            stdin: conf_with(&|c| c["ipam"] = json!({"type": "no-such-ipam"})),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "ips capability outside every pool",
            env: env("ADD"),
            stdin: conf_with(&|c| c["runtimeConfig"] = json!({"ips": ["192.0.2.7"]})),
            code: code::ADDRESS_UNAVAILABLE,
        },
        Case {
            what: "etcd unreachable",
            env: env("ADD"),
            stdin: conf_with(&|c| {
                c["etcd_endpoints"] = json!(format!(
                    "http://127.0.0.1:{}",
                    margay_testkit::free_port().unwrap()
                ))
            }),
            code: code::TRY_AGAIN_LATER,
        },
        Case {
            what: "CHECK without prevResult",
            env: env("CHECK"),
            stdin: good_bytes.clone(),
            code: code::INVALID_CONFIG,
        },
        Case {
            what: "CHECK with an undecodable prevResult",
            env: env("CHECK"),
            stdin: conf_with(&|c| c["prevResult"] = json!({"ips": [{"address": "nope"}]})),
            code: code::DECODE_FAILURE,
        },
        Case {
            what: "CHECK of a container that was never added",
            env: env("CHECK"),
            stdin: conf_with(&|c| c["prevResult"] = prev.clone()),
            code: code::CHECK_FAILED,
        },
        Case {
            what: "CHECK at version 0.3.1",
            env: env("CHECK"),
            stdin: conf_with(&|c| {
                c["cniVersion"] = json!("0.3.1");
                c["prevResult"] = prev.clone();
            }),
            code: code::INCOMPATIBLE_VERSION,
        },
        Case {
            what: "GC at version 1.0.0",
            env: vec![("CNI_COMMAND", "GC".into())],
            stdin: conf_with(&|c| c["cniVersion"] = json!("1.0.0")),
            code: code::INCOMPATIBLE_VERSION,
        },
        Case {
            what: "STATUS at version 0.4.0",
            env: vec![("CNI_COMMAND", "STATUS".into())],
            stdin: conf_with(&|c| c["cniVersion"] = json!("0.4.0")),
            code: code::INCOMPATIBLE_VERSION,
        },
        Case {
            what: "GC without valid-attachments",
            env: vec![("CNI_COMMAND", "GC".into())],
            stdin: good_bytes.clone(),
            code: code::INVALID_CONFIG,
        },
    ];
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for c in &cases {
        let r = exec(MARGAY, &c.env, &c.stdin);
        let v: Option<Value> = serde_json::from_str(r.stdout.trim()).ok();
        let got = v.as_ref().and_then(|v| v["code"].as_u64());
        let well_formed = v.as_ref().is_some_and(|v| {
            v["msg"].as_str().is_some_and(|m| !m.is_empty()) && v["cniVersion"].is_string()
        });
        if r.rc == 0 || got != Some(u64::from(c.code)) || !well_formed {
            failures.push(format!(
                "{}: rc {} stdout {:?} (want code {})\nstderr: {}",
                c.what, r.rc, r.stdout, c.code, r.stderr
            ));
        }
        // The result channel carries exactly one JSON document.
        assert_eq!(
            r.stdout.trim().lines().count(),
            1,
            "{}: {:?}",
            c.what,
            r.stdout
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // No case left a veth, an allocation or a record behind.
    assert!(
        lab.node.cali_veths().is_empty(),
        "{:?}",
        lab.node.cali_veths()
    );
    assert!(
        lab.allocations(&rt).is_empty(),
        "{:?}",
        lab.allocations(&rt)
    );
    let records = std::fs::read_dir(lab.state.path().join("attachments"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(records, 0);
    // Errors carry the request's version when Margay speaks it.
    let r = exec(
        MARGAY,
        &env("ADD"),
        &conf_with(&|c| {
            c["cniVersion"] = json!("0.4.0");
            c["mtu"] = json!(1);
        }),
    );
    assert_eq!(r.json()["cniVersion"], "0.4.0");
}
