//! Wall-clock time in whole seconds, replaceable in tests (cooldowns, claim ages, GC grace).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The system clock, or a manual one that tests advance.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stands at `unix_secs` until advanced.
    pub fn manual(unix_secs: u64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(unix_secs))),
        }
    }

    /// Moves a manual clock forward; no effect on the system clock.
    pub fn advance(&self, secs: u64) {
        if let Some(m) = &self.manual {
            m.fetch_add(secs, Ordering::SeqCst);
        }
    }

    /// Seconds since the Unix epoch.
    pub fn now(&self) -> u64 {
        match &self.manual {
            Some(m) => m.load(Ordering::SeqCst),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// Microseconds since the epoch; seeds block sequence numbers so that a block deleted and
    /// created again never reuses a sequence number a stale release could carry.
    pub fn now_micros(&self) -> u64 {
        match &self.manual {
            Some(m) => m.load(Ordering::SeqCst).saturating_mul(1_000_000),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
        }
    }
}

pub use margay_api::time::{parse_rfc3339, rfc3339};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_advances() {
        let c = Clock::manual(100);
        c.advance(5);
        assert_eq!(c.now(), 105);
    }
}
