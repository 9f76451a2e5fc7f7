//! Software TSO: TCP super-packets cut into MTU-sized inner packets with complete checksums, on
//! the way from the TUN to the wire and, for a TUN without virtio headers, from the wire.

use super::checksum::{
    complete_partial_checksum, csum_add, csum_fold, fix_ipv4_checksum, pseudo_header_sum,
};
use super::ipv4::{ipv4_lengths, PacketError, IPPROTO_TCP, TCP_CWR, TCP_FIN, TCP_PSH};
use super::virtio_hdr::{
    VirtioNetHdr, VNET_F_NEEDS_CSUM, VNET_GSO_ECN, VNET_GSO_NONE, VNET_GSO_TCPV4,
};

/// A TCP/IPv4 packet from the wire that is longer than the device MTU: a TSO super-packet that
/// an eBPF node on this machine encapsulated whole. Prepared in `out` for the TUN: with virtio
/// headers as one GSO write (returns its header; the checksum field is reset to the pseudo-header
/// sum, as for any checksum-offloaded packet), without them cut into MTU-sized segments with
/// complete checksums (lengths in `lens`, returns None). `mss_hint` is the sender's segment size
/// when known.
pub(crate) fn oversized_tcp_for_tun(
    pkt: &[u8],
    mtu: usize,
    mss_hint: Option<usize>,
    vnet: bool,
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<Option<VirtioNetHdr>, PacketError> {
    let (ihl, total) = ipv4_lengths(pkt)?;
    let pkt = &pkt[..total];
    if pkt[9] != IPPROTO_TCP || total < ihl + 20 {
        return Err(PacketError::Malformed);
    }
    let hl = ihl + usize::from(pkt[ihl + 12] >> 4) * 4;
    if hl < ihl + 20 || hl >= total || hl >= mtu {
        return Err(PacketError::Malformed);
    }
    let mss = mss_hint
        .filter(|&m| m > 0)
        .map_or(mtu - hl, |m| m.min(mtu - hl));
    out.clear();
    lens.clear();
    if !vnet {
        segment_tcp4(pkt, ihl, mss, out, lens)?;
        return Ok(None);
    }
    out.extend_from_slice(pkt);
    let pseudo = csum_fold(pseudo_header_sum(
        &pkt[12..16],
        &pkt[16..20],
        IPPROTO_TCP,
        total - ihl,
    ));
    out[ihl + 16..ihl + 18].copy_from_slice(&pseudo.to_be_bytes());
    Ok(Some(VirtioNetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: VNET_GSO_TCPV4,
        hdr_len: hl as u16,
        gso_size: mss as u16,
        csum_start: ihl as u16,
        csum_offset: 16,
    }))
}

