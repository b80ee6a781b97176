//! The rtnetlink connection: one socket, pipelined requests, dumps.
//!
//! # Pipelining
//!
//! A batch of requests is written into one buffer and sent with one `sendmsg`. The kernel
//! processes the messages of a datagram in order, inside that `sendmsg`, and queues an
//! `NLMSG_ERROR` for every message that fails, whether or not it asked for an ACK. So only the
//! last message of a batch carries `NLM_F_ACK`: when its answer arrives every earlier failure
//! has already been queued before it, and a message with no answer succeeded. That halves the
//! socket traffic of the usual "one ACK per request" and lets us send hundreds of requests per
//! system call. `NETLINK_CAP_ACK` keeps error messages small and `NETLINK_EXT_ACK` gives us the
//! kernel's error text.
//!
//! If the receive queue overflows anyway (`ENOBUFS`: error replies were dropped, so silence no
//! longer means success) the batch is sent again one request at a time with an ACK each. That
//! is safe because every write here is idempotent: adds replace, deletes of what is gone succeed.

use std::collections::HashMap;
use std::path::Path;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NetlinkSerializable};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REPLACE, NLM_F_REQUEST};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::route::{self, Device, Family, KernelRoute, RouteFilter, WriteOp, MARGAY_RT_PROTO};
use crate::tunnel;
use crate::{netns, KernelError};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_DUMP_INTR: u16 = 16;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Upper bound on the bytes of one batch (one `sendmsg`). Must stay below the socket's send
/// buffer (the kernel refuses datagrams larger than `sk_sndbuf - 32`); 128 KiB is below even
/// the 208 KiB default, in case raising the buffer is not allowed.
const MAX_BATCH_BYTES: usize = 128 * 1024;
const RECV_BUF_BYTES: usize = 256 * 1024;
/// Receive and send buffer sizes asked for (with the `*BUFFORCE` options when privileged).
const SOCKET_RCVBUF: usize = 16 << 20;
const SOCKET_SNDBUF: usize = 4 << 20;
/// How long to wait for the kernel's answer before giving up on a request.
const RECV_TIMEOUT_SECS: i64 = 30;

/// A request for the batch engine.
pub(crate) struct Request {
    pub msg: RouteNetlinkMessage,
    pub flags: u16,
}

/// The kernel's answer to a failed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NlErr {
    pub errno: i32,
    pub ext: Option<String>,
}

impl NlErr {
    fn into_error(self, what: impl Into<String>) -> KernelError {
        KernelError::refused(what, self.errno, self.ext)
    }
}

enum CollectError {
    Overrun,
    Socket(std::io::Error),
}

