//! The data plane's counters, defined once: the table at the bottom generates [`Stats`] (the
//! per-CPU value of the `flannel_stats` map, one `u64` field per counter, in table order) and
//! [`Counter`] (one variant per counter, with its name, help text, where it shows on
//! `/metrics` and which data planes count it). The eBPF programs count with
//! [`Stats::get_mut`]; the agent (TUN forwarder, `/metrics`, `flanneld dataplane`) and the
//! tests iterate over [`Counter::ALL`].
//!
//! Adding a counter: one line in the table, then count it where it happens (eBPF and/or the
//! TUN forwarder). The map grows, which the loader handles (it recreates pinned maps whose
//! sizes differ).

/// A `/metrics` family the counters are samples of; one label tells its samples apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricFamily {
    pub name: &'static str,
    pub help: &'static str,
    /// Label name; each counter of the family has its own value of it.
    pub label: &'static str,
}

/// Packets (GSO super-packets count once) encapsulated and decapsulated.
pub const PACKETS: MetricFamily = MetricFamily {
    name: "flannel_dataplane_packets_total",
    help: "Packets encapsulated (tx) and decapsulated (rx) by the udp data plane.",
    label: "direction",
};
/// Inner-packet bytes encapsulated and decapsulated.
pub const BYTES: MetricFamily = MetricFamily {
    name: "flannel_dataplane_bytes_total",
    help: "Inner-packet bytes encapsulated (tx) and decapsulated (rx) by the udp data plane.",
    label: "direction",
};
/// Dropped packets, by reason.
pub const DROPS: MetricFamily = MetricFamily {
    name: "flannel_dataplane_drops_total",
    help: "Packets the udp data plane dropped, by reason.",
    label: "reason",
};
/// The families, in the order `/metrics` shows them.
pub const FAMILIES: [MetricFamily; 3] = [PACKETS, BYTES, DROPS];

/// Which data planes count a counter. The TUN forwarder has no equivalent of some eBPF
/// drop reasons; `/metrics` leaves those out for it rather than show made-up zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CountedBy {
    /// The eBPF programs and the TUN forwarder.
    Both,
    /// The eBPF programs only.
    Ebpf,
}

macro_rules! counters {
    ($(
        $field:ident => $variant:ident, $family:ident = $label:literal, $by:ident,
            $help:literal;
    )*) => {
        /// Counters, one copy per CPU in the eBPF map (the agent sums them); also the summed
        /// counters of either data plane.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
        pub struct Stats {
            $(
                #[doc = $help]
                pub $field: u64,
            )*
        }

        /// One data plane counter (a field of [`Stats`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Counter {
            $(
                #[doc = $help]
                $variant,
            )*
        }

        impl Counter {
            /// Every counter, in [`Stats`] field order.
            pub const ALL: [Counter; [$(stringify!($variant)),*].len()] =
                [$(Counter::$variant),*];

            /// The [`Stats`] field name (`drop_no_peer`), as `flanneld dataplane` and
            /// `bpftool map dump` show it.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => stringify!($field),)*
                }
            }

            /// What it counts, in one sentence.
            pub const fn help(self) -> &'static str {
                match self {
                    $(Counter::$variant => $help,)*
                }
            }

            /// The `/metrics` family it is a sample of.
            pub const fn family(self) -> MetricFamily {
                match self {
                    $(Counter::$variant => $family,)*
                }
            }

            /// Its value of the family's label (`tx`, `no_peer`).
            pub const fn label(self) -> &'static str {
                match self {
                    $(Counter::$variant => $label,)*
                }
            }

            /// Which data planes count it.
            pub const fn counted_by(self) -> CountedBy {
                match self {
                    $(Counter::$variant => CountedBy::$by,)*
                }
            }

            /// Whether it is a drop reason.
            pub fn is_drop(self) -> bool {
                self.family() == DROPS
            }
        }

        impl Stats {
            #[inline(always)]
            pub fn get(&self, counter: Counter) -> u64 {
                match counter {
                    $(Counter::$variant => self.$field,)*
                }
            }

            #[inline(always)]
            pub fn get_mut(&mut self, counter: Counter) -> &mut u64 {
                match counter {
                    $(Counter::$variant => &mut self.$field,)*
                }
            }

            /// Adds every counter of `other` (summing CPUs or threads).
            pub fn add(&mut self, other: &Stats) {
                for c in Counter::ALL {
                    *self.get_mut(c) += other.get(c);
                }
            }

            /// The sum of all drop counters.
            pub fn drops(&self) -> u64 {
                Counter::ALL
                    .iter()
                    .filter(|c| c.is_drop())
                    .map(|c| self.get(*c))
                    .sum()
            }
        }
    };
}

