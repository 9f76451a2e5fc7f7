//! TC ingress on the overlay device: admits only packets decap handed it. The overlay device's
//! VXLAN receive takes any VXLAN datagram sent to the udp port, through any interface (a pod
//! can send one to the host); only those that came through decap's checks on the external
//! device carry its token.

use aya_ebpf::programs::TcContext;
use flannel_common::{Counter, DECAP_TOKEN};

use super::tc::NOT_OURS;

#[inline(always)]
pub fn admit(ctx: &TcContext) -> Result<i32, Counter> {
    // SAFETY: ctx.skb.skb is the program's context pointer; tc_index is readable and
    // writable from TC programs.
    unsafe {
        if (*ctx.skb.skb).tc_index != u32::from(DECAP_TOKEN) {
            return Err(Counter::DropUnverified);
        }
        // Nothing past this point should see it.
        (*ctx.skb.skb).tc_index = 0;
    }
    Ok(NOT_OURS)
}
