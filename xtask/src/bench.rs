//! `cargo xtask bench`: container-to-container throughput and latency over each data path and
//! underlay mode, interleaved in one run (the machine is noisy: compare ratios to bare routing
//! of the same run and underlay). Every path has its containers behind cni0, attached by the
//! real CNI plugins through the overlay harness.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use std::process::Command;

use anyhow::{bail, Context, Result};
use flannel_tests::{Cluster, Overlay, SubnetEnv, Underlay};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum DataPath {
    Bare,
    EbpfUdp,
    EbpfUdpXdp,
    TunUdp,
    KernelVxlan,
    FlannelVxlan,
    FlannelHostGw,
}

impl DataPath {
    const ALL: [DataPath; 7] = [
        DataPath::Bare,
        DataPath::EbpfUdp,
        DataPath::EbpfUdpXdp,
        DataPath::TunUdp,
        DataPath::KernelVxlan,
        DataPath::FlannelVxlan,
        DataPath::FlannelHostGw,
    ];

    /// The name `cargo xtask bench --path` takes.
    pub fn name(self) -> &'static str {
        match self {
            DataPath::Bare => "bare",
            DataPath::EbpfUdp => "ebpf-tc",
            DataPath::EbpfUdpXdp => "ebpf-xdp",
            DataPath::TunUdp => "tun",
            DataPath::KernelVxlan => "kernel-vxlan",
            DataPath::FlannelVxlan => "vxlan",
            DataPath::FlannelHostGw => "host-gw",
        }
    }

    fn label(self) -> &'static str {
        match self {
            DataPath::Bare => "bare routing (no overlay)",
            DataPath::EbpfUdp => "udp backend, eBPF data plane, TC decap",
            DataPath::EbpfUdpXdp => "udp backend, eBPF data plane, XDP decap",
            DataPath::TunUdp => "udp backend, TUN data plane",
            DataPath::KernelVxlan => "kernel VXLAN (hand-made)",
            DataPath::FlannelVxlan => "vxlan backend (ours)",
            DataPath::FlannelHostGw => "host-gw backend (ours)",
        }
    }
}

#[derive(Default, Debug)]
struct Sample {
    one: Vec<f64>,
    four: Vec<f64>,
    /// Per round: median and mean RTT.
    ping_p50: Vec<f64>,
    ping_avg: Vec<f64>,
}

const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;

/// Two hosts with a container each, behind cni0, for one path; torn down on drop.
fn testbed(path: DataPath, underlay: Underlay) -> Result<Overlay> {
    let agents = |config: &str, flags: &[&str]| {
        Overlay::builder(config, 2)
            .underlay(underlay)
            .flags(flags)
            .start()
    };
    match path {
        DataPath::Bare => hand_made(false, underlay),
        DataPath::KernelVxlan => hand_made(true, underlay),
        DataPath::EbpfUdp => agents(UDP, &["--udp-dataplane=ebpf", "--udp-decap=tc"]),
        DataPath::EbpfUdpXdp => agents(UDP, &["--udp-dataplane=ebpf", "--udp-decap=xdp"]),
        DataPath::TunUdp => agents(UDP, &["--udp-dataplane=tun"]),
        DataPath::FlannelVxlan => agents(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
            &[],
        ),
        DataPath::FlannelHostGw => agents(
            r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
            &[],
        ),
    }
}

/// Bare routing or a hand-made kernel VXLAN between two hosts, with subnet.env written by hand
/// so that the same CNI rendering attaches the containers. No flanneld masquerades here, so
/// FLANNEL_IPMASQ=false and the bridge plugin does (every path then runs with conntrack).
fn hand_made(vxlan: bool, underlay: Underlay) -> Result<Overlay> {
    let subnets = ["10.244.1.0/24", "10.244.2.0/24"];
    let envs = ["10.244.1.1/24", "10.244.2.1/24"]
        .iter()
        .map(|subnet| SubnetEnv {
            network: "10.244.0.0/16".into(),
            subnet: subnet.to_string(),
            mtu: if vxlan { 1450 } else { 1500 },
            ipmasq: false,
        })
        .collect();
    Overlay::hand_made(envs)
        .underlay(underlay)
        .before_agents(move |cluster| {
            for i in 0..2 {
                let h = &cluster.hosts[i];
                let other = &cluster.hosts[1 - i];
                if vxlan {
                    h.ns.ip(&[
                        "link",
                        "add",
                        "vx0",
                        "type",
                        "vxlan",
                        "id",
                        "42",
                        "local",
                        &h.ip.to_string(),
                        "remote",
                        &other.ip.to_string(),
                        "dstport",
                        "4789",
                        "dev",
                        "eth0",
                    ])?;
                    h.ns.ip(&[
                        "addr",
                        "add",
                        &format!("10.244.255.{}/24", i + 1),
                        "dev",
                        "vx0",
                    ])?;
                    h.ns.ip(&["link", "set", "vx0", "up"])?;
                    h.ns.ip(&[
                        "route",
                        "add",
                        subnets[1 - i],
                        "via",
                        &format!("10.244.255.{}", 2 - i),
                    ])?;
                } else {
                    h.ns.ip(&["route", "add", subnets[1 - i], "via", &other.ip.to_string()])?;
                }
            }
            Ok(())
        })
        .start()
}

