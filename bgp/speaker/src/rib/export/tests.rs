//! Route reflection, eBGP/iBGP export rules, next hops and Adj-RIB-Out batching.

use super::*;
use crate::rib::decision::LOCAL;
use margay_bgp_wire::{AsPath, Message, MpReach, PathAttribute};

const RID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const CLUSTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);

/// Sources: 1, 2 RR clients; 3 iBGP non-client; 4 eBGP (AS 65100).
fn rib() -> Rib {
    let mut r = Rib::new(RID);
    let mk = |kind, i: u8, client| Source {
        kind,
        router_id: Ipv4Addr::new(10, 0, 0, i),
        addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)),
        rr_client: client,
    };
    r.set_source(1, mk(SourceKind::Ibgp, 1, true));
    r.set_source(2, mk(SourceKind::Ibgp, 2, true));
    r.set_source(3, mk(SourceKind::Ibgp, 3, false));
    r.set_source(4, mk(SourceKind::Ebgp, 4, false));
    r
}

fn ctx(peer: PeerIdx) -> ExportCtx {
    ExportCtx {
        peer,
        ebgp: peer == 4,
        rr_client: peer == 1 || peer == 2,
        local_asn: 65000,
        router_id: RID,
        cluster_id: CLUSTER,
        next_hop: NextHopMode::Auto,
        self_v4: Some(Ipv4Addr::new(10, 0, 0, 100)),
        self_v6: None,
        families: Families::ALL,
        extended_next_hop_v4: false,
        policy: Arc::new(Policy::accept_all()),
    }
}

fn learned(next_hop: [u8; 4], path: &[u32]) -> Arc<PathAttrs> {
    Arc::new(PathAttrs {
        as_path: AsPath::sequence(path.iter().copied()),
        next_hop: Some(NextHop::V4(Ipv4Addr::from(next_hop))),
        local_pref: Some(100),
        ..PathAttrs::default()
    })
}

fn p(s: &str) -> Prefix {
    s.parse().unwrap()
}

fn export_of(r: &Rib, to: PeerIdx, prefix: &str) -> Option<Arc<PathAttrs>> {
    let e = r.get(&p(prefix))?;
    let best = e.best()?;
    ctx(to).export(&e.prefix, best, r.source(best.source))
}

#[test]
fn client_routes_are_reflected_to_everyone_with_originator_and_cluster_list() {
    let mut r = rib();
    r.update(1, p("10.1.0.0/24"), Some(learned([10, 0, 0, 1], &[])));
    let to_client = export_of(&r, 2, "10.1.0.0/24").expect("client to client");
    assert_eq!(to_client.originator_id, Some(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!(to_client.cluster_list, vec![CLUSTER]);
    assert_eq!(
        to_client.next_hop,
        Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 1))),
        "the reflector never becomes the next hop"
    );
    assert!(
        export_of(&r, 3, "10.1.0.0/24").is_some(),
        "client to non-client"
    );
    assert!(
        export_of(&r, 1, "10.1.0.0/24").is_none(),
        "never back to the source"
    );
    let to_ebgp = export_of(&r, 4, "10.1.0.0/24").unwrap();
    assert_eq!(to_ebgp.as_path, AsPath::sequence([65000]));
    assert_eq!(
        to_ebgp.next_hop,
        Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 100)))
    );
    assert_eq!(to_ebgp.local_pref, None);
    assert_eq!(to_ebgp.originator_id, None);
    assert!(to_ebgp.cluster_list.is_empty());
}

#[test]
fn non_client_routes_go_only_to_clients_and_ebgp() {
    let mut r = rib();
    r.update(3, p("10.3.0.0/24"), Some(learned([10, 0, 0, 3], &[])));
    assert!(export_of(&r, 1, "10.3.0.0/24").is_some());
    assert!(export_of(&r, 4, "10.3.0.0/24").is_some());
    let mut c = ctx(5);
    c.rr_client = false;
    let e = r.get(&p("10.3.0.0/24")).unwrap();
    let best = e.best().unwrap();
    assert!(
        c.export(&e.prefix, best, r.source(3)).is_none(),
        "non-client to non-client"
    );
}

