//! The peer table in the kernel: `flannel_peers` (subnet → public IP, where encap sends) and
//! `flannel_senders` (public IP → how many subnets it owns, whom decap accepts), kept in step
//! with a copy in user space to diff against.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData, MapError};
use flannel_common::{map_names, PeerKey, PeerValue, SenderKey, SenderValue};
use ipnetwork::Ipv4Network;

use super::error::map_err;
use super::EbpfError;

pub(super) struct PeerTable {
    peers: HashMap<MapData, PeerKey, PeerValue>,
    senders: HashMap<MapData, SenderKey, SenderValue>,
    subnet_len: u8,
    /// What the peer map holds (normalised subnets), to diff against.
    table: BTreeMap<Ipv4Network, Ipv4Addr>,
    /// How many subnets each public IP in `table` owns (what the sender map holds).
    sender_counts: BTreeMap<Ipv4Addr, u32>,
}

impl PeerTable {
    /// Takes over the maps with whatever they hold (pinned by an earlier agent), and makes the
    /// sender map match the peers.
    pub fn adopt(
        peers: aya::maps::Map,
        senders: aya::maps::Map,
        subnet_len: u8,
    ) -> Result<Self, EbpfError> {
        let peers: HashMap<MapData, PeerKey, PeerValue> =
            HashMap::try_from(peers).map_err(map_err(map_names::PEERS))?;
        let senders: HashMap<MapData, SenderKey, SenderValue> =
            HashMap::try_from(senders).map_err(map_err(map_names::SENDERS))?;
        let mut table = BTreeMap::new();
        for entry in peers.iter() {
            let (key, value) = entry.map_err(map_err(map_names::PEERS))?;
            let subnet =
                Ipv4Network::new(Ipv4Addr::from(key.subnet), subnet_len).map_err(|_| {
                    EbpfError::SubnetLength {
                        subnet: Ipv4Network::from(Ipv4Addr::from(key.subnet)),
                        expected: subnet_len,
                    }
                })?;
            table.insert(subnet, Ipv4Addr::from(value.public_ip));
        }
        let mut peer_table = PeerTable {
            peers,
            senders,
            subnet_len,
            table,
            sender_counts: BTreeMap::new(),
        };
        peer_table.rebuild_senders()?;
        Ok(peer_table)
    }

    /// The peer table as the kernel map holds it.
    pub fn peers(&self) -> &BTreeMap<Ipv4Network, Ipv4Addr> {
        &self.table
    }

    fn normalise(&self, subnet: Ipv4Network) -> Result<Ipv4Network, EbpfError> {
        if subnet.prefix() != self.subnet_len {
            return Err(EbpfError::SubnetLength {
                subnet,
                expected: self.subnet_len,
            });
        }
        Ipv4Network::new(subnet.network(), subnet.prefix()).map_err(|_| EbpfError::SubnetLength {
            subnet,
            expected: self.subnet_len,
        })
    }

    pub fn insert(&mut self, subnet: Ipv4Network, public_ip: Ipv4Addr) -> Result<(), EbpfError> {
        let subnet = self.normalise(subnet)?;
        if self.table.get(&subnet) == Some(&public_ip) {
            return Ok(());
        }
        let key = PeerKey {
            subnet: subnet.network().octets(),
        };
        let value = PeerValue {
            public_ip: public_ip.octets(),
        };
        self.peers
            .insert(key, value, 0)
            .map_err(map_err(map_names::PEERS))?;
        let old = self.table.insert(subnet, public_ip);
        self.count_sender(public_ip, 1)?;
        if let Some(old) = old {
            self.count_sender(old, -1)?;
        }
        Ok(())
    }

