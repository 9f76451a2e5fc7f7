//! The eBPF data plane of the udp backend: loads `flannel-ebpf`, pins its maps, programs and
//! TCX links under a pin directory (or attaches with classic TC where the kernel has no TCX,
//! `attach.rs`), and keeps the peer map in step with the leases.
//!
//! Pin layout (`<pin_dir>`, default /sys/fs/bpf/flannel):
//! - maps `flannel_peers`, `flannel_senders`, `flannel_config`, `flannel_stats`
//!   (`bpftool map dump pinned <pin_dir>/flannel_peers` shows field names);
//! - programs `flannel_encap` (TC egress of the overlay TUN) and `flannel_decap` (TC ingress of
//!   the external device);
//! - TCX links `flannel_encap_link`, `flannel_decap_link`, `flannel_overlay_in_link`; with
//!   classic TC (`--udp-attach`) no links: cls_bpf filters at our pref and handle hold the
//!   programs instead (`cls_bpf.rs`), and live in the network namespace, not the pin dir;
//! - with XDP decap (`--udp-decap`), program `flannel_decap_xdp` and its XDP link
//!   `flannel_decap_xdp_link` on the external device. The TC decap stays attached then: it
//!   hands the packets XDP decapsulated (and GRO merged) to the overlay device.
//!
//! Everything stays in the kernel when the agent exits. A new agent adopts it: maps are reused
//! (peers survive; sizes are checked), programs replace the old ones atomically through the
//! pinned links (`bpf_link_update`) or in our cls_bpf filters (a netlink change), so traffic
//! keeps flowing across a restart.
//! [`EbpfDataplane::unload`] removes it all.
//!
//! Delivery of decapsulated packets: redirected to the ingress of the overlay TUN, so the host
//! sees them arrive on `flannel0` exactly as with upstream's TUN proxy; strict rp_filter works
//! and iptables rules written for upstream (`-i flannel0`) still match. The caller still needs
//! IPv4 forwarding on.

mod attach;
mod bpf_sys;
mod cls_bpf;
mod error;
mod links;
mod loader;
mod netdev;
mod peers;
mod probe;
mod repair;
mod stats;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, PerCpuArray};
use flannel_common::{
    map_names, prog_names, Stats, CONFIG_F_XDP_DECAP, PATH_ADJ_ROOM_DECAP_L4_UDP, PATH_ATTACH_TC,
    PATH_DECAP_XDP,
};
use ipnetwork::Ipv4Network;

use super::{DataplaneStats, UdpDataplane};
use crate::backend::{DataplanePaths, DecapMode, Repair, Repairs};
use crate::cli::{UdpAttach, UdpDecap};
pub use attach::{AttachMode, Attachment};
pub use cls_bpf::{filters as tc_filters, TcFilter};
use error::map_err;
pub use error::EbpfError;
pub use links::{
    xdp_decap_ifindex, DECAP_LINK, DECAP_XDP_LINK, ENCAP_LINK, OVERLAY_IN_LINK, TCX_LINKS,
};
pub use loader::DEFAULT_PIN_DIR;
use peers::PeerTable;
pub use stats::read_pinned_stats;

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
    /// How the TC programs attach: TCX links, classic TC, or TCX where the kernel has it.
    pub attach: UdpAttach,
}

/// The loaded data plane: handles on the pinned maps plus our view of the peer table.
pub struct EbpfDataplane {
    peers: PeerTable,
    stats: PerCpuArray<MapData, Stats>,
    attachment: Attachment,
    paths: DataplanePaths,
    /// The loaded programs (the resync attaches them again where they went missing) and the
    /// config map.
    bpf: aya::Ebpf,
    /// As loaded, with the devices' current ifindexes.
    opts: EbpfOptions,
    overlay_name: String,
    ext_name: String,
    /// What we last wrote to the config map.
    config: flannel_common::Config,
}

impl EbpfDataplane {
    /// Whether the eBPF object was compiled into this binary.
    pub fn embedded() -> bool {
        loader::OBJECT.is_some()
    }

