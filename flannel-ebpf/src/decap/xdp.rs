//! Native XDP on the external device, before GRO, with the same checks as the TC decap. With
//! a kernel VXLAN overlay device (`CONFIG_F_KERNEL_RX`) it rewrites our packets into the
//! VXLAN form (`kernel_rx`), so the kernel's VXLAN GRO merges them, and TC lets the merged
//! packet on to the VXLAN receive. Otherwise it strips the outer headers, GRO merges the inner
//! TCP stream, and TC hands the merged packet to the overlay device (`tc::deliver`). Either
//! way the packet is marked in its metadata and arrives on flannel0.

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use flannel_common::{Counter, CONFIG_F_KERNEL_RX, XDP_DECAP_MARK, XDP_KERNEL_RX_MARK};

use super::tc::XDP_META_LEN;
use super::{check_ingress, kernel_rx, OuterHeaders};
use crate::frame::{bytes_at, Frame};
use crate::hdr::{eth, put16};
use crate::maps::config;
use crate::stats::count_rx;

#[inline(always)]
pub fn decap_xdp(ctx: &XdpContext) -> Result<u32, Counter> {
    let Some(cfg) = config() else {
        return Ok(XDP_PASS);
    };
    let len = ctx.end() - ctx.start();
    let ext_mac = cfg.ext_mac;
    let Some(c) = check_ingress(ctx, &cfg, len, |frame| other_host(frame, &ext_mac))? else {
        return Ok(XDP_PASS);
    };
    let macs = *bytes_at::<_, { eth::ADDRS_LEN }>(ctx, 0)
        .map(|p| unsafe { &*p }) // SAFETY: bounds checked against data_end.
        .ok_or(Counter::DropMalformed)?;
    let mark = if cfg.flags & CONFIG_F_KERNEL_RX != 0 && c.outer_hlen == kernel_rx::OUTER_LEN {
        // The VXLAN form: the kernel's VXLAN GRO, right after us, merges the outer stream.
        let outer = *bytes_at::<_, { kernel_rx::OUTER_LEN }>(ctx, eth::LEN)
            .map(|p| unsafe { &*p }) // SAFETY: bounds checked against data_end.
            .ok_or(Counter::DropMalformed)?;
        let h = kernel_rx::headers(&outer, &cfg.overlay_mac);
        // SAFETY: helper call on our own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(kernel_rx::GROW as i32)) } != 0 {
            return Err(Counter::DropHelperError);
        }
        let frame = bytes_at::<_, { eth::LEN + kernel_rx::HDRS_LEN }>(ctx, 0)
            .ok_or(Counter::DropHelperError)?;
        // SAFETY: bounds checked against data_end above.
        let frame = unsafe { &mut *frame };
        frame[..eth::ADDRS_LEN].copy_from_slice(&macs);
        put16(frame, eth::PROTO, eth::P_IP);
        frame[eth::LEN..].copy_from_slice(&h);
        XDP_KERNEL_RX_MARK
    } else {
        // SAFETY: helper call on our own context.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, c.outer_hlen as i32) } != 0 {
            return Err(Counter::DropHelperError);
        }
        let frame = bytes_at::<_, { eth::LEN }>(ctx, 0).ok_or(Counter::DropHelperError)?;
        // SAFETY: bounds checked against data_end above.
        let frame = unsafe { &mut *frame };
        frame[..eth::ADDRS_LEN].copy_from_slice(&macs);
        put16(frame, eth::PROTO, eth::P_IP);
        XDP_DECAP_MARK
    };
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(XDP_META_LEN as i32)) } != 0 {
        // Without the mark TC would not hand it on to the overlay device.
        return Err(Counter::DropHelperError);
    }
    let meta = ctx.metadata();
    if meta + XDP_META_LEN > ctx.data() {
        return Err(Counter::DropHelperError);
    }
    // SAFETY: the metadata area is XDP_META_LEN bytes, checked against data above.
    unsafe { (meta as *mut u32).write_unaligned(mark) };
    count_rx(c.inner_total);
    Ok(XDP_PASS)
}

/// Whether an Ethernet frame is unicast to another MAC than `ours` (the stack's
/// PACKET_OTHERHOST; broadcast and multicast frames are for everyone).
#[inline(always)]
fn other_host(frame: &OuterHeaders, ours: &[u8; 6]) -> bool {
    !eth::is_group(frame) && frame[..eth::DST_LEN] != ours[..]
}
