//! The udp backend's eBPF programs, loaded for real inside namespaces this test creates.
//!
//! Verdicts and counters come from BPF_PROG_TEST_RUN on crafted packets; the encapsulated
//! bytes and the delivery of decapsulated packets (with strict rp_filter) come from real
//! traffic between two namespaces joined by a veth pair.
//!
//! Needs root and the eBPF object compiled into flannel-agent (`cargo xtask build-ebpf`
//! before building the tests); fails loudly otherwise.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use flannel_agent::backend::udp::ebpf::{read_pinned_stats, EbpfDataplane, EbpfOptions};
use flannel_agent::backend::udp::{pin_lock, UdpDataplane};
use flannel_agent::cli::{UdpAttach, UdpDecap};
use flannel_common::{Config, Stats, CONFIG_F_KERNEL_RX, CONFIG_F_XDP_DECAP};
use flannel_tests::bpf::PinnedProgram;
use flannel_tests::ebpf_host::{
    self, add_ext0_pair, add_flannel0, decap_program, Flannel0, NETWORK, OUR_IP, OUR_SUBNET,
    OVERLAY_MAC, PEER_IP, PEER_SUBNET, PORT, STRANGER_IP, TCX_NEXT, TC_ACT_OK, TC_ACT_REDIRECT,
    TC_ACT_SHOT, XDP_DROP, XDP_PASS,
};
use flannel_tests::pktgen::{
    arp_request, checksum, ether, ether_between, inner, ipv4, ipv4_off, ipv6, l4_checksum_ok,
    pseudo_seed, refresh_ipv4_checksum, set_frag, tcp4, tunnelled, tunnelled_with_options, udp,
    udp_checksum_left_to_device, vxlan, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN,
    IP_DF, IP_MF, PROTO_UDP, SRC_MAC,
};
use flannel_tests::{tc, Netns};
use ipnetwork::Ipv4Network;

const OTHER_PEER_SUBNET: &str = "10.244.3.0/24";
const OTHER_PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);

const V6_ANY: std::net::Ipv6Addr = std::net::Ipv6Addr::UNSPECIFIED;

fn net(s: &str) -> Ipv4Network {
    s.parse().expect("test constant")
}

fn require_object() {
    ebpf_host::require_object(EbpfDataplane::embedded());
}

// ---------------------------------------------------------------------------------------------
// Namespaces and devices

/// One "host": a namespace with a `flannel0` overlay device (overlay route through it) and an
/// external veth end `ext0` at `ip`, plus its own pin directory.
struct Host {
    /// A reader on `flannel0`, or None for a persistent TUN nobody reads (NO-CARRIER), which
    /// is what the agent's eBPF mode creates: the programs work either way.
    _tun: Option<OwnedFd>,
    ns: Netns,
    pin_dir: PathBuf,
    ip: Ipv4Addr,
    subnet: Ipv4Network,
}

impl Host {
    fn new(ip: Ipv4Addr, subnet: &str, overlay: Flannel0) -> Host {
        let ns = Netns::unique("ebpf").expect("namespace");
        Host {
            _tun: add_flannel0(&ns, overlay, subnet),
            pin_dir: ebpf_host::pin_dir(&ns),
            ns,
            ip,
            subnet: net(subnet),
        }
    }

    /// A standalone host whose `ext0` peer end (`ext1`) stays in the same namespace.
    fn alone() -> Host {
        Host::alone_with(Flannel0::TunRead)
    }

    fn alone_with(overlay: Flannel0) -> Host {
        let host = Host::new(OUR_IP, OUR_SUBNET, overlay);
        add_ext0_pair(&host.ns);
        // The "peer" is ext1 itself: encapsulated frames land there for the test to read.
        host.ns
            .ip(&[
                "neigh",
                "add",
                "192.0.2.2",
                "lladdr",
                &ebpf_host::mac(SRC_MAC),
                "dev",
                "ext0",
                "nud",
                "permanent",
            ])
            .expect("ip");
        host
    }

    fn options(&self) -> EbpfOptions {
        EbpfOptions {
            pin_dir: self.pin_dir.clone(),
            overlay_ifindex: self.ns.ifindex("flannel0").expect("device"),
            ext_ifindex: self.ns.ifindex("ext0").expect("device"),
            ext_ip: self.ip,
            port: PORT,
            network: net(NETWORK),
            own_subnet: self.subnet,
            decap: UdpDecap::Tc,
            attach: UdpAttach::Auto,
        }
    }

    fn load(&self) -> EbpfDataplane {
        self.load_with(UdpDecap::Tc)
    }

    fn load_with(&self, decap: UdpDecap) -> EbpfDataplane {
        let opts = EbpfOptions {
            decap,
            ..self.options()
        };
        // As the agent does: the pin dir records whose namespace its TC filters are in, which
        // is what lets `unload` remove classic TC filters (TCX links are in the pin dir).
        self.ns
            .enter(move || {
                pin_lock::PinDirLock::acquire(&opts.pin_dir)?;
                Ok::<_, anyhow::Error>(EbpfDataplane::load(&opts)?)
            })
            .expect("load eBPF data plane")
    }

    fn stats(&self) -> Stats {
        read_pinned_stats(&self.pin_dir).expect("read stats")
    }

    /// Sends `packet` out of `flannel0` as if the stack routed it there (an AF_PACKET socket
    /// goes through the device's TC egress just the same). A TC drop shows as ENOBUFS.
    fn inject(&self, ethertype: u16, packet: &[u8]) -> io::Result<()> {
        let ifindex = self.ns.ifindex("flannel0").expect("device");
        let packet = packet.to_vec();
        self.ns.enter(move || {
            // SAFETY: plain socket(2) call.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: a fresh fd owned here.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zero is a valid start.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ethertype.to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: buffer and address are valid for the given lengths.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        })
    }

    /// BPF_PROG_TEST_RUN of `prog` on `frame` as received by `ext0`: the kernel then sets
    /// pkt_type from ext0's MAC, as for a frame from the wire.
    fn run_on_ext0(&self, prog: &PinnedProgram, frame: &[u8]) -> (u32, Vec<u8>) {
        let ifindex = self.ns.ifindex("ext0").expect("device");
        let prog = prog.clone();
        let frame = frame.to_vec();
        self.ns.enter(move || prog.run(&frame, ifindex))
    }

    /// A raw socket on `ext1` (the far end of `ext0`), reading whole Ethernet frames.
    fn capture(&self) -> OwnedFd {
        let ifindex = self.ns.ifindex("ext1").expect("device");
        self.ns.enter(move || {
            let all = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2) call.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(all),
                )
            };
            assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
            // SAFETY: a fresh fd owned here.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zero is a valid start.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = all;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: valid address of the given length.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert!(rc == 0, "bind: {}", io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            // SAFETY: valid option value of the given length.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
            }
            fd
        })
    }
}

