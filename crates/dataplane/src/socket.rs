//! A synchronous rtnetlink socket: one request at a time, acknowledged or dumped. A socket opened
//! inside a namespace stays bound to it, so a plugin opens one per namespace it works in and never
//! moves its own threads around.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_ECHO, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use weft_netns::NetNs;

use crate::error::{DataplaneError, Result};

/// How a change request treats an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Fail with EEXIST when it exists (`ip ... add`).
    Create,
    /// Create or replace (`ip ... replace`).
    Replace,
    /// Change an existing object (`ip link set`, deletions).
    Modify,
}

impl Mode {
    pub(crate) fn flags(self) -> u16 {
        match self {
            Mode::Create => NLM_F_CREATE | NLM_F_EXCL,
            Mode::Replace => NLM_F_CREATE | NLM_F_REPLACE,
            Mode::Modify => 0,
        }
    }
}

/// The receive buffer: the kernel never sends a netlink datagram over 32 KiB (dumps are cut
/// there, and single replies are a few KiB), so one read always takes a whole datagram.
const RECEIVE_BUFFER: usize = 64 * 1024;

/// An rtnetlink socket in one namespace.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// A socket in the calling thread's namespace.
    pub fn new() -> Result<Netlink> {
        // Neither bound nor connected: the kernel binds it on the first request, and a request
        // without an address goes to the kernel.
        let socket = Socket::new(NETLINK_ROUTE).map_err(DataplaneError::Socket)?;
        // Extended acks give the kernel's reason in errors; older kernels lack it, which is fine.
        let _ = socket.set_ext_ack(true);
        Ok(Netlink { socket, seq: 0, buf: Vec::with_capacity(RECEIVE_BUFFER) })
    }

    /// A socket bound to `netns`, opened on a short-lived thread inside it.
    pub fn in_netns(netns: &NetNs) -> Result<Netlink> {
        netns.run(Netlink::new)?
    }

    /// A socket bound to `netns`, opened by entering it on the calling thread and coming back
    /// (see [`NetNs::run_here`]): for single-threaded plugin processes.
    pub fn in_netns_here(netns: &NetNs) -> Result<Netlink> {
        netns.run_here(Netlink::new)?
    }

    /// Sends a change request and waits for its acknowledgement.
    pub(crate) fn change(
        &mut self,
        msg: RouteNetlinkMessage,
        mode: Mode,
        op: &'static str,
        object: &dyn std::fmt::Display,
    ) -> Result<()> {
        self.request(msg, NLM_F_ACK | mode.flags(), op, object).map(drop)
    }

    /// Sends a change request asking the kernel to echo what it made (kernels from 6.3 do for
    /// links), and waits for its acknowledgement. Returns the echoed messages, if any.
    pub(crate) fn change_echo<T>(
        &mut self,
        msg: RouteNetlinkMessage,
        mode: Mode,
        op: &'static str,
        object: &dyn std::fmt::Display,
        decode: impl FnMut(&[u8]) -> Result<Option<T>>,
    ) -> Result<Vec<T>> {
        self.request_with(msg, NLM_F_ACK | NLM_F_ECHO | mode.flags(), op, object, decode)
    }

    /// Dumps every object of the kind of `msg`.
    pub(crate) fn dump(&mut self, msg: RouteNetlinkMessage, op: &'static str) -> Result<Vec<RouteNetlinkMessage>> {
        self.request(msg, NLM_F_DUMP, op, &"")
    }

    pub(crate) fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
        object: &dyn std::fmt::Display,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        self.request_with(msg, flags, op, object, |bytes| {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                .map_err(|e| DataplaneError::Protocol(format!("decoding reply to {op}: {e}")))?;
            Ok(match msg.payload {
                NetlinkPayload::InnerMessage(inner) => Some(inner),
                _ => None,
            })
        })
    }

    /// Sends `msg` and collects the replies, each decoded by `decode` from the whole netlink
    /// message (header included); acknowledgements, errors and the end of a dump are handled
    /// here. Lets hot paths read the few attributes they need instead of decoding everything.
    pub(crate) fn request_with<T>(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        op: &'static str,
        object: &dyn std::fmt::Display,
        decode: impl FnMut(&[u8]) -> Result<Option<T>>,
    ) -> Result<Vec<T>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.exchange(&buf, flags, op, object, decode)
    }

    /// Sends a request of a type netlink-packet-route does not model (nexthop objects): `body`
    /// is the message after the netlink header; replies as [`Netlink::request_with`].
    pub(crate) fn request_raw<T>(
        &mut self,
        kind: u16,
        flags: u16,
        body: &[u8],
        op: &'static str,
        object: &dyn std::fmt::Display,
        decode: impl FnMut(&[u8]) -> Result<Option<T>>,
    ) -> Result<Vec<T>> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HEADER_LEN + body.len();
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&(len as u32).to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&self.seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(body);
        self.exchange(&buf, flags, op, object, decode)
    }

    /// Sends one serialized request (its sequence number `self.seq`) and collects the replies.
    fn exchange<T>(
        &mut self,
        buf: &[u8],
        flags: u16,
        op: &'static str,
        object: &dyn std::fmt::Display,
        mut decode: impl FnMut(&[u8]) -> Result<Option<T>>,
    ) -> Result<Vec<T>> {
        self.socket.send(buf, 0).map_err(DataplaneError::Socket)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let acked = flags & NLM_F_ACK != 0;
        let mut out = Vec::new();
        loop {
            self.buf.clear();
            let len = self.socket.recv(&mut self.buf, libc::MSG_TRUNC).map_err(DataplaneError::Socket)?;
            if len > self.buf.len() {
                return Err(DataplaneError::Protocol(format!("a reply to {op} of {len} bytes was truncated")));
            }
            let mut rest = &self.buf[..];
            while rest.len() >= NLMSG_HEADER_LEN {
                let msg_len = u32_at(rest, 0) as usize;
                if msg_len < NLMSG_HEADER_LEN || msg_len > rest.len() {
                    return Err(DataplaneError::Protocol(format!("a reply to {op} has a bad length")));
                }
                let (message, next) = rest.split_at(msg_len);
                rest = &next[(msg_len.next_multiple_of(4) - msg_len).min(next.len())..];
                if u32_at(message, 8) != self.seq {
                    continue;
                }
                match u16::from_ne_bytes([message[4], message[5]]) {
                    NLMSG_ERROR => {
                        let code = message.get(16..20).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        if code == 0 {
                            return Ok(out);
                        }
                        return Err(DataplaneError::Netlink {
                            op,
                            object: object.to_string(),
                            source: std::io::Error::from_raw_os_error(-code),
                        });
                    }
                    NLMSG_DONE => return Ok(out),
                    NLMSG_NOOP => {}
                    _ => {
                        if let Some(item) = decode(message)? {
                            out.push(item);
                            if !dump && !acked {
                                return Ok(out);
                            }
                        }
                    }
                }
            }
        }
    }
}

const NLMSG_HEADER_LEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

/// The native-endian u32 at `offset` of a buffer at least `offset + 4` long.
fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_ne_bytes([bytes[offset], bytes[offset + 1], bytes[offset + 2], bytes[offset + 3]])
}
