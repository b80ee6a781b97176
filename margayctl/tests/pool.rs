//! `margayctl pool` against a real etcd, run as a user would run it.

use margay_api::store::etcd::EtcdBackend;
use margay_api::{IPAMBlock, IPAMBlockSpec, IPPool, Store};
use margay_testkit::EtcdProcess;
use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

const PREFIX: &str = "/margay-cli-test/";

fn margayctl(etcd: &EtcdProcess, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_margayctl"))
        .args([
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--etcd-prefix",
            PREFIX,
        ])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("margayctl runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("margayctl finishes")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const TWO_POOLS: &str = "\
apiVersion: margay.io/v1
kind: IPPool
metadata: {name: default-ipv4}
spec: {cidr: 10.244.0.0/16, vxlanMode: CrossSubnet, natOutgoing: true}
---
apiVersion: margay.io/v1
kind: IPPool
metadata: {name: default-ipv6}
spec: {cidr: 'fd00:10:244::/64'}
";

#[tokio::test]
async fn pools_are_applied_validated_listed_disabled_and_deleted() {
    let etcd = EtcdProcess::start().await.expect("etcd starts");
    let store = Store::new(Arc::new(
        EtcdBackend::connect(etcd.config(PREFIX))
            .await
            .expect("connect"),
    ));

    let out = margayctl(&etcd, &["pool", "apply", "-f", "-"], Some(TWO_POOLS));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "ippool/default-ipv4 created\nippool/default-ipv6 created\n"
    );
    let again = margayctl(&etcd, &["pool", "apply", "-f", "-"], Some(TWO_POOLS));
    assert!(text(&again.stdout).contains("default-ipv4 unchanged"));

    // A file with one good and one bad pool changes nothing and names the bad field.
    let mixed = "kind: IPPool\napiVersion: margay.io/v1\nmetadata: {name: extra}\nspec: {cidr: 10.9.0.0/24}\n---\nkind: IPPool\napiVersion: margay.io/v1\nmetadata: {name: broken}\nspec: {cidr: 10.8.0.0/16, blockSize: 40}\n";
    let bad = margayctl(&etcd, &["pool", "apply", "-f", "-"], Some(mixed));
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        text(&bad.stderr).contains("spec.blockSize: \"40\": must be between 20 and 32"),
        "{}",
        text(&bad.stderr)
    );
    let (pools, _) = store.list::<IPPool>().await.unwrap();
    assert_eq!(pools.len(), 2, "nothing from the rejected file was written");

    // Overlaps and changes to immutable fields are refused.
    let overlap = "kind: IPPool\napiVersion: margay.io/v1\nmetadata: {name: inner}\nspec: {cidr: 10.244.8.0/24}\n";
    let out = margayctl(&etcd, &["pool", "apply", "-f", "-"], Some(overlap));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("overlaps pool default-ipv4"),
        "{}",
        text(&out.stderr)
    );
    let moved = "kind: IPPool\napiVersion: margay.io/v1\nmetadata: {name: default-ipv4}\nspec: {cidr: 10.245.0.0/16}\n";
    let out = margayctl(&etcd, &["pool", "apply", "-f", "-"], Some(moved));
    assert!(
        text(&out.stderr).contains("spec.cidr cannot change"),
        "{}",
        text(&out.stderr)
    );

    // Listing as JSON gives the objects; the table shows use.
    let out = margayctl(&etcd, &["pool", "list", "-o", "json"], None);
    let listed: Vec<IPPool> = serde_json::from_slice(&out.stdout).expect("json list");
    assert_eq!(listed.len(), 2);

    let out = margayctl(&etcd, &["pool", "disable", "default-ipv4"], None);
    assert!(out.status.success());
    let pool: IPPool = store.get("default-ipv4").await.unwrap();
    assert!(pool.spec.disabled);

    // A pool with addresses in use is not deleted without --force.
    let mut allocations = vec![None; 64];
    allocations[3] = Some(0);
    let block = IPAMBlock::new(
        "10-244-0-0-26",
        IPAMBlockSpec {
            cidr: "10.244.0.0/26".into(),
            affinity: Some("host:n1".into()),
            allocations,
            unallocated: (0..64).filter(|o| *o != 3).collect(),
            attributes: vec![margay_api::AllocationAttribute {
                handle_id: Some("k8s-pod-network.abc".into()),
                secondary: Default::default(),
            }],
            ..Default::default()
        },
    );
    store.create(&block).await.expect("block");
    let out = margayctl(&etcd, &["pool", "list"], None);
    let table = text(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("default-ipv4") && l.contains(" 1 ")),
        "table shows one address in use:\n{table}"
    );
    let out = margayctl(&etcd, &["pool", "delete", "default-ipv4"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("1 addresses in use"),
        "{}",
        text(&out.stderr)
    );
    let out = margayctl(&etcd, &["pool", "delete", "default-ipv4", "--force"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(store
        .try_get::<IPPool>("default-ipv4")
        .await
        .unwrap()
        .is_none());
}
