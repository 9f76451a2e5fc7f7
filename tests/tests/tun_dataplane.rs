//! The udp backend's user-space TUN data plane between two hosts, driven through the library API.
//!
//! Two hosts of the overlay harness, without flanneld: subnet.env written by hand (10.244.1.0/24
//! on host 1, 10.244.2.0/24 on host 2), a container on each attached to `cni0` by the real CNI
//! plugins, `eth0` on the underlay (192.0.2.10 and .11). The overlay device and `TunDataplane`
//! are set up from a thread that entered the host namespace; sockets and TUN queues stay bound
//! to it afterwards.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flannel_agent::backend::udp::device::{
    setup_overlay_device, OverlayDevice, OverlayDeviceConfig, OverlayKind,
};
use flannel_agent::backend::udp::ebpf::{EbpfDataplane, EbpfOptions};
use flannel_agent::backend::udp::tun::TunDataplane;
use flannel_agent::backend::udp::{DataplaneStats, UdpDataplane};
use flannel_tests::{tcp_transfer, Container, Netns, Overlay, SubnetEnv};
use ipnetwork::Ipv4Network;

const PORT: u16 = 8285;
const UNDERLAY_MTU: u32 = 1500;
const OVERLAY_MTU: u32 = UNDERLAY_MTU - 28;

fn subnet(i: u8) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 244, i, 0), 24).expect("valid subnet")
}

fn network() -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 244, 0, 0), 16).expect("valid network")
}

/// Two hosts (1 and 2) with one container each; the data plane is the test's.
struct Topology {
    o: Overlay,
}

impl Topology {
    fn new() -> Result<Self> {
        let envs = [1u8, 2]
            .iter()
            .map(|&i| SubnetEnv {
                network: network().to_string(),
                subnet: format!("10.244.{i}.1/24"),
                mtu: OVERLAY_MTU,
                ipmasq: true,
            })
            .collect();
        let o = Overlay::hand_made(envs)
            .before_agents(|cluster| {
                for h in &cluster.hosts {
                    // No IPv6 chatter (router solicitations, MLD) on flannel0: drop counters
                    // stay exact.
                    h.ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
                    h.ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
                }
                Ok(())
            })
            .start()?;
        Ok(Topology { o })
    }

    fn host(&self, i: u8) -> &Netns {
        &self.o.cluster.hosts[usize::from(i - 1)].ns
    }

    fn underlay_ip(&self, i: u8) -> Ipv4Addr {
        self.o.cluster.hosts[usize::from(i - 1)].ip
    }

    fn container(&self, i: u8) -> &Container {
        self.o.container(usize::from(i - 1))
    }

    fn container_ip(&self, i: u8) -> Ipv4Addr {
        self.container(i).ip
    }

    fn ethtool(&self, i: u8, args: &[&str]) -> Result<()> {
        self.host(i)
            .exec("ethtool", &[&["-K", "eth0"][..], args].concat())
            .map(|_| ())
    }

    /// Sets up flannel0 on host `i` and starts the TUN data plane there, with host `peer` known.
    fn start_dataplane(&self, i: u8, peer: u8, vnet_hdr: bool) -> Result<TunDataplane> {
        let cfg = OverlayDeviceConfig {
            name: "flannel0".into(),
            kind: OverlayKind::Tun,
            own_subnet: subnet(i),
            network: network(),
            mtu: OVERLAY_MTU,
            persistent: false,
            queues: 1,
            vnet_hdr,
        };
        let (own_ip, peer_ip) = (self.underlay_ip(i), self.underlay_ip(peer));
        self.host(i).run_in(move || {
            let dev = setup_device(&cfg)?;
            let mut dp = TunDataplane::start(dev, own_ip, PORT)?;
            dp.set_peer(subnet(peer), peer_ip)?;
            Ok(dp)
        })?
    }