    /// Loads the programs (adopting whatever a previous agent pinned in `opts.pin_dir`), writes
    /// the configuration, and attaches encap to the overlay's egress and decap to the external
    /// device's ingress.
    pub fn load(opts: &EbpfOptions) -> Result<Self, EbpfError> {
        let object = loader::OBJECT.ok_or(EbpfError::NotEmbedded)?;
        Self::load_object(object, opts)
    }

    /// [`Self::load`] with an explicit object (tests, tools).
    pub fn load_object(object: &[u8], opts: &EbpfOptions) -> Result<Self, EbpfError> {
        let overlay_name = netdev::interface_name(opts.overlay_ifindex)?;
        let ext_name = netdev::interface_name(opts.ext_ifindex)?;
        let mut bpf = loader::load_with_pinned_maps(object, &opts.pin_dir)?;

        let helpers = probe::helper_forms(&mut bpf);
        match &helpers.decap_l4_udp {
            Ok(true) => log::info!(
                "TC decap clears the UDP tunnel state of super-packets itself: the kernel takes BPF_F_ADJ_ROOM_DECAP_L4_UDP"
            ),
            Ok(false) => log::info!(
                "TC decap hands packets to flannel0's VXLAN receive to clear their UDP tunnel state: the kernel refuses BPF_F_ADJ_ROOM_DECAP_L4_UDP"
            ),
            Err(why) => log::info!(
                "TC decap hands packets to flannel0's VXLAN receive: probing bpf_skb_adjust_room failed ({why})"
            ),
        }

        match probe::maps_have_btf(&opts.pin_dir) {
            Ok(true) => log::info!("maps carry their BTF: `bpftool map dump` shows field names"),
            Ok(false) => log::info!(
                "maps without BTF (the kernel did not take it): `bpftool map dump` shows bytes"
            ),
            Err(why) => log::info!("map BTF unknown: {why}"),
        }

        let driver = netdev::driver_name(&ext_name);
        let complete_csum = driver
            .as_deref()
            .is_some_and(netdev::passes_partial_checksums);
        if complete_csum {
            log::info!(
                "{ext_name} (driver {}) hands checksum-offloaded packets on unfinished: the encap program completes inner checksums",
                driver.as_deref().unwrap_or("?")
            );
        }
        // An Ethernet overlay device (the kernel VXLAN device): delivered frames must be
        // addressed to it.
        let xdp_mark = loader::xdp_mark(&mut bpf);
        let mut config = loader::config(
            opts,
            complete_csum,
            netdev::driver_name(&overlay_name).as_deref() == Some("vxlan"),
            netdev::ethernet_address(&overlay_name),
            netdev::ethernet_address(&ext_name),
            xdp_mark,
        );
        if helpers.decap_l4_udp == Ok(true) {
            config.paths |= PATH_ADJ_ROOM_DECAP_L4_UDP;
        }
        let want_xdp = links::wants_xdp(opts.decap, &ext_name, netdev::gro_enabled(&ext_name));
        // TC honours XDP decap's mark from before XDP attaches (only XDP makes it, and it is
        // random), so no frame XDP decapsulated is missed.
        if want_xdp {
            config.flags |= CONFIG_F_XDP_DECAP;
        }
        loader::write_config(&mut bpf, config)?;

        let attachment = attach::attach_tc(&mut bpf, opts, &overlay_name, &ext_name)?;
        if attachment.mode == AttachMode::Tc {
            config.paths |= PATH_ATTACH_TC;
        }
        let driver = driver.as_deref().unwrap_or("?");
        let xdp = if want_xdp {
            links::attach_xdp_decap(&mut bpf, opts, &ext_name, driver)?
        } else {
            links::remove_xdp_decap(&opts.pin_dir)?;
            false
        };
        if xdp {
            config.paths |= PATH_DECAP_XDP;
        } else {
            // XDP is detached by now: nothing makes the mark any more.
            config.flags &= !CONFIG_F_XDP_DECAP;
        }
        loader::write_config(&mut bpf, config)?;
        let paths = DataplanePaths {
            attach: attachment.mode,
            decap: if xdp { DecapMode::Xdp } else { DecapMode::Tc },
        };

        let peers = PeerTable::adopt(
            loader::take_map(&mut bpf, map_names::PEERS)?,
            loader::take_map(&mut bpf, map_names::SENDERS)?,
            opts.own_subnet.prefix(),
        )?;
        let stats = loader::take_map(&mut bpf, map_names::STATS)?;
        let stats: PerCpuArray<MapData, Stats> =
            PerCpuArray::try_from(stats).map_err(map_err(map_names::STATS))?;
        log::info!(
            "eBPF udp data plane attached (overlay ifindex {}, external ifindex {}, pins in {}, {} peers adopted)",
            opts.overlay_ifindex,
            opts.ext_ifindex,
            opts.pin_dir.display(),
            peers.peers().len()
        );
        // The programs live on through their pinned links (or filters) when `bpf` goes.
        Ok(EbpfDataplane {
            peers,
            stats,
            attachment,
            paths,
            bpf,
            opts: opts.clone(),
            overlay_name,
            ext_name,
            config,
        })
    }

