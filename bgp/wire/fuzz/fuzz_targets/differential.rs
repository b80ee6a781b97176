//! Margay against rustbgpd-wire on the same bytes: both must agree on whether an
//! UPDATE's Withdrawn Routes and NLRI fields parse, and on the prefixes they hold.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use margay_bgp_wire::{Context, UpdateView};

fuzz_target!(|data: &[u8]| {
    // Frame the input as an UPDATE so that the interesting part is the body.
    let mut msg = vec![0xff; 16];
    let len = (19 + data.len()).min(4096);
    msg.extend_from_slice(&(len as u16).to_be_bytes());
    msg.push(2);
    msg.extend_from_slice(&data[..len - 19]);

    let ctx = Context {
        four_octet_as: true,
        ..Context::default()
    };
    let ours = UpdateView::parse(&msg, &ctx).map(|v| {
        let w: Vec<String> = v.withdrawn().map(|n| n.prefix.to_string()).collect();
        let n: Vec<String> = v.nlri().map(|n| n.prefix.to_string()).collect();
        (w, n)
    });

    let mut bytes = Bytes::from(msg.clone());
    let theirs = match rustbgpd_wire::decode_message(&mut bytes, 4096) {
        Ok(rustbgpd_wire::Message::Update(u)) => {
            let w = rustbgpd_wire::nlri::decode_nlri(&u.withdrawn_routes);
            let n = rustbgpd_wire::nlri::decode_nlri(&u.nlri);
            match (w, n) {
                (Ok(w), Ok(n)) => Ok((
                    w.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                    n.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                )),
                _ => Err(()),
            }
        }
        _ => Err(()),
    };
    match (&ours, &theirs) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "prefixes differ"),
        (Err(_), Err(())) => {}
        _ => panic!("verdicts differ: margay {ours:?}, rustbgpd-wire {theirs:?}"),
    }
});
