//! Decoding and encoding a full-table-like UPDATE stream, Margay beside
//! rustbgpd-wire on the same bytes in the same run.
//!
//! `cargo bench -p margay-bgp-wire --bench codec`; the numbers and the command are
//! recorded in docs/benchmarks.md ("BGP codec").

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use margay_bgp_wire::{
    frame_len, AsPath, Community, Context, LargeCommunity, Message, Nlri, Origin, PathAttribute,
    Prefix, UpdatePacker, UpdateView,
};

/// Prefixes in the stream: about a full IPv4 table.
const PREFIXES: u32 = 1_000_000;
/// Prefixes sharing one attribute set (one origin AS's worth of routes); 2000 fill
/// two maximally packed UPDATEs.
const PER_PATH: u32 = 2000;

fn attributes(i: u32) -> Vec<PathAttribute> {
    vec![
        PathAttribute::Origin(Origin::Igp),
        PathAttribute::AsPath(AsPath::sequence([
            65001,
            174,
            3356,
            64_496 + i % 1000,
            4_200_000_000 + i,
        ])),
        PathAttribute::NextHop(Ipv4Addr::new(192, 0, 2, 1)),
        PathAttribute::MultiExitDisc(i % 100),
        PathAttribute::Communities(vec![
            Community::new(65001, 100),
            Community::new(174, 21000),
            Community::new(3356, 2),
        ]),
        PathAttribute::LargeCommunities(vec![LargeCommunity {
            global_admin: 65001,
            local_data1: 1,
            local_data2: i,
        }]),
    ]
}

/// Mostly /24s, with the /16../23 mix of a real table.
fn prefix(i: u32) -> Nlri {
    let len = match i % 10 {
        0 => 16,
        1 => 20,
        2 => 22,
        3 => 23,
        _ => 24,
    };
    let addr = (1u32 << 24).wrapping_add(i.wrapping_mul(256));
    Nlri::new(Prefix::new_masked(IpAddr::V4(Ipv4Addr::from(addr)), len).unwrap())
}

fn ctx() -> Context {
    Context {
        four_octet_as: true,
        ..Context::default()
    }
}

/// The stream, and the offsets of its messages.
fn stream(ctx: &Context) -> (Vec<u8>, Vec<(usize, usize)>) {
    let packer = UpdatePacker::new(ctx);
    let mut out = BytesMut::with_capacity(PREFIXES as usize * 4 + (1 << 20));
    for group in 0..PREFIXES / PER_PATH {
        let base = group * PER_PATH;
        packer
            .announce(
                &attributes(group),
                (base..base + PER_PATH).map(prefix),
                &mut out,
            )
            .unwrap();
    }
    let buf = out.to_vec();
    let mut msgs = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let len = frame_len(&buf[pos..], ctx).unwrap().unwrap();
        msgs.push((pos, len));
        pos += len;
    }
    (buf, msgs)
}

fn margay_view(buf: &[u8], msgs: &[(usize, usize)], ctx: &Context) -> u64 {
    let mut acc = 0u64;
    for &(o, l) in msgs {
        let view = UpdateView::parse(&buf[o..o + l], ctx).unwrap();
        for a in view.attributes() {
            acc += u64::from(a.unwrap().type_code);
        }
        for n in view.nlri() {
            acc += u64::from(n.prefix.len());
        }
    }
    acc
}

fn margay_owned(buf: &[u8], msgs: &[(usize, usize)], ctx: &Context) -> u64 {
    let mut acc = 0u64;
    for &(o, l) in msgs {
        let Message::Update(u) = Message::decode(&buf[o..o + l], ctx).unwrap() else {
            unreachable!()
        };
        acc += u.attributes.len() as u64;
        acc += u
            .nlri
            .iter()
            .map(|n| u64::from(n.prefix.len()))
            .sum::<u64>();
    }
    acc
}

fn rustbgpd(msgs: &[Bytes]) -> u64 {
    let mut acc = 0u64;
    for m in msgs {
        let mut b = m.clone();
        let rustbgpd_wire::Message::Update(u) =
            rustbgpd_wire::decode_message(&mut b, 4096).unwrap()
        else {
            unreachable!()
        };
        let p = u.parse(true, false, &[]).unwrap();
        acc += p.attributes.len() as u64;
        acc += p
            .announced
            .iter()
            .map(|n| u64::from(n.prefix.len))
            .sum::<u64>();
    }
    acc
}

