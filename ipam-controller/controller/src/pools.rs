//! Pool validation, reported in each pool's status conditions: fields that fail Margay's own
//! validation, pools that overlap, and changes to immutable fields. Each pool is judged on its
//! own: one that is invalid, or that does not decode at all, gets `Valid=False` with the reason
//! and never keeps the others from being checked. The status also carries the block size in
//! force, which `kubectl get ippools` shows.
//!
//! The first time the controller sees a pool it records the accepted `cidr` and `blockSize` in
//! annotations. A later change of either, while blocks exist in the accepted range, sets the
//! condition `Valid` to `False` (reason `ImmutableFieldChanged`); the allocator then gives no
//! new addresses from the pool (existing ones keep working) until the fields are restored.
//! With no block in the old range the change is accepted and the annotations follow.

use ipnet::IpNet;
use margay_api::store::RawObject;
use margay_api::{
    Condition, IPAMBlock, IPPool, IPPoolStatus, Kind, MargayResource, Store, StoreError,
};
use margay_ipam::clock::rfc3339;
use margay_ipam::pool::CONDITION_VALID;
use std::collections::BTreeMap;
use tracing::{info, warn};

pub const ANNOTATION_CIDR: &str = margay_ipam::pool::ANNOTATION_ACCEPTED_CIDR;
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
    /// Why Margay refuses the pool itself: a field that fails validation, an overlap with an
    /// older pool, or an object that does not decode at all.
    pub invalid: Option<Invalid>,
}

/// Why a pool is refused, as the `Valid` condition's reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

