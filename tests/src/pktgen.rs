//! Packets for the BPF tests, built byte by byte as they appear on the wire: Ethernet, ARP,
//! IPv4 (options, fragments), IPv6, UDP, TCP, ICMP and flannel's udp encapsulation, with the
//! checksums that go with them (and the "left to the device" seeds a sender's kernel writes).

use std::net::{Ipv4Addr, Ipv6Addr};

pub use crate::bpf::checksum;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
/// IPv4 flags/fragment offset word: don't fragment, more fragments.
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;

/// Destination MAC of [`ether`] frames (the tests give their receiving device this address).
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Source MAC of [`ether`] frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Offsets inside an IPv4 header.
pub mod ipv4_off {
    pub const TOT_LEN: usize = 2;
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CSUM: usize = 10;
}

/// An Ethernet frame from [`SRC_MAC`] to [`DST_MAC`].
pub fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    ether_between(DST_MAC, SRC_MAC, ethertype, payload)
}

/// An Ethernet frame from `src` to `dst`.
pub fn ether_between(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A VXLAN header (RFC 7348: I flag, 24-bit `vni`, reserved bytes zero) and `frame`, the
/// Ethernet frame it carries: the payload of a UDP datagram to a VXLAN port.
pub fn vxlan(vni: u32, frame: &[u8]) -> Vec<u8> {
    assert!(vni < 1 << 24, "VNI has 24 bits");
    let mut v = vec![0x08, 0, 0, 0];
    v.extend_from_slice(&(vni << 8).to_be_bytes());
    v.extend_from_slice(frame);
    v
}

/// An ARP request (Ethernet/IPv4) from `sender` asking for `target`.
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4, 0, 1];
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    a
}

/// An IPv4 packet with a valid header checksum, ID 0x1234, no flags; `options` must be a
/// multiple of 4 bytes.
pub fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    proto: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let hlen = IPV4_HLEN + options.len();
    let total = hlen + payload.len();
    let mut p = vec![0u8; hlen];
    p[0] = 0x40 | (hlen / 4) as u8;
    p[ipv4_off::TOT_LEN..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[ipv4_off::TTL] = ttl;
    p[ipv4_off::PROTO] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[IPV4_HLEN..hlen].copy_from_slice(options);
    refresh_ipv4_checksum(&mut p);
    p.extend_from_slice(payload);
    p
}

/// The header length of the IPv4 packet `p`, in bytes.
pub fn ipv4_hlen(p: &[u8]) -> usize {
    usize::from(p[0] & 0x0f) * 4
}

/// Recomputes the header checksum of the IPv4 packet `p` (after an edit).
pub fn refresh_ipv4_checksum(p: &mut [u8]) {
    let hlen = ipv4_hlen(p);
    p[ipv4_off::CSUM..ipv4_off::CSUM + 2].copy_from_slice(&[0, 0]);
    let c = checksum(&p[..hlen]);
    p[ipv4_off::CSUM..ipv4_off::CSUM + 2].copy_from_slice(&c.to_be_bytes());
}

/// Sets the flags/fragment-offset word (`IP_DF`, `IP_MF`, offset in 8-byte units) and fixes
/// the header checksum.
pub fn set_frag(packet: &mut [u8], frag: u16) {
    packet[ipv4_off::FRAG..ipv4_off::FRAG + 2].copy_from_slice(&frag.to_be_bytes());
    refresh_ipv4_checksum(packet);
}

/// An IPv6 packet (no extension headers).
pub fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    hop_limit: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, hop_limit]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A UDP header and payload, checksum 0 (none).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(UDP_HLEN + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((UDP_HLEN + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A TCP segment (no options, PSH ACK, ports 40000 -> 80) with its checksum field zero.
pub fn tcp(payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[4..8].copy_from_slice(&7u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x18; // PSH ACK
    t[14..16].copy_from_slice(&512u16.to_be_bytes());
    t.extend_from_slice(payload);
    t
}

/// An ICMP echo request with a valid checksum.
pub fn icmp_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// The unfolded bytes of a TCP/UDP pseudo-header (RFC 793/768).
fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(&[0, proto]);
    b.extend_from_slice(&(l4_len as u16).to_be_bytes());
    b
}

/// The folded TCP/UDP pseudo-header sum: what a sender's kernel leaves in the checksum field
/// when the device is to finish it (CHECKSUM_PARTIAL).
pub fn pseudo_seed(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u16 {
    !checksum(&pseudo_header(src, dst, proto, l4_len))
}

/// The complete TCP/UDP checksum of segment `l4` (its checksum field zero).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> u16 {
    let mut b = pseudo_header(src, dst, proto, l4.len());
    b.extend_from_slice(l4);
    checksum(&b)
}

/// Whether the TCP/UDP checksum of the IPv4 packet `p` (no options) checks out.
pub fn l4_checksum_ok(p: &[u8]) -> bool {
    let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    l4_checksum(src, dst, p[ipv4_off::PROTO], &p[IPV4_HLEN..]) == 0
}

/// A TCP/IPv4 packet (no options) whose checksum field is `field`, or complete when None.
pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8], field: Option<u16>) -> Vec<u8> {
    let t = tcp(payload);
    let c = field.unwrap_or_else(|| l4_checksum(src, dst, PROTO_TCP, &t));
    let mut p = ipv4(src, dst, 64, PROTO_TCP, &[], &t);
    p[IPV4_HLEN + 16..IPV4_HLEN + 18].copy_from_slice(&c.to_be_bytes());
    p
}

/// A small inner packet: UDP from `src` to `dst` with a recognisable payload.
pub fn inner(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ipv4(
        src,
        dst,
        64,
        PROTO_UDP,
        &[],
        &udp(40000, 7777, b"flannel-rs inner payload"),
    )
}

/// flannel's encapsulation as a peer at `from` sends it to `to`: Ethernet + outer IPv4 (DF, no
/// options) + UDP (`port` both ways, checksum 0) + `inner`.
pub fn tunnelled(from: Ipv4Addr, to: Ipv4Addr, port: u16, inner: &[u8]) -> Vec<u8> {
    tunnelled_with_options(from, to, port, &[], inner)
}

/// [`tunnelled`] with `options` (a multiple of 4 bytes) in the outer IPv4 header.
pub fn tunnelled_with_options(
    from: Ipv4Addr,
    to: Ipv4Addr,
    port: u16,
    options: &[u8],
    inner: &[u8],
) -> Vec<u8> {
    let mut outer = ipv4(from, to, 64, PROTO_UDP, options, &udp(port, port, inner));
    set_frag(&mut outer, IP_DF);
    ether(ETH_P_IP, &outer)
}

/// `frame` (as [`tunnelled`] builds it: no outer options) with its outer UDP checksum left to
/// the device: the field holds the pseudo-header sum, as a sender's kernel writes it over a
/// veth (CHECKSUM_PARTIAL).
pub fn udp_checksum_left_to_device(mut frame: Vec<u8>) -> Vec<u8> {
    const UDP_AT: usize = ETH_HLEN + IPV4_HLEN;
    let ip = &frame[ETH_HLEN..UDP_AT];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let seed = pseudo_seed(src, dst, PROTO_UDP, frame.len() - UDP_AT);
    frame[UDP_AT + 6..UDP_AT + 8].copy_from_slice(&seed.to_be_bytes());
    frame
}
