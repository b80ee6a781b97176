//! The local status API, health probes and Prometheus metrics: a small HTTP/1.1 server (GET
//! only, one request per connection) on tokio. Paths:
//!
//! - `/metrics`: Prometheus text format (the speaker's series, and the cluster route
//!   reflector's own when it runs in that mode).
//! - `/peers`: JSON list of peers (what `margayctl bgp peers` shows). Status API only.
//! - `/routes`, `/routes?prefix=10.0.0.0/24`: JSON list of prefixes and their paths. Status
//!   API only.
//! - `/livez`, `/readyz`: the probes of the cluster route reflector mode.
//! - `/healthz`: `ok` while alive.
//!
//! The status API has no authentication and shows every route, so it is served only where
//! the configuration allows it (a loopback address); probes and metrics may listen anywhere.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use margay_bgp::wire::Prefix;
use margay_bgp::{Histogram, PeerStatus, SpeakerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Liveness, readiness and extra metrics of a daemon mode that has them.
pub trait Probes: Send + Sync + 'static {
    /// `Ok` while the daemon's loop runs.
    fn live(&self) -> Result<(), String>;
    /// `Ok` once the daemon does its job; the error says what it waits for.
    fn ready(&self) -> Result<(), String>;
    /// Prometheus text appended to the speaker's series.
    fn metrics(&self) -> String;
}

/// What one listener answers.
#[derive(Clone)]
pub struct Endpoints {
    /// Set once the speaker runs; before that only probes and the mode's metrics answer.
    speaker: Arc<OnceLock<SpeakerHandle>>,
    probes: Option<Arc<dyn Probes>>,
    /// Whether `/peers` and `/routes` are served here.
    status_api: bool,
}

impl Endpoints {
    /// The status API of a running speaker (`/peers`, `/routes`, `/metrics`, `/healthz`).
    pub fn status_api(speaker: SpeakerHandle) -> Endpoints {
        let cell = OnceLock::new();
        let _ = cell.set(speaker);
        Endpoints {
            speaker: Arc::new(cell),
            probes: None,
            status_api: true,
        }
    }

    /// Probes and metrics, plus the status API when `status_api`.
    pub fn with_probes(
        speaker: Arc<OnceLock<SpeakerHandle>>,
        probes: Arc<dyn Probes>,
        status_api: bool,
    ) -> Endpoints {
        Endpoints {
            speaker,
            probes: Some(probes),
            status_api,
        }
    }
}

pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        match listener.accept().await {
            Ok((s, from)) => {
                let e = endpoints.clone();
                tokio::spawn(async move {
                    if let Err(err) = handle(s, &e).await {
                        debug!(%from, error = %err, "status request failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "status accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn handle(mut s: TcpStream, e: &Endpoints) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut chunk))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out")
            })??;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.len() > 16 << 10 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, ctype, body) = if method != "GET" {
        (405, "text/plain", "only GET is supported\n".to_owned())
    } else {
        route(path, query, e).await
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    s.shutdown().await
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn route(path: &str, query: &str, e: &Endpoints) -> (u16, &'static str, String) {
    const JSON: &str = "application/json";
    const TEXT: &str = "text/plain";
    let probe = |r: Result<(), String>| match r {
        Ok(()) => (200, TEXT, "ok\n".to_owned()),
        Err(why) => (503, TEXT, format!("{why}\n")),
    };
    let speaker = e.speaker.get();
    let not_started = || {
        (
            503,
            TEXT,
            "the BGP speaker has not started yet\n".to_owned(),
        )
    };
    match (path, e.probes.as_deref()) {
        ("/healthz", None) => (200, TEXT, "ok\n".into()),
        ("/healthz" | "/livez", Some(p)) => probe(p.live()),
        ("/readyz", Some(p)) => probe(p.ready()),
        ("/peers", _) if e.status_api => match speaker {
            None => not_started(),
            Some(sp) => match sp.peers().await {
                Ok(p) => (200, JSON, serde_json::to_string(&p).unwrap_or_default()),
                Err(err) => (503, TEXT, format!("{err}\n")),
            },
        },
        ("/routes", _) if e.status_api => {
            let Some(sp) = speaker else {
                return not_started();
            };
            let prefix = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("prefix="))
                .map(percent_decode);
            let filter = match prefix.as_deref().map(str::parse::<Prefix>) {
                None => None,
                Some(Ok(p)) => Some(p),
                Some(Err(err)) => return (400, TEXT, format!("prefix: {err}\n")),
            };
            match sp.routes(filter).await {
                Ok(r) => (200, JSON, serde_json::to_string(&r).unwrap_or_default()),
                Err(err) => (503, TEXT, format!("{err}\n")),
            }
        }
        ("/metrics", p) => {
            let mut text = match speaker {
                Some(sp) => match sp.peers().await {
                    Ok(peers) => metrics(&peers, &sp.metrics().update_latency),
                    Err(err) => return (503, TEXT, format!("{err}\n")),
                },
                None => String::new(),
            };
            if let Some(p) = p {
                text.push_str(&p.metrics());
            }
            (200, "text/plain; version=0.0.4", text)
        }
        (_, p) => {
            let mut paths = vec!["/metrics"];
            if e.status_api {
                paths.extend(["/peers", "/routes"]);
            }
            if p.is_some() {
                paths.extend(["/livez", "/readyz"]);
            } else {
                paths.push("/healthz");
            }
            (404, TEXT, format!("try {}\n", paths.join(", ")))
        }
    }
}

fn state_number(s: margay_bgp::State) -> u8 {
    use margay_bgp::State;
    match s {
        State::Idle => 1,
        State::Connect => 2,
        State::Active => 3,
        State::OpenSent => 4,
        State::OpenConfirm => 5,
        State::Established => 6,
    }
}

/// Prometheus text exposition of the peers and the speaker metrics.
pub fn metrics(peers: &[PeerStatus], latency: &Histogram) -> String {
    let mut o = String::new();
    let family = |name: &str, kind: &str, help: &str, o: &mut String| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        "margay_bgp_session_state",
        "gauge",
        "Session state: 1 Idle, 2 Connect, 3 Active, 4 OpenSent, 5 OpenConfirm, 6 Established.",
        &mut o,
    );
    for p in peers {
        let _ = writeln!(
            o,
            "margay_bgp_session_state{{peer=\"{}\",asn=\"{}\"}} {}",
            p.address,
            p.asn,
            state_number(p.state)
        );
    }
    family(
        "margay_bgp_session_established",
        "gauge",
        "1 when the session is Established.",
        &mut o,
    );
    for p in peers {
        let _ = writeln!(
            o,
            "margay_bgp_session_established{{peer=\"{}\"}} {}",
            p.address,
            u8::from(p.state == margay_bgp::State::Established)
        );
    }
    for (name, help, sent) in [
        (
            "margay_bgp_messages_received_total",
            "BGP messages received, by type.",
            false,
        ),
        (
            "margay_bgp_messages_sent_total",
            "BGP messages sent, by type.",
            true,
        ),
    ] {
        family(name, "counter", help, &mut o);
        for p in peers {
            let c = if sent {
                &p.messages_sent
            } else {
                &p.messages_received
            };
            for (t, v) in [
                ("open", c.open),
                ("update", c.update),
                ("notification", c.notification),
                ("keepalive", c.keepalive),
                ("route_refresh", c.route_refresh),
            ] {
                let _ = writeln!(o, "{name}{{peer=\"{}\",type=\"{t}\"}} {v}", p.address);
            }
        }
    }
    family(
        "margay_bgp_prefixes_received_total",
        "counter",
        "Prefixes received in UPDATEs (announced or withdrawn).",
        &mut o,
    );
    for p in peers {
        let _ = writeln!(
            o,
            "margay_bgp_prefixes_received_total{{peer=\"{}\"}} {}",
            p.address, p.prefixes_received
        );
    }
    for (name, help, f) in [
        (
            "margay_bgp_prefixes_accepted",
            "Paths from the peer held after import policy.",
            (|p: &PeerStatus| p.prefixes_accepted) as fn(&PeerStatus) -> usize,
        ),
        (
            "margay_bgp_prefixes_advertised",
            "Prefixes advertised to the peer.",
            |p| p.prefixes_advertised,
        ),
        (
            "margay_bgp_prefixes_stale",
            "Stale paths kept for a restarting peer.",
            |p| p.prefixes_stale,
        ),
        (
            "margay_bgp_update_group_member",
            "1 while the peer shares an update group (one encoding for peers sent the same UPDATEs), 0 while on its own.",
            |p| usize::from(p.update_group.is_some()),
        ),
    ] {
        family(name, "gauge", help, &mut o);
        for p in peers {
            let _ = writeln!(o, "{name}{{peer=\"{}\"}} {}", p.address, f(p));
        }
    }
    family(
        "margay_bgp_update_groups",
        "gauge",
        "Update groups with at least one member.",
        &mut o,
    );
    let groups: std::collections::HashSet<usize> =
        peers.iter().filter_map(|p| p.update_group).collect();
    let _ = writeln!(o, "margay_bgp_update_groups {}", groups.len());
    family(
        "margay_bgp_update_processing_seconds",
        "histogram",
        "Time from decoding an UPDATE to the route table holding its routes.",
        &mut o,
    );
    for (i, b) in Histogram::BOUNDS.iter().enumerate() {
        let _ = writeln!(
            o,
            "margay_bgp_update_processing_seconds_bucket{{le=\"{b}\"}} {}",
            latency.buckets[i].load(Ordering::Relaxed)
        );
    }
    let count = latency.count.load(Ordering::Relaxed);
    let _ = writeln!(
        o,
        "margay_bgp_update_processing_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        o,
        "margay_bgp_update_processing_seconds_sum {}",
        latency.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    let _ = writeln!(o, "margay_bgp_update_processing_seconds_count {count}");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl Probes for Fake {
        fn live(&self) -> Result<(), String> {
            Ok(())
        }
        fn ready(&self) -> Result<(), String> {
            Err("waiting for the datastore sync".into())
        }
        fn metrics(&self) -> String {
            "margay_bgpd_ready 0\n".into()
        }
    }

    async fn get(e: &Endpoints, path: &str) -> (u16, String) {
        let l = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(serve(l, e.clone()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        task.abort();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (
            head.split_whitespace().nth(1).unwrap().parse().unwrap(),
            body.to_owned(),
        )
    }

    #[tokio::test]
    async fn probes_answer_before_the_speaker_and_the_status_api_only_where_allowed() {
        let cell: Arc<OnceLock<SpeakerHandle>> = Arc::default();
        let metrics_only = Endpoints::with_probes(cell.clone(), Arc::new(Fake), false);
        assert_eq!(get(&metrics_only, "/livez").await, (200, "ok\n".into()));
        assert_eq!(
            get(&metrics_only, "/readyz").await,
            (503, "waiting for the datastore sync\n".into())
        );
        assert_eq!(
            get(&metrics_only, "/metrics").await,
            (200, "margay_bgpd_ready 0\n".into())
        );
        // Routes are not for every address the metrics listen on.
        assert_eq!(get(&metrics_only, "/peers").await.0, 404);
        let status = Endpoints::with_probes(cell, Arc::new(Fake), true);
        let (code, body) = get(&status, "/peers").await;
        assert_eq!(
            (code, body.as_str()),
            (503, "the BGP speaker has not started yet\n")
        );
    }

    #[test]
    fn percent_decoding_handles_slashes() {
        assert_eq!(percent_decode("10.0.0.0%2F24"), "10.0.0.0/24");
        assert_eq!(percent_decode("10.0.0.0/24"), "10.0.0.0/24");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn metrics_text_has_one_series_per_peer_and_the_histogram() {
        let h = Histogram::default();
        h.observe(std::time::Duration::from_millis(2));
        let p: PeerStatus = serde_json::from_value(serde_json::json!({
            "address": "10.0.0.2", "asn": 65000, "description": "", "ebgp": false, "rr_client": true,
            "state": "Established", "since": 0, "last_error": null, "router_id": "10.0.0.2",
            "local_address": "10.0.0.1", "hold_time": 90, "families": ["ipv4-unicast"],
            "graceful_restart": false, "four_octet_as": true, "prefixes_received": 3, "prefixes_accepted": 2,
            "prefixes_advertised": 1, "prefixes_stale": 0, "update_group": 3,
            "messages_received": {"open":1,"update":2,"notification":0,"keepalive":3,"route_refresh":0},
            "messages_sent": {"open":1,"update":1,"notification":0,"keepalive":3,"route_refresh":0}
        }))
        .unwrap();
        let mut alone = p.clone();
        alone.address = "10.0.0.3".parse().unwrap();
        alone.update_group = None;
        let mut other = p.clone();
        other.address = "10.0.0.4".parse().unwrap();
        let t = metrics(&[p, alone, other], &h);
        assert!(t.contains("margay_bgp_update_group_member{peer=\"10.0.0.2\"} 1"));
        assert!(t.contains("margay_bgp_update_group_member{peer=\"10.0.0.3\"} 0"));
        assert!(t.contains("margay_bgp_update_groups 1\n"));
        assert!(t.contains("margay_bgp_session_state{peer=\"10.0.0.2\",asn=\"65000\"} 6"));
        assert!(
            t.contains("margay_bgp_messages_received_total{peer=\"10.0.0.2\",type=\"update\"} 2")
        );
        assert!(t.contains("margay_bgp_prefixes_accepted{peer=\"10.0.0.2\"} 2"));
        assert!(t.contains("margay_bgp_update_processing_seconds_bucket{le=\"0.005\"} 1"));
        assert!(t.contains("margay_bgp_update_processing_seconds_count 1"));
    }
}
