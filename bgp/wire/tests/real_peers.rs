//! Messages captured from a BIRD 2 <-> GoBGP session (tests/capture/capture.sh):
//! every one decodes, and re-encodes to the same bytes.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use common::load_hex;
use margay_bgp_wire::{
    AddPathMode, Capability, Community, Context, Family, LargeCommunity, Message, MpReach, NextHop,
    Open, PathAttribute, Prefix, Update,
};

/// Labelled messages of one direction.
type Vectors = Vec<(String, Vec<u8>)>;

/// The two files, and the OPENs that start them.
fn session() -> (Vectors, Vectors, Open, Open) {
    let bird = load_hex("bird2-to-gobgp.hex");
    let gobgp = load_hex("gobgp-to-bird2.hex");
    let open = |msgs: &[(String, Vec<u8>)]| match Message::decode(&msgs[0].1, &Context::default())
        .unwrap()
    {
        Message::Open(o) => o,
        m => panic!("first message is {m:?}"),
    };
    let (bo, go) = (open(&bird), open(&gobgp));
    (bird, gobgp, bo, go)
}

/// Decodes every message of `msgs` as received by `receiver` from `sender`, checks
/// it re-encodes byte for byte, and returns them.
fn decode_all(msgs: &[(String, Vec<u8>)], receiver: &Open, sender: &Open) -> Vec<Message> {
    let ctx = Context::negotiate(receiver, sender, true);
    // The sender encodes with its own send side, which is our receive side.
    let mut enc = ctx.clone();
    enc.add_path_send = ctx.add_path_receive;
    msgs.iter()
        .map(|(label, bytes)| {
            assert_eq!(
                margay_bgp_wire::frame_len(bytes, &ctx).unwrap(),
                Some(bytes.len()),
                "{label}"
            );
            let m = Message::decode(bytes, &ctx).unwrap_or_else(|e| panic!("{label}: {e}"));
            let mut out = BytesMut::new();
            m.encode(&enc, &mut out).unwrap();
            assert_eq!(
                &out[..],
                &bytes[..],
                "{label} does not re-encode byte for byte: {m:?}"
            );
            m
        })
        .collect()
}

#[test]
fn bird2_open_capabilities_decode() {
    let (_, _, bird, _) = session();
    assert_eq!(bird.asn(), 65001);
    assert_eq!(bird.hold_time, 90);
    assert_eq!(bird.bgp_id, Ipv4Addr::new(10, 99, 0, 1));
    let caps = &bird.capabilities;
    for want in [
        Capability::Multiprotocol { afi: 1, safi: 1 },
        Capability::Multiprotocol { afi: 2, safi: 1 },
        Capability::RouteRefresh,
        Capability::EnhancedRouteRefresh,
        Capability::ExtendedMessage,
        Capability::FourOctetAs(65001),
    ] {
        assert!(caps.contains(&want), "BIRD OPEN lacks {want:?}: {caps:?}");
    }
    assert!(caps
        .iter()
        .any(|c| matches!(c, Capability::GracefulRestart(_))));
    assert!(caps
        .iter()
        .any(|c| matches!(c, Capability::LongLivedGracefulRestart(_))));
    assert!(caps.iter().any(|c| matches!(c, Capability::Fqdn { .. })));
    assert!(caps.iter().any(|c| matches!(
        c,
        Capability::AddPath(f) if f.iter().any(|f| f.afi == 1 && f.mode == AddPathMode::Both)
    )));
}

#[test]
fn gobgp_open_capabilities_decode() {
    let (_, _, _, gobgp) = session();
    assert_eq!(gobgp.asn(), 65002);
    assert_eq!(gobgp.bgp_id, Ipv4Addr::new(10, 99, 0, 2));
    let caps = &gobgp.capabilities;
    assert!(caps.contains(&Capability::FourOctetAs(65002)));
    assert!(caps.contains(&Capability::Multiprotocol { afi: 2, safi: 1 }));
    let gr = caps
        .iter()
        .find_map(|c| match c {
            Capability::GracefulRestart(g) => Some(g),
            _ => None,
        })
        .expect("GoBGP advertises graceful restart");
    assert_eq!(gr.restart_time, 120);
    assert_eq!(gr.families.len(), 2);
}

#[test]
fn negotiated_context_matches_both_configs() {
    let (_, _, bird, gobgp) = session();
    let at_gobgp = Context::negotiate(&gobgp, &bird, true);
    assert!(at_gobgp.four_octet_as);
    assert!(
        at_gobgp.add_path_receive.ipv4_unicast,
        "BIRD sends path ids for IPv4"
    );
    assert!(at_gobgp.add_path_send.ipv4_unicast, "GoBGP send-max 4");
    assert!(!at_gobgp.add_path_receive.ipv6_unicast);
    // GoBGP does not advertise extended messages here.
    assert!(!at_gobgp.extended_message);
}

