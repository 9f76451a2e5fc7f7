//! One host of the udp backend's eBPF data plane, as the BPF tests set it up inside a
//! namespace: its addresses, `flannel0` in each form the programs meet, the external veth
//! `ext0`/`ext1`, the pin directory, and the verdicts the programs answer with.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::bpf::PinnedProgram;
use crate::pktgen::{DST_MAC, SRC_MAC};
use crate::Netns;

/// TC_ACT_UNSPEC (-1): "not mine", the next TCX program or the stack gets the packet.
pub const TCX_NEXT: u32 = u32::MAX;
/// TC_ACT_OK: the stack takes the packet.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;

/// The udp backend's port.
pub const PORT: u16 = 8285;
/// This host's underlay address (on `ext0`), a peer's, and an address no peer has.
pub const OUR_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const STRANGER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
pub const OUR_SUBNET: &str = "10.244.1.0/24";
pub const PEER_SUBNET: &str = "10.244.2.0/24";
pub const NETWORK: &str = "10.244.0.0/16";

/// The MAC of a VXLAN `flannel0`: decap writes it into the frames it hands on.
pub const OVERLAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];

/// Fails loudly unless the eBPF object is compiled into flannel-agent (pass
/// `EbpfDataplane::embedded()`).
pub fn require_object(embedded: bool) {
    assert!(
        embedded,
        "the eBPF object is not compiled into flannel-agent: run `cargo xtask build-ebpf`, then rebuild the tests"
    );
}

/// What `flannel0` is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Flannel0 {
    /// A TUN with a reader (the programs work either way).
    TunRead,
    /// A persistent TUN nobody reads (NO-CARRIER).
    Tun,
    /// An ifb without ARP, what older versions of the agent's eBPF mode created.
    Ifb,
    /// A kernel VXLAN device on our port (VNI 1, no learning, ARP off, [`OVERLAY_MAC`]),
    /// what the agent's eBPF mode creates now: the loader then sets `CONFIG_F_KERNEL_RX`.
    Vxlan,
}

/// Creates `flannel0` of `kind` in `ns` with `subnet`'s network address (/32), MTU 1472, up,
/// and the route to the whole network through it. Returns the reader of a `TunRead`.
pub fn add_flannel0(ns: &Netns, kind: Flannel0, subnet: &str) -> Option<OwnedFd> {
    let tun = match kind {
        Flannel0::TunRead => Some(ns.enter(open_tun)),
        Flannel0::Tun => {
            ns.ip(&["tuntap", "add", "dev", "flannel0", "mode", "tun"])
                .expect("ip");
            None
        }
        Flannel0::Ifb => {
            ns.ip(&["link", "add", "flannel0", "type", "ifb"])
                .expect("ip");
            ns.ip(&["link", "set", "flannel0", "arp", "off"])
                .expect("ip");
            None
        }
        Flannel0::Vxlan => {
            let port = PORT.to_string();
            ns.ip(&[
                "link",
                "add",
                "flannel0",
                "address",
                &mac(OVERLAY_MAC),
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                &port,
                "nolearning",
            ])
            .expect("ip");
            ns.ip(&["link", "set", "flannel0", "arp", "off"])
                .expect("ip");
            None
        }
    };
    // As the agent does: IPv6 autoconfiguration (router solicitations, which encap drops)
    // would count drops in between.
    ns.sysctl("net.ipv6.conf.flannel0.disable_ipv6", "1")
        .expect("sysctl");
    let network = subnet.split('/').next().expect("subnet");
    ns.ip(&["addr", "add", &format!("{network}/32"), "dev", "flannel0"])
        .expect("ip");
    ns.ip(&["link", "set", "flannel0", "mtu", "1472", "up"])
        .expect("ip");
    ns.ip(&["route", "add", NETWORK, "dev", "flannel0"])
        .expect("ip");
    tun
}

/// Creates the veth `ext0` (at OUR_IP/24, MAC [`DST_MAC`]: generated frames arrive as for
/// this host) with its far end `ext1` (MAC [`SRC_MAC`]) in the same namespace, both up.
pub fn add_ext0_pair(ns: &Netns) {
    ns.ip(&[
        "link", "add", "ext0", "type", "veth", "peer", "name", "ext1",
    ])
    .expect("ip");
    ns.ip(&["link", "set", "ext0", "address", &mac(DST_MAC)])
        .expect("ip");
    ns.ip(&["link", "set", "ext1", "address", &mac(SRC_MAC)])
        .expect("ip");
    ns.ip(&["addr", "add", &format!("{OUR_IP}/24"), "dev", "ext0"])
        .expect("ip");
    ns.ip(&["link", "set", "ext0", "up"]).expect("ip");
    ns.ip(&["link", "set", "ext1", "up"]).expect("ip");
}

/// The pin directory of the data plane a test loads in `ns` (its own, named after it).
pub fn pin_dir(ns: &Netns) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/{}", ns.name))
}

/// The pinned decap program under `pin_dir`: the XDP one, or the TC one.
pub fn decap_program(pin_dir: &Path, xdp: bool) -> PinnedProgram {
    if xdp {
        PinnedProgram::xdp(&pin_dir.join("flannel_decap_xdp"))
    } else {
        PinnedProgram::tc(&pin_dir.join("flannel_decap"))
    }
}

/// The config entry the loader wrote (the pinned `flannel_config`).
pub fn pinned_config(pin_dir: &Path) -> flannel_common::Config {
    use aya::maps::{Array, Map, MapData};
    let path = pin_dir.join(flannel_common::map_names::CONFIG);
    let data = MapData::from_pin(&path).expect("pinned config map");
    let array: Array<MapData, flannel_common::Config> =
        Array::try_from(Map::Array(data)).expect("config array");
    array.get(&0, 0).expect("config entry")
}

/// `aa:bb:..`, as `ip` takes a MAC.
pub fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Creates `flannel0` (IFF_TUN | IFF_NO_PI) in the current namespace.
fn open_tun() -> OwnedFd {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let path = CString::new("/dev/net/tun").expect("path");
    // SAFETY: plain open of a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open /dev/net/tun: {}", io::Error::last_os_error());
    // SAFETY: fd was just opened and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ifr = [0u8; 40]; // struct ifreq: name[16], flags
    ifr[..8].copy_from_slice(b"flannel0");
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads an ifreq, which ifr is large enough to be.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, ifr.as_mut_ptr()) };
    assert!(rc == 0, "TUNSETIFF: {}", io::Error::last_os_error());
    fd
}