/// Best of `runs` timings of `f`, in prefixes per second.
fn rate(runs: usize, mut f: impl FnMut() -> u64) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        black_box(f());
        best = best.min(t.elapsed());
    }
    f64::from(PREFIXES) / best.as_secs_f64()
}

fn decode(c: &mut Criterion) {
    let ctx = ctx();
    let (buf, msgs) = stream(&ctx);
    let theirs: Vec<Bytes> = msgs
        .iter()
        .map(|&(o, l)| Bytes::copy_from_slice(&buf[o..o + l]))
        .collect();
    // Same answer from both decoders before timing anything.
    assert_eq!(margay_owned(&buf, &msgs, &ctx), rustbgpd(&theirs));
    println!(
        "stream: {} prefixes in {} UPDATEs, {} octets ({:.1} prefixes per UPDATE)",
        PREFIXES,
        msgs.len(),
        buf.len(),
        f64::from(PREFIXES) / msgs.len() as f64
    );

    let mut g = c.benchmark_group("decode_full_table");
    g.throughput(Throughput::Elements(u64::from(PREFIXES)));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("margay_view_zero_copy", |b| {
        b.iter(|| margay_view(&buf, &msgs, &ctx))
    });
    g.bench_function("margay_owned_update", |b| {
        b.iter(|| margay_owned(&buf, &msgs, &ctx))
    });
    g.bench_function("rustbgpd_wire_parse", |b| b.iter(|| rustbgpd(&theirs)));
    g.finish();

    // Side by side, same input, same run: the ratio docs/benchmarks.md reports.
    let view = rate(15, || margay_view(&buf, &msgs, &ctx));
    let owned = rate(15, || margay_owned(&buf, &msgs, &ctx));
    let other = rate(15, || rustbgpd(&theirs));
    println!("side-by-side (best of 15), prefixes/s:");
    println!(
        "  margay view (zero-copy)  {:>8.1} M/s  ({:.2}x rustbgpd-wire)",
        view / 1e6,
        view / other
    );
    println!(
        "  margay owned Update      {:>8.1} M/s  ({:.2}x rustbgpd-wire)",
        owned / 1e6,
        owned / other
    );
    println!("  rustbgpd-wire parse      {:>8.1} M/s", other / 1e6);
}

fn attribute_set(c: &mut Criterion) {
    // One UPDATE carrying a typical attribute set and a single prefix: the time per
    // iteration is the cost of one attribute set.
    let ctx = ctx();
    let mut out = BytesMut::new();
    UpdatePacker::new(&ctx)
        .announce(&attributes(7), [prefix(1)], &mut out)
        .unwrap();
    let msg = out.to_vec();
    let theirs = Bytes::from(msg.clone());
    let mut g = c.benchmark_group("typical_attribute_set");
    g.bench_function("margay_decode", |b| {
        b.iter(|| Message::decode(black_box(&msg), &ctx).unwrap())
    });
    g.bench_function("rustbgpd_wire_decode", |b| {
        b.iter(|| {
            let mut m = theirs.clone();
            let rustbgpd_wire::Message::Update(u) =
                rustbgpd_wire::decode_message(&mut m, 4096).unwrap()
            else {
                unreachable!()
            };
            u.parse(true, false, &[]).unwrap()
        })
    });
    let Message::Update(u) = Message::decode(&msg, &ctx).unwrap() else {
        unreachable!()
    };
    let m = Message::Update(u);
    let mut buf = BytesMut::with_capacity(4096);
    g.bench_function("margay_encode", |b| {
        b.iter(|| {
            buf.clear();
            m.encode(&ctx, &mut buf).unwrap();
        })
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let ctx = ctx();
    let prefixes: Vec<Nlri> = (0..PREFIXES).map(prefix).collect();
    let attrs: Vec<Vec<PathAttribute>> = (0..PREFIXES / PER_PATH).map(attributes).collect();
    let packer = UpdatePacker::new(&ctx);
    let mut out = BytesMut::with_capacity(PREFIXES as usize * 4 + (1 << 20));
    let mut g = c.benchmark_group("encode_full_table");
    g.throughput(Throughput::Elements(u64::from(PREFIXES)));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("margay_update_packer", |b| {
        b.iter(|| {
            out.clear();
            for (i, chunk) in prefixes.chunks(PER_PATH as usize).enumerate() {
                packer
                    .announce(&attrs[i], chunk.iter().copied(), &mut out)
                    .unwrap();
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, decode, attribute_set, encode);
criterion_main!(benches);
