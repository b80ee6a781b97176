//! `margayctl bgp peers` and `margayctl bgp routes [PREFIX]`: the status API of a
//! `margay-bgpd` (or a node agent that serves the same endpoints), shown as a table
//! in the spirit of `birdc show protocols` and `calicoctl node status`, or as
//! JSON/YAML.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use margay_bgp::{PeerStatus, State};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::output::{render, table, Format};

#[derive(Subcommand, Debug)]
pub enum BgpCommand {
    /// BGP peers: state, since when, and prefix counts.
    Peers {
        /// The speaker's status address (margay-bgpd's `status.listen`).
        #[arg(long, env = "MARGAY_BGP_STATUS", default_value = "127.0.0.1:9179")]
        endpoint: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// The route table, or one prefix's paths.
    Routes {
        /// Show only this prefix (ADDRESS/LENGTH).
        prefix: Option<String>,
        #[arg(long, env = "MARGAY_BGP_STATUS", default_value = "127.0.0.1:9179")]
        endpoint: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
}

pub async fn run(cmd: &BgpCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BgpCommand::Peers { endpoint, output } => {
            let v = get(endpoint, "/peers").await?;
            let peers: Vec<PeerStatus> = serde_json::from_value(v.clone()).with_context(|| {
                format!("{endpoint}/peers answered with peers this margayctl cannot read")
            })?;
            print!("{}", render(*output, &v, || peers_table(&peers, now()))?);
        }
        BgpCommand::Routes {
            prefix,
            endpoint,
            output,
        } => {
            let path = match prefix {
                Some(p) => format!("/routes?prefix={}", p.replace('/', "%2F")),
                None => "/routes".to_owned(),
            };
            let v = get(endpoint, &path).await?;
            if prefix.is_some() && v.as_array().is_some_and(|a| a.is_empty()) {
                eprintln!(
                    "margayctl: no route for {}",
                    prefix.as_deref().unwrap_or_default()
                );
                return Ok(ExitCode::from(1));
            }
            print!("{}", render(*output, &v, || routes_table(&v))?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// GET `path` from the status API; the body as JSON.
async fn get(endpoint: &str, path: &str) -> anyhow::Result<Value> {
    let fetch = async {
        let mut s = TcpStream::connect(endpoint).await.with_context(|| {
            format!("connecting to the BGP status API at {endpoint}; is margay-bgpd running with status.listen set to it? (--endpoint / MARGAY_BGP_STATUS)")
        })?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {endpoint}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .with_context(|| format!("the BGP status API at {endpoint} did not answer in 10 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{endpoint} did not answer with HTTP"))?;
    let status = head.lines().next().unwrap_or_default();
    anyhow::ensure!(
        status.contains(" 200 "),
        "{endpoint}{path}: {status}: {}",
        body.trim()
    );
    serde_json::from_str(body).with_context(|| format!("{endpoint}{path} returned invalid JSON"))
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

/// Like `birdc show protocols`: one line per peer, with prefix counts.
pub fn peers_table(peers: &[PeerStatus], now: u64) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let kind = match (p.ebgp, p.rr_client) {
                (true, _) => "ebgp",
                (_, true) => "ibgp rr-client",
                _ => "ibgp",
            };
            let info = if p.state == State::Established {
                "Established".to_owned()
            } else {
                p.last_error.clone().unwrap_or_default()
            };
            vec![
                p.address.to_string(),
                p.asn.to_string(),
                kind.to_owned(),
                p.state.to_string(),
                duration(now.saturating_sub(p.since)),
                format!("{}/{}", p.prefixes_accepted, p.prefixes_advertised),
                info,
            ]
        })
        .collect();
    table(
        &[
            "PEER",
            "ASN",
            "TYPE",
            "STATE",
            "SINCE",
            "ACCEPTED/ADVERTISED",
            "INFO",
        ],
        &rows,
    )
}

/// One line per path; `*` marks the best path, `=` ECMP companions, `s` stale.
pub fn routes_table(v: &Value) -> String {
    let mut rows = Vec::new();
    for r in v.as_array().map(|a| a.as_slice()).unwrap_or_default() {
        let paths = r["paths"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default();
        for (i, p) in paths.iter().enumerate() {
            let mut flags = String::new();
            if p["best"] == true {
                flags.push('*');
            } else if p["multipath"] == true {
                flags.push('=');
            }
            if p["stale"] == true {
                flags.push('s');
            }
            rows.push(vec![
                if i == 0 {
                    s(&r["prefix"])
                } else {
                    String::new()
                },
                flags,
                s(&p["next_hop"]),
                s(&p["from"]),
                s(&p["as_path"]),
                s(&p["local_pref"]),
                s(&p["med"]),
                s(&p["origin"]),
                p["communities"]
                    .as_array()
                    .map(|c| c.iter().map(s).collect::<Vec<_>>().join(" "))
                    .unwrap_or_default(),
            ]);
        }
    }
    table(
        &[
            "PREFIX",
            "",
            "NEXT HOP",
            "FROM",
            "AS PATH",
            "LOCPRF",
            "MED",
            "ORIGIN",
            "COMMUNITIES",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A peer as the status API serialises it.
    #[allow(clippy::too_many_arguments)]
    fn peer(
        address: &str,
        asn: u32,
        ebgp: bool,
        rr_client: bool,
        state: &str,
        since: u64,
        last_error: Option<&str>,
        counts: (u64, u64),
    ) -> Value {
        json!({"address": address, "asn": asn, "description": "", "ebgp": ebgp,
               "rr_client": rr_client, "state": state, "since": since, "last_error": last_error,
               "router_id": null, "local_address": null, "hold_time": null, "families": [],
               "graceful_restart": false, "four_octet_as": true, "prefixes_received": 0,
               "prefixes_accepted": counts.0, "prefixes_advertised": counts.1,
               "prefixes_stale": 0,
               "messages_received": {"open": 0, "update": 0, "notification": 0, "keepalive": 0, "route_refresh": 0},
               "messages_sent": {"open": 0, "update": 0, "notification": 0, "keepalive": 0, "route_refresh": 0}})
    }

    #[test]
    fn peers_table_reads_like_birdc() {
        let v = json!([
            peer(
                "10.0.0.2",
                65000,
                false,
                true,
                "Established",
                1000,
                None,
                (12, 30)
            ),
            peer(
                "10.0.0.9",
                65100,
                true,
                false,
                "Active",
                3000,
                Some("connect: Connection refused"),
                (0, 0)
            ),
        ]);
        let peers: Vec<PeerStatus> = serde_json::from_value(v).unwrap();
        let t = peers_table(&peers, 4600);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("PEER"));
        assert!(
            lines[1].contains("10.0.0.2")
                && lines[1].contains("ibgp rr-client")
                && lines[1].contains("1h0m")
        );
        assert!(lines[1].contains("12/30") && lines[1].ends_with("Established"));
        assert!(
            lines[2].contains("ebgp")
                && lines[2].contains("26m40s")
                && lines[2].ends_with("Connection refused")
        );
        // A state the speaker does not have is refused, not shown as something else.
        let bad = json!([peer("10.0.0.3", 65000, false, false, "Up", 0, None, (0, 0))]);
        assert!(serde_json::from_value::<Vec<PeerStatus>>(bad).is_err());
    }

    #[test]
    fn routes_table_marks_best_and_stale() {
        let v = json!([{"prefix": "10.1.0.0/24", "paths": [
            {"best": true, "multipath": true, "from": "10.0.0.2", "next_hop": "10.0.0.2", "as_path": "65001",
             "origin": "IGP", "local_pref": 100, "med": null, "communities": ["65000:1"], "stale": false},
            {"best": false, "multipath": false, "from": "10.0.0.3", "next_hop": "10.0.0.3", "as_path": "65002 65001",
             "origin": "IGP", "local_pref": 100, "med": 5, "communities": [], "stale": true}
        ]}]);
        let t = routes_table(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("10.1.0.0/24  *"));
        assert!(lines[1].contains("65000:1"));
        assert!(lines[2].trim_start().starts_with('s'));
        assert!(lines[2].contains("65002 65001"));
    }
}