    /// flannel0 (persistent, never read) and the eBPF data plane on host `i`, pinned in
    /// `pin_dir`, with host `peer` known.
    fn start_ebpf_dataplane(
        &self,
        i: u8,
        peer: u8,
        pin_dir: std::path::PathBuf,
    ) -> Result<EbpfDataplane> {
        let cfg = OverlayDeviceConfig {
            name: "flannel0".into(),
            kind: OverlayKind::Ifb,
            own_subnet: subnet(i),
            network: network(),
            mtu: OVERLAY_MTU,
            persistent: true,
            queues: 0,
            vnet_hdr: false,
        };
        let (own_ip, peer_ip) = (self.underlay_ip(i), self.underlay_ip(peer));
        self.host(i).run_in(move || {
            let dev = setup_device(&cfg)?;
            let opts = EbpfOptions {
                pin_dir,
                overlay_ifindex: dev.ifindex,
                ext_ifindex: nix::net::if_::if_nametoindex("eth0")?,
                ext_ip: own_ip,
                port: PORT,
                network: network(),
                own_subnet: subnet(i),
                decap: flannel_agent::cli::UdpDecap::Auto,
                attach: flannel_agent::cli::UdpAttach::Auto,
            };
            let mut dp = EbpfDataplane::load(&opts)?;
            dp.set_peer(subnet(peer), peer_ip)?;
            Ok(dp)
        })?
    }
}

/// A bpffs pin directory of ours; the eBPF data plane's pins are removed on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = EbpfDataplane::unload(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// setup_overlay_device through an rtnetlink connection made in the calling thread's namespace.
fn setup_device(cfg: &OverlayDeviceConfig) -> Result<OverlayDevice> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        let conn = tokio::spawn(conn);
        let dev = setup_overlay_device(&handle, cfg).await;
        conn.abort();
        Ok(dev?)
    })
}

// ---------------------------------------------------------------------------------------------
// Traffic

fn ipv4_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn icmp_echo(id: u16, seq: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(&[0xab; 56]);
    let c = ipv4_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A complete inner IPv4 packet (ICMP echo) as it would travel inside the tunnel.
fn inner_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let icmp = icmp_echo(7, 7);
    let mut p = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0];
    p[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = ipv4_checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&icmp);
    p
}

/// Pings `dst` from inside `ns` with a raw ICMP socket (no ping binary needed). Returns the
/// (type, code) of the first ICMP answer to our echo: (0, 0) for a reply, (3, 0) for net
/// unreachable; None when nothing came back before `timeout`.
fn icmp_probe(c: &Container, dst: Ipv4Addr, timeout: Duration) -> Result<Option<(u8, u8)>> {
    c.ns.run_in(move || {
        // SAFETY: plain socket(2); the result is checked before being owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("raw ICMP socket");
        }
        // SAFETY: fd is fresh and ours.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: pointer to a live timeval with its size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let id = (std::process::id() as u16) ^ (u32::from(dst) as u16);
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_addr.s_addr = u32::from(dst).to_be();
        let deadline = Instant::now() + timeout;
        let mut seq = 0u16;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            seq += 1;
            let echo = icmp_echo(id, seq);
            // SAFETY: buffer and address are live for the call.
            unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    echo.as_ptr().cast(),
                    echo.len(),
                    0,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            let resend_at = Instant::now() + Duration::from_millis(200);
            while Instant::now() < resend_at {
                // SAFETY: buf is writable for its length.
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n <= 0 {
                    continue;
                }
                if let Some(answer) = parse_icmp_answer(&buf[..n as usize], id) {
                    return Ok(Some(answer));
                }
            }
        }
        Ok(None)
    })?
}

fn parse_icmp_answer(p: &[u8], id: u16) -> Option<(u8, u8)> {
    let icmp = p.get(usize::from(p.first()? & 0x0f) * 4..)?;
    let (t, code) = (*icmp.first()?, *icmp.get(1)?);
    let echo_id = |m: &[u8]| m.get(4..6).map(|b| u16::from_be_bytes([b[0], b[1]]));
    match t {
        0 if echo_id(icmp) == Some(id) => Some((t, code)),
        3 | 11 => {
            let quoted = icmp.get(8..)?;
            let q_icmp = quoted.get(usize::from(quoted.first()? & 0x0f) * 4..)?;
            (q_icmp.first() == Some(&8) && echo_id(q_icmp) == Some(id)).then_some((t, code))
        }
        _ => None,
    }
}

