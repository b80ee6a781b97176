//! decode(encode(m)) == m over generated messages and contexts, and the packer's
//! promises: no message over the limit, every prefix carried exactly once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use margay_bgp_wire::{
    frame_len, AddPathFamily, AddPathMode, Aggregator, AsPath, AsSegment, Capability,
    CapabilityLayout, Community, Context, ExtendedCommunity, ExtendedNextHopFamily, Families,
    Family, GracefulRestart, GracefulRestartFamily, LargeCommunity, LlgrFamily, Message, MpReach,
    MpUnreach, NextHop, Nlri, Notification, Open, Origin, PathAttribute, Prefix, RawAttribute,
    RouteRefresh, SegmentKind, Update, UpdatePacker,
};
use proptest::collection::vec;
use proptest::prelude::*;

fn families() -> impl Strategy<Value = Families> {
    (any::<bool>(), any::<bool>()).prop_map(|(a, b)| Families {
        ipv4_unicast: a,
        ipv6_unicast: b,
    })
}

fn context() -> impl Strategy<Value = Context> {
    (
        any::<bool>(),
        any::<bool>(),
        families(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(four, ext, ap, enh, ebgp)| Context {
            four_octet_as: four,
            extended_message: ext,
            add_path_receive: ap,
            add_path_send: ap,
            extended_next_hop: Families {
                ipv4_unicast: enh,
                ipv6_unicast: false,
            },
            is_ebgp: ebgp,
        })
}

fn prefix(family: Family) -> BoxedStrategy<Prefix> {
    match family {
        Family::Ipv4Unicast => (any::<u32>(), 0u8..=32)
            .prop_map(|(a, l)| Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(a)), l).unwrap())
            .boxed(),
        Family::Ipv6Unicast => (any::<u128>(), 0u8..=128)
            .prop_map(|(a, l)| Prefix::new_masked(IpAddr::V6(Ipv6Addr::from(a)), l).unwrap())
            .boxed(),
    }
}

fn nlris(family: Family, add_path: bool, max: usize) -> BoxedStrategy<Vec<Nlri>> {
    vec((prefix(family), any::<u32>()), 0..max)
        .prop_map(move |v| {
            v.into_iter()
                .map(|(prefix, id)| Nlri {
                    path_id: add_path.then_some(id),
                    prefix,
                })
                .collect()
        })
        .boxed()
}

fn as_path(four: bool, confed: bool, as4: bool) -> BoxedStrategy<AsPath> {
    let max_as = if four || as4 { u32::MAX } else { 65535 };
    let kinds: Vec<SegmentKind> = if confed {
        vec![
            SegmentKind::Set,
            SegmentKind::Sequence,
            SegmentKind::ConfedSequence,
            SegmentKind::ConfedSet,
        ]
    } else {
        vec![SegmentKind::Set, SegmentKind::Sequence]
    };
    vec(
        (proptest::sample::select(kinds), vec(1..=max_as, 1..8)),
        0..4,
    )
    .prop_map(|segs| AsPath {
        segments: segs
            .into_iter()
            .map(|(kind, asns)| AsSegment { kind, asns })
            .collect(),
    })
    .boxed()
}

fn v4() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

fn next_hop(family: Family, ext: bool) -> BoxedStrategy<NextHop> {
    let v6 = (any::<u128>(), proptest::option::of(any::<u128>())).prop_map(|(g, l)| NextHop::V6 {
        global: Ipv6Addr::from(g),
        link_local: l.map(Ipv6Addr::from),
    });
    match (family, ext) {
        (Family::Ipv6Unicast, _) => v6.boxed(),
        (Family::Ipv4Unicast, false) => v4().prop_map(NextHop::V4).boxed(),
        (Family::Ipv4Unicast, true) => prop_oneof![v4().prop_map(NextHop::V4), v6].boxed(),
    }
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::Ipv4Unicast), Just(Family::Ipv6Unicast)]
}