    pub fn delete(&mut self, subnet: Ipv4Network) -> Result<(), EbpfError> {
        let subnet = self.normalise(subnet)?;
        let key = PeerKey {
            subnet: subnet.network().octets(),
        };
        match self.peers.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map_names::PEERS)(e)),
        }
        if let Some(old) = self.table.remove(&subnet) {
            self.count_sender(old, -1)?;
        }
        Ok(())
    }

    /// Makes the table equal to `peers`. Subnets of the wrong length are left out and returned
    /// as errors; a map write that fails stops the sync.
    pub fn sync(
        &mut self,
        peers: &BTreeMap<Ipv4Network, Ipv4Addr>,
    ) -> Result<Vec<EbpfError>, EbpfError> {
        let mut wanted = BTreeMap::new();
        let mut rejected = Vec::new();
        for (subnet, ip) in peers {
            match self.normalise(*subnet) {
                Ok(s) => {
                    wanted.insert(s, *ip);
                }
                Err(e) => rejected.push(e),
            }
        }
        let stale: Vec<Ipv4Network> = self
            .table
            .keys()
            .filter(|s| !wanted.contains_key(*s))
            .copied()
            .collect();
        for subnet in stale {
            self.delete(subnet)?;
        }
        for (subnet, ip) in wanted {
            self.insert(subnet, ip)?;
        }
        Ok(rejected)
    }

    /// Makes the kernel maps hold our table again where they differ from it (entries changed
    /// or deleted by hand); true if anything had to be written.
    pub fn repair(&mut self) -> Result<bool, EbpfError> {
        let mut present = BTreeMap::new();
        for entry in self.peers.iter() {
            let (key, value) = entry.map_err(map_err(map_names::PEERS))?;
            present.insert(key.subnet, value.public_ip);
        }
        let wanted: BTreeMap<[u8; 4], [u8; 4]> = self
            .table
            .iter()
            .map(|(s, ip)| (s.network().octets(), ip.octets()))
            .collect();
        let senders: BTreeMap<[u8; 4], u32> = self
            .senders
            .iter()
            .map(|e| e.map(|(k, v)| (k.public_ip, v.subnets)))
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::SENDERS))?;
        let wanted_senders: BTreeMap<[u8; 4], u32> = self
            .sender_counts
            .iter()
            .map(|(ip, n)| (ip.octets(), *n))
            .collect();
        if present == wanted && senders == wanted_senders {
            return Ok(false);
        }
        for subnet in present.keys().filter(|s| !wanted.contains_key(*s)) {
            match self.peers.remove(&PeerKey { subnet: *subnet }) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::PEERS)(e)),
            }
        }
        for (subnet, ip) in &wanted {
            if present.get(subnet) != Some(ip) {
                let key = PeerKey { subnet: *subnet };
                let value = PeerValue { public_ip: *ip };
                self.peers
                    .insert(key, value, 0)
                    .map_err(map_err(map_names::PEERS))?;
            }
        }
        self.rebuild_senders()?;
        Ok(true)
    }

    /// Adds `delta` to the number of subnets `public_ip` owns and writes it to the sender map
    /// (removing the entry at 0).
    fn count_sender(&mut self, public_ip: Ipv4Addr, delta: i32) -> Result<(), EbpfError> {
        let count = self.sender_counts.entry(public_ip).or_default();
        *count = count.saturating_add_signed(delta);
        let subnets = *count;
        let key = SenderKey {
            public_ip: public_ip.octets(),
        };
        let result = if subnets == 0 {
            self.sender_counts.remove(&public_ip);
            match self.senders.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        } else {
            self.senders.insert(key, SenderValue { subnets }, 0)
        };
        result.map_err(map_err(map_names::SENDERS))
    }

    /// Makes the sender map match the peer table exactly (after adopting pinned maps).
    fn rebuild_senders(&mut self) -> Result<(), EbpfError> {
        let mut wanted: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        for ip in self.table.values() {
            *wanted.entry(*ip).or_default() += 1;
        }
        let present: Vec<SenderKey> = self
            .senders
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::SENDERS))?;
        for key in present {
            if !wanted.contains_key(&Ipv4Addr::from(key.public_ip)) {
                match self.senders.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(map_names::SENDERS)(e)),
                }
            }
        }
        for (ip, subnets) in &wanted {
            let (ip, subnets) = (*ip, *subnets);
            self.senders
                .insert(
                    SenderKey {
                        public_ip: ip.octets(),
                    },
                    SenderValue { subnets },
                    0,
                )
                .map_err(map_err(map_names::SENDERS))?;
        }
        self.sender_counts = wanted;
        Ok(())
    }
}
