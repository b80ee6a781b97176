//! Invalid resources are rejected with the field path and the bad value, and valid ones pass.
//! Each case is YAML as a user would write it.

use margay_api::MargayResource;
use serde::de::DeserializeOwned;

fn check<R: MargayResource + DeserializeOwned>(yaml: &str) -> Result<(), String> {
    let obj: R = serde_yaml::from_str(yaml).map_err(|e| format!("does not parse: {e}"))?;
    obj.validate().map_err(|e| e.to_string())
}

/// (what, yaml, field path the error must name, value it must quote, words the reason holds)
type Case = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

const POOL_CASES: &[Case] = &[
    (
        "host bits set",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.1/16}",
        "spec.cidr",
        "10.0.0.1/16",
        "did you mean 10.0.0.0/16",
    ),
    (
        "not a cidr",
        "metadata: {name: p}\nspec: {cidr: banana}",
        "spec.cidr",
        "banana",
        "not a CIDR",
    ),
    (
        "block size too small v4",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/8, blockSize: 19}",
        "spec.blockSize",
        "19",
        "between 20 and 32",
    ),
    (
        "block size too large v4",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/8, blockSize: 33}",
        "spec.blockSize",
        "33",
        "between 20 and 32",
    ),
    (
        "block size v4 on a v6 pool",
        "metadata: {name: p}\nspec: {cidr: 'fd00::/48', blockSize: 26}",
        "spec.blockSize",
        "26",
        "between 116 and 128",
    ),
    (
        "block larger than pool",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/28, blockSize: 26}",
        "spec.blockSize",
        "26",
        "do not fit",
    ),
    (
        "ipip and vxlan at once",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/16, ipipMode: Always, vxlanMode: CrossSubnet}",
        "spec.vxlanMode",
        "CrossSubnet",
        "choose one encapsulation",
    ),
    (
        "ipip on ipv6",
        "metadata: {name: p}\nspec: {cidr: 'fd00::/48', ipipMode: Always}",
        "spec.ipipMode",
        "Always",
        "IPv4",
    ),
    (
        "bad node selector",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/16, nodeSelector: 'zone = a'}",
        "spec.nodeSelector",
        "zone = a",
        "offset 5",
    ),
    (
        "link-local pool",
        "metadata: {name: p}\nspec: {cidr: 169.254.0.0/16}",
        "spec.cidr",
        "169.254.0.0/16",
        "link-local",
    ),
    (
        "multicast pool",
        "metadata: {name: p}\nspec: {cidr: 224.0.0.0/8}",
        "spec.cidr",
        "224.0.0.0/8",
        "multicast",
    ),
    (
        "duplicate use",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/16, allowedUses: [Workload, Workload]}",
        "spec.allowedUses[1]",
        "Workload",
        "twice",
    ),
    (
        "no uses",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/16, allowedUses: []}",
        "spec.allowedUses",
        "[]",
        "at least one",
    ),
    (
        "VXLAN on an IPv6 pool (not carried yet)",
        "metadata: {name: p}\nspec: {cidr: 'fd00:10::/48', vxlanMode: CrossSubnet}",
        "spec.vxlanMode",
        "CrossSubnet",
        "does not carry IPv6 in VXLAN",
    ),
    (
        "load-balancer use (service addresses are not allocated or advertised yet)",
        "metadata: {name: p}\nspec: {cidr: 10.0.0.0/16, allowedUses: [LoadBalancer]}",
        "spec.allowedUses[0]",
        "LoadBalancer",
        "not supported yet",
    ),
    (
        "upper-case name",
        "metadata: {name: Pool}\nspec: {cidr: 10.0.0.0/16}",
        "metadata.name",
        "Pool",
        "DNS subdomain",
    ),
];

const PEER_CASES: &[Case] = &[
    ("neither peerIP nor selector", "metadata: {name: p}\nspec: {asNumber: 65000}", "spec.peerIP", "", "required"),
    ("both peerIP and selector", "metadata: {name: p}\nspec: {peerIP: 10.0.0.1, asNumber: 65000, peerSelector: all()}", "spec.peerSelector", "all()", "choose one"),
    ("bad peer ip", "metadata: {name: p}\nspec: {peerIP: 10.0.0.300, asNumber: 65000}", "spec.peerIP", "10.0.0.300", "IP address"),
    ("peerIP without AS", "metadata: {name: p}\nspec: {peerIP: 10.0.0.1}", "spec.asNumber", "", "required with spec.peerIP"),
    ("AS_TRANS", "metadata: {name: p}\nspec: {peerIP: 10.0.0.1, asNumber: 23456}", "spec.asNumber", "23456", "AS_TRANS"),
    ("AS 0", "metadata: {name: p}\nspec: {peerIP: 10.0.0.1, asNumber: 0}", "spec.asNumber", "0", "reserved"),
    ("node and nodeSelector", "metadata: {name: p}\nspec: {node: n1, nodeSelector: all(), peerIP: 10.0.0.1, asNumber: 65000}", "spec.nodeSelector", "all()", "choose one"),
    ("bad keepalive", "metadata: {name: p}\nspec: {peerIP: 10.0.0.1, asNumber: 65000, keepaliveTime: soon}", "spec.keepaliveTime", "soon", "not a duration"),
    ("restart time too long", "metadata: {name: p}\nspec: {peerIP: 10.0.0.1, asNumber: 65000, maxRestartTime: 2h}", "spec.maxRestartTime", "2h", "4095"),
    ("password without key", "metadata: {name: p}\nspec: {peerIP: 10.0.0.1, asNumber: 65000, password: {secretKeyRef: {name: s, key: ''}}}", "spec.password.secretKeyRef.key", "", "Secret key"),
    ("bad peer selector", "metadata: {name: p}\nspec: {peerSelector: 'has(rr'}", "spec.peerSelector", "has(rr", "expected \")\""),
];

