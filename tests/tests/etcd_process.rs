//! The harness's etcd process: free ports, readiness, restart with its data, and cleanup by PID.

use margay_testkit::EtcdProcess;
use nix::sys::signal::kill;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

fn alive(pid: u32) -> bool {
    // Signal 0 checks that the process exists without touching it.
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_etcds_get_their_own_ports_and_are_cleaned_up_on_drop() {
    let (a, b) = tokio::join!(EtcdProcess::start(), EtcdProcess::start());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.endpoint(), b.endpoint());
    let pid = a.pid().unwrap();
    let dir = a.data_dir();
    assert!(alive(pid));
    assert!(dir.exists());

    let mut client = a.client().await.unwrap();
    client.put("k", "v", None).await.unwrap();
    let mut other = b.client().await.unwrap();
    assert!(
        other.get("k", None).await.unwrap().kvs().is_empty(),
        "separate stores"
    );

    drop(a);
    // Dropping stops and reaps the process, then removes the directory.
    let deadline = Instant::now() + Duration::from_secs(2);
    while alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "etcd {pid} still running after drop");
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_endpoint_and_the_data_and_compact_discards_history() {
    let mut etcd = EtcdProcess::start().await.unwrap();
    let endpoint = etcd.endpoint();
    let mut client = etcd.client().await.unwrap();
    client.put("k", "v1", None).await.unwrap();
    client.put("k", "v2", None).await.unwrap();
    let rev = etcd.revision().await.unwrap();

    etcd.stop().await;
    assert!(!etcd.is_running());
    let probe = tokio::time::timeout(Duration::from_secs(2), async {
        let mut c = etcd.client().await?;
        c.get("k", None).await.map_err(anyhow::Error::from)
    })
    .await;
    assert!(
        !matches!(probe, Ok(Ok(_))),
        "a stopped etcd does not answer"
    );
    etcd.restart().await.unwrap();
    assert_eq!(etcd.endpoint(), endpoint);
    let mut client = etcd.client().await.unwrap();
    let got = client.get("k", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"v2");

    etcd.compact(rev).await.unwrap();
    let old = client
        .get(
            "k",
            Some(etcd_client::GetOptions::new().with_revision(rev as i64 - 1)),
        )
        .await;
    assert!(
        old.is_err(),
        "history before the compaction is gone: {old:?}"
    );
}
