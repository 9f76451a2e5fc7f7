//! The udp backend's data plane: flannel's udp encapsulation (outer IPv4 + UDP, both ports =
//! the configured port, UDP checksum 0, payload = the inner IPv4 packet) done in TC programs.
//!
//! - `flannel_encap`, TC egress on the overlay TUN (`flannel0`, no L2 header): looks up the peer
//!   owning the inner destination, decrements the inner TTL, prepends outer IPv4/UDP and an
//!   Ethernet header, and redirects to the external device through the neighbour subsystem.
//! - `flannel_decap`, TC ingress on the external device: strips the outer headers of UDP packets
//!   to our IP and port that come from a known peer with an inner source inside that peer's
//!   subnet, and delivers the inner packet as if it had arrived on `flannel0`.
//!
//! A packet counts as "ours" on ingress once its outer IPv4 header names our public IP, protocol
//! UDP and its UDP header (readable, i.e. not a non-first fragment) names our port. Everything
//! else passes untouched (TC_ACT_UNSPEC, i.e. TCX_NEXT: later TCX programs on the device still
//! see it, then the stack), including truncated packets whose port cannot be read:
//! the stack drops those. Ours but unusable (outer first fragment, inconsistent lengths, bad
//! inner header, unknown sender, spoofed inner source) is dropped and counted by reason.
//! Outer IP options are allowed (the header length is honoured); inner packets are payload.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, TC_ACT_OK,
        TC_ACT_SHOT,
    },
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use flannel_common::{Config, PeerKey, PeerValue, SenderKey, SenderValue, Stats, MAX_PEERS};

#[btf_map(name = "flannel_peers")]
static PEERS: HashMap<PeerKey, PeerValue, { MAX_PEERS as usize }> = HashMap::new();

#[btf_map(name = "flannel_senders")]
static SENDERS: HashMap<SenderKey, SenderValue, { MAX_PEERS as usize }> = HashMap::new();

#[btf_map(name = "flannel_config")]
static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "flannel_stats")]
static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

/// Verdict for packets that are not ours: TC_ACT_UNSPEC, which TCX calls TCX_NEXT. Unlike
/// TC_ACT_OK it does not end the device's program chain, so programs attached after us still
/// run; at the end of the chain the stack gets the packet as usual.
const NOT_OURS: i32 = -1;
const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Outer IPv4 + UDP, without options: what encapsulation adds in front of the inner packet.
const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const OUTER_TTL: u8 = 64;
/// DF set, fragment offset 0.
const IP_DF: u16 = 0x4000;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
/// Largest packet we read headers of on ingress: Ethernet, outer IPv4 with the longest
/// options, UDP, inner IPv4 without options.
const DECAP_PULL_LEN: usize = ETH_HLEN + 60 + UDP_HLEN + IPV4_HLEN;

/// Which counter a dropped packet goes to.
#[derive(Clone, Copy)]
enum Drop {
    NoPeer,
    NotIpv4,
    Malformed,
    UnknownSender,
    SpoofedSource,
    TtlExceeded,
    HelperError,
    NotConfigured,
}

#[inline(always)]
fn stats() -> Option<&'static mut Stats> {
    // SAFETY: this CPU's slot of a preallocated array: valid for the whole run, and nothing
    // else writes it meanwhile (TC programs run with bottom halves off, on one CPU).
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn drop_packet(reason: Drop) -> i32 {
    if let Some(s) = stats() {
        let counter = match reason {
            Drop::NoPeer => &mut s.drop_no_peer,
            Drop::NotIpv4 => &mut s.drop_not_ipv4,
            Drop::Malformed => &mut s.drop_malformed,
            Drop::UnknownSender => &mut s.drop_unknown_sender,
            Drop::SpoofedSource => &mut s.drop_spoofed_source,
            Drop::TtlExceeded => &mut s.drop_ttl_exceeded,
            Drop::HelperError => &mut s.drop_helper_error,
            Drop::NotConfigured => &mut s.drop_not_configured,
        };
        *counter += 1;
    }
    TC_ACT_SHOT
}

/// The first `N` bytes at `offset`, if the linear part of the packet holds them.
#[inline(always)]
fn bytes_at<const N: usize>(ctx: &TcContext, offset: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return None;
    }
    Some((start + offset) as *mut [u8; N])
}