/// A synchronous rtnetlink connection in the network namespace it was opened in.
///
/// Not `Sync`: one owner at a time. A long-running process funnels its route, neighbour and
/// FDB writes through one [`crate::RouteWriter`], which owns one of these.
pub struct Netlink {
    sock: Socket,
    seq: u32,
    sbuf: Vec<u8>,
    rbuf: Vec<u8>,
    max_batch_msgs: usize,
    /// Offsets of the messages of the batch being sent, in `sbuf`.
    offsets: Vec<usize>,
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, KernelError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(|e| KernelError::socket("open", e))?;
        sock.bind_auto()
            .map_err(|e| KernelError::socket("bind", e))?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(|e| KernelError::socket("connect", e))?;
        // Both are optimisations (small errors, readable errors); old kernels lack them.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        if setsockopt(&sock, sockopt::RcvBufForce, &SOCKET_RCVBUF).is_err() {
            let _ = sock.set_rx_buf_sz(SOCKET_RCVBUF);
        }
        if setsockopt(&sock, sockopt::SndBufForce, &SOCKET_SNDBUF).is_err() {
            let _ = setsockopt(&sock, sockopt::SndBuf, &SOCKET_SNDBUF);
        }
        // The kernel answers within its sendmsg, so a long silence means a lost reply: fail the
        // requests rather than hang the writer.
        setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &TimeVal::new(RECV_TIMEOUT_SECS, 0),
        )
        .map_err(|e| KernelError::socket("set receive timeout", e.into()))?;
        let rcvbuf = sock.get_rx_buf_sz().unwrap_or(212_992);
        // Every failed request of a batch queues one error datagram (about 1 KiB of receive
        // buffer each, counting the kernel's overhead): size batches so that a batch of
        // failures still fits.
        let max_batch_msgs = (rcvbuf / 1024).clamp(16, 4096);
        Ok(Netlink {
            sock,
            seq: std::process::id().wrapping_mul(7919),
            sbuf: Vec::with_capacity(MAX_BATCH_BYTES),
            rbuf: Vec::with_capacity(RECV_BUF_BYTES),
            max_batch_msgs,
            offsets: Vec::new(),
        })
    }

    /// Opens a connection inside the network namespace at `netns` (`/var/run/netns/<name>` or
    /// `/proc/<pid>/ns/net`). The socket stays in that namespace wherever it is used from.
    pub fn open_in(netns: &Path) -> Result<Netlink, KernelError> {
        netns::run_in(netns, Netlink::open)?
    }

    /// How many requests go into one `sendmsg` at most.
    pub fn max_batch_msgs(&self) -> usize {
        self.max_batch_msgs
    }

    /// Overrides the receive buffer size and the batch length. For tests of the overflow path
    /// and for tuning; the defaults suit everything else.
    pub fn tune(
        &mut self,
        recv_buffer: Option<usize>,
        max_batch_msgs: Option<usize>,
    ) -> Result<(), KernelError> {
        if let Some(b) = recv_buffer {
            self.sock
                .set_rx_buf_sz(b)
                .map_err(|e| KernelError::socket("set receive buffer", e))?;
        }
        if let Some(m) = max_batch_msgs {
            self.max_batch_msgs = m.max(1);
        }
        Ok(())
    }

    // ===== writes =====

    /// Applies `ops` in order, pipelined, and returns one result per op. Deletes of things
    /// already gone are `Ok`. Device names are resolved once per call.
    pub fn apply(&mut self, ops: &[WriteOp]) -> Vec<Result<(), KernelError>> {
        let mut names: HashMap<String, Option<u32>> = HashMap::new();
        let mut note = |d: &Device| {
            if let Device::Name(n) = d {
                if !names.contains_key(n) {
                    let idx = self.link_index(n).ok().flatten();
                    names.insert(n.clone(), idx);
                }
            }
        };
        for op in ops {
            match op {
                WriteOp::ReplaceRoute(r) => r.devices().for_each(&mut note),
                WriteOp::ReplaceNeighbour(n) | WriteOp::DeleteNeighbour(n) => note(&n.dev),
                WriteOp::ReplaceFdb(e) | WriteOp::DeleteFdb(e) => note(&e.dev),
                WriteOp::DeleteRoute(_) => {}
            }
        }
        let resolve = |d: &Device| -> Option<u32> {
            match d {
                Device::Index(i) => Some(*i),
                Device::Name(n) => names.get(n).copied().flatten(),
            }
        };

        let mut results: Vec<Option<Result<(), KernelError>>> = Vec::with_capacity(ops.len());
        let mut reqs = Vec::with_capacity(ops.len());
        let mut req_of_op = Vec::with_capacity(ops.len());
        for op in ops {
            match build_request(op, &resolve) {
                Ok(Some(req)) => {
                    req_of_op.push(Some(reqs.len()));
                    reqs.push(req);
                    results.push(None);
                }
                // Nothing to send: e.g. deleting a neighbour of a device that is gone.
                Ok(None) => {
                    req_of_op.push(None);
                    results.push(Some(Ok(())));
                }
                Err(e) => {
                    req_of_op.push(None);
                    results.push(Some(Err(e)));
                }
            }
        }
        let answers = self.execute(&reqs);
        let mut answers: Vec<Option<Result<(), NlErr>>> = answers.into_iter().map(Some).collect();
        ops.iter()
            .zip(req_of_op)
            .zip(results)
            .map(|((op, req), done)| {
                if let Some(r) = done {
                    return r;
                }
                let answer = req.and_then(|i| answers[i].take()).unwrap_or(Ok(()));
                match answer {
                    Ok(()) => Ok(()),
                    Err(e) if is_delete(op) && gone(e.errno) => Ok(()),
                    Err(e) => Err(e.into_error(op.to_string())),
                }
            })
            .collect()
    }

    /// Sends one request with an ACK and waits for it.
    pub(crate) fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: impl Into<String>,
    ) -> Result<(), KernelError> {
        let mut r = self.execute(&[Request { msg, flags }]);
        match r.pop() {
            Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => Err(e.into_error(what)),
        }
    }

    /// Sends one request and returns the kernel's raw errno on failure.
    pub(crate) fn request_errno(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<(), NlErr> {
        self.execute(&[Request { msg, flags }])
            .pop()
            .unwrap_or(Ok(()))
    }

    /// The batch engine: see the module documentation.
    pub(crate) fn execute(&mut self, reqs: &[Request]) -> Vec<Result<(), NlErr>> {
        let mut out: Vec<Result<(), NlErr>> = vec![Ok(()); reqs.len()];
        let mut i = 0;
        while i < reqs.len() {
            self.sbuf.clear();
            self.offsets.clear();
            let first = self.seq.wrapping_add(1);
            let mut j = i;
            while j < reqs.len() && j - i < self.max_batch_msgs {
                let len = NLMSG_HDRLEN + reqs[j].msg.buffer_len();
                if j > i && self.sbuf.len() + len > MAX_BATCH_BYTES {
                    break;
                }
                self.seq = self.seq.wrapping_add(1);
                let off = self.sbuf.len();
                self.offsets.push(off);
                emit(
                    &mut self.sbuf,
                    &reqs[j].msg,
                    reqs[j].flags | NLM_F_REQUEST,
                    self.seq,
                );
                j += 1;
            }
            let last_off = *self.offsets.last().expect("batch is never empty");
            set_flag(&mut self.sbuf, last_off, NLM_F_ACK);
            match self.send_and_collect(first, &mut out[i..j]) {
                Ok(()) => {}
                Err(CollectError::Overrun) => {
                    tracing::debug!(
                        batch = j - i,
                        "netlink receive queue overflowed; resending one request at a time"
                    );
                    self.resend_one_by_one(&mut out[i..j]);
                }
                Err(CollectError::Socket(e)) => {
                    let errno = e.raw_os_error().unwrap_or(Errno::EIO as i32);
                    for o in &mut out[i..j] {
                        *o = Err(NlErr {
                            errno,
                            ext: Some(format!("netlink socket error: {e}")),
                        });
                    }
                }
            }
            i = j;
        }
        out
    }

    /// Resends the messages of the current batch (still in `sbuf`) one at a time with an ACK
    /// each, under fresh sequence numbers so stale answers cannot be mistaken for new ones.
    fn resend_one_by_one(&mut self, out: &mut [Result<(), NlErr>]) {
        // The socket stays "congested" (the kernel drops every new reply) until its queue has
        // been emptied once: drain what is left of the failed batch first.
        self.drain();
        let batch = std::mem::take(&mut self.sbuf);
        let offsets = std::mem::take(&mut self.offsets);
        for (k, &off) in offsets.iter().enumerate() {
            let len = u32::from_ne_bytes(batch[off..off + 4].try_into().expect("4 bytes")) as usize;
            self.sbuf.clear();
            self.sbuf.extend_from_slice(&batch[off..off + len]);
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            self.sbuf[8..12].copy_from_slice(&seq.to_ne_bytes());
            set_flag(&mut self.sbuf, 0, NLM_F_ACK);
            let mut one = [Ok(())];
            out[k] = match self.send_and_collect(seq, &mut one) {
                Ok(()) => one[0].clone(),
                Err(CollectError::Overrun) => Err(NlErr {
                    errno: Errno::ENOBUFS as i32,
                    ext: Some("netlink receive queue overflowed twice".into()),
                }),
                Err(CollectError::Socket(e)) => Err(NlErr {
                    errno: e.raw_os_error().unwrap_or(Errno::EIO as i32),
                    ext: Some(format!("netlink socket error: {e}")),
                }),
            };
        }
        self.sbuf = batch;
        self.sbuf.clear();
        self.offsets = offsets;
    }

    /// Sends `sbuf` and reads answers until the one for the last request (sequence number
    /// `first + out.len() - 1`) has arrived, recording failures in `out`.
    fn send_and_collect(
        &mut self,
        first: u32,
        out: &mut [Result<(), NlErr>],
    ) -> Result<(), CollectError> {
        loop {
            match self.sock.send(&self.sbuf, 0) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
                Err(e) => return Err(CollectError::Socket(e)),
            }
        }
        let n = out.len();
        let last = first.wrapping_add(n as u32 - 1);
        loop {
            self.recv()?;
            let mut done = false;
            for m in messages(&self.rbuf) {
                if m.kind != NLMSG_ERROR {
                    continue;
                }
                let idx = m.seq.wrapping_sub(first) as usize;
                if idx >= n {
                    continue; // an answer to an earlier, abandoned batch
                }
                if let Some(err) = parse_error(&m) {
                    out[idx] = Err(err);
                }
                if m.seq == last {
                    done = true;
                }
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Discards everything queued on the socket without blocking.
    fn drain(&mut self) {
        loop {
            self.rbuf.clear();
            match self.sock.recv(&mut self.rbuf, nix::libc::MSG_DONTWAIT) {
                Ok(_) => continue,
                Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
                Err(e) if e.raw_os_error() == Some(Errno::ENOBUFS as i32) => continue,
                Err(_) => return, // EAGAIN: empty
            }
        }
    }

    fn recv(&mut self) -> Result<(), CollectError> {
        loop {
            self.rbuf.clear();
            match self.sock.recv(&mut self.rbuf, 0) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(Errno::EINTR as i32) => continue,
                Err(e) if e.raw_os_error() == Some(Errno::ENOBUFS as i32) => {
                    return Err(CollectError::Overrun)
                }
                Err(e) => return Err(CollectError::Socket(e)),
            }
        }
    }

    // ===== reads =====

    /// Sends a `GET` request (one object) and returns the reply, or `Ok(None)` when the kernel
    /// answers `ENODEV`/`ENOENT`/`ESRCH`.
    pub(crate) fn get(
        &mut self,
        msg: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Option<RouteNetlinkMessage>, KernelError> {
        self.sbuf.clear();
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        emit(&mut self.sbuf, &msg, NLM_F_REQUEST, seq);
        self.sock
            .send(&self.sbuf, 0)
            .map_err(|e| KernelError::socket("send", e))?;
        loop {
            self.recv().map_err(collect_to_kernel)?;
            for m in messages(&self.rbuf) {
                if m.seq != seq {
                    continue;
                }
                if m.kind == NLMSG_ERROR {
                    return match parse_error(&m) {
                        None => Ok(None),
                        Some(e) if gone(e.errno) || e.errno == Errno::ENODEV as i32 => Ok(None),
                        Some(e) => Err(e.into_error(what)),
                    };
                }
                return decode(m.bytes).map(Some);
            }
        }
    }

    /// Dumps objects (`NLM_F_DUMP`), retrying when the dump was interrupted by a change.
    pub(crate) fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        what: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, KernelError> {
        for _ in 0..5 {
            self.sbuf.clear();
            self.seq = self.seq.wrapping_add(1);
            let seq = self.seq;
            emit(&mut self.sbuf, &msg, NLM_F_REQUEST | NLM_F_DUMP, seq);
            self.sock
                .send(&self.sbuf, 0)
                .map_err(|e| KernelError::socket("send", e))?;
            let mut out = Vec::new();
            let mut interrupted = false;
            'recv: loop {
                self.recv().map_err(collect_to_kernel)?;
                for m in messages(&self.rbuf) {
                    if m.seq != seq {
                        continue;
                    }
                    if m.flags & NLM_F_DUMP_INTR != 0 {
                        interrupted = true;
                    }
                    match m.kind {
                        NLMSG_DONE => break 'recv,
                        NLMSG_ERROR => {
                            if let Some(e) = parse_error(&m) {
                                return Err(e.into_error(what));
                            }
                            break 'recv;
                        }
                        _ => out.push(decode(m.bytes)?),
                    }
                }
            }
            if !interrupted {
                return Ok(out);
            }
        }
        Err(KernelError::refused(
            what,
            Errno::EINTR as i32,
            Some("dump interrupted five times by concurrent changes".into()),
        ))
    }

    /// Dumps the routes matching `filter` (IPv4 and/or IPv6, every table).
    pub fn routes(&mut self, filter: &RouteFilter) -> Result<Vec<KernelRoute>, KernelError> {
        let oif = match &filter.device {
            None => None,
            Some(Device::Index(i)) => Some(*i),
            Some(Device::Name(n)) => match self.link_index(n)? {
                Some(i) => Some(i),
                None => return Ok(Vec::new()),
            },
        };
        let families: &[Family] = match filter.family {
            Some(Family::V4) => &[Family::V4],
            Some(Family::V6) => &[Family::V6],
            None => &[Family::V4, Family::V6],
        };
        let mut out = Vec::new();
        for f in families {
            let mut m = RouteMessage::default();
            m.header.address_family = f.netlink();
            for msg in self.dump(RouteNetlinkMessage::GetRoute(m), "dump routes")? {
                if let RouteNetlinkMessage::NewRoute(rm) = msg {
                    if let Some(r) = route::decode_route(&rm) {
                        if filter.matches(&r, oif) {
                            out.push(r);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// The index of the device `name`, or `None` if there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, KernelError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.get(RouteNetlinkMessage::GetLink(m), "get link")? {
            Some(RouteNetlinkMessage::NewLink(l)) => Ok(Some(l.header.index)),
            _ => Ok(None),
        }
    }
}

/// Flags for an add that replaces what is there.
pub(crate) const REPLACE: u16 = NLM_F_CREATE | NLM_F_REPLACE;

fn is_delete(op: &WriteOp) -> bool {
    matches!(
        op,
        WriteOp::DeleteRoute(_) | WriteOp::DeleteNeighbour(_) | WriteOp::DeleteFdb(_)
    )
}

/// The errnos that mean "there was nothing to delete".
pub(crate) fn gone(errno: i32) -> bool {
    errno == Errno::ESRCH as i32 || errno == Errno::ENOENT as i32
}

fn build_request(
    op: &WriteOp,
    resolve: &dyn Fn(&Device) -> Option<u32>,
) -> Result<Option<Request>, KernelError> {
    let need = |d: &Device| {
        resolve(d).ok_or_else(|| KernelError::NoSuchDevice {
            name: d.to_string(),
        })
    };
    Ok(Some(match op {
        WriteOp::ReplaceRoute(r) => {
            r.validate()?;
            Request {
                msg: RouteNetlinkMessage::NewRoute(route::replace_route_message(
                    r,
                    MARGAY_RT_PROTO,
                    need,
                )?),
                flags: REPLACE,
            }
        }
        WriteOp::DeleteRoute(k) => Request {
            msg: RouteNetlinkMessage::DelRoute(route::delete_route_message(k, MARGAY_RT_PROTO)),
            flags: 0,
        },
        WriteOp::ReplaceNeighbour(n) => Request {
            msg: RouteNetlinkMessage::NewNeighbour(tunnel::neighbour_message(n, need(&n.dev)?)),
            flags: REPLACE,
        },
        WriteOp::DeleteNeighbour(n) => match resolve(&n.dev) {
            None => return Ok(None),
            Some(i) => Request {
                msg: RouteNetlinkMessage::DelNeighbour(tunnel::neighbour_message(n, i)),
                flags: 0,
            },
        },
        WriteOp::ReplaceFdb(e) => Request {
            msg: RouteNetlinkMessage::NewNeighbour(tunnel::fdb_message(e, need(&e.dev)?)),
            flags: REPLACE,
        },
        WriteOp::DeleteFdb(e) => match resolve(&e.dev) {
            None => return Ok(None),
            Some(i) => Request {
                msg: RouteNetlinkMessage::DelNeighbour(tunnel::fdb_message(e, i)),
                flags: 0,
            },
        },
    }))
}

fn collect_to_kernel(e: CollectError) -> KernelError {
    match e {
        CollectError::Overrun => KernelError::socket(
            "recv",
            std::io::Error::from_raw_os_error(Errno::ENOBUFS as i32),
        ),
        CollectError::Socket(e) => KernelError::socket("recv", e),
    }
}

/// Appends `msg` with a netlink header to `buf`, 4-byte aligned.
pub(crate) fn emit(buf: &mut Vec<u8>, msg: &RouteNetlinkMessage, flags: u16, seq: u32) {
    let off = buf.len();
    let body = msg.buffer_len();
    let len = NLMSG_HDRLEN + body;
    buf.resize(off + align4(len), 0);
    buf[off..off + 4].copy_from_slice(&(len as u32).to_ne_bytes());
    buf[off + 4..off + 6].copy_from_slice(&msg.message_type().to_ne_bytes());
    buf[off + 6..off + 8].copy_from_slice(&flags.to_ne_bytes());
    buf[off + 8..off + 12].copy_from_slice(&seq.to_ne_bytes());
    buf[off + 12..off + 16].copy_from_slice(&0u32.to_ne_bytes());
    msg.serialize(&mut buf[off + NLMSG_HDRLEN..off + len]);
}

fn set_flag(buf: &mut [u8], off: usize, flag: u16) {
    let f = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]) | flag;
    buf[off + 6..off + 8].copy_from_slice(&f.to_ne_bytes());
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One netlink message of a received datagram.
pub(crate) struct RawMsg<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// The whole message, header included.
    pub bytes: &'a [u8],
}

/// Splits a datagram into messages; stops at the first malformed header.
pub(crate) fn messages(buf: &[u8]) -> impl Iterator<Item = RawMsg<'_>> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + NLMSG_HDRLEN > buf.len() {
            return None;
        }
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return None;
        }
        let m = RawMsg {
            kind: u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?),
            flags: u16::from_ne_bytes(buf[off + 6..off + 8].try_into().ok()?),
            seq: u32::from_ne_bytes(buf[off + 8..off + 12].try_into().ok()?),
            bytes: &buf[off..off + len],
        };
        off += align4(len);
        Some(m)
    })
}

