//! Random and mutated tunnel packets through the decap program (BPF_PROG_TEST_RUN), inside a
//! namespace this test creates: whatever arrives from the wire, the program answers pass, drop
//! or redirect, passes packets untouched, and counts each packet at most once (each drop
//! exactly once).
//!
//! The RNG is seeded; the seed is printed, and `FLANNEL_FUZZ_SEED=<n>` replays a run.
//! Needs root and the eBPF object compiled into flannel-agent (`cargo xtask build-ebpf`
//! before building the tests); fails loudly otherwise.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use flannel_agent::backend::udp::ebpf::{read_pinned_stats, EbpfDataplane, EbpfOptions};
use flannel_agent::backend::udp::UdpDataplane;
use flannel_agent::cli::{UdpAttach, UdpDecap};
use flannel_common::Stats;
use flannel_tests::bpf::PinnedProgram;
use flannel_tests::ebpf_host::{
    self, add_ext0_pair, add_flannel0, decap_program, Flannel0, NETWORK, OUR_IP, OUR_SUBNET,
    PEER_IP, PEER_SUBNET, PORT, STRANGER_IP, TCX_NEXT, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    XDP_DROP, XDP_PASS,
};
use flannel_tests::pktgen::{
    ether, icmp_echo, ipv4, ipv4_hlen, refresh_ipv4_checksum, set_frag, tcp, tunnelled, udp,
    udp_checksum_left_to_device, ETH_P_IP, IP_DF, PROTO_ICMP, PROTO_TCP, PROTO_UDP,
};
use flannel_tests::rng::{seed_from_env, Rng};
use flannel_tests::Netns;
use ipnetwork::Ipv4Network;

const RUNS: usize = 4000;

fn net(s: &str) -> Ipv4Network {
    s.parse().expect("test constant")
}

fn seed() -> u64 {
    seed_from_env("FLANNEL_FUZZ_SEED")
}

// ---------------------------------------------------------------------------------------------
// Namespace and data plane

/// A namespace `fl<pid>x<n>-fuzz` with `flannel0` (a persistent TUN, or with `kernel_rx` a
/// VXLAN device on our port as the agent's eBPF mode creates it) and a veth `ext0`/`ext1` at
/// OUR_IP, plus its own pin directory; all removed on drop.
struct Host {
    ns: Netns,
    pin_dir: PathBuf,
}

impl Host {
    fn new(kernel_rx: bool) -> Host {
        // Unique per test (the TC and XDP fuzz tests run in parallel), and named as the
        // harness names its namespaces so a crashed run's leftovers are cleaned up.
        let ns = Netns::unique("fuzz").expect("namespace");
        let flannel0 = if kernel_rx {
            Flannel0::Vxlan
        } else {
            Flannel0::Tun
        };
        // Neither form has a reader to keep.
        let _ = add_flannel0(&ns, flannel0, OUR_SUBNET);
        add_ext0_pair(&ns);
        Host {
            pin_dir: ebpf_host::pin_dir(&ns),
            ns,
        }
    }

    fn load(&self, decap: UdpDecap) -> EbpfDataplane {
        let opts = EbpfOptions {
            pin_dir: self.pin_dir.clone(),
            overlay_ifindex: self.ns.ifindex("flannel0").expect("flannel0"),
            ext_ifindex: self.ns.ifindex("ext0").expect("ext0"),
            ext_ip: OUR_IP,
            port: PORT,
            network: net(NETWORK),
            own_subnet: net(OUR_SUBNET),
            decap,
            attach: UdpAttach::Auto,
        };
        self.ns
            .enter(move || EbpfDataplane::load(&opts))
            .expect("load eBPF data plane")
    }

