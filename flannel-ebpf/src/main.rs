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

mod hdr;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        BPF_F_INGRESS, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT,
    },
    btf_maps::{Array, HashMap, PerCpuArray},
    helpers::{
        bpf_csum_diff, bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail,
        bpf_skb_load_bytes, bpf_skb_store_bytes, bpf_xdp_adjust_head, bpf_xdp_adjust_meta,
    },
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use flannel_common::{
    Config, PeerKey, PeerValue, SenderKey, SenderValue, Stats, CONFIG_F_COMPLETE_CSUM,
    CONFIG_F_OVERLAY_L2, MAX_PEERS, XDP_DECAP_MARK,
};
use hdr::{addr, be16, fold, ipv4, tcp, udp};

#[btf_map(name = "flannel_peers")]
static PEERS: HashMap<PeerKey, PeerValue, { MAX_PEERS as usize }> = HashMap::new();

#[btf_map(name = "flannel_senders")]
static SENDERS: HashMap<SenderKey, SenderValue, { MAX_PEERS as usize }> = HashMap::new();

#[btf_map(name = "flannel_config")]
static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "flannel_stats")]
static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

/// Per-CPU scratch space for checksum completion (the BPF stack has room for 512 bytes only).
#[btf_map(name = "flannel_scratch")]
static SCRATCH: PerCpuArray<[u8; CSUM_CHUNK], 1> = PerCpuArray::new();

/// Verdict for packets that are not ours: TC_ACT_UNSPEC, which TCX calls TCX_NEXT. Unlike
/// TC_ACT_OK it does not end the device's program chain, so programs attached after us still
/// run; at the end of the chain the stack gets the packet as usual.
const NOT_OURS: i32 = -1;
const ETH_HLEN: usize = hdr::eth::LEN;
const IPV4_HLEN: usize = ipv4::MIN_LEN;
const UDP_HLEN: usize = udp::LEN;
/// Outer IPv4 + UDP, without options: what encapsulation adds in front of the inner packet.
const ENCAP_LEN: usize = IPV4_HLEN + UDP_HLEN;
const ETH_P_IP: u16 = hdr::eth::P_IP;
const IPPROTO_UDP: u8 = ipv4::PROTO_UDP;
const OUTER_TTL: u8 = 64;
/// DF set, fragment offset 0.
const IP_DF: u16 = ipv4::DF;
const IP_MF: u16 = ipv4::MF;
const IP_OFFSET_MASK: u16 = ipv4::OFFSET_MASK;
/// Largest packet we read headers of on ingress: Ethernet, outer IPv4 with the longest
/// options, UDP, inner IPv4 without options.
const DECAP_PULL_LEN: usize = ETH_HLEN + ipv4::MAX_LEN + UDP_HLEN + IPV4_HLEN;
/// Checksum completion reads the L4 segment in chunks of this size (a stack buffer) ...
const CSUM_CHUNK: usize = 256;
/// ... up to this length: the overlay MTU of a 9216-byte jumbo underlay.
const CSUM_MAX_L4: usize = 9216;
/// `bpf_skb_adjust_room` flag of newer kernels (bpf-next 2026, not in 6.18): the removed
/// header was a UDP tunnel's; resets skb->encapsulation and the tunnel GSO type.
const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;
/// Inner bytes removed together with the outer headers on decap when the outer UDP checksum
/// is still to be computed (see `decap`), then put back.
const DECAP_RESET_EXTRA: usize = 8;

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
    BadIpChecksum,
    OtherHost,
}

#[inline(always)]
fn stats() -> Option<&'static mut Stats> {
    // SAFETY: this CPU's slot of a preallocated array: valid for the whole run, and nothing
    // else writes it meanwhile (TC programs run with bottom halves off, on one CPU).
    STATS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn drop_packet(reason: Drop) -> i32 {
    count_drop(reason);
    TC_ACT_SHOT
}

#[inline(always)]
fn count_drop(reason: Drop) {
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
            Drop::BadIpChecksum => &mut s.drop_bad_ip_checksum,
            Drop::OtherHost => &mut s.drop_other_host,
        };
        *counter += 1;
    }
}