    /// Detaches the programs and removes everything this data plane pinned in `pin_dir`, then
    /// the directory itself. Succeeds when there is nothing to remove.
    ///
    /// Classic TC filters belong to a network namespace, not to the pin dir: they are removed
    /// (all of ours in this namespace) when the pin dir's namespace marker, which the agent
    /// writes, names this namespace, and a pin dir of another namespace is refused. Without a
    /// marker (a data plane loaded through this library) only the pins and links go.
    pub fn unload(pin_dir: &Path) -> Result<(), EbpfError> {
        if !pin_dir.exists() {
            return Ok(());
        }
        match super::pin_lock::pinned_namespace(pin_dir) {
            super::pin_lock::PinnedNamespace::This => {
                cls_bpf::remove_ours(&[])?;
            }
            super::pin_lock::PinnedNamespace::Other { theirs, ours } => {
                return Err(EbpfError::OtherNamespace {
                    dir: pin_dir.to_path_buf(),
                    theirs,
                    ours,
                })
            }
            super::pin_lock::PinnedNamespace::Unknown => {}
        }
        links::remove_links(pin_dir)?;
        loader::remove_pins(pin_dir)
    }

    /// How the TC programs were attached (TCX or classic TC) and why.
    pub fn attachment(&self) -> &Attachment {
        &self.attachment
    }

    /// The peer table as the kernel map holds it.
    pub fn peers(&self) -> &BTreeMap<Ipv4Network, Ipv4Addr> {
        self.peers.peers()
    }

    /// The overlay device was re-created with `ifindex`: the config map points at it (and its
    /// MAC); the resync's hook check then attaches the programs there.
    pub fn follow_overlay(&mut self, ifindex: u32) -> Result<(), EbpfError> {
        self.opts.overlay_ifindex = ifindex;
        self.config.decap_ifindex = ifindex;
        if let Some(mac) = netdev::ethernet_address(&self.overlay_name) {
            self.config.overlay_mac = mac;
        }
        loader::write_config(&mut self.bpf, self.config)
    }

    /// The external interface is now `ifindex` (re-created under the same name): the config
    /// map points at it; the hook check attaches decap there.
    pub fn follow_external(&mut self, ifindex: u32) -> Result<(), EbpfError> {
        self.opts.ext_ifindex = ifindex;
        self.config.ext_ifindex = ifindex;
        if let Some(mac) = netdev::ethernet_address(&self.ext_name) {
            self.config.ext_mac = mac;
        }
        loader::write_config(&mut self.bpf, self.config)
    }

