//! Installs best routes learned from peers into a kernel routing table through the
//! workspace's single kernel-route writer (`margay-kernel`), which tags them with
//! Margay's route protocol number. Local routes are never installed.
//!
//! At start, routes of ours left in the table by a previous run are kept (they keep
//! forwarding during a graceful restart) and swept once the restart time has passed,
//! by which point everything still valid has been learned again.
//!
//! With `bgp.multipath` a best route carries every next hop of its ECMP set.
//! `margay-kernel`'s [`Route`] has one next hop (no `RTA_MULTIPATH` yet), so until it
//! has one, [`route_through`] installs the best of them and the daemon says so once.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use margay_bgp::{BestRouteChange, BestRouteStream, RouteOrigin};
use margay_kernel::route::{Route, RouteFilter, RouteKey, WriteOp};
use margay_kernel::RouteWriter;
use tracing::{info, warn};

use crate::config::KernelConfig;

/// The kernel route for a best-route change: `Some(route)` to install, `None` to
/// remove whatever we installed for the prefix.
pub fn to_route(c: &BestRouteChange, table: u32) -> (RouteKey, Option<Route>) {
    let dst = IpNet::new(c.prefix.addr(), c.prefix.len())
        .unwrap_or_else(|_| IpNet::from(c.prefix.addr()));
    let key = RouteKey::new(table, dst);
    let route = route_through(dst, table, &gateways(c, dst));
    (key, route)
}

/// The gateways a best route can use for `dst`, best first: the next hops of its
/// ECMP set of `dst`'s family (an IPv4-mapped IPv6 next hop counts as IPv4), each
/// once. Empty for local routes and for routes with no usable next hop.
pub fn gateways(c: &BestRouteChange, dst: IpNet) -> Vec<IpAddr> {
    let Some(b) = c.best.as_ref() else {
        return Vec::new();
    };
    if matches!(b.origin, RouteOrigin::Local) {
        return Vec::new();
    }
    let mut v = Vec::with_capacity(b.next_hops.len());
    for g in b.next_hops.iter().filter_map(|&g| match (dst, g) {
        (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_)) => Some(g),
        (IpNet::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4),
        _ => None,
    }) {
        if !v.contains(&g) {
            v.push(g);
        }
    }
    v
}

/// The route to `dst` through `gateways` (best first), if there is one.
///
/// More than one gateway should be one multipath route (`RTA_MULTIPATH`), which
/// `margay-kernel` cannot express yet: the best gateway alone is installed.
pub fn route_through(dst: IpNet, table: u32, gateways: &[IpAddr]) -> Option<Route> {
    let gw = *gateways.first()?;
    Some(Route::via(dst, gw).in_table(table))
}

