//! flanneld against a real etcd server, hosts in network namespaces, the `alloc` backend.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flannel_tests::etcd::peer_view;
use flannel_tests::{wait_for, Agent, Cluster};
use nix::sys::signal::Signal;

const ALLOC: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";
const READY: Duration = Duration::from_secs(20);

fn start_all(cluster: &Cluster, hosts: impl Iterator<Item = usize>, extra: &[&str]) -> Vec<Agent> {
    hosts
        .map(|i| cluster.start_agent(i, extra).unwrap())
        .collect()
}

/// What etcd says each node's peers are: every valid lease but the node's own.
fn etcd_view(cluster: &Cluster, own_ip: &str) -> Vec<(String, String)> {
    peer_view(cluster.leases().unwrap(), SUBNETS, own_ip)
}

fn wait_view_matches_etcd(cluster: &Cluster, agent: &Agent, timeout: Duration) {
    let own = agent.ip.to_string();
    let mut last = (Vec::new(), Vec::new());
    let r = wait_for(timeout, "peer view to equal etcd", || {
        let want = etcd_view(cluster, &own);
        let got = agent.peers().ok()?;
        let ok = got == want;
        last = (got, want);
        ok.then_some(())
    });
    if r.is_err() {
        panic!(
            "agent {own}: view {:?} != etcd {:?}\n{}",
            last.0,
            last.1,
            agent.log()
        );
    }
}

#[test]
fn thirty_two_agents_started_at_once_get_distinct_subnets() {
    let cluster = Cluster::new(32).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agents = start_all(&cluster, 0..32, &[]);
    for a in agents.iter_mut() {
        a.wait_ready(READY).unwrap();
    }
    let subnets: BTreeSet<String> = agents
        .iter()
        .map(|a| a.subnet().expect("subnet.env"))
        .collect();
    assert_eq!(subnets.len(), 32, "{subnets:?}");
    for s in &subnets {
        let third: u8 = s.split('.').nth(2).unwrap().parse().unwrap();
        assert!(
            s.starts_with("10.244.") && s.ends_with(".0/24") && third >= 1,
            "{s} outside SubnetMin..SubnetMax"
        );
    }
    let leases = cluster.leases().unwrap();
    assert_eq!(leases.len(), 32);
    // Every node sees all 31 others.
    for a in &agents {
        wait_view_matches_etcd(&cluster, a, Duration::from_secs(5));
        assert_eq!(a.peers().unwrap().len(), 31);
    }
}

#[test]
fn fifty_simultaneous_pairs_always_learn_each_other() {
    let cluster = Cluster::new(2).unwrap();
    cluster.set_config(ALLOC).unwrap();
    for round in 0..50 {
        for kv in cluster.leases().unwrap() {
            cluster.etcd.del(&kv.key).unwrap();
        }
        for h in &cluster.hosts {
            let _ = std::fs::remove_file(h.dir.join("subnet.env"));
        }
        let mut agents = start_all(&cluster, 0..2, &[]);
        for a in agents.iter_mut() {
            a.wait_ready(READY).unwrap();
        }
        for (me, other) in [(0, 1), (1, 0)] {
            let want = vec![(
                agents[other].subnet().unwrap(),
                agents[other].ip.to_string(),
            )];
            let r = wait_for(Duration::from_secs(5), "peer lease", || {
                (agents[me].peers().ok()? == want).then_some(())
            });
            assert!(
                r.is_ok(),
                "round {round}: agent {me} never learned {want:?}\n{}",
                agents[me].log()
            );
        }
        for a in agents.iter_mut() {
            let t = Instant::now();
            let st = a.stop().unwrap();
            assert!(
                st.success(),
                "round {round}: SIGTERM exit status {st}\n{}",
                a.log()
            );
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "round {round}: exit took {:?}",
                t.elapsed()
            );
            assert!(!a.log().contains("panicked"), "{}", a.log());
        }
    }
}

