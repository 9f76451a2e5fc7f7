//! Thin wrappers over the batching syscalls the TUN data plane needs (sendmmsg with UDP_SEGMENT,
//! recvmmsg with UDP_GRO, writev, poll, eventfd), kept apart so the forwarding loops read as logic.

use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::gso_batch::WireMsg;
use super::virtio_hdr::VNET_HDR_LEN;

/// Control buffer large enough for one UDP_SEGMENT / UDP_GRO cmsg, 8-byte aligned as cmsghdr
/// requires.
type CmsgBuf = [u64; 4];

fn cvt(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn sockaddr_v4(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(ip).to_be();
    sa
}

pub(crate) fn set_sockopt_int(fd: RawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is a valid writable region of buf.len() bytes.
    cvt(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

/// Writes one packet to the TUN, preceded by its virtio header when the device has one.
pub(crate) fn write_tun(
    fd: RawFd,
    vnet: Option<&[u8; VNET_HDR_LEN]>,
    pkt: &[u8],
) -> io::Result<()> {
    let mut iov = [
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
        libc::iovec {
            iov_base: pkt.as_ptr() as *mut _,
            iov_len: pkt.len(),
        },
    ];
    let iov: &[libc::iovec] = match vnet {
        Some(h) => {
            iov[0] = libc::iovec {
                iov_base: h.as_ptr() as *mut _,
                iov_len: h.len(),
            };
            &iov
        }
        None => &iov[1..],
    };
    // SAFETY: the iovecs point at live buffers that outlive the call; the kernel only reads.
    cvt(unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) }).map(|_| ())
}

/// Waits until `fd` is readable (true) or `stop` is signalled (false).
pub(crate) fn wait_readable(fd: RawFd, stop: RawFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("descriptor error while polling"));
        }
        return Ok(true);
    }
}

/// An eventfd that, once signalled, stays readable: every thread polling it wakes and stops.
pub(crate) struct StopEvent(OwnedFd);

impl StopEvent {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the result is checked before being owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. A failure can only mean the counter is
        // already non-zero, which is the state we want.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Outcome of sending a batch: how many sends went out, and the ones the kernel refused.
#[derive(Default)]
pub(crate) struct SendReport {
    pub sent: usize,
    pub failed: Vec<(usize, io::Error)>,
}

/// Sends every message of a batch with sendmmsg, each as one UDP GSO send (UDP_SEGMENT cmsg
/// when it holds more than one datagram). A refused message is reported and skipped.
pub(crate) fn send_batch(fd: RawFd, port: u16, buf: &[u8], msgs: &[WireMsg]) -> SendReport {
    let n = msgs.len();
    let mut addrs: Vec<libc::sockaddr_in> = msgs.iter().map(|m| sockaddr_v4(m.dst, port)).collect();
    let mut iovs: Vec<libc::iovec> = msgs
        .iter()
        .map(|m| libc::iovec {
            iov_base: buf[m.start..m.start + m.len].as_ptr() as *mut _,
            iov_len: m.len,
        })
        .collect();
    let mut cmsgs: Vec<CmsgBuf> = vec![[0; 4]; n];
    // SAFETY: mmsghdr is plain data; all-zero is valid (null pointers, zero lengths).
    let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
    for i in 0..n {
        let h = &mut hdrs[i].msg_hdr;
        h.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
        h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        if msgs[i].segs > 1 {
            h.msg_control = cmsgs[i].as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE is pure arithmetic.
            h.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
            // SAFETY: msg_control points at a zeroed, aligned buffer of msg_controllen bytes,
            // so CMSG_FIRSTHDR is non-null and the u16 payload fits.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                std::ptr::write_unaligned(
                    libc::CMSG_DATA(c).cast::<u16>(),
                    msgs[i].seg_size as u16,
                );
            }
        }
    }
    let mut report = SendReport::default();
    let mut i = 0;
    while i < n {
        // SAFETY: hdrs[i..] are fully initialised and point at buffers alive for the call.
        let r = unsafe { libc::sendmmsg(fd, hdrs[i..].as_mut_ptr(), (n - i) as u32, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // sendmmsg fails only when its first message fails: skip that one.
            report.failed.push((i, e));
            i += 1;
        } else {
            report.sent += r as usize;
            i += r as usize;
        }
    }
    report
}

