//! The udp backend heals itself, as vxlan, host-gw and --ip-masq do: what someone deletes or
//! replaces on a running host (flannel0, the external interface, our program on a hook, the
//! TUN fallback's device) is back within one resync, without a restart, counted in
//! `flannel_repairs_total{what}`; and a resync of a healthy data plane touches nothing.

use std::time::Duration;

use flannel_tests::{tc, wait_for, Overlay};

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
/// The backends resync every 10 s (backend/network.rs); what vxlan's tests allow too.
const RESYNC: Duration = Duration::from_secs(15);

fn start(flags: &[&str]) -> Overlay {
    let o = Overlay::builder(UDP, 2).flags(flags).start().unwrap();
    assert!(o.containers[0].ping(o.containers[1].ip, 1, 2).unwrap());
    o
}

/// Pings from host 0's pod to host 1's and back come through within one resync.
fn pings_come_back(o: &Overlay, after: &str) {
    let (c0, c1) = (&o.containers[0], &o.containers[1]);
    let back = wait_for(RESYNC, after, || c0.ping(c1.ip, 1, 1).ok()?.then_some(()));
    assert!(
        back.is_ok(),
        "no pings after {after}:\n{}",
        o.agents[0].log()
    );
}

/// The repair `what` counted on host 0 (at least once), logged, and no restart.
fn repaired(o: &Overlay, pid: Option<i32>, what: &str, logged: &str) {
    let a = &o.agents[0];
    assert_eq!(a.pid(), pid, "the agent restarted:\n{}", a.log());
    let n = a.repairs(what).unwrap();
    assert!(
        n >= 1,
        "flannel_repairs_total{{what={what:?}}} = {n}:\n{}",
        a.log()
    );
    assert!(
        a.log().contains(logged),
        "expected {logged:?} in:\n{}",
        a.log()
    );
}

/// The programs on `dir` of `dev`, as the kernel names them (15 characters at most: TCX
/// lists kernel names, cls_bpf filters ours in full).
fn programs(ns: &flannel_tests::Netns, dev: &str, dir: &str) -> Vec<String> {
    tc::attached_programs(ns, dev, dir)
        .unwrap()
        .into_iter()
        .map(|n| n.chars().take(15).collect())
        .collect()
}

/// Every program of ours on host 0 with its id (flannel0 both ways, eth0 ingress).
fn program_ids(o: &Overlay) -> Vec<(String, u64)> {
    let ns = &o.cluster.hosts[0].ns;
    let mut ids = Vec::new();
    for (dev, dir) in [
        ("flannel0", "egress"),
        ("flannel0", "ingress"),
        ("eth0", "ingress"),
    ] {
        ids.extend(tc::attached_program_ids(ns, dev, dir).unwrap());
    }
    ids
}