impl PoolFindings {
    /// True when the allocator may hand out addresses from the pool (disabled aside).
    pub fn valid(&self) -> bool {
        self.immutable_change.is_none() && self.invalid.is_none()
    }
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn condition(
    old: &[Condition],
    now: u64,
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
) -> Condition {
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
}

/// The conditions a pool should carry, from its findings.
fn conditions(f: &PoolFindings, old: &[Condition], now: u64) -> Vec<Condition> {
    let mk = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(old, now, type_, ok, reason, message)
    };
    let valid = match (&f.invalid, &f.immutable_change) {
        (Some(i), _) => mk(CONDITION_VALID, false, i.reason, i.message.clone()),
        (None, Some(why)) => mk(CONDITION_VALID, false, "ImmutableFieldChanged", why.clone()),
        (None, None) => mk(
            CONDITION_VALID,
            true,
            "Accepted",
            "the pool's cidr and blockSize are in force".into(),
        ),
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

/// Checks every pool, each on its own, and writes its status conditions (and its
/// accepted-field annotations) where they changed. One pool that is invalid, that does not
/// even decode, or whose write fails, never stops the others: a failed write is logged, the
/// remaining pools are checked, and the first such error is returned at the end (the pass
/// counts as failed and is retried). Returns the findings.
pub async fn validate(store: &Store, now: u64) -> Result<Vec<PoolFindings>, StoreError> {
    let mut first_error = None;
    let findings = validate_each(store, now, &mut first_error).await?;
    match first_error {
        Some(e) => Err(e),
        None => Ok(findings),
    }
}

/// Keeps the first error of a write, logs every one.
fn note_write_error(first: &mut Option<StoreError>, pool: &str, e: StoreError) {
    warn!(pool = %pool, error = %e, "could not write the pool's annotations or status; checking the other pools");
    first.get_or_insert(e);
}

async fn validate_each(
    store: &Store,
    now: u64,
    first_error: &mut Option<StoreError>,
) -> Result<Vec<PoolFindings>, StoreError> {
    let listed = store.list_lenient::<IPPool>().await?;
    let (blocks, _) = store.list::<IPAMBlock>().await?;
    let block_nets: Vec<IpNet> = blocks.iter().filter_map(|b| b.spec.network()).collect();
    let problems = margay_ipam::pool::spec_problems(&listed.items);
    let nets: Vec<(String, Option<IpNet>)> = listed
        .items
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.spec.network().map(|n| n.trunc()),
            )
        })
        .collect();
    let mut out = Vec::new();
    for (raw, err) in listed.undecodable {
        let findings = PoolFindings {
            name: raw.name.clone(),
            overlaps: Vec::new(),
            immutable_change: None,
            invalid: Some(Invalid {
                reason: "Undecodable",
                message: format!("{err}; the allocator ignores this pool until it is fixed"),
            }),
        };
        warn!(pool = %raw.name, error = %err, "pool does not decode");
        if let Err(e) = write_raw_status(store, raw, &findings, now).await {
            note_write_error(first_error, &findings.name, e);
        }
        out.push(findings);
    }
    for p in listed.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let net = p.spec.network().map(|n| n.trunc());
        let overlaps: Vec<String> = nets
            .iter()
            .filter(|(n, o)| *n != name && o.zip(net).is_some_and(|(a, b)| overlap(&a, &b)))
            .map(|(n, o)| format!("{n} ({})", o.map(|x| x.to_string()).unwrap_or_default()))
            .collect();
        let invalid = problems.get(&name).map(|why| Invalid {
            reason: if p.validate().is_err() {
                "InvalidSpec"
            } else {
                "OverlapsOlderPool"
            },
            message: format!("{why}; the allocator gives no new addresses from it, and addresses already given keep working"),
        });
        let ann = p.metadata.annotations.clone().unwrap_or_default();
        let bs = p.spec.effective_block_size().to_string();
        let accepted_cidr = ann.get(ANNOTATION_CIDR).cloned();
        let accepted_bs = ann.get(ANNOTATION_BLOCK_SIZE).cloned();
        let mut immutable_change = None;
        // A pool that Margay refuses (its fields, or an overlap with an older pool) is never
        // accepted: its annotations keep the last cidr and blockSize that were in force. That
        // also keeps a new pool that overlaps an established one from ever looking older than
        // it (see `margay_ipam::pool::spec_problems`).
        let acceptable = !problems.contains_key(&name);
        let mut accept = acceptable && (accepted_cidr.is_none() || accepted_bs.is_none());
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
                    accept = acceptable;
                }
            }
        }
        let findings = PoolFindings {
            name: name.clone(),
            overlaps,
            immutable_change,
            invalid,
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
                Err(e) => {
                    note_write_error(first_error, &name, e);
                    out.push(findings);
                    continue;
                }
            }
            info!(pool = %name, cidr = %current.spec.cidr, block_size = %bs, "accepted pool cidr and blockSize");
        }
        let old = current.status.clone().unwrap_or_default();
        let want = IPPoolStatus {
            conditions: conditions(&findings, &old.conditions, now),
            // The size in force: while a change of it is refused, the accepted one.
            block_size: match (&findings.invalid, &findings.immutable_change) {
                (Some(_), _) => None,
                (None, Some(_)) => accepted_bs.as_deref().and_then(|b| b.parse().ok()),
                (None, None) => Some(current.spec.effective_block_size()),
            },
        };
        if !same_status(&old, &want) {
            if !findings.valid() || !findings.overlaps.is_empty() {
                warn!(pool = %name, overlaps = ?findings.overlaps, immutable = ?findings.immutable_change, invalid = ?findings.invalid, "pool is not valid");
            }
            let mut s = current.clone();
            s.status = Some(want);
            match store.update_status(&s).await {
                Ok(_) => {}
                Err(e) if e.is_conflict() || e.is_not_found() => {}
                Err(e) => note_write_error(first_error, &name, e),
            }
        }
        out.push(findings);
    }
    Ok(out)
}

/// Equal but for transition times, which only change with a status.
fn same_status(a: &IPPoolStatus, b: &IPPoolStatus) -> bool {
    a.block_size == b.block_size && same_conditions(&a.conditions, &b.conditions)
}

fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
        })
}

/// Writes the conditions of a pool that does not decode into its stored object as it is.
async fn write_raw_status(
    store: &Store,
    raw: RawObject,
    f: &PoolFindings,
    now: u64,
) -> Result<(), StoreError> {
    let old: Vec<Condition> = raw
        .value
        .pointer("/status/conditions")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let want = conditions(f, &old, now);
    if same_conditions(&old, &want) {
        return Ok(());
    }
    let mut value = raw.value;
    value["status"] = serde_json::json!({ "conditions": want });
    match store
        .backend()
        .update_status(Kind::IPPool, &raw.name, value, raw.revision)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_conflict() || e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Findings by pool name, for callers that look one up.
pub fn by_name(f: Vec<PoolFindings>) -> BTreeMap<String, PoolFindings> {
    f.into_iter().map(|x| (x.name.clone(), x)).collect()
}
