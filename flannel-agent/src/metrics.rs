//! `/metrics`: the agent's state in the Prometheus text exposition format (version 0.0.4).
//!
//! Rendered from [`AgentStatus`] on each scrape; the data plane counters arrive as a
//! [`DataplaneSample`], which the sampling task refreshes (handlers cannot reach the backend).

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::backend::DataplaneSample;
use crate::status::AgentStatus;
use crate::subnet::watch::WatchHealth;
use flannel_common::counters::{self, CountedBy};
use flannel_common::Counter;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Escapes a label value: backslash, double quote and newline, as the format requires.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes HELP and TYPE for one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        let pairs: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
            .collect();
        let _ = write!(out, "{{{}}}", pairs.join(","));
    }
    let _ = writeln!(out, " {value}");
}

/// The whole `/metrics` body.
pub fn render(state: &AgentStatus, dataplane: Option<&DataplaneSample>) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "flannel_build_info",
        "gauge",
        "The running flanneld's version (always 1).",
    );
    sample(
        &mut out,
        "flannel_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );

    let own = state.own();
    if let Some(own) = own {
        family(
            &mut out,
            "flannel_lease_info",
            "gauge",
            "This node's subnet lease (always 1).",
        );
        sample(
            &mut out,
            "flannel_lease_info",
            &[
                ("subnet", &own.key.subnet_text()),
                ("public_ip", &own.attrs.public_ip.to_string()),
            ],
            1,
        );
    }
    family(
        &mut out,
        "flannel_lease_expiry_timestamp_seconds",
        "gauge",
        "Unix time at which this node's lease expires unless renewed (0: a reservation or no lease).",
    );
    sample(
        &mut out,
        "flannel_lease_expiry_timestamp_seconds",
        &[],
        state.lease_expiry(),
    );

    let peers = state.peer_count();
    family(
        &mut out,
        "flannel_peers",
        "gauge",
        "Peer subnet leases currently known.",
    );
    sample(&mut out, "flannel_peers", &[], peers);

    let watch = state.watch();
    family(
        &mut out,
        "flannel_watch_reconnects_total",
        "counter",
        "Times the etcd lease watch was re-established.",
    );
    sample(
        &mut out,
        "flannel_watch_reconnects_total",
        &[],
        watch.reconnects.load(Ordering::Relaxed),
    );
    family(
        &mut out,
        "flannel_watch_relists_total",
        "counter",
        "Times the full lease list was re-read (compacted or lost watch).",
    );
    sample(
        &mut out,
        "flannel_watch_relists_total",
        &[],
        watch.relists.load(Ordering::Relaxed),
    );
    family(
        &mut out,
        "flannel_watch_revision",
        "gauge",
        "Last etcd revision seen by the lease watch.",
    );
    sample(
        &mut out,
        "flannel_watch_revision",
        &[],
        watch.revision.load(Ordering::Relaxed),
    );
    let health = watch.health();
    family(
        &mut out,
        "flannel_watch_state",
        "gauge",
        "1 for the lease watch's current state: up, or why it cannot see etcd's changes.",
    );
    for h in WatchHealth::ALL {
        sample(
            &mut out,
            "flannel_watch_state",
            &[("state", h.name())],
            u8::from(h == health),
        );
    }
    family(
        &mut out,
        "flannel_watch_down_seconds",
        "gauge",
        "How long the lease watch has not been up (0 while up); /readyz is 503 past a grace period.",
    );
    sample(
        &mut out,
        "flannel_watch_down_seconds",
        &[],
        watch.down_for().as_secs(),
    );

    family(
        &mut out,
        "flannel_repairs_total",
        "counter",
        "Things the backend's periodic resync found missing or wrong and put back (flannel0, the TUN device, the overlay route, the external interface followed to its new ifindex, our programs on their hooks, the config and peer maps, the vxlan device), by what.",
    );
    let repairs = state.repairs();
    for what in crate::repair::Repair::ALL {
        let n = repairs
            .iter()
            .find(|(w, _)| *w == what)
            .map_or(0, |(_, n)| *n);
        sample(
            &mut out,
            "flannel_repairs_total",
            &[("what", what.label())],
            n,
        );
    }

    if let Some(checks) = state.bridge_netfilter() {
        family(
            &mut out,
            "flannel_br_netfilter",
            "gauge",
            "1 if traffic between pods on one bridge passes through iptables (br_netfilter loaded, net.bridge.bridge-nf-call-ip(6)tables=1), 0 if it bypasses them; per family, checked at start in iptables mode.",
        );
        for c in checks {
            sample(
                &mut out,
                "flannel_br_netfilter",
                &[("family", c.family)],
                u8::from(c.is_on()),
            );
        }
    }
    if let Some(dp) = dataplane {
        render_dataplane(&mut out, dp);
    }
    out
}

