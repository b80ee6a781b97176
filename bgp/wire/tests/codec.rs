//! Behaviour beyond round trips: framing, End-of-RIB, splitting, RFC 6793 merge,
//! shutdown communications, capability negotiation.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use common::frame;
use margay_bgp_wire::as4::merge_as_path;
use margay_bgp_wire::{
    frame_len, Aggregator, AsPath, AsSegment, Capability, Context, EncodeError, Family, Message,
    MpReach, NextHop, Nlri, Notification, Open, Origin, PathAttribute, Prefix, SegmentKind, Update,
    UpdatePacker, UpdateView, AS_TRANS,
};

fn p(s: &str) -> Nlri {
    Nlri::new(s.parse().unwrap())
}

fn ctx4() -> Context {
    Context {
        four_octet_as: true,
        ..Context::default()
    }
}

#[test]
fn frame_len_cuts_a_stream_without_copying() {
    let ctx = ctx4();
    let mut stream = Vec::new();
    stream.extend(frame(4, &[]));
    stream.extend(frame(3, &[6, 2, 0]));
    assert_eq!(frame_len(&stream[..10], &ctx).unwrap(), None);
    assert_eq!(frame_len(&stream, &ctx).unwrap(), Some(19));
    assert_eq!(frame_len(&stream[19..], &ctx).unwrap(), Some(22));
    let mut bad = stream.clone();
    bad[2] = 0;
    assert_eq!(
        frame_len(&bad[..5], &ctx)
            .unwrap_err()
            .notification()
            .subcode,
        1
    );
    let mut long = frame(2, &[0, 0, 0, 0]);
    long[16..18].copy_from_slice(&5000u16.to_be_bytes());
    assert_eq!(
        frame_len(&long, &ctx).unwrap_err().notification().data,
        vec![0x13, 0x88]
    );
    let ext = Context {
        extended_message: true,
        ..ctx
    };
    assert_eq!(frame_len(&long, &ext).unwrap(), Some(5000));
}

#[test]
fn end_of_rib_markers() {
    let ctx = ctx4();
    let mut out = BytesMut::new();
    let packer = UpdatePacker::new(&ctx);
    packer.end_of_rib(Family::Ipv4Unicast, &mut out).unwrap();
    assert_eq!(&out[..], &frame(2, &[0, 0, 0, 0])[..]);
    out.clear();
    packer.end_of_rib(Family::Ipv6Unicast, &mut out).unwrap();
    assert_eq!(&out[..], &frame(2, &[0, 0, 0, 6, 0x80, 15, 3, 0, 2, 1])[..]);
    let Message::Update(u) = Message::decode(&out, &ctx).unwrap() else {
        panic!()
    };
    assert_eq!(u.end_of_rib_family(), Some(Family::Ipv6Unicast));
}

#[test]
fn oversized_update_is_refused_then_split() {
    let ctx = ctx4();
    let nlri: Vec<Nlri> = (0..3000u32)
        .map(|i| {
            Nlri::new(Prefix::new(IpAddr::V4(Ipv4Addr::from((10 << 24) | (i << 8))), 24).unwrap())
        })
        .collect();
    let v6: Vec<Nlri> = (0..500u32)
        .map(|i| {
            Nlri::new(
                Prefix::new(
                    IpAddr::V6(Ipv6Addr::from(u128::from(0x2001_0db8_u32 + i) << 96)),
                    32,
                )
                .unwrap(),
            )
        })
        .collect();
    let u = Update {
        withdrawn: vec![p("192.0.2.0/24")],
        attributes: vec![
            PathAttribute::Origin(Origin::Igp),
            PathAttribute::AsPath(AsPath::sequence([65001])),
            PathAttribute::NextHop(Ipv4Addr::new(10, 0, 0, 1)),
            PathAttribute::MpReachNlri(MpReach::Unicast {
                family: Family::Ipv6Unicast,
                next_hop: NextHop::V6 {
                    global: Ipv6Addr::LOCALHOST,
                    link_local: None,
                },
                nlri: v6.clone(),
            }),
        ],
        nlri: nlri.clone(),
        ..Update::default()
    };
    let mut out = BytesMut::new();
    let err = Message::Update(u.clone())
        .encode(&ctx, &mut out)
        .unwrap_err();
    assert!(
        matches!(err, EncodeError::TooLong { max: 4096, .. }),
        "{err}"
    );
    assert!(out.is_empty(), "nothing is written when refused");
    let n = u.encode_split(&ctx, &mut out).unwrap();
    assert!(n >= 4, "{n} messages");
    let (mut ann, mut wd) = (Vec::new(), Vec::new());
    let mut rest = &out[..];
    while !rest.is_empty() {
        let len = frame_len(rest, &ctx).unwrap().unwrap();
        assert!(len <= 4096);
        let Message::Update(m) = Message::decode(&rest[..len], &ctx).unwrap() else {
            panic!()
        };
        ann.extend(m.announced().copied());
        wd.extend(m.withdrawn_all().copied());
        rest = &rest[len..];
    }
    let mut want = nlri;
    want.extend(v6);
    assert_eq!(ann, want);
    assert_eq!(wd, vec![p("192.0.2.0/24")]);
}