/// Sends one raw datagram from `src` (inside host namespace `ns`) to `dst`.
fn send_datagram(ns: &Netns, src: SocketAddrV4, dst: SocketAddrV4, payload: Vec<u8>) -> Result<()> {
    ns.run_in(move || {
        let s = UdpSocket::bind(src)?;
        s.send_to(&payload, dst)?;
        Ok(())
    })?
}

/// Polls the data plane's counters until `ok` holds.
fn wait_stats(
    dp: &TunDataplane,
    what: &str,
    ok: impl Fn(&DataplaneStats) -> bool,
) -> Result<DataplaneStats> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = dp.stats()?;
        if ok(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}; counters: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Ping and a verified TCP stream both ways, with the given TUN mode; returns the data planes.
fn forward_both_ways(
    t: &Topology,
    vnet_hdr: bool,
    bytes: usize,
) -> Result<(TunDataplane, TunDataplane)> {
    let dp1 = t.start_dataplane(1, 2, vnet_hdr)?;
    let dp2 = t.start_dataplane(2, 1, vnet_hdr)?;

    let answer = icmp_probe(t.container(1), t.container_ip(2), Duration::from_secs(5))?;
    assert_eq!(
        answer,
        Some((0, 0)),
        "container 1 pings container 2 through the tunnel"
    );
    let answer = icmp_probe(t.container(2), t.container_ip(1), Duration::from_secs(5))?;
    assert_eq!(
        answer,
        Some((0, 0)),
        "container 2 pings container 1 through the tunnel"
    );

    assert_eq!(tcp_transfer(t.container(1), t.container(2), bytes)?, bytes);
    assert_eq!(
        tcp_transfer(t.container(2), t.container(1), bytes / 4)?,
        bytes / 4
    );

    let (s1, s2) = (dp1.stats()?, dp2.stats()?);
    for s in [&s1, &s2] {
        assert!(s.tx_packets > 0 && s.rx_packets > 0, "{s:?}");
        assert_eq!(
            s.drop_unknown_sender + s.drop_spoofed_source + s.drop_malformed,
            0,
            "{s:?}"
        );
    }
    // Everything host 1 sent to host 2 arrived as inner bytes (nothing lost on a veth).
    assert!(
        s1.tx_bytes >= bytes as u64 && s2.rx_bytes >= bytes as u64,
        "{s1:?} {s2:?}"
    );
    Ok((dp1, dp2))
}

#[test]
fn forwards_ping_and_tcp_with_offloads() -> Result<()> {
    let t = Topology::new()?;
    let (dp1, dp2) = forward_both_ways(&t, true, 64 << 20)?;
    assert!(dp1.uses_udp_gso() && dp2.uses_udp_gso());
    Ok(())
}

#[test]
fn forwards_ping_and_tcp_on_the_plain_per_packet_path() -> Result<()> {
    let t = Topology::new()?;
    let (_dp1, _dp2) = forward_both_ways(&t, false, 16 << 20)?;
    Ok(())
}