fn mp_reach(ctx: &Context) -> BoxedStrategy<MpReach> {
    let ctx = ctx.clone();
    family()
        .prop_flat_map(move |f| {
            (
                Just(f),
                next_hop(f, ctx.extended_next_hop.contains(f)),
                nlris(f, ctx.add_path_send.contains(f), 12),
            )
        })
        .prop_map(|(family, next_hop, nlri)| MpReach::Unicast {
            family,
            next_hop,
            nlri,
        })
        .boxed()
}

fn mp_unreach(ctx: &Context) -> BoxedStrategy<MpUnreach> {
    let ctx = ctx.clone();
    family()
        .prop_flat_map(move |f| (Just(f), nlris(f, ctx.add_path_send.contains(f), 12)))
        .prop_map(|(family, withdrawn)| MpUnreach::Unicast { family, withdrawn })
        .boxed()
}

fn update(ctx: Context) -> BoxedStrategy<Update> {
    let four = ctx.four_octet_as;
    let ibgp = !ctx.is_ebgp;
    let ap4 = ctx.add_path_send.ipv4_unicast;
    let optional = (
        proptest::option::of(any::<u32>().prop_map(PathAttribute::MultiExitDisc)),
        proptest::option::of(any::<u32>().prop_map(PathAttribute::LocalPref)),
        proptest::option::of(Just(PathAttribute::AtomicAggregate)),
        proptest::option::of(
            (if four { 1..=u32::MAX } else { 1..=65535u32 }, v4())
                .prop_map(|(asn, address)| PathAttribute::Aggregator(Aggregator { asn, address })),
        ),
        proptest::option::of(
            vec(any::<u32>().prop_map(Community), 1..5).prop_map(PathAttribute::Communities),
        ),
        proptest::option::of(v4().prop_map(PathAttribute::OriginatorId)),
        proptest::option::of(vec(v4(), 1..4).prop_map(PathAttribute::ClusterList)),
        proptest::option::of(
            vec(any::<[u8; 8]>().prop_map(ExtendedCommunity), 1..4)
                .prop_map(PathAttribute::ExtendedCommunities),
        ),
        proptest::option::of(as_path(four, false, true).prop_map(PathAttribute::As4Path)),
        proptest::option::of(
            (1..=u32::MAX, v4()).prop_map(|(asn, address)| {
                PathAttribute::As4Aggregator(Aggregator { asn, address })
            }),
        ),
        proptest::option::of(
            vec(
                any::<(u32, u32, u32)>().prop_map(|(g, a, b)| LargeCommunity {
                    global_admin: g,
                    local_data1: a,
                    local_data2: b,
                }),
                1..4,
            )
            .prop_map(PathAttribute::LargeCommunities),
        ),
        proptest::option::of((100u8..=127, vec(any::<u8>(), 0..12)).prop_map(
            |(type_code, value)| {
                PathAttribute::Unknown(RawAttribute {
                    flags: 0xe0,
                    type_code,
                    value,
                })
            },
        )),
    );
    (
        nlris(Family::Ipv4Unicast, ap4, 10),
        proptest::option::of(prop_oneof![
            Just(Origin::Igp),
            Just(Origin::Egp),
            Just(Origin::Incomplete)
        ]),
        proptest::option::of(as_path(four, ibgp, false)),
        proptest::option::of(v4()),
        optional,
        proptest::option::of(mp_reach(&ctx)),
        proptest::option::of(mp_unreach(&ctx)),
        nlris(Family::Ipv4Unicast, ap4, 10),
    )
        .prop_map(
            move |(withdrawn, origin, path, nh, opt, reach, unreach, nlri)| {
                let (med, lp, atomic, agg, comm, orig, cluster, ext, as4p, as4a, large, unknown) =
                    opt;
                let mp_nlri =
                    matches!(&reach, Some(MpReach::Unicast { nlri, .. }) if !nlri.is_empty());
                let need = !nlri.is_empty() || mp_nlri;
                let mut attrs = Vec::new();
                if let Some(o) = origin.or(need.then_some(Origin::Igp)) {
                    attrs.push(PathAttribute::Origin(o));
                }
                if let Some(p) = path.or(need.then(AsPath::default)) {
                    attrs.push(PathAttribute::AsPath(p));
                }
                if let Some(n) = nh.or((!nlri.is_empty()).then_some(Ipv4Addr::new(192, 0, 2, 1))) {
                    attrs.push(PathAttribute::NextHop(n));
                }
                attrs.extend(med);
                if ibgp {
                    attrs.extend(lp);
                }
                attrs.extend(atomic);
                attrs.extend(agg);
                attrs.extend(comm);
                if ibgp {
                    attrs.extend(orig);
                    attrs.extend(cluster);
                }
                attrs.extend(reach.map(PathAttribute::MpReachNlri));
                attrs.extend(unreach.map(PathAttribute::MpUnreachNlri));
                attrs.extend(ext);
                if !four {
                    attrs.extend(as4p);
                    attrs.extend(as4a);
                }
                attrs.extend(large);
                attrs.extend(unknown);
                Update {
                    withdrawn,
                    attributes: attrs,
                    nlri,
                    ..Update::default()
                }
            },
        )
        .boxed()
}

