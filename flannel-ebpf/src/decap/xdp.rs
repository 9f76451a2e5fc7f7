//! Native XDP on the external device, before GRO: strips the outer headers of our packets
//! (same checks as the TC decap) and passes the inner packet, marked in its metadata, to the
//! stack. GRO then merges the inner TCP stream, and the TC program on the same device hands
//! the merged packet to the overlay device (`tc::deliver`), so it still arrives on flannel0.

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use flannel_common::{Counter, XDP_DECAP_MARK};

use super::tc::XDP_META_LEN;
use super::{check_ingress, OuterHeaders};
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
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, c.outer_hlen as i32) } != 0 {
        return Err(Counter::DropHelperError);
    }
    let frame = bytes_at::<_, { eth::LEN }>(ctx, 0).ok_or(Counter::DropHelperError)?;
    // SAFETY: bounds checked against data_end above.
    let frame = unsafe { &mut *frame };
    frame[..eth::ADDRS_LEN].copy_from_slice(&macs);
    put16(frame, eth::PROTO, eth::P_IP);
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(XDP_META_LEN as i32)) } != 0 {
        // Without the mark TC would not deliver it to the overlay device.
        return Err(Counter::DropHelperError);
    }
    let meta = ctx.metadata();
    if meta + XDP_META_LEN > ctx.data() {
        return Err(Counter::DropHelperError);
    }
    // SAFETY: the metadata area is XDP_META_LEN bytes, checked against data above.
    unsafe { (meta as *mut u32).write_unaligned(XDP_DECAP_MARK) };
    count_rx(c.inner_total);
    Ok(XDP_PASS)
}

/// Whether an Ethernet frame is unicast to another MAC than `ours` (the stack's
/// PACKET_OTHERHOST; broadcast and multicast frames are for everyone).
#[inline(always)]
fn other_host(frame: &OuterHeaders, ours: &[u8; 6]) -> bool {
    !eth::is_group(frame) && frame[..eth::DST_LEN] != ours[..]
}
