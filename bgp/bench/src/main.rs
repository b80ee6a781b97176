//! `bgp-bench`: the injector and collector peers of `bgp/bench/run.sh`, in the style
//! of bgperf2. It speaks just enough BGP (OPEN, KEEPALIVE, UPDATE) through the
//! workspace codec, packs prefixes into full UPDATEs, and counts what it receives
//! with a bitset, so its own cost stays far below the device under test's.
//!
//! Prefix `i` is `1.0.0.0/24 + i`, so 16M distinct prefixes are available.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use margay_bgp_wire::{
    frame_len, AsPath, Capability, Context, Message, Nlri, Open, Origin, PathAttribute, Prefix,
    UpdatePacker, UpdateView,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;
use tokio::sync::{watch, Mutex};

#[derive(Parser)]
#[command(name = "bgp-bench", about = "BGP benchmark injector and collector")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Injector → device → collector: time until the collector holds every prefix,
    /// then until the withdrawal of all of them has reached it.
    Propagate {
        #[arg(long)]
        dut: IpAddr,
        #[arg(long)]
        dut_asn: u32,
        #[arg(long)]
        injector: IpAddr,
        #[arg(long, default_value_t = 65001)]
        injector_asn: u32,
        #[arg(long)]
        collector: IpAddr,
        #[arg(long, default_value_t = 65002)]
        collector_asn: u32,
        #[arg(long, default_value_t = 100_000)]
        prefixes: u32,
        #[arg(long)]
        dut_pid: Option<u32>,
    },
    /// Injector → device: time until `count_cmd` (run with `sh -c`) prints a number
    /// at least `prefixes`.
    Receive {
        #[arg(long)]
        dut: IpAddr,
        #[arg(long)]
        dut_asn: u32,
        #[arg(long)]
        injector: IpAddr,
        #[arg(long, default_value_t = 65001)]
        injector_asn: u32,
        #[arg(long, default_value_t = 100_000)]
        prefixes: u32,
        #[arg(long)]
        count_cmd: String,
        #[arg(long)]
        dut_pid: Option<u32>,
    },
    /// Route-reflector role: `clients` iBGP clients (addresses `first_client` + i)
    /// each inject `per_client` prefixes; time until every client holds all the
    /// others' prefixes.
    Rr {
        #[arg(long)]
        dut: IpAddr,
        #[arg(long)]
        asn: u32,
        #[arg(long)]
        first_client: Ipv4Addr,
        #[arg(long, default_value_t = 100)]
        clients: u32,
        #[arg(long, default_value_t = 10_000)]
        per_client: u32,
        #[arg(long)]
        dut_pid: Option<u32>,
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

fn prefix(i: u32) -> Prefix {
    Prefix::new(IpAddr::V4(Ipv4Addr::from(0x0100_0000 + (i << 8))), 24).expect("aligned /24")
}

fn index(p: &Prefix) -> Option<usize> {
    match p.addr() {
        IpAddr::V4(a) if p.len() == 24 => (u32::from(a) >> 8)
            .checked_sub(0x1_0000)
            .map(|i| i as usize),
        _ => None,
    }
}

/// Peak and current resident set of a process, in KiB.
fn rss_kib(pid: Option<u32>) -> (u64, u64) {
    let Some(pid) = pid else { return (0, 0) };
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Prefixes held by one collector: a bitset and a count, and the count with the
/// time the reader finished the UPDATE that changed it, so a wait ends with the
/// moment the last prefix arrived rather than the next poll after it.
struct Held {
    bits: std::sync::Mutex<Vec<u64>>,
    count: AtomicI64,
    changed: watch::Sender<(i64, Instant)>,
}

impl Held {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            bits: std::sync::Mutex::new(vec![0; 1 << 18]),
            count: AtomicI64::new(0),
            changed: watch::Sender::new((0, Instant::now())),
        })
    }

    fn count(&self) -> i64 {
        self.count.load(Ordering::Relaxed)
    }

    /// When the count first satisfied `done` (now, if it already does).
    async fn reached(
        &self,
        t: Duration,
        what: &str,
        done: impl Fn(i64) -> bool,
    ) -> anyhow::Result<Instant> {
        let mut rx = self.changed.subscribe();
        let r = tokio::time::timeout(t, rx.wait_for(|(c, _)| done(*c))).await;
        match r {
            Ok(Ok(v)) => Ok(v.1),
            Ok(Err(_)) => bail!("the collector stopped before {what}"),
            Err(_) => bail!("timed out after {t:?} waiting for {what}"),
        }
    }
}

struct Peer {
    w: Arc<Mutex<OwnedWriteHalf>>,
    ctx: Context,
    local: Ipv4Addr,
    asn: u32,
    ibgp: bool,
    held: Arc<Held>,
}

