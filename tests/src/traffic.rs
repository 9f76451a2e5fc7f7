//! Traffic between namespaces: a TCP transfer whose content is verified end to end.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::container::Container;
use crate::netns::Netns;
use crate::Result;

/// What a transfer delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes that arrived (all of them hash to what was sent).
    pub bytes: usize,
    /// The client address the receiver saw (NAT shows here).
    pub client: IpAddr,
}

/// FNV-1a over a byte stream: enough to tell a corrupted, reordered or truncated transfer.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Send `bytes` of pseudo-random data over TCP from namespace `src` to `dst` (port 5001) in
/// namespace `dst_ns`; fails unless all of it arrived and hashes to what was sent.
pub fn tcp_send(src: &Netns, dst_ns: &Netns, dst: Ipv4Addr, bytes: usize) -> Result<Transfer> {
    tcp_send_ip(src, dst_ns, IpAddr::V4(dst), bytes)
}

/// [`tcp_send`] to an IPv4 or IPv6 address.
pub fn tcp_send_ip(src: &Netns, dst_ns: &Netns, dst: IpAddr, bytes: usize) -> Result<Transfer> {
    let addr = SocketAddr::from((dst, 5001));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = dst_ns.spawn_in(move || -> Result<(usize, u64, IpAddr)> {
        // A fresh IPv6 address cannot be bound while duplicate address detection runs.
        let mut last = None;
        let l = crate::wait_for(Duration::from_secs(5), "the address to be bindable", || {
            TcpListener::bind(addr).map_err(|e| last = Some(e)).ok()
        });
        let _ = ready_tx.send(());
        let l = l.map_err(|e| match last {
            Some(bind) => anyhow::anyhow!("{e}: bind {addr}: {bind}"),
            None => e,
        })?;
        // Never hang the test: give up accepting after a deadline.
        l.set_nonblocking(true)?;
        let (mut s, peer) = crate::wait_for(Duration::from_secs(15), "a TCP connection", || {
            l.accept().ok()
        })?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (mut got, mut hash) = (0usize, Fnv::new());
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((got, hash.0, peer.ip()));
            }
            hash.update(&buf[..n]);
            got += n;
        }
    })?;
    ready_rx.recv_timeout(Duration::from_secs(10))?;
    let sent = src.run_in(move || -> Result<u64> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut hash = Fnv::new();
        // xorshift64: no two chunks alike, so reordering shows in the hash.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
            }
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            hash.update(&chunk[..n]);
            left -= n;
        }
        Ok(hash.0)
    })?;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
    // A refused connect usually means the listener failed: say why, not only "refused".
    let sent_hash = match (sent, &received) {
        (Err(e), Ok(Err(server))) => {
            anyhow::bail!("TCP to {dst}: sender: {e:#}; receiver: {server:#}")
        }
        (sent, _) => sent.map_err(|e| anyhow::anyhow!("TCP to {dst}: sender: {e:#}"))?,
    };
    let (got, got_hash, client) = received??;
    anyhow::ensure!(got == bytes, "TCP to {dst}: {got} of {bytes} bytes arrived");
    anyhow::ensure!(
        got_hash == sent_hash,
        "TCP to {dst}: {got} bytes arrived but their content differs from what was sent"
    );
    Ok(Transfer { bytes: got, client })
}

/// [`tcp_send`] from container `src` to container `dst`: the bytes that arrived intact.
pub fn tcp_transfer(src: &Container, dst: &Container, bytes: usize) -> Result<usize> {
    Ok(tcp_send(&src.ns, &dst.ns, dst.ip, bytes)?.bytes)
}