/// What the shared ingress checks need from a program context: the directly accessible
/// packet bytes, and a bounds-checked read for the (rare) outer IP options.
trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    fn word(&self, offset: usize) -> Option<[u8; 4]>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn word(&self, offset: usize) -> Option<[u8; 4]> {
        self.load::<[u8; 4]>(offset).ok()
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn word(&self, offset: usize) -> Option<[u8; 4]> {
        // SAFETY: bounds checked against data_end by bytes_at.
        bytes_at::<_, 4>(self, offset).map(|p| unsafe { *p })
    }
}

/// The first `N` bytes at `offset`, if the linear part of the packet holds them.
#[inline(always)]
fn bytes_at<F: Frame, const N: usize>(ctx: &F, offset: usize) -> Option<*mut [u8; N]> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + N > end {
        return None;
    }
    Some((start + offset) as *mut [u8; N])
}

#[inline(always)]
fn mask(a: [u8; 4], m: [u8; 4]) -> [u8; 4] {
    (u32::from_ne_bytes(a) & u32::from_ne_bytes(m)).to_ne_bytes()
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
    let Some(cfg) = config() else {
        return drop_packet(Drop::NotConfigured);
    };
    // One instance per overlay device type, so every packet offset stays a constant.
    let result = if cfg.flags & CONFIG_F_OVERLAY_L2 != 0 {
        encap::<ETH_HLEN>(&ctx, &cfg)
    } else {
        encap::<0>(&ctx, &cfg)
    };
    match result {
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

/// TC egress on the overlay device: `data` starts at the inner IPv4 header (TUN, `L2` = 0) or
/// at the Ethernet header in front of it (ifb, `L2` = 14).
#[inline(always)]
fn encap<const L2: usize>(ctx: &TcContext, cfg: &Config) -> Result<i32, Drop> {
    if ctx.skb.protocol() != u32::from(ETH_P_IP.to_be()) {
        return Err(Drop::NotIpv4);
    }
    let skb_len = ctx.len() as usize;
    if skb_len < L2 + IPV4_HLEN {
        return Err(Drop::Malformed);
    }
    let inner_len = skb_len - L2;
    let hdr = match bytes_at::<_, IPV4_HLEN>(ctx, L2) {
        Some(h) => h,
        None => {
            ctx.pull_data((L2 + IPV4_HLEN) as u32)
                .map_err(|_| Drop::HelperError)?;
            bytes_at::<_, IPV4_HLEN>(ctx, L2).ok_or(Drop::Malformed)?
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
    let ttl = ip[ipv4::TTL];
    if ttl <= 1 {
        return Err(Drop::TtlExceeded);
    }
    let old_word = be16(ip, ipv4::TTL);
    let new_word = old_word - 0x0100;
    let old_csum = be16(ip, ipv4::CSUM);
    let csum = !fold(u32::from(!old_csum) + u32::from(!old_word) + u32::from(new_word));
    ip[ipv4::TTL] = ttl - 1;
    ip[ipv4::CSUM..ipv4::CSUM + 2].copy_from_slice(&csum.to_be_bytes());
    // Helpers below invalidate packet pointers: keep a copy of the header.
    let inner_hdr = *ip;
    let ihl = usize::from(inner_hdr[ipv4::VER_IHL] & 0x0f) * 4;

    // Read before adjust_room changes the skb: FIXED_GSO keeps the inner MSS, so each
    // segment grows by exactly the outer headers (the overlay MTU leaves room for them).
    // SAFETY: ctx.skb.skb is the program's context pointer.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };

    // Inner bytes taken off the front to end CHECKSUM_PARTIAL, put back behind the outer
    // headers below (see complete_l4_checksum).
    let mut saved = [0u8; SAVED_MAX];
    let mut restore = 0;
    if gso_size == 0 && cfg.flags & CONFIG_F_COMPLETE_CSUM != 0 {
        restore = complete_l4_checksum(ctx, L2, &inner_hdr, ihl, inner_len, &mut saved)?;
    }

    let mut flags = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP);
    if gso_size != 0 {
        flags |= u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    } else if restore != 0 {
        // The inner header offsets would be off by `restore`, and nothing needs them: the
        // packet is complete and will not be segmented.
        flags = 0;
    }
    ctx.adjust_room((ENCAP_LEN + restore) as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| Drop::HelperError)?;
    // bpf_redirect_neigh needs a MAC header in front of the network header; it fills the
    // addresses from the neighbour entry. The ifb's frames have one already.
    // SAFETY: helper call on our own context.
    if L2 == 0 && unsafe { bpf_skb_change_head(ctx.skb.skb, ETH_HLEN as u32, 0) } != 0 {
        return Err(Drop::HelperError);
    }
    let out = bytes_at::<_, { ETH_HLEN + ENCAP_LEN }>(ctx, 0).ok_or(Drop::HelperError)?;
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

    if restore != 0 {
        store_saved(ctx, ETH_HLEN + ENCAP_LEN, &saved, restore)?;
        // Drop the padding complete_l4_checksum may have added.
        let want = (ETH_HLEN + outer_len) as u32;
        if ctx.len() != want {
            change_tail(ctx, want)?;
        }
    }

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

/// Bytes `complete_l4_checksum` may take off the front of a packet: an Ethernet header's
/// worth, the longest IPv4 header and one byte more (rounded up).
const SAVED_MAX: usize = ETH_HLEN + ipv4::MAX_LEN + 6;

/// Completes the TCP/UDP checksum of a whole (non-GSO) inner packet that the stack left to the
/// device (CHECKSUM_PARTIAL: the field holds only the pseudo-header sum). A virtual wire passes
/// it on like that and a user-space receiver (upstream flanneld, a TUN node) then writes a
/// packet with a wrong checksum to its TUN.
///
/// The program cannot see skb->ip_summed, so a field equal to the pseudo-header sum is what
/// marks such a packet (a complete checksum equals it by chance once in 65536, and is then
/// rewritten with the same value). Writing the sum is not enough: the skb would still say
/// "partial", and a later NAT or a device would treat the full sum as a seed. So the inner
/// packet's first `l2 + ihl + 1` bytes are cut off as well (right behind the `l2`-byte MAC
/// header, if any): bpf_skb_adjust_room's pop calls skb_postpull_rcsum, which turns
/// CHECKSUM_PARTIAL into CHECKSUM_NONE once csum_start lies before skb->data. adjust_room
/// keeps 20 bytes behind the cut, so short packets are padded at the tail first (the caller
/// trims it). The cut bytes are copied to `saved`; the caller puts them back behind the outer
/// headers. Returns how many bytes were cut (0: nothing to do).
#[inline(always)]
fn complete_l4_checksum(
    ctx: &TcContext,
    l2: usize,
    ip: &[u8; IPV4_HLEN],
    ihl: usize,
    inner_len: usize,
    saved: &mut [u8; SAVED_MAX],
) -> Result<usize, Drop> {
    let proto = ip[ipv4::PROTO];
    if be16(ip, ipv4::FRAG) & (IP_MF | IP_OFFSET_MASK) != 0
        || usize::from(be16(ip, ipv4::TOT_LEN)) != inner_len
        || ihl > ipv4::MAX_LEN
    {
        return Ok(0);
    }
    let (field, min_l4) = match proto {
        ipv4::PROTO_TCP => (tcp::CSUM, tcp::MIN_LEN),
        ipv4::PROTO_UDP => (udp::CSUM, UDP_HLEN),
        _ => return Ok(0),
    };
    let l4_len = inner_len - ihl;
    if l4_len < min_l4 || l4_len > CSUM_MAX_L4 {
        return Ok(0);
    }
    let l4 = l2 + ihl;
    let Ok(have) = ctx.load::<[u8; 2]>(l4 + field) else {
        return Ok(0);
    };
    let have = u16::from_be_bytes(have);
    let pseudo = hdr::pseudo_sum(addr(ip, ipv4::SRC), addr(ip, ipv4::DST), proto, l4_len);
    if (proto == IPPROTO_UDP && have == 0) || have != fold(pseudo) {
        // No UDP checksum, or a finished (or broken) one: not ours to touch.
        return Ok(0);
    }

    // Sum the segment as it is (its field included) in chunks, then take the field out.
    let buf = SCRATCH.get_ptr_mut(0).ok_or(Drop::HelperError)?;
    let mut wsum: u32 = 0;
    let mut off = l4;
    // Counted down on its own (not inner_len - off): the verifier must see n >= 1.
    let mut left = l4_len;
    for _ in 0..CSUM_MAX_L4 / CSUM_CHUNK {
        if left == 0 {
            break;
        }
        let n = if left < CSUM_CHUNK { left } else { CSUM_CHUNK };
        left -= n;
        // The padding up to the next 4 bytes must be zero: clear the last word first.
        let last = (n - 1) & (CSUM_CHUNK - 4);
        // SAFETY: last + 4 <= CSUM_CHUNK; this CPU's scratch slot, nobody else's meanwhile.
        unsafe { (buf as *mut u8).add(last).cast::<u32>().write_unaligned(0) };
        // SAFETY: the scratch slot holds CSUM_CHUNK >= n bytes.
        let rc = unsafe {
            bpf_skb_load_bytes(ctx.skb.skb as *const _, off as u32, buf.cast(), n as u32)
        };
        if rc != 0 {
            return Err(Drop::HelperError);
        }
        // n rounded up to 4, written so the verifier sees n4 <= CSUM_CHUNK.
        let n4 = ((n - 1) | 3) + 1;
        // SAFETY: from is null with size 0; to is the scratch slot, n4 <= CSUM_CHUNK bytes.
        let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.cast(), n4 as u32, wsum) };
        if r < 0 {
            return Err(Drop::HelperError);
        }
        wsum = r as u32;
        off += n;
    }
    // csum_diff adds native-endian words; the folded sum of big-endian words is its swap.
    let data = u16::from_be(fold(wsum));
    let mut c = !fold(pseudo + u32::from(data) + u32::from(!have));
    if proto == IPPROTO_UDP && c == 0 {
        c = 0xffff;
    }
    ctx.store(l4 + field, &c.to_be_bytes(), 0)
        .map_err(|_| Drop::HelperError)?;

    let cut = l2 + ihl + 1;
    if cut > SAVED_MAX {
        return Ok(0);
    }
    if inner_len < cut + IPV4_HLEN {
        let padded = (l2 + cut + IPV4_HLEN) as u32;
        change_tail(ctx, padded)?;
    }
    // SAFETY: saved holds SAVED_MAX >= cut bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            l2 as u32,
            saved.as_mut_ptr().cast(),
            cut as u32,
        )
    };
    if rc != 0 {
        return Err(Drop::HelperError);
    }
    ctx.adjust_room(-(cut as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Drop::HelperError)?;
    Ok(cut)
}

/// Grows (zero-filled) or trims the packet to `len` bytes.
#[inline(always)]
fn change_tail(ctx: &TcContext, len: u32) -> Result<(), Drop> {
    // SAFETY: helper call on our own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(Drop::HelperError);
    }
    Ok(())
}

