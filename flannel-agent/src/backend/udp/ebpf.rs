//! The eBPF data plane of the udp backend: loads `flannel-ebpf`, pins its maps, programs and
//! TCX links under a pin directory, and keeps the peer map in step with the leases.
//!
//! Pin layout (`<pin_dir>`, default /sys/fs/bpf/flannel):
//! - maps `flannel_peers`, `flannel_senders`, `flannel_config`, `flannel_stats`
//!   (`bpftool map dump pinned <pin_dir>/flannel_peers` shows field names);
//! - programs `flannel_encap` (TC egress of the overlay TUN) and `flannel_decap` (TC ingress of
//!   the external device);
//! - TCX links `flannel_encap_link`, `flannel_decap_link`;
//! - with XDP decap (`--udp-decap`), program `flannel_decap_xdp` and its XDP link
//!   `flannel_decap_xdp_link` on the external device. The TC decap stays attached then: it
//!   hands the packets XDP decapsulated (and GRO merged) to the overlay device.
//!
//! Everything stays in the kernel when the agent exits. A new agent adopts it: maps are reused
//! (peers survive; sizes are checked), programs replace the old ones atomically through the
//! pinned links (`bpf_link_update`), so traffic keeps flowing across a restart.
//! [`EbpfDataplane::unload`] removes it all.
//!
//! Delivery of decapsulated packets: redirected to the ingress of the overlay TUN, so the host
//! sees them arrive on `flannel0` exactly as with upstream's TUN proxy; strict rp_filter works
//! and iptables rules written for upstream (`-i flannel0`) still match. The caller still needs
//! IPv4 forwarding on.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::xdp::XdpLink;
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use flannel_common::{
    map_names, prog_names, Config, PeerKey, PeerValue, SenderKey, SenderValue, Stats,
    CONFIG_F_COMPLETE_CSUM, CONFIG_F_OVERLAY_L2, MAX_PEERS,
};
use ipnetwork::Ipv4Network;

use super::{DataplaneStats, UdpDataplane};
use crate::cli::UdpDecap;

/// The compiled eBPF object, when the build found it (see build.rs).
#[cfg(flannel_ebpf_embedded)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("FLANNEL_EBPF_OBJECT")));
#[cfg(not(flannel_ebpf_embedded))]
static OBJECT: Option<&[u8]> = None;

/// Default pin directory, one per agent: agents sharing a machine need distinct ones.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flannel";

/// File names of the pinned links (next to the maps and programs, which use their own names).
pub const ENCAP_LINK: &str = "flannel_encap_link";
pub const DECAP_LINK: &str = "flannel_decap_link";
pub const DECAP_XDP_LINK: &str = "flannel_decap_xdp_link";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

