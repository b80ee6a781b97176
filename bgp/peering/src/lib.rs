//! A Margay cluster's BGP member, as both margay-node and margay-bgpd's cluster route
//! reflector run it: which peers a node has, which prefixes it announces, and the routes it
//! learned, from the cluster's resources. The decisions are pure functions; [`BgpDriver`]
//! applies them to the embedded speaker without resetting sessions that did not change.
//!
//! Peers, as Calico chooses them:
//! - the node-to-node mesh (BGPConfiguration `nodeToNodeMeshEnabled`): every other node with an
//!   address;
//! - each BGPPeer that selects this node (`node`, `nodeSelector`, or neither: every node): its
//!   `peerIP`, or every node its `peerSelector` matches (route reflectors);
//! - a node with `routeReflectorClusterID` reflects for the Margay nodes it peers with that are
//!   not reflectors themselves.

use ipnet::IpNet;
use margay_api::selector::Selector;
use margay_api::{
    parse_duration, parse_peer_ip, BGPConfiguration, BGPPeer, IPPool, NextHopMode as ApiNextHop,
    Node, SourceAddress, DEFAULT_AS_NUMBER,
};
use margay_bgp::wire::Prefix;
use margay_bgp::{NextHopMode, PathAttrs, PeerConfig, SpeakerHandle};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// A prefix this node learned (over BGP, or from the datastore when BGP is off), with the
/// address of the node or router that serves it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteRoute {
    pub prefix: IpNet,
    pub next_hop: IpAddr,
}

/// The large community this node tags its own announcements with: (node AS, 77, the node's
/// IPv4 address). Routers outside the cluster (BGPPeers with a `peerIP`) are sent only routes
/// carrying it, so a ToR learns each block from the node that owns it, not from every node that
/// heard it over the mesh; the tag is removed on the way out.
pub fn origin_tag(asn: u32, router_id: std::net::Ipv4Addr) -> margay_bgp::wire::LargeCommunity {
    margay_bgp::wire::LargeCommunity {
        global_admin: asn,
        local_data1: 77,
        local_data2: u32::from(router_id),
    }
}

/// Export policy towards routers outside the cluster: only this node's own routes.
fn own_routes_only(tag: margay_bgp::wire::LargeCommunity) -> margay_bgp::Policy {
    use margay_bgp::rib::policy::{Match, Rule, Set, Verdict};
    margay_bgp::Policy {
        rules: vec![Rule {
            matches: Match {
                large_communities: vec![tag],
                ..Default::default()
            },
            set: Set {
                remove_large_communities: vec![tag],
                ..Default::default()
            },
            action: Verdict::Accept,
        }],
        default: Verdict::Reject,
    }
}

/// What the peer selection reads.
pub struct PeerInputs<'a> {
    pub me: &'a str,
    /// This node's address as the agent detected it (not as the datastore last echoed it, so
    /// peers never flap while the Node object catches up).
    pub my_ip: Option<IpAddr>,
    /// This node's IPv6 address, when it has one: the next hop of the IPv6 routes it
    /// announces (over IPv4 sessions too), and the source of sessions to IPv6 peers.
    pub my_ip6: Option<IpAddr>,
    pub my_labels: &'a BTreeMap<String, String>,
    pub nodes: &'a [Node],
    pub config: Option<&'a BGPConfiguration>,
    pub peers: &'a [BGPPeer],
    /// Secret values by (secret name, key), for `password.secretKeyRef`.
    pub secrets: &'a BTreeMap<(String, String), String>,
}

/// Every (secret, key) the BGP resources refer to.
pub fn secret_refs(
    config: Option<&BGPConfiguration>,
    peers: &[BGPPeer],
) -> BTreeSet<(String, String)> {
    config
        .and_then(|c| c.spec.node_mesh_password.as_ref())
        .into_iter()
        .chain(peers.iter().filter_map(|p| p.spec.password.as_ref()))
        .map(|p| (p.secret_key_ref.name.clone(), p.secret_key_ref.key.clone()))
        .collect()
}

/// The password a `secretKeyRef` names: `Ok(None)` without one, `Err` when it cannot be read
/// (the peer is then left out rather than tried without its password).
fn password(
    p: Option<&margay_api::BGPPassword>,
    secrets: &BTreeMap<(String, String), String>,
) -> Result<Option<String>, String> {
    let Some(p) = p else { return Ok(None) };
    let r = &p.secret_key_ref;
    secrets
        .get(&(r.name.clone(), r.key.clone()))
        .cloned()
        .map(Some)
        .ok_or_else(|| format!("secret {}/{} is not available", r.name, r.key))
}

