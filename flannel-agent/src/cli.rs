//! Command-line flags: upstream flanneld's names and defaults, each also settable as a
//! `FLANNELD_<NAME>` environment variable (dashes become underscores; the command line wins).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

/// Which udp data plane to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UdpDataplaneKind {
    /// eBPF, falling back to TUN when the programs cannot load.
    Auto,
    Ebpf,
    Tun,
}

/// Where the eBPF udp data plane decapsulates (see the README, "XDP or TC decap").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UdpDecap {
    /// Native XDP where it helps (the external device supports it and aggregates with GRO),
    /// TC otherwise; the agent logs which and why.
    Auto,
    /// Native XDP on the external device (fails if the driver has none).
    Xdp,
    /// TC ingress of the external device.
    Tc,
}

/// Go's strconv.ParseBool, which upstream uses for flags and FLANNELD_* variables alike.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean {s:?} (use true or false)")),
    }
}

fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("duration {s:?} is below one second"));
    }
    Ok(d)
}

fn renew_margin(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(m) if (1..=1439).contains(&m) => Ok(m),
        _ => Err(format!(
            "{s:?} is not a whole number of minutes from 1 to 1439"
        )),
    }
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "flanneld",
    version,
    about = "flanneld: overlay network agent (Rust, eBPF data plane)",
    disable_help_subcommand = true
)]
pub struct Flags {
    /// a comma-delimited list of etcd endpoints
    #[arg(
        long,
        env = "FLANNELD_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: String,
    /// etcd prefix
    #[arg(
        long,
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,
    /// SSL key file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_KEYFILE", default_value = "")]
    pub etcd_keyfile: String,
    /// SSL certification file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CERTFILE", default_value = "")]
    pub etcd_certfile: String,
    /// SSL Certificate Authority file used to secure etcd communication
    #[arg(long, env = "FLANNELD_ETCD_CAFILE", default_value = "")]
    pub etcd_cafile: String,
    /// username for BasicAuth to etcd
    #[arg(long, env = "FLANNELD_ETCD_USERNAME", default_value = "")]
    pub etcd_username: String,
    /// password for BasicAuth to etcd
    #[arg(
        long,
        env = "FLANNELD_ETCD_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub etcd_password: String,

    /// interface to use (IP or name) for inter-host communication; repeatable, first match wins
    #[arg(long, env = "FLANNELD_IFACE", action = ArgAction::Append)]
    pub iface: Vec<String>,
    /// regex matching the interface to use (name or IP); repeatable, checked after --iface
    #[arg(long, env = "FLANNELD_IFACE_REGEX", action = ArgAction::Append)]
    pub iface_regex: Vec<String>,
    /// use the interface of the route to this IP
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<IpAddr>,
    /// IP accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<IpAddr>,
    /// IPv6 accessible by other nodes for inter-host communication
    #[arg(long, env = "FLANNELD_PUBLIC_IPV6")]
    pub public_ipv6: Option<IpAddr>,

    /// filename where env variables (subnet, MTU, ...) will be written to
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// subnet lease renewal margin, in minutes, ranging from 1 to 1439
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN", default_value = "60", value_parser = renew_margin)]
    pub subnet_lease_renew_margin: u32,
    /// TTL of the subnet lease in etcd (e.g. 24h, 30s)
    #[arg(long, env = "FLANNELD_SUBNET_LEASE_TTL", default_value = "24h", value_parser = duration)]
    pub subnet_lease_ttl: Duration,