/// Over more than one resync interval: every ping answered, no program attached again, no
/// repair counted.
fn healthy_resync_touches_nothing(o: &Overlay) {
    let before = program_ids(o);
    let counted: Vec<u64> = ["program", "foreign_program", "overlay_device"]
        .iter()
        .map(|w| o.agents[0].repairs(w).unwrap())
        .collect();
    // 150 pings 0.1 s apart: 15 s, more than a resync period.
    let out = o.containers[0]
        .ping_command(o.containers[1].ip, 150, &["-i", "0.1", "-W", "2"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("150 packets transmitted, 150 received"),
        "{text}"
    );
    assert_eq!(program_ids(o), before, "{}", o.agents[0].log());
    let after: Vec<u64> = ["program", "foreign_program", "overlay_device"]
        .iter()
        .map(|w| o.agents[0].repairs(w).unwrap())
        .collect();
    assert_eq!(after, counted, "{}", o.agents[0].log());
}

#[test]
fn ebpf_flannel0_deleted_is_recreated_with_its_programs() {
    let o = start(&["--udp-dataplane=ebpf"]);
    let info = o.agents[0].dataplane_info().unwrap();
    assert_eq!(info["kind"], "ebpf", "{info:?}");
    let pid = o.agents[0].pid();
    let ns = &o.cluster.hosts[0].ns;
    ns.ip(&["link", "del", "flannel0"]).unwrap();
    pings_come_back(&o, "flannel0 deleted");
    repaired(&o, pid, "overlay_device", "flannel0 was gone or replaced");
    let addr = ns.ip(&["-4", "addr", "show", "dev", "flannel0"]).unwrap();
    let subnet = o.agents[0].subnet().unwrap();
    let net_addr = subnet.split('/').next().unwrap();
    assert!(addr.contains(&format!("{net_addr}/32")), "{addr}");
    let route = ns.ip(&["route", "show", "10.244.0.0/16"]).unwrap();
    assert!(route.contains("dev flannel0"), "{route}");
    assert_eq!(
        programs(ns, "flannel0", "egress"),
        ["flannel_encap"],
        "{info:?}"
    );
    assert_eq!(programs(ns, "flannel0", "ingress"), ["flannel_overlay"]);
    // And in the way the agent chose at start.
    let tcx = !tc::filters(ns, "flannel0", "egress").unwrap().is_empty();
    assert_eq!(info["attach"] == "tc", tcx, "{info:?}");
    healthy_resync_touches_nothing(&o);
}

#[test]
fn ebpf_external_interface_recreated_is_followed() {
    let o = start(&["--udp-dataplane=ebpf"]);
    let info = o.agents[0].dataplane_info().unwrap();
    assert_eq!(info["kind"], "ebpf", "{info:?}");
    let pid = o.agents[0].pid();
    let ns = &o.cluster.hosts[0].ns;
    let index = |ns: &flannel_tests::Netns| ns.ip(&["-o", "link", "show", "eth0"]).unwrap();
    let before = index(ns);
    o.cluster.replug_host(0).unwrap();
    assert_ne!(index(ns), before);
    pings_come_back(&o, "eth0 re-created");
    repaired(
        &o,
        pid,
        "external_interface",
        "external interface eth0 was re-created",
    );
    assert_eq!(
        programs(ns, "eth0", "ingress"),
        ["flannel_decap"],
        "{info:?}"
    );
    // Both ways: host 1's pod reaches host 0's, through the new eth0's decap.
    assert!(o.containers[1].ping(o.containers[0].ip, 3, 2).unwrap());
    healthy_resync_touches_nothing(&o);
}

/// Something else where our decap belongs on eth0: with classic TC another program in our
/// filter (pref 17996, handle 0x464c), with TCX our link detached and the hook left to
/// whatever else is there. Ours is back within one resync, with a warning naming what was
/// found.
fn program_on_our_hook_is_put_back(flags: &[&str], want_attach: &str) {
    let o = start(flags);
    let info = o.agents[0].dataplane_info().unwrap();
    assert_eq!(info["attach"], want_attach, "{info:?}");
    let pid = o.agents[0].pid();
    let ns = &o.cluster.hosts[0].ns;
    let (what, logged) = if want_attach == "tc" {
        // Classic BPF matching the tunnelled packets, without an action: they go on to the
        // stack undecapsulated.
        let insns = ns
            .exec("tcpdump", &["-i", "eth0", "-ddd", "udp dst port 8285"])
            .unwrap();
        let bytecode: String = insns.lines().map(|l| format!("{},", l.trim())).collect();
        ns.exec(
            "tc",
            &[
                "filter", "replace", "dev", "eth0", "ingress", "pref", "17996", "handle", "0x464c",
                "bpf", "bytecode", &bytecode,
            ],
        )
        .unwrap();
        let held = tc::filters(ns, "eth0", "ingress").unwrap();
        assert!(
            held.iter()
                .all(|f| f.bpf_name.as_deref() != Some("flannel_decap")),
            "{held:?}"
        );
        (
            "foreign_program",
            "where flannel_decap belongs: flannel_decap put back",
        )
    } else {
        let link = format!("{}/flannel_decap_link", o.cluster.hosts[0].pin_dir());
        ns.exec("bpftool", &["link", "detach", "pinned", &link])
            .unwrap();
        assert!(programs(ns, "eth0", "ingress").is_empty());
        (
            "program",
            "flannel_decap was missing from tcx ingress of eth0",
        )
    };
    assert!(!o.containers[1].ping(o.containers[0].ip, 1, 1).unwrap());
    let (c0, c1) = (&o.containers[0], &o.containers[1]);
    let back = wait_for(RESYNC, "decap back", || {
        c1.ping(c0.ip, 1, 1).ok()?.then_some(())
    });
    assert!(back.is_ok(), "{}", o.agents[0].log());
    repaired(&o, pid, what, logged);
    assert_eq!(programs(ns, "eth0", "ingress"), ["flannel_decap"]);
    healthy_resync_touches_nothing(&o);
}

#[test]
fn classic_tc_foreign_filter_in_our_place_is_replaced() {
    program_on_our_hook_is_put_back(&["--udp-dataplane=ebpf", "--udp-attach=tc"], "tc");
}

/// Whatever `--udp-attach=auto` chose on this kernel.
#[test]
fn auto_attach_program_taken_off_its_hook_is_put_back() {
    let o = start(&["--udp-dataplane=ebpf"]);
    let attach = o.agents[0].dataplane_info().unwrap()["attach"].clone();
    drop(o);
    let attach: &'static str = if attach == "tc" { "tc" } else { "tcx" };
    program_on_our_hook_is_put_back(&["--udp-dataplane=ebpf"], attach);
}

#[test]
fn tun_device_deleted_is_recreated_and_forwarding_resumes() {
    let o = start(&["--udp-dataplane=tun"]);
    let info = o.agents[0].dataplane_info().unwrap();
    assert_eq!(info["kind"], "tun", "{info:?}");
    let pid = o.agents[0].pid();
    o.cluster.hosts[0]
        .ns
        .ip(&["link", "del", "flannel0"])
        .unwrap();
    pings_come_back(&o, "the TUN deleted");
    repaired(&o, pid, "tun_device", "the TUN forwarder moves onto it");
    assert!(o.containers[1].ping(o.containers[0].ip, 3, 2).unwrap());
}
