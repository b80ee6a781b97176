//! The IPAM controller's logic, driven by the `margay-ipam-controller` binary and by tests.
//!
//! - [`gc`]: garbage collection of leaked addresses, dead nodes' blocks and stale records.
//! - [`pools`]: pool validation (overlaps, immutable fields) into status conditions.
//! - [`leader`]: leader election (etcd lease or Kubernetes Lease).
//! - [`live`]: liveness from the Kubernetes API (pods, nodes) for Kubernetes mode.
//! - [`metrics`]: Prometheus metrics and the endpoint that serves them with [`health`].
//! - [`health`]: readiness (role, datastore) and liveness (main loop progress).
//! - [`Controller`]: one reconcile pass of all of it.

pub mod gc;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod pools;

use gc::{GarbageCollector, GcAction, GcConfig};
use margay_api::Store;
use margay_ipam::live::LiveSource;
use metrics::Metrics;
use std::sync::Arc;
use tracing::warn;

/// Pool validation, garbage collection and metrics, run together once per interval by the
/// leader.
pub struct Controller {
    store: Store,
    gc: GarbageCollector,
    metrics: Arc<Metrics>,
    clock: margay_ipam::Clock,
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    pub pools: Vec<pools::PoolFindings>,
    pub gc: Vec<GcAction>,
}

impl Controller {
    pub fn new(store: Store, gc: GcConfig, metrics: Arc<Metrics>) -> Controller {
        let clock = gc.clock.clone();
        Controller {
            gc: GarbageCollector::new(store.clone(), gc, metrics.clone()),
            store,
            metrics,
            clock,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Validates pools and collects garbage. A failing step is logged and counted, and the
    /// other still runs; the first error is returned.
    pub async fn pass(&mut self, live: &dyn LiveSource) -> Result<PassReport, anyhow::Error> {
        let mut report = PassReport::default();
        let mut first_err = None;
        match pools::validate(&self.store, self.clock.now()).await {
            Ok(p) => report.pools = p,
            Err(e) => {
                warn!(error = %e, "pool validation failed; retrying next pass");
                self.metrics.error("pools");
                first_err = Some(anyhow::Error::new(e).context("pool validation"));
            }
        }
        match self.gc.pass(live).await {
            Ok(a) => report.gc = a,
            Err(e) => {
                warn!(error = %e, "garbage collection failed; retrying next pass");
                self.metrics.error("gc");
                first_err.get_or_insert(anyhow::Error::new(e).context("garbage collection"));
            }
        }
        self.metrics.pass_done();
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
}
