//! Operating the eBPF udp data plane: restarting the agent and an etcd outage without losing
//! packets, cleaning up peers that went away meanwhile, `flanneld dataplane` and
//! `flanneld uninstall`.

use std::net::Ipv4Addr;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use flannel_tests::{tc, wait_for, Container, Overlay};
use nix::sys::signal::Signal;

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
const SUBNETS: &str = "/coreos.com/network/subnets/";
/// A peer with no agent behind it: deleting its lease makes no real agent exit.
const FAKE_KEY: &str = "10.244.250.0-24";
const FAKE_NET: &str = "10.244.250.0";
const FAKE_LEASE: &str = r#"{"PublicIP":"198.51.100.250"}"#;
/// Long enough that no lease expires during an outage.
const TTL: &str = "--subnet-lease-ttl=24h";

fn agent_flags(extra: &[&'static str]) -> Vec<&'static str> {
    let mut f = vec!["--udp-dataplane=ebpf", TTL];
    f.extend_from_slice(extra);
    f
}

/// Two eBPF hosts with a container each, plus the fake peer lease in every peer map.
fn overlay(extra: &[&'static str]) -> Overlay {
    let o = Overlay::builder(UDP, 2)
        .flags(&agent_flags(extra))
        .before_agents(|cluster| {
            cluster
                .etcd
                .put(&format!("{SUBNETS}{FAKE_KEY}"), FAKE_LEASE)
        })
        .no_peer_wait()
        .start()
        .unwrap();
    for (h, a) in o.agents.iter().enumerate() {
        // The eBPF data plane is the one in use, as /metrics reports it.
        let info = a.dataplane_info().unwrap();
        assert_eq!(
            info.get("kind").map(String::as_str),
            Some("ebpf"),
            "{info:?}"
        );
        wait_for(Duration::from_secs(5), "both peers in the map", || {
            (pinned_peer_subnets(&o, h).len() == 2).then_some(())
        })
        .unwrap();
    }
    assert!(pinned_peer_subnets(&o, 0).contains(&FAKE_NET.to_owned()));
    o
}

fn pin_dir(o: &Overlay, host: usize) -> String {
    o.cluster.hosts[host].pin_dir()
}

fn pinned_peer_subnets(o: &Overlay, host: usize) -> Vec<String> {
    o.cluster.hosts[host].pinned_peer_subnets().unwrap()
}

/// Ping at 100 packets per second, in the background.
/// `count` pings at 100/s for what takes `count` / 100 s on this machine: times the harness's
/// time scale, so that what happens during them (a restart) still does in a slower VM.
fn scaled_pings(count: u32) -> u32 {
    (f64::from(count) * flannel_tests::time_scale()).round() as u32
}

fn start_ping(src: &Container, dst: Ipv4Addr, count: u32) -> Child {
    src.ping_command(dst, count, &["-W", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ping")
}

/// (transmitted, received) from ping's summary line.
fn ping_summary(out: &Output) -> (u32, u32) {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {text:?}"));
    let nums: Vec<u32> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(nums.len() >= 2, "ping summary {line:?}");
    (nums[0], nums[1])
}

/// Kill a background ping that outlives a failed assertion (never hang a test).
struct Reaper(Option<Child>);

impl Reaper {
    fn wait(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
    fn running(&mut self) -> bool {
        matches!(self.0.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `flanneld dataplane` run inside host `host`'s namespace.
fn dataplane_report(o: &Overlay, host: usize) -> String {
    let out = o.cluster.hosts[host]
        .flanneld(&["dataplane", "--bpf-pin-dir", &pin_dir(o, host)])
        .unwrap();
    assert!(
        out.status.success(),
        "flanneld dataplane: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Program counts on the hooks, from `flanneld dataplane` ("tcx egress of flannel0  1: ...",
/// "tc ingress of eth0  1: flannel_decap (pref ...)", "xdp of eth0  0 (decap on TC)").
fn hook_program_counts(report: &str) -> Vec<(String, u32)> {
    report
        .lines()
        .filter(|l| ["tcx ", "tc ", "xdp "].iter().any(|p| l.starts_with(p)))
        .map(|l| {
            let (hook, progs) = l.split_at(30);
            let digits: String = progs
                .trim()
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let n = digits.parse().unwrap_or_else(|_| panic!("hook line {l:?}"));
            (hook.trim().to_owned(), n)
        })
        .collect()
}

/// What `flanneld dataplane` lists with TCX: one program per hook, `xdp_progs` on XDP.
fn tcx_hooks(xdp_progs: u32) -> Vec<(String, u32)> {
    [
        ("tcx egress of flannel0", 1),
        ("tcx ingress of flannel0", 1),
        ("tcx ingress of eth0", 1),
        ("xdp of eth0", xdp_progs),
    ]
    .map(|(h, n)| (h.to_owned(), n))
    .to_vec()
}

/// What `flanneld dataplane` lists with classic TC and `filters_on_eth0` filters (ours
/// included) on eth0's ingress.
fn classic_hooks(filters_on_eth0: u32, xdp_progs: u32) -> Vec<(String, u32)> {
    [
        ("tc egress of flannel0", 1),
        ("tc ingress of flannel0", 1),
        ("tc ingress of eth0", filters_on_eth0),
        ("xdp of eth0", xdp_progs),
    ]
    .map(|(h, n)| (h.to_owned(), n))
    .to_vec()
}

/// flanneld's cls_bpf filters on host `host`'s three hooks, with the hook.
fn flannel_filters(o: &Overlay, host: usize) -> Vec<(&'static str, tc::Filter)> {
    let ns = &o.cluster.hosts[host].ns;
    let mut found = Vec::new();
    for (hook, dev, dir) in [
        ("flannel0 egress", "flannel0", "egress"),
        ("flannel0 ingress", "flannel0", "ingress"),
        ("eth0 ingress", "eth0", "ingress"),
    ] {
        for f in tc::flannels(ns, dev, dir).unwrap() {
            found.push((hook, f));
        }
    }
    found
}

#[test]
fn sigkill_and_restart_lose_no_packets_and_drop_peers_deleted_meanwhile() {
    sigkill_and_restart(&["--udp-decap=tc"], 0);
}

#[test]
fn sigkill_and_restart_with_xdp_decap_lose_no_packets() {
    sigkill_and_restart(&["--udp-decap=xdp"], 1);
}

/// Classic TC: the new agent swaps its programs into our filters (same pref and handle, a new
/// program id), never without one.
#[test]
fn sigkill_and_restart_with_classic_tc_lose_no_packets_and_replace_programs_in_place() {
    sigkill_and_restart(&["--udp-decap=tc", "--udp-attach=tc"], 0);
}

/// `xdp_progs`: the XDP programs `flanneld dataplane` lists on eth0 afterwards. The TC hooks
/// are listed as the agent attached (`attach` of `flannel_dataplane_info`): TCX, or classic TC
/// where it was asked for or where the kernel has no TCX (the kernel matrix's 5.10 and 6.1).
fn sigkill_and_restart(extra: &[&'static str], xdp_progs: u32) {
    let mut o = overlay(extra);
    let attach = o.agents[0].dataplane_info().unwrap()["attach"].clone();
    let classic = attach == "tc";
    if extra.contains(&"--udp-attach=tc") {
        assert!(classic, "--udp-attach=tc attached with {attach}");
    }
    let hooks = if classic {
        classic_hooks(1, xdp_progs)
    } else {
        tcx_hooks(xdp_progs)
    };
    let dst = o.containers[1].ip;
    let filters_before = flannel_filters(&o, 0);
    // 10 s of pings at 100/s; the agent is killed and back well within that.
    let count = scaled_pings(1000);
    let mut ping = Reaper(Some(start_ping(&o.containers[0], dst, count)));
    wait_for(Duration::from_secs(5), "pings flowing", || {
        dataplane_report(&o, 0)
            .lines()
            .find_map(|l| l.strip_prefix("tx_packets"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| *n >= 50)
    })
    .unwrap();

    o.agents[0].signal(Signal::SIGKILL).unwrap();
    o.agents[0].wait_exit(Duration::from_secs(5)).unwrap();
    o.cluster.etcd.del(&format!("{SUBNETS}{FAKE_KEY}")).unwrap();
    let mut restarted = o.cluster.start_agent(0, &agent_flags(extra)).unwrap();
    restarted.wait_ready(Duration::from_secs(20)).unwrap();
    assert!(ping.running(), "the restart must happen while pinging");
    o.agents[0] = restarted;

    // The restarted agent reconciled the adopted map with etcd before it became ready.
    let peers = pinned_peer_subnets(&o, 0);
    assert!(
        !peers.contains(&FAKE_NET.to_owned()),
        "stale peer survived the restart: {peers:?}\n{}",
        o.agents[0].log()
    );
    assert_eq!(peers.len(), 1, "{peers:?}");
    // The programs were replaced through the pinned links or in our filters, not attached a
    // second time.
    let report = dataplane_report(&o, 0);
    assert_eq!(hook_program_counts(&report), hooks, "{report}");
    let filters_after = flannel_filters(&o, 0);
    assert_eq!(
        filters_after.len(),
        if classic { 3 } else { 0 },
        "{filters_after:?}"
    );
    assert_eq!(
        filters_before.len(),
        filters_after.len(),
        "{filters_before:?}"
    );
    for ((hook, before), (hook_after, after)) in filters_before.iter().zip(&filters_after) {
        assert_eq!(hook, hook_after);
        assert_ne!(
            before.prog_id, after.prog_id,
            "{hook}: the restarted agent's program is not in our filter"
        );
    }

    let out = ping.wait();
    let (sent, received) = ping_summary(&out);
    assert_eq!(sent, count);
    assert_eq!(received, sent, "packets lost across the restart\n{report}");
    // Still talking both ways afterwards.
    assert!(o.containers[1].ping(o.containers[0].ip, 3, 2).unwrap());
}

#[test]
fn etcd_outage_loses_no_packets_and_deletions_apply_once_it_is_back() {
    let mut o = overlay(&[]);
    let own_leases = |o: &Overlay| {
        let mut l: Vec<(String, i64)> = o
            .cluster
            .leases()
            .unwrap()
            .into_iter()
            .filter(|kv| !kv.key.ends_with(FAKE_KEY))
            .map(|kv| (kv.key, kv.lease))
            .collect();
        l.sort();
        l
    };
    let before = own_leases(&o);
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.iter().all(|(_, lease)| *lease != 0), "{before:?}");

    // 40 s of pings at 100/s across a 30 s outage.
    let mut ping = Reaper(Some(start_ping(&o.containers[0], o.containers[1].ip, 4000)));
    o.cluster.etcd.stop().unwrap();
    // The outage itself: its length is what is being tested.
    std::thread::sleep(Duration::from_secs(30));
    o.cluster.etcd.resume().unwrap();
    for a in &mut o.agents {
        assert!(
            a.try_wait().unwrap().is_none(),
            "agent exited:\n{}",
            a.log()
        );
    }

    let t = Instant::now();
    o.cluster.etcd.del(&format!("{SUBNETS}{FAKE_KEY}")).unwrap();
    for h in 0..2 {
        wait_for(
            Duration::from_secs(10),
            "fake peer removed from the map",
            || (!pinned_peer_subnets(&o, h).contains(&FAKE_NET.to_owned())).then_some(()),
        )
        .unwrap_or_else(|e| panic!("host {h}: {e}\n{}", o.agents[h].log()));
    }
    let took = t.elapsed();
    assert!(ping.running(), "pings must span the outage");

    let out = ping.wait();
    let (sent, received) = ping_summary(&out);
    assert_eq!(sent, 4000);
    assert_eq!(received, sent, "packets lost during the etcd outage");
    for a in &mut o.agents {
        assert!(
            a.try_wait().unwrap().is_none(),
            "agent exited:\n{}",
            a.log()
        );
    }
    assert_eq!(own_leases(&o), before, "the agents' leases must survive");
    eprintln!("deletion applied {took:?} after etcd came back");
}

#[test]
fn dataplane_lists_peers_and_uninstall_removes_everything() {
    // With XDP decap: its hook is listed and removed too.
    let mut o = overlay(&["--ip-masq", "--udp-decap=xdp"]);
    assert!(o.containers[0].ping(o.containers[1].ip, 5, 2).unwrap());
    let host1_subnet = o.agents[1].subnet().unwrap();
    let report = dataplane_report(&o, 0);
    assert!(
        report.contains(&format!("{host1_subnet:<20} 192.0.2.11")),
        "{report}"
    );
    assert!(
        report.contains(&format!("{:<20} 198.51.100.250", "10.244.250.0/24")),
        "{report}"
    );
    assert!(report.contains("(2 peers)"), "{report}");
    assert!(
        report.contains(&format!("{:<30} 1: flannel_decap_xdp", "xdp of eth0")),
        "{report}"
    );
    let tx: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("tx_packets"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no tx_packets in {report}"));
    assert!(tx >= 5, "{report}");

    let host = &o.cluster.hosts[0];
    // A leftover vxlan device of an earlier vxlan run goes too.
    host.ns
        .ip(&[
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "dev",
            "eth0",
        ])
        .unwrap();
    let save = host.ns.exec("iptables-save", &[]).unwrap();
    assert!(save.contains("FLANNEL-FWD") && save.contains("FLANNEL-POSTRTG"));
    o.agents[0].stop().unwrap();

    let subnet_file = o.agents[0].subnet_file.clone();
    let uninstall = [
        "uninstall".to_owned(),
        format!("--bpf-pin-dir={}", pin_dir(&o, 0)),
        format!("--subnet-file={}", subnet_file.display()),
    ];
    let uninstall: Vec<&str> = uninstall.iter().map(String::as_str).collect();
    let out = host.flanneld(&uninstall).unwrap();
    assert!(
        out.status.success(),
        "flanneld uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!std::path::Path::new(&pin_dir(&o, 0)).exists());
    assert!(!subnet_file.exists());
    let links = host.ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("flannel"), "{links}");
    assert!(!links.contains("xdp"), "XDP program left on eth0: {links}");
    let save = host.ns.exec("iptables-save", &[]).unwrap();
    assert!(!save.contains("FLANNEL"), "{save}");
    // Running it again finds nothing to do and still succeeds.
    let again = host.flanneld(&uninstall).unwrap();
    assert!(again.status.success());
    // The other host is untouched.
    assert_eq!(pinned_peer_subnets(&o, 1).len(), 2);
}

/// Another tool's cls_bpf filter on eth0's ingress, there before the agent: with classic TC
/// it keeps running ahead of ours (it sees and counts each tunnelled packet, which ours then
/// still decapsulates), and `flanneld uninstall` removes exactly our filters, leaving it and
/// the clsact qdisc.
#[test]
fn classic_tc_keeps_a_foreign_filter_working_and_uninstall_removes_only_ours() {
    // TC decap: where auto picks XDP (eth0 with GRO on, as 5.10's veth), tunnelled packets
    // are decapsulated before any TC filter sees them.
    let mut o = Overlay::builder(UDP, 2)
        .flags(&agent_flags(&["--udp-attach=tc", "--udp-decap=tc"]))
        .before_agents(|c| {
            let ns = &c.hosts[0].ns;
            // Classic BPF (tcpdump compiles it) matching what arrives for UDP port 8285; its
            // action counts (mirroring to a device that drops the copies) and continues with
            // the next filter.
            let insns = ns.exec("tcpdump", &["-i", "eth0", "-ddd", "udp dst port 8285"])?;
            let bytecode: String = insns.lines().map(|l| format!("{},", l.trim())).collect();
            ns.ip(&["link", "add", "sink0", "type", "ifb"])?;
            ns.ip(&["link", "set", "sink0", "up"])?;
            ns.exec("tc", &["qdisc", "add", "dev", "eth0", "clsact"])?;
            ns.exec(
                "tc",
                &[
                    "filter", "add", "dev", "eth0", "ingress", "pref", "7", "handle", "7", "bpf",
                    "bytecode", &bytecode, "action", "mirred", "egress", "mirror", "dev", "sink0",
                    "continue",
                ],
            )?;
            Ok(())
        })
        .start()
        .unwrap();
    let foreign = |o: &Overlay| -> Vec<tc::Filter> {
        tc::filters(&o.cluster.hosts[0].ns, "eth0", "ingress")
            .unwrap()
            .into_iter()
            .filter(|f| f.pref == 7)
            .collect()
    };
    let counted = |f: &[tc::Filter]| f.first().and_then(|f| f.action_packets).unwrap_or(0);
    let before = foreign(&o);
    assert_eq!(before.len(), 1, "{before:?}");

    // Every echo request to host 0's pod arrives tunnelled on eth0.
    let out = start_ping(&o.containers[1], o.containers[0].ip, 20)
        .wait_with_output()
        .unwrap();
    assert_eq!(ping_summary(&out), (20, 20));
    let after = foreign(&o);
    assert!(
        counted(&after) >= counted(&before) + 20,
        "the foreign filter did not see the tunnelled packets: {before:?} then {after:?}"
    );
    let report = dataplane_report(&o, 0);
    assert!(
        report.contains(&format!(
            "{:<30} 2: bpf (pref 7 handle 0x7), flannel_decap (pref 17996 handle 0x464c)",
            "tc ingress of eth0"
        )),
        "{report}"
    );
    o.check_all_pairs(1 << 20).unwrap();

    let out = o.uninstall(0).unwrap();
    assert!(
        out.status.success(),
        "flanneld uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ns = &o.cluster.hosts[0].ns;
    let left = tc::filters(ns, "eth0", "ingress").unwrap();
    assert_eq!(left.len(), 1, "only the foreign filter stays: {left:?}");
    assert_eq!((left[0].pref, left[0].handle.as_str()), (7, "0x7"));
    assert!(
        tc::has_clsact(ns, "eth0").unwrap(),
        "the clsact qdisc stays"
    );
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!links.contains("flannel0"), "{links}");
    // The other host keeps its filters.
    assert_eq!(flannel_filters(&o, 1).len(), 3);
}

/// Switching modes across restarts, TCX (auto, this kernel has it) to classic TC and back to
/// TCX, under continuous pings: none lost, and each time exactly one of ours per hook, in the
/// new mode only.
#[test]
fn switching_between_tcx_and_classic_tc_on_restart_keeps_one_of_ours_per_hook() {
    let mut o = overlay(&["--udp-decap=tc"]);
    assert_eq!(hook_program_counts(&dataplane_report(&o, 0)), tcx_hooks(0));
    // 30 s of pings at 100/s; both restarts are done well within that.
    let count = scaled_pings(3000);
    let mut ping = Reaper(Some(start_ping(
        &o.containers[0],
        o.containers[1].ip,
        count,
    )));
    let steps = [
        (
            ["--udp-decap=tc", "--udp-attach=tc"],
            classic_hooks(1, 0),
            "attaching with classic TC (clsact + cls_bpf): --udp-attach=tc",
        ),
        (
            ["--udp-decap=tc", "--udp-attach=tcx"],
            tcx_hooks(0),
            "attaching with TCX: --udp-attach=tcx",
        ),
    ];
    for (flags, hooks, choice) in steps {
        o.agents[0].stop().unwrap();
        let mut agent = o.cluster.start_agent(0, &agent_flags(&flags)).unwrap();
        agent.wait_ready(Duration::from_secs(20)).unwrap();
        o.agents[0] = agent;
        let log = o.agents[0].own_log();
        assert!(log.contains(choice), "{log}");
        let report = dataplane_report(&o, 0);
        assert_eq!(hook_program_counts(&report), hooks, "{flags:?}\n{report}");
        let classic = flags[1] == "--udp-attach=tc";
        let filters = flannel_filters(&o, 0);
        assert_eq!(filters.len(), if classic { 3 } else { 0 }, "{filters:?}");
        let link = std::path::Path::new(&pin_dir(&o, 0)).join("flannel_decap_link");
        assert_eq!(link.exists(), !classic, "{}", link.display());
    }
    assert!(ping.running(), "the restarts must happen while pinging");
    let (sent, received) = ping_summary(&ping.wait());
    assert_eq!((sent, received), (count, count), "{}", o.agents[0].log());
    // No packet met two guards (the second would drop what the first admitted).
    let report = dataplane_report(&o, 0);
    let unverified = report
        .lines()
        .find_map(|l| l.strip_prefix("drop_unverified"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert_eq!(unverified, Some(0), "{report}");
}
