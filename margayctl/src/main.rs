//! `margayctl`: Margay's command-line tool.

use anyhow::Context;
use clap::{Parser, Subcommand};
use margay_api::store::etcd::EtcdConfig;
use margay_api::{DatastoreConfig, Store};
use std::path::PathBuf;
use std::process::ExitCode;

mod bgp;
mod ipam;
mod lab;
mod output;
mod pool;

#[derive(Parser, Debug)]
#[command(name = "margayctl", version, about = "Manage a Margay pod network")]
struct Cli {
    /// Datastore: `kubernetes` or `etcd` (default: etcd when --etcd-endpoints is given).
    #[arg(long, global = true, env = "MARGAY_DATASTORE_TYPE")]
    datastore: Option<String>,
    /// etcd client URLs, comma separated.
    #[arg(
        long,
        global = true,
        env = "MARGAY_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    etcd_endpoints: Vec<String>,
    /// etcd key prefix.
    #[arg(long, global = true, env = "MARGAY_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    /// kubeconfig for the Kubernetes datastore.
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage IP pools.
    #[command(subcommand)]
    Pool(pool::PoolCommand),
    /// Show, check and release allocated addresses.
    #[command(subcommand)]
    Ipam(ipam::IpamCommand),
    /// BGP peers and routes from a margay-bgpd status endpoint.
    #[command(subcommand)]
    Bgp(bgp::BgpCommand),
    /// A whole Margay cluster on this machine, in network namespaces.
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

impl Cli {
    fn datastore(&self) -> anyhow::Result<DatastoreConfig> {
        let kind = self.datastore.clone().unwrap_or_else(|| {
            if self.etcd_endpoints.is_empty() {
                "kubernetes".into()
            } else {
                "etcd".into()
            }
        });
        match kind.as_str() {
            "etcd" => {
                anyhow::ensure!(
                    !self.etcd_endpoints.is_empty(),
                    "the etcd datastore needs --etcd-endpoints (or MARGAY_ETCD_ENDPOINTS)"
                );
                let mut cfg = EtcdConfig::new(self.etcd_endpoints.clone());
                if let Some(p) = &self.etcd_prefix {
                    cfg = cfg.with_prefix(p.clone());
                }
                Ok(DatastoreConfig::Etcd(cfg))
            }
            "kubernetes" => Ok(DatastoreConfig::Kubernetes {
                kubeconfig: self.kubeconfig.clone(),
            }),
            other => anyhow::bail!("--datastore {other:?}: use kubernetes or etcd"),
        }
    }

    async fn store(&self) -> anyhow::Result<Store> {
        let cfg = self.datastore()?;
        cfg.connect()
            .await
            .with_context(|| format!("connecting to the {} datastore", kind_name(&cfg)))
    }
}

fn kind_name(cfg: &DatastoreConfig) -> &'static str {
    match cfg {
        DatastoreConfig::Kubernetes { .. } => "kubernetes",
        DatastoreConfig::Etcd(_) => "etcd",
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Pool(cmd) => match cli.store().await {
            Ok(store) => pool::run(&store, cmd).await,
            Err(e) => Err(e),
        },
        Command::Bgp(cmd) => bgp::run(cmd).await,
        Command::Lab(cmd) => lab::run(cmd, cli.datastore.as_deref()).await,
        Command::Ipam(cmd) => match (cli.store().await, cli.datastore()) {
            (Ok(store), Ok(ds)) => ipam::run(&store, &ds, cmd).await,
            (Err(e), _) | (_, Err(e)) => Err(e),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("margayctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