    /// setup IP masquerade rule for traffic destined outside of overlay network
    #[arg(long, env = "FLANNELD_IP_MASQ", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub ip_masq: bool,
    /// resync period for iptables rules, in seconds
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value = "5", value_parser = clap::value_parser!(u64).range(1..))]
    pub iptables_resync: u64,
    /// add default accept rules to FORWARD chain in iptables
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", default_value = "true", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub iptables_forward_rules: bool,

    /// the IP address for healthz server to listen
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// the port for healthz server to listen (0 to disable)
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value = "0")]
    pub healthz_port: u16,

    /// udp backend data plane: eBPF in the kernel, TUN in user space, or auto (eBPF, else TUN)
    #[arg(
        long,
        env = "FLANNELD_UDP_DATAPLANE",
        value_enum,
        default_value = "auto"
    )]
    pub udp_dataplane: UdpDataplaneKind,
    /// eBPF udp data plane: decapsulate with native XDP, TC, or auto (XDP where the external
    /// device supports it and has GRO on, else TC)
    #[arg(long, env = "FLANNELD_UDP_DECAP", value_enum, default_value = "auto")]
    pub udp_decap: UdpDecap,
    /// bpffs directory where the eBPF maps, programs and links are pinned
    #[arg(
        long,
        env = "FLANNELD_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/flannel"
    )]
    pub bpf_pin_dir: PathBuf,

    /// contact the Kubernetes API for subnet assignment instead of etcd (not supported)
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub kube_subnet_mgr: bool,
    /// Kubernetes API server URL (only with --kube-subnet-mgr, not supported)
    #[arg(long, env = "FLANNELD_KUBE_API_URL", default_value = "")]
    pub kube_api_url: String,
    /// Kubernetes annotation prefix (only with --kube-subnet-mgr, not supported)
    #[arg(
        long,
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,
    /// kubeconfig file location (only with --kube-subnet-mgr, not supported)
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE", default_value = "")]
    pub kubeconfig_file: String,
    /// path to the network configuration file (only with --kube-subnet-mgr, not supported)
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: String,
    /// set NodeNetworkUnavailable after ready (only with --kube-subnet-mgr, not supported)
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", default_value = "true", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub set_node_network_unavailable: bool,
    /// use MultiClusterCIDR for ipam (only with --kube-subnet-mgr, not supported)
    #[arg(long, env = "FLANNELD_USE_MULTI_CLUSTER_CIDR", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub use_multi_cluster_cidr: bool,

    /// log verbosity (klog style: 0 info, 1-3 debug, 4+ trace); RUST_LOG overrides
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value = "0")]
    pub verbosity: u8,
}

impl Flags {
    /// Parse like Go's flag package: `-name` and `--name` both work.
    pub fn parse_go_style<I: IntoIterator<Item = String>>(args: I) -> Result<Self, clap::Error> {
        Flags::try_parse_from(args.into_iter().enumerate().map(|(i, a)| {
            // `-name[=value]` with a name longer than one letter is Go's long form.
            let name_len = a
                .strip_prefix('-')
                .filter(|rest| !rest.starts_with('-'))
                .map(|rest| rest.split('=').next().unwrap_or("").len())
                .unwrap_or(0);
            if i > 0 && name_len > 1 {
                format!("-{a}")
            } else {
                a
            }
        }))
    }

    pub fn etcd_endpoint_list(&self) -> Vec<String> {
        self.etcd_endpoints
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        Flags::parse_go_style(
            std::iter::once("flanneld")
                .chain(args.iter().copied())
                .map(String::from),
        )
    }

    #[test]
    fn defaults_are_upstreams() {
        let f = parse(&[]).unwrap();
        assert_eq!(
            f.etcd_endpoints,
            "http://127.0.0.1:4001,http://127.0.0.1:2379"
        );
        assert_eq!(f.etcd_prefix, "/coreos.com/network");
        assert_eq!(f.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(f.subnet_lease_renew_margin, 60);
        assert!(!f.ip_masq);
        assert_eq!(f.iptables_resync, 5);
        assert!(f.iptables_forward_rules);
        assert_eq!(f.healthz_port, 0);
        assert_eq!(f.subnet_lease_ttl, Duration::from_secs(24 * 3600));
    }

    #[test]
    fn go_style_flags_and_bools() {
        let f = parse(&[
            "-iface",
            "eth0",
            "--iface=192.0.2.1",
            "-ip-masq",
            "--iptables-forward-rules=false",
            "-v=3",
        ])
        .unwrap();
        assert_eq!(f.iface, vec!["eth0", "192.0.2.1"]);
        assert!(f.ip_masq);
        assert!(!f.iptables_forward_rules);
        assert_eq!(f.verbosity, 3);
        let f = parse(&["--ip-masq=F", "--subnet-lease-ttl=5s"]).unwrap();
        assert!(!f.ip_masq);
        assert_eq!(f.subnet_lease_ttl, Duration::from_secs(5));
    }

    #[test]
    fn bad_flags_are_errors() {
        for bad in [
            &["--subnet-lease-renew-margin=0"][..],
            &["--subnet-lease-renew-margin=1440"],
            &["--healthz-port=70000"],
            &["--ip-masq=maybe"],
            &["--public-ip=1.2.3"],
            &["--no-such-flag"],
            &["--subnet-lease-ttl=soon"],
            &["--udp-dataplane=gpu"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
