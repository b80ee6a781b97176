//! Installs best routes learned from peers into a kernel routing table through the
//! workspace's single kernel-route writer (`margay-kernel`), which tags them with
//! Margay's route protocol number. Local routes are never installed.
//!
//! At start, routes of ours left in the table by a previous run are kept (they keep
//! forwarding during a graceful restart) and swept once the restart time has passed,
//! by which point everything still valid has been learned again.
//!
//! With `bgp.multipath` a best route carries every next hop of its ECMP set, and
//! [`route_through`] installs one multipath route (`RTA_MULTIPATH`, equal weights) through
//! all of them; a prefix with one usable next hop gets a plain `via` route. The kernel
//! refuses a multipath route as a whole when any of its gateways is unreachable (not on a
//! connected subnet); the prefix is then installed through its best next hop alone
//! ([`best_only`]) and the daemon warns, so turning multipath on never loses a route that
//! best-path routing would have installed.
//!
//! An IPv4 prefix may have IPv6 next hops (RFC 8950; the speaker accepts such paths only
//! from a peer with which extended next hop was negotiated). They are installed as they
//! are, `<prefix> via inet6 <gw>` (`RTA_VIA`), alone or among the next hops of a multipath
//! route; the kernel resolves the gateway by NDP on its link.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use margay_bgp::{BestRouteChange, BestRouteStream, RouteOrigin};
use margay_kernel::route::{NextHop, PathHop, Route, RouteFilter, RouteKey, WriteOp};
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

/// The gateways a best route can use for `dst`, best first, each once: the next hops of
/// its ECMP set, IPv4 or IPv6 for an IPv4 `dst` (an IPv4-mapped IPv6 next hop counts as
/// the IPv4 address; another IPv6 one becomes `via inet6`), IPv6 only for an IPv6 `dst`
/// (the kernel has no IPv6 route through an IPv4 gateway). Empty for local routes and for
/// routes with no usable next hop.
///
/// A link-local IPv6 next hop is kept, though the route then names no device and the
/// writer refuses it, saying so: the speaker reports a next hop's global address, so one
/// is link-local only when the peer sent a link-local address as the global one.
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
        (IpNet::V4(_), IpAddr::V6(v6)) => Some(v6.to_ipv4_mapped().map_or(g, IpAddr::V4)),
        (IpNet::V6(_), IpAddr::V4(_)) => None,
    }) {
        if !v.contains(&g) {
            v.push(g);
        }
    }
    v
}

/// The route to `dst` through `gateways` (best first, each once, as [`gateways`] gives
/// them), if there is one: `via` the gateway when there is one, a multipath route with
/// every gateway at weight 1 when there are more. BGP carries no bandwidth here, so the
/// paths of an ECMP set share flows equally.
pub fn route_through(dst: IpNet, table: u32, gateways: &[IpAddr]) -> Option<Route> {
    if gateways.is_empty() {
        return None;
    }
    let hops = gateways.iter().map(|&g| PathHop::via(g)).collect();
    // One hop comes back as a plain `via` route.
    Some(Route::multipath(dst, hops).in_table(table))
}

