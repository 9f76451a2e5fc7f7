//! bpf(2) for tests: open pinned objects and run a program once with BPF_PROG_TEST_RUN.
//! (aya 0.14 exposes neither.)

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

#[repr(C, align(8))]
struct BpfAttr([u8; 128]);

impl BpfAttr {
    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get_u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut BpfAttr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr-sized, zero-filled buffer set up for `cmd`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BpfAttr,
            std::mem::size_of::<BpfAttr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = BpfAttr([0; 128]);
    attr.put_u64(0, c.as_ptr() as u64);
    let fd = sys_bpf(7, &mut attr)?; // BPF_OBJ_GET
                                     // SAFETY: a fresh fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Runs a TC program once on `packet` (which starts with an Ethernet header, as the kernel
/// requires). With `ifindex`, the skb's device is that one: for a TUN, the program then sees
/// the packet from the IPv4 header on, as on the real device. Returns (verdict, packet out).
pub fn test_run(prog: &OwnedFd, packet: &[u8], ifindex: Option<u32>) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 256];
    let mut ctx = [0u8; 192]; // struct __sk_buff
    if let Some(idx) = ifindex {
        ctx[40..44].copy_from_slice(&idx.to_ne_bytes());
    }
    let mut attr = BpfAttr([0; 128]);
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(8, packet.len() as u32);
    attr.put_u32(12, out.len() as u32);
    attr.put_u64(16, packet.as_ptr() as u64);
    attr.put_u64(24, out.as_mut_ptr() as u64);
    attr.put_u32(32, 1); // repeat
    attr.put_u32(40, ctx.len() as u32);
    attr.put_u64(48, ctx.as_ptr() as u64);
    sys_bpf(10, &mut attr).expect("BPF_PROG_TEST_RUN"); // BPF_PROG_TEST_RUN
    let retval = attr.get_u32(4);
    let out_len = attr.get_u32(12) as usize;
    out.truncate(out_len);
    (retval, out)
}

/// Runs an XDP program once on the Ethernet frame `packet`, as received on `ifindex` (its
/// first receive queue). Returns (verdict, bytes out): the metadata the program put in front
/// of the frame, then the frame.
pub fn test_run_xdp(prog: &OwnedFd, packet: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; packet.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u32; 6];
    ctx[1] = packet.len() as u32;
    ctx[3] = ifindex;
    let mut attr = BpfAttr([0; 128]);
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(8, packet.len() as u32);
    attr.put_u32(12, out.len() as u32);
    attr.put_u64(16, packet.as_ptr() as u64);
    attr.put_u64(24, out.as_mut_ptr() as u64);
    attr.put_u32(32, 1); // repeat
    attr.put_u32(40, size_of_val(&ctx) as u32);
    attr.put_u64(48, ctx.as_ptr() as u64);
    sys_bpf(10, &mut attr).expect("BPF_PROG_TEST_RUN"); // BPF_PROG_TEST_RUN
    let retval = attr.get_u32(4);
    let out_len = attr.get_u32(12) as usize;
    out.truncate(out_len);
    (retval, out)
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
