//! Decode and encode errors, and what the speaker must do about each.
//!
//! RFC 4271 §6 gives every error a NOTIFICATION (code, subcode, data). RFC 7606 softens
//! most UPDATE attribute errors to "treat-as-withdraw" or "attribute discard", keeps
//! "session reset" for what cannot be parsed around, and allows "AFI/SAFI disable" for
//! a broken MP_REACH_NLRI / MP_UNREACH_NLRI. [`Action`] carries that decision.

use crate::notification::Notification;
use crate::prefix::Nlri;

/// NOTIFICATION error codes (RFC 4271 §4.5, RFC 7313 §5).
pub mod code {
    pub const MESSAGE_HEADER: u8 = 1;
    pub const OPEN_MESSAGE: u8 = 2;
    pub const UPDATE_MESSAGE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH: u8 = 7;
}

/// NOTIFICATION error subcodes (RFC 4271 §6, RFC 4486, RFC 5492, RFC 7313).
pub mod subcode {
    pub const UNSPECIFIC: u8 = 0;
    // Message Header Error.
    pub const CONNECTION_NOT_SYNCHRONIZED: u8 = 1;
    pub const BAD_MESSAGE_LENGTH: u8 = 2;
    pub const BAD_MESSAGE_TYPE: u8 = 3;
    // OPEN Message Error.
    pub const UNSUPPORTED_VERSION_NUMBER: u8 = 1;
    pub const BAD_PEER_AS: u8 = 2;
    pub const BAD_BGP_IDENTIFIER: u8 = 3;
    pub const UNSUPPORTED_OPTIONAL_PARAMETER: u8 = 4;
    pub const UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const UNSUPPORTED_CAPABILITY: u8 = 7;
    // UPDATE Message Error.
    pub const MALFORMED_ATTRIBUTE_LIST: u8 = 1;
    pub const UNRECOGNIZED_WELL_KNOWN_ATTRIBUTE: u8 = 2;
    pub const MISSING_WELL_KNOWN_ATTRIBUTE: u8 = 3;
    pub const ATTRIBUTE_FLAGS_ERROR: u8 = 4;
    pub const ATTRIBUTE_LENGTH_ERROR: u8 = 5;
    pub const INVALID_ORIGIN_ATTRIBUTE: u8 = 6;
    pub const INVALID_NEXT_HOP_ATTRIBUTE: u8 = 8;
    pub const OPTIONAL_ATTRIBUTE_ERROR: u8 = 9;
    pub const INVALID_NETWORK_FIELD: u8 = 10;
    pub const MALFORMED_AS_PATH: u8 = 11;
    // Cease (RFC 4486).
    pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;
    pub const ADMINISTRATIVE_RESET: u8 = 4;
    // ROUTE-REFRESH Message Error (RFC 7313).
    pub const INVALID_MESSAGE_LENGTH: u8 = 1;
}

/// What was wrong, with the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("marker is not 16 bytes of 0xff")]
    BadMarker,
    #[error("message length {length} is outside {min}..={max} for this message type")]
    BadLength { length: u16, min: u16, max: u16 },
    #[error("unknown message type {0}")]
    BadType(u8),
    #[error("needs {needed} more bytes but only {available} remain")]
    Truncated { needed: usize, available: usize },
    #[error("length {declared} overruns the {available} bytes that remain")]
    Overrun { declared: usize, available: usize },
    #[error("{extra} bytes left over after the last field")]
    TrailingBytes { extra: usize },
    #[error("BGP version {0} is not supported (only 4)")]
    UnsupportedVersion(u8),
    #[error("AS {0} is not a valid peer AS")]
    BadPeerAs(u32),
    #[error("BGP identifier 0.0.0.0 is not valid")]
    BadBgpIdentifier,
    #[error("hold time {0} s is not 0 and below 3 s")]
    UnacceptableHoldTime(u16),
    #[error("optional parameter type {0} is not supported (only capabilities, type 2)")]
    UnsupportedOptionalParameter(u8),
    #[error("capability {code} has invalid length {length}")]
    MalformedCapability { code: u8, length: usize },
    #[error("attribute {type_code} has flags {flags:#04x} that conflict with its type")]
    AttributeFlags { type_code: u8, flags: u8 },
    #[error("attribute {type_code} has invalid length {length}")]
    AttributeLength { type_code: u8, length: usize },
    #[error("attribute {0} appears more than once")]
    DuplicateAttribute(u8),
    #[error("well-known attribute {0} is not recognised")]
    UnrecognizedWellKnown(u8),
    #[error("well-known mandatory attribute {0} is missing")]
    MissingWellKnown(u8),
    #[error("ORIGIN value {0} is not IGP (0), EGP (1) or INCOMPLETE (2)")]
    InvalidOrigin(u8),
    #[error("AS_PATH segment type {0} is not defined")]
    BadSegmentType(u8),
    #[error("AS_PATH segment has zero length")]
    EmptySegment,
    #[error("AS_PATH segment of {count} ASes overruns the {available} bytes left")]
    SegmentOverrun { count: usize, available: usize },
    #[error("confederation segment received from an external (non-confederation) peer")]
    ConfedSegmentFromExternal,
    #[error("attribute {0} is not accepted from an external peer")]
    NotFromExternal(u8),
    #[error("attribute {0} is not used between 4-octet-AS speakers")]
    As4FromNewSpeaker(u8),
    #[error("prefix length {length} exceeds {max}")]
    PrefixLength { length: u8, max: u8 },
    #[error("next hop length {length} is not valid for AFI {afi} SAFI {safi}")]
    NextHopLength { afi: u16, safi: u8, length: usize },
    #[error("route refresh message length {0} is not 23")]
    RouteRefreshLength(u16),
}