async fn read_msg(
    r: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    ctx: &Context,
) -> anyhow::Result<bytes::Bytes> {
    loop {
        if let Some(n) = frame_len(buf, ctx).map_err(|e| anyhow::anyhow!("{e}"))? {
            if buf.len() >= n {
                return Ok(buf.split_to(n).freeze());
            }
        }
        if r.read_buf(buf).await? == 0 {
            bail!("the device closed the connection");
        }
    }
}

async fn connect(local: IpAddr, dut: IpAddr, asn: u32, dut_asn: u32) -> anyhow::Result<Peer> {
    let IpAddr::V4(local4) = local else {
        bail!("IPv4 only")
    };
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(local, 0))?;
    let s = sock
        .connect(SocketAddr::new(dut, 179))
        .await
        .with_context(|| format!("{local} connecting to {dut}"))?;
    s.set_nodelay(true)?;
    let (mut r, mut w) = s.into_split();
    let caps = vec![
        Capability::Multiprotocol { afi: 1, safi: 1 },
        Capability::RouteRefresh,
    ];
    let open = Open::new(asn, 180, local4, caps);
    let ctx0 = Context::default();
    w.write_all(&Message::Open(open.clone()).to_bytes(&ctx0)?)
        .await?;
    let mut buf = BytesMut::with_capacity(1 << 20);
    let ctx = loop {
        let m = read_msg(&mut r, &mut buf, &ctx0).await?;
        match Message::decode(&m, &ctx0) {
            Ok(Message::Open(o)) => {
                w.write_all(&Message::Keepalive.to_bytes(&ctx0)?).await?;
                break Context::negotiate(&open, &o, asn != dut_asn);
            }
            Ok(Message::Notification(n)) => bail!("{local}: the device refused us: {n}"),
            _ => {}
        }
    };
    loop {
        let m = read_msg(&mut r, &mut buf, &ctx).await?;
        match Message::decode(&m, &ctx) {
            Ok(Message::Keepalive) => break,
            Ok(Message::Notification(n)) => bail!("{local}: {n}"),
            _ => {}
        }
    }
    let w = Arc::new(Mutex::new(w));
    let held = Held::new();
    // Reader: count prefixes, keep the session alive.
    {
        let held = held.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            while let Ok(m) = read_msg(&mut r, &mut buf, &ctx).await {
                if m[18] != 2 {
                    continue;
                }
                let Ok(v) = UpdateView::parse(&m, &ctx) else {
                    continue;
                };
                let mut bits = held.bits.lock().unwrap_or_else(|e| e.into_inner());
                let mut delta = 0i64;
                for n in v.withdrawn() {
                    if let Some(i) = index(&n.prefix) {
                        let (wd, b) = (i / 64, 1u64 << (i % 64));
                        if wd < bits.len() && bits[wd] & b != 0 {
                            bits[wd] &= !b;
                            delta -= 1;
                        }
                    }
                }
                for n in v.nlri() {
                    if let Some(i) = index(&n.prefix) {
                        let (wd, b) = (i / 64, 1u64 << (i % 64));
                        if wd < bits.len() && bits[wd] & b == 0 {
                            bits[wd] |= b;
                            delta += 1;
                        }
                    }
                }
                if delta != 0 {
                    let now = Instant::now();
                    let c = held.count.fetch_add(delta, Ordering::Relaxed) + delta;
                    held.changed.send_replace((c, now));
                }
            }
        });
    }
    {
        let w = w.clone();
        let ka = Message::Keepalive.to_bytes(&ctx)?;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(20)).await;
                if w.lock().await.write_all(&ka).await.is_err() {
                    return;
                }
            }
        });
    }
    Ok(Peer {
        w,
        ctx,
        local: local4,
        asn,
        ibgp: asn == dut_asn,
        held,
    })
}

impl Peer {
    fn announcements(&self, range: std::ops::Range<u32>) -> anyhow::Result<BytesMut> {
        let mut attrs = vec![
            PathAttribute::Origin(Origin::Igp),
            PathAttribute::AsPath(if self.ibgp {
                AsPath::default()
            } else {
                AsPath::sequence([self.asn])
            }),
            PathAttribute::NextHop(self.local),
        ];
        if self.ibgp {
            attrs.push(PathAttribute::LocalPref(100));
        }
        let mut out = BytesMut::with_capacity(range.len() * 4 + 4096);
        UpdatePacker::new(&self.ctx).announce(
            &attrs,
            range.map(|i| Nlri::new(prefix(i))),
            &mut out,
        )?;
        Ok(out)
    }

    fn withdrawals(&self, range: std::ops::Range<u32>) -> anyhow::Result<BytesMut> {
        let mut out = BytesMut::with_capacity(range.len() * 4 + 4096);
        UpdatePacker::new(&self.ctx).withdraw(
            margay_bgp_wire::Family::Ipv4Unicast,
            range.map(|i| Nlri::new(prefix(i))),
            &mut out,
        )?;
        Ok(out)
    }

