//! What a new operator meets first: a config that is missing or wrong, an etcd that cannot be
//! reached or refuses us (TLS, auth), an interface that cannot work, two agents for one
//! network, and the operator commands run at the wrong time or place. Each gets one line that
//! names the endpoint, flag or file, and the agent heals as soon as the mistake is fixed.

use std::process::Output;
use std::time::Duration;

use flannel_tests::etcd::{Etcd, ServerTls};
use flannel_tests::pki::Ca;
use flannel_tests::{wait_for, Agent, Cluster, Host};

const CONFIG: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const CONFIG_KEY: &str = "/coreos.com/network/config";

/// Log messages (the text after env_logger's "[time LEVEL target] ") at `level`.
fn messages(agent: &Agent, level: &str) -> Vec<String> {
    agent
        .own_log()
        .lines()
        .filter_map(|l| {
            let (head, msg) = l.split_once("] ")?;
            head.contains(&format!(" {level} ")).then(|| msg.to_owned())
        })
        .collect()
}

/// Waits for a message at `level` starting with `prefix`; returns it whole.
fn wait_message(agent: &Agent, level: &str, prefix: &str) -> String {
    wait_for(Duration::from_secs(20), prefix, || {
        messages(agent, level)
            .into_iter()
            .find(|m| m.starts_with(prefix))
    })
    .unwrap_or_else(|e| panic!("{e}\n--- log ---\n{}", agent.log()))
}

/// Runs `flanneld <args>` inside `host`'s namespace.
fn flanneld(host: &Host, args: &[&str]) -> Output {
    host.flanneld(args).expect("running flanneld")
}

fn readyz(agent: &Agent) -> u16 {
    agent.http_get("/readyz").map(|(s, _)| s).unwrap_or(0)
}

#[test]
fn invalid_config_is_reported_once_per_change_and_a_fix_heals_without_restart() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config("{").unwrap();
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    let first = wait_message(&agent, "ERROR", "invalid network config");
    assert_eq!(
        first,
        "invalid network config at /coreos.com/network/config: config is not a JSON object: EOF while parsing an object at line 1 column 1; fix it in etcd (etcdctl put /coreos.com/network/config ...): waiting for the config to change"
    );
    assert_eq!(readyz(&agent), 503);

    cluster
        .set_config(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#)
        .unwrap();
    let second = wait_message(
        &agent,
        "ERROR",
        "invalid network config at /coreos.com/network/config: config field SubnetLen",
    );
    assert!(second.contains("(value 31)"), "{second}");
    assert_eq!(readyz(&agent), 503);

    cluster.set_config(CONFIG).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    assert!(agent.try_wait().unwrap().is_none(), "the agent restarted");
    // One ERROR per bad value, not one per retry.
    let errors: Vec<String> = messages(&agent, "ERROR");
    assert_eq!(errors, vec![first, second], "{}", agent.log());
    assert!(messages(&agent, "INFO")
        .contains(&"network config at /coreos.com/network/config is usable now".to_owned()));
}

#[test]
fn missing_config_says_what_to_create_and_is_picked_up() {
    let cluster = Cluster::new(1).unwrap();
    let mut agent = cluster.start_agent(0, &[]).unwrap();
    let line = wait_message(&agent, "INFO", "no network config");
    assert_eq!(
        line,
        r#"no network config at /coreos.com/network/config yet: create it with the etcd v3 API, e.g. `ETCDCTL_API=3 etcdctl put /coreos.com/network/config '{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'` (or start flanneld with the --etcd-prefix that holds it; now /coreos.com/network)"#
    );
    assert_eq!(readyz(&agent), 503);
    cluster.set_config(CONFIG).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
}

#[test]
fn unreachable_etcd_is_one_line_naming_the_endpoint() {
    let cluster = Cluster::new(1).unwrap();
    let mut agent = Agent::start(&cluster.hosts[0], "http://192.0.2.1:2999", &[]).unwrap();
    let line = wait_message(&agent, "WARN", "reading the network config");
    assert_eq!(
        line,
        "reading the network config: etcd at http://192.0.2.1:2999 refused the connection: is etcd running and listening there? (--etcd-endpoints); retrying"
    );
    // It keeps retrying (every 2 s) without repeating the same line.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(messages(&agent, "WARN"), vec![line]);
    assert!(agent.try_wait().unwrap().is_none());
}

/// An etcd at 192.0.2.2 (beside the cluster's plain one) that speaks TLS only and wants
/// client certificates signed by `ca`.
struct TlsSetup {
    etcd: Etcd,
    ca: Ca,
    other_ca: Ca,
    client: flannel_tests::pki::CertPair,
}

