//! `margayctl pool`: list, show, apply, enable, disable and delete IP pools.

use crate::output::{self, Format};
use anyhow::{bail, Context};
use clap::Subcommand;
use ipnet::IpNet;
use margay_api::{IPAMBlock, IPPool, MargayResource, Store, StoreError};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Subcommand, Debug)]
pub enum PoolCommand {
    /// List pools with their settings and use.
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show one pool.
    Get {
        name: String,
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: Format,
    },
    /// Create or update pools from a YAML file (`-` for standard input; several documents allowed).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Stop handing out addresses from a pool; existing addresses keep working.
    Disable { name: String },
    /// Hand out addresses from a pool again.
    Enable { name: String },
    /// Delete a pool. Refused while addresses from it are in use, unless --force.
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

/// How many times a read-modify-write is retried when another writer got there first.
const CAS_ATTEMPTS: usize = 5;

pub async fn run(store: &Store, cmd: &PoolCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PoolCommand::List { output } => list(store, *output).await,
        PoolCommand::Get { name, output } => {
            let pool: IPPool = store.get(name).await?;
            print!(
                "{}",
                output::render(*output, &pool, || pool_table(
                    std::slice::from_ref(&pool),
                    &[]
                ))?
            );
            Ok(ExitCode::SUCCESS)
        }
        PoolCommand::Apply { file } => apply(store, file).await,
        PoolCommand::Disable { name } => set_disabled(store, name, true).await,
        PoolCommand::Enable { name } => set_disabled(store, name, false).await,
        PoolCommand::Delete { name, force } => delete(store, name, *force).await,
    }
}

/// Addresses in use in the blocks inside `net`.
fn in_use(net: &IpNet, blocks: &[IPAMBlock]) -> (usize, usize) {
    let mut used = 0;
    let mut nblocks = 0;
    for b in blocks {
        if let Some(bnet) = b.spec.network() {
            if net.contains(&bnet) {
                nblocks += 1;
                used += b.spec.allocations.iter().filter(|a| a.is_some()).count();
            }
        }
    }
    (nblocks, used)
}

fn pool_table(pools: &[IPPool], blocks: &[IPAMBlock]) -> String {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            let s = &p.spec;
            let (nblocks, used) = s.network().map(|n| in_use(&n, blocks)).unwrap_or((0, 0));
            vec![
                p.metadata.name.clone().unwrap_or_default(),
                s.cidr.clone(),
                format!("/{}", s.effective_block_size()),
                format!("{:?}", s.ipip_mode),
                format!("{:?}", s.vxlan_mode),
                s.nat_outgoing.to_string(),
                s.disabled.to_string(),
                nblocks.to_string(),
                used.to_string(),
                s.node_selector.clone(),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME", "CIDR", "BLOCK", "IPIP", "VXLAN", "NAT", "DISABLED", "BLOCKS", "IN-USE",
            "SELECTOR",
        ],
        &rows,
    )
}

