//! ICMP errors the TUN data plane sends back for packets it cannot forward.

use std::net::Ipv4Addr;

use super::checksum::{csum_add, csum_fold, fix_ipv4_checksum};
use super::ipv4::{ipv4_lengths, IPPROTO_ICMP};

/// RFC 1812: quote as much of the offending packet as fits in 576 bytes.
pub(super) const ICMP_ERROR_MAX_LEN: usize = 576;

/// Builds an ICMP "destination net unreachable" from `from` answering `orig` into `out`.
/// Returns false (nothing built) where RFC 1122 forbids an error: for ICMP errors, non-first
/// fragments, and multicast/broadcast/unspecified sources or destinations.
pub(crate) fn icmp_net_unreachable(orig: &[u8], from: Ipv4Addr, out: &mut Vec<u8>) -> bool {
    let Ok((ihl, total)) = ipv4_lengths(orig) else {
        return false;
    };
    let src = Ipv4Addr::new(orig[12], orig[13], orig[14], orig[15]);
    let dst = Ipv4Addr::new(orig[16], orig[17], orig[18], orig[19]);
    let frag_offset = u16::from_be_bytes([orig[6], orig[7]]) & 0x1fff;
    if frag_offset != 0
        || src.is_unspecified()
        || src.is_multicast()
        || src.is_broadcast()
        || dst.is_multicast()
        || dst.is_broadcast()
    {
        return false;
    }
    if orig[9] == IPPROTO_ICMP {
        match orig.get(ihl) {
            // Only echo request/reply and other queries get an error back.
            Some(0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) => {}
            _ => return false,
        }
    }
    let quoted = &orig[..total.min(ICMP_ERROR_MAX_LEN - 28)];
    let len = 28 + quoted.len();
    out.clear();
    out.extend_from_slice(&[0x45, 0xc0]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    out.extend_from_slice(&from.octets());
    out.extend_from_slice(&src.octets());
    fix_ipv4_checksum(out, 20);
    out.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(quoted);
    let c = !csum_fold(csum_add(0, &out[20..]));
    out[22..24].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::udp::tun::checksum::csum_ok;
    use crate::backend::udp::tun::ipv4::TCP_ACK;
    use crate::backend::udp::tun::test_packets::{pattern, tcp_packet, SRC};

    #[test]
    fn net_unreachable_quotes_the_packet_and_checks_out() {
        let orig = tcp_packet(1, TCP_ACK, &[], &pattern(1000), true);
        let from = Ipv4Addr::new(10, 244, 1, 0);
        let mut out = Vec::new();
        assert!(icmp_net_unreachable(&orig, from, &mut out));
        assert_eq!(out.len(), 576);
        assert!(csum_ok(csum_add(0, &out[..20])));
        assert!(csum_ok(csum_add(0, &out[20..])));
        assert_eq!(&out[12..16], &from.octets());
        assert_eq!(&out[16..20], &SRC);
        assert_eq!((out[20], out[21]), (3, 0));
        assert_eq!(&out[28..], &orig[..548]);

        // Never an error about an error.
        let mut err = tcp_packet(1, 0, &[], &[3, 1, 0, 0], true);
        err[9] = IPPROTO_ICMP;
        err[20] = 3;
        assert!(!icmp_net_unreachable(&err, from, &mut out));
    }
}
