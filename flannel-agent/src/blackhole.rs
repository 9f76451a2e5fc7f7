//! `--ip-blackhole-route`: a blackhole route for our own subnet, so that traffic to addresses
//! of our subnet no pod has is dropped here rather than sent back out (upstream adds it for
//! setups without the bridge plugin, e.g. Canal). Re-checked every `--iptables-resync` and
//! moved when our subnet changes.

use std::net::Ipv4Addr;
use std::time::Duration;

use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use tokio::sync::watch;

use crate::backend::route::is_gone;

/// Upstream adds it with metric 0, which shadows the link route cni0 gets for the same subnet
/// when its address comes later (the kernel appends it after ours): pods on this host would
/// become unreachable. With a high metric the blackhole only applies when nothing else routes
/// the subnet, which is what it is for.
pub const BLACKHOLE_METRIC: u32 = 4096;

fn message(subnet: Ipv4Network) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(subnet.network(), subnet.prefix())
        .kind(RouteType::BlackHole)
        .priority(BLACKHOLE_METRIC)
        // As `ip route add` (and upstream) install it.
        .protocol(RouteProtocol::Boot)
        .build()
}

/// True when the main table has a blackhole route for exactly `subnet`.
pub async fn exists(handle: &Handle, subnet: Ipv4Network) -> Result<bool, rtnetlink::Error> {
    let mut stream = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(msg) = stream.try_next().await? {
        if msg.header.table != 254
            || msg.header.kind != RouteType::BlackHole
            || msg.header.destination_prefix_length != subnet.prefix()
        {
            continue;
        }
        let dst = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        if dst == Some(subnet.network()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Add the blackhole route for `subnet` unless it is there.
pub async fn ensure(handle: &Handle, subnet: Ipv4Network) -> Result<bool, rtnetlink::Error> {
    if exists(handle, subnet).await? {
        return Ok(false);
    }
    handle.route().add(message(subnet)).execute().await?;
    Ok(true)
}

pub async fn remove(handle: &Handle, subnet: Ipv4Network) -> Result<(), rtnetlink::Error> {
    match handle.route().del(message(subnet)).execute().await {
        Err(e) if is_gone(&e) => Ok(()),
        r => r,
    }
}

/// Keep the route in place for the current subnet, forever.
pub async fn keep(handle: Handle, subnet: watch::Receiver<Ipv4Network>, period: Duration) {
    let mut resync = crate::resync::Resync::new(period, subnet);
    let mut current = resync.subnet();
    let mut last_error = None;
    loop {
        match ensure(&handle, current).await {
            Ok(true) => log::info!("blackhole route for {current} added"),
            Ok(false) => {}
            Err(e) => {
                // Once per distinct failure, not every resync.
                let line = e.to_string();
                if last_error.as_ref() != Some(&line) {
                    log::error!("failed to set up the blackhole route for {current}: {line}");
                    last_error = Some(line);
                }
            }
        }
        if let Some(next) = resync.next().await {
            if let Err(e) = remove(&handle, current).await {
                log::warn!("removing the blackhole route for our old subnet {current}: {e}");
            }
            current = next;
        }
    }
}
