//! IPv4 header parsing shared by the packet paths, and the protocol numbers and TCP flags they
//! look at.

use std::net::Ipv4Addr;

pub(super) const IPPROTO_ICMP: u8 = 1;
pub(super) const IPPROTO_TCP: u8 = 6;
pub(super) const IPPROTO_UDP: u8 = 17;
pub(super) const MAX_IPV4_LEN: usize = 65_535;

pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_PSH: u8 = 0x08;
pub(super) const TCP_ACK: u8 = 0x10;
pub(super) const TCP_CWR: u8 = 0x80;

/// Why a packet cannot be forwarded (mapped onto `DataplaneStats` drop counters by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PacketError {
    NotIpv4,
    Malformed,
    TtlExpired,
}

/// Header length and total length of an IPv4 packet, validated against the buffer.
pub(super) fn ipv4_lengths(pkt: &[u8]) -> Result<(usize, usize), PacketError> {
    let first = *pkt.first().ok_or(PacketError::NotIpv4)?;
    if first >> 4 != 4 {
        return Err(PacketError::NotIpv4);
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl {
        return Err(PacketError::Malformed);
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total < ihl || total > pkt.len() {
        return Err(PacketError::Malformed);
    }
    Ok((ihl, total))
}

/// Validates an inner IPv4 packet received from the wire and returns it trimmed to its total
/// length (a datagram may carry padding after it) with its source address.
pub(crate) fn inner_packet(seg: &[u8]) -> Result<(&[u8], Ipv4Addr), PacketError> {
    let (_, total) = ipv4_lengths(seg)?;
    let src = Ipv4Addr::new(seg[12], seg[13], seg[14], seg[15]);
    Ok((&seg[..total], src))
}

/// Total length field of the IPv4 packet at the start of `data`, if it looks like one.
pub(crate) fn ipv4_total_len(data: &[u8]) -> Option<usize> {
    (data.len() >= 20 && data[0] >> 4 == 4)
        .then(|| usize::from(u16::from_be_bytes([data[2], data[3]])))
}

/// Destination address of an IPv4 packet (caller checked it has at least a minimal header).
pub(crate) fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    let d = pkt.get(16..20)?;
    Some(Ipv4Addr::new(d[0], d[1], d[2], d[3]))
}
