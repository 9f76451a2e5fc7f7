//! Ingress on the external device: the checks both decap programs make (`tc`, `xdp`).
//!
//! A packet counts as "ours" once its outer IPv4 header names our public IP, protocol UDP and
//! its UDP header (readable, i.e. not a non-first fragment) names our port. Everything else
//! passes untouched, including truncated packets whose port cannot be read: the stack drops
//! those. Ours but unusable (outer first fragment, inconsistent lengths, bad inner header,
//! unknown sender, spoofed inner source) is dropped and counted by reason. Outer IP options
//! are allowed (the header length is honoured); inner packets are payload.

pub mod kernel_rx;
pub mod overlay_in;
pub mod tc;
pub mod xdp;

use flannel_common::Config;

use crate::frame::{bytes_at, Frame};
use crate::hdr::{self, addr, be16, eth, fold, ipv4, udp};
use crate::maps::{is_sender, peer_of};
use flannel_common::Counter;

/// Inner bytes removed together with the outer headers on decap when the outer UDP checksum
/// is still to be computed (see `tc::decap`), then put back.
pub const DECAP_RESET_EXTRA: usize = 8;

/// The Ethernet header and the outer IPv4 header without options.
pub type OuterHeaders = [u8; eth::LEN + ipv4::MIN_LEN];

/// What the shared ingress checks found in a packet addressed to our tunnel endpoint from a
/// known peer.
pub struct Checked {
    /// Outer IPv4 header (with options) + UDP: what decap removes behind the Ethernet header.
    pub outer_hlen: usize,
    pub inner_total: usize,
    /// The first inner bytes (see the reset in `tc::decap`).
    pub inner_head: [u8; DECAP_RESET_EXTRA],
    pub outer_udp_partial: bool,
}

/// The checks both decap programs make, on a frame whose first `len` bytes start with the
/// Ethernet header and are directly readable as far as the inner IPv4 header. `Ok(None)`: not
/// ours, pass it untouched. `other_host`: the frame is addressed to another host's MAC, asked
/// only once it is known to be ours.
#[inline(always)]
pub fn check_ingress<F: Frame>(
    ctx: &F,
    cfg: &Config,
    len: usize,
    other_host: impl FnOnce(&OuterHeaders) -> bool,
) -> Result<Option<Checked>, Counter> {
    let Some(outer) = bytes_at::<_, { eth::LEN + ipv4::MIN_LEN }>(ctx, 0) else {
        return Ok(None);
    };
    // SAFETY: bounds checked against data_end above.
    let outer = unsafe { &*outer };
    if be16(outer, eth::PROTO) != eth::P_IP {
        return Ok(None);
    }
    let o = eth::LEN;
    let ver_ihl = outer[o + ipv4::VER_IHL];
    let ihl = ipv4::ihl_bytes(ver_ihl);
    if ipv4::version(ver_ihl) != ipv4::VERSION || ihl < ipv4::MIN_LEN {
        return Ok(None);
    }
    if outer[o + ipv4::PROTO] != ipv4::PROTO_UDP || addr(outer, o + ipv4::DST) != cfg.public_ip {
        return Ok(None);
    }
    let frag = be16(outer, o + ipv4::FRAG);
    if frag & ipv4::OFFSET_MASK != 0 {
        // A non-first fragment has no UDP header: we cannot tell whether it is ours.
        return Ok(None);
    }
    let outer_src = addr(outer, o + ipv4::SRC);
    let outer_total = usize::from(be16(outer, o + ipv4::TOT_LEN));

    // UDP and the inner IPv4 header, copied. Without options (nearly always) at constant
    // offsets; behind options through a helper, so that no packet pointer ever moves by a
    // variable amount (the 6.12 verifier loses such pointers). XDP leaves those to TC.
    let udp_off = eth::LEN + ihl;
    // The inner header is read before the checks below, which decide whether it must exist;
    // zeroed first, since the 5.10 verifier refuses reads of stack it saw no write to.
    let mut inner = [0u8; ipv4::MIN_LEN];
    let mut have_inner = false;
    let udp = if ihl == ipv4::MIN_LEN {
        let Some(udp) = bytes_at::<_, { udp::LEN }>(ctx, eth::LEN + ipv4::MIN_LEN) else {
            return Ok(None);
        };
        let at = eth::LEN + ipv4::MIN_LEN + udp::LEN;
        if let Some(p) = bytes_at::<_, { ipv4::MIN_LEN }>(ctx, at) {
            // SAFETY: bounds checked against data_end.
            inner = unsafe { *p };
            have_inner = true;
        }
        // SAFETY: bounds checked against data_end above.
        unsafe { *udp }
    } else {
        let Some(udp) = ctx.load_at::<{ udp::LEN }>(udp_off) else {
            return Ok(None);
        };
        if let Some(h) = ctx.load_at::<{ ipv4::MIN_LEN }>(udp_off + udp::LEN) {
            inner = h;
            have_inner = true;
        }
        udp
    };
    if be16(&udp, udp::DPORT) != cfg.port {
        return Ok(None);
    }

    // From here on the packet is addressed to our tunnel endpoint.
    if other_host(outer) {
        // Sent to another MAC (a flooding switch, promiscuous mode): not for this host, as
        // ip_rcv would decide.
        return Err(Counter::DropOtherHost);
    }
    if !outer_header_checksum_ok(ctx, outer, ihl) {
        return Err(Counter::DropBadIpChecksum);
    }
    if frag & ipv4::MF != 0 {
        // First fragment: decapsulating it needs reassembly, which TC cannot do. Senders set
        // DF and the overlay MTU leaves room for the headers, so this only happens when
        // something on the path ignores DF.
        return Err(Counter::DropMalformed);
    }
    if outer_total < ihl + udp::LEN + ipv4::MIN_LEN || outer_total > len - eth::LEN {
        return Err(Counter::DropMalformed);
    }
    let udp_len = usize::from(be16(&udp, udp::LENGTH));
    if udp_len != outer_total - ihl {
        return Err(Counter::DropMalformed);
    }
    if !have_inner {
        return Err(Counter::DropMalformed);
    }
    let inner_ver_ihl = inner[ipv4::VER_IHL];
    let inner_total = usize::from(be16(&inner, ipv4::TOT_LEN));
    if ipv4::version(inner_ver_ihl) != ipv4::VERSION
        || ipv4::ihl_words(inner_ver_ihl) < ipv4::MIN_IHL_WORDS
        || inner_total != udp_len - udp::LEN
    {
        return Err(Counter::DropMalformed);
    }
    let mut inner_head = [0u8; DECAP_RESET_EXTRA];
    inner_head.copy_from_slice(&inner[..DECAP_RESET_EXTRA]);
    let outer_udp_partial = outer_udp_checksum_partial(outer, &udp, udp_len);

    if peer_of(addr(&inner, ipv4::SRC), cfg) != Some(outer_src) {
        // Slow path only: tell a stranger from a peer that lies about its source.
        return Err(if is_sender(outer_src) {
            Counter::DropSpoofedSource
        } else {
            Counter::DropUnknownSender
        });
    }
    Ok(Some(Checked {
        outer_hlen: ihl + udp::LEN,
        inner_total,
        inner_head,
        outer_udp_partial,
    }))
}

