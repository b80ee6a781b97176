//! Logs of a plugin run: to `log_file` when the configuration names one, else to stderr
//! (stdout carries only the CNI result). stdin is never logged: it can hold credentials.

use crate::config::NetConf;
use std::fs::OpenOptions;
use std::sync::Mutex;
use tracing_subscriber::EnvFilter;

/// Installs the subscriber for this process, at `log_level` (default `info`).
pub fn init(conf: &NetConf) {
    let level = match conf
        .log_level
        .as_deref()
        .unwrap_or("info")
        .to_ascii_lowercase()
        .as_str()
    {
        "warning" => "warn".to_owned(),
        other => other.to_owned(),
    };
    let filter = EnvFilter::new(format!("{level},kube=warn,hyper=warn,tower=warn,h2=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    if let Some(path) = &conf.log_file {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => {
                let _ = builder.with_writer(Mutex::new(f)).try_init();
                return;
            }
            Err(e) => eprintln!(
                "margay: cannot open log_file {}: {e}; logging to stderr",
                path.display()
            ),
        }
    }
    let _ = builder.with_writer(std::io::stderr).try_init();
}
