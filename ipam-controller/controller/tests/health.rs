//! The controller's probes tell the truth: `/readyz` follows the replica's role and the
//! datastore, `/livez` the main loop. Two replicas on a real etcd; etcd is stopped and started
//! again under them.

mod common;

use common::Replica;
use margay_testkit::EtcdProcess;
use std::path::Path;
use std::time::{Duration, Instant};

/// A replica on `etcd`, holding leadership for 3 s.
fn start(etcd: &EtcdProcess, identity: &str, dir: &Path) -> Replica {
    let endpoint = etcd.endpoint();
    Replica::start(
        identity,
        Duration::from_secs(3),
        dir,
        &[
            ("MARGAY_DATASTORE_TYPE", "etcd"),
            ("MARGAY_ETCD_ENDPOINTS", &endpoint),
        ],
    )
}

/// Waits until `ok` holds for both replicas' `/readyz` answers; panics with both logs if not.
async fn wait_ready(reps: &[&Replica], what: &str, ok: impl Fn(&[(u16, String)]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = reps
            .iter()
            .map(|r| r.probe("/readyz").unwrap_or((0, "no answer".into())))
            .collect::<Vec<_>>();
        if ok(&last) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{what}: last answers {last:?}\nlog a:\n{}\nlog b:\n{}",
        reps[0].log(),
        reps[1].log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_role_and_datastore_and_comes_back() {
    let mut etcd = EtcdProcess::start().await.expect("start etcd");
    let dir = tempfile::tempdir().expect("tempdir");
    let a = start(&etcd, "health-a", dir.path());
    let b = start(&etcd, "health-b", dir.path());

    // One leads, the other follows; both ready, each saying which.
    wait_ready(&[&a, &b], "one leader and one standby", |r| {
        let mut bodies: Vec<&str> = r.iter().map(|(_, b)| b.trim()).collect();
        bodies.sort();
        r.iter().all(|(c, _)| *c == 200) && bodies == ["leader", "standby, following the leader"]
    })
    .await;

    // Without etcd neither can be ready; both stay live (their loops go on, retrying).
    etcd.stop().await;
    wait_ready(&[&a, &b], "not ready while etcd is down", |r| {
        r.iter().all(|(c, _)| *c == 503)
    })
    .await;
    for rep in [&a, &b] {
        let (code, body) = rep
            .probe("/readyz")
            .unwrap_or_else(|| panic!("readyz answers:\n{}", rep.log()));
        assert_eq!(code, 503);
        assert!(!body.trim().is_empty(), "a 503 says why");
        let (code, body) = rep
            .probe("/livez")
            .unwrap_or_else(|| panic!("livez answers:\n{}", rep.log()));
        assert_eq!(code, 200, "live while retrying: {body}");
    }

    // etcd back: ready again, one leader.
    etcd.restart().await.expect("restart etcd");
    wait_ready(&[&a, &b], "ready again after etcd came back", |r| {
        r.iter().all(|(c, _)| *c == 200)
            && r.iter().filter(|(_, b)| b.trim() == "leader").count() == 1
    })
    .await;
    let (code, metrics) = a.probe("/metrics").expect("metrics answer");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("margay_ipam_controller_leader"),
        "{metrics}"
    );
}
