//! The bpf(2) commands aya 0.14 does not offer: open any pinned object, read which device and
//! direction a link is attached to, force-detach a link. Typed wrappers over one raw syscall.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// Commands and link types of include/uapi/linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;
pub const BPF_LINK_TYPE_XDP: u32 = 6;
pub const BPF_LINK_TYPE_TCX: u32 = 11;
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

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

/// Opens the object (map, program or link) pinned at `path` (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = BpfAttr::new();
    attr.put_u64(0, c_path.as_ptr() as u64);
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Where a link is attached, as `struct bpf_link_info` tells: for TCX the device and
/// direction, for XDP the device (attach type 0). The device is 0 once it is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTarget {
    pub link_type: u32,
    pub ifindex: u32,
    pub attach_type: u32,
}

/// Reads the target of the link `fd` (BPF_OBJ_GET_INFO_BY_FD).
pub fn link_target(fd: BorrowedFd<'_>) -> io::Result<LinkTarget> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose tcx and xdp members
    // start with ifindex (tcx: then attach_type).
    let mut info = [0u32; 32];
    obj_info(fd, &mut info)?;
    Ok(LinkTarget {
        link_type: info[0],
        ifindex: info[4],
        attach_type: info[5],
    })
}

/// The id of the program the link `fd` runs (`struct bpf_link_info`'s prog_id).
pub fn link_program(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u32; 32];
    obj_info(fd, &mut info)?;
    Ok(info[2])
}

/// Detaches the link `fd` from its hook even while other descriptors keep it open
/// (BPF_LINK_DETACH).
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// The BTF object id of the map `fd` (0: created without BTF), from `struct bpf_map_info`.
pub fn map_btf_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // struct bpf_map_info: type, id, key_size, value_size, max_entries, map_flags, name[16],
    // ifindex, btf_vmlinux_value_type_id, netns_dev (u64), netns_ino (u64), btf_id (byte 64).
    let mut info = [0u32; 24];
    obj_info(fd, &mut info)?;
    Ok(info[16])
}

/// Fills `info` with the object's `struct bpf_*_info` (BPF_OBJ_GET_INFO_BY_FD), as 32-bit words.
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u32]) -> io::Result<()> {
    let mut attr = BpfAttr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    attr.put_u32(4, size_of_val(info) as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}
