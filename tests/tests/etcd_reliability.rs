//! flanneld against real etcd deployments as operators run them: etcd's default keepalive
//! policy, expired and revoked leases, a 3-member cluster with a member cut off, username and
//! password auth across etcd restarts, large lease values, impossible leases, a shared pin
//! dir, and a health listener under idle and partial connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use flannel_tests::agent::HEALTH_PORT;
use flannel_tests::etcd_cluster::{self, EtcdCluster, FLANNEL_PASSWORD, FLANNEL_USER};
use flannel_tests::{wait_for, Agent, Cluster};

const ALLOC: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}"#;
const PREFIX: &str = "/coreos.com/network";
const SUBNETS: &str = "/coreos.com/network/subnets/";
const READY: Duration = Duration::from_secs(30);

/// The value of the sample line for exactly `series` in a /metrics body.
fn metric(agent: &Agent, series: &str) -> Option<f64> {
    let (status, body) = agent.http_get("/metrics").ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn lease_json(ip: &str) -> String {
    format!(r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"alloc"}}"#)
}

fn has_peer(agent: &Agent, subnet: &str) -> bool {
    agent
        .peers()
        .map(|p| p.iter().any(|(s, _)| s == subnet))
        .unwrap_or(false)
}

/// The etcd key of the agent's own subnet (from its subnet.env).
fn own_key(agent: &Agent) -> String {
    let subnet = agent.subnet().expect("subnet.env");
    format!("{SUBNETS}{}", subnet.replace('/', "-"))
}

#[test]
fn idle_watch_is_not_torn_down_by_etcd_keepalive_policy() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    // etcd (default --grpc-keepalive-min-time 5s) sends GOAWAY to clients that ping faster.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        let reconnects = metric(&agent, "flannel_watch_reconnects_total")
            .unwrap_or_else(|| panic!("no reconnect counter:\n{}", agent.log()));
        assert_eq!(
            reconnects,
            0.0,
            "watch re-established after {:?} idle:\n{}",
            start.elapsed(),
            agent.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(
        metric(&agent, "flannel_watch_state{state=\"up\"}"),
        Some(1.0)
    );
    assert!(agent.try_wait().unwrap().is_none(), "agent exited");
}

#[test]
fn revoked_lease_is_put_back_while_the_subnet_is_free() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    let key = own_key(&agent);
    let before = cluster
        .leases()
        .unwrap()
        .into_iter()
        .find(|kv| kv.key == key)
        .expect("own key in etcd");
    cluster
        .etcd
        .ctl(&["lease", "revoke", &format!("{:x}", before.lease)])
        .unwrap();
    let after = wait_for(Duration::from_secs(15), "our key re-created", || {
        cluster
            .leases()
            .ok()?
            .into_iter()
            .find(|kv| kv.key == key && kv.lease != before.lease && kv.lease != 0)
    });
    let after = after.unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert_eq!(after.value, before.value);
    assert!(
        agent.try_wait().unwrap().is_none(),
        "agent exited:\n{}",
        agent.log()
    );
    assert_eq!(agent.http_get("/readyz").unwrap().0, 200);
}

/// Cut host 0 off etcd until its key `key` expired, run `meanwhile` (while it is still cut
/// off), then connect it again.
fn cut_off_until_key_expires(
    cluster: &Cluster,
    key: &str,
    meanwhile: impl FnOnce(),
) -> flannel_tests::Result<()> {
    let host = &cluster.hosts[0];
    host.ns.ip(&["link", "set", "eth0", "down"])?;
    let gone = wait_for(Duration::from_secs(20), "our key to expire", || {
        (!cluster.leases().ok()?.iter().any(|kv| kv.key == key)).then_some(())
    });
    if gone.is_ok() {
        meanwhile();
    }
    host.ns.ip(&["link", "set", "eth0", "up"])?;
    host.ns
        .ip(&["route", "replace", "default", "via", "192.0.2.1"])?;
    gone
}

