//! Replays the committed fuzz corpus (tests/corpus/) and every captured real-peer
//! message under all context combinations through the fuzz target's checks, so CI
//! exercises them without a nightly toolchain or cargo-fuzz.

mod common;

use margay_bgp_wire::fuzzing::check_message;

#[test]
fn committed_corpus_replays_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("tests/corpus exists") {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        check_message(&data);
        n += 1;
    }
    assert!(n >= 50, "corpus has only {n} inputs");
}

#[test]
fn real_peer_messages_under_every_context() {
    for file in ["bird2-to-gobgp.hex", "gobgp-to-bird2.hex"] {
        for (_, msg) in common::load_hex(file) {
            for a in 0..32u8 {
                for b in 0..2u8 {
                    let mut data = vec![a, b];
                    data.extend_from_slice(&msg);
                    check_message(&data);
                    // Every truncation too: none may panic.
                    for cut in [19, 23, msg.len() / 2, msg.len().saturating_sub(1)] {
                        if cut < msg.len() {
                            check_message(&data[..2 + cut]);
                        }
                    }
                }
            }
        }
    }
}