#[inline(always)]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
fn addr(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

#[inline(always)]
fn mask(a: [u8; 4], m: [u8; 4]) -> [u8; 4] {
    (u32::from_ne_bytes(a) & u32::from_ne_bytes(m)).to_ne_bytes()
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn config() -> Option<Config> {
    match CONFIG.get(0) {
        Some(c) if c.ready != 0 => Some(*c),
        _ => None,
    }
}

#[classifier]
pub fn flannel_encap(ctx: TcContext) -> i32 {
    match encap(&ctx) {
        Ok(action) => action,
        Err(reason) => drop_packet(reason),
    }
}

#[classifier]
pub fn flannel_decap(ctx: TcContext) -> i32 {
    match decap(&ctx) {
        Ok(action) => action,
        Err(reason) => drop_packet(reason),
    }
}

/// TC egress on the TUN: `data` starts at the inner IPv4 header.
#[inline(always)]
fn encap(ctx: &TcContext) -> Result<i32, Drop> {
    if ctx.skb.protocol() != u32::from(ETH_P_IP.to_be()) {
        return Err(Drop::NotIpv4);
    }
    let cfg = config().ok_or(Drop::NotConfigured)?;
    let inner_len = ctx.len() as usize;
    if inner_len < IPV4_HLEN {
        return Err(Drop::Malformed);
    }
    let hdr = match bytes_at::<IPV4_HLEN>(ctx, 0) {
        Some(h) => h,
        None => {
            ctx.pull_data(IPV4_HLEN as u32)
                .map_err(|_| Drop::HelperError)?;
            bytes_at::<IPV4_HLEN>(ctx, 0).ok_or(Drop::Malformed)?
        }
    };
    // SAFETY: bounds checked against data_end above.
    let ip = unsafe { &mut *hdr };
    if ip[0] >> 4 != 4 {
        return Err(Drop::NotIpv4);
    }
    if ip[0] & 0x0f < 5 {
        return Err(Drop::Malformed);
    }
    let dst = addr(ip, 16);
    let key = PeerKey {
        subnet: mask(dst, cfg.subnet_mask),
    };
    // SAFETY: the value is copied out at once; a concurrent update can at worst give us the
    // old or the new address, both valid peers.
    let peer_ip = match unsafe { PEERS.get(key) } {
        Some(p) => p.public_ip,
        None => return Err(Drop::NoPeer),
    };
    let outer_len = inner_len + ENCAP_LEN;
    if outer_len > 0xffff {
        return Err(Drop::Malformed);
    }

    // Upstream's proxy decrements the inner TTL (it routes once more); so do we. RFC 1624
    // incremental checksum update for the (ttl, protocol) word.
    let ttl = ip[8];
    if ttl <= 1 {
        return Err(Drop::TtlExceeded);
    }
    let old_word = be16(ip, 8);
    let new_word = old_word - 0x0100;
    let old_csum = be16(ip, 10);
    let csum = !fold(u32::from(!old_csum) + u32::from(!old_word) + u32::from(new_word));
    ip[8] = ttl - 1;
    ip[10..12].copy_from_slice(&csum.to_be_bytes());

    // Read before adjust_room changes the skb: FIXED_GSO keeps the inner MSS, so each
    // segment grows by exactly the outer headers (the overlay MTU leaves room for them).
    // SAFETY: ctx.skb.skb is the program's context pointer.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    let mut flags = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP);
    if gso_size != 0 {
        flags |= u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    }
    ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Drop::HelperError)?;
    // bpf_redirect_neigh needs a MAC header in front of the network header; it fills the
    // addresses from the neighbour entry.
    // SAFETY: helper call on our own context.
    if unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) } != 0 {
        return Err(Drop::HelperError);
    }
    let out = bytes_at::<{ ETH_HLEN + ENCAP_LEN }>(ctx, 0).ok_or(Drop::HelperError)?;
    // SAFETY: bounds checked against data_end above.
    let out = unsafe { &mut *out };

    let total = (outer_len as u16).to_be_bytes();
    let udp_len = ((inner_len + UDP_HLEN) as u16).to_be_bytes();
    let port = cfg.port.to_be_bytes();
    let src = cfg.public_ip;
    let mut sum: u32 = 0x4500
        + u32::from(outer_len as u16)
        + u32::from(IP_DF)
        + (u32::from(OUTER_TTL) << 8 | u32::from(IPPROTO_UDP));
    sum += u32::from(u16::from_be_bytes([src[0], src[1]]))
        + u32::from(u16::from_be_bytes([src[2], src[3]]))
        + u32::from(u16::from_be_bytes([peer_ip[0], peer_ip[1]]))
        + u32::from(u16::from_be_bytes([peer_ip[2], peer_ip[3]]));
    let ip_csum = (!fold(sum)).to_be_bytes();
    let df = IP_DF.to_be_bytes();

    // Ethernet: addresses zero (filled by the neighbour output), type IPv4.
    let eth_type = ETH_P_IP.to_be_bytes();
    out[12] = eth_type[0];
    out[13] = eth_type[1];
    let o = ETH_HLEN;
    out[o] = 0x45;
    out[o + 1] = 0;
    out[o + 2] = total[0];
    out[o + 3] = total[1];
    out[o + 4] = 0;
    out[o + 5] = 0;
    out[o + 6] = df[0];
    out[o + 7] = df[1];
    out[o + 8] = OUTER_TTL;
    out[o + 9] = IPPROTO_UDP;
    out[o + 10] = ip_csum[0];
    out[o + 11] = ip_csum[1];
    out[o + 12..o + 16].copy_from_slice(&src);
    out[o + 16..o + 20].copy_from_slice(&peer_ip);
    let u = o + IPV4_HLEN;
    out[u] = port[0];
    out[u + 1] = port[1];
    out[u + 2] = port[0];
    out[u + 3] = port[1];
    out[u + 4] = udp_len[0];
    out[u + 5] = udp_len[1];
    out[u + 6] = 0;
    out[u + 7] = 0;

    if let Some(s) = stats() {
        s.tx_packets += 1;
        s.tx_bytes += inner_len as u64;
    }
    // No explicit nexthop: the kernel looks up the route to the peer's public IP through the
    // external device, so peers behind a router work as well as peers on the same link.
    // SAFETY: a null params pointer with length 0 is the documented "use the FIB" form.
    let action = unsafe { bpf_redirect_neigh(cfg.ext_ifindex, core::ptr::null_mut(), 0, 0) };
    Ok(action as i32)
}

