//! `flanneld dataplane`: the pinned eBPF data plane as a table (configuration, hooks, peers,
//! summed counters), for hosts without bpftool. Reads the pins and the devices' hooks (TCX
//! and classic TC) only; works with or without a running agent.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::maps::{Array, HashMap, Map, MapData};
use aya::programs::{tc::TcAttachType, SchedClassifier};
use flannel_agent::backend::udp::ebpf::{
    read_pinned_stats, tc_filters, TcFilter, DEFAULT_PIN_DIR, TCX_LINKS,
};
use flannel_agent::backend::udp::pin_lock::NETNS_MARKER;
use flannel_common::{
    map_names, prog_names, Config, Counter, PeerKey, PeerValue, Stats, PATH_ADJ_ROOM_DECAP_L4_UDP,
    PATH_ATTACH_TC, PATH_DECAP_XDP,
};

/// The udp backend's overlay device (upstream's name, fixed).
const OVERLAY_DEVICE: &str = "flannel0";

#[derive(Debug, clap::Parser)]
#[command(
    name = "flanneld dataplane",
    bin_name = "flanneld dataplane",
    about = "Show the pinned eBPF data plane: configuration, peers and counters"
)]
pub struct DataplaneArgs {
    /// bpffs directory where the eBPF maps, programs and links are pinned
    #[arg(long, env = "FLANNELD_BPF_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub bpf_pin_dir: PathBuf,
}

fn open_pinned(pin_dir: &Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is the eBPF data plane installed with this --bpf-pin-dir?)",
            path.display()
        )
    })
}

/// The report, and why this is not the pinning agent's network namespace (`None`: it is).
pub struct Report {
    pub text: String,
    pub wrong_namespace: Option<String>,
}

/// The report as text.
pub fn render(pin_dir: &Path) -> anyhow::Result<Report> {
    let config: Array<MapData, Config> =
        Array::try_from(Map::Array(open_pinned(pin_dir, map_names::CONFIG)?))?;
    let config = config.get(&0, 0).context("reading the config map")?;
    let subnet_len = u32::from_be_bytes(config.subnet_mask).count_ones() as u8;
    let network_len = u32::from_be_bytes(config.network_mask).count_ones();

    let peers: HashMap<MapData, PeerKey, PeerValue> =
        HashMap::try_from(Map::HashMap(open_pinned(pin_dir, map_names::PEERS)?))?;
    let mut rows = Vec::new();
    for entry in peers.iter() {
        let (key, value) = entry.context("reading the peer map")?;
        rows.push((Ipv4Addr::from(key.subnet), Ipv4Addr::from(value.public_ip)));
    }
    rows.sort();
    let stats = read_pinned_stats(pin_dir)?;

    let mut out = String::new();
    writeln!(out, "eBPF udp data plane pinned in {}", pin_dir.display())?;
    writeln!(
        out,
        "public IP {}, port {}, network {}/{}, subnets /{}, {}",
        Ipv4Addr::from(config.public_ip),
        config.port,
        Ipv4Addr::from(config.network),
        network_len,
        subnet_len,
        if config.ready != 0 {
            "configured"
        } else {
            "NOT configured"
        }
    )?;
    writeln!(out, "{}", paths_line(&config))?;
    writeln!(out)?;
    writeln!(out, "{:<30} PROGRAMS", "HOOK")?;
    let wrong_namespace = foreign_namespace(pin_dir, config.decap_ifindex);
    match &wrong_namespace {
        // Interface indexes are per namespace: here they name other devices (or none).
        Some(why) => {
            writeln!(
                out,
                "(not shown: {why}, so these pins belong to an agent in another network namespace; run `nsenter --net=/proc/<flanneld pid>/ns/net flanneld dataplane` there)"
            )?;
        }
        None => {
            // TCX links pinned: the programs hang on TCX, else on classic TC (cls_bpf).
            let tcx_pinned = TCX_LINKS.iter().any(|l| pin_dir.join(l).exists());
            for (ifindex, attach) in [
                (config.decap_ifindex, TcAttachType::Egress),
                (config.decap_ifindex, TcAttachType::Ingress),
                (config.ext_ifindex, TcAttachType::Ingress),
            ] {
                for (hook, programs) in hook_lines(ifindex, attach, tcx_pinned) {
                    writeln!(out, "{hook:<30} {programs}")?;
                }
            }
            let xdp = flannel_agent::backend::udp::ebpf::xdp_decap_ifindex(pin_dir);
            let device = interface_name(config.ext_ifindex)
                .unwrap_or_else(|| format!("ifindex {}", config.ext_ifindex));
            let what = match xdp {
                Some(i) if i == config.ext_ifindex => format!("1: {}", prog_names::DECAP_XDP),
                Some(_) => "(pinned XDP link detached or on another device)".into(),
                None => "0 (decap on TC)".into(),
            };
            writeln!(out, "{:<30} {what}", format!("xdp of {device}"))?;
        }
    }
    writeln!(out)?;
    writeln!(out, "{:<20} PUBLIC IP", "PEER SUBNET")?;
    for (subnet, ip) in &rows {
        writeln!(out, "{:<20} {ip}", format!("{subnet}/{subnet_len}"))?;
    }
    writeln!(out, "({} peers)", rows.len())?;
    writeln!(out)?;
    writeln!(out, "{:<20} {:>20}", "COUNTER", "VALUE")?;
    for (name, value) in counters(&stats) {
        writeln!(out, "{name:<20} {value:>20}")?;
    }
    Ok(Report {
        text: out,
        wrong_namespace,
    })
}

