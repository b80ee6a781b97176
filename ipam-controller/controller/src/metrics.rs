//! Prometheus metrics in the text exposition format, served over a minimal HTTP endpoint
//! (`/metrics`, `/livez`, `/readyz`), without a web framework.

use crate::gc::GcReason;
use crate::health::Health;
use margay_ipam::audit::{self, Snapshot};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Default)]
struct State {
    /// pool name → (cidr, allocated, size, blocks).
    pools: BTreeMap<String, (String, u64, u128, usize)>,
    /// block cidr → (pool, owner, allocated, size).
    blocks: BTreeMap<String, (String, String, u64, u64)>,
    gc_actions: BTreeMap<GcReason, u64>,
    errors: BTreeMap<&'static str, u64>,
    passes: u64,
    leader: bool,
}

/// The controller's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<State>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn gc_action(&self, reason: GcReason) {
        *self.lock().gc_actions.entry(reason).or_default() += 1;
    }

    /// Counts a failed reconcile step (`what`: `gc`, `pools`).
    pub fn error(&self, what: &'static str) {
        *self.lock().errors.entry(what).or_default() += 1;
    }

    pub fn pass_done(&self) {
        self.lock().passes += 1;
    }

    pub fn set_leader(&self, leader: bool) {
        self.lock().leader = leader;
    }

    /// Per-pool and per-block utilisation from a snapshot.
    pub fn observe_snapshot(&self, snap: &Snapshot, now: u64) {
        let pools = audit::pool_usage(snap)
            .into_iter()
            .map(|p| (p.name, (p.cidr, p.allocated, p.size, p.blocks)))
            .collect();
        let blocks = audit::block_usage(snap, now)
            .into_iter()
            .map(|b| {
                (
                    b.cidr.to_string(),
                    (
                        b.pool.unwrap_or_default(),
                        b.owner.unwrap_or_default(),
                        b.allocated,
                        b.size,
                    ),
                )
            })
            .collect();
        let mut st = self.lock();
        st.pools = pools;
        st.blocks = blocks;
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let st = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# HELP margay_ipam_pool_addresses_allocated Addresses allocated in the pool.\n# TYPE margay_ipam_pool_addresses_allocated gauge");
        for (name, (cidr, alloc, _, _)) in &st.pools {
            let _ = writeln!(
                out,
                "margay_ipam_pool_addresses_allocated{{pool=\"{}\",cidr=\"{}\"}} {alloc}",
                escape(name),
                escape(cidr)
            );
        }
        let _ = writeln!(out, "# HELP margay_ipam_pool_addresses_total Addresses in the pool.\n# TYPE margay_ipam_pool_addresses_total gauge");
        for (name, (cidr, _, size, _)) in &st.pools {
            let _ = writeln!(
                out,
                "margay_ipam_pool_addresses_total{{pool=\"{}\",cidr=\"{}\"}} {size}",
                escape(name),
                escape(cidr)
            );
        }
        let _ = writeln!(out, "# HELP margay_ipam_pool_blocks Blocks made from the pool.\n# TYPE margay_ipam_pool_blocks gauge");
        for (name, (cidr, _, _, blocks)) in &st.pools {
            let _ = writeln!(
                out,
                "margay_ipam_pool_blocks{{pool=\"{}\",cidr=\"{}\"}} {blocks}",
                escape(name),
                escape(cidr)
            );
        }
        let _ = writeln!(out, "# HELP margay_ipam_block_addresses_allocated Addresses allocated in the block.\n# TYPE margay_ipam_block_addresses_allocated gauge");
        for (cidr, (pool, owner, alloc, _)) in &st.blocks {
            let _ = writeln!(
                out,
                "margay_ipam_block_addresses_allocated{{block=\"{}\",pool=\"{}\",owner=\"{}\"}} {alloc}",
                escape(cidr),
                escape(pool),
                escape(owner)
            );
        }
        let _ = writeln!(out, "# HELP margay_ipam_block_addresses_total Addresses in the block.\n# TYPE margay_ipam_block_addresses_total gauge");
        for (cidr, (pool, owner, _, size)) in &st.blocks {
            let _ = writeln!(
                out,
                "margay_ipam_block_addresses_total{{block=\"{}\",pool=\"{}\",owner=\"{}\"}} {size}",
                escape(cidr),
                escape(pool),
                escape(owner)
            );
        }
        let _ = writeln!(out, "# HELP margay_ipam_gc_actions_total Things released by the garbage collector, by reason.\n# TYPE margay_ipam_gc_actions_total counter");
        for (reason, n) in &st.gc_actions {
            let _ = writeln!(
                out,
                "margay_ipam_gc_actions_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP margay_ipam_controller_errors_total Failed reconcile steps.\n# TYPE margay_ipam_controller_errors_total counter");
        for (what, n) in &st.errors {
            let _ = writeln!(
                out,
                "margay_ipam_controller_errors_total{{step=\"{what}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP margay_ipam_controller_passes_total Completed reconcile passes.\n# TYPE margay_ipam_controller_passes_total counter\nmargay_ipam_controller_passes_total {}", st.passes);
        let _ = writeln!(out, "# HELP margay_ipam_controller_leader Whether this replica is the leader.\n# TYPE margay_ipam_controller_leader gauge\nmargay_ipam_controller_leader {}", u8::from(st.leader));
        out
    }
}

/// Serves `/metrics`, `/livez` (and its older name `/healthz`) and `/readyz` on `listener`
/// until the task is dropped. A probe that fails gets 503 with the reason as its body.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    health: std::sync::Arc<Health>,
) {
    loop {
        let mut sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // Out of descriptors and the like: say so, and do not spin.
                tracing::warn!(error = %e, "the metrics endpoint could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    // A client that sends nothing, or goes away: nothing to answer.
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let probe = |r: Result<String, String>| match r {
                Ok(body) => ("200 OK", "text/plain", format!("{body}\n")),
                Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
            };
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/healthz" | "/livez" => probe(health.live().map(|()| "ok".to_owned())),
                "/readyz" => probe(health.ready().map(str::to_owned)),
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                tracing::debug!(error = %e, path, "could not answer a request to the metrics endpoint");
            }
        });
    }
}