pub fn start(
    k: &KernelConfig,
    mut best: BestRouteStream,
    sweep_after_secs: u64,
) -> anyhow::Result<()> {
    let (writer, _thread) = RouteWriter::spawn(k.netns.clone())?;
    let table = k.table;
    let installed: Arc<Mutex<HashSet<RouteKey>>> = Arc::default();
    {
        let writer = writer.clone();
        let installed = installed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(sweep_after_secs)).await;
            let desired = installed.lock().map(|s| s.clone()).unwrap_or_default();
            let scope = RouteFilter {
                table: Some(table),
                ..RouteFilter::margay()
            };
            match writer.sweep(scope, desired).await {
                Ok(r) => info!(
                    removed = r.removed.len(),
                    "stale kernel routes from an earlier run swept"
                ),
                Err(e) => warn!(error = %e, "kernel route sweep failed"),
            }
        });
    }
    tokio::spawn(async move {
        let mut told_ecmp = false;
        while let Some(batch) = best.recv().await {
            let mut ops = Vec::with_capacity(batch.len());
            {
                let Ok(mut inst) = installed.lock() else {
                    return;
                };
                for c in &batch {
                    if !told_ecmp && c.best.as_ref().is_some_and(|b| b.next_hops.len() > 1) {
                        told_ecmp = true;
                        warn!(
                            prefix = %c.prefix,
                            next_hops = ?c.best.as_ref().map(|b| &b.next_hops),
                            "ECMP set learned, but margay-kernel cannot install multipath routes yet: \
                             installing each prefix through its best next hop only"
                        );
                    }
                    match to_route(c, table) {
                        (key, Some(r)) => {
                            inst.insert(key);
                            ops.push(WriteOp::ReplaceRoute(r));
                        }
                        (key, None) => {
                            if inst.remove(&key) {
                                ops.push(WriteOp::DeleteRoute(key));
                            }
                        }
                    }
                }
            }
            if ops.is_empty() {
                continue;
            }
            match writer.apply(ops).await {
                Ok(results) => {
                    let failed: Vec<String> = results
                        .iter()
                        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
                        .collect();
                    if !failed.is_empty() {
                        warn!(count = failed.len(), first = %failed[0], "kernel route writes failed");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "kernel route writer gone; no more routes installed");
                    return;
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_bgp::wire::Prefix;
    use margay_bgp::{BestRoute, PathAttrs};

    fn change(prefix: &str, origin: RouteOrigin, nh: &[&str]) -> BestRouteChange {
        BestRouteChange {
            prefix: prefix.parse::<Prefix>().unwrap(),
            best: Some(BestRoute {
                next_hops: nh.iter().map(|s| s.parse().unwrap()).collect(),
                attrs: Arc::new(PathAttrs::default()),
                origin,
            }),
        }
    }

    #[test]
    fn learned_routes_become_via_routes_and_local_ones_are_skipped() {
        let peer = RouteOrigin::Peer {
            address: "10.0.0.2".parse().unwrap(),
            ebgp: true,
        };
        let (_, r) = to_route(&change("10.1.0.0/24", peer.clone(), &["10.0.0.2"]), 254);
        assert_eq!(
            r.unwrap().to_string(),
            Route::via("10.1.0.0/24".parse().unwrap(), "10.0.0.2".parse().unwrap()).to_string()
        );
        let (_, r) = to_route(&change("10.1.0.0/24", RouteOrigin::Local, &[]), 254);
        assert!(r.is_none());
        let (_, r) = to_route(
            &change("10.1.0.0/24", peer.clone(), &["::ffff:10.0.0.9"]),
            254,
        );
        assert!(r.unwrap().to_string().contains("10.0.0.9"));
        let (_, r) = to_route(&change("2001:db8::/32", peer, &["10.0.0.9"]), 254);
        assert!(r.is_none(), "an IPv4 gateway cannot carry an IPv6 route");
        let gone = BestRouteChange {
            prefix: "10.1.0.0/24".parse().unwrap(),
            best: None,
        };
        assert!(to_route(&gone, 100).1.is_none());
    }

    #[test]
    fn an_ecmp_set_gives_every_usable_gateway_best_first() {
        let peer = RouteOrigin::Peer {
            address: "10.0.0.2".parse().unwrap(),
            ebgp: true,
        };
        let c = change(
            "10.1.0.0/24",
            peer.clone(),
            &[
                "10.0.0.2",
                "2001:db8::3",
                "::ffff:10.0.0.4",
                "10.0.0.2",
                "10.0.0.5",
            ],
        );
        let dst: IpNet = "10.1.0.0/24".parse().unwrap();
        let gws: Vec<String> = gateways(&c, dst).iter().map(|g| g.to_string()).collect();
        assert_eq!(gws, ["10.0.0.2", "10.0.0.4", "10.0.0.5"]);
        // Until margay-kernel has multipath routes, the best gateway is installed.
        let (_, r) = to_route(&c, 254);
        assert!(r.unwrap().to_string().contains("via 10.0.0.2"));
        let v6 = change("2001:db8:1::/48", peer, &["10.0.0.2", "2001:db8::3"]);
        let gws = gateways(&v6, "2001:db8:1::/48".parse().unwrap());
        assert_eq!(gws, vec!["2001:db8::3".parse::<IpAddr>().unwrap()]);
        let local = change("10.1.0.0/24", RouteOrigin::Local, &["10.0.0.2"]);
        assert!(gateways(&local, dst).is_empty());
    }
}
