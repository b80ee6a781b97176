//! Malformed inputs and the exact RFC 4271 §6 / RFC 7606 outcome of each.

mod common;

use common::frame;
use margay_bgp_wire::{Action, Context, Families, Message, Nlri, Prefix};

/// What the case must produce.
#[derive(Debug)]
enum Want {
    /// Session reset with this NOTIFICATION code, subcode and data.
    Reset(u8, u8, Vec<u8>),
    /// Treat-as-withdraw naming this UPDATE subcode, withdrawing exactly these.
    Withdraw(u8, Vec<&'static str>),
    /// AFI/SAFI disable of this family, with this UPDATE subcode.
    Disable(u16, u8, u8),
    /// Decoded; this attribute type dropped under attribute discard.
    Discard(u8),
    /// Decoded; this attribute type ignored without an error (unrecognised optional
    /// non-transitive).
    Ignored(u8),
}

struct Case {
    name: &'static str,
    ctx: Context,
    msg: Vec<u8>,
    want: Want,
    /// Expected error offset, where the case pins one.
    offset: Option<usize>,
}

fn ibgp() -> Context {
    Context {
        four_octet_as: true,
        ..Context::default()
    }
}

fn ebgp() -> Context {
    Context {
        four_octet_as: true,
        is_ebgp: true,
        ..Context::default()
    }
}

fn two_octet() -> Context {
    Context::default()
}

const ORIGIN: &[u8] = &[0x40, 1, 1, 0];
const AS_PATH: &[u8] = &[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9];
const AS_PATH2: &[u8] = &[0x40, 2, 4, 2, 1, 0xfd, 0xe9];
const NEXT_HOP: &[u8] = &[0x40, 3, 4, 10, 0, 0, 1];
const NLRI: &[u8] = &[24, 10, 1, 2];

fn update(withdrawn: &[u8], attrs: &[&[u8]], nlri: &[u8]) -> Vec<u8> {
    let a: Vec<u8> = attrs.concat();
    let mut b = Vec::new();
    b.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
    b.extend_from_slice(withdrawn);
    b.extend_from_slice(&(a.len() as u16).to_be_bytes());
    b.extend_from_slice(&a);
    b.extend_from_slice(nlri);
    frame(2, &b)
}

/// An UPDATE with the three mandatory attributes plus `extra`, announcing 10.1.2.0/24.
fn with(extra: &[&[u8]]) -> Vec<u8> {
    let mut attrs: Vec<&[u8]> = vec![ORIGIN, AS_PATH, NEXT_HOP];
    attrs.extend_from_slice(extra);
    update(&[], &attrs, NLRI)
}

fn open(version: u8, my_as: u16, hold: u16, id: [u8; 4], params: &[u8]) -> Vec<u8> {
    let mut b = vec![version];
    b.extend_from_slice(&my_as.to_be_bytes());
    b.extend_from_slice(&hold.to_be_bytes());
    b.extend_from_slice(&id);
    b.push(params.len() as u8);
    b.extend_from_slice(params);
    frame(1, &b)
}

fn mp_reach_v6(nh_len: u8, nh: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 2, 1, nh_len];
    v.extend_from_slice(nh);
    v.push(0);
    v.extend_from_slice(nlri);
    let mut a = vec![0x80, 14, v.len() as u8];
    a.extend_from_slice(&v);
    a
}

const V6_NH: &[u8] = &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const V6_NLRI: &[u8] = &[48, 0x20, 1, 0xd, 0xb8, 0, 9];

fn c(name: &'static str, ctx: Context, msg: Vec<u8>, want: Want) -> Case {
    Case {
        name,
        ctx,
        msg,
        want,
        offset: None,
    }
}

fn at(mut case: Case, offset: usize) -> Case {
    case.offset = Some(offset);
    case
}