// The one definition. Field order is the map's layout; the help texts become the docs of
// the fields and variants.
counters! {
    tx_packets => TxPackets, PACKETS = "tx", Both,
        "Packets encapsulated (GSO super-packets count once).";
    tx_bytes => TxBytes, BYTES = "tx", Both,
        "Inner-packet bytes encapsulated.";
    rx_packets => RxPackets, PACKETS = "rx", Both,
        "Packets decapsulated and delivered (GSO super-packets count once).";
    rx_bytes => RxBytes, BYTES = "rx", Both,
        "Inner-packet bytes decapsulated and delivered.";
    drop_no_peer => DropNoPeer, DROPS = "no_peer", Both,
        "Encap: no peer owns the destination subnet.";
    drop_not_ipv4 => DropNotIpv4, DROPS = "not_ipv4", Both,
        "Encap: a non-IPv4 packet on the overlay device.";
    drop_malformed => DropMalformed, DROPS = "malformed", Both,
        "Bad headers: encap input too short or not a valid IPv4 header; decap (our IP and port) with truncated/inconsistent outer or inner headers, or an outer fragment.";
    drop_unknown_sender => DropUnknownSender, DROPS = "unknown_sender", Both,
        "Decap: outer source is not a peer's public IP.";
    drop_spoofed_source => DropSpoofedSource, DROPS = "spoofed_source", Both,
        "Decap: outer source is a peer, but the inner source is not in that peer's subnet.";
    drop_ttl_exceeded => DropTtlExceeded, DROPS = "ttl_exceeded", Ebpf,
        "Encap: inner TTL would reach 0 (upstream's proxy drops those silently too).";
    drop_helper_error => DropHelperError, DROPS = "helper_error", Ebpf,
        "A kernel helper failed (resizing the packet or redirecting it).";
    drop_not_configured => DropNotConfigured, DROPS = "not_configured", Ebpf,
        "Encap ran before the agent wrote the configuration (decap passes everything then).";
    drop_bad_ip_checksum => DropBadIpChecksum, DROPS = "bad_ip_checksum", Ebpf,
        "Decap: the outer IPv4 header checksum is wrong (the stack would drop it too).";
    drop_other_host => DropOtherHost, DROPS = "other_host", Ebpf,
        "Decap: the frame was addressed to another host's MAC (pkt_type other-host, seen in promiscuous mode or on a flooding switch), which the stack drops.";
    drop_unverified => DropUnverified, DROPS = "unverified", Ebpf,
        "A packet posed as checked by decap without having been: on flannel0, VXLAN sent to the udp port other than through the external device; on the external device, a frame arriving with XDP decap's mark as its source MAC.";
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn counters_are_the_stats_fields_in_order() {
        let mut s = Stats::default();
        for (i, c) in Counter::ALL.into_iter().enumerate() {
            *s.get_mut(c) = i as u64 + 1;
        }
        // SAFETY: Stats is #[repr(C)] and made of exactly ALL.len() u64s (checked in lib.rs).
        let words: [u64; Counter::ALL.len()] = unsafe { core::mem::transmute(s) };
        for (i, w) in words.iter().enumerate() {
            assert_eq!(*w, i as u64 + 1, "{}", Counter::ALL[i].name());
        }
        assert_eq!(s.drop_no_peer, s.get(Counter::DropNoPeer));
    }

    #[test]
    fn names_and_metric_labels_are_unique_and_drops_are_named_so() {
        let names: BTreeSet<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Counter::ALL.len());
        let series: BTreeSet<_> = Counter::ALL
            .iter()
            .map(|c| (c.family().name, c.label()))
            .collect();
        assert_eq!(series.len(), Counter::ALL.len());
        for c in Counter::ALL {
            assert!(FAMILIES.contains(&c.family()), "{}", c.name());
            assert_eq!(c.is_drop(), c.name().starts_with("drop_"), "{}", c.name());
            if c.is_drop() {
                assert_eq!(c.name(), std::format!("drop_{}", c.label()));
            }
        }
    }

    #[test]
    fn add_and_drops_cover_every_counter() {
        let mut one = Stats::default();
        for c in Counter::ALL {
            *one.get_mut(c) = 1;
        }
        let mut sum = Stats::default();
        sum.add(&one);
        sum.add(&one);
        assert!(Counter::ALL.iter().all(|c| sum.get(*c) == 2));
        assert_eq!(
            one.drops(),
            Counter::ALL.iter().filter(|c| c.is_drop()).count() as u64
        );
    }
}
