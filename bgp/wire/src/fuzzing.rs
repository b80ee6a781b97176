//! The checks the fuzz targets run, kept in the library so that the corpus replay
//! test (`tests/corpus_replay.rs`) runs exactly the same code on a stable toolchain.

use bytes::BytesMut;

use crate::{frame_len, Context, Families, Message, UpdateView};

/// A context from two fuzzer-chosen octets.
pub fn context(a: u8, b: u8) -> Context {
    let bit = |x: u8, n: u8| x & (1 << n) != 0;
    let ap = Families {
        ipv4_unicast: bit(a, 2),
        ipv6_unicast: bit(a, 3),
    };
    Context {
        four_octet_as: bit(a, 0),
        extended_message: bit(a, 1),
        add_path_receive: ap,
        add_path_send: ap,
        extended_next_hop: Families {
            ipv4_unicast: bit(a, 4),
            ipv6_unicast: false,
        },
        is_ebgp: bit(b, 0),
    }
}

/// The first two octets choose the context, the rest is one framed message. Decode
/// must not panic; a decoded message must re-encode, and decode again to itself.
pub fn check_message(data: &[u8]) {
    let [a, b, msg @ ..] = data else {
        return;
    };
    let ctx = context(*a, *b);
    let _ = frame_len(msg, &ctx);
    if let Ok(view) = UpdateView::parse(msg, &ctx) {
        let n = view.withdrawn().count() + view.nlri().count() + view.attributes().count();
        let m = view.mp_reach_nlri(&ctx).map_or(0, Iterator::count)
            + view.mp_unreach_nlri(&ctx).map_or(0, Iterator::count);
        assert!(n + m <= msg.len());
    }
    match Message::decode(msg, &ctx) {
        Ok(m) => {
            let mut buf = BytesMut::new();
            if let Err(e) = m.encode(&ctx, &mut buf) {
                // An OPEN whose FQDN held invalid UTF-8 may grow past 255 octets
                // once the replacement characters are in; nothing else may fail.
                assert!(
                    matches!(m, Message::Open(_)),
                    "decoded message does not re-encode: {e}: {m:?}"
                );
                return;
            }
            // Only an OPEN's FQDN (invalid UTF-8 replaced) can grow.
            assert!(
                buf.len() <= msg.len() || matches!(m, Message::Open(_)),
                "re-encoding grew from {} to {}",
                msg.len(),
                buf.len()
            );
            let again = Message::decode(&buf, &ctx)
                .unwrap_or_else(|e| panic!("re-encoding does not decode: {e}: {m:?}"));
            assert_eq!(strip(again), strip(m));
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(e.notification().data.len() <= crate::MAX_LEN - crate::HEADER_LEN - 2);
        }
    }
}

fn strip(m: Message) -> Message {
    match m {
        Message::Update(mut u) => {
            u.discarded.clear();
            Message::Update(u)
        }
        m => m,
    }
}