#[test]
fn renewal_keeps_the_key_and_one_etcd_lease_per_node() {
    let cluster = Cluster::new(3).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agents = start_all(&cluster, 0..3, &["--subnet-lease-ttl=3s"]);
    for a in agents.iter_mut() {
        a.wait_ready(READY).unwrap();
    }
    let initial: BTreeMap<String, i64> = cluster
        .leases()
        .unwrap()
        .into_iter()
        .map(|kv| (kv.key, kv.lease))
        .collect();
    assert_eq!(initial.len(), 3);
    // Watch for four TTLs: the keys must never vanish and each node holds exactly one lease.
    let end = Instant::now() + Duration::from_secs(12);
    let mut samples = 0;
    while Instant::now() < end {
        let now: BTreeMap<String, i64> = cluster
            .leases()
            .unwrap()
            .into_iter()
            .map(|kv| (kv.key, kv.lease))
            .collect();
        assert_eq!(now, initial, "subnet keys or their etcd leases changed");
        assert_eq!(
            cluster.etcd.lease_ids().unwrap().len(),
            3,
            "etcd leases leaked"
        );
        samples += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(samples > 20);
    for a in &agents {
        assert!(a.log().contains("lease acquired"), "{}", a.log());
    }
}

#[test]
fn restart_reuses_the_subnet_from_etcd_then_from_subnet_env() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut a = cluster.start_agent(0, &[]).unwrap();
    a.wait_ready(READY).unwrap();
    let first = a.subnet().unwrap();
    a.stop().unwrap();

    let mut a = cluster.start_agent(0, &[]).unwrap();
    a.wait_ready(READY).unwrap();
    assert_eq!(a.subnet().unwrap(), first, "restart with the key in etcd");
    assert_eq!(
        cluster.etcd.lease_ids().unwrap().len(),
        1,
        "old etcd lease must be revoked"
    );
    a.stop().unwrap();

    for kv in cluster.leases().unwrap() {
        cluster.etcd.del(&kv.key).unwrap();
    }
    let mut a = cluster.start_agent(0, &[]).unwrap();
    a.wait_ready(READY).unwrap();
    assert_eq!(a.subnet().unwrap(), first, "restart with only subnet.env");
}

