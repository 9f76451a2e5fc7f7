//! The maps the programs share with the agent (names in `flannel_common::map_names`), and the
//! lookups made on them.

use aya_ebpf::{
    btf_maps::{Array, HashMap, PerCpuArray},
    macros::btf_map,
};
use flannel_common::{Config, PeerKey, PeerValue, SenderKey, SenderValue, Stats, MAX_PEERS};

use crate::encap::CSUM_CHUNK;

#[btf_map(name = "flannel_peers")]
pub static PEERS: HashMap<PeerKey, PeerValue, { MAX_PEERS as usize }> = HashMap::new();

#[btf_map(name = "flannel_senders")]
pub static SENDERS: HashMap<SenderKey, SenderValue, { MAX_PEERS as usize }> = HashMap::new();

#[btf_map(name = "flannel_config")]
pub static CONFIG: Array<Config, 1> = Array::new();

#[btf_map(name = "flannel_stats")]
pub static STATS: PerCpuArray<Stats, 1> = PerCpuArray::new();

/// Per-CPU scratch space for checksum completion (the BPF stack has room for 512 bytes only).
#[btf_map(name = "flannel_scratch")]
pub static SCRATCH: PerCpuArray<[u8; CSUM_CHUNK], 1> = PerCpuArray::new();

/// The configuration, once the agent has written it.
#[inline(always)]
pub fn config() -> Option<Config> {
    match CONFIG.get(0) {
        Some(c) if c.ready != 0 => Some(*c),
        _ => None,
    }
}

#[inline(always)]
fn mask(a: [u8; 4], m: [u8; 4]) -> [u8; 4] {
    (u32::from_ne_bytes(a) & u32::from_ne_bytes(m)).to_ne_bytes()
}

/// The public IP of the peer whose subnet holds overlay address `addr`.
#[inline(always)]
pub fn peer_of(addr: [u8; 4], cfg: &Config) -> Option<[u8; 4]> {
    let key = PeerKey {
        subnet: mask(addr, cfg.subnet_mask),
    };
    // SAFETY: the value is copied out at once; a concurrent update can at worst give us the
    // old or the new address, both valid peers.
    unsafe { PEERS.get(key) }.map(|p| p.public_ip)
}

/// Whether `public_ip` is some peer's (the sender table; only read on the drop path).
#[inline(always)]
pub fn is_sender(public_ip: [u8; 4]) -> bool {
    let sender = SenderKey { public_ip };
    // SAFETY: only tested for presence.
    unsafe { SENDERS.get(sender) }.is_some()
}