/// Reusable receive state for recvmmsg: `count` buffers of 64 KiB (a UDP GRO train fits one).
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_in>,
    cmsgs: Vec<CmsgBuf>,
    lens: Vec<usize>,
    segs: Vec<usize>,
    flags: Vec<i32>,
}

/// One received datagram or GRO train.
pub(crate) struct Datagram<'a> {
    pub src: Ipv4Addr,
    pub data: &'a [u8],
    /// Size of each original datagram in `data` (all but the last have exactly this size).
    pub seg_size: usize,
    pub truncated: bool,
}

impl RecvBatch {
    pub fn new(count: usize) -> Self {
        Self {
            bufs: vec![vec![0u8; 65_536]; count],
            // SAFETY: plain data, all-zero valid.
            addrs: vec![unsafe { mem::zeroed() }; count],
            cmsgs: vec![[0; 4]; count],
            lens: vec![0; count],
            segs: vec![0; count],
            flags: vec![0; count],
        }
    }

    /// Receives up to `count` datagrams without blocking; Ok(0) when none is waiting.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.bufs.len();
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: plain data, all-zero valid.
        let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { mem::zeroed() }).collect();
        for i in 0..n {
            self.cmsgs[i] = [0; 4];
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_in).cast();
            h.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_controllen = mem::size_of::<CmsgBuf>();
        }
        let r = loop {
            // SAFETY: every header points at live, writable buffers of the stated sizes.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    n as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for (i, h) in hdrs.iter().enumerate().take(r) {
            self.lens[i] = h.msg_len as usize;
            self.flags[i] = h.msg_hdr.msg_flags;
            // Read the GRO segment size out of the control data, if any.
            let mut seg = 0usize;
            // SAFETY: the kernel filled msg_control/msg_controllen; the CMSG_* macros walk it
            // within those bounds.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                        seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>()).max(0)
                            as usize;
                    }
                    c = libc::CMSG_NXTHDR(&h.msg_hdr, c);
                }
            }
            self.segs[i] = seg;
        }
        Ok(r)
    }

    pub fn datagram(&self, i: usize) -> Datagram<'_> {
        let len = self.lens[i].min(self.bufs[i].len());
        let seg = self.segs[i];
        Datagram {
            src: Ipv4Addr::from(u32::from_be(self.addrs[i].sin_addr.s_addr)),
            data: &self.bufs[i][..len],
            seg_size: if seg == 0 { len.max(1) } else { seg },
            truncated: self.flags[i] & libc::MSG_TRUNC != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gso_batch::WireBatch;
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    /// Receives until `want` datagrams arrived; returns how many receive slots (GRO trains)
    /// carried them, and the datagrams split at their segment size.
    fn receive(sock: &UdpSocket, want: usize) -> (usize, Vec<Vec<u8>>) {
        let mut rb = RecvBatch::new(4);
        let (mut trains, mut got) = (0, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < deadline {
            let n = rb.recv(sock.as_raw_fd()).unwrap();
            for i in 0..n {
                let d = rb.datagram(i);
                assert!(!d.truncated);
                trains += 1;
                got.extend(d.data.chunks(d.seg_size).map(<[u8]>::to_vec));
            }
        }
        (trains, got)
    }

    #[test]
    fn gso_sends_arrive_as_the_original_datagrams_with_or_without_gro() {
        for gro in [true, false] {
            let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
            if gro {
                set_sockopt_int(rx.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 1).unwrap();
            }
            let port = rx.local_addr().unwrap().port();
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            let mut batch = WireBatch::new(1 << 16, true);
            let sizes = [1200usize, 1200, 1200, 500, 80, 80];
            for (k, len) in sizes.iter().enumerate() {
                batch.buf.extend(std::iter::repeat_n(k as u8, *len));
                batch.commit(Ipv4Addr::LOCALHOST, *len);
            }
            assert_eq!(batch.msgs.len(), 2, "two UDP GSO sends");
            let report = send_batch(tx.as_raw_fd(), port, &batch.buf, &batch.msgs);
            assert_eq!((report.sent, report.failed.len()), (2, 0));
            let (trains, got) = receive(&rx, sizes.len());
            let lens: Vec<usize> = got.iter().map(Vec::len).collect();
            assert_eq!(lens, sizes, "gro={gro}");
            for (k, d) in got.iter().enumerate() {
                assert!(
                    d.iter().all(|b| *b == k as u8),
                    "datagram {k} intact (gro={gro})"
                );
            }
            assert_eq!(trains, if gro { 2 } else { 6 }, "gro={gro}");
        }
    }
}
