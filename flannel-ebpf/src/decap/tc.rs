//! TC ingress on the external device: decapsulates our packets (or delivers those XDP decap
//! already stripped) to the overlay device.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, TC_ACT_OK,
    },
    helpers::bpf_redirect,
    programs::TcContext,
};
use flannel_common::{
    Config, Counter, CONFIG_F_KERNEL_RX, CONFIG_F_OVERLAY_L2, DECAP_TOKEN, XDP_DECAP_MARK,
};

use super::{check_ingress, DECAP_RESET_EXTRA};
use crate::encap::SAVED_MAX;
use crate::frame::store_saved;
use crate::hdr::{self, be16, eth, fold, ipv4, put16, udp, vxlan};
use crate::maps::config;
use crate::stats::count_rx;

/// Verdict for packets that are not ours: TC_ACT_UNSPEC, which TCX calls TCX_NEXT. Unlike
/// TC_ACT_OK it does not end the device's program chain, so programs attached after us still
/// run; at the end of the chain the stack gets the packet as usual.
pub const NOT_OURS: i32 = -1;
/// Largest packet we read headers of on ingress: Ethernet, outer IPv4 with the longest
/// options, UDP, inner IPv4 without options.
const DECAP_PULL_LEN: usize = eth::LEN + ipv4::MAX_LEN + udp::LEN + ipv4::MIN_LEN;
/// `bpf_skb_adjust_room` flag of newer kernels (bpf-next 2026, not in 6.18): the removed
/// header was a UDP tunnel's; resets skb->encapsulation and the tunnel GSO type.
const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;
/// Bytes of metadata XDP decap puts in front of the packet.
pub const XDP_META_LEN: usize = 4;

/// TC ingress on the external device: `data` starts at the Ethernet header.
#[inline(always)]
pub fn decap(ctx: &TcContext) -> Result<i32, Counter> {
    if ctx.skb.protocol() != u32::from(eth::P_IP.to_be()) {
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
    // SAFETY: ctx.skb.skb is the program's context pointer.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if cfg.flags & CONFIG_F_KERNEL_RX != 0 && c.outer_hlen == ipv4::MIN_LEN + udp::LEN {
        return to_kernel_tunnel(ctx, &cfg, c.inner_total);
    }
    let mut inner_head = [0u8; SAVED_MAX];
    inner_head[..DECAP_RESET_EXTRA].copy_from_slice(&c.inner_head);

    let outer_hlen = c.outer_hlen;
    let fixed_gso = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO);
    if c.outer_udp_partial && c.inner_total >= ipv4::MIN_LEN + DECAP_RESET_EXTRA {
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
        .map_err(|_| Counter::DropHelperError)?;
        ctx.adjust_room(DECAP_RESET_EXTRA as i32, BPF_ADJ_ROOM_MAC, fixed_gso)
            .map_err(|_| Counter::DropHelperError)?;
        store_saved(ctx, eth::LEN, &inner_head, DECAP_RESET_EXTRA)?;
    } else {
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
                .map_err(|_| Counter::DropHelperError)?;
        }
    }
    count_rx(c.inner_total);
    deliver(ctx, &cfg)
}

/// Bytes the VXLAN form adds behind the outer UDP header: VXLAN and the inner Ethernet header.
const KERNEL_RX_GROW: usize = vxlan::LEN + eth::LEN;
/// Outer IPv4 (no options), UDP, VXLAN and inner Ethernet: what the rewrite writes.
const KERNEL_RX_HDRS: usize = ipv4::MIN_LEN + udp::LEN + KERNEL_RX_GROW;
/// Source MAC of the inner frames handed to the kernel's VXLAN receive: any valid unicast
/// address other than the device's own (it drops frames looking like its own echo).
/// The overlay device's VNI (the agent's `device::KERNEL_RX_VNI`).
const KERNEL_RX_VNI: u8 = 1;
const KERNEL_RX_SRC_MAC: [u8; 6] = [0x02, 0x66, 0x6c, 0x00, 0x00, 0x01];

