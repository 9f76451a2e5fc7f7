//! Native XDP on the external device, before GRO: strips the outer headers of our packets
//! (same checks as the TC decap) and passes the inner packet to the stack with XDP decap's
//! mark as its source MAC. GRO then merges the inner TCP stream, and the TC program on the
//! same device hands the merged packet to the overlay device (`tc::deliver`), so it still
//! arrives on flannel0.
//!
//! The mark is in the frame, not in XDP metadata: `bpf_xdp_adjust_meta` is refused by some
//! kernel builds and unsupported by many NIC drivers. A frame is trusted by its mark only
//! because every frame arriving here passes this program first, and this program drops any
//! that already carries it; the mark is random per host on top.

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS, helpers::bpf_xdp_adjust_head, programs::XdpContext,
};
use flannel_common::{Config, Counter, CONFIG_F_XDP_DECAP};

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
    if cfg.flags & CONFIG_F_XDP_DECAP != 0 && carries_mark(ctx, &cfg) {
        // Someone on the wire poses as a frame we decapsulated.
        return Err(Counter::DropUnverified);
    }
    let len = ctx.end() - ctx.start();
    let ext_mac = cfg.ext_mac;
    let Some(c) = check_ingress(ctx, &cfg, len, |frame| other_host(frame, &ext_mac))? else {
        return Ok(XDP_PASS);
    };
    let dst = *bytes_at::<_, { eth::DST_LEN }>(ctx, 0)
        .map(|p| unsafe { &*p }) // SAFETY: bounds checked against data_end.
        .ok_or(Counter::DropMalformed)?;
    // SAFETY: helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, c.outer_hlen as i32) } != 0 {
        return Err(Counter::DropHelperError);
    }
    let frame = bytes_at::<_, { eth::LEN }>(ctx, 0).ok_or(Counter::DropHelperError)?;
    // SAFETY: bounds checked against data_end above.
    let frame = unsafe { &mut *frame };
    frame[..eth::DST_LEN].copy_from_slice(&dst);
    frame[eth::DST_LEN..eth::ADDRS_LEN].copy_from_slice(&cfg.xdp_mark);
    put16(frame, eth::PROTO, eth::P_IP);
    count_rx(c.inner_total);
    Ok(XDP_PASS)
}

/// Whether the frame's source MAC is XDP decap's mark.
#[inline(always)]
fn carries_mark(ctx: &XdpContext, cfg: &Config) -> bool {
    match bytes_at::<_, { eth::ADDRS_LEN }>(ctx, 0) {
        Some(p) => {
            // SAFETY: bounds checked against data_end.
            let addrs = unsafe { &*p };
            addrs[eth::DST_LEN..] == cfg.xdp_mark[..]
        }
        None => false,
    }
}

/// Whether an Ethernet frame is unicast to another MAC than `ours` (the stack's
/// PACKET_OTHERHOST; broadcast and multicast frames are for everyone).
#[inline(always)]
fn other_host(frame: &OuterHeaders, ours: &[u8; 6]) -> bool {
    !eth::is_group(frame) && frame[..eth::DST_LEN] != ours[..]
}