#[test]
fn expired_lease_is_put_back_after_a_partition_longer_than_its_ttl() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agent = cluster.start_agent(0, &["--subnet-lease-ttl=4s"]).unwrap();
    agent.wait_ready(READY).unwrap();
    let key = own_key(&agent);
    cut_off_until_key_expires(&cluster, &key, || {}).unwrap();
    wait_for(Duration::from_secs(20), "our key re-created", || {
        cluster
            .leases()
            .ok()?
            .iter()
            .any(|kv| kv.key == key)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(
        agent.try_wait().unwrap().is_none(),
        "agent exited:\n{}",
        agent.log()
    );
}

#[test]
fn expired_lease_taken_by_another_node_exits_naming_the_owner() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agent = cluster.start_agent(0, &["--subnet-lease-ttl=4s"]).unwrap();
    agent.wait_ready(READY).unwrap();
    let key = own_key(&agent);
    cut_off_until_key_expires(&cluster, &key, || {
        cluster.etcd.put(&key, &lease_json("192.0.2.99")).unwrap();
    })
    .unwrap();
    let status = agent
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(!status.success());
    let log = agent.log();
    let last = log.lines().last().unwrap_or("");
    assert!(
        last.contains("192.0.2.99"),
        "exit message does not name the new owner: {last}\n{log}"
    );
    // The other node's lease is untouched.
    assert_eq!(
        cluster.etcd.get(&key).unwrap().as_deref(),
        Some(lease_json("192.0.2.99").as_str())
    );
}