/// The next frame on `capture` that is UDP to our port, within a few seconds.
fn next_tunnel_frame(capture: &OwnedFd) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let mut buf = vec![0u8; 2048];
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(capture.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        buf.truncate(n as usize);
        let is_tunnel = buf.len() >= 42
            && buf[12..14] == [0x08, 0x00]
            && buf[23] == 17
            && buf[36..38] == PORT.to_be_bytes();
        if is_tunnel {
            return Some(buf);
        }
    }
    None
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Err(e) = EbpfDataplane::unload(&self.pin_dir) {
            eprintln!("unload {}: {e}", self.pin_dir.display());
        }
    }
}

/// Two hosts whose `ext0` devices are the two ends of one veth pair.
fn two_hosts(overlay: Flannel0) -> (Host, Host) {
    let a = Host::new(OUR_IP, OUR_SUBNET, overlay);
    let b = Host::new(PEER_IP, PEER_SUBNET, overlay);
    a.ns.ip(&[
        "link", "add", "ext0", "type", "veth", "peer", "name", "ext0", "netns", &b.ns.name,
    ])
    .expect("ip");
    for (h, addr) in [(&a, "192.0.2.1/24"), (&b, "192.0.2.2/24")] {
        h.ns.ip(&["addr", "add", addr, "dev", "ext0"]).expect("ip");
        h.ns.ip(&["link", "set", "ext0", "up"]).expect("ip");
    }
    (a, b)
}

// ---------------------------------------------------------------------------------------------
// Packet building

fn a(s: &str) -> Ipv4Addr {
    s.parse().expect("test constant")
}

/// The inner packet most decap tests carry: UDP from a pod in the peer's subnet to ours.
fn from_peer_pod() -> Vec<u8> {
    inner(a("10.244.2.7"), a("10.244.1.5"))
}

/// `inner` as the peer tunnels it to us.
fn from_peer(inner: &[u8]) -> Vec<u8> {
    tunnelled(PEER_IP, OUR_IP, PORT, inner)
}

/// `inner` as the peer tunnels it to us with an option in the outer header (IHL 6).
fn from_peer_with_outer_options(inner: &[u8]) -> Vec<u8> {
    tunnelled_with_options(PEER_IP, OUR_IP, PORT, &[1, 1, 1, 0], inner)
}

/// Tunnel frames from the peer that decap accepts in every form (stripped, or rewritten into
/// VXLAN for flannel0), by name, with the inner packet each carries.
fn accepted_from_peer() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let plain = from_peer_pod();
    let with_options = ipv4(
        a("10.244.2.7"),
        a("10.244.1.5"),
        17,
        6,
        &[1, 1, 1, 0],
        b"tcp-ish bytes, not parsed",
    );
    vec![
        ("plain", from_peer(&plain), plain.clone()),
        ("inner options", from_peer(&with_options), with_options),
        // Outer UDP checksum still to be computed (a sender's kernel over a veth).
        (
            "outer checksum left to the device",
            udp_checksum_left_to_device(from_peer(&plain)),
            plain,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Tests: encapsulation verdicts (BPF_PROG_TEST_RUN on the TUN's egress program)

#[test]
fn encap_drops_and_counts_what_it_cannot_send() {
    require_object();
    let host = Host::alone();
    let mut dp = host.load();
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let capture = host.capture();

    let dropped = |ethertype: u16, packet: &[u8]| {
        let err = host.inject(ethertype, packet).expect_err("TC drop");
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS), "{err}");
    };
    // No peer owns 10.244.9.0/24.
    dropped(0x0800, &inner(a("10.244.1.5"), a("10.244.9.9")));
    // IPv6 on the overlay device.
    dropped(ETH_P_IPV6, &ipv6(V6_ANY, V6_ANY, 17, 64, &udp(1, 2, b"")));
    // TTL 1 would reach 0 at the tunnel hop.
    let mut last_hop = inner(a("10.244.1.5"), a("10.244.2.7"));
    last_hop[8] = 1;
    dropped(0x0800, &last_hop);
    // A header length below 5 words.
    let mut bad_ihl = inner(a("10.244.1.5"), a("10.244.2.7"));
    bad_ihl[0] = 0x44;
    dropped(0x0800, &bad_ihl);

    // TC egress runs inside the send: the counters are final now.
    let s = host.stats();
    assert_eq!(s.drop_no_peer, 1, "{s:?}");
    assert_eq!(s.drop_not_ipv4, 1, "{s:?}");
    assert_eq!(s.drop_ttl_exceeded, 1, "{s:?}");
    assert_eq!(s.drop_malformed, 1, "{s:?}");
    assert_eq!(s.tx_packets, 0, "{s:?}");
    let summed = dp.stats().expect("stats");
    assert_eq!((summed.drop_no_peer, summed.drop_not_ipv4), (1, 1));
    assert_eq!(next_tunnel_frame(&capture), None, "nothing was sent");
}

#[test]
fn encap_output_is_byte_exact() {
    encap_output_is_byte_exact_on(Flannel0::TunRead);
}

#[test]
fn encap_output_is_byte_exact_over_an_ifb() {
    encap_output_is_byte_exact_on(Flannel0::Ifb);
}

fn encap_output_is_byte_exact_on(overlay: Flannel0) {
    require_object();
    let host = Host::alone_with(overlay);
    let mut dp = host.load();
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let capture = host.capture();

    // Inner packet with IP options (padded record route): forwarded intact but for the TTL,
    // which drops by one with the header checksum fixed.
    let options = [7, 7, 4, 0, 0, 0, 0, 1];
    let payload = udp(40000, 7777, b"payload");
    let input = ipv4(a("10.244.1.5"), a("10.244.2.7"), 64, 17, &options, &payload);
    host.inject(0x0800, &input).expect("send");
    let frame = next_tunnel_frame(&capture).expect("an encapsulated frame on the underlay");

    let expected_inner = ipv4(a("10.244.1.5"), a("10.244.2.7"), 63, 17, &options, &payload);
    let mut outer_ip = ipv4(
        OUR_IP,
        PEER_IP,
        64,
        17,
        &[],
        &udp(PORT, PORT, &expected_inner),
    );
    outer_ip[4..6].copy_from_slice(&[0, 0]); // id 0
    set_frag(&mut outer_ip, IP_DF); // recomputes the checksum
    let mut expected = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    expected.extend_from_slice(&outer_ip);
    assert_eq!(frame, expected, "encapsulated frame");
    assert_eq!(checksum(&frame[14..34]), 0, "outer header checksum");
    assert_eq!(checksum(&frame[42..42 + 28]), 0, "inner header checksum");

    let s = host.stats();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, input.len() as u64), "{s:?}");
}

/// The inner packet of an encapsulated frame captured on ext1.
fn inner_of(frame: &[u8]) -> &[u8] {
    &frame[14 + 28..]
}

#[test]
fn encap_completes_checksums_left_to_a_virtual_wire_and_nothing_else() {
    encap_completes_checksums_left_to_a_virtual_wire_and_nothing_else_on(Flannel0::TunRead);
}

