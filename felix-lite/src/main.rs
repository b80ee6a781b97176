//! `margay-node`: the node agent. Settings come from `--config <file>` (YAML) and the
//! environment (see `margay_node::config`).

use anyhow::Context;
use margay_node::agent::Agent;
use margay_node::config::NodeConfig;
use std::sync::Arc;

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MARGAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .json()
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let file = match args.as_slice() {
        [] => None,
        [flag, path] if flag == "--config" => {
            Some(std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?)
        }
        _ => anyhow::bail!("usage: margay-node [--config FILE]"),
    };
    let cfg = NodeConfig::load(file.as_deref(), |k| std::env::var(k).ok())?;
    init_logging(&cfg.log_level);
    let health_addr = cfg.health_listen;
    let metrics_addr = cfg.metrics_listen;
    let (agent, status) = Agent::start(cfg).await?;
    let status = Arc::new(status);
    let (h, _t1) = margay_node::http::serve(health_addr, status.clone())
        .await
        .with_context(|| format!("serving health on {health_addr}"))?;
    let _t2 = if metrics_addr != health_addr {
        Some(
            margay_node::http::serve(metrics_addr, status)
                .await
                .with_context(|| format!("serving metrics on {metrics_addr}"))?
                .1,
        )
    } else {
        None
    };
    tracing::info!(node = agent.node_name(), health = %h, "margay-node running");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    agent.run(shutdown).await?;
    Ok(())
}
