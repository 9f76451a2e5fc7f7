//! The user-space data plane of the udp backend: forwards between the TUN `flannel0` and one
//! UDP socket on dedicated threads. Fallback where eBPF cannot load, and the benchmark baseline.
//!
//! Wire format as upstream: outer IPv4/UDP from Port to Port, payload = the inner IPv4 packet.
//! To be fast it uses the kernel's offloads the way wireguard-go does: the TUN hands out 64 KB
//! TCP super-packets (virtio-net header, TSO), which are cut into MTU-sized inner packets and
//! sent with UDP GSO (one sendmmsg per batch); the receive side takes UDP GRO trains with
//! recvmmsg and merges the TCP segments back into super-packets for the TUN.

mod checksum;
mod gro;
mod gso_batch;
mod icmp;
mod ipv4;
mod segment;
mod sys;
#[cfg(test)]
mod test_packets;
mod virtio_hdr;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;

use super::device::OverlayDevice;
use super::{DataplaneStats, UdpDataplane};
use flannel_common::Counter;
use gro::TcpCoalescer;
use gso_batch::{WireBatch, WireMsg};
use ipv4::PacketError;
use sys::{RecvBatch, StopEvent};
use virtio_hdr::{VirtioNetHdr, VNET_HDR_LEN};

/// Socket buffers big enough for a few GSO/GRO trains in flight.
const SOCKET_BUFFER_BYTES: i32 = 8 << 20;
/// TUN reads gathered before one sendmmsg.
const MAX_READS_PER_BATCH: usize = 64;
/// Wire bytes gathered before one sendmmsg (a 64 KB super-packet grows by its extra headers).
const BATCH_BYTES: usize = 512 * 1024;
const MAX_TUN_PACKET: usize = 65_535 + VNET_HDR_LEN;
/// Datagrams (or GRO trains) per recvmmsg.
const RECV_BATCH: usize = 16;
/// At most one ICMP error per this interval and thread.
const ICMP_INTERVAL: Duration = Duration::from_millis(1);

/// Who owns which overlay subnet, in the two shapes the threads look things up by.
#[derive(Debug, Default)]
struct PeerTable {
    by_subnet: HashMap<Ipv4Network, Ipv4Addr>,
    /// Distinct subnet prefix lengths, longest first (usually just one).
    prefix_lens: Vec<u8>,
    by_public_ip: HashMap<Ipv4Addr, Vec<Ipv4Network>>,
}

impl PeerTable {
    fn from_map(map: HashMap<Ipv4Network, Ipv4Addr>) -> Self {
        let mut prefix_lens: Vec<u8> = map.keys().map(|n| n.prefix()).collect();
        prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        prefix_lens.dedup();
        let mut by_public_ip: HashMap<Ipv4Addr, Vec<Ipv4Network>> = HashMap::new();
        for (subnet, ip) in &map {
            by_public_ip.entry(*ip).or_default().push(*subnet);
        }
        Self {
            by_subnet: map,
            prefix_lens,
            by_public_ip,
        }
    }

    /// The public IP of the peer whose subnet contains `dst`.
    fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        self.prefix_lens.iter().find_map(|&len| {
            let net = Ipv4Network::new(dst, len).ok()?;
            let key = Ipv4Network::new(net.network(), len).ok()?;
            self.by_subnet.get(&key).copied()
        })
    }

    fn subnets_of(&self, public_ip: Ipv4Addr) -> Option<&[Ipv4Network]> {
        self.by_public_ip.get(&public_ip).map(Vec::as_slice)
    }
}

/// Shared counters, one per [`Counter`]; threads add their per-batch tallies.
#[derive(Default)]
struct Counters([AtomicU64; Counter::ALL.len()]);

