//! TUN offloads, sans-IO. With `IFF_VNET_HDR` and TSO enabled the kernel hands the forwarder
//! TCP packets of up to 64 KiB with a `virtio_net_hdr` in front; on the wire every datagram
//! must still carry one ordinary packet of at most the pod MTU (flannel's format), so a large
//! packet is cut into the segments the kernel would have made ([`segment`], equal sizes but
//! the last: one UDP GSO send). On the way in, consecutive segments of one TCP flow are joined
//! back into one large packet ([`Coalescer`]) that the kernel takes in one TUN write and
//! segments again only if it has to.
//!
//! Where the kernel can cut packets that are already in UDP (GSO over a UDP tunnel, TUN/TAP
//! since Linux 6.17), the forwarder cuts nothing: it puts the outer headers before the large
//! packet ([`encapsulate`]) and writes it to a TAP device of its own; the kernel forwards it
//! to the peer and cuts it where it leaves the node (or a NIC does), into the same datagrams.
//! Over a path that never cuts it (veth: the lab, nodes in containers) the peer receives it
//! whole, its TCP checksum still partial ([`whole_tcp`]), and writes it to its TUN as it is.

/// `struct virtio_net_hdr`: what precedes every packet read from or written to the TUN.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_ECN: u8 = 0x80;
/// `gso_type` bit: the packet is in UDP over IPv4, the GSO type is the inner packet's.
pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
/// `struct virtio_net_hdr_v1_hash_tunnel`: the header a TAP queue takes once its size is set to
/// this (`TUNSETVNETHDRSZ`), with the outer UDP and inner IP headers' offsets at its end.
pub const TUNNEL_VNET_HDR_LEN: usize = 24;
const ETH_LEN: usize = 14;
/// What goes before an inner packet written to the sending TAP: the tunnel vnet header, an
/// Ethernet header, the outer IPv4 and UDP headers.
pub const ENCAP_PREFIX_LEN: usize = TUNNEL_VNET_HDR_LEN + ETH_LEN + 20 + 8;
const TCP: u8 = 6;
const UDP: u8 = 17;
const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const CWR: u8 = 0x80;