#[derive(Debug, Clone)]
pub struct EbpfOptions {
    /// Where maps, programs and links are pinned (on a bpffs).
    pub pin_dir: PathBuf,
    /// The overlay TUN (`flannel0`): encap on its egress, decapsulated packets enter here.
    pub overlay_ifindex: u32,
    /// The external (underlay) device: decap on its ingress, encapsulated packets leave here.
    pub ext_ifindex: u32,
    /// Our public IP: outer source of what we send, outer destination of what we accept.
    pub ext_ip: Ipv4Addr,
    /// UDP port (source and destination), upstream default 8285.
    pub port: u16,
    /// The overlay network (e.g. 10.244.0.0/16).
    pub network: Ipv4Network,
    /// Our lease; its prefix length is the length of every subnet in the network.
    pub own_subnet: Ipv4Network,
    /// Where to decapsulate: XDP, TC, or chosen per device.
    pub decap: UdpDecap,
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the eBPF object is not compiled into this binary (run `cargo xtask build-ebpf`, then rebuild)")]
    NotEmbedded,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not on a bpf filesystem")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("no network interface with index {0}")]
    NoSuchInterface(u32),
    #[error("subnet {subnet} is not a /{expected} like every subnet of the network")]
    SubnetLength { subnet: Ipv4Network, expected: u8 },
    #[error("--udp-decap=xdp: {ifname} (driver {driver}) has no native XDP: {source}")]
    NoNativeXdp {
        ifname: String,
        driver: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("{0} leftover entries remain in {1}")]
    NotEmpty(usize, PathBuf),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EbpfError {
    let context = context.into();
    move |source| EbpfError::Io { context, source }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

/// The loaded data plane: handles on the pinned maps plus our view of the peer table.
pub struct EbpfDataplane {
    peers: HashMap<MapData, PeerKey, PeerValue>,
    senders: HashMap<MapData, SenderKey, SenderValue>,
    stats: PerCpuArray<MapData, Stats>,
    subnet_len: u8,
    /// What the peer map holds (normalised subnets), to diff against.
    table: BTreeMap<Ipv4Network, Ipv4Addr>,
    /// How many subnets each public IP in `table` owns (what the sender map holds).
    sender_counts: BTreeMap<Ipv4Addr, u32>,
}

impl EbpfDataplane {
    /// Whether the eBPF object was compiled into this binary.
    pub fn embedded() -> bool {
        OBJECT.is_some()
    }

    /// Loads the programs (adopting whatever a previous agent pinned in `opts.pin_dir`), writes
    /// the configuration, and attaches encap to the overlay's egress and decap to the external
    /// device's ingress.
    pub fn load(opts: &EbpfOptions) -> Result<Self, EbpfError> {
        let object = OBJECT.ok_or(EbpfError::NotEmbedded)?;
        Self::load_object(object, opts)
    }

    /// [`Self::load`] with an explicit object (tests, tools).
    pub fn load_object(object: &[u8], opts: &EbpfOptions) -> Result<Self, EbpfError> {
        let overlay_name = interface_name(opts.overlay_ifindex)?;
        let ext_name = interface_name(opts.ext_ifindex)?;
        prepare_pin_dir(&opts.pin_dir)?;
        drop_incompatible_maps(&opts.pin_dir)?;

        let map_paths: Vec<(&'static str, PathBuf)> = map_names::ALL
            .iter()
            .map(|name| (*name, opts.pin_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut bpf = loader.load(object).map_err(Box::new)?;

        let driver = driver_name(&ext_name);
        let complete_csum = driver.as_deref().is_some_and(passes_partial_checksums);
        if complete_csum {
            log::info!(
                "{ext_name} (driver {}) hands checksum-offloaded packets on unfinished: the encap program completes inner checksums",
                driver.as_deref().unwrap_or("?")
            );
        }
        // An Ethernet overlay device (the ifb): its frames carry a MAC header, and delivered
        // frames must be addressed to it.
        let overlay_mac = ethernet_address(&overlay_name);
        let mut flags = 0;
        if complete_csum {
            flags |= CONFIG_F_COMPLETE_CSUM;
        }
        if overlay_mac.is_some() {
            flags |= CONFIG_F_OVERLAY_L2;
        }
        let config = Config {
            public_ip: opts.ext_ip.octets(),
            network: opts.network.network().octets(),
            network_mask: opts.network.mask().octets(),
            subnet_mask: opts.own_subnet.mask().octets(),
            ext_ifindex: opts.ext_ifindex,
            decap_ifindex: opts.overlay_ifindex,
            port: opts.port,
            ready: 1,
            flags,
            overlay_mac: overlay_mac.unwrap_or_default(),
            _reserved: 0,
            ext_mac: ethernet_address(&ext_name).unwrap_or_default(),
            _reserved2: 0,
        };
        {
            let map = bpf
                .map_mut(map_names::CONFIG)
                .ok_or(EbpfError::Missing(map_names::CONFIG))?;
            let mut array: Array<&mut MapData, Config> =
                Array::try_from(map).map_err(map_err(map_names::CONFIG))?;
            array
                .set(0, config, 0)
                .map_err(map_err(map_names::CONFIG))?;
        }

        attach(
            &mut bpf,
            prog_names::ENCAP,
            &overlay_name,
            opts.overlay_ifindex,
            TcAttachType::Egress,
            &opts.pin_dir,
            ENCAP_LINK,
        )?;
        attach(
            &mut bpf,
            prog_names::DECAP,
            &ext_name,
            opts.ext_ifindex,
            TcAttachType::Ingress,
            &opts.pin_dir,
            DECAP_LINK,
        )?;
        set_up_xdp_decap(&mut bpf, opts, &ext_name, driver.as_deref().unwrap_or("?"))?;

        let peers = take_map(&mut bpf, map_names::PEERS)?;
        let peers: HashMap<MapData, PeerKey, PeerValue> =
            HashMap::try_from(peers).map_err(map_err(map_names::PEERS))?;
        let senders = take_map(&mut bpf, map_names::SENDERS)?;
        let senders: HashMap<MapData, SenderKey, SenderValue> =
            HashMap::try_from(senders).map_err(map_err(map_names::SENDERS))?;
        let stats = take_map(&mut bpf, map_names::STATS)?;
        let stats: PerCpuArray<MapData, Stats> =
            PerCpuArray::try_from(stats).map_err(map_err(map_names::STATS))?;

        let subnet_len = opts.own_subnet.prefix();
        let mut table = BTreeMap::new();
        for entry in peers.iter() {
            let (key, value) = entry.map_err(map_err(map_names::PEERS))?;
            let subnet =
                Ipv4Network::new(Ipv4Addr::from(key.subnet), subnet_len).map_err(|_| {
                    EbpfError::SubnetLength {
                        subnet: Ipv4Network::from(Ipv4Addr::from(key.subnet)),
                        expected: subnet_len,
                    }
                })?;
            table.insert(subnet, Ipv4Addr::from(value.public_ip));
        }
        let mut dataplane = EbpfDataplane {
            peers,
            senders,
            stats,
            subnet_len,
            table,
            sender_counts: BTreeMap::new(),
        };
        dataplane.rebuild_senders()?;
        log::info!(
            "eBPF udp data plane attached (overlay ifindex {}, external ifindex {}, pins in {}, {} peers adopted)",
            opts.overlay_ifindex,
            opts.ext_ifindex,
            opts.pin_dir.display(),
            dataplane.table.len()
        );
        // `bpf` drops here: the programs live on through their pinned links.
        Ok(dataplane)
    }

    /// Detaches the programs and removes everything this data plane pinned in `pin_dir`, then
    /// the directory itself. Succeeds when there is nothing to remove.
    pub fn unload(pin_dir: &Path) -> Result<(), EbpfError> {
        if !pin_dir.exists() {
            return Ok(());
        }
        for link in [DECAP_XDP_LINK, ENCAP_LINK, DECAP_LINK] {
            let path = pin_dir.join(link);
            if path.exists() {
                // Detach explicitly: another process may still hold the link open.
                if let Ok(fd) = obj_get(&path) {
                    if let Err(e) = link_detach(fd.as_fd()) {
                        log::warn!("detaching {}: {e}", path.display());
                    }
                }
                remove_pin(&path)?;
            }
        }
        let names = [prog_names::ENCAP, prog_names::DECAP, prog_names::DECAP_XDP]
            .into_iter()
            .chain(map_names::ALL);
        for name in names {
            let path = pin_dir.join(name);
            if path.exists() {
                remove_pin(&path)?;
            }
        }
        // The namespace marker of pin_lock.rs.
        let _ = std::fs::remove_file(pin_dir.join(super::pin_lock::NETNS_MARKER));
        match std::fs::remove_dir(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
                let left = std::fs::read_dir(pin_dir).map(|d| d.count()).unwrap_or(0);
                Err(EbpfError::NotEmpty(left, pin_dir.to_path_buf()))
            }
            Err(e) => Err(io_err(format!("removing {}", pin_dir.display()))(e)),
        }
    }

    /// The peer table as the kernel map holds it.
    pub fn peers(&self) -> &BTreeMap<Ipv4Network, Ipv4Addr> {
        &self.table
    }

    fn normalise(&self, subnet: Ipv4Network) -> Result<Ipv4Network, EbpfError> {
        if subnet.prefix() != self.subnet_len {
            return Err(EbpfError::SubnetLength {
                subnet,
                expected: self.subnet_len,
            });
        }
        Ipv4Network::new(subnet.network(), subnet.prefix()).map_err(|_| EbpfError::SubnetLength {
            subnet,
            expected: self.subnet_len,
        })
    }

    fn insert_peer(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> Result<(), EbpfError> {
        let subnet = self.normalise(subnet)?;
        if self.table.get(&subnet) == Some(&public_ip) {
            return Ok(());
        }
        let key = PeerKey {
            subnet: subnet.network().octets(),
        };
        let value = PeerValue {
            public_ip: public_ip.octets(),
        };
        self.peers
            .insert(key, value, 0)
            .map_err(map_err(map_names::PEERS))?;
        let old = self.table.insert(subnet, public_ip);
        self.count_sender(public_ip, 1)?;
        if let Some(old) = old {
            self.count_sender(old, -1)?;
        }
        Ok(())
    }

    fn delete_peer(&mut self, subnet: Ipv4Network) -> Result<(), EbpfError> {
        let subnet = self.normalise(subnet)?;
        let key = PeerKey {
            subnet: subnet.network().octets(),
        };
        match self.peers.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map_names::PEERS)(e)),
        }
        if let Some(old) = self.table.remove(&subnet) {
            self.count_sender(old, -1)?;
        }
        Ok(())
    }

    /// Adds `delta` to the number of subnets `public_ip` owns and writes it to the sender map
    /// (removing the entry at 0).
    fn count_sender(&mut self, public_ip: Ipv4Addr, delta: i32) -> Result<(), EbpfError> {
        let count = self.sender_counts.entry(public_ip).or_default();
        *count = count.saturating_add_signed(delta);
        let subnets = *count;
        let key = SenderKey {
            public_ip: public_ip.octets(),
        };
        let result = if subnets == 0 {
            self.sender_counts.remove(&public_ip);
            match self.senders.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        } else {
            self.senders.insert(key, SenderValue { subnets }, 0)
        };
        result.map_err(map_err(map_names::SENDERS))
    }

    /// Makes the sender map match the peer table exactly (after adopting pinned maps).
    fn rebuild_senders(&mut self) -> Result<(), EbpfError> {
        let mut wanted: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for ip in self.table.values() {
            *wanted.entry(*ip).or_default() += 1;
        }
        let present: Vec<SenderKey> = self
            .senders
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::SENDERS))?;
        for key in present {
            if !wanted.contains_key(&Ipv4Addr::from(key.public_ip)) {
                match self.senders.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(map_names::SENDERS)(e)),
                }
            }
        }
        for (ip, subnets) in &wanted {
            let (ip, subnets) = (*ip, *subnets);
            self.senders
                .insert(
                    SenderKey {
                        public_ip: ip.octets(),
                    },
                    SenderValue { subnets },
                    0,
                )
                .map_err(map_err(map_names::SENDERS))?;
        }
        self.sender_counts = wanted;
        Ok(())
    }
}