/// The AS of `n`: its own, else the cluster's, else 64512.
pub fn node_as(n: Option<&Node>, config: Option<&BGPConfiguration>) -> u32 {
    n.and_then(|n| n.spec.bgp.as_ref()?.as_number)
        .or_else(|| config.and_then(|c| c.spec.as_number))
        .unwrap_or(DEFAULT_AS_NUMBER)
}

fn is_reflector(n: &Node) -> bool {
    n.spec
        .bgp
        .as_ref()
        .is_some_and(|b| b.route_reflector_cluster_id.is_some())
}

fn labels(n: &Node) -> BTreeMap<String, String> {
    n.metadata.labels.clone().unwrap_or_default()
}

fn selects(sel: &str, labels: &BTreeMap<String, String>) -> bool {
    Selector::parse(sel)
        .map(|s| s.matches(labels))
        .unwrap_or(false)
}

/// The peers this node should have, by address.
pub fn desired_peers(i: &PeerInputs<'_>) -> BTreeMap<IpAddr, PeerConfig> {
    let me = i
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(i.me));
    let my_as = node_as(me, i.config);
    let my_ip = i.my_ip.or_else(|| me.and_then(|n| n.address(false)));
    let i_reflect = me.is_some_and(is_reflector);
    let mut out: BTreeMap<IpAddr, PeerConfig> = BTreeMap::new();
    let add_node = |n: &Node, from: &BGPPeer, out: &mut BTreeMap<IpAddr, PeerConfig>| {
        let Some(ip) = n.address(false) else { return };
        if Some(ip) == my_ip {
            return;
        }
        let mut p = PeerConfig::new(ip, node_as(Some(n), i.config));
        p.description = n.metadata.name.clone().unwrap_or_default();
        match password(from.spec.password.as_ref(), i.secrets) {
            Ok(pw) => p.md5_password = pw,
            Err(why) => {
                tracing::warn!(peer = %ip, "{why}: peer left out");
                return;
            }
        }
        apply_peer_spec(&mut p, from, my_ip, i.my_ip6);
        p.rr_client = i_reflect && !is_reflector(n) && p.asn == my_as;
        out.insert(ip, p);
    };
    let mesh = i.config.is_none_or(|c| c.spec.mesh_enabled());
    if mesh {
        let mut empty = BGPPeer::new("mesh", Default::default());
        empty.spec.password = i.config.and_then(|c| c.spec.node_mesh_password.clone());
        for n in i.nodes {
            if n.metadata.name.as_deref() != Some(i.me) {
                add_node(n, &empty, &mut out);
            }
        }
    }
    for bp in i.peers {
        let s = &bp.spec;
        let mine = match (&s.node, &s.node_selector) {
            (Some(n), _) => n == i.me,
            (None, Some(sel)) => selects(sel, i.my_labels),
            (None, None) => true,
        };
        if !mine {
            continue;
        }
        if let Some(peer_ip) = &s.peer_ip {
            let Some((ip, port)) = parse_peer_ip(peer_ip) else {
                continue;
            };
            let mut p = PeerConfig::new(ip, s.as_number.unwrap_or(my_as));
            p.description = bp.metadata.name.clone().unwrap_or_default();
            if let Some(port) = port {
                p.port = port;
            }
            match password(s.password.as_ref(), i.secrets) {
                Ok(pw) => p.md5_password = pw,
                Err(why) => {
                    tracing::warn!(peer = %ip, "{why}: peer left out");
                    continue;
                }
            }
            apply_peer_spec(&mut p, bp, my_ip, i.my_ip6);
            if let Some(std::net::IpAddr::V4(rid)) = my_ip {
                p.export = own_routes_only(origin_tag(my_as, rid));
            }
            out.insert(ip, p);
        } else if let Some(sel) = &s.peer_selector {
            for n in i.nodes {
                if n.metadata.name.as_deref() != Some(i.me) && selects(sel, &labels(n)) {
                    add_node(n, bp, &mut out);
                }
            }
        }
    }
    out
}