#[test]
fn existing_originator_and_cluster_list_are_kept_and_extended() {
    let mut r = rib();
    let mut a = (*learned([10, 9, 9, 9], &[])).clone();
    a.originator_id = Some(Ipv4Addr::new(10, 9, 9, 9));
    a.cluster_list = vec![Ipv4Addr::new(1, 1, 1, 1)];
    r.update(1, p("10.9.0.0/24"), Some(Arc::new(a)));
    let out = export_of(&r, 2, "10.9.0.0/24").unwrap();
    assert_eq!(out.originator_id, Some(Ipv4Addr::new(10, 9, 9, 9)));
    assert_eq!(out.cluster_list, vec![CLUSTER, Ipv4Addr::new(1, 1, 1, 1)]);
}

#[test]
fn next_hop_self_does_not_apply_to_reflected_routes() {
    let mut r = rib();
    r.update(1, p("10.1.0.0/24"), Some(learned([10, 0, 0, 1], &[])));
    r.update(4, p("10.4.0.0/24"), Some(learned([10, 0, 0, 4], &[65100])));
    let mut c = ctx(2);
    c.next_hop = NextHopMode::SelfAddr;
    let e = r.get(&p("10.1.0.0/24")).unwrap();
    let out = c.export(&e.prefix, e.best().unwrap(), r.source(1)).unwrap();
    assert_eq!(out.next_hop, Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 1))));
    let e = r.get(&p("10.4.0.0/24")).unwrap();
    let out = c.export(&e.prefix, e.best().unwrap(), r.source(4)).unwrap();
    assert_eq!(
        out.next_hop,
        Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 100)))
    );
    // Auto: eBGP-learned routes keep their next hop towards iBGP peers.
    let out = ctx(2)
        .export(&e.prefix, e.best().unwrap(), r.source(4))
        .unwrap();
    assert_eq!(out.next_hop, Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 4))));
    assert_eq!(out.local_pref, Some(100));
}

#[test]
fn keep_mode_keeps_the_next_hop_towards_ebgp() {
    let mut r = rib();
    r.update(1, p("10.1.0.0/24"), Some(learned([10, 0, 0, 1], &[])));
    let mut c = ctx(4);
    c.next_hop = NextHopMode::Keep;
    let e = r.get(&p("10.1.0.0/24")).unwrap();
    let out = c.export(&e.prefix, e.best().unwrap(), r.source(1)).unwrap();
    assert_eq!(out.next_hop, Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 1))));
}

#[test]
fn well_known_communities_limit_export() {
    let mut r = rib();
    let mut a = (*learned([10, 0, 0, 1], &[])).clone();
    a.communities = vec![Community::NO_EXPORT];
    r.update(1, p("10.1.0.0/24"), Some(Arc::new(a.clone())));
    assert!(export_of(&r, 2, "10.1.0.0/24").is_some());
    assert!(export_of(&r, 4, "10.1.0.0/24").is_none());
    a.communities = vec![Community::NO_ADVERTISE];
    r.update(1, p("10.1.0.0/24"), Some(Arc::new(a)));
    assert!(export_of(&r, 2, "10.1.0.0/24").is_none());
}

#[test]
fn import_checks_catch_loops() {
    let ib = ImportCtx {
        ebgp: false,
        local_asn: 65000,
        router_id: RID,
        cluster_id: CLUSTER,
    };
    let eb = ImportCtx { ebgp: true, ..ib };
    let ok = learned([10, 0, 0, 1], &[65100]);
    assert_eq!(import_check(&eb, &ok), Ok(()));
    assert_eq!(
        import_check(&eb, &learned([10, 0, 0, 1], &[65100, 65000])),
        Err(ImportReject::AsLoop(65000))
    );
    let mut a = (*ok).clone();
    a.originator_id = Some(RID);
    assert_eq!(import_check(&ib, &a), Err(ImportReject::OriginatorIsUs));
    a.originator_id = None;
    a.cluster_list = vec![CLUSTER];
    assert_eq!(import_check(&ib, &a), Err(ImportReject::ClusterLoop));
    a.next_hop = None;
    a.cluster_list.clear();
    assert_eq!(import_check(&ib, &a), Err(ImportReject::NoNextHop));
}

