//! Software GRO for the TUN write side: consecutive segments of one TCP flow from the wire merged
//! back into super-packets.

use super::checksum::{
    csum_add, csum_fold, fix_ipv4_checksum, partial_checksum_field, pseudo_header_sum,
};
use super::ipv4::{IPPROTO_TCP, MAX_IPV4_LEN, TCP_ACK, TCP_PSH};
use super::virtio_hdr::{VirtioNetHdr, VNET_F_DATA_VALID, VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4};

/// What makes a received packet a candidate for merging.
struct TcpSegInfo {
    hl: usize,
    seq: u32,
    payload: usize,
    psh: bool,
    /// The checksum is still to be computed (see `partial_checksum_field`).
    partial: bool,
}

/// The virtio header under which a packet from the wire goes to the TUN when it is not merged:
/// checksum-partial packets are passed on as such (the kernel completes or trusts them exactly
/// as it would have on the sending host), everything else as received.
fn passthrough_hdr(pkt: &[u8]) -> VirtioNetHdr {
    match partial_checksum_field(pkt) {
        Some(field) => VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: (field - 20) as u16,
            ..Default::default()
        },
        None => VirtioNetHdr::default(),
    }
}

/// A plain TCP/IPv4 data segment (no IP options, not a fragment, only ACK/PSH set) whose
/// checksum verifies or is still to be computed (checksum-partial). The checksum is checked
/// because merged packets are handed to the kernel as verified, and the outer UDP checksum may
/// be zero (our eBPF nodes send none).
fn tcp_seg_info(pkt: &[u8]) -> Option<TcpSegInfo> {
    if pkt.len() < 40 || pkt[0] != 0x45 || pkt[9] != IPPROTO_TCP {
        return None;
    }
    if usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len() {
        return None;
    }
    if u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
        return None;
    }
    let thl = usize::from(pkt[32] >> 4) * 4;
    let hl = 20 + thl;
    let flags = pkt[33];
    if thl < 20 || hl >= pkt.len() || flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    let sum = pseudo_header_sum(&pkt[12..16], &pkt[16..20], IPPROTO_TCP, pkt.len() - 20);
    let partial = if csum_fold(csum_add(sum, &pkt[20..])) == 0xffff {
        false
    } else if partial_checksum_field(pkt).is_some() {
        true
    } else {
        return None;
    };
    Some(TcpSegInfo {
        hl,
        seq: u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]),
        payload: pkt.len() - hl,
        psh: flags & TCP_PSH != 0,
        partial,
    })
}

/// Software GRO for the TUN write side: consecutive in-order segments of one TCP flow become
/// one super-packet with a virtio GSO header, so the kernel gets one write instead of dozens.
/// Everything else is passed through unchanged and in order.
pub(crate) struct TcpCoalescer {
    pkt: Vec<u8>,
    active: bool,
    hl: usize,
    gso_size: usize,
    segs: usize,
    next_seq: u32,
    /// No more segments may follow (a short or PSH segment ended the run).
    closed: bool,
    /// The pending packet (when alone) still needs its checksum.
    partial: bool,
}

impl Default for TcpCoalescer {
    fn default() -> Self {
        Self {
            pkt: Vec::with_capacity(MAX_IPV4_LEN),
            active: false,
            hl: 0,
            gso_size: 0,
            segs: 0,
            next_seq: 0,
            closed: false,
            partial: false,
        }
    }
}

impl TcpCoalescer {
    /// Offers one validated inner IPv4 packet; `emit` receives what to write to the TUN.
    pub fn push(&mut self, pkt: &[u8], emit: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        let Some(info) = tcp_seg_info(pkt) else {
            self.flush(emit);
            emit(&passthrough_hdr(pkt), pkt);
            return;
        };
        if self.active && self.can_append(pkt, &info) {
            self.pkt.extend_from_slice(&pkt[info.hl..]);
            self.segs += 1;
            self.next_seq = info.seq.wrapping_add(info.payload as u32);
            if info.psh {
                self.pkt[20 + 13] |= TCP_PSH;
            }
            self.closed = info.psh || info.payload < self.gso_size;
            return;
        }
        self.flush(emit);
        self.pkt.clear();
        self.pkt.extend_from_slice(pkt);
        self.active = true;
        self.hl = info.hl;
        self.gso_size = info.payload;
        self.segs = 1;
        self.next_seq = info.seq.wrapping_add(info.payload as u32);
        self.closed = info.psh;
        self.partial = info.partial;
    }