fn capability() -> impl Strategy<Value = Capability> {
    let fam = (any::<u16>(), any::<u8>());
    prop_oneof![
        fam.prop_map(|(afi, safi)| Capability::Multiprotocol { afi, safi }),
        Just(Capability::RouteRefresh),
        Just(Capability::EnhancedRouteRefresh),
        Just(Capability::ExtendedMessage),
        (1..=u32::MAX).prop_map(Capability::FourOctetAs),
        (
            0u8..16,
            0u16..4096,
            vec((any::<u16>(), any::<u8>(), any::<u8>()), 0..4)
        )
            .prop_map(|(f, t, fams)| {
                Capability::GracefulRestart(GracefulRestart {
                    restart_flags: f,
                    restart_time: t,
                    families: fams
                        .into_iter()
                        .map(|(afi, safi, flags)| GracefulRestartFamily { afi, safi, flags })
                        .collect(),
                })
            }),
        vec(
            (any::<u16>(), any::<u8>(), any::<u8>(), 0u32..(1 << 24)),
            0..4
        )
        .prop_map(|v| {
            Capability::LongLivedGracefulRestart(
                v.into_iter()
                    .map(|(afi, safi, flags, stale_time)| LlgrFamily {
                        afi,
                        safi,
                        flags,
                        stale_time,
                    })
                    .collect(),
            )
        }),
        vec((any::<u16>(), any::<u8>(), 1u8..=3), 0..4).prop_map(|v| {
            Capability::AddPath(
                v.into_iter()
                    .map(|(afi, safi, m)| AddPathFamily {
                        afi,
                        safi,
                        mode: [AddPathMode::Receive, AddPathMode::Send, AddPathMode::Both]
                            [usize::from(m - 1)],
                    })
                    .collect(),
            )
        }),
        vec(any::<(u16, u16, u16)>(), 0..4).prop_map(|v| {
            Capability::ExtendedNextHop(
                v.into_iter()
                    .map(|(a, s, n)| ExtendedNextHopFamily {
                        nlri_afi: a,
                        nlri_safi: s,
                        nexthop_afi: n,
                    })
                    .collect(),
            )
        }),
        ("[a-z0-9-]{0,20}", "[a-z.]{0,20}")
            .prop_map(|(hostname, domain)| Capability::Fqdn { hostname, domain }),
        (100u8..=127, vec(any::<u8>(), 0..10))
            .prop_map(|(code, value)| Capability::Unknown { code, value }),
    ]
}

fn open() -> impl Strategy<Value = Open> {
    (
        1..=u16::MAX,
        prop_oneof![Just(0u16), 3..=u16::MAX],
        1..=u32::MAX,
        vec(capability(), 0..6),
        any::<bool>(),
    )
        .prop_map(|(my_as, hold_time, id, capabilities, per)| Open {
            my_as,
            hold_time,
            bgp_id: Ipv4Addr::from(id),
            layout: if per && capabilities.len() > 1 {
                CapabilityLayout::ParameterPerCapability
            } else {
                CapabilityLayout::OneParameter
            },
            capabilities,
        })
}

