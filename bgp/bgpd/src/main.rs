//! `margay-bgpd`: Margay's BGP speaker as a standalone daemon, for route reflectors,
//! ToR emulation in the lab, and peering with routers. Two modes:
//!
//! - A YAML configuration (see `config.rs`), reloaded on SIGHUP applying only the
//!   difference; status and Prometheus metrics on a local HTTP address; learned routes can
//!   be installed through the workspace's kernel-route writer.
//! - `--cluster-route-reflector` (see `cluster.rs`): a route reflector of a Margay cluster,
//!   its peers taken from the datastore as a node agent takes them.
//!
//! In both, SIGTERM/SIGINT closes every session with Cease/Administrative Shutdown.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use margay_bgp::wire::Prefix;
use margay_bgp::{PathAttrs, PeerConfig, Speaker, SpeakerHandle};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

mod cluster;
mod config;
mod http;
mod kernel;

use config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "margay-bgpd",
    version,
    about = "Margay's BGP daemon",
    after_help = cluster::datastore_help()
)]
struct Cli {
    /// Configuration file (YAML).
    #[arg(short, long, default_value = "/etc/margay/bgpd.yaml")]
    config: PathBuf,
    /// Check the configuration (or, with --cluster-route-reflector, the settings) and exit.
    #[arg(long)]
    check: bool,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Run as a route reflector of a Margay cluster: register this node's margay.io Node as a
    /// reflector and take the peers, the AS and the BGP settings from the datastore (Nodes,
    /// BGPPeers, BGPConfiguration) instead of --config.
    #[arg(long, conflicts_with = "config")]
    cluster_route_reflector: bool,
    #[command(flatten)]
    cluster: cluster::Args,
}

