//! OPEN (RFC 4271 §4.2) with capabilities in optional parameters (RFC 5492).
//!
//! ```text
//! +-----------------+-----------------+-----------------+-----------------------+
//! | Version (1)     | My AS (2)       | Hold Time (2)   | BGP Identifier (4)    |
//! +-----------------+-----------------+-----------------+-----------------------+
//! | Opt Parm Len (1)| Optional Parameters (variable): Type (1), Length (1), Value |
//! +-----------------+-------------------------------------------------------------+
//! ```

use std::net::Ipv4Addr;

use bytes::BufMut;

use crate::capability::{Capability, CapabilityLayout};
use crate::error::{code, subcode, DecodeError, EncodeError, ErrorKind};
use crate::header::HEADER_LEN;
use crate::reader::{Reader, Short};
use crate::AS_TRANS;

/// Optional parameter type for capabilities (RFC 5492 §4).
const PARAM_CAPABILITIES: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Open {
    /// The 2-octet My AS field: the AS, or AS_TRANS when it needs 4 octets.
    pub my_as: u16,
    /// Seconds; 0 or at least 3.
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
    pub layout: CapabilityLayout,
}

fn open_error(
    field: &'static str,
    offset: usize,
    kind: ErrorKind,
    sub: u8,
    data: Vec<u8>,
) -> DecodeError {
    DecodeError::reset(field, offset, kind, code::OPEN_MESSAGE, sub, data)
}

fn short(s: Short) -> DecodeError {
    open_error(s.field, s.offset, s.kind, subcode::UNSPECIFIC, Vec::new())
}

impl Open {
    /// An OPEN for `asn`, putting AS_TRANS in My AS when `asn` needs 4 octets. The
    /// 4-octet AS capability is added if `capabilities` lacks it.
    pub fn new(
        asn: u32,
        hold_time: u16,
        bgp_id: Ipv4Addr,
        mut capabilities: Vec<Capability>,
    ) -> Self {
        if !capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
        {
            capabilities.push(Capability::FourOctetAs(asn));
        }
        Self {
            my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
            hold_time,
            bgp_id,
            capabilities,
            layout: CapabilityLayout::OneParameter,
        }
    }