const BGP_CONFIG_CASES: &[Case] = &[
    ("wrong name", "metadata: {name: global}\nspec: {}", "metadata.name", "global", "\"default\""),
    ("bad community value", "metadata: {name: default}\nspec: {communities: [{name: c, value: '70000:1'}]}", "spec.communities[0].value", "70000:1", "aa:nn"),
    ("unknown community name", "metadata: {name: default}\nspec: {prefixAdvertisements: [{cidr: 10.0.0.0/16, communities: [nope]}]}", "spec.prefixAdvertisements[0].communities[0]", "nope", "neither"),
    ("listen port 0", "metadata: {name: default}\nspec: {listenPort: 0}", "spec.listenPort", "0", "TCP port"),
];

const OTHER_CASES: &[(&str, &str, &str, &str, &str, &str)] = &[
    ("Node", "bad node address", "metadata: {name: n1}\nspec: {bgp: {ipv4Address: 'fd00::1/64'}}", "spec.bgp.ipv4Address", "fd00::1/64", "IPv4"),
    ("Node", "bad cluster id", "metadata: {name: n1}\nspec: {bgp: {routeReflectorClusterID: rr1}}", "spec.bgp.routeReflectorClusterID", "rr1", "dotted-quad"),
    ("Node", "bad vxlan mac", "metadata: {name: n1}\nspec: {vxlanTunnelMACAddr: 'ee:ee'}", "spec.vxlanTunnelMACAddr", "ee:ee", "MAC"),
    ("Node", "IPv6 VXLAN device (not carried)", "metadata: {name: n1}\nspec: {ipv6VXLANTunnelAddr: 'fd00::1'}", "spec.ipv6VXLANTunnelAddr", "fd00::1", "does not carry IPv6 in VXLAN"),
    ("IPAMConfig", "wrong name", "metadata: {name: mine}\nspec: {}", "metadata.name", "mine", "\"default\""),
    ("IPReservation", "host bits", "metadata: {name: r}\nspec: {reservedCIDRs: [10.0.0.5/24]}", "spec.reservedCIDRs[0]", "10.0.0.5/24", "host bits"),
    ("BlockAffinity", "name not derived", "metadata: {name: whatever}\nspec: {state: confirmed, node: n1, cidr: 10.0.0.0/26}", "metadata.name", "whatever", "n1-10-0-0-0-26"),
    ("IPAMBlock", "allocations length", "metadata: {name: 10-0-0-0-30}\nspec: {cidr: 10.0.0.0/30, allocations: [null, null], unallocated: [0, 1]}", "spec.allocations", "2", "one entry per address"),
    ("IPAMBlock", "free and allocated", "metadata: {name: 10-0-0-0-31}\nspec: {cidr: 10.0.0.0/31, allocations: [0, null], unallocated: [0, 1], attributes: [{handle_id: h}]}", "spec.unallocated[0]", "0", "both free and allocated"),
    ("IPAMBlock", "lost ordinal", "metadata: {name: 10-0-0-0-31}\nspec: {cidr: 10.0.0.0/31, allocations: [null, null], unallocated: [0]}", "spec.allocations[1]", "null", "lost"),
    ("IPAMHandle", "negative count", "metadata: {name: h1}\nspec: {handleID: h1, block: {10.0.0.0/26: -1}}", "spec.block[10.0.0.0/26]", "-1", "negative"),
    ("WorkloadEndpoint", "pod address not /32", "metadata: {name: w}\nspec: {node: n, namespace: d, pod: p, containerID: c, endpoint: eth0, interfaceName: cali0, handleID: h, ipNetworks: [10.0.0.0/24]}", "spec.ipNetworks[0]", "10.0.0.0/24", "/32"),
];

fn assert_rejected(
    kind: &str,
    what: &str,
    result: Result<(), String>,
    path: &str,
    value: &str,
    words: &str,
) {
    let err = match result {
        Ok(()) => panic!("{kind} {what}: accepted, but must be rejected at {path}"),
        Err(e) => e,
    };
    let needle = format!("{path}: {value:?}: ");
    assert!(
        err.contains(&needle),
        "{kind} {what}: error does not name {needle:?}: {err}"
    );
    assert!(
        err.contains(words),
        "{kind} {what}: error does not say {words:?}: {err}"
    );
}