impl UdpDataplane for EbpfDataplane {
    fn set_peer(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> anyhow::Result<()> {
        Ok(self.insert_peer(subnet, public_ip)?)
    }

    fn remove_peer(&mut self, subnet: Ipv4Network) -> anyhow::Result<()> {
        Ok(self.delete_peer(subnet)?)
    }

    fn sync_peers(&mut self, peers: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<()> {
        let mut wanted = BTreeMap::new();
        let mut rejected = Vec::new();
        for (subnet, ip) in peers {
            match self.normalise(*subnet) {
                Ok(s) => {
                    wanted.insert(s, *ip);
                }
                Err(e) => rejected.push(e.to_string()),
            }
        }
        let stale: Vec<Ipv4Network> = self
            .table
            .keys()
            .filter(|s| !wanted.contains_key(*s))
            .copied()
            .collect();
        for subnet in stale {
            self.delete_peer(subnet)?;
        }
        for (subnet, ip) in wanted {
            self.insert_peer(subnet, ip)?;
        }
        if !rejected.is_empty() {
            anyhow::bail!("peers not installed: {}", rejected.join("; "));
        }
        Ok(())
    }

    fn stats(&self) -> anyhow::Result<DataplaneStats> {
        let per_cpu = self.stats.get(&0, 0).map_err(map_err(map_names::STATS))?;
        let mut total = DataplaneStats::default();
        for s in per_cpu.iter() {
            total.add(s);
        }
        Ok(total)
    }
}

/// Sums the per-CPU counters of the map pinned in `pin_dir`.
pub fn read_pinned_stats(pin_dir: &Path) -> Result<Stats, EbpfError> {
    let data =
        MapData::from_pin(pin_dir.join(map_names::STATS)).map_err(map_err(map_names::STATS))?;
    let map = aya::maps::Map::PerCpuArray(data);
    let array: PerCpuArray<MapData, Stats> =
        PerCpuArray::try_from(map).map_err(map_err(map_names::STATS))?;
    let per_cpu = array.get(&0, 0).map_err(map_err(map_names::STATS))?;
    let mut t = Stats::default();
    for s in per_cpu.iter() {
        t.add(s);
    }
    Ok(t)
}

/// Drivers of virtual wires: they accept checksum offload and hand the packet to the other
/// side (another namespace, the hypervisor, another VM) with the checksum still unfinished,
/// where a user-space receiver (upstream flanneld, a TUN node) gets it as it is. A physical
/// NIC computes offloaded checksums in hardware.
const VIRTUAL_WIRE_DRIVERS: [&str; 4] = ["veth", "virtio_net", "tun", "netkit"];

fn passes_partial_checksums(driver: &str) -> bool {
    VIRTUAL_WIRE_DRIVERS.contains(&driver)
}

/// The MAC address of `ifname` when it is an Ethernet device (SIOCGIFHWADDR); None for a TUN
/// or when the device cannot be asked.
fn ethernet_address(ifname: &str) -> Option<[u8; 6]> {
    const ARPHRD_ETHER: u16 = 1;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IF_NAMESIZE - 1))
    {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFHWADDR reads and writes the ifreq, which lives for the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCGIFHWADDR,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return None;
    }
    // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
    let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
    if hw.sa_family != ARPHRD_ETHER {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *m = *b as u8;
    }
    Some(mac)
}

