//! Netlink change notifications, in a namespace the test creates.

mod common;

use std::time::Duration;

use common::{all_ok, can_run, ip, netns, nl};
use ipnet::IpNet;
use margay_kernel::events::{
    Change, Coalescer, CoalescerConfig, CoalescingSubscription, EventBatch, EventSubscription,
    KernelEvent,
};
use margay_kernel::{Route, RouteWriter, WriteOp, MARGAY_RT_PROTO};

/// Reads events until `pred` matches one, or panics after 5 s.
async fn wait_for(sub: &mut EventSubscription, what: &str, pred: impl Fn(&KernelEvent) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => panic!("no event {what} within 5 s"),
            Ok(Err(e)) => panic!("event stream failed: {e}"),
            Ok(Ok(ev)) if pred(&ev) => return,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn netns_events_see_route_deleted_by_hand_and_links() {
    if !can_run("netns_events_see_route_deleted_by_hand_and_links") {
        return;
    }
    let ns = netns();
    let _ = nl(&ns);
    let mut sub = EventSubscription::open(Some(ns.path())).unwrap();
    let (w, _t) = RouteWriter::spawn(Some(ns.path().to_path_buf())).unwrap();
    let block: IpNet = "10.80.0.0/24".parse().unwrap();
    all_ok(
        &w.apply(vec![WriteOp::ReplaceRoute(Route::blackhole(block))])
            .await
            .unwrap(),
    );
    wait_for(&mut sub, "our route added", |e| {
        matches!(e, KernelEvent::Route(r) if r.change == Change::New && r.route.dst == block
            && r.route.protocol == MARGAY_RT_PROTO)
    })
    .await;

    // Someone deletes our route by hand.
    ip(&ns, &["route", "del", "blackhole", "10.80.0.0/24"]);
    wait_for(&mut sub, "our route deleted", |e| {
        matches!(e, KernelEvent::Route(r) if r.change == Change::Deleted && r.route.dst == block
            && r.route.protocol == MARGAY_RT_PROTO)
    })
    .await;

    // Links come and go.
    ip(
        &ns,
        &[
            "link", "add", "evt0", "type", "veth", "peer", "name", "evt1",
        ],
    );
    wait_for(
        &mut sub,
        "link evt0 added",
        |e| matches!(e, KernelEvent::Link(l) if l.change == Change::New && l.name == "evt0"),
    )
    .await;
    ip(&ns, &["link", "del", "evt0"]);
    wait_for(
        &mut sub,
        "link evt0 deleted",
        |e| matches!(e, KernelEvent::Link(l) if l.change == Change::Deleted && l.name == "evt0"),
    )
    .await;
}

#[tokio::test]
async fn netns_events_coalesced_workload_storm() {
    if !can_run("netns_events_coalesced_workload_storm") {
        return;
    }
    let ns = netns();
    let mut n = nl(&ns);
    let sub = EventSubscription::open(Some(ns.path())).unwrap();
    let mut co = CoalescingSubscription::new(
        sub,
        Coalescer::new(CoalescerConfig {
            window: Duration::from_millis(300),
            ..Default::default()
        }),
    );
    // A pod storm: 30 cali veths with host routes, created and deleted.
    for i in 0..30 {
        let name = format!("cali{i:011x}");
        ip(
            &ns,
            &[
                "link",
                "add",
                &name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("p{i}"),
            ],
        );
        ip(&ns, &["link", "set", &name, "up"]);
        let dst = format!("10.65.0.{i}/32");
        all_ok(&n.apply(&[WriteOp::ReplaceRoute(Route::dev(
            dst.parse().unwrap(),
            name.as_str(),
        ))]));
        ip(&ns, &["link", "del", &name]);
    }
    // Then a Margay route is removed behind the agent's back.
    all_ok(&n.apply(&[WriteOp::ReplaceRoute(Route::blackhole(
        "10.81.0.0/24".parse().unwrap(),
    ))]));
    ip(&ns, &["route", "del", "blackhole", "10.81.0.0/24"]);

    // The veth peers (p0…) are not workload links, so batches may come before the one with
    // the route deletion; read until it arrives.
    let mut batches = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !batches
        .last()
        .is_some_and(|b: &EventBatch| b.touches_margay_routes())
    {
        let b = tokio::time::timeout_at(deadline, co.next_batch())
            .await
            .expect("a batch with the Margay route deletion within 5 s")
            .unwrap();
        batches.push(b);
    }
    for b in &batches {
        assert!(
            b.links.iter().all(|l| !l.name.starts_with("cali")),
            "workload links are filtered: {:?}",
            b.links
        );
        assert!(
            b.routes
                .iter()
                .all(|r| !r.route.dst.to_string().starts_with("10.65.0.")),
            "routes through workload links are filtered: {:?}",
            b.routes
        );
    }
    let suppressed: u64 = batches.iter().map(|b| b.suppressed).sum();
    assert!(suppressed >= 60, "storm counted: {suppressed}");
    assert!(
        batches
            .last()
            .unwrap()
            .routes
            .iter()
            .any(|r| r.change == Change::Deleted && r.route.dst.to_string() == "10.81.0.0/24"),
        "{batches:?}"
    );
}
