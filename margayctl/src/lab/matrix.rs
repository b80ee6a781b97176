//! The pod-to-pod reachability matrix: ICMP (ping) and a TCP connect to each pod's echo port,
//! from every pod to every other, probed in parallel.

use super::plan;
use super::proc::in_netns;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

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

pub fn ping(from_ns: &str, to: IpAddr) -> bool {
    Command::new("ip")
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
        .map(|o| o.status.success())
        .unwrap_or(false)
}

pub fn tcp(from_ns: &str, to: IpAddr, port: u16) -> bool {
    in_netns(from_ns, move || {
        TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(1)).is_ok()
    })
    .unwrap_or(false)
}

/// Probes every ordered pair of distinct endpoints; `result[i][j]` is from i to j.
pub fn probe(endpoints: &[Endpoint]) -> Vec<Vec<Option<Reach>>> {
    let n = endpoints.len();
    let mut out = vec![vec![None; n]; n];
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
        .collect();
    let results: Vec<((usize, usize), Reach)> = std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .chunks(pairs.len().div_ceil(8).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|&(i, j)| {
                            let (a, b) = (&endpoints[i], &endpoints[j]);
                            let r = Reach {
                                icmp: ping(&a.netns, b.ip),
                                tcp: tcp(&a.netns, b.ip, plan::ECHO_PORT),
                            };
                            ((i, j), r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for ((i, j), r) in results {
        out[i][j] = Some(r);
    }
    out
}

pub fn full(m: &[Vec<Option<Reach>>]) -> bool {
    m.iter().flatten().all(|r| r.is_none_or(|r| r.ok()))
}

/// The matrix as a table: `✓` both probes passed, `i` ICMP only, `t` TCP only, `✗` neither.
pub fn render(endpoints: &[Endpoint], m: &[Vec<Option<Reach>>]) -> String {
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
                Some(r) if r.ok() => "✓",
                Some(r) if r.icmp => "i",
                Some(r) if r.tcp => "t",
                Some(_) => "✗",
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
    let listener = std::net::TcpListener::bind(("0.0.0.0", port))?;
    for mut c in listener.incoming().flatten() {
        let _ = c.write_all(format!("{name}\n").as_bytes());
    }
    Ok(())
}
