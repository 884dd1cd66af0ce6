//! The framing, sans-IO: what is read from the TUN is an IPv4 packet that goes, whole, as the
//! payload of one UDP datagram (flannel's udp format: nothing else in the payload); what arrives
//! is checked before it is written to the TUN. TTL decrement with an incremental checksum
//! update (RFC 1624), and the ICMP "net unreachable" answered for a destination in no lease.

use std::net::Ipv4Addr;

/// The header fields the forwarder looks at, of a packet checked to be whole IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    pub header_len: usize,
    pub total_len: usize,
    pub ttl: u8,
    pub protocol: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

/// Why a packet is not IPv4 the forwarder can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than its header, or than its total length says.
    Truncated,
    /// Not IPv4 (IPv6, or garbage).
    NotIpv4,
}

/// Parses the IPv4 header of `packet`: version 4, a header length of at least 20 bytes within
/// the packet, a total length within it (bytes past the total length are padding).
pub fn parse(packet: &[u8]) -> Result<Ipv4Header, Malformed> {
    let first = *packet.first().ok_or(Malformed::Truncated)?;
    if first >> 4 != 4 {
        return Err(Malformed::NotIpv4);
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 {
        return Err(Malformed::NotIpv4);
    }
    if packet.len() < header_len {
        return Err(Malformed::Truncated);
    }
    let total_len = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if total_len < header_len || total_len > packet.len() {
        return Err(Malformed::Truncated);
    }
    Ok(Ipv4Header {
        header_len,
        total_len,
        ttl: packet[8],
        protocol: packet[9],
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
    })
}

/// Decrements the TTL of a parsed packet and updates its header checksum (RFC 1624: the
/// checksum changes by the 16-bit word that holds TTL and protocol). False, and nothing
/// changed, when the TTL is 1 or 0: the packet must not go on.
pub fn decrement_ttl(packet: &mut [u8]) -> bool {
    if packet.len() < 20 || packet[8] <= 1 {
        return false;
    }
    let old = u16::from_be_bytes([packet[8], packet[9]]);
    packet[8] -= 1;
    let new = u16::from_be_bytes([packet[8], packet[9]]);
    let checksum = u16::from_be_bytes([packet[10], packet[11]]);
    // HC' = ~(~HC + ~m + m')
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    packet[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    true
}

/// The Internet checksum of `data` (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u64::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP "destination unreachable, net unreachable" (type 3, code 0) from `from` to the sender
/// of `original` (a parsed packet): its IP header and first 8 bytes of payload, as RFC 792
/// says. Written into `out` (at least 56 + 40 bytes); the length used. None for a packet that
/// gets no ICMP answer (an ICMP error itself, or a fragment past the first).
pub fn net_unreachable(original: &[u8], header: &Ipv4Header, from: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    let fragment_offset = u16::from_be_bytes([original[6], original[7]]) & 0x1fff;
    let icmp_error = header.protocol == 1 && original.get(header.header_len).is_some_and(|t| ![0, 8].contains(t));
    if fragment_offset != 0 || icmp_error {
        return None;
    }
    let quoted = (header.header_len + 8).min(header.total_len);
    let len = 20 + 8 + quoted;
    let out = out.get_mut(..len)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    out[8] = 64;
    out[9] = 1;
    out[12..16].copy_from_slice(&from.octets());
    out[16..20].copy_from_slice(&header.src.octets());
    let ip_checksum = checksum(&out[..20]);
    out[10..12].copy_from_slice(&ip_checksum.to_be_bytes());
    out[20] = 3;
    out[21] = 0;
    out[28..].copy_from_slice(&original[..quoted]);
    let icmp_checksum = checksum(&out[20..]);
    out[22..24].copy_from_slice(&icmp_checksum.to_be_bytes());
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A UDP packet 198.19.1.5 -> 198.19.2.7 with a valid header checksum.
    fn udp_packet(ttl: u8, payload: &[u8]) -> Vec<u8> {
        let len = 28 + payload.len();
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, 17, 0, 0, 198, 19, 1, 5, 198, 19, 2, 7];
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn parses_whole_ipv4_and_names_what_is_not() {
        let p = udp_packet(64, b"hello");
        let h = parse(&p).unwrap();
        assert_eq!((h.header_len, h.total_len, h.ttl, h.protocol), (20, 33, 64, 17));
        assert_eq!((h.src, h.dst), ("198.19.1.5".parse().unwrap(), "198.19.2.7".parse().unwrap()));
        // Padding past the total length is fine; a packet shorter than it is not.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 7]);
        assert_eq!(parse(&padded).unwrap().total_len, 33);
        assert_eq!(parse(&p[..32]), Err(Malformed::Truncated));
        assert_eq!(parse(&p[..19]), Err(Malformed::Truncated));
        assert_eq!(parse(&[]), Err(Malformed::Truncated));
        let mut v6 = p.clone();
        v6[0] = 0x60;
        assert_eq!(parse(&v6), Err(Malformed::NotIpv4));
        let mut short_header = p.clone();
        short_header[0] = 0x44;
        assert_eq!(parse(&short_header), Err(Malformed::NotIpv4));
        let mut long_header = p;
        long_header[0] = 0x4f;
        assert_eq!(parse(&long_header[..33]), Err(Malformed::Truncated));
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_right() {
        for ttl in [2u8, 64, 255] {
            let mut p = udp_packet(ttl, b"x");
            assert!(decrement_ttl(&mut p));
            assert_eq!(p[8], ttl - 1);
            assert_eq!(checksum(&p[..20]), 0, "a header with its checksum sums to zero (ttl {ttl})");
        }
        for ttl in [0u8, 1] {
            let mut p = udp_packet(ttl, b"x");
            let before = p.clone();
            assert!(!decrement_ttl(&mut p));
            assert_eq!(p, before);
        }
    }

    #[test]
    fn net_unreachable_quotes_the_header_and_eight_bytes() {
        let p = udp_packet(64, b"0123456789");
        let h = parse(&p).unwrap();
        let mut out = [0u8; 128];
        let len = net_unreachable(&p, &h, "198.19.1.0".parse().unwrap(), &mut out).unwrap();
        let icmp = &out[..len];
        assert_eq!(len, 20 + 8 + 28);
        let ih = parse(icmp).unwrap();
        assert_eq!((ih.protocol, ih.src, ih.dst), (1, "198.19.1.0".parse().unwrap(), h.src));
        assert_eq!(checksum(&icmp[..20]), 0);
        assert_eq!(checksum(&icmp[20..]), 0);
        assert_eq!((icmp[20], icmp[21]), (3, 0));
        assert_eq!(&icmp[28..], &p[..28]);
        // No answer to an ICMP error, nor to a later fragment; an echo request gets one.
        let mut error = p.clone();
        error[9] = 1;
        error[20] = 3;
        assert!(net_unreachable(&error, &parse(&error).unwrap(), h.src, &mut out).is_none());
        error[20] = 8;
        assert!(net_unreachable(&error, &parse(&error).unwrap(), h.src, &mut out).is_some());
        let mut fragment = p;
        fragment[7] = 1;
        assert!(net_unreachable(&fragment, &parse(&fragment).unwrap(), h.src, &mut out).is_none());
    }
}
