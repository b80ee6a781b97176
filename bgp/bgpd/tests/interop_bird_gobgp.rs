//! Interop tests: margay-bgpd against BIRD 2 and GoBGP in network namespaces the
//! tests build and remove themselves. They need root, `bird`, `birdc`, `gobgpd`,
//! `gobgp`, `nft` and `ping` (scripts/setup.sh installs them).

mod common;

use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn bird_bgp(
    name: &str,
    local: &str,
    local_as: u32,
    neighbor: &str,
    peer_as: u32,
    extra: &str,
    channels: &str,
) -> String {
    format!(
        r#"
protocol bgp {name} {{
  local {local} as {local_as};
  neighbor {neighbor} as {peer_as};
  hold time 9;
  keepalive time 3;
  connect retry time 1;
  error wait time 1, 5;
  {extra}
  {channels}
}}
"#
    )
}

const BIRD_V4: &str = "ipv4 { import all; export all; };";

fn margay_yaml(
    asn: u32,
    rid: &str,
    listen: &str,
    peers: &str,
    announce: &str,
    extra: &str,
) -> String {
    format!(
        r#"
bgp:
  asn: {asn}
  router_id: {rid}
  listen: ["{listen}"]
status:
  listen: 127.0.0.1:{STATUS_PORT}
peers:
{peers}
announce:
{announce}
{extra}
"#
    )
}

fn peer_yaml(addr: &str, asn: u32, extra: &str) -> String {
    format!(
        "  - address: {addr}\n    asn: {asn}\n    hold_time: 9\n    connect_retry: 1\n    idle_hold_time: 1\n{extra}"
    )
}

/// Case 1: BIRD as route reflector with two Margay clients: each learns the other's
/// prefix with the original next hop.
#[test]
fn interop_bird_route_reflector_with_two_margay_clients() {
    require("bird");
    let dir = TestDir::new();
    let rr = Ns::new("rr");
    let m1 = Ns::new("m1");
    let m2 = Ns::new("m2");
    segment(
        &rr,
        &["10.0.0.1/24"],
        &[(&m1, &["10.0.0.2/24"]), (&m2, &["10.0.0.3/24"])],
    );
    let mut conf = String::from("router id 10.0.0.1;\nprotocol device {}\n");
    for (n, a) in [("m1", "10.0.0.2"), ("m2", "10.0.0.3")] {
        conf += &bird_bgp(
            n,
            "10.0.0.1",
            65000,
            a,
            65000,
            "rr client; rr cluster id 10.0.0.1;",
            BIRD_V4,
        );
    }
    let b = bird(&rr, dir.path(), &conf);
    let p = peer_yaml("10.0.0.1", 65000, "");
    let _g1 = margay(
        &m1,
        dir.path(),
        &margay_yaml(
            65000,
            "10.0.0.2",
            "10.0.0.2:179",
            &p,
            "  - prefix: 10.1.0.0/24",
            "",
        ),
    );
    let _g2 = margay(
        &m2,
        dir.path(),
        &margay_yaml(
            65000,
            "10.0.0.3",
            "10.0.0.3:179",
            &p,
            "  - prefix: 10.2.0.0/24",
            "",
        ),
    );
    wait_for(T, "BIRD to establish both", || {
        (b.established("m1") && b.established("m2")).then_some(())
    });
    let nh = wait_for(T, "m2 to learn 10.1.0.0/24", || {
        margay_next_hop(&m2, "10.1.0.0/24")
    });
    assert_eq!(nh, "10.0.0.2", "the reflected route keeps m1's next hop");
    let nh = wait_for(T, "m1 to learn 10.2.0.0/24", || {
        margay_next_hop(&m1, "10.2.0.0/24")
    });
    assert_eq!(nh, "10.0.0.3");
    let r = margay_route(&m2, "10.1.0.0/24").unwrap();
    assert_eq!(r["paths"][0]["originator_id"], "10.0.0.2");
    assert_eq!(r["paths"][0]["cluster_list"][0], "10.0.0.1");
}

