//! Egress: TC on the overlay device. Looks up the peer owning the inner destination,
//! decrements the inner TTL, prepends outer IPv4/UDP (and an Ethernet header for the
//! neighbour subsystem) and redirects to the external device.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::{bpf_csum_diff, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_load_bytes},
    programs::TcContext,
};
use flannel_common::{Config, Counter, CONFIG_F_COMPLETE_CSUM};

use crate::frame::{bytes_at, change_tail, nonzero_len, store_saved};
use crate::hdr::{self, addr, be16, eth, fold, ipv4, put16, tcp, udp};
use crate::maps::{peer_of, SCRATCH};
use crate::stats::count_tx;

/// Outer IPv4 + UDP, without options: what encapsulation adds in front of the inner packet.
pub const ENCAP_LEN: usize = ipv4::MIN_LEN + udp::LEN;
const OUTER_TTL: u8 = 64;
/// Checksum completion reads the L4 segment in chunks of this size (a per-CPU map buffer; the
/// most `bpf_csum_diff` takes at once) ...
pub const CSUM_CHUNK: usize = 512;
/// ... up to this length: the overlay MTU of a 9216-byte jumbo underlay.
const CSUM_MAX_L4: usize = 9216;
/// Bytes `complete_l4_checksum` may take off the front of a packet: an Ethernet header's
/// worth, the longest IPv4 header and one byte more (rounded up).
pub const SAVED_MAX: usize = eth::LEN + ipv4::MAX_LEN + 6;

/// TC egress on the overlay device: `data` starts at the inner IPv4 header (TUN, `L2` = 0) or
/// at the Ethernet header in front of it (ifb, `L2` = 14).
#[inline(always)]
pub fn encap<const L2: usize>(ctx: &TcContext, cfg: &Config) -> Result<i32, Counter> {
    if ctx.skb.protocol() != u32::from(eth::P_IP.to_be()) {
        return Err(Counter::DropNotIpv4);
    }
    let skb_len = ctx.len() as usize;
    if skb_len < L2 + ipv4::MIN_LEN {
        return Err(Counter::DropMalformed);
    }
    let inner_len = skb_len - L2;
    let hdr = match bytes_at::<_, { ipv4::MIN_LEN }>(ctx, L2) {
        Some(h) => h,
        None => {
            ctx.pull_data((L2 + ipv4::MIN_LEN) as u32)
                .map_err(|_| Counter::DropHelperError)?;
            bytes_at::<_, { ipv4::MIN_LEN }>(ctx, L2).ok_or(Counter::DropMalformed)?
        }
    };
    // SAFETY: bounds checked against data_end above.
    let ip = unsafe { &mut *hdr };
    if ipv4::version(ip[ipv4::VER_IHL]) != ipv4::VERSION {
        return Err(Counter::DropNotIpv4);
    }
    if ipv4::ihl_words(ip[ipv4::VER_IHL]) < ipv4::MIN_IHL_WORDS {
        return Err(Counter::DropMalformed);
    }
    let Some(peer_ip) = peer_of(addr(ip, ipv4::DST), cfg) else {
        return Err(Counter::DropNoPeer);
    };
    let outer_len = inner_len + ENCAP_LEN;
    if outer_len > usize::from(u16::MAX) {
        return Err(Counter::DropMalformed);
    }

    // Upstream's proxy decrements the inner TTL (it routes once more); so do we. RFC 1624
    // incremental checksum update for the (ttl, protocol) word.
    let ttl = ip[ipv4::TTL];
    if ttl <= 1 {
        return Err(Counter::DropTtlExceeded);
    }
    let old_word = be16(ip, ipv4::TTL);
    let new_word = old_word - (1 << 8); // the TTL is the high byte
    let old_csum = be16(ip, ipv4::CSUM);
    let csum = !fold(u32::from(!old_csum) + u32::from(!old_word) + u32::from(new_word));
    ip[ipv4::TTL] = ttl - 1;
    put16(ip, ipv4::CSUM, csum);
    // Helpers below invalidate packet pointers: keep a copy of the header.
    let inner_hdr = *ip;
    let ihl = ipv4::ihl_bytes(inner_hdr[ipv4::VER_IHL]);

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
        .map_err(|_| Counter::DropHelperError)?;
    // bpf_redirect_neigh needs a MAC header in front of the network header; it fills the
    // addresses from the neighbour entry. The ifb's frames have one already.
    // SAFETY: helper call on our own context.
    if L2 == 0 && unsafe { bpf_skb_change_head(ctx.skb.skb, eth::LEN as u32, 0) } != 0 {
        return Err(Counter::DropHelperError);
    }
    let out = bytes_at::<_, { eth::LEN + ENCAP_LEN }>(ctx, 0).ok_or(Counter::DropHelperError)?;
    // SAFETY: bounds checked against data_end above.
    write_outer_headers(unsafe { &mut *out }, cfg, peer_ip, inner_len);

    if restore != 0 {
        store_saved(ctx, eth::LEN + ENCAP_LEN, &saved, restore)?;
        // Drop the padding complete_l4_checksum may have added.
        let want = (eth::LEN + outer_len) as u32;
        if ctx.len() != want {
            change_tail(ctx, want)?;
        }
    }

    count_tx(inner_len);
    // No explicit nexthop: the kernel looks up the route to the peer's public IP through the
    // external device, so peers behind a router work as well as peers on the same link.
    // SAFETY: a null params pointer with length 0 is the documented "use the FIB" form.
    let action = unsafe { bpf_redirect_neigh(cfg.ext_ifindex, core::ptr::null_mut(), 0, 0) };
    Ok(action as i32)
}

