//! Types shared by the eBPF programs and the user-space agent.
//!
//! Everything here is `#[repr(C)]`, `no_std` and free of padding surprises so both sides agree
//! on the byte layout of map keys and values. IPv4 addresses are `[u8; 4]` in packet (network)
//! order: the programs compare them with packet bytes directly, and `bpftool map dump` shows
//! them as readable `[10,244,1,0]`.
#![no_std]

pub mod counters;
pub use counters::{Counter, Stats};

/// Kernel names of the maps (and file names of their pins in the pin directory).
pub mod map_names {
    /// Peer table: subnet network address -> peer public IP ([`crate::PeerKey`] -> [`crate::PeerValue`]).
    pub const PEERS: &str = "flannel_peers";
    /// Public IPs of peers -> number of subnets they own ([`crate::SenderKey`] -> [`crate::SenderValue`]).
    pub const SENDERS: &str = "flannel_senders";
    /// One [`crate::Config`] at index 0.
    pub const CONFIG: &str = "flannel_config";
    /// Per-CPU [`crate::Stats`] at index 0.
    pub const STATS: &str = "flannel_stats";
    /// All maps, for pinning and uninstalling.
    pub const ALL: [&str; 4] = [PEERS, SENDERS, CONFIG, STATS];
}

/// Kernel names of the programs.
pub mod prog_names {
    /// TC egress on the overlay device (`flannel0`): encapsulates.
    pub const ENCAP: &str = "flannel_encap";
    /// TC ingress on the external (underlay) device: decapsulates.
    pub const DECAP: &str = "flannel_decap";
    /// Native XDP on the external device: decapsulates before GRO (see `--udp-decap`).
    pub const DECAP_XDP: &str = "flannel_decap_xdp";
    /// TC ingress on the overlay device: lets in only what decap handed it.
    pub const OVERLAY_IN: &str = "flannel_overlay_in";
    /// Never attached: test-run once at start to learn what the kernel's helpers take.
    pub const PROBE: &str = "flannel_probe";
    /// The programs that are attached (and pinned).
    pub const ALL: [&str; 4] = [ENCAP, DECAP, DECAP_XDP, OVERLAY_IN];
}

/// What `flannel_probe` returns: a bit per `bpf_skb_adjust_room` form the kernel took.
pub mod probe {
    /// Encapsulation: grow by outer IPv4 + UDP with `ENCAP_L3_IPV4 | ENCAP_L4_UDP`.
    pub const ENCAP_UDP: i32 = 1 << 0;
    /// Decapsulation that also clears the UDP tunnel state (`BPF_F_ADJ_ROOM_DECAP_L4_UDP`).
    pub const DECAP_L4_UDP: i32 = 1 << 1;
}

/// What decap leaves in `skb->tc_index` (unused by the kernel since tcindex and dsmark are
/// gone) on every packet it hands the overlay device, redirected or through the kernel's
/// VXLAN receive; `flannel_overlay_in` drops what arrives without it (VXLAN sent to the udp
/// port from anywhere but the external device, past decap's checks) and clears it.
pub const DECAP_TOKEN: u16 = 0x464c;

/// Capacity of the peer table (a /16 network split into /24s has 256 subnets; /8 into /24s
/// has 65536).
pub const MAX_PEERS: u32 = 65536;

/// Key of the peer table: the network address of a peer's subnet (host bits zero).
///
/// All subnets of a flannel network have the same length (`SubnetLen`), so the programs mask
/// an address with [`Config::subnet_mask`] and do one exact hash lookup: cheaper than an LPM
/// trie walk, which visits one node per prefix bit that differs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub subnet: [u8; 4],
}

/// Value of the peer table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerValue {
    /// The peer's public (underlay) IPv4 address: outer destination on encap, required outer
    /// source on decap.
    pub public_ip: [u8; 4],
}

/// Key of the sender table (only read on the drop path, to tell an unknown sender from a
/// known peer that sends a source address outside its subnet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SenderKey {
    pub public_ip: [u8; 4],
}

/// Value of the sender table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SenderValue {
    /// How many peer subnets have this public IP.
    pub subnets: u32,
}