#[test]
fn ebgp_export_drops_learned_med_but_keeps_one_set_by_policy() {
    let mut r = rib();
    let mut a = (*learned([10, 0, 0, 1], &[])).clone();
    a.med = Some(50);
    r.update(1, p("10.1.0.0/24"), Some(Arc::new(a)));
    assert_eq!(export_of(&r, 4, "10.1.0.0/24").unwrap().med, None);
    let mut c = ctx(4);
    c.policy = Arc::new(
        serde_yaml::from_str("rules: [{ action: accept, set: { med: 7, prepend_as: 65000 } }]")
            .unwrap(),
    );
    let e = r.get(&p("10.1.0.0/24")).unwrap();
    let out = c.export(&e.prefix, e.best().unwrap(), r.source(1)).unwrap();
    assert_eq!(out.med, Some(7));
    assert_eq!(out.as_path, AsPath::sequence([65000, 65000]));
    // A local route keeps its MED towards eBGP.
    let l = PathAttrs {
        med: Some(9),
        ..PathAttrs::default()
    };
    r.update(LOCAL, p("10.50.0.0/24"), Some(Arc::new(l)));
    let out = export_of(&r, 4, "10.50.0.0/24").unwrap();
    assert_eq!(out.med, Some(9));
    assert_eq!(
        out.next_hop,
        Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 100)))
    );
}

#[test]
fn ipv6_routes_over_an_ipv4_session_get_a_mapped_next_hop_without_an_ipv6_address() {
    let c = ctx(4);
    assert_eq!(
        c.self_next_hop(Family::Ipv6Unicast),
        Some(NextHop::V6 {
            global: "::ffff:10.0.0.100".parse().unwrap(),
            link_local: None
        })
    );
    let mut c = ctx(4);
    c.self_v4 = None;
    c.self_v6 = Some("2001:db8::100".parse().unwrap());
    assert_eq!(
        c.self_next_hop(Family::Ipv4Unicast),
        None,
        "needs extended next hop"
    );
    c.extended_next_hop_v4 = true;
    assert!(matches!(
        c.self_next_hop(Family::Ipv4Unicast),
        Some(NextHop::V6 { .. })
    ));
}

fn decode_all(bytes: &[u8], ctx: &Context) -> Vec<Update> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = margay_bgp_wire::frame_len(rest, ctx).unwrap().unwrap();
        match Message::decode(&rest[..n], ctx).unwrap() {
            Message::Update(u) => out.push(u),
            m => panic!("unexpected {m:?}"),
        }
        rest = &rest[n..];
    }
    out
}

#[test]
fn adj_rib_out_packs_walks_then_follows_the_journal() {
    let mut r = rib();
    let a = learned([10, 0, 0, 1], &[]);
    for i in 0..2000u32 {
        let pre =
            Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap();
        r.update(1, pre, Some(a.clone()));
    }
    let c = ctx(2);
    let mut out = AdjRibOut::new(&r);
    let b = collect(&r, &mut out, &c, 1500);
    assert_eq!(b.prefix_count(), 1500);
    assert!(!b.synced && !b.walk_done);
    let b2 = collect(&r, &mut out, &c, 1500);
    assert_eq!(b2.prefix_count(), 500);
    assert!(b2.synced && b2.walk_done);
    assert_eq!(out.count(), 2000);
    assert_eq!(b.announced.len(), 1, "one shared attribute set");
    let wctx = Context::default();
    let mut buf = BytesMut::new();
    let msgs = encode(&b, &wctx, &mut buf).unwrap();
    assert!(
        msgs <= 2,
        "1500 /24s fit in two 4096-byte UPDATEs, got {msgs}"
    );
    let ups = decode_all(&buf, &wctx);
    assert_eq!(ups.iter().map(|u| u.nlri.len()).sum::<usize>(), 1500);

    // Withdraw 10 and change nothing else: the journal yields exactly 10 withdrawals.
    for i in 0..10u32 {
        let pre =
            Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap();
        r.update(1, pre, None);
    }
    let b3 = collect(&r, &mut out, &c, 10_000);
    assert_eq!(b3.withdrawn.len(), 10);
    assert!(b3.announced.is_empty());
    assert_eq!(out.count(), 1990);
    assert!(b3.synced && !b3.walk_done);
}

#[test]
fn routes_the_peer_never_had_are_not_withdrawn_from_it() {
    let mut r = rib();
    r.update(2, p("10.2.0.0/24"), Some(learned([10, 0, 0, 2], &[])));
    let mut out = AdjRibOut::new(&r);
    let c = ctx(2);
    let b = collect(&r, &mut out, &c, 100);
    assert!(b.is_empty(), "its own route is not sent back");
    r.update(2, p("10.2.0.0/24"), None);
    let b = collect(&r, &mut out, &c, 100);
    assert!(b.withdrawn.is_empty(), "and not withdrawn either");
}