/// Fills in the Ethernet type (addresses are left to the neighbour output), the outer IPv4
/// header (no options, DF, our public IP to the peer's, checksum computed here) and the outer
/// UDP header (both ports ours, checksum 0) in front of `inner_len` inner bytes.
#[inline(always)]
fn write_outer_headers(
    out: &mut [u8; eth::LEN + ENCAP_LEN],
    cfg: &Config,
    peer_ip: [u8; 4],
    inner_len: usize,
) {
    let outer_len = (inner_len + ENCAP_LEN) as u16;
    let src = cfg.public_ip;
    let mut sum: u32 = (u32::from(ipv4::VER_IHL_NO_OPTIONS) << 8)
        + u32::from(outer_len)
        + u32::from(ipv4::DF)
        + (u32::from(OUTER_TTL) << 8 | u32::from(ipv4::PROTO_UDP));
    sum += hdr::addr_sum(src) + hdr::addr_sum(peer_ip);

    put16(out, eth::PROTO, eth::P_IP);
    let o = eth::LEN;
    out[o + ipv4::VER_IHL] = ipv4::VER_IHL_NO_OPTIONS;
    out[o + ipv4::TOS] = 0;
    put16(out, o + ipv4::TOT_LEN, outer_len);
    put16(out, o + ipv4::ID, 0);
    put16(out, o + ipv4::FRAG, ipv4::DF);
    out[o + ipv4::TTL] = OUTER_TTL;
    out[o + ipv4::PROTO] = ipv4::PROTO_UDP;
    put16(out, o + ipv4::CSUM, !fold(sum));
    out[o + ipv4::SRC..o + ipv4::SRC + 4].copy_from_slice(&src);
    out[o + ipv4::DST..o + ipv4::DST + 4].copy_from_slice(&peer_ip);
    let u = o + ipv4::MIN_LEN;
    put16(out, u + udp::SPORT, cfg.port);
    put16(out, u + udp::DPORT, cfg.port);
    put16(out, u + udp::LENGTH, (inner_len + udp::LEN) as u16);
    put16(out, u + udp::CSUM, 0);
}

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
    ip: &[u8; ipv4::MIN_LEN],
    ihl: usize,
    inner_len: usize,
    saved: &mut [u8; SAVED_MAX],
) -> Result<usize, Counter> {
    let proto = ip[ipv4::PROTO];
    if be16(ip, ipv4::FRAG) & (ipv4::MF | ipv4::OFFSET_MASK) != 0
        || usize::from(be16(ip, ipv4::TOT_LEN)) != inner_len
        || ihl > ipv4::MAX_LEN
    {
        return Ok(0);
    }
    let (field, min_l4) = match proto {
        ipv4::PROTO_TCP => (tcp::CSUM, tcp::MIN_LEN),
        ipv4::PROTO_UDP => (udp::CSUM, udp::LEN),
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
    if (proto == ipv4::PROTO_UDP && have == 0) || have != fold(pseudo) {
        // No UDP checksum, or a finished (or broken) one: not ours to touch.
        return Ok(0);
    }

    // Sum the segment as it is (its field included) in chunks, then take the field out.
    let buf: *mut u8 = SCRATCH
        .get_ptr_mut(0)
        .ok_or(Counter::DropHelperError)?
        .cast();
    let mut wsum: u32 = 0;
    let mut off = l4;
    // Whole chunks first, each of a constant size, then what is left: a loop whose helper
    // sizes never vary keeps the verifier's states few (the 5.10 verifier gave up on the
    // variable-size form at a million instructions).
    let mut left = l4_len;
    for _ in 0..CSUM_MAX_L4 / CSUM_CHUNK {
        if left < CSUM_CHUNK {
            break;
        }
        wsum = sum_bytes(ctx, buf, off, CSUM_CHUNK, wsum)?;
        left -= CSUM_CHUNK;
        off += CSUM_CHUNK;
    }
    if left != 0 {
        // Below CSUM_CHUNK here; bounded 1..=CSUM_CHUNK where the verifier can see it.
        let n = nonzero_len::<CSUM_CHUNK>(left);
        // The padding up to the next 4 bytes must be zero: clear the last word first.
        let last = (n - 1) & (CSUM_CHUNK - 4);
        // SAFETY: last + 4 <= CSUM_CHUNK; this CPU's scratch slot, nobody else's meanwhile.
        unsafe { (buf as *mut u8).add(last).cast::<u32>().write_unaligned(0) };
        wsum = sum_bytes(ctx, buf, off, n, wsum)?;
    }
    // csum_diff adds native-endian words; the folded sum of big-endian words is its swap.
    let data = u16::from_be(fold(wsum));
    let mut c = !fold(pseudo + u32::from(data) + u32::from(!have));
    if proto == ipv4::PROTO_UDP && c == 0 {
        c = 0xffff;
    }
    ctx.store(l4 + field, &c.to_be_bytes(), 0)
        .map_err(|_| Counter::DropHelperError)?;

    let cut = l2 + ihl + 1;
    if cut > SAVED_MAX {
        return Ok(0);
    }
    if inner_len < cut + ipv4::MIN_LEN {
        let padded = (l2 + cut + ipv4::MIN_LEN) as u32;
        change_tail(ctx, padded)?;
    }
    // cut <= SAVED_MAX < 128: bounded again for the verifier.
    let cut_len = nonzero_len::<128>(cut);
    if cut_len > SAVED_MAX {
        return Ok(0);
    }
    // SAFETY: saved holds SAVED_MAX >= cut_len bytes.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            l2 as u32,
            saved.as_mut_ptr().cast(),
            cut_len as u32,
        )
    };
    if rc != 0 {
        return Err(Counter::DropHelperError);
    }
    ctx.adjust_room(-(cut as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Counter::DropHelperError)?;
    Ok(cut)
}

/// Adds `n` (1..=CSUM_CHUNK) packet bytes at `off`, zero-padded to a multiple of 4 (the caller
/// clears the last word of `buf`), to the running sum `wsum` of `bpf_csum_diff`.
#[inline(always)]
fn sum_bytes(
    ctx: &TcContext,
    buf: *mut u8,
    off: usize,
    n: usize,
    wsum: u32,
) -> Result<u32, Counter> {
    // SAFETY: the scratch slot holds CSUM_CHUNK >= n bytes.
    let rc =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, off as u32, buf.cast(), n as u32) };
    if rc != 0 {
        return Err(Counter::DropHelperError);
    }
    // n rounded up to 4, written so the verifier sees n4 <= CSUM_CHUNK.
    let n4 = ((n - 1) | 3) + 1;
    // SAFETY: from is null with size 0; to is the scratch slot, n4 <= CSUM_CHUNK bytes.
    let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.cast(), n4 as u32, wsum) };
    if r < 0 {
        return Err(Counter::DropHelperError);
    }
    Ok(r as u32)
}