/// Case 2: Margay as route reflector with BIRD and GoBGP clients.
#[test]
fn interop_margay_route_reflector_with_bird_and_gobgp_clients() {
    require("bird");
    require("gobgpd");
    let dir = TestDir::new();
    let rr = Ns::new("rr");
    let bn = Ns::new("bird");
    let gn = Ns::new("gobgp");
    segment(
        &rr,
        &["10.0.0.1/24"],
        &[(&bn, &["10.0.0.2/24"]), (&gn, &["10.0.0.3/24"])],
    );
    let peers = format!(
        "{}    rr_client: true\n{}    rr_client: true\n",
        peer_yaml("10.0.0.2", 65000, ""),
        peer_yaml("10.0.0.3", 65000, "")
    );
    let _m = margay(
        &rr,
        dir.path(),
        &margay_yaml(
            65000,
            "10.0.0.1",
            "10.0.0.1:179",
            &peers,
            "  - prefix: 10.9.0.0/24",
            "",
        ),
    );
    let bconf = format!(
        "router id 10.0.0.2;\nprotocol device {{}}\nprotocol static {{ ipv4; route 10.2.0.0/24 blackhole; }}\n{}",
        bird_bgp("rrs", "10.0.0.2", 65000, "10.0.0.1", 65000, "", BIRD_V4)
    );
    let b = bird(&bn, dir.path(), &bconf);
    let g = gobgp(
        &gn,
        dir.path(),
        r#"
[global.config]
  as = 65000
  router-id = "10.0.0.3"
  port = -1
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.0.0.1"
    peer-as = 65000
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 9
    keepalive-interval = 3
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
"#,
    );
    g.cli(&gn, "global rib add -a ipv4 10.3.0.0/24 nexthop 10.0.0.3")
        .unwrap();
    wait_for(T, "both clients established at margay", || {
        (margay_established(&rr, "10.0.0.2") && margay_established(&rr, "10.0.0.3")).then_some(())
    });
    // BIRD learns GoBGP's prefix with GoBGP's next hop, reflected.
    let out = wait_for(T, "BIRD to learn 10.3.0.0/24", || b.route("10.3.0.0/24"));
    assert!(out.contains("BGP.next_hop: 10.0.0.3"), "{out}");
    assert!(out.contains("BGP.originator_id: 10.0.0.3"), "{out}");
    assert!(out.contains("BGP.cluster_list: 10.0.0.1"), "{out}");
    // GoBGP learns BIRD's prefix with BIRD's next hop.
    let rib = wait_for(T, "GoBGP to learn 10.2.0.0/24", || {
        let r = g.rib(&gn, "ipv4");
        r.get("10.2.0.0/24").cloned()
    });
    let s = rib.to_string();
    assert!(s.contains("10.0.0.2"), "next hop kept: {s}");
    // And both learn the reflector's own prefix with the reflector as next hop.
    let out = wait_for(T, "BIRD to learn 10.9.0.0/24", || b.route("10.9.0.0/24"));
    assert!(out.contains("BGP.next_hop: 10.0.0.1"), "{out}");
}

/// The ToR topology: h1 — tor (BIRD, AS 65100) — m (margay, AS 65001) — h2.
struct Tor {
    h1: Ns,
    tor: Ns,
    m: Ns,
    h2: Ns,
}

fn tor_topology() -> Tor {
    let h1 = Ns::new("h1");
    let tor = Ns::new("tor");
    let m = Ns::new("m");
    let h2 = Ns::new("h2");
    link(&h1, &["10.100.0.2/24"], &tor, &["10.100.0.1/24"]);
    link(&tor, &["10.0.0.1/24"], &m, &["10.0.0.2/24"]);
    link(&m, &["10.200.0.1/24"], &h2, &["10.200.0.2/24"]);
    h1.ip(&["route", "add", "default", "via", "10.100.0.1"]);
    h2.ip(&["route", "add", "default", "via", "10.200.0.1"]);
    Tor { h1, tor, m, h2 }
}

fn tor_bird_conf(extra: &str) -> String {
    format!(
        "router id 10.0.0.1;\nprotocol device {{}}\nprotocol direct {{ ipv4; interface \"*\"; }}\nprotocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}\n{}",
        bird_bgp(
            "m",
            "10.0.0.1",
            65100,
            "10.0.0.2",
            65001,
            extra,
            "ipv4 { import all; export where net = 10.100.0.0/24; };"
        )
    )
}

fn tor_margay_yaml(extra_peer: &str, extra: &str) -> String {
    margay_yaml(
        65001,
        "10.0.0.2",
        "10.0.0.2:179",
        &peer_yaml("10.0.0.1", 65100, extra_peer),
        "  - prefix: 10.200.0.0/24",
        &format!("kernel:\n  table: 254\n{extra}"),
    )
}

