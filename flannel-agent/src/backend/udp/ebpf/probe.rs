//! What this kernel offers the data plane, found by trying (never by version): the
//! `bpf_skb_adjust_room` forms, by test-running `flannel_probe` once on a made-up packet.
//! Loading the programs is itself the probe for the verifier; the maps say whether the kernel
//! took their BTF; attaching is the probe for TCX and native XDP (links.rs).

use std::os::fd::AsFd;
use std::path::Path;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use flannel_common::{map_names, probe, prog_names};

use super::bpf_sys;

/// What `flannel_probe` found; `Err` says why the probe itself could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelperForms {
    /// `BPF_F_ADJ_ROOM_DECAP_L4_UDP`: TC decap clears a super-packet's UDP tunnel state.
    pub decap_l4_udp: Result<bool, String>,
}

/// Whether the kernel holds the maps pinned in `pin_dir` with their BTF (what lets `bpftool
/// map dump` show field names); `Err` says why that could not be read.
pub(super) fn maps_have_btf(pin_dir: &Path) -> Result<bool, String> {
    let path = pin_dir.join(map_names::PEERS);
    let fd = bpf_sys::obj_get(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let id = bpf_sys::map_btf_id(fd.as_fd()).map_err(|e| format!("map info: {e}"))?;
    Ok(id != 0)
}

/// Test-runs `flannel_probe` (loaded, never attached or pinned).
pub(super) fn helper_forms(bpf: &mut Ebpf) -> HelperForms {
    HelperForms {
        decap_l4_udp: run(bpf).map(|found| found & probe::DECAP_L4_UDP != 0),
    }
}

fn run(bpf: &mut Ebpf) -> Result<i32, String> {
    let program: &mut SchedClassifier = bpf
        .program_mut(prog_names::PROBE)
        .ok_or_else(|| format!("the eBPF object has no {}", prog_names::PROBE))?
        .try_into()
        .map_err(|e| format!("{}: {e}", prog_names::PROBE))?;
    program
        .load()
        .map_err(|e| super::error::verifier_reason(&e))?;
    let packet = probe_packet();
    let mut out = [0u8; 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .map_err(|e| format!("test run of {}: {e}", prog_names::PROBE))?;
    // The verdict register holds the bit set (a small non-negative number).
    Ok(result.return_value as i32)
}

/// An Ethernet frame with IPv4 + UDP (our wire format) around a 20-byte inner IPv4 header:
/// what decap removes the outer headers of.
fn probe_packet() -> [u8; 14 + 20 + 8 + 20] {
    let mut p = [0u8; 14 + 20 + 8 + 20];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let outer = &mut p[14..34];
    outer[0] = 0x45;
    outer[2..4].copy_from_slice(&48u16.to_be_bytes());
    outer[8] = 64;
    outer[9] = 17;
    outer[12..16].copy_from_slice(&[192, 0, 2, 1]);
    outer[16..20].copy_from_slice(&[192, 0, 2, 2]);
    let udp = &mut p[34..42];
    udp[0..2].copy_from_slice(&8285u16.to_be_bytes());
    udp[2..4].copy_from_slice(&8285u16.to_be_bytes());
    udp[4..6].copy_from_slice(&28u16.to_be_bytes());
    let inner = &mut p[42..62];
    inner[0] = 0x45;
    inner[2..4].copy_from_slice(&20u16.to_be_bytes());
    inner[8] = 64;
    inner[12..16].copy_from_slice(&[10, 244, 1, 2]);
    inner[16..20].copy_from_slice(&[10, 244, 2, 2]);
    p
}