/// For a multipath route, the same route through its first (best) next hop alone: what
/// to install when the kernel refuses the whole set. `None` for any other route.
pub fn best_only(route: &Route) -> Option<Route> {
    let NextHop::Multipath(hops) = &route.next_hop else {
        return None;
    };
    let best = hops.first()?;
    let mut r = Route::multipath(route.dst, vec![best.clone()]).in_table(route.table);
    r.metric = route.metric;
    Some(r)
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
        while let Some(batch) = best.recv().await {
            let mut ops = Vec::with_capacity(batch.len());
            {
                let Ok(mut inst) = installed.lock() else {
                    return;
                };
                for c in &batch {
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
            let fallbacks: Vec<Option<Route>> = ops
                .iter()
                .map(|op| match op {
                    WriteOp::ReplaceRoute(r) => best_only(r),
                    _ => None,
                })
                .collect();
            let Some(results) = apply(&writer, ops).await else {
                return;
            };
            let retry: Vec<WriteOp> = results
                .iter()
                .zip(fallbacks)
                .filter(|(r, _)| r.is_err())
                .filter_map(|(_, f)| f.map(WriteOp::ReplaceRoute))
                .collect();
            if retry.is_empty() {
                continue;
            }
            warn!(
                count = retry.len(),
                first = %retry[0],
                "the kernel refused multipath routes (a gateway unreachable, or link-local with no device?); \
                 installing them through their best next hop only"
            );
            if apply(&writer, retry).await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

/// Applies `ops` and logs the failures; `None` when the writer is gone.
async fn apply(
    writer: &RouteWriter,
    ops: Vec<WriteOp>,
) -> Option<Vec<Result<(), margay_kernel::KernelError>>> {
    match writer.apply(ops).await {
        Ok(results) => {
            let failed: Vec<String> = results
                .iter()
                .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
                .collect();
            if !failed.is_empty() {
                warn!(count = failed.len(), first = %failed[0], "kernel route writes failed");
            }
            Some(results)
        }
        Err(e) => {
            warn!(error = %e, "kernel route writer gone; no more routes installed");
            None
        }
    }
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
                "::ffff:10.0.0.5",
            ],
        );
        let dst: IpNet = "10.1.0.0/24".parse().unwrap();
        let gws: Vec<String> = gateways(&c, dst).iter().map(|g| g.to_string()).collect();
        assert_eq!(gws, ["10.0.0.2", "2001:db8::3", "10.0.0.4", "10.0.0.5"]);
        let (_, r) = to_route(&c, 254);
        let r = r.unwrap();
        r.validate().unwrap();
        assert_eq!(
            r.to_string(),
            "10.1.0.0/24 nexthop via 10.0.0.2 weight 1 nexthop via inet6 2001:db8::3 weight 1 \
             nexthop via 10.0.0.4 weight 1 nexthop via 10.0.0.5 weight 1 table 254"
        );
        let v6 = change("2001:db8:1::/48", peer, &["10.0.0.2", "2001:db8::3"]);
        let gws = gateways(&v6, "2001:db8:1::/48".parse().unwrap());
        assert_eq!(gws, vec!["2001:db8::3".parse::<IpAddr>().unwrap()]);
        let local = change("10.1.0.0/24", RouteOrigin::Local, &["10.0.0.2"]);
        assert!(gateways(&local, dst).is_empty());
    }

    #[test]
    fn an_ipv4_prefix_with_ipv6_next_hops_is_installed_via_inet6() {
        // RFC 8950: what an IPv6-only session with extended next hop gives (interop case 11).
        let peer = RouteOrigin::Peer {
            address: "fd00::1".parse().unwrap(),
            ebgp: true,
        };
        let dst: IpNet = "10.61.0.0/24".parse().unwrap();
        let one = change("10.61.0.0/24", peer.clone(), &["fd00::1"]);
        let (key, r) = to_route(&one, 100);
        assert_eq!(key, RouteKey::new(100, dst));
        let r = r.expect("an IPv6 next hop of an IPv4 prefix is kept");
        r.validate().unwrap();
        assert_eq!(r, Route::via(dst, "fd00::1".parse().unwrap()).in_table(100));
        assert_eq!(r.to_string(), "10.61.0.0/24 via inet6 fd00::1 table 100");

        // An ECMP set of IPv6 next hops: one multipath route through all of them.
        let two = change(
            "10.61.0.0/24",
            peer.clone(),
            &["fd00::1", "fd00:1::1", "fd00::1"],
        );
        let (_, r) = to_route(&two, 254);
        let r = r.unwrap();
        r.validate().unwrap();
        assert_eq!(
            r.to_string(),
            "10.61.0.0/24 nexthop via inet6 fd00::1 weight 1 \
             nexthop via inet6 fd00:1::1 weight 1 table 254"
        );

        // A link-local next hop is kept but names no link: the writer refuses the route
        // and says why, rather than the prefix vanishing without a word.
        let ll = change("10.61.0.0/24", peer, &["fe80::1"]);
        assert_eq!(
            gateways(&ll, dst),
            vec!["fe80::1".parse::<IpAddr>().unwrap()]
        );
        let e = to_route(&ll, 254).1.unwrap().validate().unwrap_err();
        assert!(
            e.to_string()
                .contains("fe80::1 is link-local and needs a device"),
            "{e}"
        );
    }

    #[test]
    fn several_gateways_make_one_multipath_route_one_makes_a_via_route() {
        let dst: IpNet = "2001:db8:1::/48".parse().unwrap();
        let g1: IpAddr = "2001:db8::2".parse().unwrap();
        let g2: IpAddr = "2001:db8::3".parse().unwrap();
        let r = route_through(dst, 100, &[g1, g2]).unwrap();
        r.validate().unwrap();
        assert_eq!(r.table, 100);
        assert_eq!(
            r.next_hop,
            NextHop::Multipath(vec![PathHop::via(g1), PathHop::via(g2)])
        );
        assert_eq!(
            route_through(dst, 100, &[g2]).unwrap(),
            Route::via(dst, g2).in_table(100)
        );
        assert!(route_through(dst, 100, &[]).is_none());
    }

    #[test]
    fn an_ecmp_set_collapsing_to_one_usable_gateway_is_a_via_route() {
        let peer = RouteOrigin::Peer {
            address: "10.0.0.2".parse().unwrap(),
            ebgp: false,
        };
        // Two next hops, one of the wrong family and one repeated: one usable gateway.
        let c = change(
            "2001:db8:1::/48",
            peer,
            &["10.0.0.2", "2001:db8::3", "2001:db8::3"],
        );
        let (key, r) = to_route(&c, 254);
        assert_eq!(key, RouteKey::new(254, "2001:db8:1::/48".parse().unwrap()));
        assert_eq!(
            r.unwrap(),
            Route::via(
                "2001:db8:1::/48".parse().unwrap(),
                "2001:db8::3".parse().unwrap()
            )
            .in_table(254)
        );
    }

    #[test]
    fn a_refused_multipath_route_falls_back_to_its_best_next_hop() {
        let dst: IpNet = "10.1.0.0/24".parse().unwrap();
        let best: IpAddr = "10.0.0.5".parse().unwrap();
        let r = route_through(dst, 100, &[best, "10.0.0.2".parse().unwrap()])
            .unwrap()
            .with_metric(20);
        let b = best_only(&r).unwrap();
        assert_eq!(b, Route::via(dst, best).in_table(100).with_metric(20));
        assert!(
            best_only(&b).is_none(),
            "a via route has nothing to fall back to"
        );
        assert!(best_only(&Route::blackhole(dst)).is_none());
    }
}