fn tls_setup(cluster: &Cluster) -> TlsSetup {
    let dir = cluster.dir.0.join("pki");
    let ca = Ca::new(&dir, "ca").unwrap();
    let other_ca = Ca::new(&dir, "other-ca").unwrap();
    let server = ca.server("etcd-server", &["192.0.2.2"]).unwrap();
    let client = ca.client("flannel-client", "flannel").unwrap();
    cluster
        .switch
        .ip(&["addr", "add", "192.0.2.2/24", "dev", "br0"])
        .unwrap();
    let etcd = Etcd::start_tls(
        &cluster.switch,
        "192.0.2.2",
        cluster.dir.0.join("etcd-tls"),
        ServerTls {
            ca: ca.cert_path(),
            server,
            client_cert_auth: true,
            ctl_client: client.clone(),
        },
    )
    .unwrap();
    etcd.put(CONFIG_KEY, CONFIG).unwrap();
    TlsSetup {
        etcd,
        ca,
        other_ca,
        client,
    }
}

/// Starts an agent against the TLS etcd with `flags`, returns its first WARN/ERROR message.
fn first_complaint(host: &Host, endpoint: &str, flags: &[String]) -> (Agent, String) {
    let mut agent = Agent::start(
        host,
        endpoint,
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .unwrap();
    let msg = wait_for(Duration::from_secs(20), "a WARN or ERROR line", || {
        messages(&agent, "WARN")
            .into_iter()
            .chain(messages(&agent, "ERROR"))
            .next()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let _ = agent.stop();
    (agent, msg)
}

#[test]
fn tls_mistakes_each_get_one_line_with_the_fix() {
    let cluster = Cluster::new(1).unwrap();
    let tls = tls_setup(&cluster);
    let host = &cluster.hosts[0];
    let https = tls.etcd.endpoint();
    let ca = format!("--etcd-cafile={}", tls.ca.cert_path());
    let cert = format!("--etcd-certfile={}", tls.client.cert_str());
    let key = format!("--etcd-keyfile={}", tls.client.key_str());

    // The CA given did not sign etcd's certificate.
    let (_, line) = first_complaint(
        host,
        &https,
        &[
            format!("--etcd-cafile={}", tls.other_ca.cert_path()),
            cert.clone(),
            key.clone(),
        ],
    );
    assert_eq!(
        line,
        format!(
            "reading the network config: etcd at https://192.0.2.2:2379 presented a certificate not signed by --etcd-cafile {}: give the CA that signed etcd's certificate; retrying",
            tls.other_ca.cert_path()
        )
    );

    // A key that is not the certificate's: a file mistake, so the agent exits at once.
    let stranger = tls.ca.client("stranger", "stranger").unwrap();
    let stranger_key = format!("--etcd-keyfile={}", stranger.key_str());
    let mut agent = Agent::start(host, &https, &[&ca, &cert, &stranger_key]).unwrap();
    assert_eq!(
        agent.wait_exit(Duration::from_secs(10)).unwrap().code(),
        Some(1)
    );
    assert_eq!(
        messages(&agent, "ERROR"),
        vec![format!(
            "--etcd-keyfile {} is not the private key of --etcd-certfile {}",
            stranger.key_str(),
            tls.client.cert_str()
        )],
    );

    // No client certificate, though etcd requires one.
    let (_, line) = first_complaint(host, &https, std::slice::from_ref(&ca));
    assert_eq!(
        line,
        "reading the network config: etcd at https://192.0.2.2:2379 requires a client certificate: set --etcd-certfile and --etcd-keyfile; retrying"
    );

    // A client certificate from a CA etcd does not trust.
    let foreign = tls.other_ca.client("foreign-client", "flannel").unwrap();
    let (_, line) = first_complaint(
        host,
        &https,
        &[
            ca.clone(),
            format!("--etcd-certfile={}", foreign.cert_str()),
            format!("--etcd-keyfile={}", foreign.key_str()),
        ],
    );
    assert_eq!(
        line,
        format!("reading the network config: etcd at https://192.0.2.2:2379 rejected our client certificate (--etcd-certfile {}): it must be signed by a CA in etcd's --trusted-ca-file; retrying", foreign.cert_str())
    );

    // A certificate without its key: a flag mistake, so the agent exits at once.
    let mut agent = Agent::start(host, &https, &[&ca, &cert]).unwrap();
    let st = agent.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        messages(&agent, "ERROR"),
        vec!["--etcd-certfile is set but --etcd-keyfile is not: a client certificate needs both (or neither)".to_owned()]
    );

    // Plain http:// at a TLS port.
    let (_, line) = first_complaint(host, "http://192.0.2.2:2379", &[]);
    assert!(
        line.starts_with("reading the network config: etcd at http://192.0.2.2:2379 does not speak plain HTTP/2 (")
            && line.ends_with("); if it serves TLS, use https:// endpoints and --etcd-cafile; retrying"),
        "{line}"
    );

    // With everything right the same agent runs.
    let mut agent = Agent::start(host, &https, &[&ca, &cert, &key]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
}

#[test]
fn auth_mistakes_each_get_one_line_and_the_right_password_works() {
    let mut cluster = Cluster::new(1).unwrap();
    cluster.set_config(CONFIG).unwrap();
    cluster
        .etcd
        .enable_auth("rootpw", "flannel", "s3cret", "/coreos.com/network")
        .unwrap();
    let host = &cluster.hosts[0];
    let endpoint = cluster.etcd.endpoint();

    let (_, line) = first_complaint(
        host,
        &endpoint,
        &[
            "--etcd-username=flannel".into(),
            "--etcd-password=wrong".into(),
        ],
    );
    assert_eq!(
        line,
        "connecting to etcd: etcd at http://192.0.2.1:2379 rejected user \"flannel\": wrong user name or password (--etcd-username, --etcd-password); retrying"
    );

    let (_, line) = first_complaint(host, &endpoint, &[]);
    assert_eq!(
        line,
        "reading the network config: etcd at http://192.0.2.1:2379 requires authentication: set --etcd-username and --etcd-password; retrying"
    );

    let mut agent = Agent::start(
        host,
        &endpoint,
        &["--etcd-username=flannel", "--etcd-password=s3cret"],
    )
    .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let _ = &mut cluster;
}

/// The harness's flags for host `i`, with `--iface=<iface>` instead of its eth0.
fn flags_with_iface(cluster: &Cluster, i: usize, iface: &str) -> Vec<String> {
    Agent::harness_flags(&cluster.hosts[i], &cluster.etcd.endpoint())
        .into_iter()
        .map(|f| {
            if f == "--iface=eth0" {
                format!("--iface={iface}")
            } else {
                f
            }
        })
        .collect()
}

#[test]
fn loopback_interface_is_refused() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(CONFIG).unwrap();
    let host = &cluster.hosts[0];
    let flags = flags_with_iface(&cluster, 0, "lo");
    let mut agent = Agent::spawn(host, &flags, &[]).unwrap();
    let st = agent.wait_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        messages(&agent, "ERROR"),
        vec!["finding the external interface: --iface lo: lo is a loopback interface, which other hosts cannot reach; name the interface that reaches the other hosts".to_owned()]
    );
    assert!(
        cluster.leases().unwrap().is_empty(),
        "published a lease for lo"
    );
}

/// An interface with an IPv6 address only, named by that address: fine for an IPv6-only
/// network, one line saying what is missing for an IPv4 one (and no lease).
#[test]
fn an_ipv6_only_interface_in_an_ipv4_network_is_one_line_naming_it() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(CONFIG).unwrap();
    let host = &cluster.hosts[0];
    host.ns
        .ip(&[
            "link", "add", "v6only", "type", "veth", "peer", "name", "v6only-p",
        ])
        .unwrap();
    host.ns
        .ip(&[
            "-6",
            "addr",
            "add",
            "2001:db8:77::1/64",
            "dev",
            "v6only",
            "nodad",
        ])
        .unwrap();
    host.ns.ip(&["link", "set", "v6only", "up"]).unwrap();
    let mut agent = cluster.start_agent(0, &["--iface=2001:db8:77::1"]).unwrap();
    let st = agent.wait_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(st.code(), Some(1));
    assert_eq!(
        messages(&agent, "ERROR"),
        vec!["the external interface: interface v6only has no IPv4 address, which the network config needs (EnableIPv4); add one, or name another interface with --iface".to_owned()]
    );
    assert!(cluster.leases().unwrap().is_empty());
}

