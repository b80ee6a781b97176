//! Speakers talking to each other over loopback addresses (127.0.0.0/8 needs no
//! privileges): sessions form, routes flow, reflection keeps the next hop, limits
//! and refreshes work. Ports are picked per test so tests can run in parallel.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use margay_bgp::wire::{AsPath, NextHop, Prefix};
use margay_bgp::{
    BestRouteChange, BestRouteStream, ConnectMode, PathAttrs, PeerConfig, Speaker, SpeakerConfig,
    SpeakerHandle,
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ip(last: u8, net: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 77, net, last))
}

async fn speaker(asn: u32, addr: IpAddr, port: u16) -> (SpeakerHandle, BestRouteStream) {
    let IpAddr::V4(id) = addr else { unreachable!() };
    let mut c = SpeakerConfig::new(asn, id);
    c.listen = vec![SocketAddr::new(addr, port)];
    Speaker::start(c).await.unwrap()
}

fn peer(addr: IpAddr, asn: u32, port: u16, local: IpAddr) -> PeerConfig {
    let mut p = PeerConfig::new(addr, asn);
    p.port = port;
    p.local_address = Some(local);
    p.connect_retry = 1;
    p.hold_time = 9;
    p.multihop = Some(2);
    p
}

async fn wait_for(
    stream: &mut BestRouteStream,
    what: &str,
    mut pred: impl FnMut(&BestRouteChange) -> bool,
) -> BestRouteChange {
    let fut = async {
        loop {
            let batch = stream.recv().await.expect("speaker stopped");
            if let Some(c) = batch.into_iter().find(|c| pred(c)) {
                return c;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn wait_state(h: &SpeakerHandle, addr: IpAddr, state: margay_bgp::State) {
    for _ in 0..150 {
        let ps = h.peers().await.unwrap();
        if ps.iter().any(|p| p.address == addr && p.state == state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "peer {addr} never reached {state}: {:?}",
        h.peers().await.unwrap()
    );
}

fn pfx(s: &str) -> Prefix {
    s.parse().unwrap()
}

#[tokio::test]
async fn ebgp_session_carries_routes_both_ways_and_withdrawals() {
    let (a_ip, b_ip) = (ip(1, 1), ip(2, 1));
    let port = free_port();
    let (a, mut a_best) = speaker(65001, a_ip, port).await;
    let (b, mut b_best) = speaker(65002, b_ip, port).await;
    a.add_peer(peer(b_ip, 65002, port, a_ip)).await.unwrap();
    b.add_peer(peer(a_ip, 65001, port, b_ip)).await.unwrap();
    a.announce(pfx("10.1.0.0/24"), PathAttrs::default())
        .unwrap();
    b.announce(pfx("10.2.0.0/24"), PathAttrs::default())
        .unwrap();
    let got = wait_for(&mut b_best, "10.1.0.0/24 at b", |c| {
        c.prefix == pfx("10.1.0.0/24") && c.best.is_some()
    })
    .await;
    let best = got.best.unwrap();
    assert_eq!(best.next_hops, vec![a_ip], "eBGP next hop is the sender");
    assert_eq!(best.attrs.as_path, AsPath::sequence([65001]));
    wait_for(&mut a_best, "10.2.0.0/24 at a", |c| {
        c.prefix == pfx("10.2.0.0/24") && c.best.is_some()
    })
    .await;
    wait_state(&a, b_ip, margay_bgp::State::Established).await;
    a.withdraw(pfx("10.1.0.0/24")).unwrap();
    wait_for(&mut b_best, "withdrawal at b", |c| {
        c.prefix == pfx("10.1.0.0/24") && c.best.is_none()
    })
    .await;
    let st = b.peers().await.unwrap();
    assert_eq!(st[0].prefixes_accepted, 0);
    assert!(st[0].messages_received.update >= 2);
    a.shutdown("test over").await.unwrap();
    // b sees the administrative shutdown with its message.
    for _ in 0..50 {
        let p = &b.peers().await.unwrap()[0];
        if let Some(e) = &p.last_error {
            assert!(e.contains("test over"), "{e}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("b never saw the shutdown");
}

#[tokio::test]
async fn route_reflector_reflects_between_clients_keeping_the_next_hop() {
    let (rr_ip, c1_ip, c2_ip) = (ip(1, 2), ip(2, 2), ip(3, 2));
    let port = free_port();
    let (rr, _rr_best) = speaker(65000, rr_ip, port).await;
    let (c1, _c1_best) = speaker(65000, c1_ip, port).await;
    let (c2, mut c2_best) = speaker(65000, c2_ip, port).await;
    for c in [c1_ip, c2_ip] {
        let mut p = peer(c, 65000, port, rr_ip);
        p.rr_client = true;
        p.mode = ConnectMode::Passive;
        rr.add_peer(p).await.unwrap();
    }
    c1.add_peer(peer(rr_ip, 65000, port, c1_ip)).await.unwrap();
    c2.add_peer(peer(rr_ip, 65000, port, c2_ip)).await.unwrap();
    let nh = Ipv4Addr::new(192, 0, 2, 11);
    c1.announce(
        pfx("10.11.0.0/24"),
        PathAttrs {
            next_hop: Some(NextHop::V4(nh)),
            ..PathAttrs::default()
        },
    )
    .unwrap();
    let got = wait_for(&mut c2_best, "reflected route", |c| {
        c.prefix == pfx("10.11.0.0/24") && c.best.is_some()
    })
    .await
    .best
    .unwrap();
    assert_eq!(got.next_hops, vec![IpAddr::V4(nh)]);
    let IpAddr::V4(c1_id) = c1_ip else {
        unreachable!()
    };
    let IpAddr::V4(rr_id) = rr_ip else {
        unreachable!()
    };
    assert_eq!(got.attrs.originator_id, Some(c1_id));
    assert_eq!(got.attrs.cluster_list, vec![rr_id]);
}

#[tokio::test]
async fn max_prefix_tears_the_session_down_with_cease_1() {
    let (a_ip, b_ip) = (ip(1, 3), ip(2, 3));
    let port = free_port();
    let (a, _ab) = speaker(65001, a_ip, port).await;
    let (b, _bb) = speaker(65002, b_ip, port).await;
    let mut pa = peer(b_ip, 65002, port, a_ip);
    pa.idle_hold_time = Some(30);
    a.add_peer(pa).await.unwrap();
    let mut pb = peer(a_ip, 65001, port, b_ip);
    pb.max_prefixes = Some(5);
    pb.idle_hold_time = Some(30);
    b.add_peer(pb).await.unwrap();
    wait_state(&b, a_ip, margay_bgp::State::Established).await;
    for i in 0..10u8 {
        a.announce(pfx(&format!("10.3.{i}.0/24")), PathAttrs::default())
            .unwrap();
    }
    for _ in 0..100 {
        let p = &a.peers().await.unwrap()[0];
        if p.state != margay_bgp::State::Established {
            let e = p.last_error.clone().unwrap_or_default();
            assert!(e.contains("NOTIFICATION 6/1"), "{e}");
            assert_eq!(b.peers().await.unwrap()[0].prefixes_accepted, 0);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("session stayed up past the limit");
}

#[tokio::test]
async fn export_policy_change_applies_without_reset_and_refresh_resends() {
    let (a_ip, b_ip) = (ip(1, 4), ip(2, 4));
    let port = free_port();
    let (a, _ab) = speaker(65001, a_ip, port).await;
    let (b, mut b_best) = speaker(65002, b_ip, port).await;
    let pa = peer(b_ip, 65002, port, a_ip);
    a.add_peer(pa.clone()).await.unwrap();
    b.add_peer(peer(a_ip, 65001, port, b_ip)).await.unwrap();
    a.announce(pfx("10.4.1.0/24"), PathAttrs::default())
        .unwrap();
    a.announce(pfx("10.4.2.0/24"), PathAttrs::default())
        .unwrap();
    wait_for(&mut b_best, "both", |c| c.prefix == pfx("10.4.2.0/24")).await;
    wait_state(&a, b_ip, margay_bgp::State::Established).await;
    let since = a.peers().await.unwrap()[0].since;
    let mut pa2 = pa.clone();
    pa2.export = serde_yaml::from_str(
        "rules: [{ match: { prefixes: [{ prefix: 10.4.1.0/24 }] }, action: reject }]",
    )
    .unwrap();
    a.update_peer(pa2).await.unwrap();
    wait_for(&mut b_best, "policy withdrawal", |c| {
        c.prefix == pfx("10.4.1.0/24") && c.best.is_none()
    })
    .await;
    assert_eq!(
        a.peers().await.unwrap()[0].since,
        since,
        "session was not reset"
    );
    // Route refresh: b asks a to resend; a's counters show the refresh.
    b.request_refresh(a_ip).await.unwrap();
    for _ in 0..50 {
        if a.peers().await.unwrap()[0].messages_received.route_refresh >= 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("ROUTE-REFRESH never arrived");
}

/// RFC 9687: a peer that completes the handshake and then stops reading is detected
/// by the send hold timer, and the session is closed with error code 8.
#[tokio::test]
async fn send_hold_timer_closes_a_session_whose_peer_stopped_reading() {
    use margay_bgp::wire::{Context, Message, Open};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (a_ip, b_ip) = (ip(1, 5), ip(2, 5));
    let port = free_port();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(SocketAddr::new(b_ip, port)).unwrap();
    let listener = sock.listen(1).unwrap();
    let (a, _ab) = speaker(65001, a_ip, free_port()).await;
    let mut p = peer(b_ip, 65002, port, a_ip);
    p.mode = ConnectMode::Active;
    p.send_hold_time = Some(2);
    p.hold_time = 0; // no hold timer: only the send hold timer can end this session
    a.add_peer(p).await.unwrap();
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf).await.unwrap();
    let ctx = Context::default();
    let IpAddr::V4(bid) = b_ip else {
        unreachable!()
    };
    s.write_all(
        &Message::Open(Open::new(65002, 0, bid, vec![]))
            .to_bytes(&ctx)
            .unwrap(),
    )
    .await
    .unwrap();
    s.write_all(&Message::Keepalive.to_bytes(&ctx).unwrap())
        .await
        .unwrap();
    wait_state(&a, b_ip, margay_bgp::State::Established).await;
    // Distinct attributes per prefix: one UPDATE each, megabytes in all.
    for i in 0..60_000u32 {
        let pre =
            Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap();
        let attrs = PathAttrs {
            med: Some(i),
            ..PathAttrs::default()
        };
        a.announce(pre, attrs).unwrap();
    }
    for _ in 0..200 {
        let p = &a.peers().await.unwrap()[0];
        if p.state != margay_bgp::State::Established {
            let e = p.last_error.clone().unwrap_or_default();
            assert!(e.contains("NOTIFICATION 8/0"), "{e}");
            drop(s);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the session stayed up although the peer stopped reading");
}

#[tokio::test]
async fn a_listen_address_in_use_is_an_error_and_the_next_start_works() {
    let addr = ip(1, 9);
    let port = free_port();
    let taken = std::net::TcpListener::bind(SocketAddr::new(addr, port)).unwrap();
    let IpAddr::V4(id) = addr else { unreachable!() };
    let mut c = SpeakerConfig::new(65001, id);
    c.listen = vec![SocketAddr::new(addr, port)];
    match Speaker::start(c.clone()).await {
        Err(margay_bgp::SpeakerError::Listen { addr: a, .. }) => {
            assert_eq!(a, SocketAddr::new(addr, port))
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("started on an address in use"),
    }
    drop(taken);
    let (h, _best) = Speaker::start(c).await.unwrap();
    assert!(h.peers().await.unwrap().is_empty());
    h.shutdown("test over").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_flow_when_the_embedder_runs_a_multi_thread_runtime() {
    let (a_ip, b_ip) = (ip(1, 10), ip(2, 10));
    let (pa, pb) = (free_port(), free_port());
    let (a, _a_best) = speaker(65001, a_ip, pa).await;
    let (b, mut b_best) = speaker(65002, b_ip, pb).await;
    a.add_peer(peer(b_ip, 65002, pb, a_ip)).await.unwrap();
    let mut pb_cfg = peer(a_ip, 65001, pa, b_ip);
    pb_cfg.mode = ConnectMode::Passive;
    b.add_peer(pb_cfg).await.unwrap();
    a.announce(pfx("10.10.0.0/24"), PathAttrs::default())
        .unwrap();
    let got = wait_for(&mut b_best, "10.10.0.0/24 at b", |c| {
        c.prefix == pfx("10.10.0.0/24") && c.best.is_some()
    })
    .await;
    assert_eq!(got.best.unwrap().next_hops, vec![a_ip]);
    a.withdraw(pfx("10.10.0.0/24")).unwrap();
    wait_for(&mut b_best, "the withdrawal at b", |c| {
        c.prefix == pfx("10.10.0.0/24") && c.best.is_none()
    })
    .await;
}

/// A route reflector's clients with the same settings share an update group; one
/// that stops reading is left behind after a short wait, and the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_leaves_its_update_group_and_holds_nobody_back() {
    use margay_bgp::wire::{Context, Message, Open};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (rr_ip, c1_ip, c2_ip, slow_ip) = (ip(1, 12), ip(2, 12), ip(3, 12), ip(4, 12));
    let port = free_port();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(SocketAddr::new(slow_ip, port)).unwrap();
    let listener = sock.listen(1).unwrap();
    let (rr, _rr_best) = speaker(65000, rr_ip, free_port()).await;
    let (c1, _c1_best) = speaker(65000, c1_ip, port).await;
    let (c2, _c2_best) = speaker(65000, c2_ip, port).await;
    for c in [c1_ip, c2_ip, slow_ip] {
        let mut p = peer(c, 65000, port, rr_ip);
        p.rr_client = true;
        p.mode = ConnectMode::Active;
        p.send_hold_time = Some(120);
        rr.add_peer(p).await.unwrap();
    }
    for (c, ip) in [(&c1, c1_ip), (&c2, c2_ip)] {
        let mut p = peer(rr_ip, 65000, port, ip);
        p.mode = ConnectMode::Passive;
        c.add_peer(p).await.unwrap();
    }
    // The slow client answers with the reflector's own capabilities (so its
    // session encodes like the others'), then never reads again.
    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    let ctx = Context::default();
    let Message::Open(theirs) = Message::decode(&buf[..n], &ctx).unwrap() else {
        panic!("expected an OPEN");
    };
    let IpAddr::V4(slow_id) = slow_ip else {
        unreachable!()
    };
    let mine = Open {
        hold_time: 0,
        bgp_id: slow_id,
        ..theirs
    };
    s.write_all(&Message::Open(mine).to_bytes(&ctx).unwrap())
        .await
        .unwrap();
    s.write_all(&Message::Keepalive.to_bytes(&ctx).unwrap())
        .await
        .unwrap();

    // All three end up in one group once their own table walks are done.
    let mut grouped = false;
    for _ in 0..100 {
        let ps = rr.peers().await.unwrap();
        let groups: Vec<_> = ps.iter().map(|p| (p.state, p.update_group)).collect();
        if groups
            .iter()
            .all(|g| g.0 == margay_bgp::State::Established && g.1.is_some())
            && groups.iter().all(|g| g.1 == groups[0].1)
        {
            grouped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        grouped,
        "no common update group: {:?}",
        rr.peers().await.unwrap()
    );

    // Distinct attributes per prefix: one UPDATE each, with enough communities to
    // be more than socket buffers hold (about 20 MB in all).
    const N: usize = 60_000;
    let communities: Vec<_> = (0..64)
        .map(|k| margay_bgp::wire::Community(0xfde8_0000 + k))
        .collect();
    for i in 0..N as u32 {
        let pre =
            Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap();
        let attrs = PathAttrs {
            med: Some(i),
            next_hop: Some(NextHop::V4(Ipv4Addr::new(192, 0, 2, 1))),
            communities: communities.clone(),
            ..PathAttrs::default()
        };
        rr.announce(pre, attrs).unwrap();
    }
    for c in [&c1, &c2] {
        let mut got = 0;
        for _ in 0..600 {
            got = c.peers().await.unwrap()[0].prefixes_accepted;
            if got == N {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(got, N, "a fast client was held back");
    }
    let ps = rr.peers().await.unwrap();
    let of = |a: IpAddr| ps.iter().find(|p| p.address == a).unwrap();
    assert_eq!(of(slow_ip).state, margay_bgp::State::Established);
    assert_eq!(of(slow_ip).update_group, None, "the slow client left");
    assert!(of(c1_ip).update_group.is_some());
    assert_eq!(of(c1_ip).update_group, of(c2_ip).update_group);
    assert_eq!(of(c1_ip).prefixes_advertised, N);
    drop(s);
    for h in [rr, c1, c2] {
        h.shutdown("test over").await.unwrap();
    }
}

/// The documented `listen: ["0.0.0.0:179", "[::]:179"]`: both wildcards on one port
/// (the IPv6 one takes IPv6 only) and both families reach the speaker.
#[tokio::test]
async fn ipv4_and_ipv6_wildcard_listeners_share_a_port() {
    let port = free_port();
    let mut c = SpeakerConfig::new(65001, Ipv4Addr::new(127, 77, 13, 1));
    c.listen = vec![
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
    ];
    let (h, _best) = Speaker::start(c).await.expect("both listeners bound");
    for to in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ] {
        tokio::net::TcpStream::connect(to)
            .await
            .unwrap_or_else(|e| panic!("no listener on {to}: {e}"));
    }
    h.shutdown("test over").await.unwrap();
}

/// RFC 7313 both ways, against a raw peer that speaks Enhanced Route Refresh: our
/// refresh request is answered with BoRR, only some routes again, EoRR, and the route
/// not re-sent is gone after the EoRR (no withdrawal was sent); the peer's request
/// is answered with BoRR, the UPDATEs, EoRR, in that order.
#[tokio::test]
async fn enhanced_route_refresh_drops_routes_not_resent_and_frames_our_answer() {
    use bytes::BytesMut;
    use margay_bgp::wire::{
        Capability, Context, Family, Message, Nlri, Open, RouteRefresh, UpdatePacker,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn next_msg(s: &mut TcpStream, buf: &mut BytesMut, ctx: &Context) -> Message {
        let read = async {
            loop {
                if buf.len() >= 19 {
                    let len = usize::from(u16::from_be_bytes([buf[16], buf[17]]));
                    if buf.len() >= len {
                        let m = buf.split_to(len);
                        if m[18] == 4 {
                            continue; // KEEPALIVE
                        }
                        return Message::decode(&m, ctx).unwrap();
                    }
                }
                assert!(s.read_buf(buf).await.unwrap() > 0, "connection closed");
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("no message from the speaker")
    }
    let v4 = Family::Ipv4Unicast;
    let rr = |m: &Message| match m {
        Message::RouteRefresh(r) => Some(r.subtype),
        _ => None,
    };

    let (a_ip, r_ip) = (ip(1, 13), ip(2, 13));
    let port = free_port();
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(r_ip, port))
        .await
        .unwrap();
    let (a, mut a_best) = speaker(65001, a_ip, free_port()).await;
    let mut p = peer(r_ip, 65002, port, a_ip);
    p.mode = ConnectMode::Active;
    a.add_peer(p).await.unwrap();
    a.announce(pfx("10.13.9.0/24"), PathAttrs::default())
        .unwrap();

    let (mut s, _) = listener.accept().await.unwrap();
    let mut buf = BytesMut::new();
    let Message::Open(theirs) = next_msg(&mut s, &mut buf, &Context::default()).await else {
        panic!("expected an OPEN");
    };
    assert!(
        theirs
            .capabilities
            .contains(&Capability::EnhancedRouteRefresh),
        "our OPEN advertises Enhanced Route Refresh: {:?}",
        theirs.capabilities
    );
    let IpAddr::V4(r_id) = r_ip else {
        unreachable!()
    };
    let mine = Open::new(
        65002,
        0,
        r_id,
        vec![
            Capability::Multiprotocol { afi: 1, safi: 1 },
            Capability::RouteRefresh,
            Capability::EnhancedRouteRefresh,
            Capability::FourOctetAs(65002),
        ],
    );
    let ctx = Context::negotiate(&mine, &theirs, true);
    s.write_all(&Message::Open(mine).to_bytes(&ctx).unwrap())
        .await
        .unwrap();
    s.write_all(&Message::Keepalive.to_bytes(&ctx).unwrap())
        .await
        .unwrap();
    let announce = |prefixes: &[&str]| {
        let attrs = PathAttrs {
            as_path: AsPath::sequence([65002]),
            next_hop: Some(NextHop::V4(Ipv4Addr::new(192, 0, 2, 13))),
            ..PathAttrs::default()
        };
        let mut b = BytesMut::new();
        UpdatePacker::new(&ctx)
            .announce(
                &attrs.to_wire(v4),
                prefixes.iter().map(|p| Nlri::new(pfx(p))),
                &mut b,
            )
            .unwrap();
        b
    };
    let marker = |subtype| {
        Message::RouteRefresh(RouteRefresh::new(v4, subtype))
            .to_bytes(&ctx)
            .unwrap()
    };
    let (kept, dropped, kept2) = ("10.13.1.0/24", "10.13.2.0/24", "10.13.3.0/24");
    s.write_all(&announce(&[kept, dropped, kept2]))
        .await
        .unwrap();
    // The speaker's first walk: our route, then End-of-RIB.
    loop {
        if let Message::Update(u) = next_msg(&mut s, &mut buf, &ctx).await {
            if u.end_of_rib_family() == Some(v4) {
                break;
            }
        }
    }
    wait_for(&mut a_best, "the peer's routes", |c| {
        c.prefix == pfx(kept2) && c.best.is_some()
    })
    .await;

    // In: we ask, the peer re-sends two of its three routes between BoRR and EoRR.
    a.request_refresh(r_ip).await.unwrap();
    let m = next_msg(&mut s, &mut buf, &ctx).await;
    assert_eq!(rr(&m), Some(RouteRefresh::NORMAL), "{m:?}");
    s.write_all(&marker(RouteRefresh::BEGIN)).await.unwrap();
    s.write_all(&announce(&[kept, kept2])).await.unwrap();
    let held = |routes: Vec<margay_bgp::RouteStatus>| {
        routes.iter().map(|r| r.prefix.clone()).collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = held(a.routes(Some(pfx(dropped))).await.unwrap());
    assert_eq!(before, vec![dropped.to_owned()], "kept until the EoRR");
    s.write_all(&marker(RouteRefresh::END)).await.unwrap();
    wait_for(&mut a_best, "the route not re-sent to go", |c| {
        c.prefix == pfx(dropped) && c.best.is_none()
    })
    .await;
    for p in [kept, kept2] {
        let r = a.routes(Some(pfx(p))).await.unwrap();
        assert!(
            r.len() == 1 && r[0].paths.len() == 1 && !r[0].paths[0].stale,
            "{p} stays, fresh: {r:?}"
        );
    }

    // Out: the peer asks; BoRR, the route again, EoRR.
    s.write_all(&marker(RouteRefresh::NORMAL)).await.unwrap();
    let m = next_msg(&mut s, &mut buf, &ctx).await;
    assert_eq!(rr(&m), Some(RouteRefresh::BEGIN), "{m:?}");
    let mut resent = Vec::new();
    loop {
        match next_msg(&mut s, &mut buf, &ctx).await {
            Message::Update(u) => resent.extend(u.announced().map(|n| n.prefix)),
            m => {
                assert_eq!(rr(&m), Some(RouteRefresh::END), "{m:?}");
                break;
            }
        }
    }
    assert_eq!(resent, vec![pfx("10.13.9.0/24")]);
    // An unknown subtype changes nothing and keeps the session.
    s.write_all(&marker(7)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        a.peers().await.unwrap()[0].state,
        margay_bgp::State::Established
    );
    assert_eq!(a.peers().await.unwrap()[0].prefixes_accepted, 2);
    drop(s);
    a.shutdown("test over").await.unwrap();
}

/// Waits until the reflector has every one of `peers` Established in one update group.
async fn wait_grouped(rr: &SpeakerHandle, peers: &[IpAddr]) {
    for _ in 0..150 {
        let ps = rr.peers().await.unwrap();
        let groups: Vec<_> = peers
            .iter()
            .map(|a| {
                ps.iter()
                    .find(|p| p.address == *a && p.state == margay_bgp::State::Established)
                    .and_then(|p| p.update_group)
            })
            .collect();
        if groups[0].is_some() && groups.iter().all(|g| *g == groups[0]) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never in one update group: {:?}", rr.peers().await.unwrap());
}

/// A group member whose session ends at the maximum-prefix limit leaves its group;
/// when it comes back it walks the table on its own and joins again, and the group
/// goes on sending to everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_closed_at_its_prefix_limit_leaves_its_group_and_rejoins() {
    let (rr_ip, c1_ip, c2_ip) = (ip(1, 14), ip(2, 14), ip(3, 14));
    let port = free_port();
    let (rr, _rr_best) = speaker(65000, rr_ip, port).await;
    let (c1, mut c1_best) = speaker(65000, c1_ip, port).await;
    let (c2, mut c2_best) = speaker(65000, c2_ip, port).await;
    for c in [c1_ip, c2_ip] {
        let mut p = peer(c, 65000, port, rr_ip);
        p.rr_client = true;
        p.mode = ConnectMode::Passive;
        p.idle_hold_time = Some(1);
        if c == c2_ip {
            p.max_prefixes = Some(5);
        }
        rr.add_peer(p).await.unwrap();
    }
    c1.add_peer(peer(rr_ip, 65000, port, c1_ip)).await.unwrap();
    c2.add_peer(peer(rr_ip, 65000, port, c2_ip)).await.unwrap();
    wait_grouped(&rr, &[c1_ip, c2_ip]).await;
    let via_c2 = PathAttrs {
        next_hop: Some(NextHop::V4(Ipv4Addr::new(192, 0, 2, 2))),
        ..PathAttrs::default()
    };
    for i in 0..10u8 {
        c2.announce(pfx(&format!("10.14.{i}.0/24")), via_c2.clone())
            .unwrap();
    }
    let mut closed = false;
    for _ in 0..100 {
        let ps = rr.peers().await.unwrap();
        if ps
            .iter()
            .any(|p| p.address == c2_ip && p.state != margay_bgp::State::Established)
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "the reflector kept the session past the limit");
    // Back under the limit, c2 reconnects on its own.
    for i in 5..10u8 {
        c2.withdraw(pfx(&format!("10.14.{i}.0/24"))).unwrap();
    }
    wait_grouped(&rr, &[c1_ip, c2_ip]).await;
    rr.announce(
        pfx("10.99.0.0/24"),
        PathAttrs {
            next_hop: Some(NextHop::V4(Ipv4Addr::new(192, 0, 2, 1))),
            ..PathAttrs::default()
        },
    )
    .unwrap();
    for best in [&mut c1_best, &mut c2_best] {
        wait_for(best, "the reflector's route after the rejoin", |c| {
            c.prefix == pfx("10.99.0.0/24") && c.best.is_some()
        })
        .await;
    }
    let mut accepted = 0;
    for _ in 0..100 {
        accepted = c1.peers().await.unwrap()[0].prefixes_accepted;
        if accepted == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        accepted, 6,
        "c1 holds c2's five prefixes and the reflector's"
    );
    let ps = rr.peers().await.unwrap();
    let of = |a: IpAddr| ps.iter().find(|p| p.address == a).unwrap();
    assert_eq!(of(c2_ip).prefixes_accepted, 5);
    assert_eq!(of(c2_ip).prefixes_advertised, 1, "nothing of its own back");
    assert_eq!(of(c1_ip).prefixes_advertised, 6);
    for h in [rr, c1, c2] {
        h.shutdown("test over").await.unwrap();
    }
}