/// Writes the first `len` bytes of `saved` at `offset`, keeping a CHECKSUM_COMPLETE sum right.
#[inline(always)]
fn store_saved(
    ctx: &TcContext,
    offset: usize,
    saved: &[u8; SAVED_MAX],
    len: usize,
) -> Result<(), Drop> {
    if len == 0 || len > SAVED_MAX {
        return Err(Drop::HelperError);
    }
    // SAFETY: saved holds SAVED_MAX >= len bytes.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb as *mut _,
            offset as u32,
            saved.as_ptr().cast(),
            len as u32,
            u64::from(BPF_F_RECOMPUTE_CSUM),
        )
    };
    if rc != 0 {
        return Err(Drop::HelperError);
    }
    Ok(())
}

/// What the shared ingress checks found in a packet addressed to our tunnel endpoint from a
/// known peer.
struct Checked {
    /// Outer IPv4 header (with options) + UDP: what decap removes behind the Ethernet header.
    outer_hlen: usize,
    inner_total: usize,
    /// The first inner bytes (see the reset in `decap`).
    inner_head: [u8; DECAP_RESET_EXTRA],
    outer_udp_partial: bool,
}

/// The checks both decap programs make, on a frame whose first `len` bytes start with the
/// Ethernet header and are directly readable as far as the inner IPv4 header. `Ok(None)`: not
/// ours, pass it untouched. `other_host`: the frame is addressed to another host's MAC, asked
/// only once it is known to be ours.
#[inline(always)]
fn check_ingress<F: Frame>(
    ctx: &F,
    cfg: &Config,
    len: usize,
    other_host: impl FnOnce(&[u8; ETH_HLEN + IPV4_HLEN]) -> bool,
) -> Result<Option<Checked>, Drop> {
    let Some(outer) = bytes_at::<_, { ETH_HLEN + IPV4_HLEN }>(ctx, 0) else {
        return Ok(None);
    };
    // SAFETY: bounds checked against data_end above.
    let outer = unsafe { &*outer };
    if be16(outer, hdr::eth::PROTO) != ETH_P_IP {
        return Ok(None);
    }
    let o = ETH_HLEN;
    let ver_ihl = outer[o];
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_HLEN {
        return Ok(None);
    }
    if outer[o + ipv4::PROTO] != IPPROTO_UDP || addr(outer, o + ipv4::DST) != cfg.public_ip {
        return Ok(None);
    }
    let frag = be16(outer, o + ipv4::FRAG);
    if frag & IP_OFFSET_MASK != 0 {
        // A non-first fragment has no UDP header: we cannot tell whether it is ours.
        return Ok(None);
    }
    let outer_src = addr(outer, o + ipv4::SRC);
    let outer_total = usize::from(be16(outer, o + ipv4::TOT_LEN));

    let udp_off = ETH_HLEN + ihl;
    let Some(udp) = bytes_at::<_, UDP_HLEN>(ctx, udp_off) else {
        return Ok(None);
    };
    // SAFETY: bounds checked against data_end above.
    let udp = unsafe { &*udp };
    if be16(udp, udp::DPORT) != cfg.port {
        return Ok(None);
    }

    // From here on the packet is addressed to our tunnel endpoint.
    if other_host(outer) {
        // Sent to another MAC (a flooding switch, promiscuous mode): not for this host, as
        // ip_rcv would decide.
        return Err(Drop::OtherHost);
    }
    if !outer_header_checksum_ok(ctx, outer, ihl) {
        return Err(Drop::BadIpChecksum);
    }
    if frag & IP_MF != 0 {
        // First fragment: decapsulating it needs reassembly, which TC cannot do. Senders set
        // DF and the overlay MTU leaves room for the headers, so this only happens when
        // something on the path ignores DF.
        return Err(Drop::Malformed);
    }
    if outer_total < ihl + UDP_HLEN + IPV4_HLEN || outer_total > len - ETH_HLEN {
        return Err(Drop::Malformed);
    }
    let udp_len = usize::from(be16(udp, udp::LENGTH));
    if udp_len != outer_total - ihl {
        return Err(Drop::Malformed);
    }
    let inner = bytes_at::<_, IPV4_HLEN>(ctx, udp_off + UDP_HLEN).ok_or(Drop::Malformed)?;
    // SAFETY: bounds checked against data_end above.
    let inner = unsafe { &*inner };
    let inner_total = usize::from(be16(inner, 2));
    if inner[0] >> 4 != 4 || inner[0] & 0x0f < 5 || inner_total != udp_len - UDP_HLEN {
        return Err(Drop::Malformed);
    }
    let mut inner_head = [0u8; DECAP_RESET_EXTRA];
    inner_head.copy_from_slice(&inner[..DECAP_RESET_EXTRA]);
    let outer_udp_partial = outer_udp_checksum_partial(outer, udp, udp_len);

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
    Ok(Some(Checked {
        outer_hlen: ihl + UDP_HLEN,
        inner_total,
        inner_head,
        outer_udp_partial,
    }))
}

