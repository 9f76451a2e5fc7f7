//! A "container" behind a host: its own namespace joined to the host by a veth, with the
//! host's flannel subnet on the link (host side .1, container side .2), as the flannel CNI
//! bridge would give it.

use std::net::Ipv4Addr;

use anyhow::Context;

use crate::cluster::Host;
use crate::netns::Netns;
use crate::Result;

pub struct Container {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

impl Container {
    /// Create a container for `host` in `subnet` (e.g. "10.244.5.0/24"), with `mtu` on its link.
    pub fn create(host: &Host, subnet: &str, mtu: u32) -> Result<Self> {
        let (net, len) = subnet.split_once('/').context("subnet without length")?;
        let net: Ipv4Addr = net.parse()?;
        let gw = Ipv4Addr::from(u32::from(net) + 1);
        let ip = Ipv4Addr::from(u32::from(net) + 2);
        let ns = Netns::create(&format!("{}-c", host.ns.name))?;
        let mtu = mtu.to_string();
        // The container end is born in the container namespace: the host has its own eth0.
        host.ns.ip(&[
            "link", "add", "veth-c", "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu",
            &mtu, "netns", &ns.name,
        ])?;
        host.ns
            .ip(&["addr", "add", &format!("{gw}/{len}"), "dev", "veth-c"])?;
        host.ns.ip(&["link", "set", "veth-c", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/{len}"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        Ok(Container { ns, ip })
    }

    /// `ping -c count` to `dst`; Ok(true) when every reply came back.
    pub fn ping(&self, dst: Ipv4Addr, count: u32, timeout_s: u32) -> Result<bool> {
        let out = self
            .ns
            .command("ping")
            .args([
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.01",
                "-W",
                &timeout_s.to_string(),
            ])
            .arg(dst.to_string())
            .output()?;
        Ok(out.status.success())
    }
}

/// Send `bytes` over TCP from `src` to `dst` (port 5001); returns what `dst` received.
pub fn tcp_transfer(src: &Container, dst: &Container, bytes: usize) -> Result<usize> {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;
    let addr = SocketAddr::from((dst.ip, 5001));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = dst.ns.spawn_in(move || -> Result<usize> {
        let l = TcpListener::bind(addr);
        let _ = ready_tx.send(());
        let l = l?;
        // Never hang the test: give up accepting after a deadline.
        l.set_nonblocking(true)?;
        let mut s = crate::wait_for(Duration::from_secs(15), "a TCP connection", || {
            l.accept().ok()
        })?
        .0;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        Ok(buf.len())
    })?;
    ready_rx.recv_timeout(Duration::from_secs(5))?;
    let sent = src.ns.run_in(move || -> Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    })?;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
    sent?;
    received?
}