/// Turns one packet read from the TUN into the inner packets that go on the wire: a TCP
/// super-packet (virtio GSO) becomes one packet per `gso_size` of payload, anything else stays
/// one packet. TTL is decremented (the tunnel is one hop, as in upstream's proxy) and every
/// checksum is complete. Packets are appended to `out`, their lengths to `lens`; on error nothing
/// is appended.
pub(crate) fn tun_packet_to_wire(
    vnet: Option<&VirtioNetHdr>,
    pkt: &mut [u8],
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<(), PacketError> {
    let (ihl, total) = ipv4_lengths(pkt)?;
    let pkt = &mut pkt[..total];
    if pkt[8] <= 1 {
        return Err(PacketError::TtlExpired);
    }
    pkt[8] -= 1;
    let vnet = vnet.copied().unwrap_or_default();
    match vnet.gso_type & !VNET_GSO_ECN {
        VNET_GSO_NONE => {
            if vnet.flags & VNET_F_NEEDS_CSUM != 0 {
                complete_partial_checksum(pkt, ihl, &vnet)?;
            }
            fix_ipv4_checksum(pkt, ihl);
            out.extend_from_slice(pkt);
            lens.push(total);
            Ok(())
        }
        VNET_GSO_TCPV4 => segment_tcp4(pkt, ihl, usize::from(vnet.gso_size), out, lens),
        _ => Err(PacketError::Malformed),
    }
}

/// Software TSO: splits a TCP/IPv4 super-packet into segments of at most `mss` payload bytes,
/// the way the kernel's tcp_gso_segment does (sequence numbers advance, IP IDs increment, FIN
/// and PSH only on the last segment, CWR only on the first).
fn segment_tcp4(
    pkt: &[u8],
    ihl: usize,
    mss: usize,
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<(), PacketError> {
    if pkt[9] != IPPROTO_TCP || mss == 0 || pkt.len() < ihl + 20 {
        return Err(PacketError::Malformed);
    }
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    let hl = ihl + thl;
    if thl < 20 || hl > pkt.len() {
        return Err(PacketError::Malformed);
    }
    let payload = &pkt[hl..];
    let seq0 = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let flags0 = pkt[ihl + 13];
    let nsegs = payload.len().div_ceil(mss).max(1);
    let src_dst_sum = csum_add(0, &pkt[12..20]);
    out.reserve(payload.len() + nsegs * hl);
    for i in 0..nsegs {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        let start = out.len();
        out.extend_from_slice(&pkt[..hl]);
        out.extend_from_slice(chunk);
        let seg = &mut out[start..];
        let seg_len = hl + chunk.len();
        seg[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
        seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        fix_ipv4_checksum(seg, ihl);
        let tcp = &mut seg[ihl..];
        let seq = seq0.wrapping_add((i * mss) as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < nsegs {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        tcp[13] = flags;
        tcp[16] = 0;
        tcp[17] = 0;
        let sum = src_dst_sum + u64::from(IPPROTO_TCP) + (thl + chunk.len()) as u64;
        let sum = csum_add(csum_add(sum, &tcp[..thl]), chunk);
        tcp[16..18].copy_from_slice(&(!csum_fold(sum)).to_be_bytes());
        lens.push(seg_len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::udp::tun::ipv4::{IPPROTO_UDP, TCP_ACK};
    use crate::backend::udp::tun::test_packets::{
        assert_valid_tcp4, make_partial, pattern, split, tcp_packet, tso_hdr,
    };

    #[test]
    fn super_packet_is_split_into_valid_mss_sized_segments() {
        let payload = pattern(5000);
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        let mut sp = tcp_packet(
            1000,
            TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR,
            &opts,
            &payload,
            false,
        );
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&tso_hdr(1420, 52)), &mut sp, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![52 + 1420, 52 + 1420, 52 + 1420, 52 + 740]);
        let segs = split(&out, &lens);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_valid_tcp4(s);
            assert_eq!(s[8], 63, "TTL decremented");
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16, "IP ID");
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + 1420 * i as u32);
            let flags = s[33];
            let last = i == segs.len() - 1;
            assert_eq!(
                flags & (TCP_FIN | TCP_PSH) != 0,
                last,
                "FIN/PSH only on last"
            );
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on first");
            assert_eq!(&s[40..52], &opts);
            joined.extend_from_slice(&s[52..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn partial_checksum_of_plain_packet_is_completed() {
        let mut p = tcp_packet(5, TCP_ACK, &[], &pattern(101), false);
        let hdr = VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&hdr), &mut p, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![141]);
        assert_valid_tcp4(&out);
        assert_eq!(out[8], 63);
    }

    #[test]
    fn plain_packet_keeps_payload_and_gets_new_ttl_and_checksum() {
        let mut p = tcp_packet(5, TCP_ACK, &[], b"hello", true);
        p.extend_from_slice(&[0xee; 3]); // trailing garbage beyond total length is not sent
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(None, &mut p, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![45]);
        assert_valid_tcp4(&out);
        assert_eq!(&out[40..], b"hello");
    }

    #[test]
    fn bad_packets_are_refused_without_output() {
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        let mut v6 = vec![0x60; 40];
        assert_eq!(
            tun_packet_to_wire(None, &mut v6, &mut out, &mut lens),
            Err(PacketError::NotIpv4)
        );
        let mut ttl1 = tcp_packet(1, TCP_ACK, &[], b"x", true);
        ttl1[8] = 1;
        assert_eq!(
            tun_packet_to_wire(None, &mut ttl1, &mut out, &mut lens),
            Err(PacketError::TtlExpired)
        );
        let mut short = tcp_packet(1, TCP_ACK, &[], b"x", true);
        short[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(
            tun_packet_to_wire(None, &mut short, &mut out, &mut lens),
            Err(PacketError::Malformed)
        );
        let mut no_mss = tcp_packet(1, TCP_ACK, &[], &pattern(3000), false);
        assert_eq!(
            tun_packet_to_wire(Some(&tso_hdr(0, 40)), &mut no_mss, &mut out, &mut lens),
            Err(PacketError::Malformed)
        );
        assert_eq!(
            tun_packet_to_wire(None, &mut [], &mut out, &mut lens),
            Err(PacketError::NotIpv4)
        );
        assert!(out.is_empty() && lens.is_empty());
    }

    #[test]
    fn oversized_tcp_from_the_wire_becomes_one_gso_write_or_mtu_sized_segments() {
        let payload = pattern(20_000);
        let sp = make_partial(tcp_packet(5, TCP_ACK | TCP_PSH, &[], &payload, true));
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        let hdr = oversized_tcp_for_tun(&sp, 1472, Some(1400), true, &mut out, &mut lens).unwrap();
        assert_eq!(hdr, Some(tso_hdr(1400, 40)));
        assert_eq!(out, sp);

        let hdr = oversized_tcp_for_tun(&sp, 1472, None, false, &mut out, &mut lens).unwrap();
        assert_eq!(hdr, None);
        assert_eq!(lens.len(), 20_000usize.div_ceil(1432));
        let mut joined = Vec::new();
        for s in split(&out, &lens) {
            assert!(s.len() <= 1472);
            assert_valid_tcp4(s);
            joined.extend_from_slice(&s[40..]);
        }
        assert_eq!(joined, payload);

        let mut udp = sp.clone();
        udp[9] = IPPROTO_UDP;
        assert_eq!(
            oversized_tcp_for_tun(&udp, 1472, None, true, &mut out, &mut lens),
            Err(PacketError::Malformed)
        );
    }
}
