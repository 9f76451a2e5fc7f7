//! Command-line flags: upstream flanneld's names and defaults, each also settable as a
//! `FLANNELD_<NAME>` environment variable (dashes become underscores; the command line wins).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum};

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

/// How the eBPF udp data plane attaches its TC programs (see the README, "TCX or classic TC").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UdpAttach {
    /// TCX links where the kernel accepts one (Linux 6.6 and later), classic TC otherwise:
    /// found by trying, never by the kernel version; the agent logs which and why.
    Auto,
    /// TCX links only (the agent exits where the kernel refuses them).
    Tcx,
    /// Classic TC: a clsact qdisc and one direct-action cls_bpf filter per hook.
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

/// klog's `-vmodule` syntax: comma-separated `pattern=N`.
fn vmodule(s: &str) -> Result<String, String> {
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let ok = part
            .split_once('=')
            .is_some_and(|(pat, n)| !pat.is_empty() && n.parse::<i32>().is_ok());
        if !ok {
            return Err(format!(
                "{part:?}: expect comma-separated list of filename=N"
            ));
        }
    }
    Ok(s.to_owned())
}

/// klog's `-log_backtrace_at` syntax: `file.go:N` (or empty).
fn backtrace_at(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    match s.rsplit_once(':') {
        Some((file, line)) if !file.is_empty() && line.parse::<u32>().is_ok() => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: expect file.go:234")),
    }
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
    disable_help_subcommand = true,
    after_help = "Every flag can also be set as FLANNELD_<NAME> (dashes become underscores); the \
command line wins and a bad value in a variable is logged and ignored. A repeated flag takes its \
last value, except --iface and --iface-regex, which collect them all.\n\
EVENT_QUEUE_DEPTH (upstream's Kubernetes subnet manager) is accepted and ignored: this flanneld \
manages subnets in etcd only."
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
    /// eBPF udp data plane: attach the TC programs through TCX links, classic TC (clsact +
    /// cls_bpf), or auto (TCX where the kernel accepts it, else classic TC)
    #[arg(long, env = "FLANNELD_UDP_ATTACH", value_enum, default_value = "auto")]
    pub udp_attach: UdpAttach,
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

    /// add a blackhole route for our own subnet (re-checked every --iptables-resync)
    #[arg(long, env = "FLANNELD_IP_BLACKHOLE_ROUTE", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub ip_blackhole_route: bool,
    /// disable fully-random mode (--random-fully) for MASQUERADE
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", default_value = "false", num_args = 0..=1,
          require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub ip_masq_fully_random_disable: bool,

    /// log verbosity (klog style: 0 info, 1-3 debug, 4+ trace); RUST_LOG overrides
    #[arg(short = 'v', long = "v", env = "FLANNELD_V", default_value = "0")]
    pub verbosity: u8,
    /// klog's per-file verbosity (pattern=N,...): accepted for compatibility, no effect
    #[arg(long = "vmodule", env = "FLANNELD_VMODULE", default_value = "", value_parser = vmodule)]
    pub vmodule: String,
    /// klog's file:line to log a stack trace at: accepted for compatibility, no effect
    #[arg(long = "log_backtrace_at", env = "FLANNELD_LOG_BACKTRACE_AT", default_value = "", value_parser = backtrace_at)]
    pub log_backtrace_at: String,

    /// FLANNELD_* variables whose value was invalid, one line each (logged once logging is
    /// up; upstream logs them and keeps the default).
    #[arg(skip)]
    pub env_errors: Vec<String>,
}

impl Flags {
    /// Parse like Go's flag package: `-name` and `--name` both work, a repeated flag takes the
    /// last value (`--iface`/`--iface-regex` collect them), and `FLANNELD_*` variables fill in
    /// flags the command line does not set.
    pub fn parse_go_style<I: IntoIterator<Item = String>>(args: I) -> Result<Self, clap::Error> {
        Self::parse_go_style_env(args, |name| std::env::var(name).ok())
    }