    fn can_append(&self, pkt: &[u8], info: &TcpSegInfo) -> bool {
        let cur = &self.pkt;
        let hl = self.hl;
        !self.closed
            && info.hl == hl
            && info.seq == self.next_seq
            && info.payload <= self.gso_size
            && cur.len() + info.payload <= MAX_IPV4_LEN
            // IP: version/ihl/tos, frag flags/ttl/proto, addresses (length, id, csum may differ)
            && pkt[0..2] == cur[0..2]
            && pkt[6..10] == cur[6..10]
            && pkt[12..20] == cur[12..20]
            // TCP: ports, ack/data offset, flags except PSH, window, urgent pointer and options
            && pkt[20..24] == cur[20..24]
            && pkt[28..33] == cur[28..33]
            && pkt[33] & !TCP_PSH == cur[33] & !TCP_PSH
            && pkt[34..36] == cur[34..36]
            && pkt[38..hl] == cur[38..hl]
    }

    /// Emits the pending merged packet, if any.
    pub fn flush(&mut self, emit: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        if !self.active {
            return;
        }
        self.active = false;
        if self.segs == 1 {
            // Unchanged; its checksum was verified above, or is still to be computed.
            let hdr = if self.partial {
                passthrough_hdr(&self.pkt)
            } else {
                VirtioNetHdr {
                    flags: VNET_F_DATA_VALID,
                    ..Default::default()
                }
            };
            emit(&hdr, &self.pkt);
            return;
        }
        let total = self.pkt.len();
        let p = &mut self.pkt;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        fix_ipv4_checksum(p, 20);
        // CHECKSUM_PARTIAL convention: the field holds the folded pseudo-header sum.
        let pseudo = csum_fold(pseudo_header_sum(
            &p[12..16],
            &p[16..20],
            IPPROTO_TCP,
            total - 20,
        ));
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4,
            hdr_len: self.hl as u16,
            gso_size: self.gso_size as u16,
            csum_start: 20,
            csum_offset: 16,
        };
        emit(&hdr, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::udp::tun::checksum::csum_ok;
    use crate::backend::udp::tun::ipv4::IPPROTO_UDP;
    use crate::backend::udp::tun::segment::tun_packet_to_wire;
    use crate::backend::udp::tun::test_packets::{
        assert_valid_tcp4, make_partial, pattern, split, tcp_packet, tso_hdr, DST, SRC,
    };
    use crate::backend::udp::tun::virtio_hdr::VNET_GSO_NONE;

    fn coalesce(pkts: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut c = TcpCoalescer::default();
        let mut got = Vec::new();
        let mut emit = |h: &VirtioNetHdr, p: &[u8]| got.push((*h, p.to_vec()));
        for p in pkts {
            c.push(p, &mut emit);
        }
        c.flush(&mut emit);
        got
    }

    #[test]
    fn segments_of_one_flow_merge_into_a_super_packet_that_resegments_identically() {
        let payload = pattern(10_000);
        let mut sp = tcp_packet(42, TCP_ACK | TCP_PSH, &[], &payload, false);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&tso_hdr(1432, 40)), &mut sp, &mut out, &mut lens).unwrap();
        let segs: Vec<Vec<u8>> = split(&out, &lens).iter().map(|s| s.to_vec()).collect();
        assert_eq!(segs.len(), 7);

        let got = coalesce(&segs);
        assert_eq!(got.len(), 1);
        let (hdr, merged) = &got[0];
        assert_eq!(*hdr, tso_hdr(1432, 40));
        assert_eq!(merged.len(), 40 + payload.len());
        assert_eq!(&merged[40..], &payload[..]);
        assert!(csum_ok(csum_add(0, &merged[..20])));
        assert_eq!(merged[33], TCP_ACK | TCP_PSH);
        let pseudo = csum_fold(pseudo_header_sum(
            &SRC,
            &DST,
            IPPROTO_TCP,
            merged.len() - 20,
        ));
        assert_eq!(u16::from_be_bytes([merged[36], merged[37]]), pseudo);