/// `--udp-decap=xdp` on an interface whose driver has no native XDP (a bridge): one line that
/// names the interface and the kernel's reason, no fallback to TC decap or to the TUN data
/// plane (the operator asked for XDP), and nothing left attached.
#[test]
fn forced_xdp_decap_where_xdp_cannot_attach_is_one_line_with_the_reason() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(CONFIG).unwrap();
    let host = &cluster.hosts[0];
    host.ns
        .ip(&["link", "add", "brx", "type", "bridge"])
        .unwrap();
    host.ns
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "brx"])
        .unwrap();
    host.ns.ip(&["link", "set", "brx", "up"]).unwrap();
    let mut flags = flags_with_iface(&cluster, 0, "brx");
    flags.push("--udp-decap=xdp".into());
    let mut agent = Agent::spawn(host, &flags, &[]).unwrap();
    let st = agent.wait_exit(Duration::from_secs(20)).unwrap();
    assert_eq!(st.code(), Some(1), "{}", agent.log());
    let errors = messages(&agent, "ERROR");
    assert_eq!(errors.len(), 1, "{errors:?}\n{}", agent.log());
    assert!(
        errors[0].contains(
            "--udp-decap=xdp: XDP decap cannot run on brx: driver bridge has no native XDP ("
        ),
        "{errors:?}"
    );
    assert!(!agent.log().contains("falling back"), "{}", agent.log());
    let links = host.ns.exec("bpftool", &["link", "show"]).unwrap();
    assert!(!links.contains("flannel"), "left attached: {links}");
}

