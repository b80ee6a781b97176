//! `margay-cni install`: the chart's init container. Installs the CNI plugins and the conflist
//! on the host and, in a cluster, the plugin's kubeconfig with a fresh token.

use margay_cni::install::{install, InstallConfig};
use margay_cni::token;
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!("usage: margay-cni install\n\nSettings come from the environment: MARGAY_CNI_NETWORK_CONFIG (required), MARGAY_CNI_BIN_DIR, MARGAY_CNI_CONF_DIR, MARGAY_CNI_CONFLIST_NAME, MARGAY_CNI_SOURCE_DIR, MARGAY_CNI_BINARIES; in a cluster also MARGAY_CNI_SERVICE_ACCOUNT and POD_NAMESPACE.");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 1 || args[0] != "install" {
        return usage();
    }
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match InstallConfig::from_vars(env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("margay-cni install: {e}");
            return ExitCode::FAILURE;
        }
    };
    match install(&cfg) {
        Ok(report) => {
            for p in &report.written {
                eprintln!("installed {}", p.display());
            }
            for p in &report.unchanged {
                eprintln!("unchanged {}", p.display());
            }
        }
        Err(e) => {
            eprintln!("margay-cni install: {e}");
            return ExitCode::FAILURE;
        }
    }
    // In a cluster, give the plugin its own credentials. Outside one (etcd datastore without
    // Kubernetes, or the lab) there is nothing to write.
    let Ok(server) = token::in_cluster_server(env) else {
        eprintln!("not in a cluster: no kubeconfig written");
        return ExitCode::SUCCESS;
    };
    let account = env("MARGAY_CNI_SERVICE_ACCOUNT").unwrap_or_else(|| "margay-cni".into());
    let namespace = env("POD_NAMESPACE").unwrap_or_else(|| "margay-system".into());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("margay-cni install: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let config = kube::Config::infer()
            .await
            .map_err(|e| format!("in-cluster client: {e}"))?;
        let client = margay_api::store::kube::client(config)
            .map_err(|e| format!("in-cluster client: {e}"))?;
        let ca = std::fs::read(token::SERVICE_ACCOUNT_CA)
            .map_err(|e| format!("{}: {e}", token::SERVICE_ACCOUNT_CA))?;
        token::refresh_kubeconfig(&client, &server, &ca, &cfg.conf_dir, &namespace, &account)
            .await
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => {
            eprintln!("wrote {}", cfg.conf_dir.join("margay-kubeconfig").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("margay-cni install: {e}");
            ExitCode::FAILURE
        }
    }
}
