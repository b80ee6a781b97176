//! The five message types, decoded from and encoded to whole framed messages.

use bytes::{BufMut, Bytes, BytesMut};

use crate::context::Context;
use crate::error::{DecodeError, EncodeError};
use crate::header::{self, MessageType, HEADER_LEN, MARKER, MAX_LEN};
use crate::notification::Notification;
use crate::open::Open;
use crate::update::{RouteRefresh, Update};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        match self {
            Self::Open(_) => MessageType::Open,
            Self::Update(_) => MessageType::Update,
            Self::Notification(_) => MessageType::Notification,
            Self::Keepalive => MessageType::Keepalive,
            Self::RouteRefresh(_) => MessageType::RouteRefresh,
        }
    }

    /// Decodes exactly one framed message (cut with [`crate::frame_len`]).
    pub fn decode(msg: &[u8], ctx: &Context) -> Result<Self, DecodeError> {
        Ok(match header::check(msg, ctx)? {
            MessageType::Open => Self::Open(Open::decode(msg)?),
            MessageType::Update => Self::Update(Update::decode(msg, ctx)?),
            MessageType::Notification => {
                Self::Notification(Notification::decode_body(&msg[HEADER_LEN..]))
            }
            MessageType::Keepalive => Self::Keepalive,
            MessageType::RouteRefresh => Self::RouteRefresh(RouteRefresh::decode(msg)?),
        })
    }

    /// Appends the framed message to `buf`. A message over the session's limit is
    /// refused, never sent: split UPDATEs with [`crate::UpdatePacker`] or
    /// [`Update::encode_split`].
    pub fn encode(&self, ctx: &Context, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let body = match self {
            Self::Open(o) => o.body_len()?,
            Self::Update(u) => u.body_len(ctx),
            Self::Notification(n) => n.body_len(),
            Self::Keepalive => 0,
            Self::RouteRefresh(_) => 4,
        };
        let total = HEADER_LEN + body;
        let max = match self {
            Self::Open(_) | Self::Keepalive => MAX_LEN,
            _ => ctx.max_message_len(),
        };
        if total > max {
            return Err(EncodeError::TooLong {
                what: "this message",
                length: total,
                max,
            });
        }
        let start = buf.len();
        buf.reserve(total);
        buf.put_slice(&MARKER);
        buf.put_u16(total as u16);
        buf.put_u8(self.message_type() as u8);
        let r = match self {
            Self::Open(o) => o.encode_body(buf),
            Self::Update(u) => u.encode_body(ctx, buf),
            Self::Notification(n) => {
                n.encode_body(buf);
                Ok(())
            }
            Self::Keepalive => Ok(()),
            Self::RouteRefresh(r) => {
                r.encode_body(buf);
                Ok(())
            }
        };
        if r.is_err() {
            buf.truncate(start);
        }
        debug_assert!(r.is_err() || buf.len() - start == total);
        r
    }

    /// The framed message as bytes.
    pub fn to_bytes(&self, ctx: &Context) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::new();
        self.encode(ctx, &mut b)?;
        Ok(b.freeze())
    }
}

impl From<Update> for Message {
    fn from(u: Update) -> Self {
        Self::Update(u)
    }
}

impl From<Open> for Message {
    fn from(o: Open) -> Self {
        Self::Open(o)
    }
}

impl From<Notification> for Message {
    fn from(n: Notification) -> Self {
        Self::Notification(n)
    }
}