/// Data-plane configuration, written by the agent before it attaches the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Our public (underlay) IPv4 address: outer source on encap, required outer destination
    /// on decap.
    pub public_ip: [u8; 4],
    /// The overlay network address (e.g. 10.244.0.0), for information.
    pub network: [u8; 4],
    /// The overlay network mask (e.g. 255.255.0.0), for information.
    pub network_mask: [u8; 4],
    /// Mask of one subnet (e.g. 255.255.255.0 for SubnetLen 24): the peer table key is
    /// `address & subnet_mask`.
    pub subnet_mask: [u8; 4],
    /// The external (underlay) device encapsulated packets leave through.
    pub ext_ifindex: u32,
    /// Decapsulated packets are redirected to the ingress of this device (the overlay TUN),
    /// so the host sees them arrive on `flannel0` exactly as with upstream's TUN proxy and
    /// strict rp_filter holds. 0: hand them to the stack on the external device instead
    /// (TC_ACT_OK; needs rp_filter 0 or 2 there).
    pub decap_ifindex: u32,
    /// UDP port, host byte order; both source and destination port of the outer header.
    pub port: u16,
    /// Non-zero once the agent has written this entry; programs pass/drop until then.
    pub ready: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
    /// With [`CONFIG_F_OVERLAY_L2`]: the overlay device's MAC, the destination of decapsulated
    /// frames delivered to it.
    pub overlay_mac: [u8; 6],
    pub _reserved: u16,
    /// The external device's MAC: XDP decap runs before the stack sets `pkt_type`, so it
    /// tells frames for another host by their destination address itself.
    pub ext_mac: [u8; 6],
    pub _reserved2: u16,
    /// With [`CONFIG_F_XDP_DECAP`]: the source MAC XDP decap writes on the frames it
    /// decapsulated, which tells the TC program on the same device (after GRO) to hand them to
    /// the overlay device without checking them again. XDP metadata would say it out of band,
    /// but drivers and kernels refuse it; so XDP drops every arriving frame that already
    /// carries this address, and it is random per pin directory (locally administered).
    pub xdp_mark: [u8; 6],
    /// `PATH_*` bits: how the agent attached the programs and what the kernel offered, for
    /// `flanneld dataplane` (the programs do not read it).
    pub paths: u16,
}

/// [`Config::flags`]: the external device is a virtual wire (veth, virtio, ...) that hands
/// checksum-offloaded packets to the other side unfinished, so encap completes the inner
/// TCP/UDP checksum of every packet it sends whole (non-GSO) itself. A NIC computes it in
/// hardware, so the bit stays clear there.
pub const CONFIG_F_COMPLETE_CSUM: u32 = 1 << 0;

/// [`Config::flags`]: the overlay device has an Ethernet header (the eBPF data plane's `ifb`,
/// which keeps its carrier with no process attached), not a TUN's bare IPv4.
pub const CONFIG_F_OVERLAY_L2: u32 = 1 << 1;

/// [`Config::flags`]: the overlay device is a kernel VXLAN device (VNI 1) listening on our
/// port. TC decap hands it the packets it accepted rewritten in place as VXLAN
/// (`decap/kernel_rx.rs`): the kernel's UDP tunnel receive then resets the tunnel
/// offload state (skb->encapsulation, SKB_GSO_UDP_TUNNEL) that `bpf_skb_adjust_room` leaves
/// behind on this kernel, so a bridge on the way to the pod does not segment them in
/// software, and its GRO merges MTU-sized arrivals.
pub const CONFIG_F_KERNEL_RX: u32 = 1 << 2;

/// [`Config::flags`]: XDP decap runs on the external device and marks what it decapsulated
/// with [`Config::xdp_mark`]; the TC decap delivers frames so marked as they are.
pub const CONFIG_F_XDP_DECAP: u32 = 1 << 3;

/// [`Config::paths`]: the TC programs hang on clsact cls_bpf filters (no TCX on this kernel,
/// or `--udp-attach=tc`); clear: on TCX links.
pub const PATH_ATTACH_TC: u16 = 1 << 0;
/// [`Config::paths`]: decap runs as native XDP on the external device.
pub const PATH_DECAP_XDP: u16 = 1 << 1;
/// [`Config::paths`]: the kernel takes `BPF_F_ADJ_ROOM_DECAP_L4_UDP`, so TC decap clears a
/// super-packet's UDP tunnel state itself.
pub const PATH_ADJ_ROOM_DECAP_L4_UDP: u16 = 1 << 2;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, and made of integers with no padding.
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::PeerValue {}
    unsafe impl aya::Pod for super::SenderKey {}
    unsafe impl aya::Pod for super::SenderValue {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Stats {}
}

// The layouts are part of the pinned-map ABI: a change must be deliberate (the loader
// recreates pinned maps whose sizes differ).
const _: () = {
    assert!(core::mem::size_of::<PeerKey>() == 4);
    assert!(core::mem::size_of::<PeerValue>() == 4);
    assert!(core::mem::size_of::<SenderKey>() == 4);
    assert!(core::mem::size_of::<SenderValue>() == 4);
    assert!(core::mem::size_of::<Config>() == 56);
    // One u64 per counter, nothing else.
    assert!(core::mem::size_of::<Stats>() == Counter::ALL.len() * 8);
};
