//! The VXLAN form decap hands the overlay device's kernel VXLAN receive: the outer IPv4 and
//! UDP headers as they came (lengths grown, UDP checksum 0), then a VXLAN header and an
//! Ethernet header addressed to the overlay device, then the inner packet untouched. The
//! kernel's UDP tunnel receive resets the tunnel offload state of a super-packet
//! (skb->encapsulation, SKB_GSO_UDP_TUNNEL), which `bpf_skb_adjust_room` leaves behind on
//! this kernel, and its GRO cells merge MTU-sized arrivals into super-packets. XDP decap does
//! not use it: stripping before GRO, which then merges the inner stream directly, measured
//! faster than this form and the kernel's VXLAN GRO (nic underlay, 1 and 4 streams).

use crate::hdr::{be16, eth, fold, ipv4, put16, udp, vxlan};

/// Outer IPv4 without options and UDP: the only outer headers rewritten (others are
/// decapsulated by the program itself).
pub const OUTER_LEN: usize = ipv4::MIN_LEN + udp::LEN;
/// Bytes the VXLAN form adds behind the outer UDP header: VXLAN and the inner Ethernet header.
pub const GROW: usize = vxlan::LEN + eth::LEN;
/// Outer IPv4, UDP, VXLAN and inner Ethernet: what the rewrite writes.
pub const HDRS_LEN: usize = OUTER_LEN + GROW;
/// The overlay device's VNI (the agent's `device::KERNEL_RX_VNI`).
const VNI: u8 = 1;
/// Source MAC of the inner frames: any valid unicast address other than the device's own
/// (the kernel drops frames that look like its own echo, and frames from a zero MAC).
const SRC_MAC: [u8; 6] = [0x02, 0x66, 0x6c, 0x00, 0x00, 0x01];

/// The VXLAN form's headers for a packet whose outer IPv4 (no options) and UDP headers are
/// `outer`, to the overlay device `overlay_mac`.
#[inline(always)]
pub fn headers(outer: &[u8; OUTER_LEN], overlay_mac: &[u8; 6]) -> [u8; HDRS_LEN] {
    let mut h = [0u8; HDRS_LEN];
    h[..OUTER_LEN].copy_from_slice(outer);
    // Lengths grow by the added bytes; the header checksum follows (RFC 1624).
    let total = be16(&h, ipv4::TOT_LEN);
    let new_total = total.wrapping_add(GROW as u16);
    put16(&mut h, ipv4::TOT_LEN, new_total);
    let old_csum = be16(&h, ipv4::CSUM);
    let csum = !fold(u32::from(!old_csum) + u32::from(!total) + u32::from(new_total));
    put16(&mut h, ipv4::CSUM, csum);
    let u = ipv4::MIN_LEN;
    let udp_len = be16(&h, u + udp::LENGTH);
    put16(&mut h, u + udp::LENGTH, udp_len.wrapping_add(GROW as u16));
    // No outer UDP checksum, as on the wire from our senders (zero is valid for IPv4).
    put16(&mut h, u + udp::CSUM, 0);
    let v = u + udp::LEN;
    h[v] = vxlan::FLAGS_VNI;
    h[v + vxlan::VNI + 2] = VNI;
    let e = v + vxlan::LEN;
    h[e..e + 6].copy_from_slice(overlay_mac);
    h[e + 6..e + 12].copy_from_slice(&SRC_MAC);
    put16(&mut h, e + eth::PROTO, eth::P_IP);
    h
}