/// [`desired_peers`] plus the sessions BGPPeers configure from the other end, as Calico reads a
/// BGPPeer with a `peerSelector`: both ends peer. Every BGPPeer whose `peerSelector` selects this
/// node also makes it peer with the nodes the BGPPeer applies to (its `node`, its
/// `nodeSelector`, or every node). One BGPPeer `nodeSelector: "!has(margay.io/route-reflector)"`,
/// `peerSelector: "has(margay.io/route-reflector)"` so gives the reflectors their clients too.
///
/// Each reverse session is computed by [`desired_peers`] itself, from the BGPPeer mirrored onto
/// this node (same password, keepalive, next-hop and source settings); where both directions
/// configure a session, the forward one is kept.
pub fn desired_peers_both_ways(i: &PeerInputs<'_>) -> BTreeMap<IpAddr, PeerConfig> {
    let mut out = desired_peers(i);
    // The mesh is already in the forward set; the mirrored computations add only BGPPeers.
    let mut no_mesh = i
        .config
        .cloned()
        .unwrap_or_else(|| BGPConfiguration::new("default", Default::default()));
    no_mesh.spec.node_to_node_mesh_enabled = Some(false);
    for bp in i.peers {
        let s = &bp.spec;
        let Some(sel) = s.peer_selector.as_deref() else {
            continue;
        };
        if s.peer_ip.is_some() || !selects(sel, i.my_labels) {
            continue;
        }
        let mut mirror = bp.clone();
        mirror.spec.node = Some(i.me.to_owned());
        mirror.spec.node_selector = None;
        mirror.spec.peer_selector = Some(s.node_selector.clone().unwrap_or_else(|| "all()".into()));
        let nodes: Vec<Node> = match &s.node {
            Some(only) => i
                .nodes
                .iter()
                .filter(|n| {
                    let name = n.metadata.name.as_deref();
                    name == Some(only.as_str()) || name == Some(i.me)
                })
                .cloned()
                .collect(),
            None => i.nodes.to_vec(),
        };
        let reverse = desired_peers(&PeerInputs {
            nodes: &nodes,
            config: Some(&no_mesh),
            peers: std::slice::from_ref(&mirror),
            ..*i
        });
        for (ip, p) in reverse {
            out.entry(ip).or_insert(p);
        }
    }
    out
}

/// The BGPConfiguration that applies to `node`: the cluster's (`default`) with the per-node one's
/// (`node.<name>`) AS, listen port and log level taking precedence.
pub fn effective_config(
    global: Option<BGPConfiguration>,
    per_node: Option<BGPConfiguration>,
) -> Option<BGPConfiguration> {
    match (global, per_node) {
        (Some(mut g), Some(n)) => {
            let (gs, ns) = (&mut g.spec, n.spec);
            gs.as_number = ns.as_number.or(gs.as_number);
            gs.listen_port = ns.listen_port.or(gs.listen_port);
            gs.log_severity_screen = ns.log_severity_screen.or(gs.log_severity_screen);
            Some(g)
        }
        (g, n) => g.or(n),
    }
}

fn apply_peer_spec(
    p: &mut PeerConfig,
    bp: &BGPPeer,
    my_ip: Option<IpAddr>,
    my_ip6: Option<IpAddr>,
) {
    let s = &bp.spec;
    if let Some(k) = s.keepalive_time.as_deref().and_then(parse_duration) {
        p.hold_time = if k.is_zero() {
            0
        } else {
            (k.as_secs() * 3).min(65535) as u16
        };
    }
    p.next_hop = match s.next_hop_mode.unwrap_or_default() {
        ApiNextHop::Auto => NextHopMode::Auto,
        ApiNextHop::SelfAddress => NextHopMode::SelfAddr,
        ApiNextHop::Keep => NextHopMode::Keep,
    };
    if s.source_address.unwrap_or_default() == SourceAddress::UseNodeIP {
        p.local_address = [my_ip, my_ip6]
            .into_iter()
            .flatten()
            .find(|ip| ip.is_ipv4() == p.address.is_ipv4());
    }
    if let Some(IpAddr::V6(a)) = my_ip6 {
        p.next_hop_v6 = Some(a);
    }
    p.ttl_security = s.ttl_security;
    p.max_prefixes = s.max_prefixes;
    // How long this peer keeps our routes while we restart (validation caps it at 4095 s).
    p.restart_time = s
        .max_restart_time
        .as_deref()
        .and_then(parse_duration)
        .map(|d| d.as_secs().min(4095) as u16);
}

/// What this node announces: its confirmed blocks in pools that allow BGP export, and the
/// addresses its pods borrowed from other nodes' blocks, as host routes.
pub fn announcements(
    local_blocks: &[IpNet],
    borrowed: &[IpAddr],
    pools: &[IPPool],
) -> BTreeSet<IpNet> {
    let exported =
        |net: &IpNet| margay_api::pool_of(pools, net).is_none_or(|p| !p.spec.disable_bgp_export);
    local_blocks
        .iter()
        .copied()
        .chain(borrowed.iter().map(|ip| IpNet::from(*ip)))
        .filter(exported)
        .collect()
}