    /// [`Flags::parse_go_style`] with the environment given as a lookup function.
    pub fn parse_go_style_env<I, E>(args: I, env: E) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = String>,
        E: Fn(&str) -> Option<String>,
    {
        let argv: Vec<String> = args.into_iter().enumerate().map(go_long_form).collect();
        // clap would read the variables itself and refuse a bad one; upstream logs it and
        // keeps the default, so the parser sees no env and gets valid ones as arguments.
        let parser = Flags::command()
            .args_override_self(true)
            .mut_args(|a| a.env(None));
        let on_cli = cli_names(&argv);
        let mut from_env = Vec::new();
        let mut env_errors = Vec::new();
        for arg in Flags::command().get_arguments() {
            let (Some(var), Some(long)) = (arg.get_env(), arg.get_long()) else {
                continue;
            };
            let var = var.to_string_lossy();
            if on_cli.iter().any(|n| {
                n == long
                    || arg
                        .get_short()
                        .is_some_and(|c| n.len() == 1 && n.starts_with(c))
            }) {
                continue;
            }
            let Some(value) = env(&var).filter(|v| !v.is_empty()) else {
                continue;
            };
            let as_arg = format!("--{long}={value}");
            match parser
                .clone()
                .try_get_matches_from(["flanneld".to_owned(), as_arg.clone()])
            {
                Ok(_) => from_env.push(as_arg),
                Err(e) => env_errors.push(format!(
                    "invalid value {value:?} for {var}: {}; using the default",
                    clap_reason(&e)
                )),
            }
        }
        let full = argv
            .iter()
            .take(1)
            .cloned()
            .chain(from_env)
            .chain(argv.iter().skip(1).cloned());
        let matches = match parser.try_get_matches_from(full) {
            Ok(m) => m,
            // --help from the full command, so that it lists the variables.
            Err(e) if e.kind() == ErrorKind::DisplayHelp => {
                return Err(Flags::command()
                    .try_get_matches_from(argv)
                    .err()
                    .unwrap_or(e))
            }
            Err(e) => return Err(e),
        };
        let mut flags = Flags::from_arg_matches(&matches)?;
        flags.env_errors = env_errors;
        Ok(flags)
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

/// `-name[=value]` with a name longer than one letter is Go's long form: make it `--name`.
fn go_long_form((i, a): (usize, String)) -> String {
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
}

/// Names of the flags given on the command line (`--name[=v]` as `name`, `-v[..]` as `v`).
fn cli_names(argv: &[String]) -> Vec<String> {
    argv.iter()
        .skip(1)
        .take_while(|a| a.as_str() != "--")
        .filter_map(|a| {
            if let Some(long) = a.strip_prefix("--") {
                Some(long.split('=').next().unwrap_or("").to_owned())
            } else {
                a.strip_prefix('-')
                    .and_then(|short| short.chars().next())
                    .map(String::from)
            }
        })
        .collect()
}

/// The reason in a clap value error, without its "error:" framing and usage lines.
fn clap_reason(e: &clap::Error) -> String {
    if let Some(src) = std::error::Error::source(e) {
        return src.to_string();
    }
    let rendered = e.to_string();
    let first = rendered.lines().next().unwrap_or("").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
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
            &["--udp-attach=netlink"],
            &["-vmodule=foo"],
            &["-log_backtrace_at=main.go"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    fn parse_env(args: &[&str], vars: &[(&str, &str)]) -> Result<Flags, clap::Error> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Flags::parse_go_style_env(
            std::iter::once("flanneld")
                .chain(args.iter().copied())
                .map(String::from),
            move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
        )
    }

    #[test]
    fn a_repeated_flag_takes_the_last_value_but_iface_collects() {
        let f = parse(&[
            "-etcd-endpoints=http://192.0.2.1:2379",
            "-etcd-endpoints=http://192.0.2.2:2379",
            "-ip-masq",
            "-ip-masq=false",
            "-v=2",
            "-v=4",
            "-iface=eth0",
            "-iface=eth1",
            "-iface-regex=^e",
            "-iface-regex=^w",
        ])
        .unwrap();
        assert_eq!(f.etcd_endpoints, "http://192.0.2.2:2379");
        assert!(!f.ip_masq);
        assert_eq!(f.verbosity, 4);
        assert_eq!(f.iface, vec!["eth0", "eth1"]);
        assert_eq!(f.iface_regex, vec!["^e", "^w"]);
    }

    #[test]
    fn klog_flags_are_accepted() {
        let f = parse(&["-vmodule=main=3,iface*=2", "-log_backtrace_at=main.go:120"]).unwrap();
        assert_eq!(f.vmodule, "main=3,iface*=2");
        assert_eq!(f.log_backtrace_at, "main.go:120");
        let f = parse_env(&[], &[("FLANNELD_VMODULE", "x=1")]).unwrap();
        assert_eq!(f.vmodule, "x=1");
    }

    #[test]
    fn new_upstream_flags() {
        let f = parse(&[]).unwrap();
        assert!(!f.ip_blackhole_route && !f.ip_masq_fully_random_disable);
        let f = parse(&["-ip-blackhole-route", "--ip-masq-fully-random-disable=true"]).unwrap();
        assert!(f.ip_blackhole_route && f.ip_masq_fully_random_disable);
    }

    #[test]
    fn udp_attach_defaults_to_auto_and_takes_the_variable() {
        assert_eq!(parse(&[]).unwrap().udp_attach, UdpAttach::Auto);
        assert_eq!(
            parse(&["--udp-attach=tc"]).unwrap().udp_attach,
            UdpAttach::Tc
        );
        let f = parse_env(&[], &[("FLANNELD_UDP_ATTACH", "tcx")]).unwrap();
        assert_eq!(f.udp_attach, UdpAttach::Tcx);
        let f = parse_env(&["--udp-attach=tc"], &[("FLANNELD_UDP_ATTACH", "tcx")]).unwrap();
        assert_eq!(f.udp_attach, UdpAttach::Tc);
    }

    #[test]
    fn env_fills_in_and_the_command_line_wins() {
        let f = parse_env(
            &["--etcd-prefix=/cli"],
            &[
                ("FLANNELD_ETCD_PREFIX", "/env"),
                ("FLANNELD_HEALTHZ_PORT", "8471"),
                ("FLANNELD_IP_MASQ", "true"),
                ("FLANNELD_IFACE", "eth9"),
                ("FLANNELD_V", "3"),
                ("FLANNELD_PUBLIC_IP", ""),
            ],
        )
        .unwrap();
        assert_eq!(f.etcd_prefix, "/cli");
        assert_eq!(f.healthz_port, 8471);
        assert!(f.ip_masq);
        assert_eq!(f.iface, vec!["eth9"]);
        assert_eq!(f.verbosity, 3);
        assert_eq!(f.public_ip, None);
        assert!(f.env_errors.is_empty(), "{:?}", f.env_errors);
        // The command line's --iface replaces the variable's, as upstream.
        let f = parse_env(&["-iface=eth0"], &[("FLANNELD_IFACE", "eth9")]).unwrap();
        assert_eq!(f.iface, vec!["eth0"]);
    }

    #[test]
    fn a_bad_variable_is_reported_by_name_and_the_default_kept() {
        let f = parse_env(
            &[],
            &[
                ("FLANNELD_HEALTHZ_PORT", "abc"),
                ("FLANNELD_IP_MASQ", "maybe"),
                ("FLANNELD_ETCD_PREFIX", "/ok"),
            ],
        )
        .unwrap();
        assert_eq!(f.healthz_port, 0);
        assert!(!f.ip_masq);
        assert_eq!(f.etcd_prefix, "/ok");
        assert_eq!(f.env_errors.len(), 2, "{:?}", f.env_errors);
        assert!(
            f.env_errors.iter().any(|l| l
                .starts_with("invalid value \"abc\" for FLANNELD_HEALTHZ_PORT: ")
                && !l.contains("--healthz-port")
                && !l.contains('\n')),
            "{:?}",
            f.env_errors
        );
        assert!(f.env_errors.iter().any(|l| l.contains("FLANNELD_IP_MASQ")));
        // Set on the command line, the variable is not looked at (upstream too).
        let f = parse_env(&["-healthz-port=8471"], &[("FLANNELD_HEALTHZ_PORT", "abc")]).unwrap();
        assert_eq!(f.healthz_port, 8471);
        assert!(f.env_errors.is_empty());
    }

    #[test]
    fn help_lists_the_variables_and_event_queue_depth() {
        let e = parse(&["--help"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::DisplayHelp);
        let text = e.to_string();
        assert!(text.contains("FLANNELD_HEALTHZ_PORT"), "{text}");
        assert!(text.contains("EVENT_QUEUE_DEPTH"), "{text}");
        assert!(text.contains("--ip-blackhole-route"), "{text}");
    }
}