#[inline(always)]
fn count_rx(inner_total: usize) {
    if let Some(s) = stats() {
        s.rx_packets += 1;
        s.rx_bytes += inner_total as u64;
    }
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
    if xdp_decapsulated(ctx) {
        // XDP decap already checked, stripped and counted it (GRO has merged it since).
        return deliver(ctx, &cfg);
    }
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
    // SAFETY: ctx.skb.skb is the program's context pointer.
    let pkt_type = unsafe { (*ctx.skb.skb).pkt_type };
    let Some(c) = check_ingress(ctx, &cfg, len, |_| pkt_type == hdr::PACKET_OTHERHOST)? else {
        return Ok(NOT_OURS);
    };
    let mut inner_head = [0u8; SAVED_MAX];
    inner_head[..DECAP_RESET_EXTRA].copy_from_slice(&c.inner_head);

    let outer_hlen = c.outer_hlen;
    let fixed_gso = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    if c.outer_udp_partial && c.inner_total >= IPV4_HLEN + DECAP_RESET_EXTRA {
        // The outer UDP checksum was left to a device (a local sender over a veth): the skb
        // is CHECKSUM_PARTIAL with csum_start at the UDP header we remove. Left so, NAT
        // would update the (complete) inner checksum as if it were a pseudo-header seed and
        // the receiver would then find it wrong. Removing a few inner bytes as well moves
        // skb->data past csum_start, and skb_postpull_rcsum (in adjust_room's pop) then
        // resets the skb to CHECKSUM_NONE; the bytes are put back at once.
        ctx.adjust_room(
            -((outer_hlen + DECAP_RESET_EXTRA) as i32),
            BPF_ADJ_ROOM_MAC,
            fixed_gso,
        )
        .map_err(|_| Drop::HelperError)?;
        ctx.adjust_room(DECAP_RESET_EXTRA as i32, BPF_ADJ_ROOM_MAC, fixed_gso)
            .map_err(|_| Drop::HelperError)?;
        store_saved(ctx, ETH_HLEN, &inner_head, DECAP_RESET_EXTRA)?;
    } else {
        // SAFETY: ctx.skb.skb is the program's context pointer.
        let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
        // A super-packet from an eBPF sender over a veth still says "UDP tunnel"
        // (skb->encapsulation, SKB_GSO_UDP_TUNNEL); left so, a bridge (cni0, whose
        // hw_enc_features lack TSO and checksum offload) segments and checksums it in
        // software on the way to the pod. Kernels with BPF_F_ADJ_ROOM_DECAP_L4_UDP clear
        // that state; older ones (6.18 included) refuse the flag with -EINVAL up front,
        // changing nothing, and the packet is decapsulated without it.
        let cleared = gso
            && ctx
                .adjust_room(
                    -(outer_hlen as i32),
                    BPF_ADJ_ROOM_MAC,
                    fixed_gso | BPF_F_ADJ_ROOM_DECAP_L4_UDP,
                )
                .is_ok();
        if !cleared {
            ctx.adjust_room(-(outer_hlen as i32), BPF_ADJ_ROOM_MAC, fixed_gso)
                .map_err(|_| Drop::HelperError)?;
        }
    }
    count_rx(c.inner_total);
    deliver(ctx, &cfg)
}