/// The communities a prefix is announced with, from the BGPConfiguration: every
/// `prefixAdvertisements` entry whose CIDR contains the prefix (or equals it) adds its
/// communities, named ones looked up in `communities`. `aa:nn` values are RFC 1997 communities,
/// `aa:nn:mm` large ones (RFC 8092).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdvertisedCommunities {
    pub standard: Vec<margay_bgp::wire::Community>,
    pub large: Vec<margay_bgp::wire::LargeCommunity>,
}

pub fn communities_for(net: &IpNet, config: Option<&BGPConfiguration>) -> AdvertisedCommunities {
    let mut out = AdvertisedCommunities::default();
    let Some(spec) = config.map(|c| &c.spec) else {
        return out;
    };
    for adv in &spec.prefix_advertisements {
        let Ok(cidr) = adv.cidr.parse::<IpNet>() else {
            continue;
        };
        if !cidr.contains(net) {
            continue;
        }
        for c in &adv.communities {
            let value = spec
                .communities
                .iter()
                .find(|d| &d.name == c)
                .map(|d| d.value.as_str())
                .unwrap_or(c);
            let parts: Vec<&str> = value.split(':').collect();
            match parts.as_slice() {
                [a, n] => {
                    if let (Ok(a), Ok(n)) = (a.parse::<u16>(), n.parse::<u16>()) {
                        let v = margay_bgp::wire::Community((u32::from(a) << 16) | u32::from(n));
                        if !out.standard.contains(&v) {
                            out.standard.push(v);
                        }
                    }
                }
                [g, d1, d2] => {
                    if let (Ok(g), Ok(d1), Ok(d2)) = (g.parse(), d1.parse(), d2.parse()) {
                        let v = margay_bgp::wire::LargeCommunity {
                            global_admin: g,
                            local_data1: d1,
                            local_data2: d2,
                        };
                        if !out.large.contains(&v) {
                            out.large.push(v);
                        }
                    }
                }
                // Validation refuses anything else.
                _ => {}
            }
        }
    }
    out
}

fn prefix_of(net: &IpNet) -> Option<Prefix> {
    Prefix::new_masked(net.addr(), net.prefix_len()).ok()
}

/// The sessions as a Node's status reports them, by peer address: state, when it last changed
/// (RFC 3339), prefixes accepted and advertised.
pub fn peer_states(peers: &[margay_bgp::PeerStatus]) -> Vec<margay_api::BGPPeerState> {
    let mut out: Vec<margay_api::BGPPeerState> = peers
        .iter()
        .map(|p| margay_api::BGPPeerState {
            peer_ip: p.address.to_string(),
            state: p.state.to_string(),
            since: (p.since > 0).then(|| margay_api::time::rfc3339(p.since)),
            prefixes_received: p.prefixes_accepted as u64,
            prefixes_advertised: p.prefixes_advertised as u64,
        })
        .collect();
    out.sort_by(|a, b| a.peer_ip.cmp(&b.peer_ip));
    out
}

/// Applies desired peers and announcements to the speaker, changing only what differs. What
/// the speaker refused is not recorded as done, so the next sync tries it again; every call's
/// outcome is returned.
pub struct BgpDriver {
    pub handle: SpeakerHandle,
    /// Attached to every announcement (see [`origin_tag`]).
    tag: Option<margay_bgp::wire::LargeCommunity>,
    peers: BTreeMap<IpAddr, PeerConfig>,
    /// What the speaker accepted, with the communities it was announced with.
    announced: BTreeMap<IpNet, AdvertisedCommunities>,
    /// Best routes learned from peers: prefix → first next hop.
    learned: BTreeMap<IpNet, IpAddr>,
    /// Routes carried over from a speaker that stopped, kept until the new one learns them
    /// again or the deadline passes (the restart time), so that a restart does not pull the
    /// kernel's routes.
    stale: BTreeMap<IpNet, IpAddr>,
    stale_until: Option<std::time::Instant>,
}

/// What went wrong in one sync with the speaker.
#[derive(Debug, Default)]
pub struct SyncProblems {
    /// The speaker has stopped: it must be started again.
    pub stopped: bool,
    pub errors: Vec<String>,
}

impl SyncProblems {
    pub fn add(&mut self, what: String, e: margay_bgp::SpeakerError) {
        if matches!(e, margay_bgp::SpeakerError::Stopped) {
            self.stopped = true;
        }
        self.errors.push(format!("{what}: {e}"));
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// One line for logs and readiness.
    pub fn summary(&self) -> String {
        let mut s = self
            .errors
            .iter()
            .take(3)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if self.errors.len() > 3 {
            s.push_str(&format!(" (and {} more)", self.errors.len() - 3));
        }
        s
    }
}

impl BgpDriver {
    pub fn new(handle: SpeakerHandle, tag: Option<margay_bgp::wire::LargeCommunity>) -> BgpDriver {
        BgpDriver {
            handle,
            tag,
            peers: BTreeMap::new(),
            announced: BTreeMap::new(),
            learned: BTreeMap::new(),
            stale: BTreeMap::new(),
            stale_until: None,
        }
    }

