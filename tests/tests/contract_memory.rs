//! The datastore contract against the in-memory backend.

margay_testkit::contract_tests!(margay_testkit::contract::MemoryTarget::start);