impl Counters {
    fn add(&self, s: &DataplaneStats) {
        for (counter, c) in self.0.iter().zip(Counter::ALL) {
            let v = s.get(c);
            if v != 0 {
                counter.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    fn snapshot(&self) -> DataplaneStats {
        let mut s = DataplaneStats::default();
        for (counter, c) in self.0.iter().zip(Counter::ALL) {
            *s.get_mut(c) = counter.load(Ordering::Relaxed);
        }
        s
    }
}

fn count_packet_error(stats: &mut DataplaneStats, e: PacketError) {
    match e {
        PacketError::NotIpv4 => stats.drop_not_ipv4 += 1,
        // Counted as malformed here: drop_ttl_exceeded is an eBPF-only counter.
        PacketError::Malformed | PacketError::TtlExpired => stats.drop_malformed += 1,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunDataplaneError {
    #[error("overlay device {0} has no TUN queues open (set OverlayDeviceConfig::queues >= 1)")]
    NoQueues(String),
    #[error("udp socket on {addr}: {source}")]
    Socket {
        addr: SocketAddrV4,
        #[source]
        source: io::Error,
    },
    #[error("TUN queue setup: {0}")]
    Queue(#[source] io::Error),
    #[error("starting forwarding thread: {0}")]
    Thread(#[source] io::Error),
}

/// State every forwarding thread shares.
struct Shared {
    peers: RwLock<PeerTable>,
    counters: Counters,
    stop: StopEvent,
    stopping: AtomicBool,
    /// Cleared when the kernel refuses UDP GSO sends (no checksum offload on the route).
    gso: AtomicBool,
    socket: UdpSocket,
    port: u16,
    vnet_hdr: bool,
    /// MTU of the overlay device: no inner packet from the wire may be longer.
    mtu: usize,
    /// Source of our ICMP errors; see `icmp_source`.
    icmp_source: Ipv4Addr,
}

/// The user-space TUN <-> UDP forwarder. Threads run until it is dropped.
pub struct TunDataplane {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    device_name: String,
    ifindex: u32,
    local: SocketAddrV4,
}

impl TunDataplane {
    /// Binds `public_ip:port` and starts one sending thread per TUN queue of `device` plus one
    /// receiving thread. Sockets and queues belong to the network namespace they were created
    /// in, so the threads need no namespace of their own.
    pub fn start(
        mut device: OverlayDevice,
        public_ip: Ipv4Addr,
        port: u16,
    ) -> Result<Self, TunDataplaneError> {
        let queues = device.take_queues();
        if queues.is_empty() {
            return Err(TunDataplaneError::NoQueues(device.name));
        }
        let addr = SocketAddrV4::new(public_ip, port);
        let sock_err = |source| TunDataplaneError::Socket { addr, source };
        let socket = UdpSocket::bind(addr).map_err(sock_err)?;
        let local = match socket.local_addr().map_err(sock_err)? {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => addr,
        };
        configure_socket(socket.as_raw_fd());
        for q in &queues {
            sys::set_nonblocking(q.as_raw_fd()).map_err(TunDataplaneError::Queue)?;
        }
        let shared = Arc::new(Shared {
            peers: RwLock::new(PeerTable::default()),
            counters: Counters::default(),
            stop: StopEvent::new().map_err(TunDataplaneError::Thread)?,
            stopping: AtomicBool::new(false),
            gso: AtomicBool::new(true),
            socket,
            port: local.port(),
            vnet_hdr: device.vnet_hdr,
            mtu: device.mtu as usize,
            icmp_source: icmp_source(&device),
        });
        let mut dataplane = Self {
            shared,
            threads: Vec::new(),
            device_name: device.name.clone(),
            ifindex: device.ifindex,
            local,
        };
        dataplane.spawn_threads(queues)?;
        Ok(dataplane)
    }

    /// One sending thread per queue, one receiving thread writing to the first queue.
    fn spawn_threads(&mut self, queues: Vec<OwnedFd>) -> Result<(), TunDataplaneError> {
        let queues: Vec<Arc<OwnedFd>> = queues.into_iter().map(Arc::new).collect();
        let Some(first) = queues.first().cloned() else {
            return Err(TunDataplaneError::NoQueues(self.device_name.clone()));
        };
        for (i, q) in queues.iter().enumerate() {
            let (shared, q) = (self.shared.clone(), q.clone());
            let t = std::thread::Builder::new()
                .name(format!("fl-tun-tx{i}"))
                .spawn(move || tun_to_udp(&shared, q.as_raw_fd()))
                .map_err(TunDataplaneError::Thread)?;
            self.threads.push(t);
        }
        let shared = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("fl-tun-rx".into())
            .spawn(move || udp_to_tun(&shared, first.as_raw_fd()))
            .map_err(TunDataplaneError::Thread)?;
        self.threads.push(t);
        Ok(())
    }

    /// Stops the forwarding threads (they leave when the stop event fires).
    fn stop_threads(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.shared.stop.signal();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("a TUN forwarding thread panicked");
            }
        }
    }

    /// The TUN was re-created (deleted by hand): the forwarding threads move onto the queues of
    /// `device`, keeping the socket, the peer table and the counters.
    pub fn move_to(&mut self, mut device: OverlayDevice) -> Result<(), TunDataplaneError> {
        let queues = device.take_queues();
        if queues.is_empty() {
            return Err(TunDataplaneError::NoQueues(device.name));
        }
        for q in &queues {
            sys::set_nonblocking(q.as_raw_fd()).map_err(TunDataplaneError::Queue)?;
        }
        self.stop_threads();
        let stop = StopEvent::new().map_err(TunDataplaneError::Thread)?;
        // Every thread is joined: ours is the only handle left.
        let shared = Arc::get_mut(&mut self.shared).ok_or_else(|| {
            TunDataplaneError::Thread(io::Error::other("forwarding state still shared"))
        })?;
        shared.stop = stop;
        shared.stopping.store(false, Ordering::Relaxed);
        shared.icmp_source = icmp_source(&device);
        self.ifindex = device.ifindex;
        self.spawn_threads(queues)
    }

    /// Subnets and public IPs the forwarder sends to.
    pub fn peer_table(&self) -> BTreeMap<Ipv4Network, Ipv4Addr> {
        self.shared
            .peers
            .read()
            .map(|t| t.by_subnet.iter().map(|(s, ip)| (*s, *ip)).collect())
            .unwrap_or_default()
    }

    /// The bound UDP address (useful when `port` was 0).
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Whether sends still go out as UDP GSO trains; false once the kernel refused one (the
    /// route to the peers has no checksum offload) or after `set_udp_gso(false)`.
    pub fn uses_udp_gso(&self) -> bool {
        self.shared.gso.load(Ordering::Relaxed)
    }

    /// Turns UDP GSO sends on or off (on by default). A wire or a NIC splits a GSO train into
    /// ordinary datagrams, but a veth hands it over whole: an eBPF node behind a veth on the same
    /// machine then gets one 64 KB skb it cannot decapsulate. Turn GSO off (or turn off
    /// `tx-udp-segmentation` on the underlay veth) where such peers exist.
    pub fn set_udp_gso(&self, enabled: bool) {
        self.shared.gso.store(enabled, Ordering::Relaxed);
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    fn update_peers(
        &self,
        f: impl FnOnce(&mut HashMap<Ipv4Network, Ipv4Addr>),
    ) -> anyhow::Result<()> {
        let mut table = self.shared.peers.write().map_err(|_| {
            anyhow::anyhow!("peer table lock poisoned by a crashed forwarding thread")
        })?;
        let mut map = std::mem::take(&mut table.by_subnet);
        f(&mut map);
        *table = PeerTable::from_map(map);
        Ok(())
    }
}

/// The source address of our ICMP errors. Not the device's own address (upstream's choice): the
/// kernel drops packets arriving with a local source as martians, so nobody would see them. The
/// overlay network's first address is no node's (by default the first subnet is not handed out)
/// and routes back through the device, so reverse-path filters accept it.
fn icmp_source(device: &OverlayDevice) -> Ipv4Addr {
    let first = device.network.network();
    if first != device.address {
        first
    } else {
        // SubnetMin lowered to the first subnet: the network's last host address instead.
        Ipv4Addr::from(u32::from(device.network.broadcast()).wrapping_sub(1))
    }
}

fn configure_socket(fd: RawFd) {
    // Best effort: the forwarder works without any of these, only slower.
    let opts = [
        (
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            SOCKET_BUFFER_BYTES,
            "SO_SNDBUFFORCE",
        ),
        (
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            SOCKET_BUFFER_BYTES,
            "SO_RCVBUFFORCE",
        ),
        (libc::SOL_UDP, libc::UDP_GRO, 1, "UDP_GRO"),
        // Upstream's wire format has DF set on the outer header.
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
            "IP_MTU_DISCOVER",
        ),
    ];
    for (level, name, value, label) in opts {
        if let Err(e) = sys::set_sockopt_int(fd, level, name, value) {
            log::debug!("udp socket: {label} not set: {e}");
        }
    }
}

impl UdpDataplane for TunDataplane {
    fn kind(&self) -> crate::backend::DataplaneKind {
        crate::backend::DataplaneKind::Tun
    }
    fn set_peer(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> anyhow::Result<()> {
        let subnet = Ipv4Network::new(subnet.network(), subnet.prefix())?;
        self.update_peers(|m| {
            m.insert(subnet, public_ip);
        })
    }

    fn remove_peer(&mut self, subnet: Ipv4Network) -> anyhow::Result<()> {
        let subnet = Ipv4Network::new(subnet.network(), subnet.prefix())?;
        self.update_peers(|m| {
            m.remove(&subnet);
        })
    }

    fn sync_peers(&mut self, peers: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<()> {
        let mut fresh = HashMap::with_capacity(peers.len());
        for (subnet, ip) in peers {
            fresh.insert(Ipv4Network::new(subnet.network(), subnet.prefix())?, *ip);
        }
        self.update_peers(|m| *m = fresh)
    }

    fn stats(&self) -> anyhow::Result<DataplaneStats> {
        Ok(self.shared.counters.snapshot())
    }

    fn follow_overlay(&mut self, device: OverlayDevice) -> anyhow::Result<()> {
        Ok(self.move_to(device)?)
    }

    fn peer_table(&self) -> BTreeMap<Ipv4Network, Ipv4Addr> {
        TunDataplane::peer_table(self)
    }
}

impl Drop for TunDataplane {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

// ---------------------------------------------------------------------------------------------
// TUN -> UDP

fn tun_to_udp(shared: &Shared, tun: RawFd) {
    let mut rbuf = vec![0u8; MAX_TUN_PACKET];
    let mut batch = WireBatch::new(BATCH_BYTES + MAX_TUN_PACKET * 2, true);
    let mut lens = Vec::with_capacity(64);
    let mut icmp = Vec::with_capacity(600);
    let mut last_icmp: Option<Instant> = None;
    let mut stats = DataplaneStats::default();
    while !shared.stopping.load(Ordering::Relaxed) {
        batch.set_gso(shared.gso.load(Ordering::Relaxed));
        let mut reads = 0;
        while reads < MAX_READS_PER_BATCH && batch.buf.len() < BATCH_BYTES {
            let n = match sys::read(tun, &mut rbuf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("reading the TUN: {e}");
                    break;
                }
            };
            reads += 1;
            let Some(peers) = shared.peers.read().ok() else {
                return;
            };
            let verdict = encapsulate(shared, &peers, &mut rbuf[..n], &mut batch, &mut lens);
            drop(peers);
            match verdict {
                Ok(()) => {}
                Err(TxDrop::Packet(e)) => count_packet_error(&mut stats, e),
                Err(TxDrop::NoPeer) => {
                    stats.drop_no_peer += 1;
                    let pkt = if shared.vnet_hdr {
                        &rbuf[VNET_HDR_LEN..n]
                    } else {
                        &rbuf[..n]
                    };
                    let due = last_icmp.is_none_or(|t| t.elapsed() >= ICMP_INTERVAL);
                    if due && icmp::icmp_net_unreachable(pkt, shared.icmp_source, &mut icmp) {
                        last_icmp = Some(Instant::now());
                        let hdr = VirtioNetHdr::default().encode();
                        let vnet = shared.vnet_hdr.then_some(&hdr);
                        if let Err(e) = sys::write_tun(tun, vnet, &icmp) {
                            log::debug!("writing ICMP unreachable to the TUN: {e}");
                        }
                    }
                }
            }
        }
        if !batch.is_empty() {
            send(shared, &batch, &mut stats);
            batch.clear();
        }
        shared.counters.add(&stats);
        stats = DataplaneStats::default();
        if reads == 0 {
            match sys::wait_readable(tun, shared.stop.fd()) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::error!("TUN queue unusable, sending thread stops: {e}");
                    return;
                }
            }
        }
    }
}

enum TxDrop {
    Packet(PacketError),
    NoPeer,
}

/// Turns one TUN read into wire datagrams appended to `batch`.
fn encapsulate(
    shared: &Shared,
    peers: &PeerTable,
    raw: &mut [u8],
    batch: &mut WireBatch,
    lens: &mut Vec<usize>,
) -> Result<(), TxDrop> {
    let (vnet, pkt) = if shared.vnet_hdr {
        let hdr = VirtioNetHdr::parse(raw).ok_or(TxDrop::Packet(PacketError::Malformed))?;
        (Some(hdr), &mut raw[VNET_HDR_LEN..])
    } else {
        (None, raw)
    };
    match pkt.first() {
        Some(b) if b >> 4 == 4 => {}
        _ => return Err(TxDrop::Packet(PacketError::NotIpv4)),
    }
    let dst = ipv4::ipv4_dst(pkt).ok_or(TxDrop::Packet(PacketError::Malformed))?;
    let next_hop = peers.next_hop(dst).ok_or(TxDrop::NoPeer)?;
    lens.clear();
    if let Err(e) = segment::tun_packet_to_wire(vnet.as_ref(), pkt, &mut batch.buf, lens) {
        batch.rollback();
        return Err(TxDrop::Packet(e));
    }
    for &len in lens.iter() {
        batch.commit(next_hop, len);
    }
    Ok(())
}

fn send(shared: &Shared, batch: &WireBatch, stats: &mut DataplaneStats) {
    let fd = shared.socket.as_raw_fd();
    let report = sys::send_batch(fd, shared.port, &batch.buf, &batch.msgs);
    let mut failed = report.failed.iter().map(|(i, _)| *i).peekable();
    for (i, m) in batch.msgs.iter().enumerate() {
        if failed.peek() == Some(&i) {
            failed.next();
            continue;
        }
        stats.tx_packets += m.segs as u64;
        stats.tx_bytes += m.len as u64;
    }
    for (i, e) in report.failed {
        let m = batch.msgs[i];
        let gso_refused = m.segs > 1
            && matches!(
                e.raw_os_error(),
                Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
            );
        if gso_refused {
            if shared.gso.swap(false, Ordering::Relaxed) {
                log::warn!("kernel refused a UDP GSO send ({e}); sending datagrams one by one");
            }
            resend_one_by_one(shared, batch, &m, stats);
        } else {
            log::debug!("udp send to {} failed: {e}", m.dst);
            stats.drop_malformed += m.segs as u64;
        }
    }
}

fn resend_one_by_one(shared: &Shared, batch: &WireBatch, m: &WireMsg, stats: &mut DataplaneStats) {
    let mut single = WireBatch::new(0, false);
    let end = m.start + m.len;
    let mut at = m.start;
    while at < end {
        let len = m.seg_size.min(end - at);
        single.clear();
        single.buf.extend_from_slice(&batch.buf[at..at + len]);
        single.commit(m.dst, len);
        let report = sys::send_batch(
            shared.socket.as_raw_fd(),
            shared.port,
            &single.buf,
            &single.msgs,
        );
        if report.sent == 1 {
            stats.tx_packets += 1;
            stats.tx_bytes += len as u64;
        } else {
            stats.drop_malformed += 1;
        }
        at += len;
    }
}

// ---------------------------------------------------------------------------------------------
// UDP -> TUN

fn udp_to_tun(shared: &Shared, tun: RawFd) {
    let sock = shared.socket.as_raw_fd();
    let mut recv = RecvBatch::new(RECV_BATCH);
    let mut coalescer = TcpCoalescer::default();
    let mut scratch = Vec::with_capacity(MAX_TUN_PACKET * 2);
    let mut lens = Vec::new();
    let mut stats = DataplaneStats::default();
    let vnet_hdr = shared.vnet_hdr;
    let mut write_errors = 0u64;
    let mut emit = |hdr: &VirtioNetHdr, pkt: &[u8]| {
        let h = hdr.encode();
        if sys::write_tun(tun, vnet_hdr.then_some(&h), pkt).is_err() {
            write_errors += 1;
        }
    };
    while !shared.stopping.load(Ordering::Relaxed) {
        let n = match recv.recv(sock) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("receiving from the udp socket: {e}");
                0
            }
        };
        if n == 0 {
            match sys::wait_readable(sock, shared.stop.fd()) {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => {
                    log::error!("udp socket unusable, receiving thread stops: {e}");
                    return;
                }
            }
        }
        let Some(peers) = shared.peers.read().ok() else {
            return;
        };
        for i in 0..n {
            let d = recv.datagram(i);
            if d.truncated {
                stats.drop_malformed += 1;
                continue;
            }
            let subnets = peers.subnets_of(d.src);
            // One inner packet longer than the GRO segment size: not a GRO train but a whole
            // TSO super-packet (an eBPF node on this machine encapsulated it and a veth kept it
            // in one piece; the UDP_GRO size is then the inner MSS).
            let whole = ipv4::ipv4_total_len(d.data).is_some_and(|l| l > d.seg_size);
            let (chunk, mss_hint) = if whole {
                (d.data.len(), Some(d.seg_size))
            } else {
                (d.seg_size, None)
            };
            for seg in d.data.chunks(chunk) {
                let Some(subnets) = subnets else {
                    stats.drop_unknown_sender += 1;
                    continue;
                };
                let (pkt, inner_src) = match ipv4::inner_packet(seg) {
                    Ok(v) => v,
                    Err(e) => {
                        count_packet_error(&mut stats, e);
                        continue;
                    }
                };
                if !subnets.iter().any(|s| s.contains(inner_src)) {
                    stats.drop_spoofed_source += 1;
                    continue;
                }
                stats.rx_packets += 1;
                stats.rx_bytes += pkt.len() as u64;
                if pkt.len() > shared.mtu {
                    coalescer.flush(&mut emit);
                    match segment::oversized_tcp_for_tun(
                        pkt,
                        shared.mtu,
                        mss_hint,
                        vnet_hdr,
                        &mut scratch,
                        &mut lens,
                    ) {
                        Ok(Some(hdr)) => emit(&hdr, &scratch),
                        Ok(None) => {
                            let mut at = 0;
                            for &len in &lens {
                                emit(&VirtioNetHdr::default(), &scratch[at..at + len]);
                                at += len;
                            }
                        }
                        Err(e) => {
                            stats.rx_packets -= 1;
                            stats.rx_bytes -= pkt.len() as u64;
                            count_packet_error(&mut stats, e);
                        }
                    }
                } else if vnet_hdr {
                    coalescer.push(pkt, &mut emit);
                } else {
                    let pkt = checksum::with_complete_checksum(pkt, &mut scratch);
                    emit(&VirtioNetHdr::default(), pkt);
                }
            }
        }
        drop(peers);
        coalescer.flush(&mut emit);
        shared.counters.add(&stats);
        stats = DataplaneStats::default();
    }
    if write_errors > 0 {
        log::debug!("{write_errors} writes to the TUN failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn peer_lookup_by_destination_and_by_sender() {
        let a = Ipv4Addr::new(192, 0, 2, 1);
        let b = Ipv4Addr::new(192, 0, 2, 2);
        let t = PeerTable::from_map(HashMap::from([
            (net("10.244.1.0/24"), a),
            (net("10.244.2.0/24"), b),
            (net("10.244.3.0/25"), b),
        ]));
        assert_eq!(t.next_hop(Ipv4Addr::new(10, 244, 1, 77)), Some(a));
        assert_eq!(t.next_hop(Ipv4Addr::new(10, 244, 3, 5)), Some(b));
        assert_eq!(t.next_hop(Ipv4Addr::new(10, 244, 3, 200)), None);
        assert_eq!(t.next_hop(Ipv4Addr::new(10, 244, 9, 1)), None);
        let mut of_b = t.subnets_of(b).unwrap().to_vec();
        of_b.sort();
        assert_eq!(of_b, vec![net("10.244.2.0/24"), net("10.244.3.0/25")]);
        assert!(t.subnets_of(Ipv4Addr::new(192, 0, 2, 3)).is_none());
    }
}
