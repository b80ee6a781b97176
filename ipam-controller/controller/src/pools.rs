//! Pool validation: overlapping pools and changes to immutable fields, reported in each pool's
//! status conditions.
//!
//! The first time the controller sees a pool it records the accepted `cidr` and `blockSize` in
//! annotations. A later change of either, while blocks exist in the accepted range, sets the
//! condition `Valid` to `False` (reason `ImmutableFieldChanged`); the allocator then gives no
//! new addresses from the pool (existing ones keep working) until the fields are restored.
//! With no block in the old range the change is accepted and the annotations follow.

use ipnet::IpNet;
use margay_api::{Condition, IPAMBlock, IPPool, IPPoolStatus, Store, StoreError};
use margay_ipam::clock::rfc3339;
use margay_ipam::pool::CONDITION_VALID;
use std::collections::BTreeMap;
use tracing::{info, warn};

pub const ANNOTATION_CIDR: &str = "margay.io/accepted-cidr";
pub const ANNOTATION_BLOCK_SIZE: &str = "margay.io/accepted-block-size";
pub const CONDITION_OVERLAPPING: &str = "Overlapping";

/// What validation found about one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFindings {
    pub name: String,
    /// Names of the pools this one overlaps.
    pub overlaps: Vec<String>,
    /// Why its immutable fields are refused, if they are.
    pub immutable_change: Option<String>,
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The conditions a pool should carry, from its findings.
fn conditions(f: &PoolFindings, old: &[Condition], now: u64) -> Vec<Condition> {
    let mk = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let last = old
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| rfc3339(now));
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Some(last),
        }
    };
    let valid = match &f.immutable_change {
        None => mk(
            CONDITION_VALID,
            true,
            "Accepted",
            "the pool's cidr and blockSize are in force".into(),
        ),
        Some(why) => mk(CONDITION_VALID, false, "ImmutableFieldChanged", why.clone()),
    };
    let overlapping = if f.overlaps.is_empty() {
        mk(
            CONDITION_OVERLAPPING,
            false,
            "NoOverlap",
            "no other pool overlaps this one".into(),
        )
    } else {
        mk(
            CONDITION_OVERLAPPING,
            true,
            "OverlapsOtherPools",
            format!(
                "overlaps pool(s) {}; addresses could be handed out twice: change or delete one of them",
                f.overlaps.join(", ")
            ),
        )
    };
    vec![valid, overlapping]
}

/// Checks every pool and writes its status conditions (and its accepted-field annotations)
/// where they changed. Returns the findings.
pub async fn validate(store: &Store, now: u64) -> Result<Vec<PoolFindings>, StoreError> {
    let (pools, _) = store.list::<IPPool>().await?;
    let (blocks, _) = store.list::<IPAMBlock>().await?;
    let block_nets: Vec<IpNet> = blocks.iter().filter_map(|b| b.spec.network()).collect();
    let nets: Vec<(String, Option<IpNet>)> = pools
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.spec.network(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for p in pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        let net = p.spec.network();
        let overlaps: Vec<String> = nets
            .iter()
            .filter(|(n, o)| *n != name && o.zip(net).is_some_and(|(a, b)| overlap(&a, &b)))
            .map(|(n, o)| format!("{n} ({})", o.map(|x| x.to_string()).unwrap_or_default()))
            .collect();
        let ann = p.metadata.annotations.clone().unwrap_or_default();
        let bs = p.spec.effective_block_size().to_string();
        let accepted_cidr = ann.get(ANNOTATION_CIDR).cloned();
        let accepted_bs = ann.get(ANNOTATION_BLOCK_SIZE).cloned();
        let mut immutable_change = None;
        let mut accept = accepted_cidr.is_none() || accepted_bs.is_none();
        if let (Some(ac), Some(ab)) = (&accepted_cidr, &accepted_bs) {
            if *ac != p.spec.cidr || *ab != bs {
                let old_net: Option<IpNet> = ac.parse().ok();
                let in_use = block_nets
                    .iter()
                    .any(|b| old_net.is_some_and(|o| o.contains(b)));
                if in_use {
                    let mut what = Vec::new();
                    if *ac != p.spec.cidr {
                        what.push(format!("cidr from {ac} to {}", p.spec.cidr));
                    }
                    if *ab != bs {
                        what.push(format!("blockSize from {ab} to {bs}"));
                    }
                    immutable_change = Some(format!(
                        "{} changed after blocks were allocated; cidr and blockSize are immutable: restore them, or create a new pool and disable this one",
                        what.join(" and ")
                    ));
                } else {
                    accept = true;
                }
            }
        }
        let findings = PoolFindings {
            name: name.clone(),
            overlaps,
            immutable_change,
        };
        let mut current = p;
        if accept {
            let mut a = current.metadata.annotations.clone().unwrap_or_default();
            a.insert(ANNOTATION_CIDR.into(), current.spec.cidr.clone());
            a.insert(ANNOTATION_BLOCK_SIZE.into(), bs.clone());
            let mut upd = current.clone();
            upd.metadata.annotations = Some(a);
            match store.update(&upd).await {
                Ok(p) => current = p,
                Err(e) if e.is_conflict() || e.is_not_found() => {
                    out.push(findings);
                    continue;
                }
                Err(e) => return Err(e),
            }
            info!(pool = %name, cidr = %current.spec.cidr, block_size = %bs, "accepted pool cidr and blockSize");
        }
        let old = current
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let want = conditions(&findings, &old, now);
        let same = |a: &[Condition], b: &[Condition]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    x.type_ == y.type_ && x.status == y.status && x.message == y.message
                })
        };
        if !same(&old, &want) {
            if findings.immutable_change.is_some() || !findings.overlaps.is_empty() {
                warn!(pool = %name, overlaps = ?findings.overlaps, immutable = ?findings.immutable_change, "pool is not valid");
            }
            let mut s = current.clone();
            s.status = Some(IPPoolStatus { conditions: want });
            match store.update_status(&s).await {
                Ok(_) => {}
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        out.push(findings);
    }
    Ok(out)
}

/// Findings by pool name, for callers that look one up.
pub fn by_name(f: Vec<PoolFindings>) -> BTreeMap<String, PoolFindings> {
    f.into_iter().map(|x| (x.name.clone(), x)).collect()
}
