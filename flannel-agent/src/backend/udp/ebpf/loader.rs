//! Loading the eBPF object: the object compiled into the binary, the pin directory on bpffs,
//! the pinned maps a new load reuses (dropping those of another layout), the configuration the
//! programs read, and removing the pins again.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use aya::maps::{Array, MapData, MapInfo};
use aya::{Ebpf, EbpfLoader};
use flannel_common::{
    map_names, prog_names, Config, PeerKey, PeerValue, SenderKey, SenderValue, Stats,
    CONFIG_F_COMPLETE_CSUM, CONFIG_F_KERNEL_RX, CONFIG_F_OVERLAY_L2, MAX_PEERS,
};

use super::error::{io_err, map_err};
use super::{EbpfError, EbpfOptions};

/// The compiled eBPF object, when the build found it (see build.rs).
#[cfg(flannel_ebpf_embedded)]
pub(super) static OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(env!("FLANNEL_EBPF_OBJECT")));
#[cfg(not(flannel_ebpf_embedded))]
pub(super) static OBJECT: Option<&[u8]> = None;

/// Default pin directory, one per agent: agents sharing a machine need distinct ones.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flannel";

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Loads `object` with its maps pinned in `pin_dir` (reusing compatible pins already there).
/// Programs are loaded and attached separately.
pub(super) fn load_with_pinned_maps(object: &[u8], pin_dir: &Path) -> Result<Ebpf, EbpfError> {
    prepare_pin_dir(pin_dir)?;
    drop_incompatible_maps(pin_dir)?;
    let map_paths: Vec<(&'static str, std::path::PathBuf)> = map_names::ALL
        .iter()
        .map(|name| (*name, pin_dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    Ok(loader.load(object).map_err(Box::new)?)
}

/// What the programs read from the config map. `complete_csum`: the external device hands
/// checksum-offloaded packets on unfinished; the MACs are set for Ethernet devices.
pub(super) fn config(
    opts: &EbpfOptions,
    complete_csum: bool,
    kernel_rx: bool,
    overlay_mac: Option<[u8; 6]>,
    ext_mac: Option<[u8; 6]>,
    xdp_mark: [u8; 6],
) -> Config {
    let mut flags = 0;
    if complete_csum {
        flags |= CONFIG_F_COMPLETE_CSUM;
    }
    if overlay_mac.is_some() {
        flags |= CONFIG_F_OVERLAY_L2;
    }
    if kernel_rx {
        flags |= CONFIG_F_KERNEL_RX;
    }
    Config {
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
        ext_mac: ext_mac.unwrap_or_default(),
        _reserved2: 0,
        xdp_mark,
        paths: 0,
    }
}

/// XDP decap's mark (see `Config::xdp_mark`): the one the pinned configuration holds, so that
/// frames in flight across a restart keep theirs, else a new random locally administered
/// unicast address.
pub(super) fn xdp_mark(bpf: &mut Ebpf) -> [u8; 6] {
    let pinned = bpf.map_mut(map_names::CONFIG).and_then(|map| {
        let array: Array<&mut MapData, Config> = Array::try_from(map).ok()?;
        array.get(&0, 0).ok()
    });
    match pinned {
        Some(c) if c.xdp_mark != [0; 6] => c.xdp_mark,
        _ => {
            let mut mark: [u8; 6] = rand::random();
            mark[0] = (mark[0] | 0x02) & !0x01;
            mark
        }
    }
}

pub(super) fn write_config(bpf: &mut Ebpf, config: Config) -> Result<(), EbpfError> {
    let map = bpf
        .map_mut(map_names::CONFIG)
        .ok_or(EbpfError::Missing(map_names::CONFIG))?;
    let mut array: Array<&mut MapData, Config> =
        Array::try_from(map).map_err(map_err(map_names::CONFIG))?;
    array.set(0, config, 0).map_err(map_err(map_names::CONFIG))
}

/// What the config map holds now.
pub(super) fn read_config(bpf: &Ebpf) -> Result<Config, EbpfError> {
    let map = bpf
        .map(map_names::CONFIG)
        .ok_or(EbpfError::Missing(map_names::CONFIG))?;
    let array: Array<&MapData, Config> =
        Array::try_from(map).map_err(map_err(map_names::CONFIG))?;
    array.get(&0, 0).map_err(map_err(map_names::CONFIG))
}

pub(super) fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    bpf.take_map(name).ok_or(EbpfError::Missing(name))
}

/// Removes the pinned programs and maps, the namespace marker and then `pin_dir` itself (the
/// links must be gone already).
pub(super) fn remove_pins(pin_dir: &Path) -> Result<(), EbpfError> {
    let names = prog_names::ALL.into_iter().chain(map_names::ALL);
    for name in names {
        let path = pin_dir.join(name);
        if path.exists() {
            remove_pin(&path)?;
        }
    }
    // The namespace marker of pin_lock.rs.
    let _ = std::fs::remove_file(pin_dir.join(super::super::pin_lock::NETNS_MARKER));
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {
            let left = std::fs::read_dir(pin_dir).map(|d| d.count()).unwrap_or(0);
            Err(EbpfError::NotEmpty(left, pin_dir.to_path_buf()))
        }
        Err(e) => Err(io_err(format!("removing {}", pin_dir.display()))(e)),
    }
}

pub(super) fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("removing {}", path.display()))(e)),
    }
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