    async fn send(&self, b: &[u8]) -> anyhow::Result<()> {
        self.w.lock().await.write_all(b).await?;
        Ok(())
    }
}

async fn count_cmd(cmd: &str) -> i64 {
    let out = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .await;
    out.ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(-1)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Propagate {
            dut,
            dut_asn,
            injector,
            injector_asn,
            collector,
            collector_asn,
            prefixes,
            dut_pid,
        } => {
            let c = connect(collector, dut, collector_asn, dut_asn).await?;
            let i = connect(injector, dut, injector_asn, dut_asn).await?;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let base = c.held.count();
            let ann = i.announcements(0..prefixes)?;
            let wd = i.withdrawals(0..prefixes)?;
            let n = i64::from(prefixes);
            let t0 = Instant::now();
            i.send(&ann).await?;
            let announce = c
                .held
                .reached(
                    Duration::from_secs(300),
                    "all prefixes at the collector",
                    |h| h >= base + n,
                )
                .await?
                - t0;
            let (hwm, _) = rss_kib(dut_pid);
            let t1 = Instant::now();
            i.send(&wd).await?;
            let withdraw = c
                .held
                .reached(
                    Duration::from_secs(300),
                    "all withdrawals at the collector",
                    |h| h <= base,
                )
                .await?
                - t1;
            println!(
                "{}",
                serde_json::json!({
                    "test": "propagate", "prefixes": prefixes,
                    "announce_s": announce.as_secs_f64(), "withdraw_s": withdraw.as_secs_f64(),
                    "dut_peak_rss_kib": hwm,
                })
            );
        }
        Cmd::Receive {
            dut,
            dut_asn,
            injector,
            injector_asn,
            prefixes,
            count_cmd: cmd,
            dut_pid,
        } => {
            let i = connect(injector, dut, injector_asn, dut_asn).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (_, rss_before) = rss_kib(dut_pid);
            let ann = i.announcements(0..prefixes)?;
            let t0 = Instant::now();
            i.send(&ann).await?;
            let n = i64::from(prefixes);
            loop {
                if count_cmd(&cmd).await >= n {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(300) {
                    bail!("the device never reported {n} prefixes");
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let t = t0.elapsed();
            let (hwm, rss) = rss_kib(dut_pid);
            println!(
                "{}",
                serde_json::json!({
                    "test": "receive", "prefixes": prefixes, "seconds": t.as_secs_f64(),
                    "dut_peak_rss_kib": hwm, "dut_rss_kib": rss, "dut_rss_before_kib": rss_before,
                })
            );
        }
        Cmd::Rr {
            dut,
            asn,
            first_client,
            clients,
            per_client,
            dut_pid,
            timeout,
        } => {
            let mut peers = Vec::new();
            let mut tasks = Vec::new();
            for k in 0..clients {
                let local = IpAddr::V4(Ipv4Addr::from(u32::from(first_client) + k));
                tasks.push(tokio::spawn(connect(local, dut, asn, asn)));
            }
            for t in tasks {
                peers.push(t.await??);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (_, rss_before) = rss_kib(dut_pid);
            let mut bufs = Vec::new();
            for (k, p) in peers.iter().enumerate() {
                let k = k as u32;
                bufs.push(p.announcements(k * per_client..(k + 1) * per_client)?);
            }
            let peers = Arc::new(peers);
            let t0 = Instant::now();
            let mut sends = Vec::new();
            for (k, b) in bufs.into_iter().enumerate() {
                let peers = peers.clone();
                sends.push(tokio::spawn(async move { peers[k].send(&b).await }));
            }
            for s in sends {
                s.await??;
            }
            let want = i64::from((clients - 1) * per_client);
            let deadline = Duration::from_secs(timeout);
            let mut last = t0;
            for p in peers.iter() {
                let left = deadline.saturating_sub(t0.elapsed());
                let at = p
                    .held
                    .reached(left, "every client to hold the others' prefixes", |h| {
                        h >= want
                    })
                    .await?;
                last = last.max(at);
            }
            let t = last - t0;
            let (hwm, rss) = rss_kib(dut_pid);
            let paths = u64::from(clients * per_client);
            println!(
                "{}",
                serde_json::json!({
                    "test": "rr", "clients": clients, "per_client": per_client, "seconds": t.as_secs_f64(),
                    "dut_peak_rss_kib": hwm, "dut_rss_kib": rss, "dut_rss_before_kib": rss_before,
                    "bytes_per_path": (rss.saturating_sub(rss_before)) * 1024 / paths.max(1),
                })
            );
        }
    }
    Ok(())
}