/// Case 3: eBGP to a ToR (BIRD) that installs the routes; pings between addresses
/// behind them.
#[test]
fn interop_ebgp_tor_installs_routes_and_hosts_ping() {
    require("bird");
    require("ping");
    let dir = TestDir::new();
    let t = tor_topology();
    let b = bird(&t.tor, dir.path(), &tor_bird_conf(""));
    let _m = margay(&t.m, dir.path(), &tor_margay_yaml("", ""));
    wait_for(T, "BIRD to learn 10.200.0.0/24", || {
        b.route("10.200.0.0/24")
    });
    let out = b.route("10.200.0.0/24").unwrap();
    assert!(out.contains("BGP.as_path: 65001"), "{out}");
    wait_for(T, "margay to install 10.100.0.0/24 in the kernel", || {
        let r = t.m.ip(&["route", "show", "10.100.0.0/24"]);
        r.contains("via 10.0.0.1").then_some(())
    });
    let out = t.h1.try_sh("ping -c 3 -i 0.2 -W 2 10.200.0.2");
    assert!(
        out.status.success(),
        "h1 cannot reach h2: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = t.h2.try_sh("ping -c 3 -i 0.2 -W 2 10.100.0.2");
    assert!(out.status.success(), "h2 cannot reach h1");
}

/// Case 4: IPv6 over MP-BGP on an IPv6 session.
#[test]
fn interop_ipv6_over_mp_bgp() {
    require("bird");
    let dir = TestDir::new();
    let a = Ns::new("bird6");
    let m = Ns::new("m6");
    link(&a, &["fd00::1/64"], &m, &["fd00::2/64"]);
    let conf = format!(
        "router id 10.0.0.1;\nprotocol device {{}}\nprotocol static {{ ipv6; route 2001:db8:1::/48 blackhole; }}\n{}",
        bird_bgp(
            "m",
            "fd00::1",
            65100,
            "fd00::2",
            65001,
            "",
            "ipv6 { import all; export all; };"
        )
    );
    let b = bird(&a, dir.path(), &conf);
    let _g = margay(
        &m,
        dir.path(),
        &margay_yaml(
            65001,
            "10.0.0.2",
            "[fd00::2]:179",
            &peer_yaml("fd00::1", 65100, ""),
            "  - prefix: 2001:db8:2::/48",
            "",
        ),
    );
    let nh = wait_for(T, "margay to learn 2001:db8:1::/48", || {
        margay_next_hop(&m, "2001:db8:1::/48")
    });
    assert_eq!(nh, "fd00::1");
    let out = wait_for(T, "BIRD to learn 2001:db8:2::/48", || {
        b.route("2001:db8:2::/48")
    });
    assert!(out.contains("BGP.next_hop: fd00::2"), "{out}");
    let p = margay_peer(&m, "fd00::1").unwrap();
    assert_eq!(p["families"], serde_json::json!(["ipv6-unicast"]));
}

/// Case 5: TCP-MD5: the session forms with the right key and stays down with a wrong one.
#[test]
fn interop_md5_right_key_forms_wrong_key_stays_down() {
    require("bird");
    for (bird_pw, expect_up) in [("s3cret-key", true), ("wrong-key", false)] {
        let dir = TestDir::new();
        let a = Ns::new("birdmd5");
        let m = Ns::new("mmd5");
        link(&a, &["10.0.0.1/24"], &m, &["10.0.0.2/24"]);
        let conf = format!(
            "router id 10.0.0.1;\nprotocol device {{}}\n{}",
            bird_bgp(
                "m",
                "10.0.0.1",
                65100,
                "10.0.0.2",
                65001,
                &format!("password \"{bird_pw}\";"),
                BIRD_V4
            )
        );
        let b = bird(&a, dir.path(), &conf);
        let _g = margay(
            &m,
            dir.path(),
            &margay_yaml(
                65001,
                "10.0.0.2",
                "10.0.0.2:179",
                &peer_yaml("10.0.0.1", 65100, "    md5_password: s3cret-key\n"),
                "  - prefix: 10.200.0.0/24",
                "",
            ),
        );
        if expect_up {
            wait_for(T, "the MD5 session", || {
                margay_established(&m, "10.0.0.1").then_some(())
            });
            assert!(b.established("m"));
        } else {
            std::thread::sleep(Duration::from_secs(8));
            assert!(
                !margay_established(&m, "10.0.0.1"),
                "a wrong key must keep the session down"
            );
            assert!(!b.established("m"));
            let p = margay_peer(&m, "10.0.0.1").expect("status API up");
            assert_ne!(p["state"], "Established");
        }
    }
}

/// Case 7: Route refresh, both ways: margay asks BIRD to resend after an import policy
/// change (SIGHUP, no session reset), and answers BIRD's request.
#[test]
fn interop_route_refresh_in_and_out() {
    require("bird");
    let dir = TestDir::new();
    let a = Ns::new("birdrr");
    let m = Ns::new("mrr");
    link(&a, &["10.0.0.1/24"], &m, &["10.0.0.2/24"]);
    let conf = format!(
        "router id 10.0.0.1;\nprotocol device {{}}\nprotocol static {{ ipv4; route 10.7.0.0/24 blackhole; route 10.8.0.0/24 blackhole; }}\n{}",
        bird_bgp("m", "10.0.0.1", 65100, "10.0.0.2", 65001, "", BIRD_V4)
    );
    let b = bird(&a, dir.path(), &conf);
    let reject = "    import:\n      rules:\n        - match: { prefixes: [{ prefix: 10.8.0.0/24 }] }\n          action: reject\n";
    let yaml = |import: &str| {
        margay_yaml(
            65001,
            "10.0.0.2",
            "10.0.0.2:179",
            &peer_yaml("10.0.0.1", 65100, import),
            "  - prefix: 10.200.0.0/24",
            "",
        )
    };
    let g = margay(&m, dir.path(), &yaml(reject));
    wait_for(T, "10.7.0.0/24 at margay", || {
        margay_route(&m, "10.7.0.0/24")
    });
    assert!(
        margay_route(&m, "10.8.0.0/24").is_none(),
        "rejected by import policy"
    );
    // Enhanced Route Refresh (RFC 7313) is on both sides: BIRD offers it by default
    // and lists what we offered under the neighbor's capabilities.
    let show = b.birdc("show protocols all m");
    let neighbor = show
        .split("Neighbor capabilities")
        .nth(1)
        .and_then(|rest| rest.split("Session:").next())
        .unwrap_or_default();
    assert!(
        neighbor.contains("Enhanced refresh"),
        "BIRD did not see our Enhanced Route Refresh capability:\n{show}"
    );
    let since = margay_peer(&m, "10.0.0.1").unwrap()["since"].clone();
    std::fs::write(&g.conf, yaml("")).unwrap();
    g.proc.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(T, "10.8.0.0/24 after the refresh", || {
        margay_route(&m, "10.8.0.0/24")
    });
    let p = margay_peer(&m, "10.0.0.1").unwrap();
    assert_eq!(p["since"], since, "the session was not reset");
    assert!(p["messages_sent"]["route_refresh"].as_u64().unwrap() >= 1);
    // BIRD framed its answer with BoRR/EoRR; what it re-sent survives the EoRR.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        margay_route(&m, "10.7.0.0/24").is_some(),
        "a route BIRD re-sent in its refresh answer was swept at EoRR"
    );
    // Out: BIRD asks us to resend.
    b.birdc("reload in m");
    wait_for(T, "margay to see BIRD's ROUTE-REFRESH", || {
        let p = margay_peer(&m, "10.0.0.1")?;
        (p["messages_received"]["route_refresh"].as_u64()? >= 1).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        b.route("10.200.0.0/24").is_some(),
        "BIRD still has our route after the refresh"
    );
    assert_eq!(margay_peer(&m, "10.0.0.1").unwrap()["since"], since);
}

/// Case 8: Maximum-prefix tear-down with Cease/1.
#[test]
fn interop_max_prefix_tears_down_with_cease_1() {
    require("bird");
    let dir = TestDir::new();
    let a = Ns::new("birdmax");
    let m = Ns::new("mmax");
    link(&a, &["10.0.0.1/24"], &m, &["10.0.0.2/24"]);
    let routes: String = (0..20)
        .map(|i| format!("route 10.50.{i}.0/24 blackhole; "))
        .collect();
    let conf = format!(
        "router id 10.0.0.1;\nprotocol device {{}}\nprotocol static {{ ipv4; {routes} }}\n{}",
        bird_bgp("m", "10.0.0.1", 65100, "10.0.0.2", 65001, "", BIRD_V4)
    );
    let b = bird(&a, dir.path(), &conf);
    let _g = margay(
        &m,
        dir.path(),
        &margay_yaml(
            65001,
            "10.0.0.2",
            "10.0.0.2:179",
            &peer_yaml("10.0.0.1", 65100, "    max_prefixes: 10\n"),
            "  - prefix: 10.200.0.0/24",
            "",
        ),
    );
    let err = wait_for(T, "margay to close the session", || {
        let p = margay_peer(&m, "10.0.0.1")?;
        let e = p["last_error"].as_str()?.to_owned();
        e.contains("6/1").then_some(e)
    });
    assert!(err.starts_with("sent"), "{err}");
    let out = b.birdc("show protocols all m");
    assert!(
        out.contains("Maximum number of prefixes reached") || out.contains("Cease"),
        "BIRD saw the Cease: {out}"
    );
    assert_eq!(margay_peer(&m, "10.0.0.1").unwrap()["prefixes_accepted"], 0);
}

/// Case 9: Hold timer expiry when the peer's packets are dropped with nftables.
#[test]
fn interop_hold_timer_expires_when_packets_are_dropped() {
    require("bird");
    require("nft");
    let dir = TestDir::new();
    let a = Ns::new("birdhold");
    let m = Ns::new("mhold");
    link(&a, &["10.0.0.1/24"], &m, &["10.0.0.2/24"]);
    let conf = format!(
        "router id 10.0.0.1;\nprotocol device {{}}\n{}",
        bird_bgp("m", "10.0.0.1", 65100, "10.0.0.2", 65001, "", BIRD_V4)
            .replace("hold time 9", "hold time 30")
    );
    let _b = bird(&a, dir.path(), &conf);
    let _g = margay(
        &m,
        dir.path(),
        &margay_yaml(
            65001,
            "10.0.0.2",
            "10.0.0.2:179",
            &peer_yaml("10.0.0.1", 65100, "")
                .replace("idle_hold_time: 1", "idle_hold_time: 60")
                .replace("hold_time: 9", "hold_time: 3"),
            "  - prefix: 10.200.0.0/24",
            "",
        ),
    );
    wait_for(T, "the session", || {
        margay_established(&m, "10.0.0.1").then_some(())
    });
    assert_eq!(margay_peer(&m, "10.0.0.1").unwrap()["hold_time"], 3);
    m.sh("nft add table inet mgbhold && nft add chain inet mgbhold input '{ type filter hook input priority 0; }' && nft add rule inet mgbhold input ip saddr 10.0.0.1 drop");
    let start = std::time::Instant::now();
    let err = wait_for(Duration::from_secs(15), "hold timer expiry", || {
        let p = margay_peer(&m, "10.0.0.1")?;
        (p["state"] != "Established").then(|| p["last_error"].as_str().unwrap_or("").to_owned())
    });
    assert!(err.contains("sent NOTIFICATION 4/0"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "detected in about the hold time"
    );
}

/// Case 10: A 2-octet-AS peer (BIRD with `enable as4 off`): the session runs without
/// the 4-octet AS capability; AS paths are written with 2-octet ASes, and a 4-octet
/// AS in a path we send becomes AS_TRANS with AS4_PATH beside it.
#[test]
fn interop_two_octet_as_peer() {
    require("bird");
    let dir = TestDir::new();
    let a = Ns::new("bird2oct");
    let m = Ns::new("m2oct");
    link(&a, &["10.0.0.1/24"], &m, &["10.0.0.2/24"]);
    let conf = format!(
        "router id 10.0.0.1;\nprotocol device {{}}\nprotocol static {{ ipv4; route 10.60.0.0/24 blackhole; }}\n{}",
        bird_bgp("m", "10.0.0.1", 65100, "10.0.0.2", 65001, "enable as4 off;", BIRD_V4)
    );
    let b = bird(&a, dir.path(), &conf);
    let _g = margay(
        &m,
        dir.path(),
        &margay_yaml(
            65001,
            "10.0.0.2",
            "10.0.0.2:179",
            &peer_yaml("10.0.0.1", 65100, ""),
            "  - prefix: 10.200.0.0/24\n  - prefix: 10.201.0.0/24\n    as_path: [4200000005]",
            "",
        ),
    );
    wait_for(T, "the session", || {
        margay_established(&m, "10.0.0.1").then_some(())
    });
    let p = margay_peer(&m, "10.0.0.1").unwrap();
    assert_eq!(
        p["four_octet_as"], false,
        "no 4-octet AS capability from BIRD"
    );
    let out = wait_for(T, "BIRD to learn 10.200.0.0/24", || {
        b.route("10.200.0.0/24")
    });
    assert!(
        out.contains("BGP.as_path: 65001\n")
            || out.contains("BGP.as_path: 65001 \n")
            || out.lines().any(|l| l.trim() == "BGP.as_path: 65001"),
        "{out}"
    );
    let out = wait_for(T, "BIRD to learn 10.201.0.0/24", || {
        b.route("10.201.0.0/24")
    });
    // BIRD rebuilds the path from AS_TRANS in AS_PATH plus AS4_PATH (RFC 6793
    // §4.2.3); had we sent AS_PATH alone it would read "65001 23456".
    assert!(out.contains("BGP.as_path: 65001 4200000005"), "{out}");
    let r = wait_for(T, "margay to learn 10.60.0.0/24", || {
        margay_route(&m, "10.60.0.0/24")
    });
    assert_eq!(r["paths"][0]["as_path"], "65100");
}

/// Case 6: Graceful restart: kill -9 margay-bgpd and start it again. BIRD keeps the
/// routes throughout, a ping through them loses nothing, and BIRD sees no
/// withdrawal.
#[test]
fn interop_graceful_restart_kill9_keeps_forwarding() {
    require("bird");
    require("ping");
    let dir = TestDir::new();
    let t = tor_topology();
    let b = bird(&t.tor, dir.path(), &tor_bird_conf("graceful restart on;"));
    let state = dir.path().join("state");
    let yaml = tor_margay_yaml("", &format!("state_dir: {}\n", state.display()))
        .replace("bgp:\n", "bgp:\n  graceful_restart: { restart_time: 30 }\n");
    // What margay sends on the wire, from its first start to after the restart: the OPENs'
    // graceful restart capability is read from these bytes, not from margay's log.
    let capture = OpenCapture::start(&t.m, "10.0.0.2");
    let mut g = margay(&t.m, dir.path(), &yaml);
    wait_for(T, "BIRD to learn 10.200.0.0/24", || {
        b.route("10.200.0.0/24")
    });
    wait_for(T, "margay's kernel route", || {
        t.m.ip(&["route", "show", "10.100.0.0/24"])
            .contains("via 10.0.0.1")
            .then_some(())
    });
    let out = b.birdc("show protocols all m");
    assert!(out.contains("Graceful restart"), "GR negotiated: {out}");
    // 60 pings at 0.1 s spanning the restart.
    let mut ping = t.h1.cmd("ping");
    ping.args(["-c", "60", "-i", "0.1", "-W", "1", "10.200.0.2"]);
    ping.stdout(std::process::Stdio::piped());
    let ping = ping.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    g.proc.kill9();
    for _ in 0..10 {
        assert!(
            b.route("10.200.0.0/24").is_some(),
            "BIRD dropped the route during the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    g.proc = start_margay(&t.m, dir.path(), &g.conf);
    wait_for(T, "the session back", || {
        margay_established(&t.m, "10.0.0.1").then_some(())
    });
    let out = ping.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" 0% packet loss"),
        "ping lost packets across the restart: {text}"
    );
    wait_for(T, "BIRD to leave graceful restart", || {
        let r = b.route("10.200.0.0/24")?;
        (!r.contains("stale") && !b.birdc("show protocols all m").contains("Restarting"))
            .then_some(())
    });
    let stats = b.birdc("show protocols all m");
    let withdraws = stats
        .lines()
        .find(|l| l.trim_start().starts_with("Import withdraws:"))
        .unwrap_or_default()
        .to_owned();
    let accepted = withdraws.split_whitespace().last().unwrap_or("?");
    assert_eq!(accepted, "0", "BIRD saw a withdrawal: {withdraws}\n{stats}");
    // On the wire: the first start's OPEN has the R bit clear, the restart's has it set, and
    // both carry the configured restart time.
    let opens = capture.finish();
    let gr: Vec<(bool, u16)> = opens.iter().filter_map(|o| graceful_restart(o)).collect();
    assert!(
        gr.len() >= 2,
        "two OPENs with the graceful restart capability from margay: {opens:02x?}"
    );
    assert_eq!(gr[0], (false, 30), "the first start: R bit clear");
    assert_eq!(gr[gr.len() - 1], (true, 30), "after kill -9: R bit set");
}

/// tcpdump in a namespace, recording the BGP OPEN messages one address sends.
struct OpenCapture {
    child: std::process::Child,
    out: std::path::PathBuf,
    /// The rest of tcpdump's stderr, read to its end.
    errors: std::thread::JoinHandle<String>,
    _dir: TestDir,
}

impl OpenCapture {
    fn start(ns: &Ns, from: &str) -> OpenCapture {
        require("tcpdump");
        let dir = TestDir::new();
        let out = dir.path().join("capture.txt");
        let mut child = ns
            .cmd("tcpdump")
            .args(["-i", "any", "-nn", "-l", "-x", "-s", "0"])
            .arg(format!("src host {from} and tcp port 179"))
            .stdout(std::fs::File::create(&out).expect("capture file"))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        // tcpdump says "listening on" once it captures; nothing may be sent before.
        let mut err = std::io::BufReader::new(child.stderr.take().expect("tcpdump's stderr"));
        let mut said = String::new();
        while !said.contains("listening on") {
            let n =
                std::io::BufRead::read_line(&mut err, &mut said).expect("reading tcpdump's stderr");
            assert!(n > 0, "tcpdump ended before it listened: {said}");
        }
        let errors = std::thread::spawn(move || {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut err, &mut rest)
                .map(|_| rest)
                .unwrap_or_else(|e| e.to_string())
        });
        OpenCapture {
            child,
            out,
            errors,
            _dir: dir,
        }
    }

    /// Stops tcpdump (it must have run without error) and returns the OPEN messages seen.
    fn finish(mut self) -> Vec<Vec<u8>> {
        use nix::sys::signal::{kill, Signal};
        kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGINT,
        )
        .expect("stopping tcpdump");
        let status = self.child.wait().expect("tcpdump exits");
        let errors = self.errors.join().expect("reading tcpdump's stderr");
        assert!(status.success(), "tcpdump failed ({status}): {errors}");
        let text = std::fs::read_to_string(&self.out).expect("reading the capture");
        tcp_payloads(&text)
            .iter()
            .flat_map(|p| bgp_messages(p))
            .filter(|m| m.first() == Some(&1))
            .collect()
    }
}