fn message(ctx: Context) -> impl Strategy<Value = Message> {
    prop_oneof![
        open().prop_map(Message::Open),
        update(ctx).prop_map(Message::Update),
        (any::<u8>(), any::<u8>(), vec(any::<u8>(), 0..64)).prop_map(|(code, subcode, data)| {
            Message::Notification(Notification {
                code,
                subcode,
                data,
            })
        }),
        Just(Message::Keepalive),
        any::<(u16, u8, u8)>().prop_map(|(afi, subtype, safi)| Message::RouteRefresh(
            RouteRefresh { afi, subtype, safi }
        )),
    ]
}

fn ctx_and_message() -> impl Strategy<Value = (Context, Message)> {
    context().prop_flat_map(|ctx| (Just(ctx.clone()), message(ctx)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_inverts_encode((ctx, msg) in ctx_and_message()) {
        let mut buf = BytesMut::new();
        // OPENs whose capabilities overflow 255 octets are refused; nothing else is.
        match msg.encode(&ctx, &mut buf) {
            Ok(()) => {}
            Err(e) => {
                prop_assert!(matches!(msg, Message::Open(_)), "{e}");
                return Ok(());
            }
        }
        prop_assert_eq!(frame_len(&buf, &ctx).unwrap(), Some(buf.len()));
        let back = Message::decode(&buf, &ctx).map_err(|e| TestCaseError::fail(format!("{e}: {msg:?}")))?;
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn packer_respects_the_limit_and_carries_every_prefix(
        ctx in context(),
        fam in family(),
        n in 0usize..3000,
        seed in any::<u32>(),
        max in 200usize..4096,
    ) {
        let ap = ctx.add_path_send.contains(fam);
        let prefixes: Vec<Nlri> = (0..n as u32)
            .map(|i| {
                let x = i.wrapping_mul(2654435761).wrapping_add(seed);
                let prefix = match fam {
                    Family::Ipv4Unicast => Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(x)), (x % 33) as u8),
                    Family::Ipv6Unicast => Prefix::new_masked(IpAddr::V6(Ipv6Addr::from(u128::from(x) << 96)), (x % 129) as u8),
                }.unwrap();
                Nlri { path_id: ap.then_some(i), prefix }
            })
            .collect();
        let mut attrs = vec![
            PathAttribute::Origin(Origin::Igp),
            PathAttribute::AsPath(AsPath::sequence([65001, 65002])),
        ];
        match fam {
            Family::Ipv4Unicast => attrs.push(PathAttribute::NextHop(Ipv4Addr::new(10, 0, 0, 1))),
            Family::Ipv6Unicast => attrs.push(PathAttribute::MpReachNlri(MpReach::Unicast {
                family: fam,
                next_hop: NextHop::V6 { global: Ipv6Addr::LOCALHOST, link_local: None },
                nlri: Vec::new(),
            })),
        }
        attrs.push(PathAttribute::Communities(vec![Community::new(65001, 1)]));
        let packer = UpdatePacker::with_max_len(&ctx, max);
        let mut out = BytesMut::new();
        let count = packer.announce(&attrs, prefixes.iter().copied(), &mut out).unwrap();
        let mut seen = Vec::new();
        let mut rest = &out[..];
        let mut msgs = 0;
        while !rest.is_empty() {
            let len = frame_len(rest, &ctx).unwrap().unwrap();
            prop_assert!(len <= max, "message of {len} over {max}");
            let Message::Update(u) = Message::decode(&rest[..len], &ctx).unwrap() else { panic!("not an UPDATE") };
            seen.extend(u.announced().copied());
            rest = &rest[len..];
            msgs += 1;
        }
        prop_assert_eq!(msgs, count);
        prop_assert_eq!(seen, prefixes);
        // Withdrawals pack the same way.
        let mut out = BytesMut::new();
        packer.withdraw(fam, (0..n).map(|_| Nlri { path_id: ap.then_some(1), prefix: Prefix::new_masked(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).unwrap() }).filter(|_| fam == Family::Ipv4Unicast), &mut out).unwrap();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let len = frame_len(rest, &ctx).unwrap().unwrap();
            prop_assert!(len <= max);
            rest = &rest[len..];
        }
    }
}