impl VnetHdr {
    pub fn decode(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// The one's-complement sum of `data` as 16-bit big-endian words, added to `acc`, not yet
/// folded. The words are summed in the machine's own byte order, eight bytes at a time, and the
/// folded result swapped once (RFC 1071 §2(B): the sum does not depend on the byte order).
fn sum(data: &[u8], acc: u64) -> u64 {
    let mut native: u64 = 0;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        // Two 32-bit halves: 64 KiB of them cannot overflow 64 bits.
        native += (v & 0xffff_ffff) + (v >> 32);
    }
    let rest = words.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    let v = u64::from_ne_bytes(tail);
    native += (v & 0xffff_ffff) + (v >> 32);
    let folded = fold(native);
    acc + u64::from(if cfg!(target_endian = "little") { folded.swap_bytes() } else { folded })
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of an IPv4 packet's transport segment of `len` bytes.
fn pseudo(ip: &[u8], protocol: u8, len: usize) -> u64 {
    sum(&ip[12..20], u64::from(protocol) + len as u64)
}

fn set_ip_checksum(ip: &mut [u8], header_len: usize) {
    ip[10..12].fill(0);
    let c = !fold(sum(&ip[..header_len], 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// Completes a checksum the kernel left partial (`NEEDS_CSUM`: the pseudo-header sum is in
/// place at `csum_start + csum_offset`): the sum from `csum_start` to the end, stored there.
pub fn complete_checksum(packet: &mut [u8], hdr: &VnetHdr) -> bool {
    let (start, at) = (usize::from(hdr.csum_start), usize::from(hdr.csum_start) + usize::from(hdr.csum_offset));
    if at + 2 > packet.len() || start > at {
        return false;
    }
    let c = !fold(sum(&packet[start..], 0));
    // A UDP checksum of 0 means none: sent as all ones.
    let c = if c == 0 && packet.get(9) == Some(&UDP) { 0xffff } else { c };
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Whether the TCP checksum of the IPv4 packet `p` holds only its pseudo-header's sum (left
/// partial, for a device to complete), as a kernel hands on a packet whose checksum it
/// offloaded and a virtual device (veth) delivers it: no wire was crossed to damage it.
pub fn tcp_checksum_partial(p: &[u8]) -> bool {
    let Some(&first) = p.first() else { return false };
    let ihl = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || ihl < 20 || p.len() < ihl + 20 || p[9] != TCP {
        return false;
    }
    let field = u16::from_be_bytes([p[ihl + 16], p[ihl + 17]]);
    let partial = fold(pseudo(p, TCP, p.len() - ihl));
    // One's complement has two zeros.
    field == partial || (field | partial == 0xffff && field & partial == 0)
}

/// The vnet header for writing `p` (an IPv4/TCP packet whose checksum is left partial) alone
/// to the TUN: the kernel completes its checksum.
pub fn partial_checksum_header(p: &[u8]) -> VnetHdr {
    let ihl = usize::from(p[0] & 0x0f) * 4;
    VnetHdr { flags: F_NEEDS_CSUM, csum_start: ihl as u16, csum_offset: 16, ..VnetHdr::default() }
}

/// The outer headers of a packet the kernel is to cut: this node's TAP (its MAC), the source
/// address the kernel would send from, the peer, the port, and the IP id of the first datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encap {
    pub mac: [u8; 6],
    pub src: std::net::Ipv4Addr,
    pub dst: std::net::Ipv4Addr,
    pub port: u16,
    pub id: u16,
}

/// Fills `out` with what goes before `packet` (an IPv4/TCP packet read from the TUN with `hdr`:
/// GSO TCPv4, checksum partial) for the kernel to cut it into UDP datagrams to `e.dst`, each
/// one segment of `hdr.gso_size` bytes of payload in IPv4/UDP, flannel's format: the tunnel
/// vnet header (GSO over UDP/IPv4, the inner checksum to complete), an Ethernet header to the
/// TAP itself, the outer IPv4 header (DF, TTL 64, checksum) and the UDP header (no checksum,
/// as VXLAN's). How many datagrams it makes; `None` when it cannot go this way.
pub fn encapsulate(packet: &[u8], hdr: &VnetHdr, e: &Encap, out: &mut [u8; ENCAP_PREFIX_LEN]) -> Option<usize> {
    if packet.len() < 40 || packet[0] >> 4 != 4 || packet[9] != TCP {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl + 20 {
        return None;
    }
    let thl = usize::from(packet[ihl + 12] >> 4) * 4;
    let hl = ihl + thl;
    let mss = usize::from(hdr.gso_size);
    let partial = hdr.flags & F_NEEDS_CSUM != 0 && usize::from(hdr.csum_start) == ihl && hdr.csum_offset == 16;
    let outer_len = 28 + packet.len();
    if thl < 20 || packet.len() <= hl || mss == 0 || !partial || outer_len > 65535 {
        return None;
    }
    out.fill(0);
    let inner_nh = ETH_LEN + 28;
    let (v, rest) = out.split_at_mut(TUNNEL_VNET_HDR_LEN);
    v[0] = F_NEEDS_CSUM;
    v[1] = GSO_UDP_TUNNEL_IPV4 | (hdr.gso_type & (GSO_TCPV4 | GSO_ECN));
    v[2..4].copy_from_slice(&((inner_nh + hl) as u16).to_le_bytes());
    v[4..6].copy_from_slice(&hdr.gso_size.to_le_bytes());
    v[6..8].copy_from_slice(&((inner_nh + ihl) as u16).to_le_bytes());
    v[8..10].copy_from_slice(&16u16.to_le_bytes());
    // num_buffers, hash value, report and padding stay zero; then the two offsets.
    v[20..22].copy_from_slice(&((ETH_LEN + 20) as u16).to_le_bytes());
    v[22..24].copy_from_slice(&(inner_nh as u16).to_le_bytes());
    outer_headers(e, packet.len(), rest);
    Some((packet.len() - hl).div_ceil(mss))
}

/// The Ethernet (to the TAP itself), IPv4 (DF, TTL 64, checksum) and UDP (no checksum)
/// headers before a payload of `payload` bytes, into `out` (42 bytes).
fn outer_headers(e: &Encap, payload: usize, out: &mut [u8]) {
    out[..6].copy_from_slice(&e.mac);
    out[6..12].copy_from_slice(&e.mac);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut out[ETH_LEN..ETH_LEN + 20];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((28 + payload) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&e.id.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = UDP;
    ip[12..16].copy_from_slice(&e.src.octets());
    ip[16..20].copy_from_slice(&e.dst.octets());
    set_ip_checksum(ip, 20);
    let udp = &mut out[ETH_LEN + 20..ETH_LEN + 28];
    udp[0..2].copy_from_slice(&e.port.to_be_bytes());
    udp[2..4].copy_from_slice(&e.port.to_be_bytes());
    udp[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
    udp[6..8].fill(0);
}

/// A probe's or an answer's length: a tag and a nonce.
pub const PROBE_LEN: usize = 16;
/// The tags: the first byte 0 makes neither an IP packet (a flannel node's TUN drops it).
const PROBE_ASK: [u8; 8] = *b"\0weft-k?";
const PROBE_ANSWER: [u8; 8] = *b"\0weft-k!";

/// A datagram asking a peer whether it takes what this node's kernel cuts, or its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Ask(u64),
    Answer(u64),
}

impl Probe {
    pub fn encode(self) -> [u8; PROBE_LEN] {
        let (tag, nonce) = match self {
            Probe::Ask(n) => (PROBE_ASK, n),
            Probe::Answer(n) => (PROBE_ANSWER, n),
        };
        let mut out = [0u8; PROBE_LEN];
        out[..8].copy_from_slice(&tag);
        out[8..].copy_from_slice(&nonce.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Option<Probe> {
        let b: &[u8; PROBE_LEN] = b.try_into().ok()?;
        let nonce = u64::from_be_bytes(b[8..].try_into().ok()?);
        match b[..8].try_into().ok()? {
            PROBE_ASK => Some(Probe::Ask(nonce)),
            PROBE_ANSWER => Some(Probe::Answer(nonce)),
            _ => None,
        }
    }
}

/// A probe as a frame for the TAP (no offload: a zero vnet header), so that it takes the way
/// the kernel-cut packets take, through the node's forwarding and its firewall.
pub fn probe_frame(e: &Encap, probe: Probe, out: &mut [u8; TUNNEL_VNET_HDR_LEN + ETH_LEN + 28 + PROBE_LEN]) {
    out[..TUNNEL_VNET_HDR_LEN].fill(0);
    outer_headers(e, PROBE_LEN, &mut out[TUNNEL_VNET_HDR_LEN..]);
    out[TUNNEL_VNET_HDR_LEN + ETH_LEN + 28..].copy_from_slice(&probe.encode());
}

/// When the datagram `p` is one whole TCP packet (no fragment) with its checksum left partial
/// and longer than the MTU on its way to its destination (`mtu_for`, asked only then) — a
/// peer's kernel-cut send that reached this node uncut (over veth) — the vnet header that has
/// the kernel take it as the segments it stands for, each within that MTU. Anything else is
/// `None` and goes the usual way.
pub fn whole_tcp(p: &[u8], mtu_for: impl FnOnce(std::net::Ipv4Addr) -> usize) -> Option<VnetHdr> {
    if p.len() < 40 || p[0] >> 4 != 4 || p[9] != TCP {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let fragment = u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0;
    if ihl < 20 || total != p.len() || p.len() < ihl + 20 || fragment {
        return None;
    }
    let thl = usize::from(p[ihl + 12] >> 4) * 4;
    let hl = ihl + thl;
    if thl < 20 || p.len() <= hl || !tcp_checksum_partial(p) {
        return None;
    }
    let mtu = mtu_for(std::net::Ipv4Addr::new(p[16], p[17], p[18], p[19]));
    if p.len() <= mtu || mtu <= hl {
        return None;
    }
    Some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: GSO_TCPV4 | if p[ihl + 13] & CWR != 0 { GSO_ECN } else { 0 },
        hdr_len: hl as u16,
        gso_size: (mtu - hl) as u16,
        csum_start: ihl as u16,
        csum_offset: 16,
    })
}

/// Why a large packet from the TUN cannot be cut into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentError {
    NotTcpV4,
    Truncated,
    TooBig,
}

/// Cuts the IPv4/TCP packet `packet` (as read from the TUN after its header `hdr`, GSO TCPv4)
/// into segments of `gso_size` bytes of payload, as the kernel's TSO would: the headers
/// repeated, the IP length, id and checksum, the TCP sequence number, flags (FIN and PSH only
/// on the last, CWR only on the first) and a full TCP checksum in each. They go into `out`,
/// back to back; every one but the last has the same length. The segment length and count.
pub fn segment(packet: &[u8], hdr: &VnetHdr, out: &mut Vec<u8>) -> Result<(usize, usize), SegmentError> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != TCP {
        return Err(SegmentError::NotTcpV4);
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    if ihl < 20 || packet.len() < ihl + 20 {
        return Err(SegmentError::Truncated);
    }
    let thl = usize::from(packet[ihl + 12] >> 4) * 4;
    let hl = ihl + thl;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]])).min(packet.len());
    if thl < 20 || total < hl {
        return Err(SegmentError::Truncated);
    }
    let mss = usize::from(hdr.gso_size);
    let payload = &packet[hl..total];
    if mss == 0 {
        return Err(SegmentError::Truncated);
    }
    let count = payload.len().div_ceil(mss).max(1);
    // 64 KiB cut at the smallest MSS TCP uses (64 bytes) is at most 1,024 segments.
    if count > 1024 {
        return Err(SegmentError::TooBig);
    }
    let seq = u32::from_be_bytes([packet[ihl + 4], packet[ihl + 5], packet[ihl + 6], packet[ihl + 7]]);
    let id = u16::from_be_bytes([packet[4], packet[5]]);
    let flags = packet[ihl + 13];
    out.clear();
    out.reserve(count * (hl + mss));
    for (i, chunk) in payload.chunks(mss).chain(std::iter::once(&[][..])).take(count).enumerate() {
        let start = out.len();
        out.extend_from_slice(&packet[..hl]);
        out.extend_from_slice(chunk);
        let seg = &mut out[start..];
        let len = hl + chunk.len();
        seg[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        seg[4..6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
        set_ip_checksum(seg, ihl);
        let seq_i = seq.wrapping_add((i * mss) as u32);
        seg[ihl + 4..ihl + 8].copy_from_slice(&seq_i.to_be_bytes());
        let mut f = flags;
        if i + 1 != count {
            f &= !(FIN | PSH);
        }
        if i != 0 {
            f &= !CWR;
        }
        seg[ihl + 13] = f;
        seg[ihl + 16..ihl + 18].fill(0);
        let c = !fold(sum(&seg[ihl..len], pseudo(seg, TCP, len - ihl)));
        seg[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
    }
    Ok((hl + mss.min(payload.len().max(1)), count))
}

/// Joins consecutive segments of one TCP flow (IPv4, no IP options, headers alike but for the
/// sequence number and PSH on the last) into one large packet with a GSO header, as the
/// kernel's GRO does; anything else passes alone. Packets are added in order; [`flush`]
/// gives the packet being built.
pub struct Coalescer {
    /// The packet being built: its vnet header, IP and TCP headers, and payload so far.
    buf: Vec<u8>,
    /// Segments in it, and the payload size of the first.
    count: usize,
    mss: usize,
    /// The payload of the last is shorter than `mss` (or it has PSH): nothing may follow.
    closed: bool,
    /// The first segment's checksum was left partial (it stays so when it goes alone).
    partial: bool,
}

/// Most segments joined into one packet.
const MAX_COALESCE: usize = 64;

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer { buf: Vec::with_capacity(65536 + VNET_HDR_LEN), count: 0, mss: 0, closed: false, partial: false }
    }
}

/// A segment's headers, when it is one that may be joined.
fn tcp_parts(p: &[u8]) -> Option<(usize, usize)> {
    if p.len() < 40 || p[0] != 0x45 || p[9] != TCP {
        return None;
    }
    let frag = u16::from_be_bytes([p[6], p[7]]) & 0x3fff;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let thl = usize::from(p[32] >> 4) * 4;
    let flags = p[33];
    // Only plain data segments: ACK, maybe PSH; nothing else set.
    if frag != 0 || total != p.len() || thl < 20 || total < 20 + thl || flags & !(PSH | 0x10) != 0 {
        return None;
    }
    Some((20 + thl, total - 20 - thl))
}

impl Coalescer {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether `p` continues the packet being built.
    fn continues(&self, p: &[u8], hl: usize, payload: usize) -> bool {
        if self.count == 0 || self.closed || self.count >= MAX_COALESCE {
            return false;
        }
        let built = &self.buf[VNET_HDR_LEN..];
        let bhl = 20 + usize::from(built[32] >> 4) * 4;
        if hl != bhl || payload == 0 || payload > self.mss || built.len() + payload > 65535 {
            return false;
        }
        // Same TOS, DF, TTL, protocol, addresses; same ports, ack, window, options.
        let same_ip = built[1] == p[1] && built[6] == p[6] && built[8..10] == p[8..10] && built[12..20] == p[12..20];
        let same_tcp = built[20..24] == p[20..24]
            && built[28..32] == p[28..32]
            && built[34..36] == p[34..36]
            && built[38..hl] == p[38..hl];
        let seq = |b: &[u8]| u32::from_be_bytes([b[24], b[25], b[26], b[27]]);
        let expected = seq(built).wrapping_add((built.len() - bhl) as u32);
        same_ip && same_tcp && seq(p) == expected && built[33] & PSH == 0
    }

    /// Adds `p`. When it does not continue the packet being built, that packet is finished
    /// first and given to `emit` (its vnet header included).
    pub fn push(&mut self, p: &[u8], emit: &mut dyn FnMut(&[u8])) {
        // Only segments whose checksum is right are joined: a joined packet is written with
        // its checksum left to the kernel, which would bless a damaged one. A damaged segment
        // goes alone, as it came, for the kernel to check (and drop). A checksum left partial
        // (a peer's kernel-cut send over veth, where no wire could damage it) is completed by
        // the kernel, joined or alone.
        let right = |p: &[u8]| fold(sum(&p[20..], pseudo(p, TCP, p.len() - 20))) == 0xffff;
        let parts = tcp_parts(p).filter(|_| right(p) || tcp_checksum_partial(p));
        if let Some((hl, payload)) = parts {
            if self.continues(p, hl, payload) {
                self.buf.extend_from_slice(&p[hl..]);
                self.count += 1;
                self.buf[VNET_HDR_LEN + 33] |= p[33] & PSH;
                self.closed = payload < self.mss;
                return;
            }
        }
        self.flush(emit);
        match parts {
            Some((_, payload)) if payload > 0 => {
                self.buf.clear();
                self.buf.extend_from_slice(&[0; VNET_HDR_LEN]);
                self.buf.extend_from_slice(p);
                self.count = 1;
                self.mss = payload;
                self.closed = p[33] & PSH != 0;
                self.partial = tcp_checksum_partial(p);
            }
            // Not a data segment: alone, with an empty vnet header (or one that has the kernel
            // complete a partial checksum).
            _ => {
                self.buf.clear();
                self.buf.extend_from_slice(&[0; VNET_HDR_LEN]);
                if tcp_checksum_partial(p) {
                    partial_checksum_header(p).encode(&mut self.buf);
                }
                self.buf.extend_from_slice(p);
                emit(&self.buf);
                self.buf.clear();
            }
        }
    }

    /// Gives the packet being built to `emit`: as it came when it is one segment, else joined,
    /// with a GSO header and its TCP checksum left partial for the kernel.
    pub fn flush(&mut self, emit: &mut dyn FnMut(&[u8])) {
        if self.count == 0 {
            return;
        }
        if self.count > 1 {
            let hl = 20 + usize::from(self.buf[VNET_HDR_LEN + 32] >> 4) * 4;
            let len = self.buf.len() - VNET_HDR_LEN;
            let ip = &mut self.buf[VNET_HDR_LEN..];
            ip[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            set_ip_checksum(ip, 20);
            let partial = fold(pseudo(ip, TCP, len - 20));
            ip[36..38].copy_from_slice(&partial.to_be_bytes());
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: GSO_TCPV4 | if ip[1] & 0x3 == 0x3 { GSO_ECN } else { 0 },
                hdr_len: hl as u16,
                gso_size: self.mss as u16,
                csum_start: 20,
                csum_offset: 16,
            };
            hdr.encode(&mut self.buf[..VNET_HDR_LEN]);
        } else if self.partial {
            partial_checksum_header(&self.buf[VNET_HDR_LEN..]).encode(&mut self.buf[..VNET_HDR_LEN]);
        }
        emit(&self.buf);
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        self.partial = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::checksum;

    /// An IPv4/TCP packet with `payload` bytes (a pattern), seq 1000, ACK|PSH, a timestamp
    /// option, its checksums right.
    fn tcp_packet(payload: usize) -> Vec<u8> {
        let thl = 32;
        let len = 20 + thl + payload;
        let mut p = vec![0x45, 0, 0, 0, 0x10, 0x00, 0x40, 0, 64, TCP, 0, 0, 198, 19, 1, 5, 198, 19, 2, 7];
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let mut tcp = vec![0x9c, 0x40, 0x14, 0x51, 0, 0, 0x03, 0xe8, 0, 0, 0, 7, 0x80, 0x18, 0x01, 0xf5, 0, 0, 0, 0];
        tcp.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8]);
        p.extend_from_slice(&tcp);
        p.extend((0..payload).map(|i| (i * 7 % 251) as u8));
        set_ip_checksum(&mut p, 20);
        let c = !fold(sum(&p[20..], pseudo(&p, TCP, len - 20)));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp_checksum_ok(p: &[u8]) -> bool {
        fold(sum(&p[20..], pseudo(p, TCP, p.len() - 20))) == 0xffff
    }

    #[test]
    fn checksums_agree_with_the_simple_one() {
        for len in [0usize, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 20, 1471, 1472, 65535] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            assert_eq!(!fold(sum(&data, 0)), checksum(&data), "{len}");
        }
    }

    #[test]
    fn segments_as_tso_would_and_joins_them_back() {
        let big = tcp_packet(4000);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut out = Vec::new();
        let (seg_len, count) = segment(&big, &hdr, &mut out).unwrap();
        assert_eq!((seg_len, count), (52 + 1420, 3));
        let segs: Vec<&[u8]> = vec![&out[..1472], &out[1472..2944], &out[2944..]];
        assert_eq!(segs[2].len(), 52 + 4000 - 2 * 1420);
        let mut payload = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_eq!(checksum(&s[..20]), 0, "IP checksum of segment {i}");
            assert!(tcp_checksum_ok(s), "TCP checksum of segment {i}");
            assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1000 + i as u16, "IP id");
            assert_eq!(u32::from_be_bytes([s[24], s[25], s[26], s[27]]), 1000 + 1420 * i as u32, "seq");
            assert_eq!(s[33] & PSH != 0, i == 2, "PSH only on the last");
            assert_eq!((&s[20..24], &s[28..32]), (&big[20..24], &big[28..32]), "ports, ack");
            payload.extend_from_slice(&s[52..]);
        }
        assert_eq!(payload, big[52..]);
        // CWR only on the first segment, as TSO does.
        let mut cwr = big.clone();
        cwr[33] |= CWR;
        let mut with_cwr = Vec::new();
        segment(&cwr, &hdr, &mut with_cwr).unwrap();
        let flags: Vec<bool> = with_cwr.chunks(1472).map(|s| s[33] & CWR != 0).collect();
        assert_eq!(flags, [true, false, false]);

        // Joined back: one packet with a GSO header, the whole payload, PSH from the last.
        let mut joined = Vec::new();
        let mut c = Coalescer::default();
        for s in &segs {
            c.push(s, &mut |p| joined.push(p.to_vec()));
        }
        c.flush(&mut |p| joined.push(p.to_vec()));
        assert_eq!(joined.len(), 1);
        let j = &joined[0];
        let h = VnetHdr::decode(j).unwrap();
        assert_eq!(
            (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset),
            (1, GSO_TCPV4, 52, 1420, 20, 16)
        );
        let ip = &j[VNET_HDR_LEN..];
        assert_eq!(ip.len(), big.len());
        assert_eq!(checksum(&ip[..20]), 0);
        assert_eq!(&ip[52..], &big[52..]);
        assert_eq!(ip[33] & PSH, PSH);
        // Its TCP checksum, completed as the kernel would, is the original's.
        let mut done = ip.to_vec();
        complete_checksum(&mut done, &h);
        assert!(tcp_checksum_ok(&done));
    }

    #[test]
    fn only_what_continues_a_flow_is_joined() {
        let hdr = VnetHdr { gso_type: GSO_TCPV4, gso_size: 1000, ..VnetHdr::default() };
        let mut out = Vec::new();
        segment(&tcp_packet(3000), &hdr, &mut out).unwrap();
        let segs: Vec<Vec<u8>> = out.chunks(1052).map(|s| s.to_vec()).collect();
        let run = |packets: &[Vec<u8>]| {
            let mut emitted = Vec::new();
            let mut c = Coalescer::default();
            for p in packets {
                c.push(p, &mut |x| emitted.push(x.to_vec()));
            }
            c.flush(&mut |x| emitted.push(x.to_vec()));
            emitted
        };
        assert_eq!(run(&segs).len(), 1);
        // Out of order: not joined.
        assert_eq!(run(&[segs[0].clone(), segs[2].clone(), segs[1].clone()]).len(), 3);
        // Another flow between: three packets.
        let mut other = segs[1].clone();
        other[19] = 8;
        assert_eq!(run(&[segs[0].clone(), other, segs[1].clone()]).len(), 3);
        // A non-TCP packet passes alone, with an empty vnet header before it.
        let mut udp = segs[0].clone();
        udp[9] = UDP;
        let e = run(&[udp.clone()]);
        assert_eq!(e, vec![[&[0u8; VNET_HDR_LEN][..], &udp[..]].concat()]);
        // A single segment goes as it came (no GSO header).
        let one = run(&[segs[0].clone()]);
        assert_eq!(one[0][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(one[0][VNET_HDR_LEN..], segs[0][..]);
        // A segment with a wrong checksum is not joined (the kernel checks it alone).
        let mut bad = segs[1].clone();
        bad[60] ^= 0xff;
        let e = run(&[segs[0].clone(), bad.clone(), segs[2].clone()]);
        assert_eq!(e.len(), 3, "the damaged one alone");
        assert_eq!(e[1][VNET_HDR_LEN..], bad[..]);
        assert_eq!(e[1][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        // Nothing follows a short segment.
        let mut short = segs[0].clone();
        short.truncate(1052 - 100);
        short[2..4].copy_from_slice(&((1052 - 100) as u16).to_be_bytes());
        assert_eq!(run(&[short, segs[1].clone()]).len(), 2);
    }

    #[test]
    fn a_small_mss_makes_hundreds_of_segments() {
        // 60,000 bytes at MSS 200: 300 segments (refused past 128 before).
        let big = tcp_packet(60_000);
        let hdr = VnetHdr { gso_type: GSO_TCPV4, gso_size: 200, ..VnetHdr::default() };
        let mut out = Vec::new();
        let (len, count) = segment(&big, &hdr, &mut out).unwrap();
        assert_eq!((len, count), (252, 300));
        assert!(out.chunks(252).all(tcp_checksum_ok));
    }

    /// `p` with its TCP checksum left partial, as a kernel that offloaded it hands it on.
    fn partial(mut p: Vec<u8>) -> Vec<u8> {
        let len = p.len();
        let c = fold(pseudo(&p, TCP, len - 20));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn large_packets_get_the_headers_the_kernel_cuts_them_by() {
        let big = partial(tcp_packet(8000));
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1420,
            csum_start: 20,
            csum_offset: 16,
        };
        let e = Encap {
            mac: [2, 0, 0, 0, 0, 9],
            src: "198.18.0.2".parse().unwrap(),
            dst: "198.18.0.3".parse().unwrap(),
            port: 8285,
            id: 77,
        };
        let mut out = [0u8; ENCAP_PREFIX_LEN];
        assert_eq!(encapsulate(&big, &hdr, &e, &mut out), Some(6), "8,000 bytes at 1,420 a datagram");
        let u = |i: usize| u16::from_le_bytes([out[i], out[i + 1]]);
        // struct virtio_net_hdr_v1_hash_tunnel: offsets from the Ethernet header's start.
        assert_eq!((out[0], out[1]), (F_NEEDS_CSUM, GSO_UDP_TUNNEL_IPV4 | GSO_TCPV4 | GSO_ECN));
        assert_eq!((u(2), u(4), u(6), u(8)), (42 + 52, 1420, 42 + 20, 16), "hdr_len, gso_size, csum start/offset");
        assert_eq!(out[10..20], [0; 10], "num_buffers, hash");
        assert_eq!((u(20), u(22)), (34, 42), "outer UDP header, inner IP header");
        let frame = &out[TUNNEL_VNET_HDR_LEN..];
        assert_eq!((&frame[..6], &frame[6..12], &frame[12..14]), (&e.mac[..], &e.mac[..], &[8u8, 0][..]));
        let ip = &frame[14..34];
        assert_eq!(checksum(ip), 0, "outer IP checksum");
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), 28 + big.len());
        assert_eq!((u16::from_be_bytes([ip[4], ip[5]]), ip[6], ip[8], ip[9]), (77, 0x40, 64, UDP), "id, DF, TTL, UDP");
        assert_eq!((&ip[12..16], &ip[16..20]), (&[198, 18, 0, 2][..], &[198, 18, 0, 3][..]));
        let udp = &frame[34..42];
        assert_eq!(udp, [0x20, 0x5d, 0x20, 0x5d, ((8 + big.len()) >> 8) as u8, (8 + big.len()) as u8, 0, 0]);
        // Not this way: a checksum that is not partial, a packet too long for one outer IP
        // packet, no MSS, not TCP.
        assert_eq!(encapsulate(&big, &VnetHdr { flags: 0, ..hdr }, &e, &mut out), None);
        let huge = partial(tcp_packet(65_535 - 52 - 20));
        assert_eq!(encapsulate(&huge, &hdr, &e, &mut out), None);
        assert_eq!(encapsulate(&big, &VnetHdr { gso_size: 0, ..hdr }, &e, &mut out), None);
        let mut udp_packet = big.clone();
        udp_packet[9] = UDP;
        assert_eq!(encapsulate(&udp_packet, &hdr, &e, &mut out), None);
    }

    #[test]
    fn probes_are_no_ip_packets_and_go_as_plain_frames() {
        for p in [Probe::Ask(7), Probe::Answer(u64::MAX)] {
            let bytes = p.encode();
            assert_eq!(Probe::decode(&bytes), Some(p));
            assert!(crate::packet::parse(&bytes).is_err(), "a TUN would take it for IP");
        }
        assert_eq!(Probe::decode(&[0; PROBE_LEN]), None);
        assert_eq!(Probe::decode(&Probe::Ask(1).encode()[..15]), None);
        let e = Encap {
            mac: [2, 0, 0, 0, 0, 9],
            src: "198.18.0.2".parse().unwrap(),
            dst: "198.18.0.3".parse().unwrap(),
            port: 8285,
            id: 5,
        };
        let mut frame = [0xaa; TUNNEL_VNET_HDR_LEN + ETH_LEN + 28 + PROBE_LEN];
        probe_frame(&e, Probe::Ask(9), &mut frame);
        assert_eq!(frame[..TUNNEL_VNET_HDR_LEN], [0; TUNNEL_VNET_HDR_LEN], "no offload asked");
        let ip = &frame[TUNNEL_VNET_HDR_LEN + ETH_LEN..TUNNEL_VNET_HDR_LEN + ETH_LEN + 20];
        assert_eq!((checksum(ip), u16::from_be_bytes([ip[2], ip[3]])), (0, 44));
        let udp = &frame[TUNNEL_VNET_HDR_LEN + ETH_LEN + 20..TUNNEL_VNET_HDR_LEN + ETH_LEN + 28];
        assert_eq!(udp, [0x20, 0x5d, 0x20, 0x5d, 0, 24, 0, 0]);
        assert_eq!(Probe::decode(&frame[frame.len() - PROBE_LEN..]), Some(Probe::Ask(9)));
    }

    #[test]
    fn an_uncut_datagram_is_taken_whole_only_when_it_is_one_partial_tcp_packet() {
        let big = partial(tcp_packet(5000));
        assert!(tcp_checksum_partial(&big));
        let h = whole_tcp(&big, |dst| {
            assert_eq!(dst, std::net::Ipv4Addr::new(198, 19, 2, 7));
            1472
        })
        .unwrap();
        assert_eq!(
            (h.flags, h.gso_type, h.hdr_len, h.gso_size, h.csum_start, h.csum_offset),
            (F_NEEDS_CSUM, GSO_TCPV4, 52, 1472 - 52, 20, 16)
        );
        let mut cwr = big.clone();
        cwr[33] |= CWR;
        assert_eq!(whole_tcp(&partial(cwr), |_| 1472).unwrap().gso_type, GSO_TCPV4 | GSO_ECN);
        // Segments as small as the MTU on the way (a pod's bridge smaller than the TUN).
        assert_eq!(whole_tcp(&big, |_| 1000).unwrap().gso_size, 1000 - 52);
        // Within the MTU, a full checksum (the kernel checks it), another length, not TCP, a
        // fragment, an MTU no header fits.
        assert_eq!(whole_tcp(&partial(tcp_packet(1000)), |_| 1472), None);
        let full = tcp_packet(5000);
        assert!(!tcp_checksum_partial(&full));
        assert_eq!(whole_tcp(&full, |_| 1472), None);
        assert_eq!(whole_tcp(&big[..4000], |_| 1472), None);
        let mut other = big.clone();
        other[9] = UDP;
        assert_eq!(whole_tcp(&other, |_| 1472), None);
        for frag in [[0x20, 0], [0, 1]] {
            let mut f = big.clone();
            f[6..8].copy_from_slice(&frag);
            set_ip_checksum(&mut f, 20);
            assert_eq!(whole_tcp(&f, |_| 1472), None, "{frag:?}");
        }
        assert_eq!(whole_tcp(&big, |_| 40), None);
        // The kernel completes it: right once done.
        let mut done = big.clone();
        assert!(complete_checksum(&mut done, &h));
        assert!(tcp_checksum_ok(&done));
    }

    #[test]
    fn segments_with_partial_checksums_are_joined_and_completed() {
        let hdr = VnetHdr { gso_type: GSO_TCPV4, gso_size: 1000, ..VnetHdr::default() };
        let mut out = Vec::new();
        segment(&tcp_packet(3000), &hdr, &mut out).unwrap();
        let segs: Vec<Vec<u8>> = out.chunks(1052).map(|s| partial(s.to_vec())).collect();
        let mut emitted = Vec::new();
        let mut c = Coalescer::default();
        for s in &segs {
            c.push(s, &mut |x| emitted.push(x.to_vec()));
        }
        c.flush(&mut |x| emitted.push(x.to_vec()));
        assert_eq!(emitted.len(), 1, "joined as right ones are");
        // Alone, it goes with a header that has the kernel complete it.
        let mut alone = Vec::new();
        let mut c = Coalescer::default();
        c.push(&segs[0], &mut |x| alone.push(x.to_vec()));
        c.flush(&mut |x| alone.push(x.to_vec()));
        let h = VnetHdr::decode(&alone[0]).unwrap();
        assert_eq!((h.flags, h.gso_type, h.csum_start, h.csum_offset), (F_NEEDS_CSUM, GSO_NONE, 20, 16));
        let mut done = alone[0][VNET_HDR_LEN..].to_vec();
        assert!(complete_checksum(&mut done, &h));
        assert!(tcp_checksum_ok(&done));
        // A right one alone still goes with an empty header; so does one that is neither.
        let right = tcp_packet(500);
        let mut bad = right.clone();
        bad[60] ^= 1;
        for p in [right, bad] {
            let mut e = Vec::new();
            let mut c = Coalescer::default();
            c.push(&p, &mut |x| e.push(x.to_vec()));
            c.flush(&mut |x| e.push(x.to_vec()));
            assert_eq!(e[0][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        }
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let mut p = tcp_packet(100);
        let len = p.len();
        let partial = fold(pseudo(&p, TCP, len - 20));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 20, csum_offset: 16, ..VnetHdr::default() };
        assert!(complete_checksum(&mut p, &hdr));
        assert!(tcp_checksum_ok(&p));
        assert!(!complete_checksum(&mut p[..30], &hdr));
    }
}