    /// The speaker's AS: from the 4-octet AS capability if present, else My AS.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(a) => Some(*a),
                _ => None,
            })
            .unwrap_or(u32::from(self.my_as))
    }

    /// Decodes the body (`msg` is the whole framed message, header checked).
    pub(crate) fn decode(msg: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(&msg[HEADER_LEN..], HEADER_LEN);
        let version = r.u8("version").map_err(short)?;
        if version != 4 {
            let data = if version > 4 { vec![0, 4] } else { Vec::new() };
            return Err(open_error(
                "version",
                HEADER_LEN,
                ErrorKind::UnsupportedVersion(version),
                subcode::UNSUPPORTED_VERSION_NUMBER,
                data,
            ));
        }
        let my_as = r.u16("my AS").map_err(short)?;
        if my_as == 0 {
            // RFC 7607: AS 0 is never a valid peer AS.
            return Err(open_error(
                "my AS",
                20,
                ErrorKind::BadPeerAs(0),
                subcode::BAD_PEER_AS,
                Vec::new(),
            ));
        }
        let hold_time = r.u16("hold time").map_err(short)?;
        if hold_time == 1 || hold_time == 2 {
            return Err(open_error(
                "hold time",
                22,
                ErrorKind::UnacceptableHoldTime(hold_time),
                subcode::UNACCEPTABLE_HOLD_TIME,
                Vec::new(),
            ));
        }
        let id = r.u32("BGP identifier").map_err(short)?;
        if id == 0 {
            return Err(open_error(
                "BGP identifier",
                24,
                ErrorKind::BadBgpIdentifier,
                subcode::BAD_BGP_IDENTIFIER,
                Vec::new(),
            ));
        }
        let opt_len = usize::from(r.u8("optional parameters length").map_err(short)?);
        if opt_len != r.remaining() {
            return Err(open_error(
                "optional parameters length",
                28,
                ErrorKind::Overrun {
                    declared: opt_len,
                    available: r.remaining(),
                },
                subcode::UNSPECIFIC,
                Vec::new(),
            ));
        }
        let mut capabilities = Vec::new();
        let mut params = 0usize;
        let mut one_each = true;
        while !r.is_empty() {
            let param_off = r.offset();
            let ptype = r.u8("optional parameter type").map_err(short)?;
            let plen = usize::from(r.u8("optional parameter length").map_err(short)?);
            let pval_off = r.offset();
            let pval = r.take(plen, "optional parameter value").map_err(short)?;
            if ptype != PARAM_CAPABILITIES {
                return Err(open_error(
                    "optional parameter type",
                    param_off,
                    ErrorKind::UnsupportedOptionalParameter(ptype),
                    subcode::UNSUPPORTED_OPTIONAL_PARAMETER,
                    Vec::new(),
                ));
            }
            params += 1;
            let mut caps = Reader::new(pval, pval_off);
            let mut in_param = 0;
            while !caps.is_empty() {
                let cap_off = caps.offset();
                let ccode = caps.u8("capability code").map_err(short)?;
                let clen = usize::from(caps.u8("capability length").map_err(short)?);
                let cval = caps.take(clen, "capability value").map_err(short)?;
                let cap = Capability::decode(ccode, cval).map_err(|kind| {
                    open_error(
                        "capability value",
                        cap_off,
                        kind,
                        subcode::UNSPECIFIC,
                        Vec::new(),
                    )
                })?;
                if let Capability::FourOctetAs(0) = cap {
                    return Err(open_error(
                        "4-octet AS capability",
                        cap_off + 2,
                        ErrorKind::BadPeerAs(0),
                        subcode::BAD_PEER_AS,
                        Vec::new(),
                    ));
                }
                capabilities.push(cap);
                in_param += 1;
            }
            if in_param != 1 {
                one_each = false;
            }
        }
        let layout = if params > 1 && one_each {
            CapabilityLayout::ParameterPerCapability
        } else {
            CapabilityLayout::OneParameter
        };
        Ok(Self {
            my_as,
            hold_time,
            bgp_id: Ipv4Addr::from(id),
            capabilities,
            layout,
        })
    }

    fn params_len(&self) -> Result<usize, EncodeError> {
        let mut total = 0;
        let mut caps = 0;
        for c in &self.capabilities {
            let l = c.value_len();
            if l > 255 {
                return Err(EncodeError::Invalid(
                    "a capability value is longer than 255 octets",
                ));
            }
            caps += 2 + l;
            if self.layout == CapabilityLayout::ParameterPerCapability {
                total += 2 + 2 + l;
            }
        }
        if self.layout == CapabilityLayout::OneParameter {
            if caps > 255 {
                return Err(EncodeError::Invalid(
                    "capabilities exceed one 255-octet optional parameter",
                ));
            }
            total = if caps == 0 { 0 } else { 2 + caps };
        }
        if total > 255 {
            return Err(EncodeError::Invalid(
                "optional parameters exceed 255 octets",
            ));
        }
        Ok(total)
    }

    pub(crate) fn body_len(&self) -> Result<usize, EncodeError> {
        Ok(10 + self.params_len()?)
    }

    pub(crate) fn encode_body(&self, buf: &mut impl BufMut) -> Result<(), EncodeError> {
        let plen = self.params_len()?;
        buf.put_u8(4);
        buf.put_u16(self.my_as);
        buf.put_u16(self.hold_time);
        buf.put_u32(u32::from(self.bgp_id));
        buf.put_u8(plen as u8);
        match self.layout {
            CapabilityLayout::OneParameter => {
                if plen > 0 {
                    buf.put_u8(PARAM_CAPABILITIES);
                    buf.put_u8((plen - 2) as u8);
                    for c in &self.capabilities {
                        c.encode(buf);
                    }
                }
            }
            CapabilityLayout::ParameterPerCapability => {
                for c in &self.capabilities {
                    buf.put_u8(PARAM_CAPABILITIES);
                    buf.put_u8((2 + c.value_len()) as u8);
                    c.encode(buf);
                }
            }
        }
        Ok(())
    }
}
