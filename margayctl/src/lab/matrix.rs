//! The pod-to-pod reachability matrix: ICMP (ping) and a TCP connect to each pod's echo port,
//! from every pod to every other, probed in parallel.

use super::plan;
use super::proc::in_netns;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// The outcome for one source/destination pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    pub icmp: bool,
    pub tcp: bool,
}

impl Reach {
    pub fn ok(self) -> bool {
        self.icmp && self.tcp
    }
}

/// One probe target: a pod's name, namespace and address.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub netns: String,
    pub ip: IpAddr,
}

/// One ICMP echo from `from_ns` to `to`: whether it was answered. A ping that could not run
/// (no `ip` or `ping`, no namespace) is an error, not "no answer".
pub fn ping(from_ns: &str, to: IpAddr) -> Result<bool> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            from_ns,
            "ping",
            "-c1",
            "-W1",
            "-q",
            &to.to_string(),
        ])
        .output()
        .context("running ip netns exec ... ping (iproute2, iputils-ping)")?;
    match out.status.code() {
        Some(0) => Ok(true),
        // iputils: 1 is "no reply"; anything else is ping (or ip netns exec) failing.
        Some(1) => Ok(false),
        code => bail!(
            "ping {to} from {from_ns} failed to run ({code:?}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}

/// A TCP connect from `from_ns` to `to:port` within a second: whether it was accepted. Not
/// being able to enter the namespace is an error.
pub fn tcp(from_ns: &str, to: IpAddr, port: u16) -> Result<bool> {
    in_netns(from_ns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(1)).is_ok()
    })
    .with_context(|| format!("entering {from_ns} to connect to {to}:{port}"))
}

/// One pair's outcome, or why it could not be probed.
pub type Cell = std::result::Result<Reach, String>;

/// Probes every ordered pair of distinct endpoints; `result[i][j]` is from i to j (`None` on
/// the diagonal only). A probe that could not run, or whose thread panicked, is an `Err` cell.
pub fn probe(endpoints: &[Endpoint]) -> Vec<Vec<Option<Cell>>> {
    let n = endpoints.len();
    let mut out: Vec<Vec<Option<Cell>>> = vec![vec![None; n]; n];
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
        .collect();
    let one = |i: usize, j: usize| -> Cell {
        let (a, b) = (&endpoints[i], &endpoints[j]);
        let icmp = ping(&a.netns, b.ip).map_err(|e| format!("{e:#}"))?;
        let tcp = tcp(&a.netns, b.ip, plan::ECHO_PORT).map_err(|e| format!("{e:#}"))?;
        Ok(Reach { icmp, tcp })
    };
    let chunks: Vec<&[(usize, usize)]> = pairs.chunks(pairs.len().div_ceil(8).max(1)).collect();
    let results: Vec<((usize, usize), Cell)> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|chunk| {
                let one = &one;
                (
                    *chunk,
                    s.spawn(move || {
                        chunk
                            .iter()
                            .map(|&(i, j)| ((i, j), one(i, j)))
                            .collect::<Vec<_>>()
                    }),
                )
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(chunk, h)| match h.join() {
                Ok(r) => r,
                Err(_) => chunk
                    .iter()
                    .map(|&p| (p, Err("the probe thread panicked".to_owned())))
                    .collect(),
            })
            .collect()
    });
    for ((i, j), r) in results {
        out[i][j] = Some(r);
    }
    out
}

/// Whether every pair reached each other over ICMP and TCP. A pair that was not probed, or
/// whose probe failed to run, is an error: it says nothing about reachability.
pub fn full(endpoints: &[Endpoint], m: &[Vec<Option<Cell>>]) -> Result<bool> {
    let mut all = true;
    for (i, row) in m.iter().enumerate() {
        for (j, cell) in row.iter().enumerate() {
            if i == j {
                continue;
            }
            let (a, b) = (&endpoints[i].name, &endpoints[j].name);
            match cell {
                None => bail!("no probe result from {a} to {b}"),
                Some(Err(e)) => bail!("probing from {a} to {b}: {e}"),
                Some(Ok(r)) => all &= r.ok(),
            }
        }
    }
    Ok(all)
}

/// The matrix as a table: `✓` both probes passed, `i` ICMP only, `t` TCP only, `✗` neither,
/// `!` the probe could not run.
pub fn render(endpoints: &[Endpoint], m: &[Vec<Option<Cell>>]) -> String {
    let label = |i: usize, e: &Endpoint| format!("{} {}", i + 1, e.name);
    let w = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| label(i, e).len())
        .max()
        .unwrap_or(7)
        .max(7);
    let mut s = format!("{:w$}", "from\\to");
    for (j, _) in endpoints.iter().enumerate() {
        s.push_str(&format!(" {:>3}", j + 1));
    }
    s.push('\n');
    for (i, e) in endpoints.iter().enumerate() {
        s.push_str(&format!("{:w$}", label(i, e)));
        for cell in &m[i] {
            let c = match cell {
                None => "·",
                Some(Err(_)) => "!",
                Some(Ok(r)) if r.ok() => "✓",
                Some(Ok(r)) if r.icmp => "i",
                Some(Ok(r)) if r.tcp => "t",
                Some(Ok(_)) => "✗",
            };
            s.push_str(&format!(" {c:>3}"));
        }
        s.push('\n');
    }
    s
}

/// Serves the TCP echo the matrix connects to (run inside each pod): accepts and answers with
/// the pod's name.
pub fn serve_echo(port: u16, name: &str) -> std::io::Result<()> {
    use std::io::Write;
    // Both families on one socket (IPv6 with v4-mapped addresses), where the pod has IPv6;
    // IPv4 alone otherwise.
    let listener = std::net::TcpListener::bind(("::", port))
        .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))?;
    for mut c in listener.incoming().flatten() {
        let _ = c.write_all(format!("{name}\n").as_bytes());
    }
    Ok(())
}
