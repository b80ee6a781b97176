//! The agent's log filter, which the BGPConfiguration's `logSeverityScreen` changes at run
//! time for the BGP speaker's messages (and the agent's own BGP driver).

use margay_api::LogSeverity;
use std::sync::Mutex;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The log targets `logSeverityScreen` governs: the speaker, its wire codec, the agent's BGP.
pub const BGP_TARGETS: [&str; 3] = ["margay_bgp", "margay_bgp_wire", "margay_peering"];

/// Changes the BGP part of the running log filter.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    /// The filter the agent started with (`MARGAY_LOG`, or its log level).
    base: String,
    bgp: Mutex<Option<LogSeverity>>,
}

/// `tracing`'s name for a severity (it has no "fatal": errors only).
pub fn level_of(s: LogSeverity) -> &'static str {
    match s {
        LogSeverity::Debug => "debug",
        LogSeverity::Info => "info",
        LogSeverity::Warning => "warn",
        LogSeverity::Error | LogSeverity::Fatal => "error",
    }
}

/// The filter `base` with the BGP targets at `bgp` (none: as `base` says).
pub fn filter_text(base: &str, bgp: Option<LogSeverity>) -> String {
    let mut f = base.to_owned();
    if let Some(s) = bgp {
        for t in BGP_TARGETS {
            f.push_str(&format!(",{t}={}", level_of(s)));
        }
    }
    f
}

impl LogControl {
    /// A reloadable filter layer starting as `base`, and its control.
    pub fn new(base: &str) -> Result<(reload::Layer<EnvFilter, Registry>, LogControl), String> {
        let filter = EnvFilter::try_new(base).map_err(|e| format!("log filter {base:?}: {e}"))?;
        let (layer, handle) = reload::Layer::new(filter);
        Ok((
            layer,
            LogControl {
                handle,
                base: base.to_owned(),
                bgp: Mutex::new(None),
            },
        ))
    }

    /// Sets the BGP targets' level (`None`: back to the base filter); true when it changed.
    pub fn set_bgp(&self, sev: Option<LogSeverity>) -> Result<bool, String> {
        let mut cur = self.bgp.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == sev {
            return Ok(false);
        }
        let text = filter_text(&self.base, sev);
        let filter = EnvFilter::try_new(&text).map_err(|e| format!("log filter {text:?}: {e}"))?;
        self.handle
            .reload(filter)
            .map_err(|e| format!("reloading the log filter: {e}"))?;
        *cur = sev;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_severity_screen_changes_what_the_bgp_targets_log_at_run_time() {
        let buf = Buf::default();
        let (layer, control) = LogControl::new("info").unwrap();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(layer).with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || w.clone())
                .with_ansi(false),
        );
        let text = || String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        tracing::subscriber::with_default(sub, || {
            tracing::debug!(target: "margay_bgp::speaker", "hidden at info");
            assert!(control.set_bgp(Some(LogSeverity::Debug)).unwrap());
            tracing::debug!(target: "margay_bgp::speaker", "shown at debug");
            tracing::debug!(target: "margay_node::agent", "others stay at info");
            assert!(
                !control.set_bgp(Some(LogSeverity::Debug)).unwrap(),
                "no change"
            );
            assert!(control.set_bgp(Some(LogSeverity::Warning)).unwrap());
            tracing::info!(target: "margay_bgp::session", "hidden at warning");
            tracing::warn!(target: "margay_bgp::session", "shown at warning");
            assert!(control.set_bgp(None).unwrap());
            tracing::info!(target: "margay_bgp::session", "base filter again");
        });
        let t = text();
        assert!(!t.contains("hidden"), "{t}");
        assert!(!t.contains("others stay"), "{t}");
        for want in ["shown at debug", "shown at warning", "base filter again"] {
            assert!(t.contains(want), "{want}: {t}");
        }
    }

    #[test]
    fn fatal_maps_to_error_and_the_base_filter_is_kept() {
        assert_eq!(
            filter_text("warn,margay_node=debug", Some(LogSeverity::Fatal)),
            "warn,margay_node=debug,margay_bgp=error,margay_bgp_wire=error,margay_peering=error"
        );
        assert_eq!(filter_text("info", None), "info");
    }
}
