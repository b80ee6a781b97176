//! Any bytes, any context: decode must not panic; what decodes must re-encode, and
//! the re-encoding must decode to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use margay_bgp_wire::fuzzing::check_message;

fuzz_target!(|data: &[u8]| {
    check_message(data);
});