/// What RFC 4271 §6 and RFC 7606 ask the speaker to do about a decode error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this NOTIFICATION and close the session (RFC 7606 §2 "session reset").
    SessionReset(Notification),
    /// Stop using this address family on the session (RFC 4760 §7, RFC 7606 §2):
    /// withdraw every route learnt from the peer in it and ignore further ones. A
    /// speaker that does not do AFI/SAFI disable sends `notification` instead.
    AfiSafiDisable {
        afi: u16,
        safi: u8,
        notification: Notification,
    },
    /// Treat every prefix the UPDATE carried (withdrawn, NLRI, MP_REACH and
    /// MP_UNREACH alike) as withdrawn, keep the session (RFC 7606 §2). The prefixes
    /// that could be parsed are here; `notification` is what RFC 4271 would have sent,
    /// for the log.
    TreatAsWithdraw {
        withdrawn: Vec<Nlri>,
        notification: Notification,
    },
}

impl Action {
    /// The NOTIFICATION that goes with this action (sent for a session reset; for
    /// the others, what a pre-RFC 7606 speaker would have sent).
    pub fn notification(&self) -> &Notification {
        match self {
            Self::SessionReset(n) => n,
            Self::AfiSafiDisable { notification, .. } => notification,
            Self::TreatAsWithdraw { notification, .. } => notification,
        }
    }
}

/// A message that could not be decoded as it stands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} at byte {offset}: {kind}")]
pub struct DecodeError {
    /// The field being read, in RFC terms ("AS_PATH segment length", "NLRI").
    pub field: &'static str,
    /// Offset of the field from the first marker byte of the message.
    pub offset: usize,
    pub kind: ErrorKind,
    pub action: Action,
}

impl DecodeError {
    pub(crate) fn reset(
        field: &'static str,
        offset: usize,
        kind: ErrorKind,
        code: u8,
        subcode: u8,
        data: Vec<u8>,
    ) -> Self {
        Self {
            field,
            offset,
            kind,
            action: Action::SessionReset(Notification::error(code, subcode, data)),
        }
    }

    /// The NOTIFICATION to send for a session reset, or the one RFC 4271 names.
    pub fn notification(&self) -> &Notification {
        self.action.notification()
    }

    /// True when the session must be closed.
    pub fn is_session_reset(&self) -> bool {
        matches!(self.action, Action::SessionReset(_))
    }
}

/// An attribute dropped under RFC 7606 "attribute discard" (or a duplicate or
/// unrecognised optional non-transitive one, RFC 4271 §5 / RFC 7606 §3 (g)). The rest of
/// the UPDATE was used as normal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discarded {
    pub type_code: u8,
    /// Offset of the attribute's flags byte in the message.
    pub offset: usize,
    pub kind: Option<ErrorKind>,
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{what} would make a {length}-byte message, over the {max}-byte limit; split it")]
    TooLong {
        what: &'static str,
        length: usize,
        max: usize,
    },
    #[error("{0}")]
    Invalid(&'static str),
}