    /// A driver for a restarted speaker: what the stopped one had learned is kept (as stale)
    /// for `keep`, and dropped then unless learned again.
    pub fn restarted(
        handle: SpeakerHandle,
        tag: Option<margay_bgp::wire::LargeCommunity>,
        old: BgpDriver,
        keep: std::time::Duration,
    ) -> BgpDriver {
        let mut d = BgpDriver::new(handle, tag);
        d.stale = old.learned;
        d.stale.extend(old.stale);
        d.stale_until = Some(std::time::Instant::now() + keep);
        d
    }

    pub async fn set_peers(&mut self, want: BTreeMap<IpAddr, PeerConfig>, out: &mut SyncProblems) {
        let gone: Vec<IpAddr> = self
            .peers
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        for a in gone {
            match self.handle.remove_peer(a).await {
                // Gone either way.
                Ok(()) | Err(margay_bgp::SpeakerError::NoSuchPeer(_)) => {
                    self.peers.remove(&a);
                }
                // Kept: removed again next time.
                Err(e) => out.add(format!("removing peer {a}"), e),
            }
        }
        for (a, p) in want {
            // Where this record and the speaker disagree on whether the peer exists, the
            // other call brings the speaker to `p` all the same.
            let result = match self.peers.get(&a) {
                None => match self.handle.add_peer(p.clone()).await {
                    Err(margay_bgp::SpeakerError::PeerExists(_)) => {
                        self.handle.update_peer(p.clone()).await
                    }
                    r => r,
                },
                Some(old) if *old != p => match self.handle.update_peer(p.clone()).await {
                    Err(margay_bgp::SpeakerError::NoSuchPeer(_)) => {
                        self.handle.add_peer(p.clone()).await
                    }
                    r => r,
                },
                Some(_) => continue,
            };
            match result {
                Ok(()) => {
                    self.peers.insert(a, p);
                }
                Err(e) => out.add(format!("configuring peer {a}"), e),
            }
        }
    }

    /// Announces `want` (each prefix with its communities) and withdraws the rest.
    pub fn set_announcements(
        &mut self,
        want: BTreeMap<IpNet, AdvertisedCommunities>,
        out: &mut SyncProblems,
    ) {
        let gone: Vec<IpNet> = self
            .announced
            .keys()
            .filter(|n| !want.contains_key(n))
            .copied()
            .collect();
        for net in gone {
            let Some(p) = prefix_of(&net) else {
                self.announced.remove(&net);
                continue;
            };
            match self.handle.withdraw(p) {
                Ok(()) => {
                    self.announced.remove(&net);
                }
                Err(e) => out.add(format!("withdrawing {net}"), e),
            }
        }
        for (net, comms) in want {
            if self.announced.get(&net) == Some(&comms) {
                continue;
            }
            let Some(p) = prefix_of(&net) else {
                out.errors
                    .push(format!("{net} cannot be announced: not a BGP prefix"));
                continue;
            };
            let attrs = PathAttrs {
                communities: comms.standard.clone(),
                large_communities: self.tag.into_iter().chain(comms.large.clone()).collect(),
                ..Default::default()
            };
            match self.handle.announce(p, attrs) {
                Ok(()) => {
                    self.announced.insert(net, comms);
                }
                Err(e) => out.add(format!("announcing {net}"), e),
            }
        }
    }

    /// Applies a batch of best-route changes; routes the speaker originated are not learned.
    pub fn learn(&mut self, changes: Vec<margay_bgp::BestRouteChange>) {
        for c in changes {
            let Ok(net) = IpNet::new(c.prefix.addr(), c.prefix.len()) else {
                continue;
            };
            self.stale.remove(&net);
            match c.best {
                Some(b) if !matches!(b.origin, margay_bgp::RouteOrigin::Local) => {
                    if let Some(nh) = b.next_hops.first() {
                        self.learned.insert(net, *nh);
                    }
                }
                _ => {
                    self.learned.remove(&net);
                }
            }
        }
    }