/// Hands a decapsulated frame (Ethernet + inner IPv4) to the overlay device's ingress.
#[inline(always)]
fn deliver(ctx: &TcContext, cfg: &Config) -> Result<i32, Drop> {
    if cfg.decap_ifindex == 0 {
        return Ok(TC_ACT_OK);
    }
    if cfg.flags & CONFIG_F_OVERLAY_L2 != 0 {
        // An Ethernet overlay device takes the frame as its own only when addressed to it.
        ctx.store(0, &cfg.overlay_mac, 0)
            .map_err(|_| Drop::HelperError)?;
    }
    // As if the packet had been written to the TUN: it enters the stack on flannel0.
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(cfg.decap_ifindex, u64::from(BPF_F_INGRESS)) };
    Ok(action as i32)
}

/// Whether XDP decap on this device left its mark in the packet's metadata.
#[inline(always)]
fn xdp_decapsulated(ctx: &TcContext) -> bool {
    // SAFETY: ctx.skb.skb is the program's context pointer.
    let meta = unsafe { (*ctx.skb.skb).data_meta } as usize;
    let data = ctx.data();
    if meta + XDP_META_LEN > data {
        return false;
    }
    // SAFETY: the 4 bytes lie inside the metadata area, checked against data above.
    let mark = unsafe { (meta as *const u32).read_unaligned() };
    mark == XDP_DECAP_MARK
}

