//! `margay-ipam-controller`: validates pools and collects leaked addresses, as the elected
//! leader among its replicas.
//!
//! The datastore comes from the environment as for every Margay component
//! (`MARGAY_DATASTORE_TYPE`, `MARGAY_ETCD_ENDPOINTS`, `MARGAY_ETCD_PREFIX`, `KUBECONFIG`).

use anyhow::{bail, Context};
use margay_api::store::etcd::EtcdBackend;
use margay_api::store::kube::KubeBackend;
use margay_api::{parse_duration, DatastoreConfig, Store};
use margay_ipam::live::{KubeLiveness, LiveSource, StoreLiveness};
use margay_ipam::Clock;
use margay_ipam_controller::gc::GcConfig;
use margay_ipam_controller::health::{Health, Role};
use margay_ipam_controller::leader::{EtcdLeaderElector, KubeLeaderElector, LeaderElector};
use margay_ipam_controller::metrics::{self, Metrics};
use margay_ipam_controller::Controller;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{error, info, warn};

const USAGE: &str = "usage: margay-ipam-controller [--interval 1m] [--gc-grace 15m] \
[--max-releases-per-pass 100] [--release-interval 20ms] [--metrics-addr 0.0.0.0:9094] \
[--lease-namespace kube-system] [--lease-duration 15s] [--identity NAME]";

#[derive(Debug)]
struct Options {
    interval: Duration,
    gc_grace: Duration,
    max_releases_per_pass: usize,
    release_interval: Duration,
    metrics_addr: String,
    lease_namespace: String,
    lease_duration: Duration,
    identity: String,
}