    /// The learned routes, with those kept from a stopped speaker until their deadline.
    pub fn remote_routes(&mut self) -> Vec<RemoteRoute> {
        if self
            .stale_until
            .is_some_and(|t| std::time::Instant::now() >= t)
        {
            self.stale.clear();
            self.stale_until = None;
        }
        self.stale
            .iter()
            .filter(|(p, _)| !self.learned.contains_key(p))
            .chain(self.learned.iter())
            .map(|(prefix, next_hop)| RemoteRoute {
                prefix: *prefix,
                next_hop: *next_hop,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_api::{BGPConfigurationSpec, BGPPeerSpec, NodeBGPSpec, NodeSpec};

    fn node(name: &str, ip: &str, labels: &[(&str, &str)], rr: bool) -> Node {
        let mut n = Node::new(
            name,
            NodeSpec {
                bgp: Some(NodeBGPSpec {
                    ipv4_address: Some(format!("{ip}/24")),
                    route_reflector_cluster_id: rr.then(|| "224.0.0.1".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        n.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        n
    }

    fn config(mesh: bool) -> BGPConfiguration {
        BGPConfiguration::new(
            "default",
            BGPConfigurationSpec {
                as_number: Some(64512),
                node_to_node_mesh_enabled: Some(mesh),
                ..Default::default()
            },
        )
    }

    fn peers_of(
        me: &str,
        nodes: &[Node],
        config: &BGPConfiguration,
        peers: &[BGPPeer],
    ) -> Vec<(String, bool)> {
        let my_labels = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(me))
            .map(labels)
            .unwrap_or_default();
        desired_peers(&PeerInputs {
            me,
            my_ip: None,
            my_ip6: None,
            secrets: &BTreeMap::new(),
            my_labels: &my_labels,
            nodes,
            config: Some(config),
            peers,
        })
        .values()
        .map(|p| (format!("{}@{}", p.address, p.asn), p.rr_client))
        .collect()
    }

    #[test]
    fn the_mesh_peers_every_other_node() {
        let nodes = [
            node("a", "10.0.0.1", &[], false),
            node("b", "10.0.0.2", &[], false),
            node("c", "10.0.0.3", &[], false),
        ];
        assert_eq!(
            peers_of("a", &nodes, &config(true), &[]),
            vec![
                ("10.0.0.2@64512".into(), false),
                ("10.0.0.3@64512".into(), false)
            ]
        );
        assert!(peers_of("a", &nodes, &config(false), &[]).is_empty());
    }

    #[test]
    fn route_reflectors_are_wired_by_selectors() {
        let nodes = [
            node("rr", "10.0.0.1", &[("rr", "yes")], true),
            node("b", "10.0.0.2", &[], false),
            node("c", "10.0.0.3", &[], false),
        ];
        let to_rr = BGPPeer::new(
            "to-rr",
            BGPPeerSpec {
                node_selector: Some("!has(rr)".into()),
                peer_selector: Some("has(rr)".into()),
                ..Default::default()
            },
        );
        let rr_side = BGPPeer::new(
            "rr-clients",
            BGPPeerSpec {
                node_selector: Some("has(rr)".into()),
                peer_selector: Some("!has(rr)".into()),
                ..Default::default()
            },
        );
        let peers = [to_rr, rr_side];
        assert_eq!(
            peers_of("b", &nodes, &config(false), &peers),
            vec![("10.0.0.1@64512".into(), false)]
        );
        // The reflector treats the ordinary nodes as its clients.
        assert_eq!(
            peers_of("rr", &nodes, &config(false), &peers),
            vec![
                ("10.0.0.2@64512".into(), true),
                ("10.0.0.3@64512".into(), true)
            ]
        );
    }

    #[test]
    fn tor_peers_follow_node_selectors_and_carry_their_settings() {
        let nodes = [
            node("a", "10.0.1.1", &[("rack", "r1")], false),
            node("b", "10.0.2.1", &[("rack", "r2")], false),
        ];
        let tor = BGPPeer::new(
            "tor-r1",
            BGPPeerSpec {
                node_selector: Some("rack == 'r1'".into()),
                peer_ip: Some("10.0.1.254:1179".into()),
                as_number: Some(65001),
                keepalive_time: Some("10s".into()),
                max_prefixes: Some(100),
                max_restart_time: Some("5m".into()),
                ..Default::default()
            },
        );
        let my_labels = labels(&nodes[0]);
        let cfg = config(false);
        let got = desired_peers(&PeerInputs {
            me: "a",
            my_ip: None,
            my_ip6: None,
            secrets: &BTreeMap::new(),
            my_labels: &my_labels,
            nodes: &nodes,
            config: Some(&cfg),
            peers: std::slice::from_ref(&tor),
        });
        let p = &got[&"10.0.1.254".parse::<IpAddr>().unwrap()];
        assert_eq!(
            (p.asn, p.port, p.hold_time, p.max_prefixes, p.restart_time),
            (65001, 1179, 30, Some(100), Some(300))
        );
        // maxRestartTime is the restart time this peer is told in our OPEN.
        let mut speaker = margay_bgp::SpeakerConfig::new(64512, "10.0.1.1".parse().unwrap());
        speaker.graceful_restart = Some(margay_bgp::GracefulRestartConfig {
            restart_time: 120,
            forwarding_preserved: true,
        });
        let told: Vec<u16> = p
            .fsm_config(&speaker)
            .capabilities
            .iter()
            .filter_map(|c| match c {
                margay_bgp::wire::Capability::GracefulRestart(g) => Some(g.restart_time),
                _ => None,
            })
            .collect();
        assert_eq!(told, vec![300]);
        assert_eq!(p.local_address, Some("10.0.1.1".parse().unwrap()));
        assert!(peers_of("b", &nodes, &cfg, &[tor]).is_empty());
    }

    #[test]
    fn passwords_come_from_secrets_and_a_missing_one_leaves_the_peer_out() {
        use margay_api::{BGPPassword, SecretKeyRef};
        let nodes = [node("a", "10.0.1.1", &[], false)];
        let pw = |name: &str| {
            Some(BGPPassword {
                secret_key_ref: SecretKeyRef {
                    name: name.into(),
                    key: "tor".into(),
                },
            })
        };
        let peers = [
            BGPPeer::new(
                "t1",
                BGPPeerSpec {
                    peer_ip: Some("10.0.1.254".into()),
                    as_number: Some(65001),
                    password: pw("bgp"),
                    ..Default::default()
                },
            ),
            BGPPeer::new(
                "t2",
                BGPPeerSpec {
                    peer_ip: Some("10.0.1.253".into()),
                    as_number: Some(65001),
                    password: pw("absent"),
                    ..Default::default()
                },
            ),
        ];
        let cfg = config(false);
        assert_eq!(secret_refs(Some(&cfg), &peers).len(), 2);
        let secrets =
            BTreeMap::from([(("bgp".to_string(), "tor".to_string()), "s3cret".to_string())]);
        let labels = BTreeMap::new();
        let got = desired_peers(&PeerInputs {
            me: "a",
            my_ip: None,
            my_ip6: None,
            my_labels: &labels,
            nodes: &nodes,
            config: Some(&cfg),
            peers: &peers,
            secrets: &secrets,
        });
        assert_eq!(got.len(), 1);
        assert_eq!(
            got.values().next().unwrap().md5_password.as_deref(),
            Some("s3cret")
        );
    }

    #[test]
    fn announcements_honour_disable_bgp_export_and_include_borrowed_addresses() {
        use margay_api::{IPPool, IPPoolSpec};
        let pools = [
            IPPool::new(
                "a",
                IPPoolSpec {
                    cidr: "10.244.0.0/16".into(),
                    ..Default::default()
                },
            ),
            IPPool::new(
                "b",
                IPPoolSpec {
                    cidr: "10.245.0.0/16".into(),
                    disable_bgp_export: true,
                    ..Default::default()
                },
            ),
        ];
        let got = announcements(
            &[
                "10.244.1.0/26".parse().unwrap(),
                "10.245.1.0/26".parse().unwrap(),
            ],
            &["10.244.9.7".parse().unwrap()],
            &pools,
        );
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(got, vec!["10.244.1.0/26", "10.244.9.7/32"]);
    }

    #[test]
    fn prefix_advertisements_add_communities_to_the_prefixes_within_them() {
        use margay_api::{BGPConfigurationSpec, Community, PrefixAdvertisement};
        let config = BGPConfiguration::new(
            "default",
            BGPConfigurationSpec {
                communities: vec![Community {
                    name: "pods".into(),
                    value: "65001:100".into(),
                }],
                prefix_advertisements: vec![
                    PrefixAdvertisement {
                        cidr: "10.244.0.0/16".into(),
                        communities: vec!["pods".into(), "65001:200:300".into()],
                    },
                    PrefixAdvertisement {
                        cidr: "10.244.1.0/26".into(),
                        communities: vec!["65001:7".into(), "65001:100".into()],
                    },
                ],
                ..Default::default()
            },
        );
        let block: IpNet = "10.244.1.0/26".parse().unwrap();
        let got = communities_for(&block, Some(&config));
        assert_eq!(
            got.standard,
            vec![
                margay_bgp::wire::Community((65001 << 16) | 100),
                margay_bgp::wire::Community((65001 << 16) | 7),
            ],
            "both entries apply, each community once"
        );
        assert_eq!(
            got.large,
            vec![margay_bgp::wire::LargeCommunity {
                global_admin: 65001,
                local_data1: 200,
                local_data2: 300
            }]
        );
        let elsewhere: IpNet = "10.245.0.0/26".parse().unwrap();
        assert_eq!(
            communities_for(&elsewhere, Some(&config)),
            AdvertisedCommunities::default()
        );
        assert_eq!(
            communities_for(&block, None),
            AdvertisedCommunities::default()
        );
    }

    /// What the speaker refuses is reported, not recorded as done: once it has stopped, a
    /// new announcement comes back as "stopped" and stays pending for the restarted speaker,
    /// and the best-route stream ends.
    #[tokio::test]
    async fn a_stopped_speaker_is_reported_and_nothing_is_recorded_as_done() {
        let cfg = margay_bgp::SpeakerConfig::new(64512, "192.0.2.1".parse().unwrap());
        let (handle, mut best) = margay_bgp::Speaker::start(cfg).await.unwrap();
        let mut d = BgpDriver::new(handle.clone(), None);
        let a: IpNet = "10.244.1.0/26".parse().unwrap();
        let b: IpNet = "10.244.2.0/26".parse().unwrap();
        let mut problems = SyncProblems::default();
        d.set_announcements(
            [(a, AdvertisedCommunities::default())]
                .into_iter()
                .collect(),
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert!(d.announced.contains_key(&a));

        handle.stop("test").await.unwrap();
        let mut problems = SyncProblems::default();
        d.set_announcements(
            [(b, AdvertisedCommunities::default())]
                .into_iter()
                .collect(),
            &mut problems,
        );
        assert!(problems.stopped, "{problems:?}");
        assert!(
            problems.summary().contains("10.244.2.0/26"),
            "{}",
            problems.summary()
        );
        assert!(!d.announced.contains_key(&b), "not recorded: retried later");
        let mut problems = SyncProblems::default();
        d.set_announcements(BTreeMap::new(), &mut problems);
        assert!(problems.stopped);
        assert!(
            d.announced.contains_key(&a),
            "a withdrawal that failed keeps the prefix, to withdraw it again"
        );
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while best.recv().await.is_some() {}
        })
        .await;
        assert!(ended.is_ok(), "the best-route stream ends with the speaker");
    }

    /// Where the driver's record and the speaker disagree (a peer the speaker has and the
    /// record lacks, or the reverse), a sync still brings the speaker where it should be,
    /// without an error that would hold readiness down for ever.
    #[tokio::test]
    async fn peers_the_record_and_the_speaker_disagree_on_are_put_right() {
        let cfg = margay_bgp::SpeakerConfig::new(64512, "192.0.2.1".parse().unwrap());
        let (handle, _best) = margay_bgp::Speaker::start(cfg).await.unwrap();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let mut p = PeerConfig::new(a, 64513);
        p.shutdown = true;
        handle.add_peer(p.clone()).await.unwrap();
        let mut d = BgpDriver::new(handle.clone(), None);
        let mut problems = SyncProblems::default();
        p.hold_time = 30;
        d.set_peers([(a, p.clone())].into_iter().collect(), &mut problems)
            .await;
        assert!(problems.is_empty(), "{problems:?}");
        let peers = handle.peers().await.unwrap();
        assert_eq!(peers.len(), 1);

        // Gone from the speaker behind the driver's back: removing it is no error.
        handle.remove_peer(a).await.unwrap();
        let mut problems = SyncProblems::default();
        d.set_peers(BTreeMap::new(), &mut problems).await;
        assert!(problems.is_empty(), "{problems:?}");
        assert!(d.peers.is_empty());
    }

    /// A restarted speaker's driver keeps what the stopped one learned until it learns it
    /// again or the restart time passes.
    #[tokio::test]
    async fn routes_learned_before_a_restart_are_kept_until_relearned_or_expired() {
        let start = || async {
            let cfg = margay_bgp::SpeakerConfig::new(64512, "192.0.2.1".parse().unwrap());
            margay_bgp::Speaker::start(cfg).await.unwrap().0
        };
        let mut old = BgpDriver::new(start().await, None);
        old.learned.insert(
            "10.244.5.0/26".parse().unwrap(),
            "192.0.2.9".parse().unwrap(),
        );
        let mut kept = BgpDriver::restarted(
            start().await,
            None,
            old,
            std::time::Duration::from_millis(50),
        );
        assert_eq!(kept.remote_routes().len(), 1, "kept across the restart");
        std::thread::sleep(std::time::Duration::from_millis(80));
        assert!(
            kept.remote_routes().is_empty(),
            "dropped after the restart time"
        );
    }
}
