//! The single kernel-route writer of a process.
//!
//! One thread owns one [`Netlink`] socket and executes, in arrival order, what the handles
//! ([`RouteWriter`], cheap to clone) submit: batches of [`WriteOp`]s, dumps, sweeps, and
//! arbitrary closures over the socket (for link and tunnel set-up, so that those writes go
//! through the same owner too). Jobs that are already queued when the thread wakes up are
//! merged into one pipelined batch. Every submitter gets one result per op back.
//!
//! The thread ends when the last handle is dropped.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::route::{plan_sweep, KernelRoute, RouteFilter, RouteKey, WriteOp, MARGAY_RT_PROTO};
use crate::{KernelError, Netlink};

type Reply<T> = oneshot::Sender<T>;
type Closure = Box<dyn FnOnce(&mut Netlink) + Send>;
/// One result per op of an `Apply` job.
type ApplyResults = Vec<Result<(), KernelError>>;
/// Apply jobs waiting for the merged batch: how many ops each had, and where to answer.
type PendingApplies = Vec<(usize, Reply<ApplyResults>)>;

enum Job {
    Apply(Vec<WriteOp>, Reply<ApplyResults>),
    Dump(RouteFilter, Reply<Result<Vec<KernelRoute>, KernelError>>),
    Sweep(
        RouteFilter,
        HashSet<RouteKey>,
        Reply<Result<SweepReport, KernelError>>,
    ),
    Run(Closure),
}

/// What a sweep removed, and what it could not.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Margay routes that were installed and not desired, now deleted.
    pub removed: Vec<RouteKey>,
    /// Stale routes whose delete failed.
    pub failed: Vec<(RouteKey, KernelError)>,
    /// Margay routes found (before the sweep) within the filter.
    pub examined: usize,
}

/// Handle to the route writer thread. Clone it freely; all clones feed the same thread.
#[derive(Clone)]
pub struct RouteWriter {
    tx: mpsc::Sender<Job>,
}

impl RouteWriter {
    /// Starts the writer thread with a socket in this process's network namespace (of the
    /// calling thread), or in the namespace at `netns`.
    pub fn spawn(netns: Option<PathBuf>) -> Result<(RouteWriter, JoinHandle<()>), KernelError> {
        let nl = match &netns {
            None => Netlink::open()?,
            Some(p) => Netlink::open_in(p)?,
        };
        Ok(Self::with_socket(nl))
    }

    /// Starts the writer thread on an existing connection.
    pub fn with_socket(mut nl: Netlink) -> (RouteWriter, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("margay-route-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    jobs.extend(rx.try_iter());
                    run_jobs(&mut nl, jobs);
                }
            })
            .expect("spawning the route writer thread");
        (RouteWriter { tx }, handle)
    }

    fn submit(&self, job: Job) -> Result<(), KernelError> {
        self.tx.send(job).map_err(|_| KernelError::WriterGone)
    }

    /// Applies `ops` and returns one result per op, in order.
    pub async fn apply(
        &self,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<(), KernelError>>, KernelError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Apply(ops, tx))?;
        rx.await.map_err(|_| KernelError::WriterGone)
    }

    /// [`Self::apply`] for callers outside an async runtime.
    pub fn apply_blocking(
        &self,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<(), KernelError>>, KernelError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Apply(ops, tx))?;
        rx.blocking_recv().map_err(|_| KernelError::WriterGone)
    }

    /// Dumps the routes matching `filter`.
    pub async fn dump(&self, filter: RouteFilter) -> Result<Vec<KernelRoute>, KernelError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Dump(filter, tx))?;
        rx.await.map_err(|_| KernelError::WriterGone)?
    }

    pub fn dump_blocking(&self, filter: RouteFilter) -> Result<Vec<KernelRoute>, KernelError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Dump(filter, tx))?;
        rx.blocking_recv().map_err(|_| KernelError::WriterGone)?
    }

    /// Mark and sweep: deletes every Margay route (protocol [`MARGAY_RT_PROTO`]) within
    /// `scope` (its protocol field is ignored) whose key is not in `desired`. Routes of other
    /// protocols are never touched. Run at start-up, after the desired set is known.
    pub async fn sweep(
        &self,
        scope: RouteFilter,
        desired: HashSet<RouteKey>,
    ) -> Result<SweepReport, KernelError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Sweep(scope, desired, tx))?;
        rx.await.map_err(|_| KernelError::WriterGone)?
    }

    pub fn sweep_blocking(
        &self,
        scope: RouteFilter,
        desired: HashSet<RouteKey>,
    ) -> Result<SweepReport, KernelError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Sweep(scope, desired, tx))?;
        rx.blocking_recv().map_err(|_| KernelError::WriterGone)?
    }

    /// Runs `f` on the writer thread with its socket: link, address and tunnel changes go
    /// through the same single writer.
    pub async fn run<T, F>(&self, f: F) -> Result<T, KernelError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Netlink) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Run(Box::new(move |nl| {
            let _ = tx.send(f(nl));
        })))?;
        rx.await.map_err(|_| KernelError::WriterGone)
    }

    pub fn run_blocking<T, F>(&self, f: F) -> Result<T, KernelError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Netlink) -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Job::Run(Box::new(move |nl| {
            let _ = tx.send(f(nl));
        })))?;
        rx.blocking_recv().map_err(|_| KernelError::WriterGone)
    }
}

fn run_jobs(nl: &mut Netlink, jobs: Vec<Job>) {
    // Consecutive Apply jobs become one pipelined batch; everything else keeps its place.
    let mut pending: PendingApplies = Vec::new();
    let mut ops: Vec<WriteOp> = Vec::new();
    let flush = |nl: &mut Netlink, ops: &mut Vec<WriteOp>, pending: &mut PendingApplies| {
        if pending.is_empty() {
            return;
        }
        let mut results = nl.apply(ops).into_iter();
        for (n, reply) in pending.drain(..) {
            let mine: Vec<_> = results.by_ref().take(n).collect();
            let _ = reply.send(mine);
        }
        ops.clear();
    };
    for job in jobs {
        match job {
            Job::Apply(mut o, reply) => {
                pending.push((o.len(), reply));
                ops.append(&mut o);
            }
            Job::Dump(filter, reply) => {
                flush(nl, &mut ops, &mut pending);
                let _ = reply.send(nl.routes(&filter));
            }
            Job::Sweep(scope, desired, reply) => {
                flush(nl, &mut ops, &mut pending);
                let _ = reply.send(sweep(nl, scope, &desired));
            }
            Job::Run(f) => {
                flush(nl, &mut ops, &mut pending);
                f(nl);
            }
        }
    }
    flush(nl, &mut ops, &mut pending);
}

fn sweep(
    nl: &mut Netlink,
    mut scope: RouteFilter,
    desired: &HashSet<RouteKey>,
) -> Result<SweepReport, KernelError> {
    scope.protocol = Some(MARGAY_RT_PROTO);
    let installed = nl.routes(&scope)?;
    let stale = plan_sweep(&installed, desired, MARGAY_RT_PROTO);
    let ops: Vec<WriteOp> = stale.iter().copied().map(WriteOp::DeleteRoute).collect();
    let mut report = SweepReport {
        examined: installed.len(),
        ..Default::default()
    };
    for (key, r) in stale.into_iter().zip(nl.apply(&ops)) {
        match r {
            Ok(()) => report.removed.push(key),
            Err(e) => report.failed.push((key, e)),
        }
    }
    if !report.removed.is_empty() {
        tracing::info!(removed = report.removed.len(), "swept stale Margay routes");
    }
    Ok(report)
}
