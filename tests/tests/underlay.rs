//! The two underlay modes do what they say: on `veth` GSO super-packets cross the switch whole,
//! on `nic` the switch port towards a host puts only MTU-sized frames on the wire.

use std::process::{Child, Stdio};
use std::time::Duration;

use flannel_tests::{tcp_transfer, wait_for, Overlay, Underlay};

const HOSTGW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
/// Ethernet header + 1500 bytes of MTU.
const MAX_FRAME: u32 = 1514;

struct Capture(Child);

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lengths on the wire of the frames in a pcap file (record headers only).
fn frame_lengths(pcap: &[u8]) -> Vec<u32> {
    let mut lens = Vec::new();
    let mut rest = pcap.get(24..).unwrap_or_default();
    while rest.len() >= 16 {
        let word = |i: usize| u32::from_le_bytes([rest[i], rest[i + 1], rest[i + 2], rest[i + 3]]);
        let (incl, orig) = (word(8), word(12));
        lens.push(orig);
        rest = rest.get(16 + incl as usize..).unwrap_or_default();
    }
    lens
}

/// The largest frame the switch sends towards host 1 during a 4 MB container-to-container
/// transfer from host 0 (host-gw: plain routed TCP on the underlay).
fn largest_frame_towards_host1(underlay: Underlay) -> u32 {
    let o = Overlay::builder(HOSTGW, 2)
        .underlay(underlay)
        .start()
        .unwrap();
    let pcap = o.cluster.dir.0.join("port-h1.pcap");
    let _capture = Capture(
        o.cluster
            .switch
            .command("tcpdump")
            .args(["-i", "h1", "-n", "-U", "-s", "64", "-c", "3000", "-w"])
            .arg(&pcap)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (installed by cargo xtask setup)"),
    );
    // tcpdump writes the file header once it captures.
    wait_for(Duration::from_secs(5), "tcpdump to start", || {
        (std::fs::metadata(&pcap).ok()?.len() >= 24).then_some(())
    })
    .unwrap();
    let sent = tcp_transfer(o.container(0), o.container(1), 4 << 20).unwrap();
    assert_eq!(sent, 4 << 20);
    let lens = wait_for(Duration::from_secs(5), "captured frames", || {
        let lens = frame_lengths(&std::fs::read(&pcap).ok()?);
        (lens.len() >= 100).then_some(lens)
    })
    .unwrap();
    lens.into_iter().max().unwrap_or(0)
}

#[test]
fn veth_underlay_carries_gso_super_packets_whole() {
    let max = largest_frame_towards_host1(Underlay::Veth);
    assert!(
        max > MAX_FRAME,
        "largest frame {max}: expected super-packets"
    );
}

#[test]
fn nic_underlay_puts_only_mtu_sized_frames_on_the_wire() {
    let max = largest_frame_towards_host1(Underlay::Nic);
    assert!(max <= MAX_FRAME, "largest frame {max} > {MAX_FRAME}");
}