/// Whether the outer IPv4 header (`ihl` bytes, its first 20 in `outer` after the Ethernet
/// header) has a correct checksum.
#[inline(always)]
fn outer_header_checksum_ok<F: Frame>(ctx: &F, outer: &OuterHeaders, ihl: usize) -> bool {
    let mut sum = hdr::ipv4_base_sum(&outer[eth::LEN..]);
    if ihl == ipv4::MIN_LEN {
        return fold(sum) == 0xffff;
    }
    let mut off = ipv4::MIN_LEN;
    for _ in 0..(ipv4::MAX_LEN - ipv4::MIN_LEN) / 4 {
        if off >= ihl {
            break;
        }
        // Options are rare: a helper read is simpler for the verifier than packet pointers.
        let Some(word) = ctx.load_at::<4>(eth::LEN + off) else {
            return false;
        };
        sum += u32::from(be16(&word, 0)) + u32::from(be16(&word, 2));
        off += 4;
    }
    fold(sum) == 0xffff
}

/// Whether the outer UDP checksum field holds only its pseudo-header sum: what a sender's
/// kernel leaves for the device to finish (CHECKSUM_PARTIAL), and what arrives that way over
/// a veth. A finished checksum equals it once in 65536; the caller's reset is harmless then.
#[inline(always)]
fn outer_udp_checksum_partial(outer: &OuterHeaders, udp: &[u8; udp::LEN], udp_len: usize) -> bool {
    let have = be16(udp, udp::CSUM);
    let pseudo = hdr::pseudo_sum(
        addr(outer, eth::LEN + ipv4::SRC),
        addr(outer, eth::LEN + ipv4::DST),
        ipv4::PROTO_UDP,
        udp_len,
    );
    have != 0 && have == fold(pseudo)
}