async fn list(store: &Store, format: Format) -> anyhow::Result<ExitCode> {
    let listed = store.list_lenient::<IPPool>().await?;
    for (_, e) in &listed.undecodable {
        eprintln!("margayctl: {e}; fix or delete that pool (it is not listed below)");
    }
    let pools = listed.items;
    let (blocks, _) = store.list::<IPAMBlock>().await?;
    print!(
        "{}",
        output::render(format, &pools, || pool_table(&pools, &blocks))?
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads one or more IPPool documents.
fn read_pools(file: &PathBuf) -> anyhow::Result<Vec<IPPool>> {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let mut pools = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(doc)
            .with_context(|| format!("{}: document {} is not YAML", file.display(), i + 1))?;
        if value.is_null() {
            continue;
        }
        let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        if kind != "IPPool" {
            bail!(
                "{}: document {} has kind {kind:?}; `margayctl pool apply` takes IPPool documents",
                file.display(),
                i + 1
            );
        }
        let pool: IPPool = serde_yaml::from_value(value)
            .with_context(|| format!("{}: document {}", file.display(), i + 1))?;
        pools.push(pool);
    }
    Ok(pools)
}

use serde::Deserialize;

async fn apply(store: &Store, file: &PathBuf) -> anyhow::Result<ExitCode> {
    let pools = read_pools(file)?;
    // Check everything before writing anything, so a bad file changes nothing.
    let mut bad = false;
    for p in &pools {
        if let Err(errs) = p.validate() {
            bad = true;
            let name = p.metadata.name.as_deref().unwrap_or("<no name>");
            eprintln!("IPPool {name} is invalid:");
            for e in errs.errors() {
                eprintln!("  {e}");
            }
        }
    }
    if bad {
        return Ok(ExitCode::FAILURE);
    }
    for p in &pools {
        let name = p.metadata.name.clone().unwrap_or_default();
        let verb = apply_one(store, p)
            .await
            .with_context(|| format!("IPPool {name}"))?;
        println!("ippool/{name} {verb}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn apply_one(store: &Store, desired: &IPPool) -> anyhow::Result<&'static str> {
    let name = desired.metadata.name.clone().unwrap_or_default();
    for _ in 0..CAS_ATTEMPTS {
        let (existing, _) = store.list::<IPPool>().await?;
        let current = existing
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(&name));
        check_overlap(desired, &existing)?;
        let result = match current {
            None => store.create(desired).await.map(|_| "created"),
            Some(cur) => {
                if cur.spec == desired.spec
                    && cur.metadata.labels == desired.metadata.labels
                    && cur.metadata.annotations == desired.metadata.annotations
                {
                    return Ok("unchanged");
                }
                check_immutable(cur, desired)?;
                let mut next = desired.clone();
                next.metadata.resource_version = cur.metadata.resource_version.clone();
                next.status = cur.status.clone();
                store.update(&next).await.map(|_| "configured")
            }
        };
        match result {
            Ok(verb) => return Ok(verb),
            Err(e) if e.is_conflict() || e.is_already_exists() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("the pool kept changing under us after {CAS_ATTEMPTS} attempts; try again")
}

/// A pool's range and block size decide the names and sizes of its blocks: changing them would
/// orphan every block already allocated.
fn check_immutable(cur: &IPPool, new: &IPPool) -> anyhow::Result<()> {
    let (c, n) = (&cur.spec, &new.spec);
    if c.cidr != n.cidr {
        bail!(
            "spec.cidr cannot change ({} -> {}): create a new pool and disable this one",
            c.cidr,
            n.cidr
        );
    }
    if c.effective_block_size() != n.effective_block_size() {
        bail!(
            "spec.blockSize cannot change ({} -> {}): create a new pool and disable this one",
            c.effective_block_size(),
            n.effective_block_size()
        );
    }
    Ok(())
}

fn check_overlap(desired: &IPPool, existing: &[IPPool]) -> anyhow::Result<()> {
    let Some(net) = desired.spec.network() else {
        return Ok(());
    };
    for other in existing {
        if other.metadata.name == desired.metadata.name {
            continue;
        }
        if let Some(o) = other.spec.network() {
            if o.contains(&net.network()) || net.contains(&o.network()) {
                bail!(
                    "spec.cidr {} overlaps pool {} ({}); pools must not overlap",
                    desired.spec.cidr,
                    other.metadata.name.as_deref().unwrap_or(""),
                    other.spec.cidr
                );
            }
        }
    }
    Ok(())
}

async fn set_disabled(store: &Store, name: &str, disabled: bool) -> anyhow::Result<ExitCode> {
    for _ in 0..CAS_ATTEMPTS {
        let mut pool: IPPool = store.get(name).await?;
        if pool.spec.disabled == disabled {
            println!("ippool/{name} unchanged");
            return Ok(ExitCode::SUCCESS);
        }
        pool.spec.disabled = disabled;
        match store.update(&pool).await {
            Ok(_) => {
                println!(
                    "ippool/{name} {}",
                    if disabled { "disabled" } else { "enabled" }
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("ippool/{name} kept changing under us; try again")
}

async fn delete(store: &Store, name: &str, force: bool) -> anyhow::Result<ExitCode> {
    for _ in 0..CAS_ATTEMPTS {
        let pool: IPPool = store.get(name).await?;
        let (blocks, _) = store.list::<IPAMBlock>().await?;
        if let Some(net) = pool.spec.network() {
            let (nblocks, used) = in_use(&net, &blocks);
            if used > 0 && !force {
                eprintln!(
                    "ippool/{name} has {used} addresses in use in {nblocks} blocks; disable it \
                     (`margayctl pool disable {name}`), let its pods move, then delete, or use --force"
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        match store.delete(&pool).await {
            Ok(()) => {
                println!("ippool/{name} deleted");
                return Ok(ExitCode::SUCCESS);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("ippool/{name} kept changing under us; try again")
}
