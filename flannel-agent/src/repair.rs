//! What a backend's resync repaired, one label each: `flannel_repairs_total{what}` in
//! `/metrics`. The backend logs each repair (what and why) where it makes it; this only counts.

/// Something a resync found missing or wrong and put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Repair {
    /// udp (eBPF): `flannel0` gone or replaced, re-created with its address, MTU and route
    /// (and the programs on its hooks re-attached); or found down, or without its address.
    OverlayDevice,
    /// udp (TUN): the TUN device gone, re-created and the forwarder moved onto it.
    TunDevice,
    /// udp: the route of the overlay network through `flannel0` gone.
    Route,
    /// udp (eBPF): the external interface re-created (new ifindex): decap re-attached there and
    /// the config map pointed at it.
    ExternalInterface,
    /// udp (eBPF): one of our programs missing from its hook (a TCX link detached or its pin
    /// gone, a cls_bpf filter deleted, XDP detached): attached again.
    Program,
    /// udp (eBPF): another program where ours belongs (our cls_bpf filter's slot taken, or our
    /// TCX link detached and another program on the hook): ours put back, with a warning.
    ForeignProgram,
    /// udp (eBPF): the config map no longer what the agent wrote.
    ConfigMap,
    /// udp: the peer table differs from the peers in etcd (an entry changed or deleted by
    /// hand, or a change that failed to apply).
    PeerMap,
    /// vxlan: `flannel.<VNI>` (or the IPv6 device) gone, re-created with its peers.
    VxlanDevice,
}

impl Repair {
    pub const ALL: [Repair; 9] = [
        Repair::OverlayDevice,
        Repair::TunDevice,
        Repair::Route,
        Repair::ExternalInterface,
        Repair::Program,
        Repair::ForeignProgram,
        Repair::ConfigMap,
        Repair::PeerMap,
        Repair::VxlanDevice,
    ];

    /// The `what` label.
    pub fn label(self) -> &'static str {
        match self {
            Repair::OverlayDevice => "overlay_device",
            Repair::TunDevice => "tun_device",
            Repair::Route => "route",
            Repair::ExternalInterface => "external_interface",
            Repair::Program => "program",
            Repair::ForeignProgram => "foreign_program",
            Repair::ConfigMap => "config_map",
            Repair::PeerMap => "peer_map",
            Repair::VxlanDevice => "vxlan_device",
        }
    }
}

/// The repairs of one resync, in the order they were made.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repairs(Vec<Repair>);

impl Repairs {
    pub fn note(&mut self, what: Repair) {
        self.0.push(what);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Repair> + '_ {
        self.0.iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_snake_case() {
        let mut labels: Vec<&str> = Repair::ALL.iter().map(|r| r.label()).collect();
        assert!(labels
            .iter()
            .all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Repair::ALL.len());
    }
}