/// Rewrites an accepted packet (outer IPv4 without options) from upstream's format into VXLAN
/// on the same port, for the overlay device's kernel VXLAN receive: outer IPv4 + UDP, then
/// VXLAN and an Ethernet header to the overlay device, then the inner packet untouched. The
/// stack then takes it from here as it would a kernel tunnel's (netfilter INPUT sees UDP to
/// our port as with upstream's socket).
#[inline(always)]
fn to_kernel_tunnel(ctx: &TcContext, cfg: &Config, inner_total: usize) -> Result<i32, Counter> {
    let mut h = [0u8; KERNEL_RX_HDRS];
    let outer = ctx
        .load::<[u8; ipv4::MIN_LEN + udp::LEN]>(eth::LEN)
        .map_err(|_| Counter::DropHelperError)?;
    h[..ipv4::MIN_LEN + udp::LEN].copy_from_slice(&outer);
    // Lengths grow by the added bytes; the header checksum follows (RFC 1624).
    let total = be16(&h, ipv4::TOT_LEN);
    let new_total = total + KERNEL_RX_GROW as u16;
    put16(&mut h, ipv4::TOT_LEN, new_total);
    let old_csum = be16(&h, ipv4::CSUM);
    let csum = !fold(u32::from(!old_csum) + u32::from(!total) + u32::from(new_total));
    put16(&mut h, ipv4::CSUM, csum);
    let u = ipv4::MIN_LEN;
    let udp_len = be16(&h, u + udp::LENGTH);
    put16(&mut h, u + udp::LENGTH, udp_len + KERNEL_RX_GROW as u16);
    // No outer UDP checksum, as on the wire from our senders (zero is valid for IPv4).
    put16(&mut h, u + udp::CSUM, 0);
    let v = u + udp::LEN;
    h[v] = vxlan::FLAGS_VNI;
    h[v + vxlan::VNI + 2] = KERNEL_RX_VNI;
    let e = v + vxlan::LEN;
    h[e..e + 6].copy_from_slice(&cfg.overlay_mac);
    h[e + 6..e + 12].copy_from_slice(&KERNEL_RX_SRC_MAC);
    put16(&mut h, e + eth::PROTO, eth::P_IP);
    // Room behind the Ethernet header; the old outer headers are overwritten with the new.
    ctx.adjust_room(
        KERNEL_RX_GROW as i32,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Counter::DropHelperError)?;
    store_saved(ctx, eth::LEN, &h, KERNEL_RX_HDRS)?;
    count_rx(inner_total);
    // TCX copies tc_classid into tc_index when the verdict is "pass" (tcx_action_code).
    // SAFETY: ctx.skb.skb is the program's context pointer; TC programs may write tc_classid.
    unsafe { (*ctx.skb.skb).tc_classid = u32::from(DECAP_TOKEN) };
    Ok(TC_ACT_OK)
}

/// Hands a decapsulated frame (Ethernet + inner IPv4) to the overlay device's ingress.
#[inline(always)]
fn deliver(ctx: &TcContext, cfg: &Config) -> Result<i32, Counter> {
    if cfg.decap_ifindex == 0 {
        return Ok(TC_ACT_OK);
    }
    if cfg.flags & CONFIG_F_OVERLAY_L2 != 0 {
        // An Ethernet overlay device takes the frame as its own only when addressed to it.
        ctx.store(0, &cfg.overlay_mac, 0)
            .map_err(|_| Counter::DropHelperError)?;
    }
    mark_checked(ctx);
    // As if the packet had been written to the TUN: it enters the stack on flannel0.
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(cfg.decap_ifindex, u64::from(BPF_F_INGRESS)) };
    Ok(action as i32)
}

/// Leaves decap's token for `flannel_overlay_in` (see `DECAP_TOKEN`) on a packet decap
/// redirects (a redirect keeps tc_index as it is).
#[inline(always)]
fn mark_checked(ctx: &TcContext) {
    // SAFETY: ctx.skb.skb is the program's context pointer; TC programs may write tc_index.
    unsafe { (*ctx.skb.skb).tc_index = u32::from(DECAP_TOKEN) };
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