#[test]
fn reservations_are_honoured() {
    let cluster = Cluster::new(4).unwrap();
    cluster
        .set_config(r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.4.0","Backend":{"Type":"alloc"}}"#)
        .unwrap();
    let h1 = cluster.hosts[1].ip.to_string();
    cluster
        .etcd
        .put(
            &format!("{SUBNETS}10.244.1.0-24"),
            &format!(r#"{{"PublicIP":"{h1}","PublicIPv6":null}}"#),
        )
        .unwrap();
    cluster
        .etcd
        .put(
            &format!("{SUBNETS}10.244.2.0-24"),
            r#"{"PublicIP":"192.0.2.99","PublicIPv6":null}"#,
        )
        .unwrap();
    let mut agents = start_all(&cluster, 0..3, &[]);
    for a in agents.iter_mut() {
        a.wait_ready(READY).unwrap();
    }
    assert_eq!(agents[1].subnet().unwrap(), "10.244.1.0/24");
    let others: BTreeSet<String> =
        [agents[0].subnet().unwrap(), agents[2].subnet().unwrap()].into();
    assert_eq!(
        others,
        BTreeSet::from(["10.244.3.0/24".to_owned(), "10.244.4.0/24".to_owned()])
    );
    // The reservations stay reservations (no etcd lease attached).
    for kv in cluster.leases().unwrap() {
        if kv.key.ends_with("10.244.1.0-24") || kv.key.ends_with("10.244.2.0-24") {
            assert_eq!(kv.lease, 0, "{kv:?}");
        }
    }
    // The network is now full: a fourth node must not take the reserved 10.244.2.0.
    let mut fourth = cluster.start_agent(3, &[]).unwrap();
    let st = fourth.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(!st.success());
    assert!(fourth.log().contains("no free subnet"), "{}", fourth.log());
    let v = cluster
        .etcd
        .get(&format!("{SUBNETS}10.244.2.0-24"))
        .unwrap()
        .unwrap();
    assert!(v.contains("192.0.2.99"));
}

#[test]
fn compaction_and_etcd_outage_leave_the_view_equal_to_etcd() {
    let mut cluster = Cluster::new(3).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agents = start_all(&cluster, 0..3, &[]);
    for a in agents.iter_mut() {
        a.wait_ready(READY).unwrap();
    }
    for a in &agents {
        wait_view_matches_etcd(&cluster, a, Duration::from_secs(5));
    }
    let fake = |n: u8| {
        (
            format!("{SUBNETS}10.244.{n}.0-24"),
            format!(r#"{{"PublicIP":"198.51.100.{n}","PublicIPv6":null}}"#),
        )
    };

    // Compaction: agent 0 is frozen while etcd restarts, changes happen and history is
    // compacted, so its watch must resume from a compacted revision and re-list.
    cluster.etcd.put(&fake(200).0, &fake(200).1).unwrap();
    for a in &agents {
        wait_view_matches_etcd(&cluster, a, Duration::from_secs(5));
    }
    agents[0].signal(Signal::SIGSTOP).unwrap();
    cluster.etcd.stop().unwrap();
    cluster.etcd.resume().unwrap();
    cluster.etcd.del(&fake(200).0).unwrap();
    for n in 201..205 {
        cluster.etcd.put(&fake(n).0, &fake(n).1).unwrap();
    }
    cluster.etcd.del(&fake(202).0).unwrap();
    let rev = cluster.etcd.revision().unwrap();
    cluster.etcd.ctl(&["compact", &rev.to_string()]).unwrap();
    agents[0].signal(Signal::SIGCONT).unwrap();
    for a in &agents {
        wait_view_matches_etcd(&cluster, a, Duration::from_secs(15));
    }
    assert!(
        agents[0].log().contains("compacted"),
        "agent 0 should have re-listed:\n{}",
        agents[0].log()
    );

    // A 10 s outage, then changes right after etcd returns.
    cluster.etcd.stop().unwrap();
    std::thread::sleep(Duration::from_secs(10));
    cluster.etcd.resume().unwrap();
    cluster.etcd.put(&fake(210).0, &fake(210).1).unwrap();
    cluster.etcd.del(&fake(201).0).unwrap();
    for a in &agents {
        wait_view_matches_etcd(&cluster, a, Duration::from_secs(15));
    }
    for a in agents.iter_mut() {
        assert!(
            a.try_wait().unwrap().is_none(),
            "agent died during the outage:\n{}",
            a.log()
        );
    }
    assert_eq!(
        cluster
            .leases()
            .unwrap()
            .iter()
            .filter(|kv| kv.value.contains("192.0.2."))
            .count(),
        3
    );
}

#[test]
fn lease_json_is_upstreams_and_upstream_values_parse() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let upstream = [
        (
            "10.244.201.0-24",
            r#"{"PublicIP":"172.30.0.12","PublicIPv6":null}"#,
        ),
        (
            "10.244.202.0-24",
            r#"{"PublicIP":"172.30.0.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"f6:ee:c7:fe:16:40"}}"#,
        ),
        (
            "10.244.203.0-24",
            r#"{"PublicIP":"172.30.0.13","PublicIPv6":null,"BackendType":"host-gw"}"#,
        ),
    ];
    for (k, v) in upstream {
        cluster.etcd.put(&format!("{SUBNETS}{k}"), v).unwrap();
    }
    let mut a = cluster.start_agent(0, &[]).unwrap();
    a.wait_ready(READY).unwrap();
    let own = cluster
        .leases()
        .unwrap()
        .into_iter()
        .find(|kv| kv.value.contains("192.0.2.10"))
        .unwrap();
    assert_eq!(own.value, r#"{"PublicIP":"192.0.2.10","PublicIPv6":null}"#);
    assert_ne!(own.lease, 0);
    let peers = a.peers().unwrap();
    assert_eq!(
        peers,
        vec![
            ("10.244.201.0/24".into(), "172.30.0.12".into()),
            ("10.244.202.0/24".into(), "172.30.0.11".into()),
            ("10.244.203.0/24".into(), "172.30.0.13".into()),
        ]
    );
}

#[test]
fn malformed_lease_values_are_skipped_with_a_warning_naming_the_key() {
    let cluster = Cluster::new(2).unwrap();
    cluster.set_config(ALLOC).unwrap();
    cluster
        .etcd
        .put(&format!("{SUBNETS}10.244.250.0-24"), "{not json")
        .unwrap();
    cluster
        .etcd
        .put(
            &format!("{SUBNETS}banana"),
            r#"{"PublicIP":"198.51.100.1","PublicIPv6":null}"#,
        )
        .unwrap();
    let mut a = cluster.start_agent(0, &[]).unwrap();
    a.wait_ready(READY).unwrap();
    assert!(a.log().contains("10.244.250.0-24"), "{}", a.log());
    assert!(a.log().contains("banana"), "{}", a.log());
    // A peer key turning into garbage removes the peer; valid peers keep working.
    let mut b = cluster.start_agent(1, &[]).unwrap();
    b.wait_ready(READY).unwrap();
    let b_key = format!("{SUBNETS}{}", b.subnet().unwrap().replace('/', "-"));
    wait_for(Duration::from_secs(5), "peer b", || {
        (a.peers().ok()?.len() == 1).then_some(())
    })
    .unwrap();
    cluster
        .etcd
        .put(
            &format!("{SUBNETS}10.244.251.0-24"),
            r#"{"PublicIP":"198.51.100.251","PublicIPv6":null}"#,
        )
        .unwrap();
    cluster
        .etcd
        .put(
            &format!("{SUBNETS}10.244.252.0-24"),
            r#"{"PublicIP":[1,2]}"#,
        )
        .unwrap();
    wait_for(Duration::from_secs(5), "valid peer added", || {
        (a.peers().ok()?.len() == 2).then_some(())
    })
    .unwrap();
    assert!(a.try_wait().unwrap().is_none());
    assert!(!a.log().contains("panicked"));
    // Garbage over b's key: a drops b from its view (etcd no longer holds a valid lease).
    b.signal(Signal::SIGSTOP).unwrap();
    cluster.etcd.put(&b_key, "garbage").unwrap();
    wait_for(Duration::from_secs(5), "b removed", || {
        (a.peers().ok()?.len() == 1).then_some(())
    })
    .unwrap();
    b.signal(Signal::SIGKILL).unwrap();
}

#[test]
fn missing_config_is_waited_for() {
    let cluster = Cluster::new(1).unwrap();
    let mut a = cluster.start_agent(0, &[]).unwrap();
    wait_for(Duration::from_secs(10), "waiting message", || {
        a.log().contains("no network config at").then_some(())
    })
    .unwrap();
    assert!(a.try_wait().unwrap().is_none());
    cluster.set_config(ALLOC).unwrap();
    a.wait_ready(READY).unwrap();
    assert_eq!(a.log().matches("no network config at").count(), 1);
}

#[test]
fn invalid_configs_are_reported_with_one_line_naming_field_and_value_until_fixed() {
    let cluster = Cluster::new(1).unwrap();
    let cases = [
        (r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#, "SubnetLen"),
        (r#"{"Network":"10.244.0.0/30"}"#, "Network"),
        (
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.9.0.0"}"#,
            "SubnetMin",
        ),
        (r#"{"Network":"ten"}"#, "\"ten\""),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"carrier-pigeon"}}"#,
            "carrier-pigeon",
        ),
        (
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":70000}}"#,
            "Port",
        ),
        ("[not json", "JSON"),
    ];
    cluster.set_config(cases[0].0).unwrap();
    let mut a = cluster.start_agent(0, &[]).unwrap();
    let errors = |a: &Agent| -> Vec<String> {
        a.log()
            .lines()
            .filter(|l| l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    };
    for (n, (config, needle)) in cases.iter().enumerate() {
        if n > 0 {
            cluster.set_config(config).unwrap();
        }
        let line = wait_for(
            Duration::from_secs(10),
            "an ERROR line for the new value",
            || errors(&a).get(n).cloned(),
        )
        .unwrap_or_else(|e| panic!("{config}: {e}\n{}", a.log()));
        assert!(line.contains(needle), "{config}: {line}");
        assert!(line.contains("waiting for the config to change"), "{line}");
        assert!(a.try_wait().unwrap().is_none(), "exited on {config}");
        assert!(matches!(a.http_get("/readyz"), Ok((503, _))));
    }
    cluster.set_config(ALLOC).unwrap();
    a.wait_ready(READY).unwrap();
    // Exactly one line per bad value.
    assert_eq!(errors(&a).len(), cases.len(), "{}", a.log());
    assert!(!a.log().contains("panicked"));
}

#[test]
fn own_key_deleted_or_taken_over_is_never_kept() {
    let cluster = Cluster::new(2).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agents = start_all(&cluster, 0..2, &[]);
    for a in agents.iter_mut() {
        a.wait_ready(READY).unwrap();
    }
    // Deleted by hand: exit with a clear error and give the etcd lease back.
    let key0 = format!("{SUBNETS}{}", agents[0].subnet().unwrap().replace('/', "-"));
    cluster.etcd.del(&key0).unwrap();
    let st = agents[0].wait_exit(Duration::from_secs(5)).unwrap();
    assert!(!st.success());
    assert!(
        agents[0].log().contains("was deleted from etcd"),
        "{}",
        agents[0].log()
    );
    assert_eq!(cluster.etcd.lease_ids().unwrap().len(), 1);
    // Taken over by another node: exit rather than keep using it.
    let key1 = format!("{SUBNETS}{}", agents[1].subnet().unwrap().replace('/', "-"));
    cluster
        .etcd
        .put(&key1, r#"{"PublicIP":"192.0.2.77","PublicIPv6":null}"#)
        .unwrap();
    let st = agents[1].wait_exit(Duration::from_secs(5)).unwrap();
    assert!(!st.success());
    assert!(
        agents[1].log().contains("192.0.2.77"),
        "{}",
        agents[1].log()
    );
}

#[test]
fn readiness_is_announced_to_systemd() {
    use std::os::unix::net::UnixDatagram;
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let sock_path = cluster.hosts[0].dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut a = flannel_tests::Agent::start_with_env(
        &cluster.hosts[0],
        &cluster.etcd.endpoint(),
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    )
    .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 15 s");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // Ready was announced only once subnet.env exists.
    assert!(a.subnet().is_some());
    a.wait_ready(READY).unwrap();
    let (code, body) = a.http_get("/healthz").unwrap();
    assert_eq!((code, body.trim()), (200, "flanneld is running"));
}
