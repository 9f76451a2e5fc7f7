//! The udp backend's user-space TUN data plane between two hosts.
//!
//! Topology (all in namespaces named `fl-tun-<pid>-<tag>-*`, removed on success and failure):
//!
//! ```text
//!  ca: eth0 10.244.1.2 ── veth ── ha: veth-c 10.244.1.1, flannel0 10.244.1.0/32, ul0 192.0.2.1
//!                                                                                   │ veth underlay
//!  cb: eth0 10.244.2.2 ── veth ── hb: veth-c 10.244.2.1, flannel0 10.244.2.0/32, ul0 192.0.2.2
//! ```
//!
//! The overlay device and `TunDataplane` are set up through the library API from a thread that
//! entered the host namespace; sockets and TUN queues stay bound to it afterwards.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flannel_agent::backend::udp::device::{
    setup_overlay_device, OverlayDevice, OverlayDeviceConfig,
};
use flannel_agent::backend::udp::ebpf::{EbpfDataplane, EbpfOptions};
use flannel_agent::backend::udp::tun::TunDataplane;
use flannel_agent::backend::udp::{DataplaneStats, UdpDataplane};
use ipnetwork::Ipv4Network;

const PREFIX: &str = "fl-tun-";
const PORT: u16 = 8285;
const UNDERLAY_MTU: u32 = 1500;
const OVERLAY_MTU: u32 = UNDERLAY_MTU - 28;