#[test]
fn bird2_messages_decode_and_reencode() {
    let (msgs, _, bird, gobgp) = session();
    let decoded = decode_all(&msgs, &gobgp, &bird);
    let updates: Vec<&Update> = decoded
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(u),
            _ => None,
        })
        .collect();
    // IPv4 with path ids, communities, large and extended communities, MED.
    let v4 = updates
        .iter()
        .find(|u| !u.nlri.is_empty())
        .expect("an IPv4 UPDATE");
    assert!(v4.nlri.iter().all(|n| n.path_id.is_some()));
    assert!(v4
        .nlri
        .iter()
        .any(|n| n.prefix == "10.10.2.0/23".parse::<Prefix>().unwrap()));
    assert!(
        matches!(v4.attribute(8), Some(PathAttribute::Communities(c)) if c.contains(&Community::new(65001, 100)))
    );
    assert!(matches!(
        v4.attribute(32),
        Some(PathAttribute::LargeCommunities(c)) if c.contains(&LargeCommunity { global_admin: 65001, local_data1: 1, local_data2: 2 })
    ));
    assert!(
        matches!(v4.attribute(16), Some(PathAttribute::ExtendedCommunities(c)) if !c.is_empty())
    );
    assert_eq!(v4.attribute(4), Some(&PathAttribute::MultiExitDisc(50)));
    // IPv6 in MP_REACH_NLRI with BIRD's configured next hop.
    let v6 = updates
        .iter()
        .find_map(|u| match u.mp_reach() {
            Some(MpReach::Unicast {
                family: Family::Ipv6Unicast,
                next_hop,
                nlri,
            }) => Some((next_hop, nlri)),
            _ => None,
        })
        .expect("an IPv6 UPDATE");
    assert!(
        matches!(v6.0, NextHop::V6 { global, .. } if *global == "fd99::1".parse::<Ipv6Addr>().unwrap())
    );
    assert!(v6
        .1
        .iter()
        .any(|n| n.prefix.addr() == IpAddr::V6("2001:db8:12::".parse().unwrap())));
    // End-of-RIB for both families.
    let eor: Vec<Family> = updates
        .iter()
        .filter_map(|u| u.end_of_rib_family())
        .collect();
    assert!(
        eor.contains(&Family::Ipv4Unicast) && eor.contains(&Family::Ipv6Unicast),
        "{eor:?}"
    );
    // The RFC 8203 shutdown communication.
    let n = decoded
        .iter()
        .find_map(|m| match m {
            Message::Notification(n) => Some(n),
            _ => None,
        })
        .expect("BIRD's NOTIFICATION");
    assert_eq!((n.code, n.subcode), (6, 2));
    assert_eq!(
        n.shutdown_communication(),
        Some("margay capture: BIRD maintenance")
    );
}

#[test]
fn gobgp_messages_decode_and_reencode() {
    let (_, msgs, bird, gobgp) = session();
    let decoded = decode_all(&msgs, &bird, &gobgp);
    let updates: Vec<&Update> = decoded
        .iter()
        .filter_map(|m| match m {
            Message::Update(u) => Some(u),
            _ => None,
        })
        .collect();
    let v4 = updates
        .iter()
        .find(|u| {
            u.nlri
                .iter()
                .any(|n| n.prefix == "10.20.1.0/24".parse::<Prefix>().unwrap())
        })
        .expect("GoBGP's 10.20.1.0/24");
    assert!(
        matches!(v4.attribute(8), Some(PathAttribute::Communities(c)) if c.contains(&Community::new(65002, 200)))
    );
    let v6 = updates
        .iter()
        .find(|u| {
            matches!(
                u.mp_reach(),
                Some(MpReach::Unicast {
                    family: Family::Ipv6Unicast,
                    ..
                })
            )
        })
        .expect("GoBGP's IPv6 UPDATE");
    assert!(matches!(
        v6.attribute(32),
        Some(PathAttribute::LargeCommunities(_))
    ));
    // The withdrawals, in the body for IPv4 and MP_UNREACH_NLRI for IPv6.
    assert!(updates.iter().any(|u| u
        .withdrawn
        .iter()
        .any(|n| n.prefix == "10.20.2.0/24".parse::<Prefix>().unwrap())));
    assert!(updates.iter().any(|u| u
        .withdrawn_all()
        .any(|n| n.prefix == "2001:db8:21::/56".parse::<Prefix>().unwrap())));
    let n = decoded
        .iter()
        .find_map(|m| match m {
            Message::Notification(n) => Some(n),
            _ => None,
        })
        .expect("GoBGP's NOTIFICATION");
    assert_eq!(
        n.shutdown_communication(),
        Some("margay capture: GoBGP going down")
    );
}