fn cases() -> Vec<Case> {
    use Want::*;
    let mut bad_marker = with(&[]);
    bad_marker[3] = 0xfe;
    let mut long_field = frame(4, &[]);
    long_field[17] = 20;
    let mut rr_long = frame(5, &[0, 1, 0, 1, 0]);
    rr_long.truncate(24);
    let big_ext_msg = {
        let n = 1300; // 1300 /24s: 5200 octets of NLRI
        let nlri: Vec<u8> = (0..n)
            .flat_map(|i: u32| [24, 10, (i >> 8) as u8, i as u8])
            .collect();
        update(&[], &[ORIGIN, AS_PATH, NEXT_HOP], &nlri)
    };
    let mut add_path = ibgp();
    add_path.add_path_receive = Families::ALL;
    vec![
        // ===== Message header (RFC 4271 §6.1) =====
        at(
            c("wrong marker", ibgp(), bad_marker, Reset(1, 1, vec![])),
            0,
        ),
        c(
            "header cut short",
            ibgp(),
            vec![0xff; 10],
            Reset(1, 2, vec![0, 10]),
        ),
        at(
            c(
                "length field below 19",
                ibgp(),
                {
                    let mut m = frame(4, &[]);
                    m[17] = 18;
                    m
                },
                Reset(1, 2, vec![0, 18]),
            ),
            16,
        ),
        c(
            "length field disagrees with buffer",
            ibgp(),
            long_field,
            Reset(1, 2, vec![0, 20]),
        ),
        c(
            "UPDATE over 4096 without extended messages",
            ibgp(),
            big_ext_msg.clone(),
            Reset(1, 2, (big_ext_msg.len() as u16).to_be_bytes().to_vec()),
        ),
        at(
            c(
                "unknown message type 6",
                ibgp(),
                frame(6, &[]),
                Reset(1, 3, vec![6]),
            ),
            18,
        ),
        c(
            "KEEPALIVE with a body",
            ibgp(),
            frame(4, &[0]),
            Reset(1, 2, vec![0, 20]),
        ),
        c(
            "OPEN shorter than 29",
            ibgp(),
            frame(1, &[4, 0, 1, 0, 90, 1, 1, 1]),
            Reset(1, 2, vec![0, 27]),
        ),
        c(
            "NOTIFICATION without subcode",
            ibgp(),
            frame(3, &[6]),
            Reset(1, 2, vec![0, 20]),
        ),
        c(
            "UPDATE shorter than 23",
            ibgp(),
            frame(2, &[0, 0, 0]),
            Reset(1, 2, vec![0, 22]),
        ),
        c(
            "ROUTE-REFRESH of 24 octets (RFC 7313 §5)",
            ibgp(),
            frame(5, &[0, 1, 0, 1, 0]),
            Reset(7, 1, frame(5, &[0, 1, 0, 1, 0])),
        ),
        // ===== OPEN (RFC 4271 §6.2, RFC 7607) =====
        c(
            "OPEN version 3",
            ibgp(),
            open(3, 65001, 90, [1, 1, 1, 1], &[]),
            Reset(2, 1, vec![]),
        ),
        c(
            "OPEN version 5 answers with 4",
            ibgp(),
            open(5, 65001, 90, [1, 1, 1, 1], &[]),
            Reset(2, 1, vec![0, 4]),
        ),
        at(
            c(
                "OPEN hold time 2",
                ibgp(),
                open(4, 65001, 2, [1, 1, 1, 1], &[]),
                Reset(2, 6, vec![]),
            ),
            22,
        ),
        c(
            "OPEN BGP identifier 0",
            ibgp(),
            open(4, 65001, 90, [0, 0, 0, 0], &[]),
            Reset(2, 3, vec![]),
        ),
        c(
            "OPEN my AS 0",
            ibgp(),
            open(4, 0, 90, [1, 1, 1, 1], &[]),
            Reset(2, 2, vec![]),
        ),
        c(
            "OPEN 4-octet AS capability of AS 0",
            ibgp(),
            open(4, 23456, 90, [1, 1, 1, 1], &[2, 6, 65, 4, 0, 0, 0, 0]),
            Reset(2, 2, vec![]),
        ),
        c(
            "OPEN authentication parameter (type 1)",
            ibgp(),
            open(4, 65001, 90, [1, 1, 1, 1], &[1, 1, 0]),
            Reset(2, 4, vec![]),
        ),
        c(
            "OPEN parameter overruns",
            ibgp(),
            open(4, 65001, 90, [1, 1, 1, 1], &[2, 9, 1, 4, 0, 1, 0, 1]),
            Reset(2, 0, vec![]),
        ),
        c(
            "OPEN capability overruns its parameter",
            ibgp(),
            open(4, 65001, 90, [1, 1, 1, 1], &[2, 4, 65, 4, 0, 0]),
            Reset(2, 0, vec![]),
        ),
        c(
            "OPEN 4-octet AS capability of 3 octets",
            ibgp(),
            open(4, 65001, 90, [1, 1, 1, 1], &[2, 5, 65, 3, 0, 0, 1]),
            Reset(2, 0, vec![]),
        ),
        c(
            "OPEN multiprotocol capability of 3 octets",
            ibgp(),
            open(4, 65001, 90, [1, 1, 1, 1], &[2, 5, 1, 3, 0, 1, 0]),
            Reset(2, 0, vec![]),
        ),
        c(
            "OPEN graceful restart of 5 octets",
            ibgp(),
            open(4, 65001, 90, [1, 1, 1, 1], &[2, 7, 64, 5, 0, 120, 0, 1, 1]),
            Reset(2, 0, vec![]),
        ),
        // ===== UPDATE framing (RFC 4271 §6.3, RFC 7606 §5.3) =====
        at(
            c(
                "withdrawn routes length overruns",
                ibgp(),
                frame(2, &[0, 9, 0, 0]),
                Reset(3, 1, vec![]),
            ),
            19,
        ),
        at(
            c(
                "total attribute length overruns",
                ibgp(),
                frame(2, &[0, 0, 0, 9, 0x40, 1, 1, 0]),
                Reset(3, 1, vec![]),
            ),
            21,
        ),
        at(
            c(
                "NLRI prefix length 33",
                ibgp(),
                update(&[], &[ORIGIN, AS_PATH, NEXT_HOP], &[33, 10, 1, 2, 3, 4]),
                Reset(3, 10, vec![]),
            ),
            23 + 20,
        ),
        c(
            "NLRI prefix cut short",
            ibgp(),
            update(&[], &[ORIGIN, AS_PATH, NEXT_HOP], &[24, 10, 1]),
            Reset(3, 10, vec![]),
        ),
        c(
            "withdrawn prefix length 40",
            ibgp(),
            update(&[40, 1, 2, 3, 4, 5], &[], &[]),
            Reset(3, 10, vec![]),
        ),
        c(
            "withdrawn prefix cut short",
            ibgp(),
            update(&[32, 1, 2], &[], &[]),
            Reset(3, 10, vec![]),
        ),
        c(
            "ADD-PATH NLRI with a cut path identifier",
            add_path.clone(),
            update(&[], &[ORIGIN, AS_PATH, NEXT_HOP], &[0, 0, 1]),
            Reset(3, 10, vec![]),
        ),
        c(
            "ADD-PATH NLRI prefix length 33",
            add_path,
            update(
                &[],
                &[ORIGIN, AS_PATH, NEXT_HOP],
                &[0, 0, 0, 1, 33, 1, 1, 1, 1, 1],
            ),
            Reset(3, 10, vec![]),
        ),
        // ===== Attribute framing (RFC 7606 §4) =====
        c(
            "attribute header cut short",
            ibgp(),
            with(&[&[0xc0, 8]]),
            Withdraw(1, vec!["10.1.2.0/24"]),
        ),
        c(
            "attribute length overruns the section",
            ibgp(),
            with(&[&[0xc0, 8, 9, 0, 0, 0, 1]]),
            Withdraw(1, vec!["10.1.2.0/24"]),
        ),
        c(
            "extended-length attribute header cut short",
            ibgp(),
            with(&[&[0xd0, 8, 0]]),
            Withdraw(1, vec!["10.1.2.0/24"]),
        ),
        c(
            "MP_REACH_NLRI overruns the section",
            ibgp(),
            with(&[&[0x80, 14, 40, 0, 2, 1]]),
            Reset(3, 1, vec![]),
        ),
        // ===== Attribute flags (RFC 7606 §3 (c)) =====
        at(
            c(
                "ORIGIN marked optional",
                ibgp(),
                update(&[], &[&[0xc0, 1, 1, 0], AS_PATH, NEXT_HOP], NLRI),
                Withdraw(4, vec!["10.1.2.0/24"]),
            ),
            23,
        ),
        c(
            "NEXT_HOP marked optional",
            ibgp(),
            update(&[], &[ORIGIN, AS_PATH, &[0x80, 3, 4, 10, 0, 0, 1]], NLRI),
            Withdraw(4, vec!["10.1.2.0/24"]),
        ),
        c(
            "COMMUNITIES marked non-transitive",
            ibgp(),
            with(&[&[0x80, 8, 4, 0, 1, 0, 1]]),
            Withdraw(4, vec!["10.1.2.0/24"]),
        ),
        c(
            "MULTI_EXIT_DISC marked transitive",
            ibgp(),
            with(&[&[0xc0, 4, 4, 0, 0, 0, 1]]),
            Withdraw(4, vec!["10.1.2.0/24"]),
        ),
        c(
            "MP_REACH_NLRI marked transitive",
            ibgp(),
            update(
                &[],
                &[ORIGIN, AS_PATH, &{
                    let mut a = mp_reach_v6(16, V6_NH, V6_NLRI);
                    a[0] = 0xc0;
                    a
                }],
                &[],
            ),
            Disable(2, 1, 4),
        ),
        // ===== Per attribute (RFC 7606 §7) =====
        c(
            "ORIGIN of 2 octets",
            ibgp(),
            update(&[], &[&[0x40, 1, 2, 0, 0], AS_PATH, NEXT_HOP], NLRI),
            Withdraw(5, vec!["10.1.2.0/24"]),
        ),
        c(
            "ORIGIN value 3",
            ibgp(),
            update(&[], &[&[0x40, 1, 1, 3], AS_PATH, NEXT_HOP], NLRI),
            Withdraw(6, vec!["10.1.2.0/24"]),
        ),
        at(
            c(
                "AS_PATH segment overruns",
                ibgp(),
                update(
                    &[],
                    &[ORIGIN, &[0x40, 2, 6, 2, 2, 0, 0, 0xfd, 0xe9], NEXT_HOP],
                    NLRI,
                ),
                Withdraw(11, vec!["10.1.2.0/24"]),
            ),
            23 + 4 + 3 + 1,
        ),
        c(
            "AS_PATH segment type 5",
            ibgp(),
            update(
                &[],
                &[ORIGIN, &[0x40, 2, 6, 5, 1, 0, 0, 0xfd, 0xe9], NEXT_HOP],
                NLRI,
            ),
            Withdraw(11, vec!["10.1.2.0/24"]),
        ),
        c(
            "AS_PATH zero-length segment",
            ibgp(),
            update(&[], &[ORIGIN, &[0x40, 2, 2, 2, 0], NEXT_HOP], NLRI),
            Withdraw(11, vec!["10.1.2.0/24"]),
        ),
        c(
            "AS_PATH segment header cut",
            ibgp(),
            update(&[], &[ORIGIN, &[0x40, 2, 1, 2], NEXT_HOP], NLRI),
            Withdraw(11, vec!["10.1.2.0/24"]),
        ),
        c(
            "AS_PATH of 4-octet ASes to a 2-octet session",
            two_octet(),
            update(
                &[],
                &[ORIGIN, &[0x40, 2, 7, 2, 1, 0, 0, 0xfd, 0xe9, 0], NEXT_HOP],
                NLRI,
            ),
            Withdraw(11, vec!["10.1.2.0/24"]),
        ),
        c(
            "AS_CONFED_SEQUENCE from an external peer",
            ebgp(),
            update(
                &[],
                &[ORIGIN, &[0x40, 2, 6, 3, 1, 0, 0, 0xfd, 0xe9], NEXT_HOP],
                NLRI,
            ),
            Withdraw(11, vec!["10.1.2.0/24"]),
        ),
        c(
            "NEXT_HOP of 5 octets",
            ibgp(),
            update(&[], &[ORIGIN, AS_PATH, &[0x40, 3, 5, 10, 0, 0, 1, 0]], NLRI),
            Withdraw(5, vec!["10.1.2.0/24"]),
        ),
        c(
            "MULTI_EXIT_DISC of 3 octets",
            ibgp(),
            with(&[&[0x80, 4, 3, 0, 0, 1]]),
            Withdraw(5, vec!["10.1.2.0/24"]),
        ),
        c(
            "LOCAL_PREF of 2 octets from an internal peer",
            ibgp(),
            with(&[&[0x40, 5, 2, 0, 1]]),
            Withdraw(5, vec!["10.1.2.0/24"]),
        ),
        c(
            "LOCAL_PREF from an external peer",
            ebgp(),
            with(&[&[0x40, 5, 4, 0, 0, 0, 100]]),
            Discard(5),
        ),
        c(
            "ATOMIC_AGGREGATE of 1 octet",
            ibgp(),
            with(&[&[0x40, 6, 1, 0]]),
            Discard(6),
        ),
        c(
            "AGGREGATOR of 6 octets on a 4-octet session",
            ibgp(),
            with(&[&[0xc0, 7, 6, 0xfd, 0xe9, 10, 0, 0, 1]]),
            Discard(7),
        ),
        c(
            "AGGREGATOR of AS 0",
            ibgp(),
            with(&[&[0xc0, 7, 8, 0, 0, 0, 0, 10, 0, 0, 1]]),
            Discard(7),
        ),
        c(
            "COMMUNITIES of 5 octets",
            ibgp(),
            with(&[&[0xc0, 8, 5, 0, 1, 0, 1, 0]]),
            Withdraw(9, vec!["10.1.2.0/24"]),
        ),
        c(
            "COMMUNITIES empty",
            ibgp(),
            with(&[&[0xc0, 8, 0]]),
            Withdraw(9, vec!["10.1.2.0/24"]),
        ),
        c(
            "ORIGINATOR_ID from an external peer",
            ebgp(),
            with(&[&[0x80, 9, 4, 1, 1, 1, 1]]),
            Discard(9),
        ),
        c(
            "ORIGINATOR_ID of 5 octets",
            ibgp(),
            with(&[&[0x80, 9, 5, 1, 1, 1, 1, 1]]),
            Withdraw(5, vec!["10.1.2.0/24"]),
        ),
        c(
            "CLUSTER_LIST of 6 octets",
            ibgp(),
            with(&[&[0x80, 10, 6, 1, 1, 1, 1, 2, 2]]),
            Withdraw(9, vec!["10.1.2.0/24"]),
        ),
        c(
            "CLUSTER_LIST from an external peer",
            ebgp(),
            with(&[&[0x80, 10, 4, 1, 1, 1, 1]]),
            Discard(10),
        ),
        c(
            "EXTENDED_COMMUNITIES of 7 octets",
            ibgp(),
            with(&[&[0xc0, 16, 7, 0, 2, 0, 1, 0, 0, 0]]),
            Withdraw(9, vec!["10.1.2.0/24"]),
        ),
        c(
            "LARGE_COMMUNITY of 13 octets",
            ibgp(),
            with(&[&[0xc0, 32, 13, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 4]]),
            Withdraw(9, vec!["10.1.2.0/24"]),
        ),
        c(
            "AS4_PATH between 4-octet speakers",
            ibgp(),
            with(&[&[0xc0, 17, 6, 2, 1, 0, 1, 0, 0]]),
            Discard(17),
        ),
        c(
            "AS4_PATH malformed from a 2-octet speaker",
            two_octet(),
            update(
                &[],
                &[ORIGIN, AS_PATH2, NEXT_HOP, &[0xc0, 17, 6, 2, 2, 0, 1, 0, 0]],
                NLRI,
            ),
            Discard(17),
        ),
        c(
            "AS4_AGGREGATOR of 6 octets",
            two_octet(),
            update(
                &[],
                &[
                    ORIGIN,
                    AS_PATH2,
                    NEXT_HOP,
                    &[0xc0, 18, 6, 0, 1, 10, 0, 0, 1],
                ],
                NLRI,
            ),
            Discard(18),
        ),
        // ===== Duplicates and presence (RFC 7606 §3 (d), (g)) =====
        c(
            "ORIGIN twice keeps the first",
            ibgp(),
            with(&[&[0x40, 1, 1, 2]]),
            Discard(1),
        ),
        c(
            "MP_REACH_NLRI twice",
            ibgp(),
            update(
                &[],
                &[
                    ORIGIN,
                    AS_PATH,
                    &mp_reach_v6(16, V6_NH, V6_NLRI),
                    &mp_reach_v6(16, V6_NH, V6_NLRI),
                ],
                &[],
            ),
            Reset(3, 1, vec![]),
        ),
        c(
            "MP_UNREACH_NLRI twice",
            ibgp(),
            update(
                &[],
                &[&[0x80, 15, 3, 0, 2, 1], &[0x80, 15, 3, 0, 2, 1]],
                &[],
            ),
            Reset(3, 1, vec![]),
        ),
        c(
            "ORIGIN missing",
            ibgp(),
            update(&[], &[AS_PATH, NEXT_HOP], NLRI),
            Withdraw(3, vec!["10.1.2.0/24"]),
        ),
        c(
            "NEXT_HOP missing",
            ibgp(),
            update(&[24, 10, 9, 9], &[ORIGIN, AS_PATH], NLRI),
            Withdraw(3, vec!["10.9.9.0/24", "10.1.2.0/24"]),
        ),
        c(
            "AS_PATH missing beside MP_REACH_NLRI",
            ibgp(),
            update(&[], &[ORIGIN, &mp_reach_v6(16, V6_NH, V6_NLRI)], &[]),
            Withdraw(3, vec!["2001:db8:9::/48"]),
        ),
        c(
            "unrecognised well-known attribute",
            ibgp(),
            with(&[&[0x40, 99, 1, 7]]),
            Reset(3, 2, vec![0x40, 99, 1, 7]),
        ),
        c(
            "unrecognised optional non-transitive attribute",
            ibgp(),
            with(&[&[0x80, 99, 1, 7]]),
            Ignored(99),
        ),
        // ===== MP_REACH_NLRI / MP_UNREACH_NLRI (RFC 4760 §7, RFC 7606 §7.11) =====
        c(
            "MP_REACH_NLRI next hop length 5",
            ibgp(),
            update(
                &[],
                &[ORIGIN, AS_PATH, &mp_reach_v6(5, &V6_NH[..5], V6_NLRI)],
                &[],
            ),
            Disable(2, 1, 9),
        ),
        c(
            "MP_REACH_NLRI next hop length past the attribute",
            ibgp(),
            update(&[], &[ORIGIN, AS_PATH, &[0x80, 14, 5, 0, 2, 1, 16, 0]], &[]),
            Disable(2, 1, 9),
        ),
        c(
            "MP_REACH_NLRI IPv6 prefix length 129",
            ibgp(),
            update(
                &[],
                &[ORIGIN, AS_PATH, &mp_reach_v6(16, V6_NH, &[129, 0x20])],
                &[],
            ),
            Disable(2, 1, 9),
        ),
        c(
            "MP_REACH_NLRI IPv4 with an IPv6 next hop, no RFC 8950",
            ibgp(),
            update(
                &[],
                &[ORIGIN, AS_PATH, &{
                    let mut a = mp_reach_v6(16, V6_NH, &[24, 10, 1, 2]);
                    a[4] = 1;
                    a
                }],
                &[],
            ),
            Disable(1, 1, 9),
        ),
        c(
            "MP_REACH_NLRI of 2 octets",
            ibgp(),
            update(&[], &[ORIGIN, AS_PATH, &[0x80, 14, 2, 0, 2]], &[]),
            Reset(3, 9, vec![0x80, 14, 2, 0, 2]),
        ),
        c(
            "MP_UNREACH_NLRI IPv4 prefix length 40",
            ibgp(),
            update(&[], &[&[0x80, 15, 5, 0, 1, 1, 40, 1]], &[]),
            Disable(1, 1, 9),
        ),
        // ===== Precedence (RFC 7606 §3 (h)) =====
        c(
            "session reset beats treat-as-withdraw",
            ibgp(),
            update(
                &[],
                &[
                    &[0x40, 1, 1, 9],
                    AS_PATH,
                    &mp_reach_v6(16, V6_NH, V6_NLRI),
                    &mp_reach_v6(16, V6_NH, V6_NLRI),
                ],
                &[],
            ),
            Reset(3, 1, vec![]),
        ),
        c(
            "AFI/SAFI disable beats treat-as-withdraw",
            ibgp(),
            update(
                &[],
                &[
                    &[0x40, 1, 1, 9],
                    AS_PATH,
                    &mp_reach_v6(5, &V6_NH[..5], V6_NLRI),
                ],
                &[],
            ),
            Disable(2, 1, 9),
        ),
        c(
            "first of two treat-as-withdraw errors is reported",
            ibgp(),
            update(
                &[],
                &[
                    &[0x40, 1, 1, 9],
                    AS_PATH,
                    NEXT_HOP,
                    &[0xc0, 8, 5, 0, 0, 0, 0, 0],
                ],
                NLRI,
            ),
            Withdraw(6, vec!["10.1.2.0/24"]),
        ),
        c(
            "treat-as-withdraw covers MP prefixes too",
            ibgp(),
            update(
                &[],
                &[
                    &[0x40, 1, 1, 9],
                    AS_PATH,
                    NEXT_HOP,
                    &mp_reach_v6(16, V6_NH, V6_NLRI),
                    &[0x80, 15, 5, 0, 1, 1, 8, 11],
                ],
                NLRI,
            ),
            Withdraw(6, vec!["10.1.2.0/24", "2001:db8:9::/48", "11.0.0.0/8"]),
        ),
    ]
}

