//! The per-peer kernel entries on a VXLAN device other than routes: the permanent neighbour
//! (peer VTEP address -> VTEP MAC) and the FDB entry (VTEP MAC -> peer underlay address), for
//! either family, and listing the permanent ones a device holds (to prune stale ones).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::Handle;

use super::Mac;
use crate::backend::route::is_gone;

const NUD_PERMANENT: u16 = 0x80;

/// Which table: neighbours (ARP / NDP) or the device's forwarding database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Neighbours(AddressFamily),
    Fdb,
}

impl Table {
    fn family(self) -> AddressFamily {
        match self {
            Table::Neighbours(f) => f,
            Table::Fdb => AddressFamily::Bridge,
        }
    }
}

/// `ip neigh replace <ip> lladdr <mac> dev <dev> nud permanent`.
pub async fn replace_neighbour(
    handle: &Handle,
    dev: u32,
    ip: IpAddr,
    mac: Mac,
) -> Result<(), rtnetlink::Error> {
    handle
        .neighbours()
        .add(dev, ip)
        .link_layer_address(&mac.0)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
}

/// `bridge fdb replace <mac> dev <dev> dst <ip> self permanent`.
pub async fn replace_fdb(
    handle: &Handle,
    dev: u32,
    mac: Mac,
    dst: IpAddr,
) -> Result<(), rtnetlink::Error> {
    handle
        .neighbours()
        .add_bridge(dev, &mac.0)
        .destination(dst)
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
}

/// `ip neigh del <ip> dev <dev>`; already gone is fine.
pub async fn delete_neighbour(
    handle: &Handle,
    dev: u32,
    ip: IpAddr,
) -> Result<(), rtnetlink::Error> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    msg.header.ifindex = dev;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    delete(handle, msg).await
}

/// `bridge fdb del <mac> dev <dev> dst <ip> self`; already gone is fine.
pub async fn delete_fdb(
    handle: &Handle,
    dev: u32,
    mac: Mac,
    dst: IpAddr,
) -> Result<(), rtnetlink::Error> {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = dev;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(dst)));
    delete(handle, msg).await
}

/// Delete an entry as listed; already gone is fine.
pub async fn delete(handle: &Handle, msg: NeighbourMessage) -> Result<(), rtnetlink::Error> {
    match handle.neighbours().del(msg).execute().await {
        Err(e) if is_gone(&e) => Ok(()),
        r => r,
    }
}

/// A permanent entry on a device, as the kernel lists it.
pub struct Entry {
    pub ip: Option<IpAddr>,
    pub mac: Option<Mac>,
    pub msg: NeighbourMessage,
}

/// The permanent entries of `table` on device `dev` (`bridge fdb append ... permanent` also
/// sets NOARP, so the state is tested bitwise).
pub async fn permanent_entries(
    handle: &Handle,
    dev: u32,
    table: Table,
) -> Result<Vec<Entry>, rtnetlink::Error> {
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(table.family())
        .execute();
    let mut out = Vec::new();
    while let Some(msg) = dump.try_next().await? {
        let permanent = u16::from(msg.header.state) & NUD_PERMANENT != 0;
        if msg.header.ifindex != dev || !permanent {
            continue;
        }
        let (mut ip, mut mac) = (None, None);
        for attr in &msg.attributes {
            match attr {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                    ip = Some(IpAddr::V4(*a))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                    ip = Some(IpAddr::V6(*a))
                }
                // Bridge-family (FDB) messages carry the destination as raw bytes.
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                    ip = raw_ip(b);
                }
                NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                    mac = Some(Mac([l[0], l[1], l[2], l[3], l[4], l[5]]))
                }
                _ => {}
            }
        }
        out.push(Entry { ip, mac, msg });
    }
    Ok(out)
}

fn raw_ip(b: &[u8]) -> Option<IpAddr> {
    if let Ok(a) = <[u8; 4]>::try_from(b) {
        Some(IpAddr::V4(Ipv4Addr::from(a)))
    } else {
        <[u8; 16]>::try_from(b)
            .ok()
            .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
    }
}
