//! Whether traffic between pods on one bridge passes through iptables: only with `br_netfilter`
//! loaded and `net.bridge.bridge-nf-call-ip(6)tables` at 1. Without it such traffic is switched
//! by the bridge alone and no iptables rule sees it. Upstream (since v0.26) refuses to start in
//! iptables mode when the module is missing; we say once what breaks and how to fix it, and
//! show it in `/metrics` (`flannel_br_netfilter`).
//!
//! The sysctls are read in our own network namespace (they are per namespace on recent
//! kernels), at start only.

use std::io;
use std::path::Path;

/// One family's bridge netfilter switch and what we found there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeNetfilter {
    /// `ipv4` or `ipv6`, the `family` label of the metric.
    pub family: &'static str,
    /// The sysctl's name, e.g. `net.bridge.bridge-nf-call-iptables`.
    pub sysctl: &'static str,
    pub state: SysctlState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SysctlState {
    On,
    /// Present and 0: the module is loaded but someone switched it off.
    Off,
    /// No such file: `br_netfilter` is not loaded.
    Missing,
    /// Present but unreadable or not a number: the reason.
    Unreadable(String),
}

impl BridgeNetfilter {
    pub fn is_on(&self) -> bool {
        self.state == SysctlState::On
    }
}

const IPV4: (&str, &str) = ("ipv4", "net.bridge.bridge-nf-call-iptables");
const IPV6: (&str, &str) = ("ipv6", "net.bridge.bridge-nf-call-ip6tables");

/// `/proc/sys/` path of a dotted sysctl name.
fn proc_path(sysctl: &str) -> String {
    format!("/proc/sys/{}", sysctl.replace('.', "/"))
}

/// What the content of a sysctl file (or the error reading it) means.
pub fn state_of(read: io::Result<String>) -> SysctlState {
    match read {
        Err(e) if e.kind() == io::ErrorKind::NotFound => SysctlState::Missing,
        Err(e) => SysctlState::Unreadable(e.to_string()),
        Ok(text) => match text.trim().parse::<u32>() {
            Ok(0) => SysctlState::Off,
            Ok(_) => SysctlState::On,
            Err(_) => SysctlState::Unreadable(format!("unexpected content {:?}", text.trim())),
        },
    }
}

/// The switches the enabled families need, read under `proc_root` (`/` in production).
pub fn check_under(proc_root: &Path, enable_ipv4: bool, enable_ipv6: bool) -> Vec<BridgeNetfilter> {
    [(enable_ipv4, IPV4), (enable_ipv6, IPV6)]
        .into_iter()
        .filter(|(enabled, _)| *enabled)
        .map(|(_, (family, sysctl))| {
            let path = proc_root.join(proc_path(sysctl).trim_start_matches('/'));
            BridgeNetfilter {
                family,
                sysctl,
                state: state_of(std::fs::read_to_string(path)),
            }
        })
        .collect()
}

/// The switches the enabled families need, in our network namespace.
pub fn check(enable_ipv4: bool, enable_ipv6: bool) -> Vec<BridgeNetfilter> {
    check_under(Path::new("/"), enable_ipv4, enable_ipv6)
}