#[test]
fn interoperates_with_an_ebpf_node() -> Result<()> {
    let t = Topology::new()?;
    // A wire splits UDP GSO trains into datagrams; a veth does not, and the eBPF decap (TC
    // ingress) cannot take a 64 KB UDP GSO skb apart. The harness makes every host's eth0 act
    // as a wire (tx-udp-segmentation off).
    let pins = PinDir(t.o.cluster.hosts[0].pin_dir().into());
    let ebpf = t.start_ebpf_dataplane(1, 2, pins.0.clone())?;
    let tun = t.start_dataplane(2, 1, true)?;
    for (from, to) in [(1, 2), (2, 1)] {
        let answer = icmp_probe(
            t.container(from),
            t.container_ip(to),
            Duration::from_secs(5),
        )?;
        assert_eq!(answer, Some((0, 0)), "ping {from} -> {to}");
    }
    let counters = || format!("TUN node counters: {:?}", tun.stats());
    let got = tcp_transfer(t.container(1), t.container(2), 16 << 20).with_context(counters)?;
    assert_eq!(got, 16 << 20, "eBPF sender, TUN receiver");
    let got = tcp_transfer(t.container(2), t.container(1), 16 << 20).with_context(counters)?;
    assert_eq!(got, 16 << 20, "TUN sender, eBPF receiver");

    // Same with the veth back to passing GSO trains whole, and GSO off in the data plane.
    t.ethtool(2, &["tx-udp-segmentation", "on"])?;
    tun.set_udp_gso(false);
    let got = tcp_transfer(t.container(2), t.container(1), 16 << 20).with_context(counters)?;
    assert_eq!(got, 16 << 20, "TUN sender without UDP GSO, eBPF receiver");
    let s = tun.stats()?;
    assert_eq!(
        s.drop_unknown_sender + s.drop_spoofed_source + s.drop_malformed,
        0,
        "{s:?}"
    );
    drop(ebpf);
    Ok(())
}

#[test]
fn forwards_over_an_underlay_without_checksum_offload() -> Result<()> {
    let t = Topology::new()?;
    // Outer checksums computed in software. Kernels before 6.11 refuse UDP GSO sends there
    // (EIO) and the data plane falls back to one datagram per send; newer ones segment and
    // checksum in software. Either way the stream must arrive intact.
    t.ethtool(1, &["tx", "off"])?;
    let (_dp1, _dp2) = forward_both_ways(&t, true, 16 << 20)?;
    Ok(())
}

#[test]
fn drops_are_counted_by_reason_and_unknown_subnets_get_net_unreachable() -> Result<()> {
    let t = Topology::new()?;
    let mut dp1 = t.start_dataplane(1, 2, true)?;
    let dp2 = t.start_dataplane(2, 1, true)?;
    let to_2 = SocketAddrV4::new(t.underlay_ip(2), PORT);

    // A sender that is no peer, with a perfectly good inner packet.
    t.host(1)
        .ip(&["addr", "add", "192.0.2.3/24", "dev", "eth0"])?;
    let stranger = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 3), PORT);
    send_datagram(
        t.host(1),
        stranger,
        to_2,
        inner_echo(t.container_ip(1), t.container_ip(2)),
    )?;
    wait_stats(&dp2, "drop_unknown_sender", |s| s.drop_unknown_sender == 1)?;

    // A known peer sending from outside its subnet.
    let peer1 = SocketAddrV4::new(t.underlay_ip(1), PORT + 1);
    send_datagram(
        t.host(1),
        peer1,
        to_2,
        inner_echo(Ipv4Addr::new(10, 244, 9, 9), t.container_ip(2)),
    )?;
    wait_stats(&dp2, "drop_spoofed_source", |s| s.drop_spoofed_source == 1)?;

    // Not IPv4, and a truncated IPv4 header.
    send_datagram(t.host(1), peer1, to_2, vec![0x60; 48])?;
    wait_stats(&dp2, "drop_not_ipv4", |s| s.drop_not_ipv4 == 1)?;
    send_datagram(t.host(1), peer1, to_2, vec![0x45, 0, 0])?;
    let s2 = wait_stats(&dp2, "drop_malformed", |s| s.drop_malformed == 1)?;
    assert_eq!(s2.rx_packets, 0, "none of these reached the TUN: {s2:?}");

    // No peer owns 10.244.9.0/24: counted, and the sender learns it from host 1's flannel0.
    let answer = icmp_probe(
        t.container(1),
        Ipv4Addr::new(10, 244, 9, 1),
        Duration::from_secs(3),
    )?;
    assert_eq!(
        answer,
        Some((3, 0)),
        "ICMP net unreachable for an unknown subnet"
    );
    wait_stats(&dp1, "drop_no_peer", |s| s.drop_no_peer >= 1)?;

    // Removing the peer stops traffic to it; syncing it back restores it.
    dp1.remove_peer(subnet(2))?;
    assert_eq!(
        icmp_probe(t.container(1), t.container_ip(2), Duration::from_secs(3))?,
        Some((3, 0))
    );
    dp1.sync_peers(&[(subnet(2), t.underlay_ip(2))].into_iter().collect())?;
    assert_eq!(
        icmp_probe(t.container(1), t.container_ip(2), Duration::from_secs(5))?,
        Some((0, 0))
    );
    Ok(())
}

