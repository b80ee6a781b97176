//! NOTIFICATION (RFC 4271 §4.5) and the shutdown communication (RFC 8203, RFC 9003).
//!
//! ```text
//! +---------------+---------------+-----------------------------+
//! | Error code    | Error subcode |   Data (variable)           |
//! +---------------+---------------+-----------------------------+
//! ```
//! For Cease / Administrative Shutdown and Administrative Reset, Data may be a
//! shutdown communication: one length octet, then that many octets of UTF-8.

use std::fmt;

use bytes::BufMut;

use crate::error::{code, subcode};
use crate::header::{HEADER_LEN, MAX_LEN};

/// Longest shutdown communication (RFC 9003 §2).
pub const MAX_SHUTDOWN_COMMUNICATION: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    /// A NOTIFICATION whose data is cut to fit a 4096-byte message, which any peer
    /// accepts whatever was negotiated.
    pub fn error(code: u8, subcode: u8, mut data: Vec<u8>) -> Self {
        data.truncate(MAX_LEN - HEADER_LEN - 2);
        Self {
            code,
            subcode,
            data,
        }
    }

    /// Cease with a shutdown communication. `subcode` should be Administrative
    /// Shutdown (2) or Administrative Reset (4); the text is cut at a character
    /// boundary to 255 octets.
    pub fn shutdown(subcode: u8, message: &str) -> Self {
        let mut end = message.len().min(MAX_SHUTDOWN_COMMUNICATION);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let mut data = Vec::with_capacity(end + 1);
        data.push(end as u8);
        data.extend_from_slice(&message.as_bytes()[..end]);
        Self {
            code: code::CEASE,
            subcode,
            data,
        }
    }

    /// The shutdown communication, if this is a Cease that carries a well-formed one.
    /// Invalid UTF-8 or a length past the data yields `None`, never an error: RFC 9003
    /// §3 has the receiver log and carry on.
    pub fn shutdown_communication(&self) -> Option<&str> {
        if self.code != code::CEASE
            || !(self.subcode == subcode::ADMINISTRATIVE_SHUTDOWN
                || self.subcode == subcode::ADMINISTRATIVE_RESET)
        {
            return None;
        }
        let (&len, rest) = self.data.split_first()?;
        let text = rest.get(..usize::from(len))?;
        std::str::from_utf8(text).ok()
    }

    pub(crate) fn decode_body(body: &[u8]) -> Self {
        // The header check guarantees the two octets of code and subcode.
        Self {
            code: body[0],
            subcode: body[1],
            data: body[2..].to_vec(),
        }
    }

    pub(crate) fn encode_body(&self, buf: &mut impl BufMut) {
        buf.put_u8(self.code);
        buf.put_u8(self.subcode);
        buf.put_slice(&self.data);
    }

    pub(crate) fn body_len(&self) -> usize {
        2 + self.data.len()
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NOTIFICATION {}/{}", self.code, self.subcode)?;
        if let Some(text) = self.shutdown_communication() {
            write!(f, " {text:?}")?;
        } else if !self.data.is_empty() {
            write!(f, " data ")?;
            for b in &self.data {
                write!(f, "{b:02x}")?;
            }
        }
        Ok(())
    }
}