        // What the kernel will do with it: segment again; same segments (one more TTL hop).
        let mut again = merged.clone();
        let (mut out2, mut lens2) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(hdr), &mut again, &mut out2, &mut lens2).unwrap();
        assert_eq!(lens2, lens);
        for (a, b) in split(&out2, &lens2).iter().zip(&segs) {
            assert_valid_tcp4(a);
            assert_eq!(a[8] + 1, b[8]);
            assert_eq!(a[20..], b[20..]);
        }
    }

    #[test]
    fn single_verified_segment_passes_unchanged_and_marked_valid() {
        let p = tcp_packet(1, TCP_ACK, &[], b"abc", true);
        let got = coalesce(std::slice::from_ref(&p));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.flags, VNET_F_DATA_VALID);
        assert_eq!(got[0].0.gso_type, VNET_GSO_NONE);
        assert_eq!(got[0].1, p);
    }

    #[test]
    fn non_mergeable_packets_pass_through_in_order() {
        let a = tcp_packet(100, TCP_ACK, &[], &[1; 100], true);
        let gap = tcp_packet(300, TCP_ACK, &[], &[2; 100], true); // seq gap
        let mut bad = tcp_packet(400, TCP_ACK, &[], &[3; 100], true);
        bad[60] ^= 0xff; // corrupted payload: must not be marked valid
        let syn = tcp_packet(500, 0x02, &[], &[], true);
        let mut udp = tcp_packet(0, 0, &[], &[4; 8], true);
        udp[9] = 17;
        let got = coalesce(&[
            a.clone(),
            gap.clone(),
            bad.clone(),
            syn.clone(),
            udp.clone(),
        ]);
        let pkts: Vec<&Vec<u8>> = got.iter().map(|(_, p)| p).collect();
        assert_eq!(pkts, vec![&a, &gap, &bad, &syn, &udp]);
        assert_eq!(
            got[2].0,
            VirtioNetHdr::default(),
            "bad checksum left to the kernel"
        );
        assert_eq!(got[3].0, VirtioNetHdr::default());
    }

    #[test]
    fn short_or_psh_segment_ends_a_merge_and_other_flows_do_not_join() {
        let s1 = tcp_packet(0, TCP_ACK, &[], &[1; 100], true);
        let s2 = tcp_packet(100, TCP_ACK | TCP_PSH, &[], &[2; 100], true);
        let s3 = tcp_packet(200, TCP_ACK, &[], &[3; 100], true);
        let s4 = tcp_packet(300, TCP_ACK, &[], &[4; 50], true);
        let s5 = tcp_packet(350, TCP_ACK, &[], &[5; 50], true);
        let mut other = tcp_packet(400, TCP_ACK, &[], &[6; 50], true);
        other[22] = 0x99; // another source port
        fix_csums(&mut other);
        let got = coalesce(&[s1, s2, s3, s4, s5, other.clone()]);
        let sizes: Vec<usize> = got.iter().map(|(_, p)| p.len()).collect();
        assert_eq!(sizes, vec![40 + 200, 40 + 150, 40 + 50, 90]);
        assert_eq!(got[0].1[33], TCP_ACK | TCP_PSH);
        assert_eq!(got[1].0.gso_size, 100);
        assert_eq!(got[3].1, other);
    }

    fn fix_csums(p: &mut [u8]) {
        fix_ipv4_checksum(p, 20);
        p[36] = 0;
        p[37] = 0;
        let sum = pseudo_header_sum(&SRC, &DST, IPPROTO_TCP, p.len() - 20);
        let c = !csum_fold(csum_add(sum, &p[20..]));
        p[36..38].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn checksum_partial_segments_from_a_local_sender_merge_and_pass_as_partial() {
        let payload = pattern(3000);
        let mut sp = tcp_packet(9, TCP_ACK, &[], &payload, false);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&tso_hdr(1432, 40)), &mut sp, &mut out, &mut lens).unwrap();
        let segs: Vec<Vec<u8>> = split(&out, &lens)
            .iter()
            .map(|s| make_partial(s.to_vec()))
            .collect();
        let got = coalesce(&segs);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, tso_hdr(1432, 40));
        assert_eq!(&got[0].1[40..], &payload[..]);

        // Alone, it stays partial: the kernel computes the checksum.
        let single = make_partial(tcp_packet(1, TCP_ACK, &[], b"abc", true));
        let got = coalesce(std::slice::from_ref(&single));
        assert_eq!(
            (got[0].0.flags, got[0].0.csum_start, got[0].0.csum_offset),
            (VNET_F_NEEDS_CSUM, 20, 16)
        );
        assert_eq!(got[0].1, single);

        // UDP too; a complete UDP packet is left alone.
        let mut udp = tcp_packet(0, 0, &[], &[4; 8], true);
        udp[9] = IPPROTO_UDP;
        let partial_udp = make_partial(udp.clone());
        let got = coalesce(&[partial_udp.clone(), udp.clone()]);
        assert_eq!(
            (got[0].0.flags, got[0].0.csum_offset),
            (VNET_F_NEEDS_CSUM, 6)
        );
        assert_eq!(got[1].0, VirtioNetHdr::default());
    }
}