#[test]
fn encap_completes_checksums_left_to_a_virtual_wire_and_nothing_else_over_an_ifb() {
    encap_completes_checksums_left_to_a_virtual_wire_and_nothing_else_on(Flannel0::Ifb);
}

fn encap_completes_checksums_left_to_a_virtual_wire_and_nothing_else_on(overlay: Flannel0) {
    require_object();
    let host = Host::alone_with(overlay);
    let mut dp = host.load();
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let capture = host.capture();
    let (src, dst) = (a("10.244.1.5"), a("10.244.2.7"));
    // The TTL drops by one on the way; nothing else changes unless noted.
    let sent = |p: &[u8]| {
        let mut p = p.to_vec();
        p[ipv4_off::TTL] -= 1;
        refresh_ipv4_checksum(&mut p);
        p
    };
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();

    // TCP left to the device: the field holds the pseudo-header sum. Odd and chunk-crossing
    // lengths exercise the program's chunked sum.
    for len in [0usize, 1, 235, 236, 237, 1000] {
        let seed = pseudo_seed(src, dst, 6, 20 + len);
        let partial = tcp4(src, dst, &payload[..len], Some(seed));
        host.inject(0x0800, &partial).expect("send");
        let frame = next_tunnel_frame(&capture).expect("encapsulated");
        let got = inner_of(&frame);
        assert!(l4_checksum_ok(got), "TCP, {len} bytes: checksum completed");
        assert_eq!(
            got,
            &sent(&tcp4(src, dst, &payload[..len], None))[..],
            "TCP, {len} bytes"
        );
    }
    // UDP left to the device is completed; UDP without a checksum (0) stays so.
    let mut u = udp(40000, 7777, &payload[..333]);
    let seed = pseudo_seed(src, dst, 17, u.len());
    u[6..8].copy_from_slice(&seed.to_be_bytes());
    host.inject(0x0800, &ipv4(src, dst, 64, 17, &[], &u))
        .expect("send");
    let frame = next_tunnel_frame(&capture).expect("encapsulated");
    assert!(l4_checksum_ok(inner_of(&frame)), "UDP checksum completed");
    let no_csum = ipv4(src, dst, 64, 17, &[], &udp(40000, 7777, &payload[..333]));
    host.inject(0x0800, &no_csum).expect("send");
    let frame = next_tunnel_frame(&capture).expect("encapsulated");
    assert_eq!(
        inner_of(&frame),
        &sent(&no_csum)[..],
        "UDP without checksum"
    );
    // A finished checksum and a wrong one are passed as they are.
    let complete = tcp4(src, dst, &payload[..100], None);
    let wrong = tcp4(src, dst, &payload[..100], Some(0x1234));
    for p in [complete, wrong] {
        host.inject(0x0800, &p).expect("send");
        let frame = next_tunnel_frame(&capture).expect("encapsulated");
        assert_eq!(inner_of(&frame), &sent(&p)[..], "untouched");
    }
    let s = host.stats();
    assert_eq!(s.tx_packets, 10, "{s:?}");
    assert_eq!(s.drop_helper_error, 0, "{s:?}");
}

/// Opens a TCP connection attempt from this namespace to `dst` and returns the first
/// encapsulated frame carrying a TCP segment to it.
fn tcp_syn_frame(host: &Host, capture: &OwnedFd, dst: std::net::SocketAddr) -> Vec<u8> {
    let h = host.ns.enter(move || {
        std::thread::spawn(move || {
            let _ = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2));
        })
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let frame = next_tunnel_frame(capture).expect("an encapsulated SYN");
        let tcp_to_dst = frame.len() >= 42 + 40
            && frame[42 + 9] == 6
            && frame[42 + 22..42 + 24] == dst.port().to_be_bytes();
        if tcp_to_dst {
            let _ = h.join();
            return frame;
        }
        assert!(Instant::now() < deadline, "no TCP segment encapsulated");
    }
}

#[test]
fn the_stacks_offloaded_tcp_checksums_leave_complete_and_stay_right() {
    the_stacks_offloaded_tcp_checksums_leave_complete_and_stay_right_on(Flannel0::TunRead);
}

#[test]
fn the_stacks_offloaded_tcp_checksums_leave_complete_and_stay_right_over_an_ifb() {
    the_stacks_offloaded_tcp_checksums_leave_complete_and_stay_right_on(Flannel0::Ifb);
}