/// The TCP payloads of the IPv4 packets `tcpdump -x` printed (the hex starts at the IP
/// header).
fn tcp_payloads(dump: &str) -> Vec<Vec<u8>> {
    let mut packets: Vec<Vec<u8>> = Vec::new();
    for line in dump.lines() {
        let t = line.trim_start();
        match t.strip_prefix("0x").and_then(|r| r.split_once(':')) {
            Some((_, hex)) if line.starts_with(char::is_whitespace) => {
                let bytes = packets.last_mut().expect("hex after a packet line");
                for group in hex.split_whitespace() {
                    for i in (0..group.len()).step_by(2) {
                        bytes.push(u8::from_str_radix(&group[i..i + 2], 16).expect("hex"));
                    }
                }
            }
            _ => packets.push(Vec::new()),
        }
    }
    packets
        .into_iter()
        .filter(|p| p.len() >= 20 && p[0] >> 4 == 4)
        .filter_map(|p| {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            let tcp = p.get(ihl..total)?;
            let off = usize::from(tcp.get(12)? >> 4) * 4;
            Some(tcp.get(off..)?.to_vec())
        })
        .filter(|payload| !payload.is_empty())
        .collect()
}

/// The BGP messages in one TCP payload, each as its type byte followed by its body.
fn bgp_messages(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 19 && b[..16].iter().all(|x| *x == 0xff) {
        let len = usize::from(u16::from_be_bytes([b[16], b[17]]));
        if len < 19 || len > b.len() {
            break;
        }
        out.push(b[18..len].to_vec());
        b = &b[len..];
    }
    out
}

