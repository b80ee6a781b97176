//! `margayctl ipam`: show pools, blocks and addresses; check the allocator's records for
//! leaks and inconsistencies; release addresses whose owner is gone.

use crate::output::{self, Format};
use anyhow::{bail, Context};
use clap::Subcommand;
use margay_api::store::kube::KubeBackend;
use margay_api::{DatastoreConfig, Store};
use margay_ipam::audit::{self, LiveSet, Snapshot};
use margay_ipam::live::{KubeLiveness, LiveSource};
use margay_ipam::{Allocator, AllocatorConfig, ReleaseOutcome};
use serde_json::json;
use std::net::IpAddr;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum IpamCommand {
    /// Pools with their use and blocks with their owner, or one address with its handle and pod.
    Show {
        /// Show this address instead.
        #[arg(long)]
        ip: Option<IpAddr>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Report leaked addresses, handles without allocations, allocations without handles,
    /// duplicate ownership and stale affinities; exits 1 if any are found.
    Check {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Release an address or everything a handle holds. Refused while the owner is alive,
    /// unless --force.
    Release {
        #[arg(long, conflicts_with = "handle", required_unless_present = "handle")]
        ip: Option<IpAddr>,
        #[arg(long)]
        handle: Option<String>,
        /// Release even though the owner looks alive.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(
    store: &Store,
    ds: &DatastoreConfig,
    cmd: &IpamCommand,
) -> anyhow::Result<ExitCode> {
    match cmd {
        IpamCommand::Show { ip, output } => {
            let snap = Snapshot::read_for_display(store).await?;
            print!("{}", show(&snap, *ip, *output)?);
            Ok(ExitCode::SUCCESS)
        }
        IpamCommand::Check { output } => {
            let snap = Snapshot::read(store).await?;
            let live = live_set(store, ds).await?;
            let (text, clean) = check(&snap, &live, *output)?;
            print!("{text}");
            Ok(if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        IpamCommand::Release { ip, handle, force } => {
            let live = live_set(store, ds).await?;
            let msg = release(store, &live, *ip, handle.as_deref(), *force).await?;
            println!("{msg}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Who is alive: WorkloadEndpoints and Nodes in etcd mode, pods and nodes from the API server
/// in Kubernetes mode.
pub(crate) async fn live_set(store: &Store, ds: &DatastoreConfig) -> anyhow::Result<LiveSet> {
    match ds {
        DatastoreConfig::Etcd(_) => Ok(LiveSet::from_store(store).await?),
        DatastoreConfig::Kubernetes { kubeconfig } => {
            let backend = match kubeconfig {
                Some(p) => KubeBackend::from_kubeconfig(p).await,
                None => KubeBackend::try_default().await,
            }
            .context("connecting to the Kubernetes API for pods and nodes")?;
            let src = KubeLiveness {
                client: backend.client().clone(),
            };
            Ok(src.live().await?)
        }
    }
}

fn show(snap: &Snapshot, ip: Option<IpAddr>, format: Format) -> anyhow::Result<String> {
    if let Some(ip) = ip {
        let info = audit::find_address(snap, ip);
        let a = info.allocation.as_ref();
        let attr = |k: &str| a.and_then(|a| a.attrs.get(k)).cloned().unwrap_or_default();
        let value = json!({
            "ip": ip.to_string(),
            "pool": info.pool,
            "block": info.block.map(|b| b.to_string()),
            "blockOwner": info.block_owner,
            "allocated": a.is_some(),
            "handle": a.and_then(|a| a.handle.clone()),
            "sequenceNumber": a.and_then(|a| a.seq),
            "namespace": a.map(|_| attr(margay_ipam::attr::NAMESPACE)),
            "pod": a.map(|_| attr(margay_ipam::attr::POD)),
            "node": a.map(|_| attr(margay_ipam::attr::NODE)),
        });
        return output::render(format, &value, || {
            let mut s = format!("address   {ip}\n");
            s += &format!("pool      {}\n", info.pool.as_deref().unwrap_or("(none)"));
            s += &format!(
                "block     {} (owner {})\n",
                info.block
                    .map(|b| b.to_string())
                    .unwrap_or_else(|| "(none)".into()),
                info.block_owner.as_deref().unwrap_or("none")
            );
            match a {
                None => s += "status    free\n",
                Some(a) => {
                    s += &format!("handle    {}\n", a.handle.as_deref().unwrap_or("(none)"));
                    s += &format!(
                        "sequence  {}\n",
                        a.seq.map(|x| x.to_string()).unwrap_or_default()
                    );
                    let pod = attr(margay_ipam::attr::POD);
                    if !pod.is_empty() {
                        s += &format!("pod       {}/{pod}\n", attr(margay_ipam::attr::NAMESPACE));
                    }
                    let node = attr(margay_ipam::attr::NODE);
                    if !node.is_empty() {
                        s += &format!("node      {node}\n");
                    }
                }
            }
            s
        });
    }
    let now = margay_ipam::Clock::system().now();
    let pools = audit::pool_usage(snap);
    let blocks = audit::block_usage(snap, now);
    let value = json!({
        "pools": pools.iter().map(|p| json!({
            "name": p.name, "cidr": p.cidr, "disabled": p.disabled, "blocks": p.blocks,
            "allocated": p.allocated, "size": p.size.to_string(),
        })).collect::<Vec<_>>(),
        "blocks": blocks.iter().map(|b| json!({
            "cidr": b.cidr.to_string(), "pool": b.pool, "owner": b.owner,
            "affinityState": b.affinity_state.map(|s| format!("{s:?}")),
            "allocated": b.allocated, "size": b.size, "available": b.available,
        })).collect::<Vec<_>>(),
    });
    output::render(format, &value, || {
        let prows: Vec<Vec<String>> = pools
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.cidr.clone(),
                    if p.disabled { "yes" } else { "no" }.into(),
                    p.blocks.to_string(),
                    format!("{}/{}", p.allocated, p.size),
                ]
            })
            .collect();
        let brows: Vec<Vec<String>> = blocks
            .iter()
            .map(|b| {
                vec![
                    b.cidr.to_string(),
                    b.pool.clone().unwrap_or_else(|| "-".into()),
                    b.owner.clone().unwrap_or_else(|| "-".into()),
                    b.affinity_state
                        .map(|s| format!("{s:?}"))
                        .unwrap_or_else(|| "-".into()),
                    format!("{}/{}", b.allocated, b.size),
                    b.available.to_string(),
                ]
            })
            .collect();
        format!(
            "{}\n{}",
            output::table(&["POOL", "CIDR", "DISABLED", "BLOCKS", "IN USE"], &prows),
            output::table(
                &["BLOCK", "POOL", "OWNER", "AFFINITY", "IN USE", "FREE"],
                &brows
            )
        )
    })
}

fn check(snap: &Snapshot, live: &LiveSet, format: Format) -> anyhow::Result<(String, bool)> {
    let findings = audit::check(snap, Some(live));
    let value: Vec<_> = findings
        .iter()
        .map(|f| json!({"kind": f.kind(), "message": f.to_string()}))
        .collect();
    let text = output::render(format, &value, || {
        if findings.is_empty() {
            format!(
                "no problems found ({} addresses allocated in {} blocks, {} handles)\n",
                snap.allocations().len(),
                snap.blocks.len(),
                snap.handles.len()
            )
        } else {
            let mut s = String::new();
            for f in &findings {
                s += &format!("{:<28} {f}\n", f.kind());
            }
            s += &format!("{} problem(s) found\n", findings.len());
            s
        }
    })?;
    Ok((text, findings.is_empty()))
}

async fn release(
    store: &Store,
    live: &LiveSet,
    ip: Option<IpAddr>,
    handle: Option<&str>,
    force: bool,
) -> anyhow::Result<String> {
    let snap = Snapshot::read(store).await?;
    let allocs = snap.allocations();
    let targets: Vec<&audit::Allocation> = match (ip, handle) {
        (Some(ip), _) => allocs.iter().filter(|a| a.ip == ip).collect(),
        (None, Some(h)) => allocs
            .iter()
            .filter(|a| a.handle.as_deref() == Some(h))
            .collect(),
        (None, None) => bail!("give --ip or --handle"),
    };
    if !force {
        if let Some(a) = targets.iter().find(|a| live.owner_alive(a).is_ok()) {
            bail!(
                "refusing to release {} (handle {}): its owner is alive; use --force to release it anyway",
                a.ip,
                a.handle.as_deref().unwrap_or("-")
            );
        }
    }
    let alloc = Allocator::new(
        store.clone(),
        "margayctl",
        AllocatorConfig {
            node_labels: Some(Default::default()),
            ..AllocatorConfig::default()
        },
    );
    match (ip, handle) {
        (Some(ip), _) => {
            let seq = targets.first().and_then(|a| a.seq);
            match alloc.release_ips(&[(ip, seq)]).await?.as_slice() {
                [ReleaseOutcome::Released { handle }] => Ok(format!(
                    "released {ip} (handle {})",
                    handle.as_deref().unwrap_or("-")
                )),
                [ReleaseOutcome::Stale { .. }] => {
                    bail!("{ip} was handed out again while this command ran; nothing released")
                }
                _ => bail!("{ip} is not allocated"),
            }
        }
        (None, Some(h)) => {
            let ips = alloc.release_by_handle(h).await?;
            Ok(format!(
                "released handle {h} ({} address(es){})",
                ips.len(),
                if ips.is_empty() {
                    String::new()
                } else {
                    format!(
                        ": {}",
                        ips.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            ))
        }
        (None, None) => unreachable!("checked above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use margay_api::{IPPool, IPPoolSpec, Node, NodeSpec};
    use margay_ipam::AssignRequest;
    use std::collections::BTreeMap;

    async fn setup() -> (Store, IpAddr) {
        let store = Store::memory();
        store
            .create(&IPPool::new(
                "default-ipv4",
                IPPoolSpec {
                    cidr: "10.244.0.0/16".into(),
                    ..IPPoolSpec::default()
                },
            ))
            .await
            .unwrap();
        store
            .create(&Node::new("n1", NodeSpec::default()))
            .await
            .unwrap();
        let a = Allocator::new(
            store.clone(),
            "n1",
            AllocatorConfig {
                node_labels: Some(BTreeMap::new()),
                ..AllocatorConfig::default()
            },
        );
        let got = a
            .assign(&AssignRequest {
                handle_id: "k8s-pod-network.abc".into(),
                attrs: BTreeMap::from([
                    ("namespace".into(), "default".into()),
                    ("pod".into(), "web".into()),
                    ("node".into(), "n1".into()),
                ]),
                num_v4: 1,
                ..AssignRequest::default()
            })
            .await
            .unwrap();
        (store, got.addresses[0].ip)
    }

    #[tokio::test]
    async fn show_names_the_owner_of_an_address_and_lists_blocks() {
        let (store, ip) = setup().await;
        // What `ipam show` reads: no handles; blocks name their owners.
        let snap = Snapshot::read_for_display(&store).await.unwrap();
        assert!(snap.handles.is_empty());
        let s = show(&snap, Some(ip), Format::Table).unwrap();
        assert!(s.contains("handle    k8s-pod-network.abc"), "{s}");
        assert!(s.contains("pod       default/web"), "{s}");
        let s = show(&snap, None, Format::Table).unwrap();
        assert!(
            s.contains("default-ipv4  10.244.0.0/16  no        1       1/65536"),
            "{s}"
        );
        assert!(s.contains("host:n1  Confirmed  1/64"), "{s}");
    }

    #[tokio::test]
    async fn check_reports_a_leak_and_release_refuses_live_owners() {
        let (store, ip) = setup().await;
        let snap = Snapshot::read(&store).await.unwrap();
        // No workload record holds the handle: the address is leaked.
        let live = LiveSet::from_store(&store).await.unwrap();
        let (text, clean) = check(&snap, &live, Format::Table).unwrap();
        assert!(!clean);
        assert!(text.contains("leaked address"), "{text}");
        // With the pod alive, release is refused unless forced.
        let mut alive = live.clone();
        alive.handles.insert("k8s-pod-network.abc".into());
        let e = release(&store, &alive, Some(ip), None, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("its owner is alive"), "{e}");
        let msg = release(&store, &live, Some(ip), None, false).await.unwrap();
        assert_eq!(msg, format!("released {ip} (handle k8s-pod-network.abc)"));
        let snap = Snapshot::read(&store).await.unwrap();
        let (text, clean) = check(&snap, &live, Format::Table).unwrap();
        assert!(clean, "{text}");
        assert!(release(&store, &live, Some(ip), None, false).await.is_err());
    }
}