    fn stats(&self) -> Stats {
        read_pinned_stats(&self.pin_dir).expect("read stats")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Err(e) = EbpfDataplane::unload(&self.pin_dir) {
            eprintln!("unload {}: {e}", self.pin_dir.display());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Packets

/// A valid tunnel frame: from a peer, a stranger, or a peer spoofing another subnet.
fn valid_frame(rng: &mut Rng) -> Vec<u8> {
    let (outer_src, inner_src) = match rng.below(3) {
        0 => (PEER_IP, Ipv4Addr::new(10, 244, 2, 7)),
        1 => (STRANGER_IP, Ipv4Addr::new(10, 244, 2, 7)),
        _ => (PEER_IP, Ipv4Addr::new(10, 244, 9, 7)),
    };
    let len = rng.below(64);
    let payload = rng.bytes(len);
    let inner_dst = Ipv4Addr::new(10, 244, 1, 5);
    // The programs treat the inner packet as payload, whatever it carries.
    let (proto, l4) = match rng.below(3) {
        0 => (PROTO_TCP, tcp(&payload)),
        1 => (PROTO_ICMP, icmp_echo(1, 1, &payload)),
        _ => (PROTO_UDP, udp(40000, 7777, &payload)),
    };
    let mut inner = ipv4(inner_src, inner_dst, 64, proto, &[], &l4);
    set_frag(&mut inner, IP_DF);
    let frame = tunnelled(outer_src, OUR_IP, PORT, &inner);
    if rng.below(3) == 0 {
        // Outer UDP checksum left to the device, as a sender's kernel does over a veth.
        udp_checksum_left_to_device(frame)
    } else {
        frame
    }
}

/// A few random edits: byte flips and overwrites (mostly in the headers), cuts and growth;
/// sometimes the outer header checksum is fixed up so the edit is not rejected for that alone.
fn mutate(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        let headers = f.len().min(14 + 20 + 8 + 20);
        match rng.below(6) {
            5 => {
                // Another host's MAC (the low byte), or a broadcast.
                if rng.below(2) == 0 {
                    f[5] = rng.byte();
                } else {
                    f[..6].copy_from_slice(&[0xff; 6]);
                }
            }
            0 => {
                let i = 14 + rng.below(headers.saturating_sub(14).max(1));
                if let Some(b) = f.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(f.len());
                f[i] = rng.byte();
            }
            2 => {
                let keep = 14 + rng.below(f.len() - 13);
                f.truncate(keep);
            }
            3 => {
                let len = rng.below(40);
                let extra = rng.bytes(len);
                f.extend_from_slice(&extra);
            }
            _ => {
                let i = 14 + rng.below(headers.saturating_sub(14).max(1));
                if let Some(b) = f.get_mut(i) {
                    *b = [0, 0xff, 0x45, 0x46, 0x4f, 17, 0x20, 0x40][rng.below(8)];
                }
            }
        }
    }
    if rng.below(2) == 0 && f.len() >= 34 {
        let ihl = ipv4_hlen(&f[14..]);
        if ihl >= 20 && f.len() >= 14 + ihl {
            refresh_ipv4_checksum(&mut f[14..]);
        }
    }
    f
}

/// Random bytes of random length, half of them labelled IPv4.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let len = 14 + rng.below(200);
    let mut f = rng.bytes(len);
    if rng.below(2) == 0 {
        f[12..14].copy_from_slice(&[0x08, 0x00]);
    }
    f
}

/// BPF_PROG_TEST_RUN refuses (EINVAL) frames labelled IPv4/IPv6 that cannot hold the IP
/// header: pad those with random bytes (the stack would never hand such a frame to TC either).
fn fit_for_test_run(rng: &mut Rng, mut f: Vec<u8>) -> Vec<u8> {
    let min = match f[12..14] {
        [0x08, 0x00] => 14 + 20,
        [0x86, 0xdd] => 14 + 40,
        _ => 14,
    };
    while f.len() < min {
        f.push(rng.byte());
    }
    f
}

fn drops(s: &Stats) -> u64 {
    s.drops()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn decap_answers_random_packets_with_a_known_verdict_and_counts_each_once() {
    fuzz(UdpDecap::Tc, false);
}

#[test]
fn xdp_decap_answers_random_packets_with_a_known_verdict_and_counts_each_once() {
    fuzz(UdpDecap::Xdp, false);
}

/// TC decap handing what it accepts to flannel0's kernel VXLAN receive (CONFIG_F_KERNEL_RX).
#[test]
fn kernel_rx_decap_answers_random_packets_with_a_known_verdict_and_counts_each_once() {
    fuzz(UdpDecap::Tc, true);
}

/// XDP decap with a VXLAN flannel0 (CONFIG_F_KERNEL_RX set): it still strips.
#[test]
fn kernel_rx_xdp_decap_answers_random_packets_with_a_known_verdict_and_counts_each_once() {
    fuzz(UdpDecap::Xdp, true);
}

fn require_object() {
    ebpf_host::require_object(EbpfDataplane::embedded());
}

fn fuzz(decap: UdpDecap, kernel_rx: bool) {
    require_object();
    let seed = seed();
    println!("ebpf_fuzz seed {seed} (replay with FLANNEL_FUZZ_SEED={seed})");
    let mut rng = Rng(seed);

    let host = Host::new(kernel_rx);
    let mut dp = host.load(decap);
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let xdp = decap == UdpDecap::Xdp;
    let prog = decap_program(&host.pin_dir, xdp);
    let ext0 = host.ns.ifindex("ext0").expect("ext0");
    let mark = ebpf_host::pinned_config(&host.pin_dir).xdp_mark;

    let mut seen = [0usize; 3]; // pass, drop, redirect
    let mut before = host.stats();
    for i in 0..RUNS {
        let frame = match rng.below(4) {
            0 => random_frame(&mut rng),
            1 => valid_frame(&mut rng),
            _ => {
                let valid = valid_frame(&mut rng);
                mutate(&mut rng, valid)
            }
        };
        let mut frame = fit_for_test_run(&mut rng, frame);
        if rng.below(8) == 0 {
            // Posing as a frame XDP decap marked.
            frame[6..12].copy_from_slice(&mark);
        }
        // Run as received by ext0, so pkt_type comes from its MAC as for a frame off the wire.
        let (verdict, out) = {
            let prog = prog.clone();
            let frame = frame.clone();
            host.ns.enter(move || prog.run(&frame, ext0))
        };
        let after = host.stats();
        let ctx = || format!("seed {seed}, run {i}, verdict {verdict}, frame {frame:02x?}");
        let rx = after.rx_packets - before.rx_packets;
        let dropped = drops(&after) - drops(&before);
        assert!(
            rx + dropped <= 1,
            "counted {rx} rx + {dropped} drops: {}",
            ctx()
        );
        assert_eq!(after.tx_packets, before.tx_packets, "decap sent: {}", ctx());
        if xdp {
            if frame[6..12] == mark {
                assert_eq!(
                    verdict,
                    XDP_DROP,
                    "a frame with the mark from the wire: {}",
                    ctx()
                );
            }
            match verdict {
                XDP_PASS if rx == 1 => {
                    seen[2] += 1;
                    assert_eq!(dropped, 0, "{}", ctx());
                    assert_eq!(&out[..6], &frame[..6], "destination MAC kept: {}", ctx());
                    // XDP strips before GRO even with a VXLAN flannel0 (kernel_rx): marked
                    // for TC (its source MAC), which redirects it to flannel0.
                    assert_eq!(&out[6..12], &mark, "marked: {}", ctx());
                }
                XDP_PASS => {
                    seen[0] += 1;
                    assert_eq!(dropped, 0, "pass counted as a drop: {}", ctx());
                    assert_eq!(out, frame, "passed packets are untouched: {}", ctx());
                }
                XDP_DROP => {
                    seen[1] += 1;
                    assert_eq!(dropped, 1, "drop not counted once: {}", ctx());
                }
                other => panic!("unexpected verdict {other}: {}", ctx()),
            }
            before = after;
            continue;
        }
        match verdict {
            TC_ACT_OK if kernel_rx && rx == 1 => {
                // Rewritten in place into VXLAN for flannel0: 22 bytes more behind the
                // Ethernet header (outer IPv4 without options only), VNI 1.
                seen[2] += 1;
                assert_eq!(dropped, 0, "{}", ctx());
                assert_eq!(
                    out.len(),
                    frame.len() + 22,
                    "grown by VXLAN + Ethernet: {}",
                    ctx()
                );
                assert_eq!(&out[..14], &frame[..14], "Ethernet header kept: {}", ctx());
                assert_eq!(out[14], 0x45, "outer IPv4 without options: {}", ctx());
                assert_eq!(
                    &out[42..50],
                    &[0x08, 0, 0, 0, 0, 0, 1, 0],
                    "VXLAN: {}",
                    ctx()
                );
                assert_eq!(&out[64..], &frame[42..], "inner packet kept: {}", ctx());
            }
            TCX_NEXT | TC_ACT_OK => {
                seen[0] += 1;
                assert_eq!(dropped, 0, "pass counted as a drop: {}", ctx());
                assert_eq!(out, frame, "passed packets are untouched: {}", ctx());
            }
            TC_ACT_SHOT => {
                seen[1] += 1;
                assert_eq!(dropped, 1, "drop not counted once: {}", ctx());
            }
            TC_ACT_REDIRECT => {
                seen[2] += 1;
                assert_eq!(rx, 1, "delivery not counted once: {}", ctx());
                assert_eq!(&out[..14], &frame[..14], "Ethernet header kept: {}", ctx());
            }
            other => panic!("unexpected verdict {other}: {}", ctx()),
        }
        before = after;
    }
    println!("pass {}, drop {}, redirect {}", seen[0], seen[1], seen[2]);
    // The generator must reach all three outcomes, or parts of the program went untested.
    assert!(
        seen.iter().all(|&n| n >= RUNS / 50),
        "verdicts pass/drop/redirect {seen:?} (seed {seed})"
    );
}

/// flannel0's guard on its ingress: whatever arrives without decap's token (a test run
/// cannot carry one: the kernel takes no tc_index in ctx_in) is dropped and counted as
/// unverified, exactly once.
#[test]
fn overlay_in_drops_every_packet_without_decaps_token_and_counts_it_once() {
    require_object();
    let seed = seed();
    println!("ebpf_fuzz seed {seed} (replay with FLANNEL_FUZZ_SEED={seed})");
    let mut rng = Rng(seed);
    let host = Host::new(true);
    let mut dp = host.load(UdpDecap::Tc);
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let guard = PinnedProgram::tc(&host.pin_dir.join("flannel_overlay_in"));
    let flannel0 = host.ns.ifindex("flannel0").expect("flannel0");
    // What a VXLAN receive hands on: an Ethernet header, then a tunnel packet's inner packet.
    let received = |f: Vec<u8>| ether(ETH_P_IP, f.get(42..).unwrap_or_default());
    let mut before = host.stats();
    for i in 0..RUNS / 4 {
        let frame = match rng.below(3) {
            0 => random_frame(&mut rng),
            1 => received(valid_frame(&mut rng)),
            _ => {
                let valid = valid_frame(&mut rng);
                received(mutate(&mut rng, valid))
            }
        };
        let frame = fit_for_test_run(&mut rng, frame);
        let (verdict, _) = {
            let (guard, frame) = (guard.clone(), frame.clone());
            host.ns.enter(move || guard.run(&frame, flannel0))
        };
        let after = host.stats();
        let ctx = || format!("seed {seed}, run {i}, verdict {verdict}, frame {frame:02x?}");
        assert_eq!(verdict, TC_ACT_SHOT, "{}", ctx());
        assert_eq!(
            (
                after.drop_unverified - before.drop_unverified,
                drops(&after) - drops(&before),
                after.rx_packets - before.rx_packets
            ),
            (1, 1, 0),
            "counted once as unverified: {}",
            ctx()
        );
        before = after;
    }
}