#[test]
fn every_malformed_input_gets_its_rfc_outcome() {
    let cases = cases();
    assert!(cases.len() >= 40, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let got = Message::decode(&case.msg, &case.ctx);
        let ok = match (&case.want, &got) {
            (Want::Reset(code, sub, data), Err(e)) => {
                matches!(&e.action, Action::SessionReset(n) if n.code == *code && n.subcode == *sub && n.data == *data)
            }
            (Want::Withdraw(sub, prefixes), Err(e)) => match &e.action {
                Action::TreatAsWithdraw {
                    withdrawn,
                    notification,
                } => {
                    let want: Vec<Nlri> = prefixes
                        .iter()
                        .map(|p| Nlri::new(p.parse::<Prefix>().unwrap()))
                        .collect();
                    notification.code == 3 && notification.subcode == *sub && *withdrawn == want
                }
                _ => false,
            },
            (Want::Disable(afi, safi, sub), Err(e)) => matches!(
                &e.action,
                Action::AfiSafiDisable { afi: a, safi: s, notification } if a == afi && s == safi && notification.code == 3 && notification.subcode == *sub
            ),
            (Want::Discard(tc), Ok(Message::Update(u))) => {
                u.discarded
                    .iter()
                    .any(|d| d.type_code == *tc && d.kind.is_some())
                    && (u.attribute(*tc).is_none() || *tc == 1)
            }
            (Want::Ignored(tc), Ok(Message::Update(u))) => {
                u.discarded
                    .iter()
                    .any(|d| d.type_code == *tc && d.kind.is_none())
                    && u.attribute(*tc).is_none()
            }
            _ => false,
        };
        let offset_ok = match (case.offset, &got) {
            (Some(o), Err(e)) => e.offset == o,
            (Some(_), Ok(_)) => false,
            (None, _) => true,
        };
        if !ok || !offset_ok {
            failures.push(format!(
                "{}: wanted {:?} (offset {:?}), got {:?}",
                case.name, case.want, case.offset, got
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn errors_name_field_and_offset() {
    let msg = update(
        &[],
        &[ORIGIN, AS_PATH, NEXT_HOP],
        &[24, 10, 1, 2, 33, 1, 1, 1, 1, 1],
    );
    let e = Message::decode(&msg, &ibgp()).unwrap_err();
    assert_eq!(e.field, "NLRI prefix length");
    assert_eq!(e.offset, 23 + 20 + 4);
    assert_eq!(
        e.to_string(),
        "NLRI prefix length at byte 47: prefix length 33 exceeds 32"
    );
}

#[test]
fn unknown_optional_transitive_is_kept_with_partial_set() {
    let msg = with(&[&[0xc0, 99, 2, 7, 7]]);
    let Ok(Message::Update(u)) = Message::decode(&msg, &ibgp()) else {
        panic!("decodes")
    };
    match u.attribute(99) {
        Some(margay_bgp_wire::PathAttribute::Unknown(r)) => {
            assert_eq!(r.flags, 0xe0);
            assert_eq!(r.value, vec![7, 7]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_capability_is_kept_not_refused() {
    let msg = open(4, 65001, 90, [1, 1, 1, 1], &[2, 5, 200, 3, 1, 2, 3]);
    let Ok(Message::Open(o)) = Message::decode(&msg, &ibgp()) else {
        panic!("decodes")
    };
    assert_eq!(
        o.capabilities,
        vec![margay_bgp_wire::Capability::Unknown {
            code: 200,
            value: vec![1, 2, 3]
        }]
    );
}

#[test]
fn extended_messages_lift_the_update_limit_but_not_open() {
    let ext = Context {
        four_octet_as: true,
        extended_message: true,
        ..Context::default()
    };
    let nlri: Vec<u8> = (0..1300u32)
        .flat_map(|i| [24, 10, (i >> 8) as u8, i as u8])
        .collect();
    let msg = update(&[], &[ORIGIN, AS_PATH, NEXT_HOP], &nlri);
    let Ok(Message::Update(u)) = Message::decode(&msg, &ext) else {
        panic!("a 5.2 kB UPDATE decodes under RFC 8654")
    };
    assert_eq!(u.nlri.len(), 1300);
    let params: Vec<u8> = std::iter::repeat_n([2u8, 2, 2, 0], 1100)
        .flatten()
        .collect();
    let mut big_open = open(4, 65001, 90, [1, 1, 1, 1], &[]);
    big_open.extend_from_slice(&params);
    let len = big_open.len() as u16;
    big_open[16..18].copy_from_slice(&len.to_be_bytes());
    let e = Message::decode(&big_open, &ext).unwrap_err();
    assert_eq!(
        e.notification().subcode,
        2,
        "OPEN stays within 4096 octets: {e}"
    );
}
