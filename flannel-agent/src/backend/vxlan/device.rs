//! One kernel VXLAN device (`flannel.<VNI>` over IPv4, `flannel-v6.<VNI>` over IPv6): created
//! as configured, replaced when an existing one differs, kept up with exactly one address of
//! ours (the subnet's network address as a host route: /32 or /128, as upstream).

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};

use super::{Mac, VxlanError};
use crate::backend::route::is_gone;

/// What the device must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub vni: u32,
    /// 0: the kernel default.
    pub port: u16,
    /// The port the kernel reports for `port` (0 means its default).
    pub effective_port: u16,
    pub gbp: bool,
    pub learning: bool,
    /// The external interface (`dev`).
    pub ext_index: u32,
    /// Our underlay address (`local`): its family is the device's underlay family.
    pub local: IpAddr,
    pub mac: Mac,
    pub mtu: u32,
}

/// A device we keep, with the address it must carry.
#[derive(Debug)]
pub struct VxlanDevice {
    pub spec: DeviceSpec,
    /// The kernel's index once created (0 before).
    index: u32,
    /// Our overlay address on the device (the host route prefix is the family's full length).
    address: IpAddr,
}

fn netlink(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> VxlanError {
    let what = what.into();
    move |source| VxlanError::Netlink { what, source }
}

impl VxlanDevice {
    pub fn new(spec: DeviceSpec, address: IpAddr) -> Self {
        VxlanDevice {
            spec,
            index: 0,
            address,
        }
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    fn host_prefix(&self) -> u8 {
        if self.address.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// Does an existing link match what we would create? `Err` says what differs.
    fn compatible(&self, link: &LinkMessage) -> Result<(), String> {
        let s = &self.spec;
        let mut kind = None;
        let mut data = Vec::new();
        let mut mac = None;
        for attr in &link.attributes {
            match attr {
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => kind = Some(k.clone()),
                            LinkInfo::Data(InfoData::Vxlan(d)) => data = d.clone(),
                            _ => {}
                        }
                    }
                }
                LinkAttribute::Address(a) => mac = Some(a.clone()),
                _ => {}
            }
        }
        if kind != Some(InfoKind::Vxlan) {
            return Err(format!("kind {kind:?}, not vxlan"));
        }
        let has = |x: &InfoVxlan| data.contains(x);
        let local = match s.local {
            IpAddr::V4(a) => InfoVxlan::Local(a),
            IpAddr::V6(a) => InfoVxlan::Local6(a),
        };
        let checks = [
            (has(&InfoVxlan::Id(s.vni)), "VNI"),
            (has(&InfoVxlan::Link(s.ext_index)), "dev"),
            (has(&local), "local address"),
            (has(&InfoVxlan::Port(s.effective_port)), "port"),
            (has(&InfoVxlan::Learning(s.learning)), "learning"),
            (has(&InfoVxlan::Gbp) == s.gbp, "GBP"),
            (mac.as_deref() == Some(&s.mac.0[..]), "VTEP MAC"),
        ];
        match checks.iter().find(|(ok, _)| !ok) {
            Some((_, what)) => Err(format!("different {what}")),
            None => Ok(()),
        }
    }

    async fn create(&self, handle: &Handle) -> Result<(), VxlanError> {
        let s = &self.spec;
        let mut b = LinkVxlan::new(&s.name, s.vni).dev(s.ext_index);
        b = match s.local {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        b = b.learning(s.learning).mtu(s.mtu).address(s.mac.0.to_vec());
        if s.port != 0 {
            b = b.port(s.port);
        }
        if s.gbp {
            b = b.gbp();
        }
        handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(netlink(format!("creating vxlan device {}", s.name)))
    }

    /// Make the device exist, compatible, up, with our address. Returns true when the device
    /// is new (its neighbours, FDB entries and routes must be installed again).
    pub async fn ensure(&mut self, handle: &Handle) -> Result<bool, VxlanError> {
        let name = self.spec.name.clone();
        let mut fresh = true;
        if let Some(link) = find_link(handle, &name).await? {
            match self.compatible(&link) {
                Ok(()) => fresh = link.header.index != self.index,
                Err(why) => {
                    log::warn!("replacing existing device {name}: {why}");
                    handle
                        .link()
                        .del(link.header.index)
                        .execute()
                        .await
                        .or_else(|e| if is_gone(&e) { Ok(()) } else { Err(e) })
                        .map_err(netlink(format!("deleting device {name}")))?;
                    self.create(handle).await?;
                }
            }
        } else {
            if self.index != 0 {
                log::warn!("device {name} disappeared: creating it again");
            }
            self.create(handle).await?;
        }
        let link = find_link(handle, &name)
            .await?
            .ok_or_else(|| VxlanError::Vanished(name.clone()))?;
        self.index = link.header.index;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(self.index)
                    .mtu(self.spec.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("setting {name} up")))?;
        self.ensure_address(handle).await?;
        Ok(fresh)
    }

    /// Exactly one address of the device's family on it: ours, as a host route. (Link-local
    /// IPv6 addresses the kernel adds are left alone.)
    async fn ensure_address(&self, handle: &Handle) -> Result<(), VxlanError> {
        let name = &self.spec.name;
        let prefix = self.host_prefix();
        let mut present = false;
        let mut addrs = handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .execute();
        let mut stale = Vec::new();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(netlink(format!("listing the addresses of {name}")))?
        {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip)
                    if ip.is_ipv4() == self.address.is_ipv4() =>
                {
                    Some(*ip)
                }
                _ => None,
            });
            match ip {
                Some(IpAddr::V6(v6)) if v6.is_unicast_link_local() => {}
                Some(ip) if ip == self.address && msg.header.prefix_len == prefix => present = true,
                Some(_) => stale.push(msg),
                None => {}
            }
        }
        for msg in stale {
            if let Err(e) = handle.address().del(msg).execute().await {
                log::warn!("removing an old address from {name}: {e}");
            }
        }
        if !present {
            handle
                .address()
                .add(self.index, self.address, prefix)
                .execute()
                .await
                .map_err(netlink(format!(
                    "adding {}/{prefix} to {name}",
                    self.address
                )))?;
        }
        Ok(())
    }
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, VxlanError> {
    match handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(netlink(format!("looking up device {name}"))(e)),
    }
}