#[test]
fn packer_fills_messages_to_the_limit() {
    let ctx = ctx4();
    let attrs = [
        PathAttribute::Origin(Origin::Igp),
        PathAttribute::AsPath(AsPath::sequence([65001])),
        PathAttribute::NextHop(Ipv4Addr::new(10, 0, 0, 1)),
    ];
    let prefixes = (0..10_000u32)
        .map(|i| Nlri::new(Prefix::new(IpAddr::V4(Ipv4Addr::from(i << 8)), 24).unwrap()));
    let mut out = BytesMut::new();
    let n = UpdatePacker::new(&ctx)
        .announce(&attrs, prefixes, &mut out)
        .unwrap();
    // 19 + 4 + 20 octets of attributes leave 4053 for 1013 four-octet /24s.
    assert_eq!(n, 10_000usize.div_ceil(1013));
    assert_eq!(frame_len(&out, &ctx).unwrap(), Some(4095));
}

#[test]
fn update_view_iterates_without_copying() {
    let ctx = ctx4();
    let attrs = [
        PathAttribute::Origin(Origin::Igp),
        PathAttribute::AsPath(AsPath::sequence([65001])),
        PathAttribute::NextHop(Ipv4Addr::new(10, 0, 0, 1)),
    ];
    let mut out = BytesMut::new();
    UpdatePacker::new(&ctx)
        .announce(
            &attrs,
            [p("10.0.0.0/8"), p("10.1.0.0/16"), p("0.0.0.0/0")],
            &mut out,
        )
        .unwrap();
    let view = UpdateView::parse(&out, &ctx).unwrap();
    let got: Vec<String> = view.nlri().map(|n| n.prefix.to_string()).collect();
    assert_eq!(got, ["10.0.0.0/8", "10.1.0.0/16", "0.0.0.0/0"]);
    assert_eq!(view.attributes().count(), 3);
    assert_eq!(view.withdrawn().count(), 0);
}

#[test]
fn host_bits_on_the_wire_are_cleared_but_refused_in_constructors() {
    let ctx = ctx4();
    let mut body = vec![
        0, 0, 0, 20, 0x40, 1, 1, 0, 0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9, 0x40, 3, 4, 10, 0, 0, 1,
    ];
    body.extend([23, 10, 1, 3]); // 10.1.3.0/23: the trailing bit is irrelevant (RFC 4271 §4.3)
    let Message::Update(u) = Message::decode(&frame(2, &body), &ctx).unwrap() else {
        panic!()
    };
    assert_eq!(u.nlri, vec![p("10.1.2.0/23")]);
    assert!("10.1.3.0/23".parse::<Prefix>().is_err());
}