#[test]
fn a_second_agent_for_the_same_network_refuses_to_start() {
    let cluster = Cluster::new(1).unwrap();
    cluster.set_config(CONFIG).unwrap();
    let mut first = cluster.start_agent(0, &[]).unwrap();
    first.wait_ready(Duration::from_secs(20)).unwrap();
    let mut second = cluster.start_agent(0, &[]).unwrap();
    let st = second.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(1));
    let file = first.subnet_file.display().to_string();
    assert!(
        second.log().contains(&format!(
            "another flanneld (pid {}) is running with --subnet-file {file} (it holds {file}.lock)",
            first.pid().unwrap()
        )),
        "{}",
        second.log()
    );
    assert_eq!(readyz(&first), 200);
    assert_eq!(cluster.leases().unwrap().len(), 1);
}

#[test]
fn uninstall_refuses_while_the_agent_runs_and_removes_host_gw_routes() {
    let cluster = Cluster::new(2).unwrap();
    cluster
        .set_config(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#)
        .unwrap();
    let mut agents: Vec<Agent> = (0..2)
        .map(|i| cluster.start_agent(i, &[]).unwrap())
        .collect();
    for a in agents.iter_mut() {
        a.wait_ready(Duration::from_secs(20)).unwrap();
    }
    let host = &cluster.hosts[0];
    let peer = agents[1].subnet().unwrap();
    let routes = || host.ns.ip(&["route", "show", &peer]).unwrap();
    wait_for(Duration::from_secs(5), "the host-gw route", || {
        routes().contains("via 192.0.2.11").then_some(())
    })
    .unwrap();
    let subnet_file = format!("--subnet-file={}", agents[0].subnet_file.display());
    let pin_dir = format!("--bpf-pin-dir={}", host.pin_dir());

    let out = flanneld(host, &["uninstall", &subnet_file, &pin_dir]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "flanneld (pid {}) is still running with {}: stop it first (e.g. systemctl stop flanneld), or pass --force",
            agents[0].pid().unwrap(),
            subnet_file.replacen('=', " ", 1)
        )),
        "{stderr}"
    );
    assert_eq!(readyz(&agents[0]), 200);
    assert!(
        routes().contains("via 192.0.2.11"),
        "uninstall touched a running agent"
    );

    agents[0].stop().unwrap();
    let out = flanneld(host, &["uninstall", &subnet_file, &pin_dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(routes().trim(), "", "host-gw route left behind");
    assert!(!agents[0].subnet_file.exists());

    // --force removes what a running agent installed.
    let other = &cluster.hosts[1];
    let out = flanneld(
        other,
        &[
            "uninstall",
            "--force",
            &format!("--subnet-file={}", agents[1].subnet_file.display()),
            &format!("--bpf-pin-dir={}", other.pin_dir()),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!agents[1].subnet_file.exists());
}

#[test]
fn dataplane_outside_the_agents_namespace_says_so() {
    let cluster = Cluster::new(2).unwrap();
    cluster.set_config(CONFIG).unwrap();
    let mut agent = cluster.start_agent(0, &["--udp-dataplane=ebpf"]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let pin_dir = format!("--bpf-pin-dir={}", cluster.hosts[0].pin_dir());

    let here = flanneld(&cluster.hosts[0], &["dataplane", &pin_dir]);
    assert!(here.status.success());
    let text = String::from_utf8_lossy(&here.stdout);
    assert!(text.contains("tcx egress of flannel0"), "{text}");

    // The other host runs an agent of its own: it too has flannel0 and eth0, at the same
    // interface indexes, so only the recorded namespace tells the pins apart.
    let mut other = cluster.start_agent(1, &["--udp-dataplane=ebpf"]).unwrap();
    other.wait_ready(Duration::from_secs(20)).unwrap();
    let elsewhere = flanneld(&cluster.hosts[1], &["dataplane", &pin_dir]);
    assert_eq!(elsewhere.status.code(), Some(2));
    let text = String::from_utf8_lossy(&elsewhere.stdout);
    assert!(!text.contains("tcx "), "{text}");
    assert!(
        text.contains("these pins belong to an agent in another network namespace"),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        stderr.starts_with("flanneld dataplane: wrong network namespace (")
            && stderr
                .trim_end()
                .ends_with("): peers and counters are shown, the hooks are not"),
        "{stderr}"
    );
}