/// Bytes of metadata XDP decap puts in front of the packet.
const XDP_META_LEN: usize = 4;

#[xdp]
pub fn flannel_decap_xdp(ctx: XdpContext) -> u32 {
    match decap_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            XDP_DROP
        }
    }
}

/// Native XDP on the external device, before GRO: strips the outer headers of our packets
/// (same checks as the TC decap) and passes the inner packet, marked in its metadata, to the
/// stack. GRO then merges the inner TCP stream, and the TC program on the same device hands
/// the merged packet to the overlay device (`deliver`), so it still arrives on flannel0.
#[inline(always)]
fn decap_xdp(ctx: &XdpContext) -> Result<u32, Drop> {
    let Some(cfg) = config() else {
        return Ok(XDP_PASS);
    };
    let len = ctx.data_end() - ctx.data();
    let ext_mac = cfg.ext_mac;
    let Some(c) = check_ingress(ctx, &cfg, len, |eth| other_host(eth, &ext_mac))? else {
        return Ok(XDP_PASS);
    };
    let macs = *bytes_at::<_, 12>(ctx, 0)
        .map(|p| unsafe { &*p }) // SAFETY: bounds checked against data_end.
        .ok_or(Drop::Malformed)?;
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, c.outer_hlen as i32) } != 0 {
        return Err(Drop::HelperError);
    }
    let eth = bytes_at::<_, ETH_HLEN>(ctx, 0).ok_or(Drop::HelperError)?;
    // SAFETY: bounds checked against data_end above.
    let eth = unsafe { &mut *eth };
    eth[..12].copy_from_slice(&macs);
    eth[12..].copy_from_slice(&ETH_P_IP.to_be_bytes());
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(XDP_META_LEN as i32)) } != 0 {
        // Without the mark TC would not deliver it to the overlay device.
        return Err(Drop::HelperError);
    }
    let meta = ctx.metadata();
    if meta + XDP_META_LEN > ctx.data() {
        return Err(Drop::HelperError);
    }
    // SAFETY: the metadata area is XDP_META_LEN bytes, checked against data above.
    unsafe { (meta as *mut u32).write_unaligned(XDP_DECAP_MARK) };
    count_rx(c.inner_total);
    Ok(XDP_PASS)
}