/// The graceful restart capability (RFC 4724, code 64) of an OPEN (type byte first): its R
/// bit and restart time.
fn graceful_restart(open: &[u8]) -> Option<(bool, u16)> {
    // type, version, my AS (2), hold time (2), BGP identifier (4), optional parameters.
    let params_len = usize::from(*open.get(10)?);
    let mut params = open.get(11..11 + params_len)?;
    while params.len() >= 2 {
        let (ty, len) = (params[0], usize::from(params[1]));
        let value = params.get(2..2 + len)?;
        if ty == 2 {
            let mut caps = value;
            while caps.len() >= 2 {
                let (code, clen) = (caps[0], usize::from(caps[1]));
                let cv = caps.get(2..2 + clen)?;
                if code == 64 && cv.len() >= 2 {
                    let word = u16::from_be_bytes([cv[0], cv[1]]);
                    return Some((word & 0x8000 != 0, word & 0x0fff));
                }
                caps = &caps[2 + clen..];
            }
        }
        params = &params[2 + len..];
    }
    None
}

/// The route to `prefix` in `ns`'s main table as `ip -N -j` gives it (protocols as
/// numbers), if there is exactly one.
fn kernel_route(ns: &Ns, prefix: &str) -> Option<serde_json::Value> {
    let out = ns.ip(&["-N", "-j", "-4", "route", "show", "exact", prefix]);
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    match &routes[..] {
        [r] => Some(r.clone()),
        _ => None,
    }
}

