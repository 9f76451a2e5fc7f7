//! `flannel_probe`: never attached. The agent test-runs it once at start on a made-up packet
//! (BPF_PROG_TEST_RUN) to learn by trying which `bpf_skb_adjust_room` flags this kernel takes;
//! the answer is a bit set of `flannel_common::probe` in the program's return value.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    programs::TcContext,
};
use flannel_common::probe;

use crate::decap::tc::BPF_F_ADJ_ROOM_DECAP_L4_UDP;
use crate::encap::ENCAP_LEN;

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let mut found = 0;
    let encap = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP);
    if ctx
        .adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, encap)
        .is_ok()
    {
        found |= probe::ENCAP_UDP;
        // The same call TC decap makes for a super-packet.
        let decap = u64::from(BPF_F_ADJ_ROOM_FIXED_GSO) | BPF_F_ADJ_ROOM_DECAP_L4_UDP;
        if ctx
            .adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, decap)
            .is_ok()
        {
            found |= probe::DECAP_L4_UDP;
        }
    }
    found
}