/// The paths the agent chose after probing the kernel (`Config::paths`), as
/// `flannel_dataplane_info` labels them.
fn paths_line(config: &Config) -> String {
    let attach = if config.paths & PATH_ATTACH_TC != 0 {
        "tc (clsact cls_bpf)"
    } else {
        "tcx"
    };
    let decap = if config.paths & PATH_DECAP_XDP != 0 {
        format!("xdp (marked {})", mac(config.xdp_mark))
    } else {
        "tc".to_owned()
    };
    let l4 = if config.paths & PATH_ADJ_ROOM_DECAP_L4_UDP != 0 {
        "yes"
    } else {
        "no"
    };
    format!("paths: attach {attach}, decap {decap}; kernel takes BPF_F_ADJ_ROOM_DECAP_L4_UDP: {l4}")
}

fn mac(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// Why this is not the namespace of the agent that pinned the data plane (`None`: it is).
/// The agent records its namespace in the pin dir; pins from before that are judged by the
/// overlay device, which the agent always names flannel0.
fn foreign_namespace(pin_dir: &Path, overlay_ifindex: u32) -> Option<String> {
    let theirs = std::fs::read_link(pin_dir.join(NETNS_MARKER)).ok();
    let ours = std::fs::read_link("/proc/thread-self/ns/net").ok();
    if let (Some(theirs), Some(ours)) = (theirs, ours) {
        return (theirs != ours).then(|| {
            format!(
                "pinned from network namespace {}, this is {}",
                theirs.display(),
                ours.display()
            )
        });
    }
    match interface_name(overlay_ifindex) {
        Some(name) if name == OVERLAY_DEVICE => None,
        Some(name) => Some(format!(
            "ifindex {overlay_ifindex} is {name} here, not {OVERLAY_DEVICE}"
        )),
        None => Some(format!(
            "no device has ifindex {overlay_ifindex} ({OVERLAY_DEVICE}) here"
        )),
    }
}

fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The lines of one hook: "tcx ingress of eth0" or "tc ingress of eth0" as the data plane is
/// attached, and the other mode's line as well where one of ours sits there too (a restart
/// that switched modes should have removed it).
fn hook_lines(ifindex: u32, attach: TcAttachType, tcx_pinned: bool) -> Vec<(String, String)> {
    let what = match attach {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    };
    let Some(name) = interface_name(ifindex) else {
        let mode = if tcx_pinned { "tcx" } else { "tc" };
        return vec![(
            format!("{mode} {what} of ifindex {ifindex}"),
            "(device not in this network namespace)".into(),
        )];
    };
    let tcx = tcx_programs(&name, attach);
    let classic = tc_filters(ifindex, attach);
    let mut lines = Vec::new();
    let tcx_has_ours = tcx.as_ref().is_ok_and(|p| p.iter().any(|n| is_ours(n)));
    if tcx_pinned || tcx_has_ours {
        let programs = match tcx {
            Ok(names) => format!("{}: {}", names.len(), names.join(", ")),
            Err(e) => format!("(query failed: {e})"),
        };
        lines.push((format!("tcx {what} of {name}"), programs));
    }
    let classic_has_ours = classic
        .as_ref()
        .is_ok_and(|f| f.iter().any(TcFilter::is_ours));
    if !tcx_pinned || classic_has_ours {
        let filters = match classic {
            Ok(filters) => {
                let described: Vec<String> = filters.iter().map(TcFilter::describe).collect();
                format!("{}: {}", filters.len(), described.join(", "))
            }
            Err(e) => format!("(listing failed: {e})"),
        };
        lines.push((format!("tc {what} of {name}"), filters));
    }
    lines
}

/// Whether `kernel_name` is one of our TC programs (the kernel keeps 15 bytes of a name).
fn is_ours(kernel_name: &str) -> bool {
    [prog_names::ENCAP, prog_names::DECAP, prog_names::OVERLAY_IN]
        .iter()
        .any(|p| p.get(..15).unwrap_or(p) == kernel_name)
}

/// The programs attached to a TCX hook, in order: more than one of ours would mean a restart
/// attached instead of replacing.
fn tcx_programs(ifname: &str, attach: TcAttachType) -> Result<Vec<String>, String> {
    let (_, progs) = SchedClassifier::query_tcx(ifname, attach).map_err(|e| e.to_string())?;
    Ok(progs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
        .collect())
}

fn counters(s: &Stats) -> impl Iterator<Item = (&'static str, u64)> + '_ {
    Counter::ALL.into_iter().map(|c| (c.name(), s.get(c)))
}
