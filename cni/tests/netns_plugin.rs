//! The real `margay` binary run as a runtime runs it, against a real etcd, in network
//! namespaces the tests create. Every test name contains `netns` (run one at a time in CI).

mod common;

use common::*;
use margay_cni::spec::code;
use serde_json::{json, Value};
use std::collections::HashSet;

fn handle_of(pod: &Pod) -> String {
    format!("k8s-pod-network.{}", pod.container_id)
}

#[test]
fn netns_add_ping_check_and_del() {
    if !can_run("netns_add_ping_check_and_del") {
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    let conf = lab.conf("1.1.0");
    let a = Pod::new("web-a");
    let b = Pod::new("web-b");

    let ra = cni("ADD", &a, &conf).ok();
    let rb = cni("ADD", &b, &conf).ok();
    assert_eq!(ra["cniVersion"], "1.1.0");
    assert_eq!(ra["interfaces"][0]["name"], a.veth());
    assert_eq!(ra["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(ra["interfaces"][1]["sandbox"], a.netns_path());
    assert_eq!(ra["interfaces"][1]["mtu"], 1400);
    let addr_a = ra["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(
        addr_a.starts_with("10.244.") && addr_a.ends_with("/32"),
        "{ra}"
    );
    let ip_a = addr_a.trim_end_matches("/32");
    let ip_b = rb["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_owned();
    assert_ne!(ip_a, ip_b);
    assert_eq!(a.ipv4().as_deref(), Some(ip_a));

    // What the kernel holds, through an independent oracle (`ip`).
    let routes = ip(&a.ns, &["route", "show"]);
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(routes.contains("169.254.1.1 dev eth0"), "{routes}");
    let host_routes = ip(&lab.node.ns, &["route", "show"]);
    assert!(
        host_routes.contains(&format!("{ip_a} dev {}", a.veth())),
        "{host_routes}"
    );
    let link = ip(&lab.node.ns, &["link", "show", &a.veth()]);
    assert!(link.contains("ee:ee:ee:ee:ee:ee"), "{link}");
    let (_, sysctl) = {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.node.ns.name(),
                "cat",
                &format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", a.veth()),
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(sysctl.trim(), "1");

    // Traffic: pod → node and pod → pod on the same node.
    assert!(ping(&a.ns, NODE_IP, 3), "pod a cannot reach the node");
    assert!(ping(&a.ns, &ip_b, 3), "pod a cannot reach pod b");
    assert!(ping(&b.ns, ip_a, 3), "pod b cannot reach pod a");

    // etcd mode: the WorkloadEndpoint the controller's GC reads.
    let weps: Vec<margay_api::WorkloadEndpoint> = rt.block_on(lab.store.list()).unwrap().0;
    assert!(
        weps.iter().any(|w| w.spec.container_id == a.container_id
            && w.spec.interface_name == a.veth()
            && w.spec.ip_networks == vec![addr_a.clone()]),
        "{weps:?}"
    );

    // CHECK passes, and fails once the pod's default route is gone.
    check(&a, &conf, &ra).ok();
    ip(&a.ns, &["route", "del", "default"]);
    let e = check(&a, &conf, &ra).err(code::CHECK_FAILED);
    assert!(e["details"].as_str().unwrap().contains("0.0.0.0/0"), "{e}");
    // ... and when the host route points elsewhere.
    ip(&lab.node.ns, &["route", "replace", ip_a, "dev", &b.veth()]);
    check(&b, &conf, &rb).ok();

    // DEL three times: each succeeds; the first removes everything.
    for i in 0..3 {
        cni("DEL", &a, &conf).ok();
        assert!(
            !lab.node.cali_veths().contains(&a.veth()),
            "veth still there after DEL {i}"
        );
    }
    let allocs = lab.allocations(&rt);
    assert!(
        !allocs.iter().any(|(_, h)| *h == handle_of(&a)),
        "a's address was not released: {allocs:?}"
    );
    assert!(allocs.iter().any(|(_, h)| *h == handle_of(&b)));
    let weps: Vec<margay_api::WorkloadEndpoint> = rt.block_on(lab.store.list()).unwrap().0;
    assert!(!weps.iter().any(|w| w.spec.container_id == a.container_id));

    // DEL with the netns already gone: the host veth and the address still go.
    let b_path = b.netns_path();
    let b_veth = b.veth();
    let b_handle = handle_of(&b);
    let b_cid = b.container_id.clone();
    let b_args = b.args();
    drop(b);
    // The kernel may take a moment to destroy the namespace and its veth; DEL must not care.
    let r = exec(
        MARGAY,
        &[
            ("CNI_COMMAND", "DEL".into()),
            ("CNI_CONTAINERID", b_cid),
            ("CNI_NETNS", b_path),
            ("CNI_IFNAME", "eth0".into()),
            ("CNI_ARGS", b_args),
            ("CNI_PATH", "/usr/lib/cni".into()),
        ],
        conf.to_string().as_bytes(),
    );
    r.ok();
    assert!(!lab.node.cali_veths().contains(&b_veth));
    let allocs = lab.allocations(&rt);
    assert!(!allocs.iter().any(|(_, h)| *h == b_handle), "{allocs:?}");
    assert!(lab.pending_files().is_empty());
    // Logs went to stderr; stdout of DEL is empty.
    assert!(r.stdout.trim().is_empty(), "{}", r.stdout);
}

#[test]
fn netns_del_with_etcd_down_completes_later() {
    if !can_run("netns_del_with_etcd_down_completes_later") {
        return;
    }
    let rt = runtime();
    let mut lab = Lab::new(&rt);
    let conf = lab.conf("1.1.0");
    let p = Pod::new("db-0");
    let r = cni("ADD", &p, &conf).ok();
    let ip_p = r["ips"][0]["address"].as_str().unwrap().to_owned();

    rt.block_on(lab.etcd.stop());
    let started = std::time::Instant::now();
    let del = cni("DEL", &p, &conf);
    del.ok();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "DEL took {:?}",
        started.elapsed()
    );
    assert!(!lab.node.cali_veths().contains(&p.veth()), "veth left");
    assert_eq!(lab.pending_files().len(), 1, "no pending release recorded");
    // STATUS says unavailable meanwhile.
    cni_plain("STATUS", &conf).err(code::NOT_AVAILABLE);

    rt.block_on(lab.etcd.restart()).unwrap();
    // The address is still held until a plugin run drains the pending release.
    let allocs = lab.allocations(&rt);
    assert!(
        allocs.iter().any(|(_, h)| *h == handle_of(&p)),
        "{allocs:?}"
    );
    cni_plain("STATUS", &conf).ok();
    assert!(
        lab.pending_files().is_empty(),
        "pending release not drained"
    );
    let allocs = lab.allocations(&rt);
    assert!(
        !allocs.iter().any(|(_, h)| *h == handle_of(&p)),
        "{ip_p} not released: {allocs:?}"
    );
    let weps: Vec<margay_api::WorkloadEndpoint> = rt.block_on(lab.store.list()).unwrap().0;
    assert!(weps.is_empty(), "{weps:?}");
}

#[test]
fn netns_status_with_etcd_up_down_and_pools_full() {
    if !can_run("netns_status_with_etcd_up_down_and_pools_full") {
        return;
    }
    let rt = runtime();
    // A pool of two addresses: one /31 block.
    let mut lab = Lab::with_pool(&rt, "tiny", "10.250.0.0/31", 31);
    let conf = lab.conf("1.1.0");
    cni_plain("STATUS", &conf).ok();
    let pods: Vec<Pod> = (0..2).map(|i| Pod::new(&format!("t-{i}"))).collect();
    for p in &pods {
        cni("ADD", p, &conf).ok();
    }
    let e = cni_plain("STATUS", &conf).err(code::NOT_AVAILABLE);
    assert!(e["msg"].as_str().unwrap().contains("room"), "{e}");
    // The third pod gets the documented error.
    let third = Pod::new("t-2");
    cni("ADD", &third, &conf).err(code::POOL_EXHAUSTED);
    assert!(!lab.node.cali_veths().contains(&third.veth()));
    cni("DEL", &pods[0], &conf).ok();
    cni_plain("STATUS", &conf).ok();
    rt.block_on(lab.etcd.stop());
    let e = cni_plain("STATUS", &conf).err(code::NOT_AVAILABLE);
    assert!(e["msg"].as_str().unwrap().contains("unreachable"), "{e}");
    // ADD with etcd down: try again later, nothing left behind.
    let fourth = Pod::new("t-3");
    cni("ADD", &fourth, &conf).err(code::TRY_AGAIN_LATER);
    assert!(!lab.node.cali_veths().contains(&fourth.veth()));
    rt.block_on(lab.etcd.restart()).unwrap();
    cni_plain("STATUS", &conf).ok();
}

#[test]
fn netns_gc_with_valid_attachments() {
    if !can_run("netns_gc_with_valid_attachments") {
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    let conf = lab.conf("1.1.0");
    let pods: Vec<Pod> = (0..3).map(|i| Pod::new(&format!("gc-{i}"))).collect();
    let results: Vec<Value> = pods.iter().map(|p| cni("ADD", p, &conf).ok()).collect();
    // A stray cali veth (no attachment) and an allocation without veth or record.
    ip(
        &lab.node.ns,
        &[
            "link",
            "add",
            "cali0000000dead",
            "type",
            "veth",
            "peer",
            "name",
            "strayp",
        ],
    );
    let orphan = rt
        .block_on(
            margay_ipam::Allocator::new(
                lab.store.clone(),
                "node-a",
                margay_ipam::AllocatorConfig::default(),
            )
            .assign(&margay_ipam::AssignRequest {
                handle_id: "k8s-pod-network.orphan".into(),
                attrs: [("node".to_string(), "node-a".to_string())].into(),
                num_v4: 1,
                ..Default::default()
            }),
        )
        .unwrap();
    let orphan_ip = orphan.addresses[0].ip;

    // libcni's misspelled key first: keeps gc-0 and gc-1.
    let mut gc = conf.clone();
    gc["cni.dev/attachments"] = json!([
        {"containerID": pods[0].container_id, "ifname": "eth0"},
        {"containerID": pods[1].container_id, "ifname": "eth0"},
    ]);
    cni_plain("GC", &gc).ok();
    let veths = lab.node.cali_veths();
    assert!(veths.contains(&pods[0].veth()) && veths.contains(&pods[1].veth()));
    assert!(!veths.contains(&pods[2].veth()), "{veths:?}");
    assert!(!veths.contains(&"cali0000000dead".to_string()), "{veths:?}");
    let allocs = lab.allocations(&rt);
    let handles: HashSet<&str> = allocs.iter().map(|(_, h)| h.as_str()).collect();
    assert!(handles.contains(handle_of(&pods[0]).as_str()));
    assert!(handles.contains(handle_of(&pods[1]).as_str()));
    assert!(
        !handles.contains(handle_of(&pods[2]).as_str()),
        "{allocs:?}"
    );
    assert!(!allocs.iter().any(|(ip, _)| *ip == orphan_ip), "{allocs:?}");
    // The survivors are intact.
    check(&pods[0], &conf, &results[0]).ok();
    check(&pods[1], &conf, &results[1]).ok();

    // The spec's key: keeps only gc-1.
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] =
        json!([{"containerID": pods[1].container_id, "ifname": "eth0"}]);
    cni_plain("GC", &gc).ok();
    assert_eq!(lab.node.cali_veths(), vec![pods[1].veth()]);
    let allocs = lab.allocations(&rt);
    assert_eq!(allocs.len(), 1, "{allocs:?}");
    assert_eq!(allocs[0].1, handle_of(&pods[1]));
    let weps: Vec<margay_api::WorkloadEndpoint> = rt.block_on(lab.store.list()).unwrap().0;
    assert_eq!(weps.len(), 1, "{weps:?}");
}

#[test]
fn netns_every_spec_version() {
    if !can_run("netns_every_spec_version") {
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    for v in margay_cni::spec::SUPPORTED_VERSIONS {
        let conf = lab.conf(v);
        let p = Pod::new(&format!("v{}", v.replace('.', "")));
        let r = cni("ADD", &p, &conf).ok();
        assert_eq!(r["cniVersion"], *v);
        let ip0 = &r["ips"][0];
        if *v < "1.0.0" {
            assert_eq!(ip0["version"], "4", "{v}: {r}");
        } else {
            assert!(ip0.get("version").is_none(), "{v}: {r}");
        }
        assert_eq!(
            r["interfaces"][1].get("mtu").is_some(),
            *v == "1.1.0",
            "{v}: {r}"
        );
        assert!(ping(&p.ns, NODE_IP, 3), "{v}: pod cannot reach the node");
        let ck = check(&p, &conf, &r);
        if *v >= "0.4.0" {
            ck.ok();
        } else {
            let e = ck.err(code::INCOMPATIBLE_VERSION);
            assert_eq!(e["cniVersion"], *v);
        }
        for cmd in ["GC", "STATUS"] {
            let run = cni_plain(cmd, &conf);
            if *v == "1.1.0" {
                if cmd == "STATUS" {
                    run.ok();
                }
            } else {
                run.err(code::INCOMPATIBLE_VERSION);
            }
        }
        let mut del = conf.clone();
        del["prevResult"] = r.clone();
        cni("DEL", &p, &del).ok();
        assert!(!lab.node.cali_veths().contains(&p.veth()));
    }
    assert!(lab.allocations(&rt).is_empty());
    let v = exec(
        MARGAY,
        &[("CNI_COMMAND", "VERSION".into())],
        br#"{"cniVersion":"1.1.0"}"#,
    )
    .ok();
    assert_eq!(
        v["supportedVersions"],
        json!(margay_cni::spec::SUPPORTED_VERSIONS)
    );
}

#[test]
fn netns_delegated_ipam_host_local() {
    if !can_run("netns_delegated_ipam_host_local") {
        return;
    }
    if !std::path::Path::new("/usr/lib/cni/host-local").is_file() {
        margay_testkit::skip(
            "netns_delegated_ipam_host_local",
            margay_testkit::Lack::Prerequisite,
            "/usr/lib/cni/host-local is not installed (containernetworking-plugins; scripts/setup.sh installs it)",
        );
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    let data = tempfile::tempdir().unwrap();
    let mut conf = lab.conf("1.0.0");
    conf["ipam"] = json!({
        "type": "host-local",
        "ranges": [[{"subnet": "10.66.0.0/24"}]],
        "dataDir": data.path(),
    });
    let p = Pod::new("hl");
    let r = cni("ADD", &p, &conf).ok();
    let addr = r["ips"][0]["address"].as_str().unwrap();
    assert!(addr.starts_with("10.66.0.") && addr.ends_with("/32"), "{r}");
    assert!(ping(&p.ns, NODE_IP, 3));
    check(&p, &conf, &r).ok();
    // host-local holds the address in its data directory until DEL.
    let held = || {
        std::fs::read_dir(data.path().join("k8s-pod-network"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with("10.66."))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(held(), 1);
    cni("DEL", &p, &conf).ok();
    assert_eq!(held(), 0);
    assert!(lab.node.cali_veths().is_empty());
    // Margay's own allocator was not involved.
    assert!(lab.allocations(&rt).is_empty());
}

#[test]
fn ipam_plugin_standalone_add_check_del() {
    let rt = runtime();
    let etcd = match rt.block_on(margay_testkit::EtcdProcess::start()) {
        Ok(e) => e,
        Err(e) => panic!("etcd: {e:#}"),
    };
    let prefix = "/margay-cni-ipam/";
    let store = margay_api::Store::new(std::sync::Arc::new(
        rt.block_on(etcd.backend(prefix)).unwrap(),
    ));
    rt.block_on(store.create(&margay_api::IPPool::new(
        "v4",
        margay_api::IPPoolSpec {
            cidr: "10.245.0.0/16".into(),
            block_size: Some(26),
            ..Default::default()
        },
    )))
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let conf = json!({
        "cniVersion": "1.1.0", "name": "n", "type": "margay-ipam",
        "nodename": "node-i", "datastore_type": "etcd",
        "etcd_endpoints": etcd.endpoint(), "etcd_prefix": prefix,
        "ipam": {"type": "margay-ipam"}, "state_dir": state.path(),
    });
    let env = |cmd: &str| {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", "ipamc1".to_string()),
            ("CNI_NETNS", "/var/run/netns/unused".to_string()),
            ("CNI_IFNAME", "eth0".to_string()),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p".to_string(),
            ),
        ]
    };
    let r = exec(MARGAY_IPAM, &env("ADD"), conf.to_string().as_bytes()).ok();
    let addr = r["ips"][0]["address"].as_str().unwrap();
    assert!(addr.starts_with("10.245.") && addr.ends_with("/32"), "{r}");
    assert_eq!(r["routes"][0]["dst"], "0.0.0.0/0");
    assert!(r.get("interfaces").is_none());
    let mut ck = conf.clone();
    ck["prevResult"] = r.clone();
    exec(MARGAY_IPAM, &env("CHECK"), ck.to_string().as_bytes()).ok();
    exec(MARGAY_IPAM, &env("DEL"), conf.to_string().as_bytes()).ok();
    exec(MARGAY_IPAM, &env("DEL"), conf.to_string().as_bytes()).ok();
    exec(MARGAY_IPAM, &env("CHECK"), ck.to_string().as_bytes()).err(code::CHECK_FAILED);
    let snap = rt
        .block_on(margay_ipam::audit::Snapshot::read(&store))
        .unwrap();
    assert!(snap.allocations().is_empty());
    assert!(snap.handles.is_empty());
}

#[test]
fn netns_dual_stack_pod() {
    if !can_run("netns_dual_stack_pod") {
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    lab.add_pool(&rt, "default-ipv6", "fd00:244::/48", 122);
    ip(
        &lab.node.ns,
        &["-6", "addr", "add", "fd99::1/64", "dev", "uplink0", "nodad"],
    );
    let mut conf = lab.conf("1.1.0");
    conf["ipam"]["ipv6_pools"] = json!(["default-ipv6"]);
    let p = Pod::new("ds");
    let r = cni("ADD", &p, &conf).ok();
    let addrs: Vec<&str> = r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap())
        .collect();
    assert!(
        addrs
            .iter()
            .any(|a| a.starts_with("10.244.") && a.ends_with("/32")),
        "{r}"
    );
    let v6 = addrs
        .iter()
        .find(|a| a.starts_with("fd00:244:") && a.ends_with("/128"))
        .unwrap_or_else(|| panic!("no IPv6 address: {r}"));
    let routes = ip(&p.ns, &["-6", "route", "show"]);
    assert!(
        routes.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{routes}"
    );
    let host = ip(&lab.node.ns, &["-6", "route", "show"]);
    assert!(
        host.contains(&format!("{} dev {}", v6.trim_end_matches("/128"), p.veth())),
        "{host}"
    );
    // The host end's link-local address finishes DAD within a couple of seconds.
    assert!(
        ping(&p.ns, "fd99::1", 5),
        "pod cannot reach the node over IPv6"
    );
    check(&p, &conf, &r).ok();
    cni("DEL", &p, &conf).ok();
    assert!(lab.allocations(&rt).is_empty());
}

#[test]
fn netns_late_del_never_touches_a_newer_container() {
    if !can_run("netns_late_del_never_touches_a_newer_container") {
        return;
    }
    let rt = runtime();
    let lab = Lab::new(&rt);
    let conf = lab.conf("1.1.0");

    // 1. The address was collected and handed to someone else; the old container's DEL comes
    //    late. It releases by sequence number, so the newer allocation stays.
    let old = Pod::new("late");
    let r = cni("ADD", &old, &conf).ok();
    let ip: std::net::IpAddr = r["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    let alloc = margay_ipam::Allocator::new(
        lab.store.clone(),
        "node-a",
        margay_ipam::AllocatorConfig::default(),
    );
    rt.block_on(alloc.release_by_handle(&handle_of(&old)))
        .unwrap();
    rt.block_on(alloc.assign(&margay_ipam::AssignRequest {
        handle_id: "k8s-pod-network.newer".into(),
        addresses: vec![ip],
        ..Default::default()
    }))
    .unwrap();
    let mut del = conf.clone();
    del["prevResult"] = r.clone();
    cni("DEL", &old, &del).ok();
    let allocs = lab.allocations(&rt);
    assert_eq!(
        allocs,
        vec![(ip, "k8s-pod-network.newer".to_string())],
        "the late DEL freed a newer container's address"
    );

    // 2. A new sandbox of the same pod (same veth name) replaced the stale veth; the first
    //    sandbox's DEL comes afterwards and must leave the new one's veth alone.
    let first = Pod::new("sts-0");
    cni("ADD", &first, &conf).ok();
    let mut second = Pod::new("sts-0");
    second.container_id.push('b');
    let r2 = cni("ADD", &second, &conf).ok();
    assert_eq!(first.veth(), second.veth());
    cni("DEL", &first, &conf).ok();
    assert!(lab.node.cali_veths().contains(&second.veth()));
    check(&second, &conf, &r2).ok();
    assert!(ping(&second.ns, NODE_IP, 3));
    // The same with the first sandbox's namespace gone.
    let third = Pod::new("sts-0");
    let env = pod_env("DEL", &third);
    drop(third);
    exec(MARGAY, &env, conf.to_string().as_bytes()).ok();
    check(&second, &conf, &r2).ok();
    cni("DEL", &second, &conf).ok();
    assert!(lab.node.cali_veths().is_empty());
}
