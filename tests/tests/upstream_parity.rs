//! What a unit or script written for upstream flanneld (v0.20.2 up to today's) meets here: its
//! flags and FLANNELD_* variables start ours unchanged, and the flags added upstream since
//! (--ip-blackhole-route, --ip-masq-fully-random-disable) do what they do there; the
//! public IPv6 address is chosen as upstream v0.28 does, and a missing `br_netfilter` is
//! reported (upstream v0.26 refuses to start; we warn once and say it in /metrics).

use std::time::Duration;

use flannel_tests::dual_stack::ipv6_underlay;
use flannel_tests::{wait_for, Agent, Cluster, Overlay};

const HOSTGW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const BYTES: usize = 256 << 10;

/// Log messages (the text after env_logger's "[time LEVEL target] ") at `level`.
fn messages(log: &str, level: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let (head, msg) = l.split_once("] ")?;
            head.contains(&format!(" {level} ")).then(|| msg.to_owned())
        })
        .collect()
}

fn wait_running(agent: &Agent) {
    wait_for(Duration::from_secs(30), "flanneld running", || {
        agent.own_log().contains("running: subnet").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n--- log ---\n{}", agent.log()));
}

#[test]
fn a_repeated_flag_takes_the_last_value_and_klog_flags_are_accepted() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(HOSTGW).unwrap();
    let host = &cluster.hosts[0];
    // As a unit file that overrides a packaged default would: first a wrong endpoint, then ours.
    let mut flags = vec!["-etcd-endpoints=http://198.51.100.250:1".to_owned()];
    flags.extend(
        Agent::harness_flags(host, &cluster.etcd.endpoint())
            .into_iter()
            .map(|f| f.replacen("--", "-", 1)),
    );
    flags.extend(
        [
            "-vmodule=main=2,iface=3",
            "-log_backtrace_at=main.go:120",
            "-v=0",
        ]
        .map(String::from),
    );
    let mut agent = Agent::spawn(host, &flags, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(30)).unwrap();
    let log = agent.own_log();
    assert!(!log.contains("198.51.100.250"), "{log}");
    assert!(messages(&log, "ERROR").is_empty(), "{log}");
}

#[test]
fn a_bad_flanneld_variable_is_logged_by_name_and_the_default_used() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(HOSTGW).unwrap();
    let host = &cluster.hosts[0];
    let flags: Vec<String> = Agent::harness_flags(host, &cluster.etcd.endpoint())
        .into_iter()
        .filter(|f| !f.starts_with("--healthz-port"))
        .collect();
    let mut agent = Agent::spawn(host, &flags, &[("FLANNELD_HEALTHZ_PORT", "abc")]).unwrap();
    wait_running(&agent);
    assert!(agent.try_wait().unwrap().is_none(), "{}", agent.log());
    let errors = messages(&agent.own_log(), "ERROR");
    assert_eq!(
        errors,
        vec![
            "invalid value \"abc\" for FLANNELD_HEALTHZ_PORT: invalid digit found in string; using the default"
                .to_owned()
        ],
        "{}",
        agent.log()
    );
    // The default: no health listener.
    assert!(agent.http_get("/healthz").is_err());
    assert!(agent.subnet().is_some());
}

#[test]
fn ip_blackhole_route_drops_our_unused_addresses_and_pods_still_talk() {
    let o = Overlay::builder(HOSTGW, 2)
        .flags(&[
            "--ip-blackhole-route",
            "--ip-masq",
            "--ip-masq-fully-random-disable",
        ])
        .ip_masq(true)
        .start()
        .unwrap();
    for (i, host) in o.cluster.hosts.iter().enumerate() {
        let subnet = o.subnet_env(i).unwrap().subnet;
        let net: ipnetwork::Ipv4Network = subnet.parse().unwrap();
        let want = format!("blackhole {}/{} metric 4096", net.network(), net.prefix());
        let routes = wait_for(Duration::from_secs(10), "blackhole route", || {
            let r = host
                .ns
                .ip(&["-4", "route", "show", "type", "blackhole"])
                .ok()?;
            r.contains(&want).then_some(r)
        })
        .unwrap_or_else(|e| panic!("{e}: {}", o.agent_log(i)));
        assert_eq!(routes.trim(), want);
        // Pods' addresses still go to cni0; an address no pod has goes nowhere.
        let pod = o.container(i).ip.to_string();
        let via = host.ns.ip(&["-4", "route", "get", &pod]).unwrap();
        assert!(via.contains("dev cni0"), "{via}");
        // --ip-masq-fully-random-disable: plain MASQUERADE.
        let nat = host
            .ns
            .exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"])
            .unwrap();
        assert!(nat.contains("-j MASQUERADE"), "{nat}");
        assert!(!nat.contains("random-fully"), "{nat}");
    }
    o.check_all_pairs(BYTES).unwrap();
    // Without the bridge (as with Canal), traffic for our subnet arriving from the underlay
    // is dropped here instead of going back out of the default route.
    let host = &o.cluster.hosts[0];
    host.ns.ip(&["link", "del", "cni0"]).unwrap();
    let net: ipnetwork::Ipv4Network = o.subnet_env(0).unwrap().subnet.parse().unwrap();
    let unused = std::net::Ipv4Addr::from(u32::from(net.network()) + 77).to_string();
    let out = host
        .ns
        .command("ip")
        .args(["-4", "route", "get", &unused])
        .output()
        .unwrap();
    // The kernel's answer for a blackhole route (no route at all would be "unreachable").
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "RTNETLINK answers: Invalid argument");
}