fn the_stacks_offloaded_tcp_checksums_leave_complete_and_stay_right_on(overlay: Flannel0) {
    require_object();
    let host = Host::alone_with(overlay);
    let mut dp = host.load();
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let capture = host.capture();
    let dst: std::net::SocketAddr = "10.244.2.7:80".parse().expect("addr");

    // The stack leaves TCP checksums to the device (CHECKSUM_PARTIAL); ext0 is a veth, which
    // would carry them on unfinished.
    let frame = tcp_syn_frame(&host, &capture, dst);
    assert!(
        l4_checksum_ok(inner_of(&frame)),
        "SYN checksum complete on the wire"
    );

    // A device that checksums in software finishes whatever is still marked partial: the
    // packet must not be (it would then compute over the finished sum and break it).
    host.ns
        .exec("ethtool", &["-K", "ext0", "tx", "off"])
        .expect("ethtool");
    let other_port: std::net::SocketAddr = "10.244.2.7:81".parse().expect("addr");
    let frame = tcp_syn_frame(&host, &capture, other_port);
    assert!(
        l4_checksum_ok(inner_of(&frame)),
        "SYN checksum right after software checksumming"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests: decapsulation verdicts (BPF_PROG_TEST_RUN on the external device's ingress program)

struct DecapCase {
    name: &'static str,
    frame: Vec<u8>,
    verdict: u32,
}

#[test]
fn decap_accepts_peers_and_strips_exactly_the_outer_headers() {
    decap_accepts_peers_and_strips_exactly_the_outer_headers_with(UdpDecap::Tc, Flannel0::TunRead);
}

/// A host with `overlay` as flannel0, the data plane loaded with `decap` and the peer set:
/// the loader must have chosen flannel0's kernel VXLAN receive exactly for a VXLAN flannel0.
fn decap_host(decap: UdpDecap, overlay: Flannel0) -> (Host, EbpfDataplane, DecapProg) {
    let host = Host::alone_with(overlay);
    let (mut dp, prog) = DecapProg::load(&host, decap);
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let cfg = pinned_config(&host);
    assert_eq!(
        cfg.flags & CONFIG_F_KERNEL_RX != 0,
        overlay == Flannel0::Vxlan,
        "kernel rx flag with {overlay:?}: {cfg:?}"
    );
    (host, dp, prog)
}

fn decap_accepts_peers_and_strips_exactly_the_outer_headers_with(
    decap: UdpDecap,
    overlay: Flannel0,
) {
    require_object();
    let (host, _dp, prog) = decap_host(decap, overlay);
    // The outer UDP checksum left to the device: decap resets the checksum state by cutting a
    // few inner bytes too and putting them back.
    let mut cases = accepted_from_peer();
    // Outer header with options (IHL 6): honoured, not mistaken for the UDP header (XDP
    // passes it on to TC untouched, see below).
    let plain = from_peer_pod();
    let with_options = from_peer_with_outer_options(&plain);
    if prog.xdp {
        let (verdict, out) = prog.run(&host, &with_options);
        assert_eq!(
            (verdict, &out),
            (XDP_PASS, &with_options),
            "options go on to TC"
        );
        let tc = decap_program(&host.pin_dir, false);
        let (verdict, out) = host.run_on_ext0(&tc, &with_options);
        assert_eq!(verdict, TC_ACT_REDIRECT, "TC decapsulates what XDP left it");
        assert_eq!(&out[14..], &plain[..], "inner packet intact");
    } else {
        cases.push(("outer options", with_options, plain.clone()));
    }
    for (name, frame, inner) in &cases {
        let (verdict, out) = prog.run(&host, frame);
        prog.assert_delivered(name, verdict, &out, frame, inner);
    }
    let s = host.stats();
    let mut bytes: usize = cases.iter().map(|(_, _, inner)| inner.len()).sum();
    if prog.xdp {
        bytes += plain.len();
    }
    assert_eq!((s.rx_packets, s.rx_bytes), (4, bytes as u64), "{s:?}");
    assert_eq!(s.drops(), 0, "{s:?}");
}

#[test]
fn decap_passes_what_is_not_ours_untouched() {
    decap_passes_what_is_not_ours_untouched_with(UdpDecap::Tc, Flannel0::TunRead);
}

fn decap_passes_what_is_not_ours_untouched_with(decap: UdpDecap, overlay: Flannel0) {
    require_object();
    let (host, _dp, prog) = decap_host(decap, overlay);
    let plain = from_peer_pod();

    let arp = arp_request(SRC_MAC, PEER_IP, OUR_IP);
    let v6 = ipv6(V6_ANY, V6_ANY, 17, 64, &udp(PORT, PORT, b""));
    let tcp_to_us = ether(0x0800, &ipv4(PEER_IP, OUR_IP, 64, 6, &[], &[0u8; 20]));
    let mut non_first_fragment = ipv4(PEER_IP, OUR_IP, 64, 17, &[], &[0u8; 64]);
    set_frag(&mut non_first_fragment, 0x0010);
    // Our IP and UDP, but the UDP header is cut off: the port is unknown, the stack drops it.
    let mut cut = from_peer(&plain);
    cut.truncate(14 + 20 + 4);
    let cases = [
        DecapCase {
            name: "ARP",
            frame: ether(ETH_P_ARP, &arp),
            verdict: prog.pass(),
        },
        DecapCase {
            name: "IPv6",
            frame: ether(ETH_P_IPV6, &v6),
            verdict: prog.pass(),
        },
        DecapCase {
            name: "other UDP port",
            frame: tunnelled(PEER_IP, OUR_IP, 8472, &plain),
            verdict: prog.pass(),
        },
        DecapCase {
            name: "our port, another destination IP",
            frame: tunnelled(PEER_IP, a("192.0.2.50"), PORT, &plain),
            verdict: prog.pass(),
        },
        DecapCase {
            name: "TCP",
            frame: tcp_to_us,
            verdict: prog.pass(),
        },
        DecapCase {
            name: "non-first fragment",
            frame: ether(0x0800, &non_first_fragment),
            verdict: prog.pass(),
        },
        DecapCase {
            name: "UDP header cut off",
            frame: cut,
            verdict: prog.pass(),
        },
    ];
    for case in cases {
        let (verdict, out) = prog.run(&host, &case.frame);
        assert_eq!(verdict, case.verdict, "{}", case.name);
        assert_eq!(out, case.frame, "{}: passed untouched", case.name);
    }
    assert_eq!(host.stats(), Stats::default(), "nothing counted");
}

#[test]
fn decap_drops_and_counts_by_reason() {
    decap_drops_and_counts_by_reason_with(UdpDecap::Tc, Flannel0::TunRead);
}

fn decap_drops_and_counts_by_reason_with(decap: UdpDecap, overlay: Flannel0) {
    require_object();
    let (host, mut dp, prog) = decap_host(decap, overlay);
    dp.set_peer(net(OTHER_PEER_SUBNET), OTHER_PEER_IP)
        .expect("set peer");
    let plain = from_peer_pod();

    // Outer first fragment (MF set): would need reassembly.
    let mut first_fragment = ipv4(PEER_IP, OUR_IP, 64, 17, &[], &udp(PORT, PORT, &plain));
    set_frag(&mut first_fragment, IP_MF);
    // Inner packet shorter than its header claims.
    let mut short_inner = plain.clone();
    short_inner.truncate(plain.len() - 4);
    // Outer total length beyond the frame.
    let mut long_outer = from_peer(&plain);
    let outer_ip = &mut long_outer[ETH_HLEN..];
    let at = ipv4_off::TOT_LEN;
    let total = u16::from_be_bytes([outer_ip[at], outer_ip[at + 1]]) + 10;
    outer_ip[at..at + 2].copy_from_slice(&total.to_be_bytes());
    refresh_ipv4_checksum(outer_ip);
    // Not an IPv4 inner packet.
    let mut not_v4_inner = plain.clone();
    not_v4_inner[0] = 0x65;

    let malformed = [
        ether(0x0800, &first_fragment),
        from_peer(&short_inner),
        long_outer,
        from_peer(&not_v4_inner),
    ];
    for frame in &malformed {
        assert_eq!(prog.run(&host, frame).0, prog.drop());
    }
    // A stranger, even one sending from an inner address of a real peer.
    let unknown = tunnelled(STRANGER_IP, OUR_IP, PORT, &plain);
    assert_eq!(prog.run(&host, &unknown).0, prog.drop());
    // A peer sending an inner source from another peer's subnet, and from outside the network.
    let spoof1 = tunnelled(OTHER_PEER_IP, OUR_IP, PORT, &from_peer_pod());
    let spoof2 = from_peer(&inner(a("8.8.8.8"), a("10.244.1.5")));
    assert_eq!(prog.run(&host, &spoof1).0, prog.drop());
    assert_eq!(prog.run(&host, &spoof2).0, prog.drop());

    // A wrong outer header checksum, in the base header and in an option.
    let mut bad_csum = from_peer(&plain);
    bad_csum[14 + 10] ^= 0x40;
    let mut bad_option = from_peer_with_outer_options(&plain);
    bad_option[ETH_HLEN + 21] = 7;
    assert_eq!(prog.run(&host, &bad_csum).0, prog.drop());
    // XDP leaves outer options to TC (it cannot read behind them without packet pointers at
    // a variable offset), which drops it there.
    let (verdict, out) = prog.run(&host, &bad_option);
    if prog.xdp {
        assert_eq!(
            (verdict, &out),
            (XDP_PASS, &bad_option),
            "options go on to TC"
        );
    } else {
        assert_eq!(verdict, prog.drop());
    }
    let bad_csums = if prog.xdp { 1 } else { 2 };
    // A frame for another MAC (flooded by a switch, seen in promiscuous mode).
    let mut other_host = from_peer(&plain);
    other_host[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    assert_eq!(prog.run(&host, &other_host).0, prog.drop());

    let s = host.stats();
    assert_eq!(s.drop_malformed, malformed.len() as u64, "{s:?}");
    assert_eq!(s.drop_unknown_sender, 1, "{s:?}");
    assert_eq!(s.drop_spoofed_source, 2, "{s:?}");
    assert_eq!(s.drop_bad_ip_checksum, bad_csums, "{s:?}");
    assert_eq!(s.drop_other_host, 1, "{s:?}");
    assert_eq!(s.rx_packets, 0, "{s:?}");

    // Once the peer is gone, its packets come from a stranger.
    dp.remove_peer(net(PEER_SUBNET)).expect("remove peer");
    let ok_before = from_peer(&plain);
    assert_eq!(prog.run(&host, &ok_before).0, prog.drop());
    assert_eq!(host.stats().drop_unknown_sender, 2);
}

/// One of the two decap programs, run on frames as received by `ext0`.
struct DecapProg {
    prog: PinnedProgram,
    xdp: bool,
    /// XDP decap's mark (the source MAC of what it decapsulated), from the pinned config.
    mark: [u8; 6],
}

impl DecapProg {
    /// Loads the data plane with `decap` and opens its decap program.
    fn load(host: &Host, decap: UdpDecap) -> (EbpfDataplane, DecapProg) {
        let dp = host.load_with(decap);
        let xdp = decap == UdpDecap::Xdp;
        let prog = decap_program(&host.pin_dir, xdp);
        let mark = pinned_config(host).xdp_mark;
        (dp, DecapProg { prog, xdp, mark })
    }

    fn run(&self, host: &Host, frame: &[u8]) -> (u32, Vec<u8>) {
        host.run_on_ext0(&self.prog, frame)
    }

    /// "Not ours": the next TCX program / the stack.
    fn pass(&self) -> u32 {
        if self.xdp {
            XDP_PASS
        } else {
            TCX_NEXT
        }
    }

    fn drop(&self) -> u32 {
        if self.xdp {
            XDP_DROP
        } else {
            TC_ACT_SHOT
        }
    }

    /// Checks what a delivered frame looks like: TC redirects Ethernet + inner packet to
    /// flannel0; XDP passes the same to the stack, marked by its source MAC for TC.
    fn assert_delivered(&self, name: &str, verdict: u32, out: &[u8], frame: &[u8], inner: &[u8]) {
        if self.xdp {
            assert_eq!(verdict, XDP_PASS, "{name}: passed on to GRO and TC");
            assert_eq!(&out[..6], &frame[..6], "{name}: destination MAC kept");
            assert_eq!(&out[6..12], &self.mark, "{name}: marked for TC");
        } else {
            assert_eq!(verdict, TC_ACT_REDIRECT, "{name}: delivered to flannel0");
            assert_eq!(&out[..12], &frame[..12], "{name}: Ethernet addresses kept");
        }
        assert_eq!(&out[12..14], &[0x08, 0x00], "{name}: IPv4 ethertype");
        assert_eq!(&out[14..], inner, "{name}: inner packet intact");
    }
}

#[test]
fn xdp_decap_accepts_peers_and_strips_exactly_the_outer_headers() {
    decap_accepts_peers_and_strips_exactly_the_outer_headers_with(UdpDecap::Xdp, Flannel0::TunRead);
}

#[test]
fn xdp_decap_passes_what_is_not_ours_untouched() {
    decap_passes_what_is_not_ours_untouched_with(UdpDecap::Xdp, Flannel0::TunRead);
}

#[test]
fn xdp_decap_drops_and_counts_by_reason() {
    decap_drops_and_counts_by_reason_with(UdpDecap::Xdp, Flannel0::TunRead);
}

/// XDP decap marks what it decapsulated by the frame's source MAC (no XDP metadata: some
/// kernels and most NIC drivers refuse it). The mark must be unforgeable from the wire: XDP
/// drops every frame that arrives already carrying it, and TC honours it only while XDP decap
/// is on (the config flag), delivering such frames without a second check.
#[test]
fn xdp_decap_mark_is_honoured_by_tc_and_dropped_when_it_comes_from_the_wire() {
    require_object();
    let (host, _dp, xdp) = decap_host(UdpDecap::Xdp, Flannel0::TunRead);
    let cfg = pinned_config(&host);
    assert_ne!(cfg.flags & CONFIG_F_XDP_DECAP, 0, "XDP decap flag: {cfg:?}");
    let mark = cfg.xdp_mark;
    assert!(
        mark != [0; 6] && mark[0] & 0x03 == 0x02,
        "a locally administered unicast mark: {mark:02x?}"
    );
    let ext0_mac = {
        let frame = from_peer(&from_peer_pod());
        let mut m = [0u8; 6];
        m.copy_from_slice(&frame[..6]);
        m
    };
    let plain = from_peer_pod();
    let forged = [
        // A decapsulated-looking frame, straight from the wire.
        ether_between(ext0_mac, mark, ETH_P_IP, &plain),
        // A real tunnel frame from a peer, but with the mark as its source.
        {
            let mut f = from_peer(&plain);
            f[6..12].copy_from_slice(&mark);
            f
        },
    ];
    for frame in &forged {
        let (verdict, _) = xdp.run(&host, frame);
        assert_eq!(
            verdict, XDP_DROP,
            "a frame posing as XDP decap's: {frame:02x?}"
        );
    }
    let s = host.stats();
    assert_eq!(s.drop_unverified, 2, "{s:?}");
    assert_eq!(s.rx_packets, 0, "{s:?}");

    // What XDP passes on (after GRO) reaches TC decap, which hands it to flannel0 as it is.
    let (verdict, out) = xdp.run(&host, &from_peer(&plain));
    xdp.assert_delivered("plain", verdict, &out, &from_peer(&plain), &plain);
    let tc = decap_program(&host.pin_dir, false);
    let (verdict, handed) = host.run_on_ext0(&tc, &out);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "TC delivers XDP's frame to flannel0"
    );
    assert_eq!(&handed[14..], &plain[..], "inner packet intact");
    let s = host.stats();
    assert_eq!(
        (s.rx_packets, s.drops()),
        (1, 2),
        "counted once, by XDP: {s:?}"
    );

    // The same frame with another source MAC is just an overlay packet on the wire: not ours.
    let mut unmarked = out.clone();
    unmarked[6..12].copy_from_slice(&SRC_MAC);
    assert_eq!(host.run_on_ext0(&tc, &unmarked).0, TCX_NEXT);
}

/// With decap on TC there is no XDP to vouch for a mark: TC ignores it (the flag is clear),
/// so a frame carrying the old mark is not delivered unchecked.
#[test]
fn tc_decap_ignores_the_mark_when_xdp_decap_is_off() {
    require_object();
    let host = Host::alone_with(Flannel0::TunRead);
    // XDP first (sets the mark), then TC only: the pinned mark stays, the flag goes.
    let (dp, _) = DecapProg::load(&host, UdpDecap::Xdp);
    drop(dp);
    let (mut dp, tc) = DecapProg::load(&host, UdpDecap::Tc);
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let cfg = pinned_config(&host);
    assert_eq!(cfg.flags & CONFIG_F_XDP_DECAP, 0, "{cfg:?}");
    assert_eq!(cfg.xdp_mark, tc.mark, "the mark is kept across loads");
    let frame = ether_between([0x02, 0, 0, 0, 0, 1], tc.mark, ETH_P_IP, &from_peer_pod());
    assert_eq!(tc.run(&host, &frame).0, TCX_NEXT, "not delivered unchecked");
    assert_eq!(host.stats().rx_packets, 0);
}

// ---------------------------------------------------------------------------------------------
// Tests: decap into flannel0's kernel VXLAN receive (CONFIG_F_KERNEL_RX) and flannel0's guard

/// Source MAC of the Ethernet header decap puts in front of the inner packet.
const KERNEL_RX_SRC_MAC: [u8; 6] = [0x02, 0x66, 0x6c, 0x00, 0x00, 0x01];

/// The config entry the loader wrote (the pinned `flannel_config`).
fn pinned_config(host: &Host) -> Config {
    ebpf_host::pinned_config(&host.pin_dir)
}

/// What flannel0's VXLAN receive must get for `inner` sent by PEER_IP as `tunnelled` frames
/// it: the same outer Ethernet, IPv4 (ID, DF, TTL) and ports, lengths 22 bytes longer, no UDP
/// checksum, VXLAN VNI 1, an Ethernet header to flannel0, `inner` unchanged.
fn kernel_rx_frame(inner: &[u8]) -> Vec<u8> {
    from_peer(&vxlan(
        1,
        &ether_between(OVERLAY_MAC, KERNEL_RX_SRC_MAC, ETH_P_IP, inner),
    ))
}

#[test]
fn kernel_rx_decap_rewrites_accepted_packets_into_vxlan_byte_exact() {
    require_object();
    let (host, _dp, prog) = decap_host(UdpDecap::Tc, Flannel0::Vxlan);
    // With the outer UDP checksum left to the device, VXLAN gets none.
    let mut cases = accepted_from_peer();
    let big = ipv4(
        a("10.244.2.7"),
        a("10.244.1.5"),
        64,
        PROTO_UDP,
        &[],
        &udp(40000, 7777, &[0x5a; 1400]),
    );
    cases.push(("1428-byte inner", from_peer(&big), big));
    for (name, frame, inner) in &cases {
        let (verdict, out) = prog.run(&host, frame);
        assert_eq!(verdict, TC_ACT_OK, "{name}: to the stack as VXLAN");
        assert_eq!(out, kernel_rx_frame(inner), "{name}");
        assert_eq!(checksum(&out[ETH_HLEN..ETH_HLEN + IPV4_HLEN]), 0, "{name}");
    }
    let s = host.stats();
    let bytes: usize = cases.iter().map(|(_, _, inner)| inner.len()).sum();
    assert_eq!((s.rx_packets, s.rx_bytes), (4, bytes as u64), "{s:?}");
    assert_eq!(s.drops(), 0, "{s:?}");
}

/// With a VXLAN flannel0, XDP decap still strips before GRO (faster than the VXLAN form and
/// the kernel's VXLAN GRO, measured on the nic underlay); TC then redirects to flannel0.
#[test]
fn kernel_rx_xdp_decap_still_strips_exactly_the_outer_headers() {
    decap_accepts_peers_and_strips_exactly_the_outer_headers_with(UdpDecap::Xdp, Flannel0::Vxlan);
}

#[test]
fn kernel_rx_xdp_decap_passes_what_is_not_ours_untouched() {
    decap_passes_what_is_not_ours_untouched_with(UdpDecap::Xdp, Flannel0::Vxlan);
}

#[test]
fn kernel_rx_xdp_decap_drops_and_counts_by_reason() {
    decap_drops_and_counts_by_reason_with(UdpDecap::Xdp, Flannel0::Vxlan);
}

#[test]
fn kernel_rx_decap_delivers_outer_headers_with_options_directly() {
    require_object();
    let (host, _dp, prog) = decap_host(UdpDecap::Tc, Flannel0::Vxlan);
    let plain = from_peer_pod();
    let frame = from_peer_with_outer_options(&plain);
    let (verdict, out) = prog.run(&host, &frame);
    // Stripped and redirected to flannel0, addressed to its MAC (it is Ethernet).
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, ether_between(OVERLAY_MAC, SRC_MAC, ETH_P_IP, &plain));
    let s = host.stats();
    assert_eq!((s.rx_packets, s.drops()), (1, 0), "{s:?}");
}

#[test]
fn kernel_rx_decap_passes_what_is_not_ours_untouched() {
    decap_passes_what_is_not_ours_untouched_with(UdpDecap::Tc, Flannel0::Vxlan);
}

#[test]
fn kernel_rx_decap_drops_and_counts_by_reason() {
    decap_drops_and_counts_by_reason_with(UdpDecap::Tc, Flannel0::Vxlan);
}

#[test]
fn overlay_in_drops_and_counts_what_decap_did_not_hand_on() {
    require_object();
    let (host, _dp, _) = decap_host(UdpDecap::Tc, Flannel0::Vxlan);
    let guard = PinnedProgram::tc(&host.pin_dir.join("flannel_overlay_in"));
    let flannel0 = host.ns.ifindex("flannel0").expect("device");
    // What flannel0's VXLAN receive hands on from datagrams sent to the port past decap (a
    // test run cannot carry decap's token: the kernel takes no tc_index in ctx_in): a pod
    // posing as a peer's pod, and other traffic.
    let spoofed = from_peer_pod();
    let frames = [
        ether_between(OVERLAY_MAC, SRC_MAC, ETH_P_IP, &spoofed),
        ether_between(
            OVERLAY_MAC,
            SRC_MAC,
            ETH_P_ARP,
            &arp_request(SRC_MAC, a("10.244.2.7"), a("10.244.1.0")),
        ),
        ether_between(
            OVERLAY_MAC,
            SRC_MAC,
            ETH_P_IPV6,
            &ipv6(V6_ANY, V6_ANY, 17, 64, &udp(1, 2, b"")),
        ),
    ];
    for frame in &frames {
        let (guard, frame) = (guard.clone(), frame.clone());
        let (verdict, _) = host.ns.enter(move || guard.run(&frame, flannel0));
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    let s = host.stats();
    assert_eq!(s.drop_unverified, frames.len() as u64, "{s:?}");
    assert_eq!((s.drops(), s.rx_packets), (frames.len() as u64, 0), "{s:?}");
}

// ---------------------------------------------------------------------------------------------
// Tests: real traffic between two namespaces

/// Polls `f` until it returns Some or the deadline passes.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends a datagram from `a`'s overlay address to `b`'s and the answer back; true when both
/// arrive intact within `timeout` each.
fn round_trip(a: &Host, b: &Host, timeout: Duration) -> bool {
    let (a_addr, b_addr) = (a.subnet.network(), b.subnet.network());
    let server =
        b.ns.enter(move || UdpSocket::bind((b_addr, 0)).expect("bind on b"));
    let client =
        a.ns.enter(move || UdpSocket::bind((a_addr, 0)).expect("bind on a"));
    let server_addr = server.local_addr().expect("addr");
    for s in [&server, &client] {
        s.set_read_timeout(Some(timeout)).expect("timeout");
    }
    if client
        .send_to(b"ping through the tunnel", server_addr)
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    let Ok((n, from)) = server.recv_from(&mut buf) else {
        return false;
    };
    // The source is a's overlay address: the packet entered b through flannel0 unchanged.
    assert_eq!(&buf[..n], b"ping through the tunnel");
    assert_eq!(from.ip(), std::net::IpAddr::V4(a_addr));
    if server.send_to(b"pong", from).is_err() {
        return false;
    }
    matches!(client.recv_from(&mut buf), Ok((4, _))) && &buf[..4] == b"pong"
}

/// Waits until a first datagram makes it from `a` to `b` and back (it may wait for ARP on
/// the underlay).
fn wait_for_a_first_round_trip(a: &Host, b: &Host) {
    wait_for("a first round trip", Duration::from_secs(10), || {
        round_trip(a, b, Duration::from_millis(500)).then_some(())
    });
}

/// Two hosts joined by a veth, the data plane loaded on each with the other as its peer, and
/// traffic through the tunnel.
fn tunnel_between_two_hosts(overlay: Flannel0) -> (Host, Host, EbpfDataplane, EbpfDataplane) {
    let (a_host, b_host) = two_hosts(overlay);
    let mut dpa = a_host.load();
    let mut dpb = b_host.load();
    dpa.set_peer(b_host.subnet, b_host.ip).expect("peer");
    dpb.set_peer(a_host.subnet, a_host.ip).expect("peer");
    wait_for_a_first_round_trip(&a_host, &b_host);
    (a_host, b_host, dpa, dpb)
}

#[test]
fn traffic_crosses_the_tunnel_with_strict_rp_filter() {
    traffic_crosses_the_tunnel_with_strict_rp_filter_on(Flannel0::TunRead);
}

#[test]
fn traffic_crosses_the_tunnel_with_strict_rp_filter_over_an_ifb() {
    traffic_crosses_the_tunnel_with_strict_rp_filter_on(Flannel0::Ifb);
}

/// Decap hands packets to flannel0's VXLAN receive, and flannel0's guard lets them in.
#[test]
fn traffic_crosses_the_tunnel_with_strict_rp_filter_over_kernel_vxlan() {
    traffic_crosses_the_tunnel_with_strict_rp_filter_on(Flannel0::Vxlan);
}

fn traffic_crosses_the_tunnel_with_strict_rp_filter_on(overlay: Flannel0) {
    require_object();
    let (a_host, b_host) = two_hosts(overlay);
    for h in [&a_host, &b_host] {
        for dev in ["all", "default", "ext0", "flannel0"] {
            h.ns.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "1")
                .expect("sysctl");
        }
    }
    let mut dpa = a_host.load();
    let mut dpb = b_host.load();
    dpa.sync_peers(&BTreeMap::from([(b_host.subnet, b_host.ip)]))
        .expect("peers of a");
    dpb.sync_peers(&BTreeMap::from([(a_host.subnet, a_host.ip)]))
        .expect("peers of b");

    // The first datagram may wait for ARP on the underlay; then every one must pass.
    wait_for_a_first_round_trip(&a_host, &b_host);
    for _ in 0..5 {
        assert!(round_trip(&a_host, &b_host, Duration::from_secs(2)));
    }

    let sa = a_host.stats();
    let sb = b_host.stats();
    assert!(sa.tx_packets >= 6 && sa.rx_packets >= 6, "a: {sa:?}");
    assert!(sb.tx_packets >= 6 && sb.rx_packets >= 6, "b: {sb:?}");
    for s in [sa, sb] {
        assert_eq!(
            s.drop_helper_error
                + s.drop_malformed
                + s.drop_unknown_sender
                + s.drop_spoofed_source
                + s.drop_unverified,
            0,
            "{s:?}"
        );
    }
}

#[test]
fn reload_adopts_pinned_state_and_unload_removes_it() {
    require_object();
    // Persistent TUNs without a reader, as the agent creates them.
    let (a_host, b_host, dpa, _dpb) = tunnel_between_two_hosts(Flannel0::Tun);

    // The agent exits: everything stays in the kernel and traffic still flows.
    drop(dpa);
    assert!(
        round_trip(&a_host, &b_host, Duration::from_secs(2)),
        "traffic with no agent running"
    );

    // A new agent adopts the pinned maps (the peer is still there) and replaces the programs.
    let dpa = a_host.load();
    assert_eq!(
        dpa.peers().get(&b_host.subnet),
        Some(&b_host.ip),
        "peer adopted from the pinned map"
    );
    assert!(
        round_trip(&a_host, &b_host, Duration::from_secs(2)),
        "traffic after the reload"
    );
    // Exactly one program on each hook: the old ones were replaced, not stacked.
    for (ifname, direction, prog) in [
        ("flannel0", "egress", "flannel_encap"),
        ("ext0", "ingress", "flannel_decap"),
    ] {
        let names = tc::attached_programs(&a_host.ns, ifname, direction).expect("programs");
        assert_eq!(names, vec![prog.to_string()], "{ifname} {direction}");
    }

    // Uninstall: no pins left, nothing attached, and the tunnel is gone.
    drop(dpa);
    let pin_dir = a_host.pin_dir.clone();
    a_host
        .ns
        .enter(move || EbpfDataplane::unload(&pin_dir))
        .expect("unload");
    assert!(!a_host.pin_dir.exists(), "pin dir removed");
    let attached = tc::attached_programs(&a_host.ns, "flannel0", "egress").expect("programs");
    assert!(attached.is_empty(), "encap detached: {attached:?}");
    assert!(
        !round_trip(&a_host, &b_host, Duration::from_millis(300)),
        "no tunnel after unload"
    );
    let pin_dir = a_host.pin_dir.clone();
    a_host
        .ns
        .enter(move || EbpfDataplane::unload(&pin_dir))
        .expect("unload twice is fine");
}

#[test]
fn decap_leaves_a_checksum_state_nat_can_update() {
    decap_leaves_a_checksum_state_nat_can_update_on(Flannel0::Tun);
}

#[test]
fn decap_leaves_a_checksum_state_nat_can_update_over_an_ifb() {
    decap_leaves_a_checksum_state_nat_can_update_on(Flannel0::Ifb);
}

fn decap_leaves_a_checksum_state_nat_can_update_on(overlay: Flannel0) {
    require_object();
    // b is a plain upstream-style sender: a UDP socket on the underlay, whose kernel leaves the
    // outer UDP checksum to the veth (CHECKSUM_PARTIAL arrives at a).
    let (a_host, b_host) = two_hosts(overlay);
    let mut dpa = a_host.load();
    dpa.set_peer(b_host.subnet, b_host.ip).expect("peer");
    // NAT on the decapsulated packet: port 7777 is redirected to 7778.
    a_host
        .ns
        .exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "flannel0",
                "-p",
                "udp",
                "--dport",
                "7777",
                "-j",
                "REDIRECT",
                "--to-ports",
                "7778",
            ],
        )
        .expect("iptables");
    let a_overlay = a_host.subnet.network();
    let receiver = a_host.ns.enter(move || {
        let s = UdpSocket::bind((a_overlay, 7778)).expect("bind on a");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        s
    });
    // A complete inner UDP packet, as upstream's proxy sends it.
    let src = a("10.244.2.7");
    let mut u = udp(40000, 7777, b"through NAT");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&a_overlay.octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(u.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&u);
    let c = checksum(&pseudo);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    let inner_packet = ipv4(src, a_overlay, 64, 17, &[], &u);
    let (b_ip, a_ip) = (b_host.ip, a_host.ip);
    let sender = b_host.ns.enter(move || {
        let s = UdpSocket::bind((b_ip, PORT)).expect("bind on b");
        s.connect((a_ip, PORT)).expect("connect");
        s
    });
    // The first datagrams may wait for ARP on the underlay.
    let got = wait_for("the datagram through NAT", Duration::from_secs(10), || {
        sender.send(&inner_packet).expect("send");
        let mut buf = [0u8; 64];
        receiver.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    });
    assert_eq!(got, b"through NAT");
    let s = a_host.stats();
    assert!(s.rx_packets >= 1, "{s:?}");
}