/// The one warning line for `checks`, if any switch is not on: what was found, what it breaks
/// and the fix.
pub fn warning(checks: &[BridgeNetfilter]) -> Option<String> {
    let off: Vec<&BridgeNetfilter> = checks.iter().filter(|c| !c.is_on()).collect();
    if off.is_empty() {
        return None;
    }
    let found: Vec<String> = off
        .iter()
        .map(|c| match &c.state {
            SysctlState::Missing => {
                format!("{} is missing (module not loaded)", proc_path(c.sysctl))
            }
            SysctlState::Off => format!("{} is 0", c.sysctl),
            SysctlState::Unreadable(why) => {
                format!("{} cannot be read: {why}", proc_path(c.sysctl))
            }
            SysctlState::On => String::new(),
        })
        .collect();
    let tables = if off.iter().any(|c| c.family == IPV6.0) && off.iter().any(|c| c.family == IPV4.0)
    {
        "iptables and ip6tables"
    } else if off.iter().any(|c| c.family == IPV6.0) {
        "ip6tables"
    } else {
        "iptables"
    };
    let fix: Vec<String> = off.iter().map(|c| format!("{}=1", c.sysctl)).collect();
    Some(format!(
        "br_netfilter is not active: {}; traffic between pods on the same bridge (cni0) bypasses {tables}, so NetworkPolicy and the masquerading and kube-proxy service rules do not apply to pods talking to pods on this node; fix: modprobe br_netfilter && sysctl {} (and load it at boot)",
        found.join(", "),
        fix.join(" ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_found() -> io::Result<String> {
        Err(io::Error::from(io::ErrorKind::NotFound))
    }

    #[test]
    fn the_sysctl_file_says_on_off_or_missing() {
        assert_eq!(state_of(Ok("1\n".into())), SysctlState::On);
        assert_eq!(state_of(Ok("0\n".into())), SysctlState::Off);
        assert_eq!(state_of(not_found()), SysctlState::Missing);
        assert!(matches!(
            state_of(Err(io::Error::from(io::ErrorKind::PermissionDenied))),
            SysctlState::Unreadable(_)
        ));
        assert!(matches!(
            state_of(Ok("yes".into())),
            SysctlState::Unreadable(_)
        ));
    }

    fn check(family: (&'static str, &'static str), state: SysctlState) -> BridgeNetfilter {
        BridgeNetfilter {
            family: family.0,
            sysctl: family.1,
            state,
        }
    }

    #[test]
    fn all_on_is_no_warning() {
        assert_eq!(warning(&[]), None);
        assert_eq!(
            warning(&[check(IPV4, SysctlState::On), check(IPV6, SysctlState::On)]),
            None
        );
    }

    #[test]
    fn a_missing_module_is_one_line_with_what_breaks_and_the_fix() {
        let line = warning(&[check(IPV4, SysctlState::Missing)]).unwrap_or_default();
        assert_eq!(
            line,
            "br_netfilter is not active: /proc/sys/net/bridge/bridge-nf-call-iptables is missing (module not loaded); traffic between pods on the same bridge (cni0) bypasses iptables, so NetworkPolicy and the masquerading and kube-proxy service rules do not apply to pods talking to pods on this node; fix: modprobe br_netfilter && sysctl net.bridge.bridge-nf-call-iptables=1 (and load it at boot)"
        );
    }

    #[test]
    fn only_the_switches_that_are_off_are_named() {
        let line = warning(&[check(IPV4, SysctlState::On), check(IPV6, SysctlState::Off)])
            .unwrap_or_default();
        assert!(
            line.contains("net.bridge.bridge-nf-call-ip6tables is 0;"),
            "{line}"
        );
        assert!(line.contains("bypasses ip6tables,"), "{line}");
        assert!(
            line.ends_with("sysctl net.bridge.bridge-nf-call-ip6tables=1 (and load it at boot)"),
            "{line}"
        );
        assert!(!line.contains("call-iptables"), "{line}");
        let both = warning(&[
            check(IPV4, SysctlState::Off),
            check(IPV6, SysctlState::Missing),
        ])
        .unwrap_or_default();
        assert!(both.contains("bypasses iptables and ip6tables,"), "{both}");
        assert!(
            both.contains(
                "sysctl net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1"
            ),
            "{both}"
        );
        assert_eq!(both.lines().count(), 1);
    }

    #[test]
    fn only_enabled_families_are_read() {
        let dir = std::env::temp_dir().join(format!("fl-brnf-{}", std::process::id()));
        let bridge = dir.join("proc/sys/net/bridge");
        std::fs::create_dir_all(&bridge).expect("temp dir");
        std::fs::write(bridge.join("bridge-nf-call-iptables"), "0\n").expect("temp file");
        let root = dir.clone();
        let v4 = check_under(&root, true, false);
        assert_eq!(v4, vec![check(IPV4, SysctlState::Off)]);
        let v6 = check_under(&root, false, true);
        assert_eq!(v6, vec![check(IPV6, SysctlState::Missing)]);
        assert_eq!(check_under(&root, true, true).len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