const V6_ONLY_HOSTGW: &str = r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"host-gw"}}"#;

#[test]
fn the_public_ipv6_address_is_the_permanent_one_not_a_deprecated_or_dynamic_one() {
    let o = Overlay::builder(V6_ONLY_HOSTGW, 1)
        .containers_per_host(0)
        // 2001:db8::10, configured by hand (permanent).
        .before_agents(ipv6_underlay)
        .before_agents(|c| {
            let ns = &c.hosts[0].ns;
            // A dynamic address (finite lifetimes, as SLAAC or DHCPv6 give), then a
            // deprecated one (preferred lifetime over).
            for (addr, lifetimes) in [
                (
                    "2001:db8::aaaa/64",
                    ["valid_lft", "3600", "preferred_lft", "3600"],
                ),
                (
                    "2001:db8::dead/64",
                    ["valid_lft", "3600", "preferred_lft", "0"],
                ),
            ] {
                let mut args = vec!["-6", "addr", "add", addr, "dev", "eth0", "nodad"];
                args.extend(lifetimes);
                ns.ip(&args)?;
            }
            Ok(())
        })
        .start()
        .unwrap();
    // The kernel lists the newest address first: taking the first global one would be wrong.
    let listed = o.cluster.hosts[0]
        .ns
        .ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])
        .unwrap();
    let first = listed.lines().next().unwrap_or_default();
    assert!(!first.contains("2001:db8::10/"), "{listed}");

    let leases = o.cluster.leases().unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert!(
        leases[0].value.contains(r#""PublicIPv6":"2001:db8::10""#),
        "{}\n{}",
        leases[0].value,
        o.agent_log(0)
    );
    let log = o.agents[0].own_log();
    assert!(
        log.contains("IPv6 address 2001:db8::10, public IPv6 address 2001:db8::10"),
        "{log}"
    );
}

const BR_NF_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Sets `net.bridge.bridge-nf-call-iptables` in host 0's namespace only (the bridge netfilter
/// sysctls are per namespace since Linux 5.3), and checks the test's own namespace kept its
/// value.
fn set_bridge_nf_call_iptables(c: &Cluster, value: &str) -> flannel_tests::Result<()> {
    let ours = std::fs::read_to_string(BR_NF_IPTABLES)?;
    c.hosts[0]
        .ns
        .sysctl("net.bridge.bridge-nf-call-iptables", value)?;
    let after = std::fs::read_to_string(BR_NF_IPTABLES)?;
    anyhow::ensure!(
        ours == after,
        "bridge-nf-call-iptables is not per namespace on this kernel: {ours:?} became {after:?}"
    );
    Ok(())
}

/// One host on host-gw in iptables mode with `--ip-masq`, the sysctl set to `value` first.
fn host_with_bridge_nf_call_iptables(value: &'static str) -> Overlay {
    Overlay::builder(HOSTGW, 1)
        .containers_per_host(0)
        .flags(&["--iptables-resync=1"])
        .before_agents(move |c| set_bridge_nf_call_iptables(c, value))
        .start()
        .unwrap()
}

/// Flushes FLANNEL-POSTRTG and waits until the resync put it back: the agent ran on past its
/// start (and its start-up checks).
fn wait_for_a_resync(o: &Overlay) {
    let ns = &o.cluster.hosts[0].ns;
    ns.exec("iptables", &["-t", "nat", "-F", "FLANNEL-POSTRTG"])
        .unwrap();
    wait_for(Duration::from_secs(10), "FLANNEL-POSTRTG restored", || {
        let rules = ns
            .exec("iptables", &["-t", "nat", "-S", "FLANNEL-POSTRTG"])
            .ok()?;
        rules.contains("-A FLANNEL-POSTRTG").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", o.agent_log(0)));
}

/// The value of the sample line for exactly `series` in the agent's /metrics.
fn metric(o: &Overlay, series: &str) -> Option<String> {
    let (status, body) = o.agents[0].http_get("/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[test]
fn bridge_nf_call_iptables_off_is_one_warning_with_the_fix_and_a_zero_in_metrics() {
    let o = host_with_bridge_nf_call_iptables("0");
    wait_for_a_resync(&o);
    let log = o.agents[0].own_log();
    let warnings: Vec<String> = messages(&log, "WARN")
        .into_iter()
        .filter(|m| m.contains("br_netfilter"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    let w = &warnings[0];
    for what in [
        "net.bridge.bridge-nf-call-iptables is 0",
        "pods on the same bridge (cni0) bypasses iptables",
        "NetworkPolicy",
        "masquerading and kube-proxy service rules",
        "modprobe br_netfilter && sysctl net.bridge.bridge-nf-call-iptables=1",
    ] {
        assert!(w.contains(what), "no {what:?} in: {w}");
    }
    assert_eq!(
        metric(&o, "flannel_br_netfilter{family=\"ipv4\"}").as_deref(),
        Some("0")
    );
    // A warning, not a refusal: the agent serves its subnet.
    assert!(o.agents[0].subnet().is_some());
}

#[test]
fn bridge_nf_call_iptables_on_is_no_warning_and_a_one_in_metrics() {
    let o = host_with_bridge_nf_call_iptables("1");
    wait_for_a_resync(&o);
    let log = o.agents[0].own_log();
    assert!(!log.contains("br_netfilter"), "{log}");
    assert_eq!(
        metric(&o, "flannel_br_netfilter{family=\"ipv4\"}").as_deref(),
        Some("1")
    );
}