    /// Checks the config map, the peer maps against our table and each program on its hook,
    /// and repairs what is wrong: one WARN line and one noted repair each. Goes on past a
    /// hook it cannot repair; returns the first error.
    pub fn repair(&mut self, repaired: &mut Repairs) -> Result<(), EbpfError> {
        let mut first_error = None;
        let mut failed = |e: EbpfError| {
            log::warn!("eBPF data plane repair: {}", error::one_line(&e));
            first_error.get_or_insert(e);
        };
        match loader::read_config(&self.bpf) {
            Ok(c) if c == self.config => {}
            Ok(_) => match loader::write_config(&mut self.bpf, self.config) {
                Ok(()) => {
                    log::warn!(
                        "eBPF config map {} changed behind our back: written again",
                        map_names::CONFIG
                    );
                    repaired.note(Repair::ConfigMap);
                }
                Err(e) => failed(e),
            },
            Err(e) => failed(e),
        }
        match self.peers.repair() {
            Ok(false) => {}
            Ok(true) => {
                log::warn!(
                    "eBPF peer maps ({}, {}) differed from the peers in etcd: written again",
                    map_names::PEERS,
                    map_names::SENDERS
                );
                repaired.note(Repair::PeerMap);
            }
            Err(e) => failed(e),
        }
        let mode = self.paths.attach;
        let pin_dir = self.opts.pin_dir.clone();
        let hooks = links::tc_hooks(&self.opts, &self.overlay_name, &self.ext_name);
        for hook in &hooks {
            let place = repair::describe(hook, mode.as_str());
            match repair::tc_hook(&mut self.bpf, hook, mode, &pin_dir) {
                Ok(repair::Found::Ours) => {}
                Ok(repair::Found::Missing) => {
                    log::warn!("{} was missing from {place}: attached again", hook.program);
                    repaired.note(Repair::Program);
                }
                Ok(repair::Found::Foreign(what)) => {
                    log::warn!(
                        "found {what} on {place} where {} belongs: {} put back",
                        hook.program,
                        hook.program
                    );
                    repaired.note(Repair::ForeignProgram);
                }
                Err(e) => failed(e),
            }
        }
        if self.paths.decap == DecapMode::Xdp {
            match repair::xdp_decap(&mut self.bpf, self.opts.ext_ifindex, &pin_dir) {
                Ok(repair::Found::Ours) => {}
                Ok(_) => {
                    log::warn!(
                        "{} was missing from XDP of {}: attached again",
                        prog_names::DECAP_XDP,
                        self.ext_name
                    );
                    repaired.note(Repair::Program);
                }
                Err(e) => failed(e),
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl UdpDataplane for EbpfDataplane {
    fn kind(&self) -> crate::backend::DataplaneKind {
        crate::backend::DataplaneKind::Ebpf
    }
    fn set_peer(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> anyhow::Result<()> {
        Ok(self.peers.insert(subnet, public_ip)?)
    }

    fn remove_peer(&mut self, subnet: Ipv4Network) -> anyhow::Result<()> {
        Ok(self.peers.delete(subnet)?)
    }

    fn sync_peers(&mut self, peers: &BTreeMap<Ipv4Network, Ipv4Addr>) -> anyhow::Result<()> {
        let rejected = self.peers.sync(peers)?;
        if !rejected.is_empty() {
            let rejected: Vec<String> = rejected.iter().map(ToString::to_string).collect();
            anyhow::bail!("peers not installed: {}", rejected.join("; "));
        }
        Ok(())
    }

    fn stats(&self) -> anyhow::Result<DataplaneStats> {
        Ok(stats::total(&self.stats)?)
    }

    fn paths(&self) -> Option<DataplanePaths> {
        Some(self.paths)
    }

    fn follow_overlay(&mut self, device: super::device::OverlayDevice) -> anyhow::Result<()> {
        Ok(EbpfDataplane::follow_overlay(self, device.ifindex)?)
    }

    fn follow_external(&mut self, ifindex: u32) -> anyhow::Result<()> {
        Ok(EbpfDataplane::follow_external(self, ifindex)?)
    }

    fn repair(&mut self, repaired: &mut Repairs) -> anyhow::Result<()> {
        Ok(EbpfDataplane::repair(self, repaired)?)
    }

    fn peer_table(&self) -> BTreeMap<Ipv4Network, Ipv4Addr> {
        self.peers.peers().clone()
    }
}
