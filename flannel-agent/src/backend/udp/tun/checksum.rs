//! Internet checksums (RFC 1071), and packets whose L4 checksum is still to be computed
//! (CHECKSUM_PARTIAL: the field holds only the pseudo-header sum).

use super::ipv4::{PacketError, IPPROTO_TCP, IPPROTO_UDP};
use super::virtio_hdr::VirtioNetHdr;

/// Adds `data`, as big-endian 16-bit words, to a running ones'-complement sum. `data` must start
/// at an even offset of the summed region; an odd trailing byte is padded with zero.
pub(crate) fn csum_add(mut acc: u64, data: &[u8]) -> u64 {
    // 32-bit words into a 64-bit accumulator: carries are kept and folded at the end, which is
    // equivalent to the 16-bit ones'-complement sum and several times faster.
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let mut words = chunks.remainder().chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum to 16 bits (not inverted).
pub(crate) fn csum_fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the IPv4 pseudo-header of a TCP/UDP segment of `l4_len` bytes.
pub(super) fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u64 {
    csum_add(csum_add(0, src), dst) + u64::from(proto) + l4_len as u64
}

/// Recomputes the IPv4 header checksum in place.
pub(super) fn fix_ipv4_checksum(ip: &mut [u8], ihl: usize) {
    ip[10] = 0;
    ip[11] = 0;
    let c = !csum_fold(csum_add(0, &ip[..ihl]));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// True when the 16-bit ones'-complement sum over `data` (checksum field included) checks out.
#[cfg(test)]
pub(super) fn csum_ok(acc: u64) -> bool {
    csum_fold(acc) == 0xffff
}

/// Finishes a CHECKSUM_PARTIAL packet: the field at csum_start + csum_offset holds the
/// pseudo-header sum, the rest of the L4 data still has to be added.
pub(super) fn complete_partial_checksum(
    pkt: &mut [u8],
    ihl: usize,
    vnet: &VirtioNetHdr,
) -> Result<(), PacketError> {
    let start = usize::from(vnet.csum_start);
    let field = start + usize::from(vnet.csum_offset);
    if start < ihl || field + 2 > pkt.len() {
        return Err(PacketError::Malformed);
    }
    let mut c = !csum_fold(csum_add(0, &pkt[start..]));
    if c == 0 {
        // 0 means "no checksum" for UDP; 0xffff is the same value in ones' complement.
        c = 0xffff;
    }
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Offset of the TCP/UDP checksum field of an unfragmented IPv4 packet (no IP options) whose
/// field holds only the pseudo-header sum: the packet left a kernel on this machine as
/// CHECKSUM_PARTIAL (the checksum left to "hardware"), and a veth and the UDP socket that split
/// a tunnel GSO train hand it over like that. Our eBPF nodes send such packets when the underlay
/// is a veth. Whoever finally delivers it must complete the checksum.
pub(super) fn partial_checksum_field(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < 28 || pkt[0] != 0x45 || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
        return None;
    }
    let field = match pkt[9] {
        IPPROTO_TCP if pkt.len() >= 40 => 20 + 16,
        IPPROTO_UDP => 20 + 6,
        _ => return None,
    };
    let pseudo = csum_fold(pseudo_header_sum(
        &pkt[12..16],
        &pkt[16..20],
        pkt[9],
        pkt.len() - 20,
    ));
    let have = u16::from_be_bytes([pkt[field], pkt[field + 1]]);
    // 0 and 0xffff are the same number in ones' complement; a UDP 0 means "no checksum".
    let same = have == pseudo || (have == 0 && pseudo == 0xffff && pkt[9] == IPPROTO_TCP);
    same.then_some(field)
}

/// For a TUN without virtio headers: the packet with its checksum completed in software when it
/// arrived checksum-partial (copied into `scratch`), else the packet itself.
pub(crate) fn with_complete_checksum<'a>(pkt: &'a [u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let Some(field) = partial_checksum_field(pkt) else {
        return pkt;
    };
    scratch.clear();
    scratch.extend_from_slice(pkt);
    let mut c = !csum_fold(csum_add(0, &scratch[20..]));
    if c == 0 && scratch[9] == IPPROTO_UDP {
        c = 0xffff;
    }
    scratch[field..field + 2].copy_from_slice(&c.to_be_bytes());
    scratch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::udp::tun::ipv4::TCP_ACK;
    use crate::backend::udp::tun::test_packets::{make_partial, pattern, tcp_packet};

    #[test]
    fn ipv4_header_checksum_matches_known_value() {
        // Classic example header, checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        fix_ipv4_checksum(&mut h, 20);
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
    }

    #[test]
    fn checksum_of_odd_and_unaligned_lengths_matches_naive_sum() {
        let data = pattern(1001);
        for len in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1000, 1001] {
            let naive: u64 = data[..len]
                .chunks(2)
                .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
                .sum();
            assert_eq!(
                csum_fold(csum_add(0, &data[..len])),
                csum_fold(naive),
                "len {len}"
            );
        }
    }

    #[test]
    fn checksum_partial_packets_are_completed_for_a_tun_without_virtio_headers() {
        let complete = tcp_packet(1, TCP_ACK, &[], &pattern(333), true);
        let partial = make_partial(complete.clone());
        assert_ne!(partial, complete);
        let mut scratch = Vec::new();
        assert_eq!(
            with_complete_checksum(&partial, &mut scratch),
            &complete[..]
        );
        assert_eq!(
            with_complete_checksum(&complete, &mut scratch),
            &complete[..]
        );
    }
}