/// Reads an `NLMSG_ERROR`: `None` for an ACK, the errno and extended-ACK text otherwise.
pub(crate) fn parse_error(m: &RawMsg<'_>) -> Option<NlErr> {
    let b = m.bytes;
    if b.len() < NLMSG_HDRLEN + 4 {
        return Some(NlErr {
            errno: Errno::EBADMSG as i32,
            ext: Some("truncated netlink error message".into()),
        });
    }
    let code = i32::from_ne_bytes(b[16..20].try_into().expect("4 bytes"));
    if code == 0 {
        return None;
    }
    let mut ext = None;
    if m.flags & NLM_F_ACK_TLVS != 0 && b.len() >= 36 {
        // After the code: the request's header, and its payload unless capped.
        let orig_len = u32::from_ne_bytes(b[20..24].try_into().expect("4 bytes")) as usize;
        let mut off = 20
            + if m.flags & NLM_F_CAPPED != 0 {
                NLMSG_HDRLEN
            } else {
                align4(orig_len)
            };
        while off + 4 <= b.len() {
            let len = u16::from_ne_bytes([b[off], b[off + 1]]) as usize;
            let kind = u16::from_ne_bytes([b[off + 2], b[off + 3]]) & 0x3fff;
            if len < 4 || off + len > b.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let s = &b[off + 4..off + len];
                let s = s.split(|c| *c == 0).next().unwrap_or(&[]);
                ext = Some(String::from_utf8_lossy(s).into_owned());
            }
            off += align4(len);
        }
    }
    Some(NlErr { errno: -code, ext })
}

