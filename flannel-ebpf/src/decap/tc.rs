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
    Config, Counter, CONFIG_F_KERNEL_RX, CONFIG_F_OVERLAY_L2, CONFIG_F_XDP_DECAP, DECAP_TOKEN,
};

use super::{check_ingress, kernel_rx, DECAP_RESET_EXTRA};
use crate::encap::SAVED_MAX;
use crate::frame::store_saved;
use crate::hdr::{self, eth, ipv4, udp};
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
pub const BPF_F_ADJ_ROOM_DECAP_L4_UDP: u64 = 1 << 10;

/// TC ingress on the external device: `data` starts at the Ethernet header.
#[inline(always)]
pub fn decap(ctx: &TcContext) -> Result<i32, Counter> {
    if ctx.skb.protocol() != u32::from(eth::P_IP.to_be()) {
        return Ok(NOT_OURS);
    }
    let Some(cfg) = config() else {
        return Ok(NOT_OURS);
    };
    if cfg.flags & CONFIG_F_XDP_DECAP != 0 && xdp_marked(ctx, &cfg) {
        // XDP decap already checked, stripped and counted it, and GRO merged the inner stream
        // since: nothing left for the kernel's VXLAN receive to do.
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
    if cfg.flags & CONFIG_F_KERNEL_RX != 0 && c.outer_hlen == kernel_rx::OUTER_LEN {
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

/// Rewrites an accepted packet (outer IPv4 without options) into the VXLAN form
/// (`kernel_rx`) in place, for the overlay device's kernel VXLAN receive. The stack takes it
/// from here as it would a kernel tunnel's (netfilter INPUT sees UDP to our port, as with
/// upstream's socket).
#[inline(always)]
fn to_kernel_tunnel(ctx: &TcContext, cfg: &Config, inner_total: usize) -> Result<i32, Counter> {
    let outer = ctx
        .load::<[u8; kernel_rx::OUTER_LEN]>(eth::LEN)
        .map_err(|_| Counter::DropHelperError)?;
    let h = kernel_rx::headers(&outer, &cfg.overlay_mac);
    // Room behind the Ethernet header; the old outer headers are overwritten with the new.
    // FIXED_GSO: a super-packet keeps its inner MSS.
    ctx.adjust_room(
        kernel_rx::GROW as i32,
        BPF_ADJ_ROOM_MAC,
        u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
    )
    .map_err(|_| Counter::DropHelperError)?;
    store_saved(ctx, eth::LEN, &h, kernel_rx::HDRS_LEN)?;
    count_rx(inner_total);
    Ok(pass_to_kernel(ctx))
}

/// Lets a packet in the VXLAN form go on up the stack, with decap's token.
#[inline(always)]
fn pass_to_kernel(ctx: &TcContext) -> i32 {
    // TCX copies tc_classid into tc_index when the verdict is "pass" (tcx_action_code).
    // SAFETY: ctx.skb.skb is the program's context pointer; TC programs may write tc_classid.
    unsafe { (*ctx.skb.skb).tc_classid = u32::from(DECAP_TOKEN) };
    TC_ACT_OK
}

/// Whether XDP decap on this device marked the frame as one it decapsulated (its source MAC).
#[inline(always)]
fn xdp_marked(ctx: &TcContext, cfg: &Config) -> bool {
    match ctx.load::<[u8; eth::ADDRS_LEN]>(0) {
        Ok(addrs) => addrs[eth::DST_LEN..] == cfg.xdp_mark[..],
        Err(_) => false,
    }
}
