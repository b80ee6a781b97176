//! The datastore contract against a real etcd (one process per test).

margay_testkit::contract_tests!(margay_testkit::contract::EtcdTarget::start);