#[test]
fn bulk_tcp_keeps_gso_super_packets_whole_and_data_intact() {
    bulk_tcp_keeps_gso_super_packets_whole_and_data_intact_on(Flannel0::Tun);
}

#[test]
fn bulk_tcp_keeps_gso_super_packets_whole_and_data_intact_over_an_ifb() {
    bulk_tcp_keeps_gso_super_packets_whole_and_data_intact_on(Flannel0::Ifb);
}

#[test]
fn bulk_tcp_keeps_gso_super_packets_whole_and_data_intact_over_kernel_vxlan() {
    bulk_tcp_keeps_gso_super_packets_whole_and_data_intact_on(Flannel0::Vxlan);
}

fn bulk_tcp_keeps_gso_super_packets_whole_and_data_intact_on(overlay: Flannel0) {
    require_object();
    let (a_host, b_host, _dpa, _dpb) = tunnel_between_two_hosts(overlay);

    const LEN: usize = 16 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 4093) as u8).collect();
    let b_addr = b_host.subnet.network();
    let a_addr = a_host.subnet.network();
    let listener = b_host
        .ns
        .enter(move || std::net::TcpListener::bind((b_addr, 0)).expect("listen on b"));
    let server_addr = listener.local_addr().expect("addr");
    let receiver = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut got = Vec::with_capacity(LEN);
        std::io::Read::read_to_end(&mut conn, &mut got).expect("read");
        got
    });
    let to_send = data.clone();
    a_host.ns.enter(move || {
        let mut sock = connect_from(a_addr, server_addr);
        std::io::Write::write_all(&mut sock, &to_send).expect("write");
    });
    let got = receiver.join().expect("receiver");
    assert!(
        got == data,
        "received {} bytes, content differs or short",
        got.len()
    );

    let s = a_host.stats();
    // 16 MiB in 1420-byte segments would be ~11800 packets; super-packets are far fewer.
    assert!(
        s.tx_bytes >= LEN as u64 && s.tx_packets < 11800 / 2,
        "GSO super-packets expected: {s:?}"
    );
    let sb = b_host.stats();
    assert_eq!((sb.drop_malformed, sb.drop_unverified), (0, 0), "{sb:?}");
}