fn iperf(tb: &Overlay, streams: u32, seconds: u32) -> Result<f64> {
    let server = tb.containers[1]
        .ns
        .command("iperf3")
        .args(["-s", "-1", "-B", &tb.containers[1].ip.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 (installed by cargo xtask setup)")?;
    let _server = KillOnDrop(server);
    let mut last_err = String::new();
    // The server needs a moment to listen: retry the client until it connects.
    let bps = flannel_tests::wait_for(Duration::from_secs(5), "iperf3 server", || {
        let out = tb.containers[0]
            .ns
            .command("timeout")
            .args([&(seconds + 15).to_string(), "iperf3"])
            .args([
                "-c",
                &tb.containers[1].ip.to_string(),
                "-t",
                &seconds.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
            ])
            .args(["--connect-timeout", "2000"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let bps = v["end"]["sum_received"]["bits_per_second"].as_f64();
        if bps.is_none() {
            last_err = format!("{} {}", v["error"], String::from_utf8_lossy(&out.stderr));
            last_err.truncate(400);
        }
        bps
    })
    .with_context(|| format!("iperf3 -P {streams}: {last_err}"))?;
    Ok(bps / 1e9)
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Ping RTTs container to container: the median (what a packet typically pays) and the mean
/// (which idle wake-ups of this 2-core VM inflate), over 200 pings 10 ms apart, after a
/// warm-up that resolves neighbours and caches so no path pays for its first packets.
fn ping_ms(tb: &Overlay) -> Result<(f64, f64)> {
    let (from, to) = (&tb.containers[0], &tb.containers[1]);
    from.ping_command(to.ip, 10, &[]).output()?;
    let out = from
        .ns
        .command("ping")
        .args(["-n", "-c", "200", "-i", "0.01", &to.ip.to_string()])
        .output()?;
    // 64 bytes from 10.244.2.2: icmp_seq=1 ttl=62 time=0.045 ms
    let rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    if rtts.len() < 150 {
        bail!("ping: only {} of 200 replies", rtts.len());
    }
    Ok((median(&rtts), rtts.iter().sum::<f64>() / rtts.len() as f64))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Path names for `--path` (bare routing is always measured: the ratios need it).
pub const PATH_NAMES: [&str; 7] = [
    "bare",
    "ebpf-tc",
    "ebpf-xdp",
    "tun",
    "kernel-vxlan",
    "vxlan",
    "host-gw",
];

/// All paths (and the scale figures), or only bare routing and the `only` paths.
pub fn run(
    flanneld: &Path,
    underlays: &[Underlay],
    only: &[String],
    rounds: u32,
    seconds: u32,
) -> Result<()> {
    if only.is_empty() {
        run_paths(flanneld, underlays, &DataPath::ALL, rounds, seconds)?;
        return scale(flanneld);
    }
    let paths: Vec<DataPath> = DataPath::ALL
        .into_iter()
        .filter(|p| *p == DataPath::Bare || only.iter().any(|n| n == p.name()))
        .collect();
    run_paths(flanneld, underlays, &paths, rounds, seconds)
}

/// The demo's short comparison: bare, eBPF and TUN only, veth underlay.
pub fn run_short(flanneld: &Path, seconds: u32) -> Result<()> {
    run_paths(
        flanneld,
        &[Underlay::Veth],
        &[DataPath::Bare, DataPath::EbpfUdp, DataPath::TunUdp],
        1,
        seconds,
    )
}

fn run_paths(
    flanneld: &Path,
    underlays: &[Underlay],
    paths: &[DataPath],
    rounds: u32,
    seconds: u32,
) -> Result<()> {
    std::env::set_var("FLANNELD_BIN", flanneld);
    let mut samples: BTreeMap<(usize, DataPath), Sample> = BTreeMap::new();
    for round in 1..=rounds {
        for (u, &underlay) in underlays.iter().enumerate() {
            for &path in paths {
                eprintln!(
                    "round {round}/{rounds}: {} underlay, {}",
                    underlay.name(),
                    path.label()
                );
                let tb = testbed(path, underlay).with_context(|| {
                    format!("setting up {} ({})", path.label(), underlay.name())
                })?;
                let s = samples.entry((u, path)).or_default();
                s.one.push(iperf(&tb, 1, seconds)?);
                s.four.push(iperf(&tb, 4, seconds)?);
                let (p50, avg) = ping_ms(&tb)?;
                s.ping_p50.push(p50);
                s.ping_avg.push(avg);
            }
        }
    }
    for (u, &underlay) in underlays.iter().enumerate() {
        let of = |path| samples.get(&(u, path));
        print_table(underlay, rounds, seconds, &of)?;
    }
    Ok(())
}

/// One underlay's table and the data-plane targets measured against it.
fn print_table<'a>(
    underlay: Underlay,
    rounds: u32,
    seconds: u32,
    of: &dyn Fn(DataPath) -> Option<&'a Sample>,
) -> Result<()> {
    let bare = of(DataPath::Bare).context("no bare routing samples")?;
    let (bare1, bare4) = (median(&bare.one), median(&bare.four));
    let (bare_p50, bare_avg) = (median(&bare.ping_p50), median(&bare.ping_avg));
    if !(bare1 > 0.0 && bare4 > 0.0) {
        bail!("bare routing measured no throughput");
    }
    let what = match underlay {
        Underlay::Veth => "veth underlay (GSO super-packets cross whole: the best case)",
        Underlay::Nic => "nic underlay (switch port segments to MTU frames, eth0 runs GRO)",
    };
    println!(
        "\n== {what}\niperf3 TCP {seconds} s container to container, containers behind cni0 (CNI bridge), medians of {rounds} interleaved rounds; {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!(
        "| path | 1 stream Gbit/s | x bare | 4 streams Gbit/s | x bare | ping p50 / avg | over bare p50 / avg |"
    );
    println!("|---|---|---|---|---|---|---|");
    for path in DataPath::ALL {
        let Some(s) = of(path) else { continue };
        let (one, four) = (median(&s.one), median(&s.four));
        let (p50, avg) = (median(&s.ping_p50), median(&s.ping_avg));
        println!(
            "| {} | {one:.2} | {:.2} | {four:.2} | {:.2} | {p50:.3} / {avg:.3} ms | {:+.0} / {:+.0} us |",
            path.label(),
            one / bare1,
            four / bare4,
            (p50 - bare_p50) * 1000.0,
            (avg - bare_avg) * 1000.0
        );
    }
    // The decap `--udp-decap=auto` picks in this mode: TC where eth0 has GRO off (veth), XDP
    // where it has GRO on (nic).
    let (auto, auto_name) = match underlay {
        Underlay::Veth => (of(DataPath::EbpfUdp), "TC"),
        Underlay::Nic => (of(DataPath::EbpfUdpXdp), "XDP"),
    };
    let (Some(e), Some(t), Some(kv)) = (auto, of(DataPath::TunUdp), of(DataPath::KernelVxlan))
    else {
        return Ok(());
    };
    let want = match underlay {
        Underlay::Veth => 0.95,
        Underlay::Nic => 0.90,
    };
    println!(
        "\ntargets ({}, eBPF with {auto_name} decap as auto picks): eBPF >= {want:.2} x bare (1 stream): {:.2}; above kernel VXLAN (1 / 4 streams): {} / {}; eBPF ping overhead <= 20 us (p50 / avg): {:+.0} / {:+.0} us; TUN >= 0.15 x bare: {:.2}",
        underlay.name(),
        median(&e.one) / bare1,
        median(&e.one) > median(&kv.one),
        median(&e.four) > median(&kv.four),
        (median(&e.ping_p50) - bare_p50) * 1000.0,
        (median(&e.ping_avg) - bare_avg) * 1000.0,
        median(&t.one) / bare1
    );
    Ok(())
}

const SCALE_CONFIG: &str = r#"{"Network":"10.244.0.0/16","SubnetLen":26,"Backend":{"Type":"udp"}}"#;
const SCALE_LEASES: u32 = 1000;
const SCALE_PREFIX: &str = "/coreos.com/network/subnets/";

/// Key and value of fake peer `i` (a /26 in 10.244.0.0/16; public IPs in 198.51.100.0/24).
fn scale_lease(i: u32, generation: u32) -> (String, String) {
    let addr = u32::from(std::net::Ipv4Addr::new(10, 244, 0, 0)) + i * 64;
    let ip = std::net::Ipv4Addr::from(addr);
    let public = 1 + (i + generation) % 250;
    (
        format!("{SCALE_PREFIX}{ip}-26"),
        format!(r#"{{"PublicIP":"198.51.100.{public}","PublicIPv6":null}}"#),
    )
}

/// (subnet, public IP) pairs in a pinned peer map.
fn pinned_peers(pin_dir: &str) -> Result<Vec<(String, String)>> {
    let out = Command::new("bpftool")
        .args([
            "-j",
            "map",
            "dump",
            "pinned",
            &format!("{pin_dir}/flannel_peers"),
        ])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let quad = |x: &serde_json::Value| -> String {
        x.as_array()
            .map(|a| {
                a.iter()
                    .map(|b| b.to_string())
                    .collect::<Vec<_>>()
                    .join(".")
            })
            .unwrap_or_default()
    };
    let mut peers: Vec<(String, String)> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                quad(&e["formatted"]["key"]["subnet"]),
                quad(&e["formatted"]["value"]["public_ip"]),
            )
        })
        .collect();
    peers.sort();
    Ok(peers)
}

/// What etcd says the peers are, in the same form.
fn etcd_peers(cluster: &Cluster, own_ip: &str) -> Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = cluster
        .leases()?
        .into_iter()
        .filter_map(|kv| {
            let name = kv.key.strip_prefix(SCALE_PREFIX)?;
            let attrs: serde_json::Value = serde_json::from_str(&kv.value).ok()?;
            let public = attrs["PublicIP"].as_str()?.to_owned();
            (public != own_ip).then(|| (name.split('-').next().unwrap_or("").to_owned(), public))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Run `f(i)` for i in 0..n on `workers` threads.
fn parallel(n: u32, workers: u32, f: impl Fn(u32) -> Result<()> + Sync) -> Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let f = &f;
                s.spawn(move || (w..n).step_by(workers as usize).try_for_each(f))
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().map_err(|_| anyhow::anyhow!("worker panicked"))?)
    })
}

/// 1000 leases: agent start to fully programmed map, 100 changes/s sustained, resident memory.
pub fn scale(flanneld: &Path) -> Result<()> {
    std::env::set_var("FLANNELD_BIN", flanneld);
    println!("\n== scale: {SCALE_LEASES} leases in etcd, one agent (eBPF data plane)");
    let cluster = Cluster::new(1)?;
    cluster.set_config(SCALE_CONFIG)?;
    parallel(SCALE_LEASES, 8, |i| {
        let (k, v) = scale_lease(i + 1, 0);
        cluster.etcd.put(&k, &v)
    })?;
    let pin_dir = cluster.hosts[0].pin_dir();
    let start = std::time::Instant::now();
    let mut agent = cluster.start_agent(0, &["--udp-dataplane=ebpf"])?;
    flannel_tests::wait_for(Duration::from_secs(30), "1000 peers in the map", || {
        (pinned_peers(&pin_dir).ok()?.len() == SCALE_LEASES as usize).then_some(())
    })?;
    let programmed = start.elapsed();
    agent.wait_ready(Duration::from_secs(10))?;
    let own_ip = cluster.hosts[0].ip.to_string();

    // 100 changes per second for 10 s: each changes one lease's public IP or deletes it.
    let changes = 1000u32;
    let began = std::time::Instant::now();
    parallel(changes, 12, |n| {
        let due = Duration::from_millis(u64::from(n) * 10);
        if let Some(wait) = due.checked_sub(began.elapsed()) {
            std::thread::sleep(wait);
        }
        let i = 1 + (n * 7) % SCALE_LEASES;
        let (k, v) = scale_lease(i, n + 1);
        if n % 5 == 0 {
            cluster.etcd.del(&k)
        } else {
            cluster.etcd.put(&k, &v)
        }
    })?;
    let sent_in = began.elapsed();
    let rate = f64::from(changes) / sent_in.as_secs_f64();
    let caught_up = std::time::Instant::now();
    let want = etcd_peers(&cluster, &own_ip)?;
    flannel_tests::wait_for(
        Duration::from_secs(30),
        "map to equal etcd after the changes",
        || (pinned_peers(&pin_dir).ok()? == want).then_some(()),
    )?;
    let lag = caught_up.elapsed();
    let status = std::fs::read_to_string(format!(
        "/proc/{}/status",
        agent.pid().context("agent pid")?
    ))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    println!("| figure | measured | target |");
    println!("|---|---|---|");
    println!(
        "| agent start to {SCALE_LEASES} peers in the map | {:.0} ms | < 1000 ms |",
        programmed.as_secs_f64() * 1000.0
    );
    println!("| lease changes applied | {changes} at {rate:.0}/s, map equal to etcd {:.0} ms after the last | 100/s without falling behind |", lag.as_secs_f64() * 1000.0);
    println!(
        "| agent resident memory | {:.1} MB | < 50 MB |",
        rss_kb as f64 / 1024.0
    );
    agent.stop()?;
    Ok(())
}