// ---------------------------------------------------------------------------------------------
// Namespaces

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tun_dataplane tests create namespaces and TUN devices: run them as root (they never skip)"
    );
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nsenter --net=... <cmd>`: runs a command inside one of our namespaces.
fn ns_cmd(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    run(Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(program)
        .args(args))
}

fn ip(ns: &str, args: &[&str]) -> Result<String> {
    ns_cmd(ns, "ip", args)
}

/// Runs `f` on a thread that entered namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let file =
        File::open(format!("/run/netns/{ns}")).with_context(|| format!("opening netns {ns}"))?;
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// Deletes namespaces of earlier runs of these tests whose process is gone.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// Our namespaces; deleted on drop.
struct Namespaces(Vec<String>);

impl Namespaces {
    fn add(&mut self, name: String) -> Result<String> {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.0.push(name.clone());
        ip(&name, &["link", "set", "lo", "up"])?;
        // No IPv6 chatter (router solicitations, MLD) on flannel0: drop counters stay exact.
        ns_cmd(
            &name,
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        Ok(name)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.0.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

fn underlay_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, i)
}

fn subnet(i: u8) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 244, i, 0), 24).expect("valid subnet")
}

fn container_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i, 2)
}

fn network() -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 244, 0, 0), 16).expect("valid network")
}

/// Two hosts (1 and 2) on a veth underlay, each with one container behind it.
struct Topology {
    /// Dropped last: everything else lives in these namespaces.
    ns: Namespaces,
    tag: String,
}

impl Topology {
    fn new(tag: &str) -> Result<Self> {
        require_root();
        remove_stale_namespaces();
        let mut t = Topology {
            ns: Namespaces(Vec::new()),
            tag: format!("{PREFIX}{}-{tag}", std::process::id()),
        };
        for i in [1u8, 2] {
            t.ns.add(t.host(i))?;
            t.ns.add(t.container(i))?;
        }
        let (h1, h2) = (t.host(1), t.host(2));
        // Created directly inside the host namespaces: nothing appears in the root namespace.
        ip(
            &h1,
            &[
                "link", "add", "ul0", "type", "veth", "peer", "name", "ul0", "netns", &h2,
            ],
        )?;
        for i in [1u8, 2] {
            let (h, c) = (t.host(i), t.container(i));
            ip(
                &h,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", underlay_ip(i)),
                    "dev",
                    "ul0",
                ],
            )?;
            ip(
                &h,
                &["link", "set", "ul0", "mtu", &UNDERLAY_MTU.to_string(), "up"],
            )?;
            ns_cmd(&h, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            let mtu = OVERLAY_MTU.to_string();
            let gw = Ipv4Addr::from(u32::from(subnet(i).network()) + 1);
            ip(
                &h,
                &[
                    "link", "add", "veth-c", "mtu", &mtu, "type", "veth", "peer", "name", "eth0",
                    "mtu", &mtu, "netns", &c,
                ],
            )?;
            ip(&h, &["addr", "add", &format!("{gw}/24"), "dev", "veth-c"])?;
            ip(&h, &["link", "set", "veth-c", "up"])?;
            ip(
                &c,
                &[
                    "addr",
                    "add",
                    &format!("{}/24", container_ip(i)),
                    "dev",
                    "eth0",
                ],
            )?;
            ip(&c, &["link", "set", "eth0", "up"])?;
            ip(&c, &["route", "add", "default", "via", &gw.to_string()])?;
        }
        Ok(t)
    }

    fn host(&self, i: u8) -> String {
        format!("{}-h{i}", self.tag)
    }

    fn container(&self, i: u8) -> String {
        format!("{}-c{i}", self.tag)
    }

    /// Sets up flannel0 on host `i` and starts the TUN data plane there, with host `peer` known.
    fn start_dataplane(&self, i: u8, peer: u8, vnet_hdr: bool) -> Result<TunDataplane> {
        let cfg = OverlayDeviceConfig {
            name: "flannel0".into(),
            own_subnet: subnet(i),
            network: network(),
            mtu: OVERLAY_MTU,
            persistent: false,
            queues: 1,
            vnet_hdr,
        };
        in_ns(&self.host(i), move || {
            let dev = setup_device(&cfg)?;
            let mut dp = TunDataplane::start(dev, underlay_ip(i), PORT)?;
            dp.set_peer(subnet(peer), underlay_ip(peer))?;
            Ok(dp)
        })
    }
}

impl Topology {
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
            own_subnet: subnet(i),
            network: network(),
            mtu: OVERLAY_MTU,
            persistent: true,
            queues: 0,
            vnet_hdr: false,
        };
        in_ns(&self.host(i), move || {
            let dev = setup_device(&cfg)?;
            let opts = EbpfOptions {
                pin_dir,
                overlay_ifindex: dev.ifindex,
                ext_ifindex: nix::net::if_::if_nametoindex("ul0")?,
                ext_ip: underlay_ip(i),
                port: PORT,
                network: network(),
                own_subnet: subnet(i),
            };
            let mut dp = EbpfDataplane::load(&opts)?;
            dp.set_peer(subnet(peer), underlay_ip(peer))?;
            Ok(dp)
        })
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
fn icmp_probe(ns: &str, dst: Ipv4Addr, timeout: Duration) -> Result<Option<(u8, u8)>> {
    in_ns(ns, move || {
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
    })
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

fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// Streams `bytes` of a known pattern over TCP from container `from` to container `to` and
/// checks every byte on arrival. Returns the bytes received intact.
fn tcp_transfer(t: &Topology, from: u8, to: u8, bytes: usize) -> Result<usize> {
    let addr = SocketAddrV4::new(container_ip(to), 5201);
    let listener = in_ns(&t.container(to), move || Ok(TcpListener::bind(addr)?))?;
    let server = std::thread::spawn(move || -> Result<usize> {
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e).context("accepting the transfer connection"),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = s.read(&mut buf).context("reading the transfer")?;
            if n == 0 {
                return Ok(got);
            }
            if let Some(bad) = (0..n).find(|&k| buf[k] != pattern_byte(got + k)) {
                bail!("byte {} corrupted in transit", got + bad);
            }
            got += n;
        }
    });
    let sent = in_ns(&t.container(from), move || {
        let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        // 251 does not divide the chunk size, so the pattern shifts from chunk to chunk.
        let chunk: Vec<u8> = (0..64 * 1024).map(pattern_byte).collect();
        let mut sent = 0;
        let start = Instant::now();
        while sent < bytes {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("transfer stalled: {sent} of {bytes} bytes sent in 30 s");
            }
            let off = sent % 251;
            let n = (bytes - sent).min(chunk.len() - off);
            s.write_all(&chunk[off..off + n])?;
            sent += n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    sent.context("sending")?;
    received
}

/// Sends one raw datagram from `src` (inside host namespace `ns`) to `dst`.
fn send_datagram(ns: &str, src: SocketAddrV4, dst: SocketAddrV4, payload: Vec<u8>) -> Result<()> {
    in_ns(ns, move || {
        let s = UdpSocket::bind(src)?;
        s.send_to(&payload, dst)?;
        Ok(())
    })
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

    let answer = icmp_probe(&t.container(1), container_ip(2), Duration::from_secs(5))?;
    assert_eq!(
        answer,
        Some((0, 0)),
        "container 1 pings container 2 through the tunnel"
    );
    let answer = icmp_probe(&t.container(2), container_ip(1), Duration::from_secs(5))?;
    assert_eq!(
        answer,
        Some((0, 0)),
        "container 2 pings container 1 through the tunnel"
    );

    assert_eq!(tcp_transfer(t, 1, 2, bytes)?, bytes);
    assert_eq!(tcp_transfer(t, 2, 1, bytes / 4)?, bytes / 4);

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
    let t = Topology::new("gso")?;
    let (dp1, dp2) = forward_both_ways(&t, true, 64 << 20)?;
    assert!(dp1.uses_udp_gso() && dp2.uses_udp_gso());
    Ok(())
}

#[test]
fn forwards_ping_and_tcp_on_the_plain_per_packet_path() -> Result<()> {
    let t = Topology::new("plain")?;
    let (_dp1, _dp2) = forward_both_ways(&t, false, 16 << 20)?;
    Ok(())
}

#[test]
fn interoperates_with_an_ebpf_node() -> Result<()> {
    let t = Topology::new("mixed")?;
    // A wire splits UDP GSO trains into datagrams; a veth does not, and the eBPF decap (TC
    // ingress) cannot take a 64 KB UDP GSO skb apart. Make the TUN host's veth act as a wire.
    ns_cmd(
        &t.host(2),
        "ethtool",
        &["-K", "ul0", "tx-udp-segmentation", "off"],
    )?;
    let pins = PinDir(format!("/sys/fs/bpf/{}", t.tag).into());
    let ebpf = t.start_ebpf_dataplane(1, 2, pins.0.clone())?;
    let tun = t.start_dataplane(2, 1, true)?;
    for (from, to) in [(1, 2), (2, 1)] {
        let answer = icmp_probe(&t.container(from), container_ip(to), Duration::from_secs(5))?;
        assert_eq!(answer, Some((0, 0)), "ping {from} -> {to}");
    }
    let counters = || format!("TUN node counters: {:?}", tun.stats());
    let got = tcp_transfer(&t, 1, 2, 16 << 20).with_context(counters)?;
    assert_eq!(got, 16 << 20, "eBPF sender, TUN receiver");
    let got = tcp_transfer(&t, 2, 1, 16 << 20).with_context(counters)?;
    assert_eq!(got, 16 << 20, "TUN sender, eBPF receiver");

    // Same with the veth back to passing GSO trains whole, and GSO off in the data plane.
    ns_cmd(
        &t.host(2),
        "ethtool",
        &["-K", "ul0", "tx-udp-segmentation", "on"],
    )?;
    tun.set_udp_gso(false);
    let got = tcp_transfer(&t, 2, 1, 16 << 20).with_context(counters)?;
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
    let t = Topology::new("nocsum")?;
    // Outer checksums computed in software. Kernels before 6.11 refuse UDP GSO sends there
    // (EIO) and the data plane falls back to one datagram per send; newer ones segment and
    // checksum in software. Either way the stream must arrive intact.
    ns_cmd(&t.host(1), "ethtool", &["-K", "ul0", "tx", "off"])?;
    let (_dp1, _dp2) = forward_both_ways(&t, true, 16 << 20)?;
    Ok(())
}

#[test]
fn drops_are_counted_by_reason_and_unknown_subnets_get_net_unreachable() -> Result<()> {
    let t = Topology::new("drops")?;
    let mut dp1 = t.start_dataplane(1, 2, true)?;
    let dp2 = t.start_dataplane(2, 1, true)?;
    let to_2 = SocketAddrV4::new(underlay_ip(2), PORT);

    // A sender that is no peer, with a perfectly good inner packet.
    ip(&t.host(1), &["addr", "add", "192.0.2.3/24", "dev", "ul0"])?;
    let stranger = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 3), PORT);
    send_datagram(
        &t.host(1),
        stranger,
        to_2,
        inner_echo(container_ip(1), container_ip(2)),
    )?;
    wait_stats(&dp2, "drop_unknown_sender", |s| s.drop_unknown_sender == 1)?;

    // A known peer sending from outside its subnet.
    let peer1 = SocketAddrV4::new(underlay_ip(1), PORT + 1);
    send_datagram(
        &t.host(1),
        peer1,
        to_2,
        inner_echo(Ipv4Addr::new(10, 244, 9, 9), container_ip(2)),
    )?;
    wait_stats(&dp2, "drop_spoofed_source", |s| s.drop_spoofed_source == 1)?;

    // Not IPv4, and a truncated IPv4 header.
    send_datagram(&t.host(1), peer1, to_2, vec![0x60; 48])?;
    wait_stats(&dp2, "drop_not_ipv4", |s| s.drop_not_ipv4 == 1)?;
    send_datagram(&t.host(1), peer1, to_2, vec![0x45, 0, 0])?;
    let s2 = wait_stats(&dp2, "drop_malformed", |s| s.drop_malformed == 1)?;
    assert_eq!(s2.rx_packets, 0, "none of these reached the TUN: {s2:?}");

    // No peer owns 10.244.9.0/24: counted, and the sender learns it from host 1's flannel0.
    let answer = icmp_probe(
        &t.container(1),
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
        icmp_probe(&t.container(1), container_ip(2), Duration::from_secs(3))?,
        Some((3, 0))
    );
    dp1.sync_peers(&[(subnet(2), underlay_ip(2))].into_iter().collect())?;
    assert_eq!(
        icmp_probe(&t.container(1), container_ip(2), Duration::from_secs(5))?,
        Some((0, 0))
    );
    Ok(())
}

#[test]
fn device_setup_is_idempotent_and_repairs_drift() -> Result<()> {
    let t = Topology::new("dev")?;
    let h = t.host(1);
    // eBPF-style: persistent, no queues kept.
    let ebpf_cfg = OverlayDeviceConfig {
        name: "flannel0".into(),
        own_subnet: subnet(1),
        network: network(),
        mtu: OVERLAY_MTU,
        persistent: true,
        queues: 0,
        vnet_hdr: false,
    };
    let cfg = ebpf_cfg.clone();
    let dev = in_ns(&h, move || setup_device(&cfg))?;
    assert_eq!(dev.queue_count(), 0);
    let check = |what: &str| -> Result<()> {
        let link = ip(&h, &["-o", "link", "show", "flannel0"])?;
        assert!(
            link.contains(&format!("mtu {OVERLAY_MTU}")) && link.contains("UP"),
            "{what}: {link}"
        );
        let addrs = ip(&h, &["-o", "-4", "addr", "show", "dev", "flannel0"])?;
        assert_eq!(addrs.matches("inet ").count(), 1, "{what}: {addrs}");
        assert!(addrs.contains("inet 10.244.1.0/32"), "{what}: {addrs}");
        let routes = ip(&h, &["-4", "route", "show", "10.244.0.0/16"])?;
        assert!(
            routes.contains("10.244.0.0/16 dev flannel0"),
            "{what}: {routes}"
        );
        Ok(())
    };
    check("after creation, with no descriptor open (persistent)")?;

    // Drift: wrong MTU, a stray address, no route. Setting up again repairs it.
    ip(&h, &["link", "set", "flannel0", "mtu", "1400"])?;
    ip(&h, &["addr", "add", "10.244.7.7/24", "dev", "flannel0"])?;
    ip(&h, &["route", "del", "10.244.0.0/16"])?;
    let cfg = ebpf_cfg.clone();
    in_ns(&h, move || setup_device(&cfg))?;
    check("after repair")?;

    // The TUN data plane adopts the persistent device with offloads and queues.
    let tun_cfg = OverlayDeviceConfig {
        queues: 2,
        vnet_hdr: true,
        ..ebpf_cfg
    };
    let cfg = tun_cfg.clone();
    let dev = in_ns(&h, move || setup_device(&cfg))?;
    assert_eq!(dev.queue_count(), 2);
    assert!(dev.ifindex > 0);
    check("after adoption by the TUN data plane")?;

    // A non-TUN device of that name is refused rather than reused.
    ip(
        &t.host(2),
        &[
            "link",
            "add",
            "flannel0",
            "type",
            "veth",
            "peer",
            "name",
            "flannel0p",
        ],
    )?;
    let cfg = tun_cfg;
    let err = in_ns(&t.host(2), move || setup_device(&cfg)).expect_err("a veth is not a TUN");
    assert!(format!("{err:#}").contains("not a TUN"), "{err:#}");
    Ok(())
}