/// TC ingress on the external device: `data` starts at the Ethernet header.
#[inline(always)]
fn decap(ctx: &TcContext) -> Result<i32, Drop> {
    if ctx.skb.protocol() != u32::from(ETH_P_IP.to_be()) {
        return Ok(NOT_OURS);
    }
    let Some(cfg) = config() else {
        return Ok(NOT_OURS);
    };
    let len = ctx.len() as usize;
    // Make the headers we may read linear (a no-op for the usual veth/NIC skbs).
    let want = if len < DECAP_PULL_LEN {
        len
    } else {
        DECAP_PULL_LEN
    };
    if ctx.data() + want > ctx.data_end() && ctx.pull_data(want as u32).is_err() {
        return Ok(NOT_OURS);
    }

    let Some(outer) = bytes_at::<{ ETH_HLEN + IPV4_HLEN }>(ctx, 0) else {
        return Ok(NOT_OURS);
    };
    // SAFETY: bounds checked against data_end above.
    let outer = unsafe { &*outer };
    if be16(outer, 12) != ETH_P_IP {
        return Ok(NOT_OURS);
    }
    let o = ETH_HLEN;
    let ver_ihl = outer[o];
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Ok(NOT_OURS);
    }
    if outer[o + 9] != IPPROTO_UDP || addr(outer, o + 16) != cfg.public_ip {
        return Ok(NOT_OURS);
    }
    let frag = be16(outer, o + 6);
    if frag & IP_OFFSET_MASK != 0 {
        // A non-first fragment has no UDP header: we cannot tell whether it is ours.
        return Ok(NOT_OURS);
    }
    let outer_src = addr(outer, o + 12);
    let outer_total = usize::from(be16(outer, o + 2));

    let udp_off = ETH_HLEN + ihl;
    let Some(udp) = bytes_at::<UDP_HLEN>(ctx, udp_off) else {
        return Ok(NOT_OURS);
    };
    // SAFETY: bounds checked against data_end above.
    let udp = unsafe { &*udp };
    if be16(udp, 2) != cfg.port {
        return Ok(NOT_OURS);
    }

    // From here on the packet is addressed to our tunnel endpoint.
    if frag & IP_MF != 0 {
        // First fragment: decapsulating it needs reassembly, which TC cannot do. Senders set
        // DF and the overlay MTU leaves room for the headers, so this only happens when
        // something on the path ignores DF.
        return Err(Drop::Malformed);
    }
    if outer_total < ihl + UDP_HLEN + IPV4_HLEN || outer_total > len - ETH_HLEN {
        return Err(Drop::Malformed);
    }
    let udp_len = usize::from(be16(udp, 4));
    if udp_len != outer_total - ihl {
        return Err(Drop::Malformed);
    }
    let inner = bytes_at::<IPV4_HLEN>(ctx, udp_off + UDP_HLEN).ok_or(Drop::Malformed)?;
    // SAFETY: bounds checked against data_end above.
    let inner = unsafe { &*inner };
    let inner_total = usize::from(be16(inner, 2));
    if inner[0] >> 4 != 4 || inner[0] & 0x0f < 5 || inner_total != udp_len - UDP_HLEN {
        return Err(Drop::Malformed);
    }

    let key = PeerKey {
        subnet: mask(addr(inner, 12), cfg.subnet_mask),
    };
    // SAFETY: the value is copied out at once.
    let owner = unsafe { PEERS.get(key) }.map(|p| p.public_ip);
    if owner != Some(outer_src) {
        // Slow path only: tell a stranger from a peer that lies about its source.
        let sender = SenderKey {
            public_ip: outer_src,
        };
        // SAFETY: only tested for presence.
        return match unsafe { SENDERS.get(sender) } {
            Some(_) => Err(Drop::SpoofedSource),
            None => Err(Drop::UnknownSender),
        };
    }

    ctx.adjust_room(
        -((ihl + UDP_HLEN) as i32),
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Drop::HelperError)?;
    if let Some(s) = stats() {
        s.rx_packets += 1;
        s.rx_bytes += inner_total as u64;
    }
    if cfg.decap_ifindex == 0 {
        return Ok(TC_ACT_OK);
    }
    // As if the packet had been written to the TUN: it enters the stack on flannel0.
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(cfg.decap_ifindex, u64::from(BPF_F_INGRESS)) };
    Ok(action as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
