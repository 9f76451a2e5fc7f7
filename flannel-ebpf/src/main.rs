//! The udp backend's data plane: flannel's udp encapsulation (outer IPv4 + UDP, both ports =
//! the configured port, UDP checksum 0, payload = the inner IPv4 packet) done in eBPF.
//!
//! This file only declares the programs; the work is done by concept:
//! - `encap` (egress): `flannel_encap`, TC egress on the overlay device.
//! - `decap` (ingress): the checks shared by `flannel_decap` (TC ingress on the external
//!   device, `decap::tc`) and `flannel_decap_xdp` (native XDP there, `decap::xdp`), and
//!   `flannel_overlay_in` (TC ingress on the overlay device, `decap::overlay_in`), which lets
//!   in only what decap handed it.
//! - `probe`: `flannel_probe`, never attached, test-run by the agent to learn what this
//!   kernel's helpers take.
//! - `maps` (the maps shared with the agent and their lookups), `stats` (counters),
//!   `hdr` (header offsets, checksum arithmetic), `frame` (packet access for TC and XDP).
#![no_std]
#![no_main]

mod decap;
mod encap;
mod frame;
mod hdr;
mod maps;
mod probe;
mod stats;

use aya_ebpf::{
    bindings::xdp_action::XDP_DROP,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use flannel_common::{Counter, CONFIG_F_OVERLAY_L2};

use stats::{count_drop, drop_packet};

#[classifier]
pub fn flannel_encap(ctx: TcContext) -> i32 {
    let Some(cfg) = maps::config() else {
        return drop_packet(Counter::DropNotConfigured);
    };
    // One instance per overlay device type, so every packet offset stays a constant.
    let result = if cfg.flags & CONFIG_F_OVERLAY_L2 != 0 {
        encap::encap::<{ hdr::eth::LEN }>(&ctx, &cfg)
    } else {
        encap::encap::<0>(&ctx, &cfg)
    };
    match result {
        Ok(action) => action,
        Err(reason) => drop_packet(reason),
    }
}

#[classifier]
pub fn flannel_decap(ctx: TcContext) -> i32 {
    match decap::tc::decap(&ctx) {
        Ok(action) => action,
        Err(reason) => drop_packet(reason),
    }
}

#[classifier]
pub fn flannel_overlay_in(ctx: TcContext) -> i32 {
    match decap::overlay_in::admit(&ctx) {
        Ok(action) => action,
        Err(reason) => drop_packet(reason),
    }
}

#[xdp]
pub fn flannel_decap_xdp(ctx: XdpContext) -> u32 {
    match decap::xdp::decap_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            count_drop(reason);
            XDP_DROP
        }
    }
}

#[classifier]
pub fn flannel_probe(ctx: TcContext) -> i32 {
    probe::run(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