impl Options {
    fn parse(args: impl IntoIterator<Item = String>) -> anyhow::Result<Options> {
        let mut o = Options {
            interval: Duration::from_secs(60),
            gc_grace: Duration::from_secs(15 * 60),
            max_releases_per_pass: 100,
            release_interval: Duration::from_millis(20),
            metrics_addr: "0.0.0.0:9094".into(),
            lease_namespace: std::env::var("POD_NAMESPACE")
                .unwrap_or_else(|_| "kube-system".into()),
            lease_duration: Duration::from_secs(15),
            identity: std::env::var("HOSTNAME")
                .unwrap_or_else(|_| format!("pid-{}", std::process::id())),
        };
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            if flag == "--help" || flag == "-h" {
                bail!("{USAGE}");
            }
            let value = it
                .next()
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
            let dur = |v: &str| {
                parse_duration(v)
                    .with_context(|| format!("{flag} {v:?} is not a duration (e.g. 30s, 15m, 1h)"))
            };
            match flag.as_str() {
                "--interval" => o.interval = dur(&value)?,
                "--gc-grace" => o.gc_grace = dur(&value)?,
                "--release-interval" => o.release_interval = dur(&value)?,
                "--lease-duration" => o.lease_duration = dur(&value)?,
                "--max-releases-per-pass" => {
                    o.max_releases_per_pass = value.parse().with_context(|| {
                        format!("--max-releases-per-pass {value:?} is not a number")
                    })?
                }
                "--metrics-addr" => o.metrics_addr = value,
                "--lease-namespace" => o.lease_namespace = value,
                "--identity" => o.identity = value,
                other => bail!("unknown option {other}\n{USAGE}"),
            }
        }
        if o.interval.is_zero() {
            bail!("--interval must be greater than zero");
        }
        if o.lease_duration < Duration::from_secs(3) {
            bail!("--lease-duration must be at least 3s");
        }
        Ok(o)
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("margay-ipam-controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let opts = Options::parse(std::env::args().skip(1))?;
    let ds = DatastoreConfig::from_env().context("reading the datastore configuration")?;
    // The endpoints answer from the start: not ready while connecting.
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(Health::stall_limit_for(
        opts.interval,
        opts.lease_duration,
    )));
    let listener = tokio::net::TcpListener::bind(&opts.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {}", opts.metrics_addr))?;
    info!(addr = %opts.metrics_addr, "serving /metrics, /livez and /readyz");
    tokio::spawn(metrics::serve(listener, metrics.clone(), health.clone()));
    let (store, mut elector, live): (Store, Box<dyn LeaderElector>, Box<dyn LiveSource>) = match &ds
    {
        DatastoreConfig::Etcd(cfg) => {
            let backend = EtcdBackend::connect(cfg.clone())
                .await
                .context("connecting to etcd")?;
            let store = Store::new(Arc::new(backend.clone()));
            let elector = EtcdLeaderElector::new(
                backend.client(),
                backend.prefix(),
                opts.identity.clone(),
                opts.lease_duration,
            );
            (
                store.clone(),
                Box::new(elector),
                Box::new(StoreLiveness { store }),
            )
        }
        DatastoreConfig::Kubernetes { kubeconfig } => {
            let backend = match kubeconfig {
                Some(p) => KubeBackend::from_kubeconfig(p).await,
                None => KubeBackend::try_default().await,
            }
            .context("connecting to the Kubernetes API")?;
            let client = backend.client().clone();
            let elector = KubeLeaderElector::new(
                client.clone(),
                &opts.lease_namespace,
                "margay-ipam-controller",
                opts.identity.clone(),
                opts.lease_duration,
            );
            (
                Store::new(Arc::new(backend)),
                Box::new(elector),
                Box::new(KubeLiveness { client }),
            )
        }
    };

    // SIGTERM (what Kubernetes sends) and Ctrl-C both stop the controller, releasing the lease
    // so a standby takes over at once.
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tokio::pin!(stop);

    let mut controller = Controller::new(
        store,
        GcConfig {
            grace: opts.gc_grace,
            max_releases_per_pass: opts.max_releases_per_pass,
            release_interval: opts.release_interval,
            clock: Clock::system(),
        },
        metrics.clone(),
    );
    info!(identity = %opts.identity, interval = ?opts.interval, gc_grace = ?opts.gc_grace, "starting");
    loop {
        // A standby: one attempt to lead per retry interval.
        let attempt = tokio::select! {
            r = elector.try_acquire() => r,
            _ = &mut stop => return Ok(()),
        };
        match attempt {
            Ok(true) => {}
            Ok(false) => {
                health.report(Role::Standby, Ok(()));
                tokio::select! {
                    _ = tokio::time::sleep(elector.retry_interval()) => {}
                    _ = &mut stop => return Ok(()),
                }
                continue;
            }
            Err(e) => {
                warn!(error = %e, "leader election failed; retrying");
                health.report(health.role(), Err(e.to_string()));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = &mut stop => return Ok(()),
                }
                continue;
            }
        }
        metrics.set_leader(true);
        health.report(Role::Leader, Ok(()));
        let mut next_pass = Instant::now();
        let mut last_pass: Result<(), String> = Ok(());
        loop {
            if Instant::now() >= next_pass {
                last_pass = controller
                    .pass(live.as_ref())
                    .await
                    .map(drop)
                    .map_err(|e| format!("the last pass failed: {e:#}"));
                if let Err(e) = &last_pass {
                    warn!(error = %e, "pass failed");
                }
                next_pass = Instant::now() + opts.interval;
            }
            health.report(Role::Leader, last_pass.clone());
            tokio::select! {
                _ = tokio::time::sleep(elector.renew_interval()) => {}
                _ = &mut stop => {
                    elector.release().await;
                    return Ok(());
                }
            }
            match elector.renew().await {
                Ok(true) => {}
                Ok(false) => {
                    health.report(Role::Standby, Ok(()));
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "renewing leadership failed; stepping down");
                    health.report(Role::Standby, Err(e.to_string()));
                    break;
                }
            }
        }
        metrics.set_leader(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject_clearly() {
        let o = Options::parse(
            [
                "--gc-grace",
                "5m",
                "--interval",
                "30s",
                "--max-releases-per-pass",
                "7",
            ]
            .map(String::from),
        )
        .unwrap();
        assert_eq!(o.gc_grace, Duration::from_secs(300));
        assert_eq!(o.interval, Duration::from_secs(30));
        assert_eq!(o.max_releases_per_pass, 7);
        let e = Options::parse(["--gc-grace", "soon"].map(String::from)).unwrap_err();
        assert!(
            e.to_string()
                .contains("--gc-grace \"soon\" is not a duration"),
            "{e}"
        );
        let e = Options::parse(["--bogus", "1"].map(String::from)).unwrap_err();
        assert!(e.to_string().contains("unknown option --bogus"), "{e}");
    }
}