fn render_dataplane(out: &mut String, dp: &DataplaneSample) {
    let s = &dp.stats;
    family(
        out,
        "flannel_dataplane_info",
        "gauge",
        "The udp data plane in use (always 1); for eBPF also how its programs are attached (tcx, or tc: clsact cls_bpf) and where it decapsulates (xdp or tc).",
    );
    let mut labels = vec![("kind", dp.kind.label())];
    if let Some(p) = dp.paths {
        labels.push(("attach", p.attach.as_str()));
        labels.push(("decap", p.decap.label()));
    }
    sample(out, "flannel_dataplane_info", &labels, 1);
    // Every counter of the table, family by family; no made-up zeros for counters this data
    // plane does not have.
    for f in counters::FAMILIES {
        family(out, f.name, "counter", f.help);
        for c in Counter::ALL {
            if c.family() == f && (c.counted_by() == CountedBy::Both || dp.has_ebpf_counters()) {
                sample(out, f.name, &[(f.label, c.label())], s.get(c));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DataplaneKind, DataplaneStats};
    use crate::lease::{Lease, LeaseAttrs, SubnetKey};
    use std::net::Ipv4Addr;

    fn lease(subnet: &str, ip: [u8; 4], etcd_lease: i64) -> Lease {
        Lease {
            key: SubnetKey::new(subnet.parse().expect("test constant")),
            attrs: LeaseAttrs::new(Ipv4Addr::from(ip)),
            etcd_lease,
            mod_revision: 1,
        }
    }

    /// The value of the one sample line that starts with `series` followed by a space.
    fn value(body: &str, series: &str) -> Option<String> {
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn fresh_agent_renders_zeroes_and_no_lease_or_dataplane() {
        let body = render(&AgentStatus::default(), None);
        assert_eq!(value(&body, "flannel_peers").as_deref(), Some("0"));
        assert_eq!(
            value(&body, "flannel_lease_expiry_timestamp_seconds").as_deref(),
            Some("0")
        );
        assert!(!body.contains("flannel_lease_info{"), "{body}");
        assert!(!body.contains("flannel_dataplane"), "{body}");
        assert_eq!(
            value(&body, "flannel_repairs_total{what=\"overlay_device\"}").as_deref(),
            Some("0")
        );
    }

    #[test]
    fn repairs_are_counted_by_what() {
        use crate::repair::{Repair, Repairs};
        let state = AgentStatus::default();
        let mut r = Repairs::default();
        r.note(Repair::Program);
        r.note(Repair::ExternalInterface);
        r.note(Repair::Program);
        state.count_repairs(&r);
        let body = render(&state, None);
        assert!(
            body.contains("# TYPE flannel_repairs_total counter"),
            "{body}"
        );
        let count = |what: &str| value(&body, &format!("flannel_repairs_total{{what=\"{what}\"}}"));
        assert_eq!(count("program").as_deref(), Some("2"));
        assert_eq!(count("external_interface").as_deref(), Some("1"));
        assert_eq!(count("peer_map").as_deref(), Some("0"));
    }

    #[test]
    fn br_netfilter_is_a_gauge_per_checked_family_and_absent_when_not_checked() {
        use crate::br_netfilter::{BridgeNetfilter, SysctlState};
        let state = AgentStatus::default();
        assert!(!render(&state, None).contains("flannel_br_netfilter"));
        state.set_bridge_netfilter(vec![
            BridgeNetfilter {
                family: "ipv4",
                sysctl: "net.bridge.bridge-nf-call-iptables",
                state: SysctlState::Missing,
            },
            BridgeNetfilter {
                family: "ipv6",
                sysctl: "net.bridge.bridge-nf-call-ip6tables",
                state: SysctlState::On,
            },
        ]);
        let body = render(&state, None);
        assert!(body.contains("# TYPE flannel_br_netfilter gauge"), "{body}");
        assert_eq!(
            value(&body, "flannel_br_netfilter{family=\"ipv4\"}").as_deref(),
            Some("0")
        );
        assert_eq!(
            value(&body, "flannel_br_netfilter{family=\"ipv6\"}").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn renders_lease_peers_watch_and_dataplane_counters() {
        let state = AgentStatus::default();
        let own = lease("10.244.1.0/24", [192, 0, 2, 1], 77);
        state.set_lease_expiry(&own, std::time::Duration::from_secs(3600));
        state.set_own(&own);
        for (i, s) in ["10.244.2.0/24", "10.244.3.0/24"].iter().enumerate() {
            let l = lease(s, [192, 0, 2, 2 + i as u8], 5);
            state.apply_peer_events(&[crate::subnet::PeerEvent::Added(l)]);
        }
        state.watch().reconnects.store(3, Ordering::Relaxed);
        state.watch().relists.store(2, Ordering::Relaxed);
        state.watch().revision.store(1234, Ordering::Relaxed);
        let dataplane = Some(DataplaneSample {
            kind: DataplaneKind::Ebpf,
            stats: DataplaneStats {
                tx_packets: 10,
                tx_bytes: 1000,
                rx_packets: 9,
                rx_bytes: 900,
                drop_no_peer: 1,
                drop_not_ipv4: 2,
                drop_malformed: 3,
                drop_unknown_sender: 4,
                drop_spoofed_source: 5,
                drop_ttl_exceeded: 6,
                drop_helper_error: 7,
                drop_not_configured: 8,
                drop_bad_ip_checksum: 9,
                drop_other_host: 10,
                drop_unverified: 11,
            },
            paths: Some(crate::backend::DataplanePaths {
                attach: crate::backend::AttachMode::Tc,
                decap: crate::backend::DecapMode::Xdp,
            }),
        });
        let body = render(&state, dataplane.as_ref());
        let expect = [
            (
                "flannel_lease_info{subnet=\"10.244.1.0/24\",public_ip=\"192.0.2.1\"}",
                "1",
            ),
            ("flannel_peers", "2"),
            ("flannel_watch_reconnects_total", "3"),
            ("flannel_watch_relists_total", "2"),
            ("flannel_watch_revision", "1234"),
            (
                "flannel_dataplane_info{kind=\"ebpf\",attach=\"tc\",decap=\"xdp\"}",
                "1",
            ),
            ("flannel_dataplane_packets_total{direction=\"tx\"}", "10"),
            ("flannel_dataplane_packets_total{direction=\"rx\"}", "9"),
            ("flannel_dataplane_bytes_total{direction=\"tx\"}", "1000"),
            ("flannel_dataplane_bytes_total{direction=\"rx\"}", "900"),
            ("flannel_dataplane_drops_total{reason=\"no_peer\"}", "1"),
            ("flannel_dataplane_drops_total{reason=\"not_ipv4\"}", "2"),
            ("flannel_dataplane_drops_total{reason=\"malformed\"}", "3"),
            (
                "flannel_dataplane_drops_total{reason=\"unknown_sender\"}",
                "4",
            ),
            (
                "flannel_dataplane_drops_total{reason=\"spoofed_source\"}",
                "5",
            ),
            (
                "flannel_dataplane_drops_total{reason=\"ttl_exceeded\"}",
                "6",
            ),
            (
                "flannel_dataplane_drops_total{reason=\"helper_error\"}",
                "7",
            ),
            (
                "flannel_dataplane_drops_total{reason=\"not_configured\"}",
                "8",
            ),
            (
                "flannel_dataplane_drops_total{reason=\"bad_ip_checksum\"}",
                "9",
            ),
            ("flannel_dataplane_drops_total{reason=\"other_host\"}", "10"),
            ("flannel_dataplane_drops_total{reason=\"unverified\"}", "11"),
            ("flannel_build_info{version=\"0.1.0\"}", "1"),
        ];
        for (series, want) in expect {
            assert_eq!(
                value(&body, series).as_deref(),
                Some(want),
                "{series}\n{body}"
            );
        }
        let expiry: i64 = value(&body, "flannel_lease_expiry_timestamp_seconds")
            .and_then(|v| v.parse().ok())
            .expect("expiry sample");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        assert!(
            (now + 3590..=now + 3610).contains(&expiry),
            "{expiry} vs {now}"
        );
    }

    #[test]
    fn every_family_has_help_and_type_and_every_sample_a_family() {
        let state = AgentStatus::default();
        state.set_own(&lease("10.244.1.0/24", [192, 0, 2, 1], 0));
        let dataplane = Some(DataplaneSample {
            kind: DataplaneKind::Tun,
            stats: DataplaneStats::default(),
            paths: None,
        });
        let body = render(&state, dataplane.as_ref());
        let mut typed = Vec::new();
        for line in body.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(["gauge", "counter"].contains(&kind), "{line}");
                assert!(
                    body.contains(&format!("# HELP {name} ")),
                    "no HELP for {name}"
                );
                typed.push(name.to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                assert!(typed.iter().any(|t| t == name), "untyped sample {line}");
                if name.ends_with("_total") {
                    assert!(body.contains(&format!("# TYPE {name} counter")), "{line}");
                }
            }
        }
        assert!(
            body.contains("flannel_dataplane_info{kind=\"tun\"} 1"),
            "{body}"
        );
        // The TUN data plane has no such counters: no made-up zeros.
        for reason in [
            "ttl_exceeded",
            "helper_error",
            "not_configured",
            "bad_ip_checksum",
            "other_host",
        ] {
            assert!(!body.contains(reason), "{body}");
        }
    }

    #[test]
    fn reservations_never_expire() {
        let state = AgentStatus::default();
        state.set_lease_expiry(
            &lease("10.244.1.0/24", [192, 0, 2, 1], 0),
            std::time::Duration::from_secs(60),
        );
        assert_eq!(state.lease_expiry(), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