/// Case 11: Extended next hop (RFC 8950) on an IPv6-only link: both sides offer IPv4
/// unicast with IPv6 next hops, and each learns the other's IPv4 prefix with the
/// other's IPv6 address as next hop. Without the capability, margay-bgpd has no IPv4
/// address to put in NEXT_HOP and would not announce the prefix at all. Both install
/// the other's prefix in the kernel `via inet6` (margay-bgpd with protocol 77, BIRD
/// with its kernel protocol), and IPv4 traffic between addresses inside the two
/// prefixes crosses the IPv6-only link.
#[test]
fn interop_extended_next_hop_ipv4_over_ipv6_session() {
    require("bird");
    require("ping");
    let dir = TestDir::new();
    let a = Ns::new("birdenh");
    let m = Ns::new("menh");
    link(&a, &["fd00::1/64"], &m, &["fd00::2/64"]);
    // An address inside each side's prefix, on loopback: what the ping runs between.
    a.ip(&["addr", "add", "10.61.0.1/32", "dev", "lo"]);
    m.ip(&["addr", "add", "10.62.0.1/32", "dev", "lo"]);
    let conf = format!(
        "router id 10.0.0.1;\nprotocol device {{}}\nprotocol static {{ ipv4; route 10.61.0.0/24 blackhole; }}\nprotocol kernel {{ ipv4 {{ export where source = RTS_BGP; }}; }}\n{}",
        bird_bgp(
            "m",
            "fd00::1",
            65100,
            "fd00::2",
            65001,
            "",
            "ipv4 { extended next hop on; import all; export all; };\n  ipv6 { import all; export all; };"
        )
    );
    let b = bird(&a, dir.path(), &conf);
    let _g = margay(
        &m,
        dir.path(),
        &margay_yaml(
            65001,
            "10.0.0.2",
            "[fd00::2]:179",
            &peer_yaml("fd00::1", 65100, "    extended_next_hop: true\n"),
            "  - prefix: 10.62.0.0/24",
            "kernel:\n  table: 254\n",
        ),
    );
    // No IPv4 address on the link, only on loopback: the session and the forwarding
    // between the two are IPv6.
    for ns in [&a, &m] {
        let out = ns.ip(&["-j", "-4", "addr", "show"]);
        let links: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        assert!(
            links.iter().all(|l| l["ifname"] == "lo"),
            "IPv4 address off loopback: {out}"
        );
    }
    let nh = wait_for(T, "margay to learn 10.61.0.0/24", || {
        margay_next_hop(&m, "10.61.0.0/24")
    });
    assert_eq!(
        nh, "fd00::1",
        "BIRD's IPv6 address is the IPv4 route's next hop"
    );
    let out = wait_for(T, "BIRD to learn 10.62.0.0/24", || b.route("10.62.0.0/24"));
    assert!(out.contains("BGP.next_hop: fd00::2"), "{out}");
    // BIRD resolved the IPv6 gateway on the link, so the route is usable, not unreachable.
    assert!(out.contains("via fd00::2 on "), "{out}");
    let p = margay_peer(&m, "fd00::1").unwrap();
    assert_eq!(
        p["families"],
        serde_json::json!(["ipv4-unicast", "ipv6-unicast"])
    );
    let caps = b.birdc("show protocols all m");
    let neighbor_caps = caps
        .split("Neighbor capabilities")
        .nth(1)
        .unwrap_or_default();
    assert!(
        neighbor_caps.contains("Extended next hop"),
        "BIRD saw margay-bgpd's extended next hop capability: {caps}"
    );

    // margay-bgpd installed BIRD's prefix through BIRD's IPv6 address, and BIRD ours
    // through ours.
    let r = wait_for(T, "margay-bgpd to install 10.61.0.0/24 via inet6", || {
        kernel_route(&m, "10.61.0.0/24").filter(|r| r["protocol"] == "77")
    });
    assert_eq!(
        r["via"],
        serde_json::json!({ "family": "inet6", "host": "fd00::1" }),
        "{r}"
    );
    let r = wait_for(T, "BIRD to install 10.62.0.0/24", || {
        kernel_route(&a, "10.62.0.0/24")
    });
    assert_eq!(r["protocol"], "12", "BIRD's kernel protocol: {r}");
    assert_eq!(
        r["via"],
        serde_json::json!({ "family": "inet6", "host": "fd00::2" }),
        "{r}"
    );
    let out = m.try_sh("ping -c 3 -i 0.2 -W 2 -I 10.62.0.1 10.61.0.1");
    assert!(
        out.status.success(),
        "margay's namespace cannot reach 10.61.0.1 over the IPv6 link: {}{}",
        String::from_utf8_lossy(&out.stdout),
        m.ip(&["-4", "route", "show"])
    );
}

