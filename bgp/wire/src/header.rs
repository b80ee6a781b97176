//! The message header (RFC 4271 §4.1) and framing.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           Marker (16)                         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |          Length               |      Type     |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use crate::context::Context;
use crate::error::{code, subcode, DecodeError, ErrorKind};

pub const HEADER_LEN: usize = 19;
pub const MARKER: [u8; 16] = [0xff; 16];
/// RFC 4271 §4.1.
pub const MAX_LEN: usize = 4096;
/// RFC 8654 §3.
pub const MAX_EXTENDED_LEN: usize = 65535;

/// The message types (RFC 4271 §4.1, RFC 2918 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Open = 1,
    Update = 2,
    Notification = 3,
    Keepalive = 4,
    RouteRefresh = 5,
}

impl MessageType {
    pub fn from_u8(t: u8) -> Option<Self> {
        Some(match t {
            1 => Self::Open,
            2 => Self::Update,
            3 => Self::Notification,
            4 => Self::Keepalive,
            5 => Self::RouteRefresh,
            _ => return None,
        })
    }

    /// Smallest and largest length of this type (RFC 4271 §6.1, RFC 8654 §3: OPEN
    /// and KEEPALIVE stay within 4096 even with extended messages).
    pub(crate) fn length_bounds(self, ctx: &Context) -> (usize, usize) {
        match self {
            Self::Open => (29, MAX_LEN),
            Self::Update => (23, ctx.max_message_len()),
            Self::Notification => (21, ctx.max_message_len()),
            Self::Keepalive => (HEADER_LEN, HEADER_LEN),
            // RFC 7313 §5 answers a wrong ROUTE-REFRESH length with its own error,
            // so the header check lets any length through to the decoder.
            Self::RouteRefresh => (HEADER_LEN, ctx.max_message_len()),
        }
    }
}

fn bad_length(length: u16, min: usize, max: usize) -> DecodeError {
    DecodeError::reset(
        "message length",
        16,
        ErrorKind::BadLength {
            length,
            min: min as u16,
            max: max as u16,
        },
        code::MESSAGE_HEADER,
        subcode::BAD_MESSAGE_LENGTH,
        length.to_be_bytes().to_vec(),
    )
}

/// How long the message at the start of `buf` is, once its header has arrived.
///
/// `Ok(None)` means fewer than 19 bytes are buffered. The marker and the length
/// (19 ..= the session's maximum) are checked, so a stream reader can cut
/// `buf[..n]` and hand it to [`crate::Message::decode`] without copying.
pub fn frame_len(buf: &[u8], ctx: &Context) -> Result<Option<usize>, DecodeError> {
    let seen = buf.len().min(16);
    if buf[..seen] != MARKER[..seen] {
        return Err(bad_marker());
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let length = u16::from_be_bytes([buf[16], buf[17]]);
    let max = ctx.max_message_len();
    if usize::from(length) < HEADER_LEN || usize::from(length) > max {
        return Err(bad_length(length, HEADER_LEN, max));
    }
    Ok(Some(usize::from(length)))
}

fn bad_marker() -> DecodeError {
    DecodeError::reset(
        "marker",
        0,
        ErrorKind::BadMarker,
        code::MESSAGE_HEADER,
        subcode::CONNECTION_NOT_SYNCHRONIZED,
        Vec::new(),
    )
}

/// Checks the header of one whole framed message; returns its type.
pub(crate) fn check(buf: &[u8], ctx: &Context) -> Result<MessageType, DecodeError> {
    if buf.len() < HEADER_LEN {
        let seen = buf.len().min(16);
        if buf[..seen] != MARKER[..seen] {
            return Err(bad_marker());
        }
        let length = if buf.len() >= 18 {
            u16::from_be_bytes([buf[16], buf[17]])
        } else {
            buf.len() as u16
        };
        return Err(bad_length(length, HEADER_LEN, ctx.max_message_len()));
    }
    if buf[..16] != MARKER {
        return Err(bad_marker());
    }
    let length = u16::from_be_bytes([buf[16], buf[17]]);
    let Some(kind) = MessageType::from_u8(buf[18]) else {
        return Err(DecodeError::reset(
            "message type",
            18,
            ErrorKind::BadType(buf[18]),
            code::MESSAGE_HEADER,
            subcode::BAD_MESSAGE_TYPE,
            vec![buf[18]],
        ));
    };
    let (min, max) = kind.length_bounds(ctx);
    if usize::from(length) < min || usize::from(length) > max || usize::from(length) != buf.len() {
        return Err(bad_length(length, min, max));
    }
    Ok(kind)
}
