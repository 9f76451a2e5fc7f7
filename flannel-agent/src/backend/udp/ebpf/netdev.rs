//! What the kernel tells about a network device that decides how the programs are set up: its
//! name, driver, Ethernet address and whether GRO is on.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::EbpfError;

/// Drivers of virtual wires: they accept checksum offload and hand the packet to the other
/// side (another namespace, the hypervisor, another VM) with the checksum still unfinished,
/// where a user-space receiver (upstream flanneld, a TUN node) gets it as it is. A physical
/// NIC computes offloaded checksums in hardware.
const VIRTUAL_WIRE_DRIVERS: [&str; 4] = ["veth", "virtio_net", "tun", "netkit"];

pub(super) fn passes_partial_checksums(driver: &str) -> bool {
    VIRTUAL_WIRE_DRIVERS.contains(&driver)
}

pub(super) fn interface_name(ifindex: u32) -> Result<String, EbpfError> {
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

/// Runs the interface ioctl `request` for `ifname` on a throwaway socket, with `data` (when
/// not null) as the ifreq's data pointer, as ethtool commands want. The ifreq as the kernel
/// left it; None when the device cannot be asked.
fn ifreq_ioctl(ifname: &str, request: libc::Ioctl, data: *mut libc::c_char) -> Option<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(ifname.bytes().take(libc::IF_NAMESIZE - 1))
    {
        *dst = src as libc::c_char;
    }
    if !data.is_null() {
        req.ifr_ifru.ifru_data = data;
    }
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the ioctl reads and writes the ifreq (and the caller's `data` buffer, which
    // outlives this call), both alive for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, &mut req as *mut libc::ifreq) };
    (rc >= 0).then_some(req)
}

/// The MAC address of `ifname` when it is an Ethernet device (SIOCGIFHWADDR); None for a TUN
/// or when the device cannot be asked.
pub(super) fn ethernet_address(ifname: &str) -> Option<[u8; 6]> {
    const ARPHRD_ETHER: u16 = 1;
    let req = ifreq_ioctl(ifname, libc::SIOCGIFHWADDR, std::ptr::null_mut())?;
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
pub(super) fn driver_name(ifname: &str) -> Option<String> {
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    // struct ethtool_drvinfo: cmd, then driver[32], version[32], ...; 196 bytes in all.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&ETHTOOL_GDRVINFO.to_ne_bytes());
    ifreq_ioctl(ifname, libc::SIOCETHTOOL, info.as_mut_ptr().cast())?;
    let driver = &info[4..36];
    let end = driver.iter().position(|&b| b == 0).unwrap_or(driver.len());
    std::str::from_utf8(&driver[..end]).ok().map(str::to_string)
}

/// Whether `ifname` has GRO on (ETHTOOL_GGRO); None when the device does not say.
pub(super) fn gro_enabled(ifname: &str) -> Option<bool> {
    const ETHTOOL_GGRO: u32 = 0x2b;
    // struct ethtool_value: cmd, data.
    let mut value = [ETHTOOL_GGRO, 0u32];
    ifreq_ioctl(ifname, libc::SIOCETHTOOL, value.as_mut_ptr().cast())?;
    Some(value[1] != 0)
}