/// Counts, in `ns`, TCP segments from `from` that arrive with TTL 255 and with any
/// other TTL, in a table of the test's own (it goes with the namespace). Resets are
/// left out: the kernel sends them itself at its default TTL (for example to a SYN
/// that comes before BIRD listens), whatever the socket options.
fn count_ttls(ns: &Ns, from: &str) {
    ns.sh(&format!(
        "nft add table ip mgbttl && \
         nft add chain ip mgbttl pre '{{ type filter hook prerouting priority -300; }}' && \
         nft add rule ip mgbttl pre ip saddr {from} 'tcp flags & rst == 0' ip ttl 255 counter && \
         nft add rule ip mgbttl pre ip saddr {from} 'tcp flags & rst == 0' ip ttl != 255 counter"
    ));
}

/// (segments at TTL 255, segments at another TTL) as counted by `count_ttls`.
fn ttl_counts(ns: &Ns) -> (u64, u64) {
    let out = ns.sh("nft list chain ip mgbttl pre");
    let packets: Vec<u64> = out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            w.position(|x| x == "packets")?;
            w.next()?.parse().ok()
        })
        .collect();
    assert_eq!(packets.len(), 2, "two counters: {out}");
    (packets[0], packets[1])
}

/// Case 12: TTL security (RFC 5082, GTSM). With `ttl security on` in BIRD and
/// `ttl_security: 1` in margay-bgpd the session forms, every segment of BIRD's arriving
/// at TTL 255. With BIRD at its default (TTL 1 towards a directly connected eBGP
/// peer), margay-bgpd drops BIRD's segments and neither side reaches Established, though
/// BIRD keeps trying.
#[test]
fn interop_ttl_security_forms_only_when_both_sides_use_it() {
    require("bird");
    require("nft");
    let mut matched = Duration::ZERO;
    for bird_gtsm in [true, false] {
        let dir = TestDir::new();
        let a = Ns::new("birdttl");
        let m = Ns::new("mttl");
        link(&a, &["10.0.0.1/24"], &m, &["10.0.0.2/24"]);
        count_ttls(&m, "10.0.0.1");
        // BIRD's router ID above ours: collision resolution would keep BIRD's
        // connection, so only the TTL check can keep the session down.
        let conf = format!(
            "router id 10.0.0.99;\nprotocol device {{}}\n{}",
            bird_bgp(
                "m",
                "10.0.0.1",
                65100,
                "10.0.0.2",
                65001,
                if bird_gtsm { "ttl security on;" } else { "" },
                BIRD_V4
            )
        );
        let start = std::time::Instant::now();
        let b = bird(&a, dir.path(), &conf);
        let _g = margay(
            &m,
            dir.path(),
            &margay_yaml(
                65001,
                "10.0.0.2",
                "10.0.0.2:179",
                &peer_yaml("10.0.0.1", 65100, "    ttl_security: 1\n"),
                "  - prefix: 10.200.0.0/24",
                "",
            ),
        );
        if bird_gtsm {
            wait_for(T, "the GTSM session", || {
                (margay_established(&m, "10.0.0.1") && b.established("m")).then_some(())
            });
            matched = start.elapsed();
            wait_for(T, "BIRD to learn 10.200.0.0/24", || {
                b.route("10.200.0.0/24")
            });
            let (at_255, below) = ttl_counts(&m);
            assert!(
                at_255 > 0 && below == 0,
                "BIRD's segments: {at_255} at TTL 255, {below} below"
            );
        } else {
            // margay-bgpd refuses BIRD's connections by the TTL of their SYN, before
            // reading anything (the listener keeps SYNs), and drops BIRD's answers to
            // its own connections below TTL 255: not even an OPEN gets through.
            //
            // Two of BIRD's hold times (9 s) and many connect retries (1 s); the
            // matched case took `matched`.
            let window = Duration::from_secs(20).max(5 * matched);
            wait_for(T, "margay-bgpd's status API", || {
                margay_peer(&m, "10.0.0.1")
            });
            let start = std::time::Instant::now();
            while start.elapsed() < window {
                let p = margay_peer(&m, "10.0.0.1").expect("status API up");
                assert_ne!(p["state"], "Established", "margay-bgpd took TTL 1: {p}");
                assert!(
                    !b.established("m"),
                    "BIRD reached Established with GTSM on one side only: {}",
                    b.birdc("show protocols all m")
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            let (_, below) = ttl_counts(&m);
            assert!(below > 0, "BIRD tried, below TTL 255");
            let p = margay_peer(&m, "10.0.0.1").unwrap();
            assert_eq!(p["messages_received"]["keepalive"], 0, "{p}");
            assert_eq!(p["messages_received"]["open"], 0, "{p}");
        }
    }
    eprintln!("GTSM session established in {matched:?}");
}
