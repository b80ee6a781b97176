//! Leader election through an etcd lease, on a real etcd.

use margay_ipam_controller::leader::{EtcdLeaderElector, LeaderElector};
use margay_testkit::EtcdProcess;
use std::time::Duration;

#[tokio::test]
async fn one_replica_leads_and_the_other_takes_over_when_it_lets_go_or_dies() {
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let ttl = Duration::from_secs(3);
    let mut a = EtcdLeaderElector::new(etcd.client().await.unwrap(), "/margay/v1/", "a", ttl);
    let mut b = EtcdLeaderElector::new(etcd.client().await.unwrap(), "/margay/v1/", "b", ttl);
    a.acquire().await.unwrap();
    assert_eq!(a.leader().await.unwrap().as_deref(), Some("a"));
    assert!(a.renew().await.unwrap());
    // b waits while a renews.
    let waited = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            tokio::select! {
                r = b.acquire() => return r,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    assert!(a.renew().await.unwrap(), "a lost a lease it kept renewing");
                }
            }
        }
    })
    .await;
    assert!(waited.is_err(), "b became leader while a held the lease");
    // a lets go: b leads.
    a.release().await;
    tokio::time::timeout(Duration::from_secs(5), b.acquire())
        .await
        .expect("b should lead once a released")
        .unwrap();
    assert_eq!(b.leader().await.unwrap().as_deref(), Some("b"));
    // b dies without releasing (no more renewals): a takes over after the lease expires.
    drop(b);
    tokio::time::timeout(Duration::from_secs(10), a.acquire())
        .await
        .expect("a should lead once b's lease expired")
        .unwrap();
    assert_eq!(a.leader().await.unwrap().as_deref(), Some("a"));
}