/// The driver of `ifname` (ETHTOOL_GDRVINFO), None when the device does not say.
fn driver_name(ifname: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], ...; 196 bytes in all.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IF_NAMESIZE - 1))
    {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = info.as_mut_ptr().cast();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL reads the ifreq and writes into `info`, both alive for the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCETHTOOL,
            &mut req as *mut libc::ifreq,
        )
    };
    if rc < 0 {
        return None;
    }
    let driver = &info[4..36];
    let end = driver.iter().position(|&b| b == 0).unwrap_or(driver.len());
    std::str::from_utf8(&driver[..end]).ok().map(str::to_string)
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    bpf.take_map(name).ok_or(EbpfError::Missing(name))
}

fn interface_name(ifindex: u32) -> Result<String, EbpfError> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(EbpfError::NoSuchInterface(ifindex));
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// Creates `pin_dir`, mounting bpffs on /sys/fs/bpf first if that is where it goes and
/// nothing is mounted there yet (fresh machines).
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), EbpfError> {
    let bpffs_root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(bpffs_root) && !is_bpffs(bpffs_root) {
        nix::mount::mount(
            Some("bpf"),
            bpffs_root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io_err("mounting bpffs on /sys/fs/bpf")(io::Error::from(e)))?;
    }
    std::fs::create_dir_all(pin_dir).map_err(io_err(format!("creating {}", pin_dir.display())))?;
    if !is_bpffs(pin_dir) {
        return Err(EbpfError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Pinned maps whose layout differs from this build's (an older agent) cannot be reused: the
/// verifier would reject the programs. Drop those pins so fresh maps get created; the agent
/// re-syncs the peers right after loading anyway.
fn drop_incompatible_maps(pin_dir: &Path) -> Result<(), EbpfError> {
    let expected: [(&str, usize, usize, u32); 4] = [
        (
            map_names::PEERS,
            size_of::<PeerKey>(),
            size_of::<PeerValue>(),
            MAX_PEERS,
        ),
        (
            map_names::SENDERS,
            size_of::<SenderKey>(),
            size_of::<SenderValue>(),
            MAX_PEERS,
        ),
        (map_names::CONFIG, 4, size_of::<Config>(), 1),
        (map_names::STATS, 4, size_of::<Stats>(), 1),
    ];
    for (name, key_size, value_size, max_entries) in expected {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let compatible = MapInfo::from_pin(&path).is_ok_and(|info| {
            info.key_size() as usize == key_size
                && info.value_size() as usize == value_size
                && info.max_entries() == max_entries
        });
        if !compatible {
            log::warn!(
                "pinned map {} has another layout: recreating it",
                path.display()
            );
            remove_pin(&path)?;
        }
    }
    Ok(())
}

fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
}

/// Loads program `name`, pins it, and attaches it with a pinned TCX link: replacing the
/// program of an existing pinned link on the same device and direction atomically, else
/// creating a new link (and dropping a stale one).
fn attach(
    bpf: &mut Ebpf,
    name: &'static str,
    ifname: &str,
    ifindex: u32,
    direction: TcAttachType,
    pin_dir: &Path,
    link_file: &str,
) -> Result<(), EbpfError> {
    let program: &mut SchedClassifier = bpf
        .program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(prog_err(name))?;
    program.load().map_err(prog_err(name))?;

    let prog_path = pin_dir.join(name);
    remove_pin(&prog_path)?;
    program.pin(&prog_path).map_err(|source| EbpfError::Pin {
        path: prog_path.clone(),
        source,
    })?;

    let attach_type = match direction {
        TcAttachType::Egress => BPF_TCX_EGRESS,
        _ => BPF_TCX_INGRESS,
    };
    let link_path = pin_dir.join(link_file);
    if link_path.exists() {
        match adopt_link(&link_path, ifindex, attach_type) {
            Ok(Some(link)) => {
                let id = program.attach_to_link(link).map_err(prog_err(name))?;
                // The pin keeps the link; our handle may go.
                let _ = program.take_link(id).map_err(prog_err(name))?;
                return Ok(());
            }
            Ok(None) => {
                log::info!(
                    "pinned link {} is for another device or detached: replacing it",
                    link_path.display()
                );
            }
            Err(e) => log::warn!(
                "pinned link {} unusable ({e}): replacing it",
                link_path.display()
            ),
        }
        if let Ok(fd) = obj_get(&link_path) {
            let _ = link_detach(fd.as_fd());
        }
        remove_pin(&link_path)?;
    }
    let id = program
        .attach_with_options(
            ifname,
            direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(prog_err(name))?;
    let link = program.take_link(id).map_err(prog_err(name))?;
    let link: FdLink = link.try_into().map_err(|source| EbpfError::Link {
        path: link_path.clone(),
        source,
    })?;
    link.pin(&link_path).map_err(|source| EbpfError::Pin {
        path: link_path.clone(),
        source,
    })?;
    Ok(())
}

/// The device XDP decap's pinned link in `pin_dir` is attached to, if any (0: its device is
/// gone).
pub fn xdp_decap_ifindex(pin_dir: &Path) -> Option<u32> {
    let fd = obj_get(&pin_dir.join(DECAP_XDP_LINK)).ok()?;
    match link_target(fd.as_fd()).ok()? {
        (BPF_LINK_TYPE_XDP, ifindex, _) => Some(ifindex),
        _ => None,
    }
}

/// Attaches (or adopts) XDP decap on the external device when `opts.decap` asks for it or
/// `auto` finds it worthwhile, else removes an XDP link an earlier run left.
fn set_up_xdp_decap(
    bpf: &mut Ebpf,
    opts: &EbpfOptions,
    ext_name: &str,
    driver: &str,
) -> Result<(), EbpfError> {
    let link_path = opts.pin_dir.join(DECAP_XDP_LINK);
    let gro = gro_enabled(ext_name);
    let want_xdp = match opts.decap {
        UdpDecap::Tc => {
            log::info!("decapsulating on TC ingress of {ext_name} (--udp-decap=tc)");
            false
        }
        UdpDecap::Xdp => true,
        UdpDecap::Auto if gro == Some(true) => true,
        UdpDecap::Auto => {
            log::info!(
                "decapsulating on TC ingress of {ext_name}: GRO is off there, so XDP decap would merge nothing (and on a veth it costs the peer its TSO)"
            );
            false
        }
    };
    if want_xdp {
        match attach_xdp(bpf, opts.ext_ifindex, &opts.pin_dir, &link_path) {
            Ok(()) => {
                log::info!(
                    "decapsulating with native XDP on {ext_name} (driver {driver}, --udp-decap={}): before GRO, which then merges the inner TCP stream",
                    if opts.decap == UdpDecap::Xdp { "xdp" } else { "auto, GRO on" }
                );
                return Ok(());
            }
            Err(source) if opts.decap == UdpDecap::Auto => {
                log::info!(
                    "decapsulating on TC ingress of {ext_name}: driver {driver} has no native XDP ({source})"
                );
            }
            Err(source) => {
                return Err(EbpfError::NoNativeXdp {
                    ifname: ext_name.to_string(),
                    driver: driver.to_string(),
                    source: Box::new(source),
                })
            }
        }
    }
    if link_path.exists() {
        if let Ok(fd) = obj_get(&link_path) {
            let _ = link_detach(fd.as_fd());
        }
        remove_pin(&link_path)?;
    }
    remove_pin(&opts.pin_dir.join(prog_names::DECAP_XDP))
}

/// Loads and pins XDP decap and attaches it in driver mode with a pinned link, replacing the
/// program of a pinned link on the same device atomically.
fn attach_xdp(
    bpf: &mut Ebpf,
    ifindex: u32,
    pin_dir: &Path,
    link_path: &Path,
) -> Result<(), ProgramError> {
    let name = prog_names::DECAP_XDP;
    let program: &mut Xdp = bpf
        .program_mut(name)
        .ok_or_else(|| ProgramError::UnexpectedProgramType)?
        .try_into()?;
    program.load()?;
    let prog_path = pin_dir.join(name);
    let _ = std::fs::remove_file(&prog_path);
    program
        .pin(&prog_path)
        .map_err(|e| ProgramError::IOError(io::Error::other(e)))?;
    if link_path.exists() {
        let target = obj_get(link_path)
            .ok()
            .and_then(|fd| link_target(fd.as_fd()).ok());
        if target.is_some_and(|(kind, dev, _)| kind == BPF_LINK_TYPE_XDP && dev == ifindex) {
            let pinned = PinnedLink::from_pin(link_path)
                .map_err(|e| ProgramError::IOError(io::Error::other(e)))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| ProgramError::IOError(io::Error::other(e)))?;
            let id = program.attach_to_link(link)?;
            let _ = program.take_link(id)?;
            return Ok(());
        }
        log::info!(
            "pinned link {} is for another device or detached: replacing it",
            link_path.display()
        );
        if let Ok(fd) = obj_get(link_path) {
            let _ = link_detach(fd.as_fd());
        }
        let _ = std::fs::remove_file(link_path);
    }
    let id = program.attach_to_if_index(ifindex, XdpMode::Driver)?;
    let link = program.take_link(id)?;
    let link: FdLink = link
        .try_into()
        .map_err(|e: LinkError| ProgramError::IOError(io::Error::other(e)))?;
    link.pin(link_path)
        .map_err(|e| ProgramError::IOError(io::Error::other(e)))?;
    Ok(())
}

/// Whether `ifname` has GRO on (ETHTOOL_GGRO); None when the device does not say.
fn gro_enabled(ifname: &str) -> Option<bool> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    // struct ethtool_value: cmd, data.
    let mut value = [0u32; 2];
    value[0] = ETHTOOL_GGRO;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IF_NAMESIZE - 1))
    {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = value.as_mut_ptr().cast();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCETHTOOL reads the ifreq and writes into `value`, both alive for the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCETHTOOL,
            &mut req as *mut libc::ifreq,
        )
    };
    (rc >= 0).then_some(value[1] != 0)
}

