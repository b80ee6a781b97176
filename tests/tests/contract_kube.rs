//! The datastore contract against a real kube-apiserver (one, with its own etcd, per test).
//! Skipped, with one `SKIPPED` line, unless `KUBE_APISERVER_BIN` names the binary.

margay_testkit::contract_tests!(margay_testkit::contract::KubeTarget::start);