fn init_logging(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        sub.json().init();
    } else {
        sub.init();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("margay-bgpd: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("margay-bgpd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--cluster-route-reflector`: settings from flags and the environment, then the mode's loop.
fn cluster_main(cli: &Cli) -> ExitCode {
    let settings = match cluster::Settings::new(&cli.cluster, |k| std::env::var(k).ok()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("margay-bgpd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        print!("{}", settings.summary());
        return ExitCode::SUCCESS;
    }
    init_logging(&settings.log_level, cli.log_json);
    match runtime() {
        Ok(rt) => exit_with(rt.block_on(cluster::run(settings))),
        Err(code) => code,
    }
}

/// The restart marker: present while the daemon runs, removed on a clean exit. Its
/// presence at start means the last run did not end cleanly, so this start is a
/// graceful restart (RFC 4724 R bit).
fn marker(dir: &Path) -> PathBuf {
    dir.join("margay-bgpd.running")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.cluster_route_reflector {
        return cluster_main(&cli);
    }
    init_logging("info", cli.log_json);
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("margay-bgpd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!("{}: ok ({} peers)", cli.config.display(), cfg.peers.len());
        return ExitCode::SUCCESS;
    }
    match runtime() {
        Ok(rt) => exit_with(rt.block_on(run(cli.config, cfg))),
        Err(code) => code,
    }
}

async fn run(path: PathBuf, mut cfg: Config) -> anyhow::Result<()> {
    let mut speaker_cfg = cfg.bgp.clone();
    if let Some(dir) = &cfg.state_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state_dir {}", dir.display()))?;
        let m = marker(dir);
        speaker_cfg.restarting = m.exists();
        std::fs::write(&m, std::process::id().to_string())
            .with_context(|| format!("writing {}", m.display()))?;
        if speaker_cfg.restarting {
            info!("previous run did not shut down cleanly: restarting gracefully");
        }
    }
    let (speaker, best) = Speaker::start(speaker_cfg).await?;
    if let Some(s) = &cfg.status {
        let l = http::bind(s.listen)
            .await
            .with_context(|| format!("binding status.listen {}", s.listen))?;
        info!(listen = %s.listen, "status API up");
        tokio::spawn(http::serve(l, http::Endpoints::status_api(speaker.clone())));
    }
    match &cfg.kernel {
        Some(k) => {
            let restart_time = cfg
                .bgp
                .graceful_restart
                .as_ref()
                .map(|g| u64::from(g.restart_time))
                .unwrap_or(0);
            kernel::start(k, best, restart_time).context("starting the kernel route writer")?;
        }
        None => drop(best),
    }
    for p in &cfg.peers {
        speaker.add_peer(p.clone()).await?;
    }
    for (p, a) in cfg.announcements() {
        speaker.announce(p, a)?;
    }
    info!(peers = cfg.peers.len(), "margay-bgpd running");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&path, &mut cfg, &speaker).await,
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    info!("shutting down");
    if let Err(e) = speaker.shutdown("margay-bgpd shutting down").await {
        warn!(error = %e, "shutdown incomplete");
    }
    if let Some(dir) = &cfg.state_dir {
        match std::fs::remove_file(marker(dir)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Left behind, the next start takes itself for a graceful restart.
            Err(e) => warn!(error = %e, "cannot remove the running marker"),
        }
    }
    Ok(())
}

/// One change a reload made to the running speaker, and how to take it back.
enum Undo {
    /// A peer was removed: add it again with its old settings.
    AddPeer(PeerConfig),
    /// A peer was changed: put its old settings back.
    UpdatePeer(PeerConfig),
    /// A peer was added: remove it.
    RemovePeer(std::net::IpAddr),
    /// A prefix was withdrawn or re-announced: announce it with its old attributes.
    Announce(Prefix, PathAttrs),
    /// A prefix was announced that was not before: withdraw it.
    Withdraw(Prefix),
}

/// Applies a changed configuration file on SIGHUP. All or nothing: when the speaker refuses
/// a change, the changes already made are taken back, and the running configuration stays.
async fn reload(path: &Path, cfg: &mut Config, speaker: &SpeakerHandle) {
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            error!("reload refused, keeping the running configuration: {e}");
            return;
        }
    };
    let d = config::diff(cfg, &new);
    if d.is_empty() {
        info!("reload: no changes");
        return;
    }
    if !d.needs_restart.is_empty() {
        warn!(
            sections = ?d.needs_restart,
            "reload: these sections changed and apply only after a restart; the rest is applied now"
        );
    }
    let mut undo = Vec::new();
    if let Err(e) = apply_diff(&d, cfg, speaker, &mut undo).await {
        error!(error = %e, "reload failed; taking back its changes and keeping the running configuration");
        let mut clean = true;
        for u in undo.into_iter().rev() {
            let r = match u {
                Undo::AddPeer(p) => speaker.add_peer(p).await,
                Undo::UpdatePeer(p) => speaker.update_peer(p).await,
                Undo::RemovePeer(a) => speaker.remove_peer(a).await,
                Undo::Announce(p, a) => speaker.announce(p, a),
                Undo::Withdraw(p) => speaker.withdraw(p),
            };
            if let Err(e) = r {
                clean = false;
                error!(error = %e, "reload: cannot take a change back");
            }
        }
        if !clean {
            error!("the running speaker no longer matches any configuration; restart margay-bgpd");
        }
        return;
    }
    info!(
        removed = d.remove_peers.len(),
        updated = d.update_peers.len(),
        added = d.add_peers.len(),
        withdrawn = d.withdraw.len(),
        announced = d.announce.len(),
        "reload applied"
    );
    // Keep the sections that need a restart as they run.
    let mut applied = new;
    applied.bgp = cfg.bgp.clone();
    applied.status = cfg.status.clone();
    applied.kernel = cfg.kernel.clone();
    *cfg = applied;
}

/// Makes the changes of `d` to the speaker running `old`, noting in `undo` how to take back
/// each one made; stops at the first the speaker refuses.
async fn apply_diff(
    d: &config::Diff,
    old: &Config,
    speaker: &SpeakerHandle,
    undo: &mut Vec<Undo>,
) -> Result<(), String> {
    let old_peer = |a: &std::net::IpAddr| old.peers.iter().find(|p| p.address == *a).cloned();
    let old_announced = old.announcements();
    for a in &d.remove_peers {
        speaker
            .remove_peer(*a)
            .await
            .map_err(|e| format!("removing peer {a}: {e}"))?;
        if let Some(p) = old_peer(a) {
            undo.push(Undo::AddPeer(p));
        }
    }
    for p in &d.update_peers {
        speaker
            .update_peer(p.clone())
            .await
            .map_err(|e| format!("updating peer {}: {e}", p.address))?;
        if let Some(p) = old_peer(&p.address) {
            undo.push(Undo::UpdatePeer(p));
        }
    }
    for p in &d.add_peers {
        speaker
            .add_peer(p.clone())
            .await
            .map_err(|e| format!("adding peer {}: {e}", p.address))?;
        undo.push(Undo::RemovePeer(p.address));
    }
    for p in &d.withdraw {
        speaker
            .withdraw(*p)
            .map_err(|e| format!("withdrawing {p}: {e}"))?;
        if let Some(a) = old_announced.get(p) {
            undo.push(Undo::Announce(*p, a.clone()));
        }
    }
    for (p, a) in &d.announce {
        speaker
            .announce(*p, a.clone())
            .map_err(|e| format!("announcing {p}: {e}"))?;
        undo.push(match old_announced.get(p) {
            Some(old) => Undo::Announce(*p, old.clone()),
            None => Undo::Withdraw(*p),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "bgp:\n  asn: 65001\n  router_id: 192.0.2.1\npeers:\n  - address: 192.0.2.9\n    asn: 65002\n";

    /// A reload the speaker refuses takes back what it changed and keeps the running
    /// configuration; it does not claim to have applied it.
    #[tokio::test]
    async fn a_refused_reload_keeps_the_running_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bgpd.yaml");
        std::fs::write(&path, BASE).unwrap();
        let mut cfg = Config::load(&path).unwrap();
        let (speaker, _best) = Speaker::start(cfg.bgp.clone()).await.unwrap();
        for p in &cfg.peers {
            speaker.add_peer(p.clone()).await.unwrap();
        }
        let running = cfg.clone();

        // A change the speaker takes is applied and becomes the running configuration.
        let added = format!("{BASE}  - address: 192.0.2.10\n    asn: 65003\n");
        std::fs::write(&path, &added).unwrap();
        reload(&path, &mut cfg, &speaker).await;
        assert_eq!(cfg.peers.len(), 2, "applied");
        assert_eq!(speaker.peers().await.unwrap().len(), 2);

        // The speaker gone: the reload fails, and the configuration stays as it ran.
        let applied = cfg.clone();
        speaker.stop("test").await.unwrap();
        std::fs::write(&path, BASE).unwrap();
        reload(&path, &mut cfg, &speaker).await;
        assert_eq!(
            cfg, applied,
            "a refused reload keeps the running configuration"
        );
        assert_ne!(cfg, running);
    }
}