#[test]
fn device_setup_is_idempotent_and_repairs_drift() -> Result<()> {
    let t = Topology::new()?;
    let h = t.host(1);
    // eBPF-style: an ifb, no queues.
    let ebpf_cfg = OverlayDeviceConfig {
        name: "flannel0".into(),
        kind: OverlayKind::Ifb,
        own_subnet: subnet(1),
        network: network(),
        mtu: OVERLAY_MTU,
        persistent: true,
        queues: 0,
        vnet_hdr: false,
    };
    let cfg = ebpf_cfg.clone();
    let dev = h.run_in(move || setup_device(&cfg))??;
    assert_eq!(dev.queue_count(), 0);
    let check = |what: &str| -> Result<()> {
        let link = h.ip(&["-o", "link", "show", "flannel0"])?;
        assert!(
            link.contains(&format!("mtu {OVERLAY_MTU}")) && link.contains("UP"),
            "{what}: {link}"
        );
        let addrs = h.ip(&["-o", "-4", "addr", "show", "dev", "flannel0"])?;
        assert_eq!(addrs.matches("inet ").count(), 1, "{what}: {addrs}");
        assert!(addrs.contains("inet 10.244.1.0/32"), "{what}: {addrs}");
        let routes = h.ip(&["-4", "route", "show", "10.244.0.0/16"])?;
        assert!(
            routes.contains("10.244.0.0/16 dev flannel0"),
            "{what}: {routes}"
        );
        Ok(())
    };
    check("after creation, with no descriptor open")?;
    // Carrier with no reader: the route is usable where linkdown routes are ignored.
    let link = h.ip(&["-o", "link", "show", "flannel0"])?;
    assert!(
        link.contains("LOWER_UP") && link.contains("NOARP"),
        "{link}"
    );
    let routes = h.ip(&["-4", "route", "show", "10.244.0.0/16"])?;
    assert!(!routes.contains("linkdown"), "{routes}");

    // Drift: wrong MTU, a stray address, no route. Setting up again repairs it.
    h.ip(&["link", "set", "flannel0", "mtu", "1400"])?;
    h.ip(&["addr", "add", "10.244.7.7/24", "dev", "flannel0"])?;
    h.ip(&["route", "del", "10.244.0.0/16"])?;
    let cfg = ebpf_cfg.clone();
    h.run_in(move || setup_device(&cfg))??;
    check("after repair")?;

    // The TUN data plane replaces the ifb with a TUN, with offloads and queues.
    let tun_cfg = OverlayDeviceConfig {
        kind: OverlayKind::Tun,
        persistent: false,
        queues: 2,
        vnet_hdr: true,
        ..ebpf_cfg.clone()
    };
    let cfg = tun_cfg.clone();
    let dev = h.run_in(move || setup_device(&cfg))??;
    assert_eq!(dev.queue_count(), 2);
    assert!(dev.ifindex > 0);
    check("after adoption by the TUN data plane")?;

    // A non-TUN device of that name is refused rather than reused.
    t.host(2).ip(&[
        "link",
        "add",
        "flannel0",
        "type",
        "veth",
        "peer",
        "name",
        "flannel0p",
    ])?;
    let cfg = tun_cfg;
    let err = t
        .host(2)
        .run_in(move || setup_device(&cfg))?
        .expect_err("a veth is not a TUN");
    assert!(format!("{err:#}").contains("not a TUN"), "{err:#}");
    Ok(())
}