#[test]
fn a_peer_behind_the_trimmed_journal_resyncs() {
    let mut r = rib();
    let mut out = AdjRibOut::new(&r);
    let c = ctx(2);
    collect(&r, &mut out, &c, 100);
    r.update(1, p("10.1.0.0/24"), Some(learned([10, 0, 0, 1], &[])));
    r.trim_journal(r.head());
    let b = collect(&r, &mut out, &c, 100);
    assert_eq!(b.prefix_count(), 1);
    assert!(b.walk_done);
}

#[test]
fn two_octet_peers_get_as_trans_and_as4_path() {
    let a = Arc::new(PathAttrs {
        as_path: AsPath::sequence([4_200_000_000, 65001]),
        next_hop: Some(NextHop::V4(Ipv4Addr::new(10, 0, 0, 1))),
        ..PathAttrs::default()
    });
    let batch = OutBatch {
        announced: vec![(a, vec![p("10.1.0.0/24")])],
        ..OutBatch::default()
    };
    let two = Context::default();
    let mut buf = BytesMut::new();
    encode(&batch, &two, &mut buf).unwrap();
    let mut u = decode_all(&buf, &two).pop().unwrap();
    assert!(matches!(
        u.attribute(margay_bgp_wire::attr_type::AS_PATH),
        Some(PathAttribute::AsPath(p)) if p == &AsPath::sequence([23456, 65001])
    ));
    u.reconstruct_as4();
    assert!(matches!(
        u.attribute(margay_bgp_wire::attr_type::AS_PATH),
        Some(PathAttribute::AsPath(p)) if p == &AsPath::sequence([4_200_000_000, 65001])
    ));
}

#[test]
fn ipv6_batches_use_mp_reach_and_mp_unreach() {
    let a = Arc::new(PathAttrs {
        next_hop: Some(NextHop::V6 {
            global: "2001:db8::1".parse().unwrap(),
            link_local: None,
        }),
        ..PathAttrs::default()
    });
    let batch = OutBatch {
        announced: vec![(a, vec![p("2001:db8:1::/48")])],
        withdrawn: vec![p("2001:db8:2::/48")],
        ..OutBatch::default()
    };
    let c = Context::default();
    let mut buf = BytesMut::new();
    encode(&batch, &c, &mut buf).unwrap();
    let ups = decode_all(&buf, &c);
    assert_eq!(ups.len(), 2);
    assert!(ups[0].mp_unreach().is_some());
    assert!(matches!(ups[1].mp_reach(), Some(MpReach::Unicast { nlri, .. }) if nlri.len() == 1));
}

#[test]
fn a_refresh_for_one_family_walks_that_family_and_keeps_the_journal() {
    let mut r = rib();
    let v6 = |last: u16| {
        Arc::new(PathAttrs {
            next_hop: Some(NextHop::V6 {
                global: Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last),
                link_local: None,
            }),
            local_pref: Some(100),
            ..PathAttrs::default()
        })
    };
    r.update(1, p("10.1.0.0/24"), Some(learned([10, 0, 0, 1], &[])));
    r.update(1, p("10.1.1.0/24"), Some(learned([10, 0, 0, 1], &[])));
    r.update(1, p("fd10::/64"), Some(v6(1)));
    r.update(1, p("fd11::/64"), Some(v6(1)));
    let c = ctx(2);
    let mut out = AdjRibOut::new(&r);
    let b = collect(&r, &mut out, &c, 100);
    assert_eq!(b.prefix_count(), 4);
    assert!(out.is_synced(&r));

    // An IPv6 change waits in the journal when the peer asks for IPv4 again.
    r.update(1, p("fd10::/64"), Some(v6(2)));
    out.refresh(&r, Family::Ipv4Unicast);
    let mut sent: Vec<Prefix> = Vec::new();
    while !out.is_synced(&r) {
        let b = collect(&r, &mut out, &c, 1);
        sent.extend(b.announced.iter().flat_map(|(_, ps)| ps.iter().copied()));
    }
    sent.sort();
    assert_eq!(
        sent,
        vec![p("10.1.0.0/24"), p("10.1.1.0/24"), p("fd10::/64")],
        "IPv4 again, the IPv6 change from the journal, not the unchanged IPv6 route"
    );

    // A request for the other family during the walk widens it to both.
    out.refresh(&r, Family::Ipv4Unicast);
    out.refresh(&r, Family::Ipv6Unicast);
    let b = collect(&r, &mut out, &c, 100);
    assert_eq!(b.prefix_count(), 4);
    assert!(b.walk_done);
}