/// The pinned TCX link at `path` if it is still attached to `ifindex` in direction
/// `attach_type`.
fn adopt_link(
    path: &Path,
    ifindex: u32,
    attach_type: u32,
) -> Result<Option<SchedClassifierLink>, EbpfError> {
    let fd = obj_get(path)?;
    let (link_ifindex, link_attach_type) = tcx_link_target(fd.as_fd())?;
    drop(fd);
    if link_ifindex != ifindex || link_attach_type != attach_type {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(path).map_err(|source| EbpfError::Link {
        path: path.to_path_buf(),
        source,
    })?;
    let link =
        SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|source| EbpfError::Link {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(Some(link))
}

// Raw bpf(2) calls aya 0.14 does not offer: open any pinned object, read a TCX link's target,
// force-detach a link.

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_TYPE_TCX: u32 = 11;
const BPF_LINK_TYPE_XDP: u32 = 6;

/// `union bpf_attr` is at most this big for the commands used here; zero-filled.
#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn new() -> Self {
        BpfAttr([0; 128])
    }
    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a zero-initialised bpf_attr-sized buffer filled for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BpfAttr,
            size_of::<BpfAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

fn obj_get(path: &Path) -> Result<OwnedFd, EbpfError> {
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| EbpfError::Io {
            context: format!("{}", path.display()),
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
    let mut attr = BpfAttr::new();
    attr.put_u64(0, c_path.as_ptr() as u64);
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)
        .map_err(io_err(format!("opening pinned {}", path.display())))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// (ifindex, attach type) of a TCX link; ifindex 0 once its device is gone.
fn tcx_link_target(fd: BorrowedFd<'_>) -> Result<(u32, u32), EbpfError> {
    let (link_type, ifindex, attach_type) = link_target(fd)?;
    if link_type != BPF_LINK_TYPE_TCX {
        return Ok((0, 0));
    }
    Ok((ifindex, attach_type))
}

/// (link type, first two words of its union) of a link: for TCX (ifindex, attach type), for
/// XDP (ifindex, 0).
fn link_target(fd: BorrowedFd<'_>) -> Result<(u32, u32, u32), EbpfError> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union; tcx = {ifindex, attach_type}.
    let mut info = [0u32; 32];
    let mut attr = BpfAttr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u32(4, size_of_val(&info) as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map_err(io_err("reading link info"))?;
    Ok((info[0], info[4], info[5]))
}

fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}