fn decode(bytes: &[u8]) -> Result<RouteNetlinkMessage, KernelError> {
    let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
        .map_err(|e| KernelError::Decode(e.to_string()))?;
    match m.payload {
        NetlinkPayload::InnerMessage(i) => Ok(i),
        other => Err(KernelError::Decode(format!(
            "expected an rtnetlink message, got {other:?}"
        ))),
    }
}

/// Builds the bytes of one request as [`Netlink`] sends it (for tests and debugging).
pub fn request_bytes(msg: &RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut b = Vec::new();
    emit(&mut b, msg, flags | NLM_F_REQUEST, seq);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Route, RouteKey};

    #[test]
    fn emitted_header_is_what_the_kernel_expects() {
        let r = Route::blackhole("10.65.1.0/26".parse().unwrap());
        let msg = RouteNetlinkMessage::NewRoute(
            route::replace_route_message(&r, MARGAY_RT_PROTO, |_| unreachable!()).unwrap(),
        );
        let b = request_bytes(&msg, REPLACE, 42);
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, b.len());
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 24, "RTM_NEWROUTE");
        assert_eq!(
            u16::from_ne_bytes([b[6], b[7]]),
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 42);
        // The netlink-packet-core decoder agrees with our header.
        let back = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&b).unwrap();
        assert_eq!(back.header.sequence_number, 42);
        assert!(matches!(
            back.payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(_))
        ));
    }

    #[test]
    fn batch_of_messages_splits_back() {
        let mut buf = Vec::new();
        for (i, p) in ["10.0.0.0/24", "10.0.1.0/24", "fd00::/64"]
            .iter()
            .enumerate()
        {
            let m = RouteNetlinkMessage::DelRoute(route::delete_route_message(
                &RouteKey::new(254, p.parse().unwrap()),
                MARGAY_RT_PROTO,
            ));
            emit(&mut buf, &m, NLM_F_REQUEST, 100 + i as u32);
        }
        let seqs: Vec<u32> = messages(&buf).map(|m| m.seq).collect();
        assert_eq!(seqs, vec![100, 101, 102]);
        assert!(messages(&buf).all(|m| m.kind == 25));
    }

    fn error_msg(code: i32, flags: u16, tlv_msg: Option<&str>) -> Vec<u8> {
        let mut b = Vec::new();
        let mut body = Vec::new();
        body.extend_from_slice(&code.to_ne_bytes());
        // The capped original header.
        body.extend_from_slice(&44u32.to_ne_bytes());
        body.extend_from_slice(&24u16.to_ne_bytes());
        body.extend_from_slice(&0u16.to_ne_bytes());
        body.extend_from_slice(&7u32.to_ne_bytes());
        body.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(s) = tlv_msg {
            let mut v = s.as_bytes().to_vec();
            v.push(0);
            let len = 4 + v.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
            body.extend_from_slice(&v);
            body.resize(align4(body.len()), 0);
        }
        let len = 16 + body.len();
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&7u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&body);
        b
    }

    #[test]
    fn error_with_extended_ack_text() {
        let b = error_msg(
            -19,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            Some("Nexthop device is not up"),
        );
        let m = messages(&b).next().unwrap();
        let e = parse_error(&m).unwrap();
        assert_eq!(e.errno, 19);
        assert_eq!(e.ext.as_deref(), Some("Nexthop device is not up"));
    }

    #[test]
    fn ack_is_not_an_error() {
        let b = error_msg(0, NLM_F_CAPPED, None);
        let m = messages(&b).next().unwrap();
        assert_eq!(parse_error(&m), None);
    }

    #[test]
    fn gone_errnos() {
        assert!(gone(Errno::ESRCH as i32));
        assert!(gone(Errno::ENOENT as i32));
        assert!(!gone(Errno::EEXIST as i32));
    }
}