/// A TCP connection from `src` (port chosen by the kernel) to `dst`.
fn connect_from(src: Ipv4Addr, dst: std::net::SocketAddr) -> std::net::TcpStream {
    // SAFETY: plain socket(2)/bind(2)/connect(2) calls on a fresh fd with valid addresses.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let mut sin: libc::sockaddr_in = std::mem::zeroed();
        sin.sin_family = libc::AF_INET as u16;
        sin.sin_addr.s_addr = u32::from_ne_bytes(src.octets());
        let rc = libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        let std::net::SocketAddr::V4(dst) = dst else {
            panic!("IPv4 only");
        };
        sin.sin_addr.s_addr = u32::from_ne_bytes(dst.ip().octets());
        sin.sin_port = dst.port().to_be();
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "connect: {}", io::Error::last_os_error());
        stream
    }
}

#[test]
fn bpftool_dumps_the_pinned_maps_with_field_names() {
    require_object();
    let host = Host::alone();
    let mut dp = host.load();
    dp.set_peer(net(PEER_SUBNET), PEER_IP).expect("set peer");
    let dump = |map: &str| {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(host.pin_dir.join(map))
            .output()
            .expect("bpftool (apt-get install bpftool)");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).replace([' ', '\n'], "")
    };
    let peers = dump("flannel_peers");
    assert!(
        peers.contains(r#""subnet":[10,244,2,0]"#) && peers.contains(r#""public_ip":[192,0,2,2]"#),
        "{peers}"
    );
    let senders = dump("flannel_senders");
    assert!(senders.contains(r#""subnets":1"#), "{senders}");
    // A second subnet of the same peer, then gone again: the sender entry counts them.
    dp.set_peer(net("10.244.4.0/24"), PEER_IP)
        .expect("set peer");
    let senders = dump("flannel_senders");
    assert!(senders.contains(r#""subnets":2"#), "{senders}");
    dp.remove_peer(net("10.244.4.0/24")).expect("remove peer");
    let senders = dump("flannel_senders");
    assert!(senders.contains(r#""subnets":1"#), "{senders}");
    // A subnet of another length than the network's subnets is refused.
    assert!(dp.set_peer(net("10.244.8.0/23"), PEER_IP).is_err());
    let config = dump("flannel_config");
    assert!(
        config.contains(r#""public_ip":[192,0,2,1]"#) && config.contains(r#""port":8285"#),
        "{config}"
    );
    let stats = dump("flannel_stats");
    assert!(
        stats.contains(r#""tx_packets":0"#) && stats.contains(r#""drop_spoofed_source":0"#),
        "{stats}"
    );
}
