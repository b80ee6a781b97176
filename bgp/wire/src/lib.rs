//! BGP-4 wire codec for Margay.
//!
//! Bytes in, values out, and back: no sockets, no timers, no async runtime. Negotiated
//! session state (4-octet AS, ADD-PATH, extended messages, extended next hop, eBGP or
//! iBGP) travels in an explicit [`Context`]. Every decode failure is a [`DecodeError`]
//! that names the field and the byte offset from the start of the message, and says
//! what RFC 4271 §6 / RFC 7606 ask the speaker to do about it ([`Action`]).
//!
//! The entry points are [`Message::decode`] / [`Message::encode`], [`frame_len`] for
//! cutting a TCP stream into messages, [`UpdateView`] for zero-copy UPDATE reading,
//! and [`UpdatePacker`] for packing many prefixes into as few UPDATEs as fit.
//! `docs/bgp-wire.md` describes the API and the error classification.

pub mod as4;
mod attribute;
mod builder;
mod capability;
mod context;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod header;
mod message;
mod notification;
mod open;
mod prefix;
mod reader;
mod update;

pub use attribute::{
    attr_flags, attr_type, Aggregator, AsPath, AsSegment, AttrOverrun, AttributeRef, Community,
    ExtendedCommunity, LargeCommunity, MpReach, MpUnreach, NextHop, Origin, PathAttribute,
    RawAttribute, RawAttributeIter, SegmentKind, TypeCodeSet,
};
pub use builder::UpdatePacker;
pub use capability::{
    AddPathFamily, AddPathMode, Capability, CapabilityLayout, ExtendedNextHopFamily,
    GracefulRestart, GracefulRestartFamily, LlgrFamily,
};
pub use context::{Context, Families};
pub use error::{code, subcode, Action, DecodeError, Discarded, EncodeError, ErrorKind};
pub use header::{frame_len, MessageType, HEADER_LEN, MARKER, MAX_EXTENDED_LEN, MAX_LEN};
pub use message::Message;
pub use notification::Notification;
pub use open::Open;
pub use prefix::{Family, Nlri, NlriIter, Prefix, PrefixError};
pub use update::{RouteRefresh, Update, UpdateView};

/// AS_TRANS (RFC 6793 §2): stands in for a 4-octet AS number towards a 2-octet peer.
pub const AS_TRANS: u16 = 23456;