#[test]
fn member_cut_off_from_its_cluster_does_not_keep_a_stale_watch() {
    let cluster = Cluster::new(1).unwrap();
    // Pings every second are fine here, so nothing but the member's lost leader (not etcd's
    // keepalive policy, see the idle watch test) ends a watch on the cut-off member.
    let etcd = EtcdCluster::start_with(
        &cluster.switch,
        &cluster.tag,
        &cluster.dir.0,
        3,
        &["--grpc-keepalive-min-time=1s"],
    )
    .unwrap();
    etcd.put(&format!("{PREFIX}/config"), ALLOC).unwrap();
    let endpoints = etcd.endpoints();
    let mut agent = flannel_tests::Agent::start(&cluster.hosts[0], &endpoints, &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    // The watch sits on one member: cut each off in turn; the agent must keep seeing changes
    // made through the majority.
    for i in 0..3 {
        etcd.isolate(i).unwrap();
        let healthy = (i + 1) % 3;
        let subnet = format!("10.244.{}.0/24", 200 + i);
        let key = format!("{SUBNETS}10.244.{}.0-24", 200 + i);
        // Through a member of the majority (it may take a moment to elect a leader).
        wait_for(
            Duration::from_secs(20),
            "a put through the majority",
            || {
                etcd.put_at(healthy, &key, &lease_json(&format!("192.0.2.{}", 60 + i)))
                    .ok()
            },
        )
        .unwrap();
        let seen = wait_for(
            Duration::from_secs(15),
            "the agent to see a lease put through the majority",
            || has_peer(&agent, &subnet).then_some(()),
        );
        etcd.heal(i).unwrap();
        seen.unwrap_or_else(|e| panic!("member m{i} cut off: {e}\n{}", agent.log()));
        etcd.wait_healthy().unwrap();
    }
    assert!(
        agent.try_wait().unwrap().is_none(),
        "agent exited:\n{}",
        agent.log()
    );
    // The agent's own lease lived through it all.
    let key = own_key(&agent);
    assert!(etcd.ctl(&["get", &key]).unwrap().contains(&key));
    drop(agent);
    drop(etcd);
}

fn auth_agent(cluster: &Cluster, etcd: &EtcdCluster) -> Agent {
    flannel_tests::Agent::start(
        &cluster.hosts[0],
        &etcd.endpoints(),
        &[
            &format!("--etcd-username={FLANNEL_USER}"),
            &format!("--etcd-password={FLANNEL_PASSWORD}"),
        ],
    )
    .unwrap()
}

#[test]
fn username_password_auth_survives_etcd_restarts_and_readyz_shows_lost_auth() {
    let cluster = Cluster::new(1).unwrap();
    let mut etcd = EtcdCluster::start(&cluster.switch, &cluster.tag, &cluster.dir.0, 1).unwrap();
    etcd.put(&format!("{PREFIX}/config"), ALLOC).unwrap();
    etcd.enable_auth(&format!("{PREFIX}/")).unwrap();
    let mut agent = auth_agent(&cluster, &etcd);
    agent.wait_ready(READY).unwrap();

    // A restart forgets every token etcd handed out.
    for round in 0..2 {
        etcd.stop(0).unwrap();
        etcd.resume(0).unwrap();
        etcd.wait_healthy().unwrap();
        let subnet = format!("10.244.{}.0/24", 210 + round);
        etcd.put(
            &format!("{SUBNETS}10.244.{}.0-24", 210 + round),
            &lease_json(&format!("192.0.2.{}", 70 + round)),
        )
        .unwrap();
        wait_for(
            Duration::from_secs(15),
            "a lease put after the restart",
            || has_peer(&agent, &subnet).then_some(()),
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", agent.log()));
        assert_eq!(agent.http_get("/readyz").unwrap().0, 200);
    }

    // Credentials that no longer work: the agent cannot see etcd's changes and says so.
    etcd.set_password(FLANNEL_USER, "changed").unwrap();
    etcd.stop(0).unwrap();
    etcd.resume(0).unwrap();
    etcd.wait_healthy().unwrap();
    let body = wait_for(Duration::from_secs(30), "/readyz to turn 503", || {
        let (status, body) = agent.http_get("/readyz").ok()?;
        (status == 503).then_some(body)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(body.contains("unauthenticated"), "{body}");
    assert_eq!(
        metric(&agent, "flannel_watch_state{state=\"unauthenticated\"}"),
        Some(1.0)
    );
    assert!(metric(&agent, "flannel_watch_down_seconds").unwrap_or(0.0) >= 10.0);

    etcd.set_password(FLANNEL_USER, FLANNEL_PASSWORD).unwrap();
    etcd.put(
        &format!("{SUBNETS}10.244.220.0-24"),
        &lease_json("192.0.2.80"),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "recovery once the password works",
        || {
            (has_peer(&agent, "10.244.220.0/24") && agent.http_get("/readyz").ok()?.0 == 200)
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(agent.try_wait().unwrap().is_none(), "agent exited");
    drop(agent);
    drop(etcd);
}

#[test]
fn five_one_megabyte_leases_do_not_stop_a_starting_agent() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let pad = "x".repeat(1_000_000);
    for i in 0..5 {
        let value = format!(
            r#"{{"PublicIP":"192.0.2.{}","PublicIPv6":null,"BackendType":"alloc","BackendData":{{"pad":"{pad}"}}}}"#,
            50 + i
        );
        etcd_cluster::put_stdin(
            &cluster.switch,
            &cluster.etcd.endpoint(),
            &format!("{SUBNETS}10.244.{}.0-24", 100 + i),
            value.as_bytes(),
        )
        .unwrap();
    }
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    let peers = agent.peers().unwrap();
    assert_eq!(peers.len(), 5, "{peers:?}");
}

#[test]
fn impossible_leases_are_ignored_with_one_warning_each() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    let own_ip = agent.ip.to_string();
    let outside = format!("{SUBNETS}10.99.0.0-24");
    let ours = format!("{SUBNETS}10.244.200.0-24");
    for round in 0..2 {
        // Written twice (a changed value the second time): still one warning per key.
        let extra = if round == 0 { "alloc" } else { "udp" };
        cluster
            .etcd
            .put(
                &outside,
                &format!(r#"{{"PublicIP":"192.0.2.60","BackendType":"{extra}"}}"#),
            )
            .unwrap();
        cluster
            .etcd
            .put(
                &ours,
                &format!(r#"{{"PublicIP":"{own_ip}","BackendType":"{extra}"}}"#),
            )
            .unwrap();
        // A good lease written after them shows the agent has handled them.
        let marker = format!("10.244.{}.0", 201 + round);
        cluster
            .etcd
            .put(
                &format!("{SUBNETS}{marker}-24"),
                &lease_json(&format!("192.0.2.{}", 61 + round)),
            )
            .unwrap();
        wait_for(Duration::from_secs(10), "the good lease", || {
            has_peer(&agent, &format!("{marker}/24")).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    }
    let peers = agent.peers().unwrap();
    assert!(
        !peers
            .iter()
            .any(|(s, _)| s == "10.99.0.0/24" || s == "10.244.200.0/24"),
        "impossible leases installed: {peers:?}"
    );
    let log = agent.log();
    for key in [&outside, &ours] {
        let warnings = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(key.as_str()))
            .count();
        assert_eq!(warnings, 1, "warnings for {key}:\n{log}");
    }
    // A restart re-lists: the lease outside the network is still left out. (A lease with our
    // IP would be taken as ours on start, as upstream does: remove it first.)
    cluster.etcd.del(&ours).unwrap();
    agent.stop().unwrap();
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    assert_eq!(agent.peers().unwrap().len(), 2, "{:?}", agent.peers());
    assert!(agent.log().contains("ignoring lease"));
}

#[test]
fn health_listener_closes_idle_and_partial_connections_and_caps_them() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(ALLOC).unwrap();
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    agent.wait_ready(READY).unwrap();
    let pid = agent.pid().unwrap();
    let addr = SocketAddr::from((agent.ip, HEALTH_PORT));
    let fds = move || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let fds_before = fds();
    let host_ns = &cluster.hosts[0].ns;
    // An idle connection and one that sends half a request: the server must close both.
    let closed = host_ns
        .run_in(move || -> Vec<String> {
            let mut results = Vec::new();
            for partial in [&b""[..], b"GET /healthz HTTP/1.1\r\nHost: x\r\n"] {
                let r = (|| -> std::io::Result<String> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
                    s.write_all(partial)?;
                    s.set_read_timeout(Some(Duration::from_secs(20)))?;
                    let start = Instant::now();
                    let mut buf = Vec::new();
                    match s.read_to_end(&mut buf) {
                        Ok(_) => Ok(format!("closed after {:?}", start.elapsed())),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            Ok(format!("reset after {:?}", start.elapsed()))
                        }
                        Err(e) => Err(e),
                    }
                })();
                results.push(match r {
                    Ok(s) => s,
                    Err(e) => format!("still open: {e}"),
                });
            }
            results
        })
        .unwrap();
    for r in &closed {
        assert!(!r.starts_with("still open"), "{closed:?}");
    }
    // A flood of idle connections: the agent holds a bounded number, and answers again soon.
    let flood = host_ns
        .spawn_in(move || -> usize {
            let conns: Vec<TcpStream> = (0..300)
                .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
                .collect();
            std::thread::sleep(Duration::from_secs(3));
            let n = conns.len();
            drop(conns);
            n
        })
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let during = fds();
    let opened = flood.join().unwrap().unwrap();
    assert!(opened > 100, "could only open {opened} connections");
    assert!(
        during < fds_before + 100,
        "agent holds {during} fds with {opened} idle connections open (was {fds_before})"
    );
    wait_for(Duration::from_secs(15), "/healthz after the flood", || {
        (agent.http_get("/healthz").ok()?.0 == 200).then_some(())
    })
    .unwrap();
    assert!(agent.try_wait().unwrap().is_none(), "agent exited");
}

#[test]
fn two_agents_sharing_a_pin_dir_from_different_namespaces_are_refused() {
    let cluster = Cluster::new(2).unwrap();
    cluster
        .set_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#)
        .unwrap();
    let mut first = cluster.start_agent(0, &["--udp-dataplane=ebpf"]).unwrap();
    first.wait_ready(READY).unwrap();
    // Host 1's pin dir is a symlink to host 0's: the same directory under another name.
    let shared = cluster.hosts[0].pin_dir();
    let alias = cluster.hosts[1].pin_dir();
    let _ = std::fs::remove_dir_all(&alias);
    std::os::unix::fs::symlink(&shared, &alias).unwrap();
    struct Unlink(String);
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _unlink = Unlink(alias.clone());

    let mut second = cluster.start_agent(1, &["--udp-dataplane=ebpf"]).unwrap();
    let status = second
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", second.log()));
    assert!(!status.success());
    let log = second.log();
    let last = log.lines().last().unwrap_or("");
    assert!(
        last.contains("in use by another running flanneld"),
        "second agent: {last}\n{log}"
    );
    // The first keeps its data plane.
    assert_eq!(first.http_get("/readyz").unwrap().0, 200);
    assert!(first.try_wait().unwrap().is_none());

    // With the first stopped (its pins stay for a restart), the pins still belong to host 0's
    // namespace: host 1 must not adopt them.
    first.stop().unwrap();
    let mut third = cluster.start_agent(1, &["--udp-dataplane=ebpf"]).unwrap();
    let status = third
        .wait_exit(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", third.log()));
    assert!(!status.success());
    let log = third.log();
    let last = log.lines().last().unwrap_or("");
    assert!(
        last.contains("network namespace"),
        "third agent: {last}\n{log}"
    );
    // Host 0's agent restarts on its own pins.
    let mut again = cluster.start_agent(0, &["--udp-dataplane=ebpf"]).unwrap();
    again.wait_ready(READY).unwrap();
}

#[test]
fn tls_with_client_certificates_keeps_an_idle_watch_and_survives_an_etcd_restart() {
    let cluster = Cluster::new(1).unwrap();
    let mut etcd =
        EtcdCluster::start_tls(&cluster.switch, &cluster.tag, &cluster.dir.0, 1).unwrap();
    let tls = etcd.tls.as_ref().unwrap();
    // The set-up really demands a client certificate: without one etcd refuses.
    let no_cert = cluster
        .switch
        .command("etcdctl")
        .args(["--endpoints", &etcd.endpoints(), "--dial-timeout", "2s"])
        .args(["--command-timeout", "3s"])
        .arg(format!("--cacert={}", tls.ca.display()))
        .args(["get", "/x"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(
        !no_cert.status.success(),
        "etcd accepted a client without a certificate"
    );
    let flags = [
        format!("--etcd-cafile={}", tls.ca.display()),
        format!("--etcd-certfile={}", tls.client_cert.display()),
        format!("--etcd-keyfile={}", tls.client_key.display()),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    etcd.put(&format!("{PREFIX}/config"), ALLOC).unwrap();
    let mut agent = Agent::start(&cluster.hosts[0], &etcd.endpoints(), &flags).unwrap();
    agent.wait_ready(READY).unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        assert_eq!(
            metric(&agent, "flannel_watch_reconnects_total"),
            Some(0.0),
            "watch re-established after {:?} idle:\n{}",
            start.elapsed(),
            agent.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    etcd.stop(0).unwrap();
    etcd.resume(0).unwrap();
    etcd.wait_healthy().unwrap();
    etcd.put(
        &format!("{SUBNETS}10.244.230.0-24"),
        &lease_json("192.0.2.90"),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(15),
        "a lease put after the restart",
        || has_peer(&agent, "10.244.230.0/24").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(agent.try_wait().unwrap().is_none(), "agent exited");
}
