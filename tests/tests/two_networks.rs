//! Two flannel networks on the same hosts (upstream's functional test): one agent per network
//! and host, with their own --etcd-prefix, --subnet-file, pin dir and health port, one vxlan
//! and one host-gw. Each network's pods talk over their own data path and not the other's.

use std::time::Duration;

use flannel_tests::{tcp_transfer, wait_for, Agent, Cluster, Container, SubnetEnv};

const NET_A: &str = r#"{"Network":"10.244.0.0/17","Backend":{"Type":"vxlan"}}"#;
const NET_B: &str = r#"{"Network":"10.244.128.0/17","Backend":{"Type":"host-gw"}}"#;
const PREFIX_B: &str = "/flannel-b/network";
const BYTES: usize = 256 << 10;

/// Network B's agent on `host`: the harness flags with B's prefix, subnet file, health port
/// and pin dir.
fn start_b(cluster: &Cluster, i: usize) -> Agent {
    let host = &cluster.hosts[i];
    let dir = host.dir.join("b");
    std::fs::create_dir_all(&dir).unwrap();
    let mut flags: Vec<String> = Agent::harness_flags(host, &cluster.etcd.endpoint())
        .into_iter()
        .filter(|f| {
            !f.starts_with("--subnet-file=")
                && !f.starts_with("--healthz-port=")
                && !f.starts_with("--bpf-pin-dir=")
        })
        .collect();
    flags.extend([
        format!("--etcd-prefix={PREFIX_B}"),
        format!("--subnet-file={}", dir.join("subnet.env").display()),
        "--healthz-port=8472".to_owned(),
        format!("--bpf-pin-dir={}-b", host.pin_dir()),
    ]);
    Agent::spawn(host, &flags, &[]).unwrap()
}

fn tx_bytes(cluster: &Cluster, host: usize, dev: &str) -> u64 {
    let out = cluster.hosts[host]
        .ns
        .ip(&["-j", "-s", "link", "show", dev])
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["stats64"]["tx"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no tx bytes in {out}"))
}

#[test]
fn two_networks_on_the_same_hosts_each_carry_their_own_traffic() {
    let cluster = Cluster::new(2).unwrap();
    cluster.set_config(NET_A).unwrap();
    cluster
        .etcd
        .put(&format!("{PREFIX_B}/config"), NET_B)
        .unwrap();
    let mut agents_a: Vec<Agent> = (0..2)
        .map(|i| cluster.start_agent(i, &[]).unwrap())
        .collect();
    let mut agents_b: Vec<Agent> = (0..2).map(|i| start_b(&cluster, i)).collect();
    for a in agents_a.iter_mut().chain(agents_b.iter_mut()) {
        a.wait_ready(Duration::from_secs(30)).unwrap();
    }
    for a in agents_a.iter().chain(agents_b.iter()) {
        wait_for(Duration::from_secs(10), "one peer per network", || {
            (a.peers().ok()?.len() == 1).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    }
    let env = |a: &Agent| SubnetEnv::read(&a.subnet_file).unwrap();
    let (a_env, b_env): (Vec<SubnetEnv>, Vec<SubnetEnv>) = (
        agents_a.iter().map(env).collect(),
        agents_b.iter().map(env).collect(),
    );
    for (a, b) in a_env.iter().zip(&b_env) {
        assert_eq!(a.network, "10.244.0.0/17");
        assert_eq!(b.network, "10.244.128.0/17");
    }
    // Each network's leases under its own prefix only.
    let b_keys = cluster
        .etcd
        .ctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX_B}/subnets/"),
        ])
        .unwrap();
    assert_eq!(
        b_keys.lines().filter(|l| !l.is_empty()).count(),
        2,
        "{b_keys}"
    );

    let pods_a: Vec<Container> = (0..2)
        .map(|i| Container::attach(&cluster.hosts[i], &a_env[i]).unwrap())
        .collect();
    let pods_b: Vec<Container> = (0..2)
        .map(|i| {
            Container::attach_to_network(&cluster.hosts[i], &b_env[i], "flannel-b", "cni1").unwrap()
        })
        .collect();

    // A's peer over vxlan, B's peer via host-gw route on eth0.
    let h0 = &cluster.hosts[0];
    let via_a = h0
        .ns
        .ip(&["-4", "route", "get", &pods_a[1].ip.to_string()])
        .unwrap();
    assert!(via_a.contains("dev flannel.1"), "{via_a}");
    let via_b = h0
        .ns
        .ip(&["-4", "route", "get", &pods_b[1].ip.to_string()])
        .unwrap();
    assert!(via_b.contains("via 192.0.2.11 dev eth0"), "{via_b}");

    for pods in [&pods_a, &pods_b] {
        for (src, dst) in [(&pods[0], &pods[1]), (&pods[1], &pods[0])] {
            wait_for(Duration::from_secs(10), "pod ping", || {
                src.ping(dst.ip, 1, 1).ok()?.then_some(())
            })
            .unwrap_or_else(|e| panic!("{e}: {} -> {}", src.ip, dst.ip));
        }
    }
    // B's traffic does not touch A's vxlan device; A's does.
    let before = tx_bytes(&cluster, 0, "flannel.1");
    assert_eq!(tcp_transfer(&pods_b[0], &pods_b[1], BYTES).unwrap(), BYTES);
    let during_b = tx_bytes(&cluster, 0, "flannel.1") - before;
    assert!(
        during_b < 10,
        "{during_b} packets of network B went out of flannel.1"
    );
    assert_eq!(tcp_transfer(&pods_a[0], &pods_a[1], BYTES).unwrap(), BYTES);
    let during_a = tx_bytes(&cluster, 0, "flannel.1") - before - during_b;
    assert!(
        during_a > 100,
        "network A's stream went around flannel.1 ({during_a} packets)"
    );

    // Stopping network B's agents leaves network A running.
    for a in agents_b.iter_mut() {
        a.stop().unwrap();
    }
    assert!(pods_a[0].ping(pods_a[1].ip, 3, 2).unwrap());
    for a in agents_a.iter_mut() {
        assert!(a.try_wait().unwrap().is_none());
    }
    for h in &cluster.hosts {
        assert!(!std::path::Path::new(&format!("{}-b", h.pin_dir())).exists());
    }
}