#[test]
fn invalid_resources_are_rejected_with_field_paths() {
    let mut n = 0;
    for (what, yaml, path, value, words) in POOL_CASES {
        assert_rejected(
            "IPPool",
            what,
            check::<margay_api::IPPool>(yaml),
            path,
            value,
            words,
        );
        n += 1;
    }
    for (what, yaml, path, value, words) in PEER_CASES {
        assert_rejected(
            "BGPPeer",
            what,
            check::<margay_api::BGPPeer>(yaml),
            path,
            value,
            words,
        );
        n += 1;
    }
    for (what, yaml, path, value, words) in BGP_CONFIG_CASES {
        assert_rejected(
            "BGPConfiguration",
            what,
            check::<margay_api::BGPConfiguration>(yaml),
            path,
            value,
            words,
        );
        n += 1;
    }
    for (kind, what, yaml, path, value, words) in OTHER_CASES {
        let full = format!("apiVersion: margay.io/v1\nkind: {kind}\n{yaml}");
        let result = match *kind {
            "Node" => check::<margay_api::Node>(&full),
            "IPAMConfig" => check::<margay_api::IPAMConfig>(&full),
            "IPReservation" => check::<margay_api::IPReservation>(&full),
            "BlockAffinity" => check::<margay_api::BlockAffinity>(&full),
            "IPAMBlock" => check::<margay_api::IPAMBlock>(&full),
            "IPAMHandle" => check::<margay_api::IPAMHandle>(&full),
            "WorkloadEndpoint" => check::<margay_api::WorkloadEndpoint>(&full),
            other => panic!("no case runner for {other}"),
        };
        assert_rejected(kind, what, result, path, value, words);
        n += 1;
    }
    assert!(
        n >= 20,
        "the table must hold at least 20 bad resources, has {n}"
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let yaml = "metadata: {name: p}\nspec: {cidr: 10.0.0.1/16, ipipMode: Always, vxlanMode: Always, nodeSelector: 'x =='}";
    let obj: margay_api::IPPool = serde_yaml::from_str(yaml).unwrap();
    let errs = obj.validate().unwrap_err();
    for path in ["spec.cidr", "spec.vxlanMode", "spec.nodeSelector"] {
        assert!(errs.has(path), "missing {path} in {errs}");
    }
    let yaml = "metadata: {name: p}\nspec: {cidr: 10.250.0.1/16, blockSize: 34}";
    let obj: margay_api::IPPool = serde_yaml::from_str(yaml).unwrap();
    let errs = obj.validate().unwrap_err();
    for path in ["spec.cidr", "spec.blockSize"] {
        assert!(errs.has(path), "missing {path} in {errs}");
    }
}

#[test]
fn good_resources_pass() {
    let cases: &[(&str, Result<(), String>)] = &[
        ("pool v4", check::<margay_api::IPPool>("metadata: {name: default-ipv4}\nspec: {cidr: 10.244.0.0/16, vxlanMode: CrossSubnet, natOutgoing: true, nodeSelector: \"kubernetes.io/os == 'linux'\"}")),
        ("pool v6", check::<margay_api::IPPool>("metadata: {name: v6}\nspec: {cidr: 'fd00:10:244::/64', blockSize: 122}")),
        ("pool /32 blocks", check::<margay_api::IPPool>("metadata: {name: tiny}\nspec: {cidr: 10.9.0.0/24, blockSize: 32}")),
        ("tor peer", check::<margay_api::BGPPeer>("metadata: {name: tor}\nspec: {peerIP: '10.0.0.1:1179', asNumber: 65001, nodeSelector: \"rack == 'r1'\", keepaliveTime: 10s, maxRestartTime: 2m, password: {secretKeyRef: {name: bgp-secrets, key: tor}}}")),
        ("rr peer", check::<margay_api::BGPPeer>("metadata: {name: rr}\nspec: {nodeSelector: '!has(rr)', peerSelector: 'has(rr)'}")),
        ("bgp config", check::<margay_api::BGPConfiguration>("metadata: {name: default}\nspec: {asNumber: 64512, nodeToNodeMeshEnabled: false, communities: [{name: c, value: '65000:100'}], prefixAdvertisements: [{cidr: 10.244.0.0/16, communities: [c, '1:2:3']}]}")),
        ("per-node bgp config", check::<margay_api::BGPConfiguration>("metadata: {name: node.worker-1}\nspec: {logSeverityScreen: Debug}")),
        ("node", check::<margay_api::Node>("metadata: {name: worker-1}\nspec: {bgp: {ipv4Address: 192.168.1.10/24, asNumber: 65010, routeReflectorClusterID: 224.0.0.1}, vxlanTunnelMACAddr: '66:2e:1f:00:aa:01', ipv4VXLANTunnelAddr: 10.244.3.0}")),
    ];
    for (what, result) in cases {
        assert!(result.is_ok(), "{what}: {result:?}");
    }
}
