//! What the etcd backend does beyond the shared contract: its key layout, prefixes, paging,
//! and behaviour when etcd stops, crashes and comes back. Each test starts its own etcd.

use futures::StreamExt;
use margay_api::store::etcd::EtcdBackend;
use margay_api::{Backend, IPAMHandle, IPPool, IPPoolSpec, Kind, Store, StoreError, WatchEvent};
use margay_testkit::contract::{handle, pool};
use margay_testkit::EtcdProcess;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bound the issue sets on noticing that etcd is gone.
const PROMPT: Duration = Duration::from_secs(5);

async fn etcd() -> EtcdProcess {
    EtcdProcess::start().await.expect("starting etcd")
}

/// A backend with short timeouts, so that outages are reported quickly.
async fn quick_backend(etcd: &EtcdProcess, prefix: &str) -> EtcdBackend {
    let mut cfg = etcd.config(prefix);
    cfg.request_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.watch_reconnect = Duration::from_secs(15);
    EtcdBackend::connect(cfg).await.unwrap()
}

fn assert_unavailable<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str, endpoint: &str) {
    match r {
        Err(e @ StoreError::Unavailable { .. }) => {
            assert!(
                e.to_string().contains(endpoint),
                "{what}: the error names the endpoint: {e}"
            );
        }
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
}

/// Retries `f` until it succeeds or `within` passes (reconnection takes a moment).
async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("still failing after {within:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_stored_under_prefix_plural_name_without_their_revision() {
    let etcd = etcd().await;
    let store = Store::new(Arc::new(quick_backend(&etcd, "/layout-test/").await));
    let created = store.create(&pool("default", "10.0.0.0/16")).await.unwrap();

    let mut client = etcd.client().await.unwrap();
    let resp = client
        .get("/layout-test/ippools/default", None)
        .await
        .unwrap();
    let kv = resp.kvs().first().expect("the object's key exists");
    let doc: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    assert_eq!(doc["apiVersion"], "margay.io/v1");
    assert_eq!(doc["kind"], "IPPool");
    assert_eq!(doc["metadata"]["name"], "default");
    assert_eq!(doc["spec"]["cidr"], "10.0.0.0/16");
    assert!(
        doc["metadata"].get("resourceVersion").is_none(),
        "the revision is the key's, not stored in the document: {doc}"
    );
    assert_eq!(
        created.metadata.resource_version.as_deref(),
        Some(kv.mod_revision().to_string().as_str()),
        "the object's revision is the key's mod_revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_isolate_stores_on_one_etcd() {
    let etcd = etcd().await;
    let a = Store::new(Arc::new(quick_backend(&etcd, "/tenant-a/").await));
    let b = Store::new(Arc::new(quick_backend(&etcd, "/tenant-b/").await));
    a.create(&pool("p", "10.0.0.0/16")).await.unwrap();
    assert!(b.try_get::<IPPool>("p").await.unwrap().is_none());
    let (items, _) = b.list::<IPPool>().await.unwrap();
    assert!(items.is_empty());
    b.create(&pool("p", "10.1.0.0/16")).await.unwrap();
    assert_eq!(a.get::<IPPool>("p").await.unwrap().spec.cidr, "10.0.0.0/16");
}

/// A batch read whose listing is longer than one page finishes it with paged reads at the
/// batch's revision: nothing missing, nothing written after the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_longer_than_a_page_is_completed_at_its_revision() {
    let etcd = etcd().await;
    let mut cfg = etcd.config("/paged/");
    cfg.page_size = 3;
    let backend = EtcdBackend::connect(cfg).await.unwrap();
    let store = Store::new(Arc::new(backend));
    for i in 0..10 {
        store.create(&handle(&format!("n-{i:02}"))).await.unwrap();
    }
    store.create(&handle("m-00")).await.unwrap();
    let mut set = store
        .read(
            margay_api::Reads::new()
                .list_prefix::<IPAMHandle>("n-")
                .get::<IPAMHandle>("m-00"),
        )
        .await
        .unwrap();
    let (items, revision) = set.list::<IPAMHandle>(0).unwrap();
    let names: Vec<String> = items
        .iter()
        .filter_map(|h| h.metadata.name.clone())
        .collect();
    let want: Vec<String> = (0..10).map(|i| format!("n-{i:02}")).collect();
    assert_eq!(names, want, "every page of the prefix, once, in order");
    assert!(set.get::<IPAMHandle>(1).unwrap().is_some());
    assert_eq!(revision, etcd.revision().await.unwrap());
    let mut names = store.list_names::<IPAMHandle>().await.unwrap();
    names.sort();
    assert_eq!(names.len(), 11, "keys-only listing pages too: {names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50k_object_list_is_read_in_pages_at_one_revision() {
    const OBJECTS: usize = 50_000;
    let etcd = etcd().await;
    let backend = quick_backend(&etcd, "/big/").await;
    // Write the objects straight into etcd, 100 keys per transaction (etcd's limit is 128):
    // the test is about reading, and 50,000 single creates would take minutes.
    let mut client = etcd.client().await.unwrap();
    let template = serde_json::to_value(handle("h")).unwrap();
    for chunk in (0..OBJECTS).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<_> = chunk
            .iter()
            .map(|i| {
                let name = format!("h{i:05}");
                let mut doc = template.clone();
                doc["metadata"]["name"] = name.clone().into();
                doc["spec"]["handleID"] = name.clone().into();
                etcd_client::TxnOp::put(
                    backend.key(Kind::IPAMHandle, &name),
                    serde_json::to_vec(&doc).unwrap(),
                    None,
                )
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    let before = etcd.revision().await.unwrap();

    // Writes during the listing must not show up in it: it is read at one revision.
    let store = Store::new(Arc::new(backend.clone()));
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                store.create(&handle(&format!("late{i}"))).await.unwrap();
            }
        })
    };
    let (items, revision) = store.list::<IPAMHandle>().await.unwrap();
    writer.await.unwrap();
    let names: Vec<&str> = items
        .iter()
        .filter_map(|h| h.metadata.name.as_deref())
        .collect();
    let expected: Vec<String> = (0..OBJECTS).map(|i| format!("h{i:05}")).collect();
    if revision == before {
        assert_eq!(names, expected, "every object once, in key order");
    } else {
        // The listing may have started after some late writes; it must then hold exactly those
        // written up to its revision.
        let late = items.len() - OBJECTS;
        assert_eq!(
            revision,
            before + late as u64,
            "the listing is consistent at its revision"
        );
        assert_eq!(&names[..OBJECTS], expected.as_slice());
    }
    let raw = backend.list(Kind::IPAMHandle).await.unwrap();
    assert_eq!(raw.items.len(), OBJECTS + 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_unavailable_promptly_while_etcd_is_down_and_work_after_restart() {
    let mut etcd = etcd().await;
    let endpoint = etcd.endpoint();
    let store = Store::new(Arc::new(quick_backend(&etcd, "/margay/v1/").await));
    let kept = store.create(&pool("kept", "10.0.0.0/16")).await.unwrap();

    etcd.stop().await;
    assert!(!etcd.is_running());
    let t = Instant::now();
    assert_unavailable(store.get::<IPPool>("kept").await, "get", &endpoint);
    assert_unavailable(store.list::<IPPool>().await, "list", &endpoint);
    assert_unavailable(
        store.create(&pool("new", "10.1.0.0/16")).await,
        "create",
        &endpoint,
    );
    assert_unavailable(store.update(&kept).await, "update", &endpoint);
    assert_unavailable(
        store.delete_at::<IPPool>("kept", 1).await,
        "delete",
        &endpoint,
    );
    assert!(
        t.elapsed() < PROMPT * 5,
        "five operations took {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let r = store.get::<IPPool>("kept").await;
    assert!(r.is_err());
    assert!(
        t.elapsed() <= PROMPT,
        "one failed get took {:?}",
        t.elapsed()
    );

    etcd.restart().await.unwrap();
    let got = eventually(Duration::from_secs(15), || store.get::<IPPool>("kept")).await;
    assert_eq!(got, kept, "data survives a restart");
    let mut change = got.clone();
    change.spec.nat_outgoing = true;
    store.update(&change).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_etcd_keeps_acknowledged_writes() {
    let mut etcd = etcd().await;
    let store = Store::new(Arc::new(quick_backend(&etcd, "/margay/v1/").await));
    for i in 0..20 {
        store.create(&handle(&format!("h{i}"))).await.unwrap();
    }
    etcd.kill();
    assert!(!etcd.is_running());
    etcd.restart().await.unwrap();
    let (items, _) = eventually(Duration::from_secs(15), || store.list::<IPAMHandle>()).await;
    assert_eq!(items.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_rides_out_a_short_restart_without_missing_a_change() {
    let mut etcd = etcd().await;
    let store = Store::new(Arc::new(quick_backend(&etcd, "/margay/v1/").await));
    let (_, start) = store.list::<IPPool>().await.unwrap();
    let mut w = store.watch::<IPPool>(start).await.unwrap();
    let a = store.create(&pool("a", "10.0.0.0/16")).await.unwrap();

    etcd.stop().await;
    etcd.restart().await.unwrap();
    let pb = pool("b", "10.1.0.0/16");
    let b = eventually(Duration::from_secs(10), || store.create(&pb)).await;

    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), w.next()).await {
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => {}
            Ok(Some(Ok(WatchEvent::Added(p)))) => seen.push(p),
            other => panic!("expected the two creates, got {other:?}"),
        }
    }
    assert_eq!(seen, vec![a, b]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_with_unavailable_when_etcd_stays_down() {
    let mut etcd = etcd().await;
    let mut cfg = etcd.config("/margay/v1/");
    cfg.request_timeout = Duration::from_secs(1);
    cfg.connect_timeout = Duration::from_secs(1);
    cfg.watch_reconnect = Duration::from_secs(2);
    let backend = EtcdBackend::connect(cfg).await.unwrap();
    let mut w = backend.watch(Kind::IPPool, 0).await.unwrap();
    etcd.kill();
    let t = Instant::now();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(other) => break other,
            Err(_) => panic!("the watch neither failed nor ended within 30 s of etcd dying"),
        }
    };
    assert!(
        matches!(end, Some(Err(StoreError::Unavailable { .. }))),
        "expected Unavailable, got {end:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "noticed after {:?}",
        t.elapsed()
    );
    assert!(w.next().await.is_none(), "the stream ends after its error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_writes_are_refused_for_kinds_without_status() {
    let etcd = etcd().await;
    let backend = quick_backend(&etcd, "/margay/v1/").await;
    let store = Store::new(Arc::new(backend.clone()));
    let h = store.create(&handle("h")).await.unwrap();
    let err = backend
        .update_status(
            Kind::IPAMHandle,
            "h",
            serde_json::to_value(&h).unwrap(),
            h.metadata.resource_version.unwrap().parse().unwrap(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
    // And names that would escape the key layout are refused.
    let mut bad = IPPool::new("a/b", IPPoolSpec::default());
    bad.spec.cidr = "10.0.0.0/16".into();
    let err = backend
        .create(Kind::IPPool, "a/b", serde_json::to_value(&bad).unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_endpoints_work_with_the_ca_and_are_refused_without_it() {
    let etcd = EtcdProcess::start_with_tls()
        .await
        .expect("starting etcd with TLS");
    assert!(etcd.endpoint().starts_with("https://"));
    let store = Store::new(Arc::new(quick_backend(&etcd, "/margay/v1/").await));
    let created = store.create(&pool("tls", "10.0.0.0/16")).await.unwrap();
    assert_eq!(store.get::<IPPool>("tls").await.unwrap(), created);

    // Without TLS settings an https endpoint is refused before connecting, with the fix named.
    let mut cfg = etcd.config("/margay/v1/");
    cfg.tls = None;
    let err = EtcdBackend::connect(cfg).await.unwrap_err();
    assert!(err.to_string().contains("caFile"), "{err}");

    // Trusting some other CA, the server's certificate does not verify.
    let other = EtcdProcess::start_with_tls()
        .await
        .expect("starting a second etcd");
    let mut cfg = etcd.config("/margay/v1/");
    cfg.tls.as_mut().unwrap().ca_file = other.ca_file().unwrap();
    cfg.request_timeout = Duration::from_secs(2);
    let backend = EtcdBackend::connect(cfg).await.unwrap();
    let err = backend.get(Kind::IPPool, "tls").await.unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable { .. }),
        "an unverifiable server is unreachable: {err:?}"
    );
}
