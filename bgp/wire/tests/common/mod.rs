//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Path of a file under `tests/data/`.
pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Decodes a hex string, ignoring whitespace.
pub fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(s.len().is_multiple_of(2), "odd-length hex: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// Messages of a `.hex` vector file: (comment naming it, bytes).
pub fn load_hex(name: &str) -> Vec<(String, Vec<u8>)> {
    let text = std::fs::read_to_string(data_path(name)).expect("vector file");
    let mut out = Vec::new();
    let mut label = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(c) = line.strip_prefix('#') {
            label = c.trim().to_owned();
        } else if !line.is_empty() {
            out.push((label.clone(), unhex(line)));
        }
    }
    out
}

/// A framed message: marker, length, type, then `body`.
pub fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}
