//! `/metrics` end to end: two hosts on the udp backend with the eBPF data plane, real etcd,
//! a ping between CNI-attached containers across the overlay, then the Prometheus text from each agent's health listener.

use std::time::Duration;

use flannel_tests::{wait_for, Overlay};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

/// The value of the sample line for exactly `series`.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_show_lease_peers_and_dataplane_counters() {
    let o = Overlay::builder(UDP, 2)
        .flags(&["--udp-dataplane=ebpf"])
        .start()
        .unwrap();
    let (agents, containers) = (&o.agents, &o.containers);
    assert!(
        containers[0].ping(containers[1].ip, 3, 2).unwrap(),
        "ping across the overlay"
    );

    for (i, a) in agents.iter().enumerate() {
        let subnet = a.subnet().unwrap();
        // Counters are sampled once a second: wait for the ping to show.
        let body = wait_for(Duration::from_secs(5), "packets in /metrics", || {
            let (status, body) = a.http_get("/metrics").ok()?;
            assert_eq!(status, 200, "{body}");
            let tx = value(&body, "flannel_dataplane_packets_total{direction=\"tx\"}")?;
            let rx = value(&body, "flannel_dataplane_packets_total{direction=\"rx\"}")?;
            (tx > 0.0 && rx > 0.0).then_some(body)
        })
        .unwrap();
        let lease = body
            .lines()
            .find(|l| l.starts_with("flannel_lease_info{"))
            .unwrap_or_else(|| panic!("host {i}: no lease line:\n{body}"));
        assert!(lease.contains(&format!("subnet=\"{subnet}\"")), "{lease}");
        assert!(lease.ends_with(" 1"), "{lease}");
        assert_eq!(value(&body, "flannel_peers"), Some(1.0), "{body}");
        let info = a.dataplane_info().unwrap();
        assert_eq!(
            info.get("kind").map(String::as_str),
            Some("ebpf"),
            "{info:?}"
        );
        a.assert_logged_paths(&info);
        let expiry = value(&body, "flannel_lease_expiry_timestamp_seconds").expect("expiry");
        assert!(expiry > 1.0e9, "lease expiry {expiry}");
        assert!(
            body.contains("# TYPE flannel_dataplane_drops_total counter"),
            "{body}"
        );
        // Every drop reason the eBPF programs count is exported, and the version.
        for reason in [
            "no_peer",
            "not_ipv4",
            "malformed",
            "unknown_sender",
            "spoofed_source",
            "ttl_exceeded",
            "helper_error",
            "not_configured",
            "bad_ip_checksum",
            "other_host",
        ] {
            let series = format!("flannel_dataplane_drops_total{{reason=\"{reason}\"}}");
            assert!(value(&body, &series).is_some(), "no {series}:\n{body}");
        }
        assert_eq!(
            value(
                &body,
                &format!(
                    "flannel_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0),
            "{body}"
        );
    }
}