/// Whether an Ethernet frame is unicast to another MAC than `ours` (the stack's
/// PACKET_OTHERHOST; broadcast and multicast frames are for everyone).
#[inline(always)]
fn other_host(frame: &[u8; ETH_HLEN + IPV4_HLEN], ours: &[u8; 6]) -> bool {
    frame[0] & 1 == 0 && frame[..6] != ours[..]
}

/// Whether the outer IPv4 header (`ihl` bytes, its first 20 in `outer` after the Ethernet
/// header) has a correct checksum.
#[inline(always)]
fn outer_header_checksum_ok<F: Frame>(
    ctx: &F,
    outer: &[u8; ETH_HLEN + IPV4_HLEN],
    ihl: usize,
) -> bool {
    let mut sum = hdr::ipv4_base_sum(&outer[ETH_HLEN..]);
    let mut off = IPV4_HLEN;
    for _ in 0..(ipv4::MAX_LEN - IPV4_HLEN) / 4 {
        if off >= ihl {
            break;
        }
        // Options are rare: a helper read is simpler for the verifier than packet pointers.
        let Some(word) = ctx.word(ETH_HLEN + off) else {
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
fn outer_udp_checksum_partial(
    outer: &[u8; ETH_HLEN + IPV4_HLEN],
    udp: &[u8; UDP_HLEN],
    udp_len: usize,
) -> bool {
    let have = be16(udp, udp::CSUM);
    let pseudo = hdr::pseudo_sum(
        addr(outer, ETH_HLEN + ipv4::SRC),
        addr(outer, ETH_HLEN + ipv4::DST),
        IPPROTO_UDP,
        udp_len,
    );
    have != 0 && have == fold(pseudo)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