#[test]
fn as4_path_merge_follows_rfc6793() {
    let seq = |a: &[u32]| AsSegment {
        kind: SegmentKind::Sequence,
        asns: a.to_vec(),
    };
    let t = u32::from(AS_TRANS);
    // AS_PATH: 65001 AS_TRANS AS_TRANS 65004; AS4_PATH covers the last three.
    let as_path = AsPath {
        segments: vec![seq(&[65001, t, t, 65004])],
    };
    let as4 = AsPath {
        segments: vec![seq(&[4_200_000_002, 4_200_000_003, 65004])],
    };
    assert_eq!(
        merge_as_path(&as_path, &as4),
        AsPath {
            segments: vec![seq(&[65001, 4_200_000_002, 4_200_000_003, 65004])]
        }
    );
    // An AS4_PATH longer than AS_PATH is ignored.
    let long = AsPath {
        segments: vec![seq(&[1, 2, 3, 4, 5])],
    };
    assert_eq!(merge_as_path(&as_path, &long), as_path);
    // A leading AS_SET counts as one; confederation segments as none.
    let mixed = AsPath {
        segments: vec![
            AsSegment {
                kind: SegmentKind::ConfedSequence,
                asns: vec![64512],
            },
            AsSegment {
                kind: SegmentKind::Set,
                asns: vec![1, 2],
            },
            seq(&[t, 7]),
        ],
    };
    let as4 = AsPath {
        segments: vec![seq(&[4_200_000_000, 7])],
    };
    assert_eq!(
        merge_as_path(&mixed, &as4).to_string(),
        "(64512) {1 2} 4200000000 7"
    );
}

#[test]
fn two_octet_peer_round_trip_restores_4_octet_ases() {
    let four = 4_200_000_001;
    let mut u = Update {
        attributes: vec![
            PathAttribute::Origin(Origin::Igp),
            PathAttribute::AsPath(AsPath::sequence([65001, four])),
            PathAttribute::NextHop(Ipv4Addr::new(10, 0, 0, 1)),
            PathAttribute::Aggregator(Aggregator {
                asn: four,
                address: Ipv4Addr::new(10, 0, 0, 9),
            }),
        ],
        nlri: vec![p("10.9.0.0/16")],
        ..Update::default()
    };
    let sent = u.clone();
    u.prepare_for_two_octet_peer();
    let old = Context::default();
    let bytes = Message::Update(u).to_bytes(&old).unwrap();
    let Message::Update(mut got) = Message::decode(&bytes, &old).unwrap() else {
        panic!()
    };
    assert_eq!(
        got.attribute(2),
        Some(&PathAttribute::AsPath(AsPath::sequence([65001, 23456])))
    );
    got.reconstruct_as4();
    assert_eq!(got.attributes, sent.attributes);
}

#[test]
fn shutdown_communication_is_bounded_and_utf8_safe() {
    let long = "é".repeat(200); // 400 octets
    let n = Notification::shutdown(2, &long);
    assert_eq!(n.data[0], 254);
    assert_eq!(n.shutdown_communication().unwrap().chars().count(), 127);
    let bad = Notification {
        code: 6,
        subcode: 2,
        data: vec![5, b'a'],
    };
    assert_eq!(bad.shutdown_communication(), None, "length past the data");
    let other = Notification::error(3, 1, vec![0; 10_000]);
    assert_eq!(
        other.data.len(),
        4096 - 21,
        "NOTIFICATION data fits a 4096-octet message"
    );
}

#[test]
fn negotiation_needs_both_sides() {
    let id = Ipv4Addr::new(1, 1, 1, 1);
    let a = Open::new(
        4_200_000_000,
        90,
        id,
        vec![
            Capability::ExtendedMessage,
            Capability::AddPath(vec![margay_bgp_wire::AddPathFamily {
                afi: 1,
                safi: 1,
                mode: margay_bgp_wire::AddPathMode::Receive,
            }]),
        ],
    );
    assert_eq!(a.my_as, AS_TRANS);
    assert_eq!(a.asn(), 4_200_000_000);
    let b = Open::new(
        65001,
        90,
        id,
        vec![Capability::AddPath(vec![margay_bgp_wire::AddPathFamily {
            afi: 1,
            safi: 1,
            mode: margay_bgp_wire::AddPathMode::Send,
        }])],
    );
    let ctx = Context::negotiate(&a, &b, true);
    assert!(ctx.four_octet_as);
    assert!(
        !ctx.extended_message,
        "only one side offered extended messages"
    );
    assert!(ctx.add_path_receive.ipv4_unicast);
    assert!(!ctx.add_path_send.ipv4_unicast);
}
