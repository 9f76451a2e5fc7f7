//! Packets and checks shared by the unit tests of the TUN packet modules.

use super::checksum::{csum_add, csum_fold, csum_ok, fix_ipv4_checksum, pseudo_header_sum};
use super::ipv4::IPPROTO_TCP;
use super::virtio_hdr::{VirtioNetHdr, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4};

pub(super) const SRC: [u8; 4] = [10, 244, 1, 2];
pub(super) const DST: [u8; 4] = [10, 244, 2, 2];

/// A TCP/IPv4 packet; `csum` fills both checksums completely (else the TCP field gets the
/// pseudo-header sum, as in a CHECKSUM_PARTIAL super-packet from the TUN).
pub(super) fn tcp_packet(
    seq: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
    csum: bool,
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let thl = 20 + options.len();
    let total = 20 + thl + payload.len();
    let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&SRC);
    p.extend_from_slice(&DST);
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&5201u16.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&777u32.to_be_bytes());
    p.push(((thl / 4) as u8) << 4);
    p.push(flags);
    p.extend_from_slice(&[0x01, 0xf5, 0, 0, 0, 0]);
    p.extend_from_slice(options);
    p.extend_from_slice(payload);
    fix_ipv4_checksum(&mut p, 20);
    let pseudo = pseudo_header_sum(&SRC, &DST, IPPROTO_TCP, thl + payload.len());
    let c = if csum {
        !csum_fold(csum_add(pseudo, &p[20..]))
    } else {
        csum_fold(pseudo)
    };
    p[36..38].copy_from_slice(&c.to_be_bytes());
    p
}

pub(super) fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

pub(super) fn assert_valid_tcp4(p: &[u8]) {
    assert!(csum_ok(csum_add(0, &p[..20])), "IP checksum");
    let sum = pseudo_header_sum(&p[12..16], &p[16..20], IPPROTO_TCP, p.len() - 20);
    assert!(csum_ok(csum_add(sum, &p[20..])), "TCP checksum");
    assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
}

pub(super) fn split<'a>(out: &'a [u8], lens: &[usize]) -> Vec<&'a [u8]> {
    let mut at = 0;
    lens.iter()
        .map(|l| {
            at += l;
            &out[at - l..at]
        })
        .collect()
}

pub(super) fn tso_hdr(mss: u16, hl: u16) -> VirtioNetHdr {
    VirtioNetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: VNET_GSO_TCPV4,
        hdr_len: hl,
        gso_size: mss,
        csum_start: 20,
        csum_offset: 16,
    }
}

/// The packet as a sending kernel leaves it for checksum offload.
pub(super) fn make_partial(mut p: Vec<u8>) -> Vec<u8> {
    let field = if p[9] == IPPROTO_TCP { 36 } else { 26 };
    let pseudo = csum_fold(pseudo_header_sum(
        &p[12..16],
        &p[16..20],
        p[9],
        p.len() - 20,
    ));
    p[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
    p
}
