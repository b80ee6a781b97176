//! `margay-node`: the node agent. Settings come from `--config <file>` (YAML) and the
//! environment (see `margay_node::config`).

use anyhow::Context;
use margay_node::agent::Agent;
use margay_node::config::NodeConfig;
use margay_node::logging::LogControl;
use std::sync::Arc;

/// JSON logs on stderr, filtered by `MARGAY_LOG` (a `tracing` filter) or the configured level;
/// the BGPConfiguration's `logSeverityScreen` then sets the BGP targets' level at run time.
fn init_logging(level: &str) -> anyhow::Result<LogControl> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let base = std::env::var("MARGAY_LOG").unwrap_or_else(|_| level.to_owned());
    let (filter, control) = LogControl::new(&base).map_err(anyhow::Error::msg)?;
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .json(),
        )
        .try_init()
        .context("installing the logger")?;
    Ok(control)
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
    let log = init_logging(&cfg.log_level)?;
    let health_addr = cfg.health_listen;
    let metrics_addr = cfg.metrics_listen;
    let (agent, status) = Agent::start(cfg).await?;
    let agent = agent.with_log_control(log);
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
