//! Upstream's iptables rules: `FLANNEL-FWD` (filter, from FORWARD) accepting overlay traffic,
//! and with `--ip-masq` `FLANNEL-POSTRTG` (nat, from POSTROUTING) masquerading traffic that
//! leaves the overlay. Installed before readiness and re-checked every `--iptables-resync`.
//!
//! Driven through the `iptables` command (`-w`), so iptables-legacy and iptables-nft both work.

use std::fmt;
use std::process::Output;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tokio::process::Command;
use tokio::sync::watch;

use crate::subnet_env::PreviousSubnetEnv;

pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";
pub const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
const FORWARD_COMMENT: &str = "flanneld forward";
const MASQ_COMMENT: &str = "flanneld masq";
/// kube-proxy marks packets it will masquerade itself; masquerading twice breaks some kernels.
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running iptables: {0} (install the iptables package, or pass --iptables-forward-rules=false and no --ip-masq)")]
    Spawn(std::io::Error),
    #[error("{bin} {args}: {stderr}")]
    Failed {
        bin: &'static str,
        args: String,
        stderr: String,
    },
}

/// Where a rule goes in its chain: `-I` (first) or `-A` (last).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Insert,
    Append,
}

/// One rule as upstream writes it: table, position, chain, rule spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub position: Position,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

impl Rule {
    fn new(table: &'static str, position: Position, chain: &'static str, spec: &[&str]) -> Self {
        Rule {
            table,
            position,
            chain,
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The chain of ours this rule needs: the one it is in or jumps to.
    fn own_chain(&self) -> &'static str {
        if self.chain == FORWARD_CHAIN
            || self.spec.last().map(String::as_str) == Some(FORWARD_CHAIN)
        {
            FORWARD_CHAIN
        } else {
            MASQ_CHAIN
        }
    }
}

impl fmt::Display for Rule {
    /// As `iptables-save` prints it (without quoting).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "-t {} -A {} {}",
            self.table,
            self.chain,
            self.spec.join(" ")
        )
    }
}

/// Upstream's forward rules for `network`.
pub fn forward_rules(network: Ipv4Network) -> Vec<Rule> {
    forward_rules_for(&network.to_string())
}

/// Upstream's ip6tables forward rules for IPv6Network (the same rules).
pub fn forward_rules_v6(network: ipnetwork::Ipv6Network) -> Vec<Rule> {
    forward_rules_for(&network.to_string())
}

fn forward_rules_for(n: &str) -> Vec<Rule> {
    let n = n.to_owned();
    let c = FORWARD_COMMENT;
    vec![
        Rule::new(
            "filter",
            Position::Insert,
            "FORWARD",
            &["-m", "comment", "--comment", c, "-j", FORWARD_CHAIN],
        ),
        Rule::new(
            "filter",
            Position::Append,
            FORWARD_CHAIN,
            &["-s", &n, "-m", "comment", "--comment", c, "-j", "ACCEPT"],
        ),
        Rule::new(
            "filter",
            Position::Append,
            FORWARD_CHAIN,
            &["-d", &n, "-m", "comment", "--comment", c, "-j", "ACCEPT"],
        ),
    ]
}

/// Upstream's masquerade rules for `network` and our `subnet`, in upstream's order.
pub fn masq_rules(network: Ipv4Network, subnet: Ipv4Network, random_fully: bool) -> Vec<Rule> {
    let (n, sn) = (network.to_string(), subnet.to_string());
    masq_chain(
        random_fully,
        &[
            (&["-s", &n, "-d", &n], Masq::Return),
            (&["-s", &n, "!", "-d", "224.0.0.0/4"], Masq::Masquerade),
            (&["!", "-s", &n, "-d", &sn], Masq::Return),
            (&["!", "-s", &n, "-d", &n], Masq::Masquerade),
        ],
    )
}

/// Upstream's ip6tables masquerade rules (its masqIP6Rules, in order): RETURN for traffic
/// between our IPv6 subnet and the IPv6Network both ways and for outside traffic to our
/// subnet, MASQUERADE for the rest leaving the overlay (but multicast ff00::/8).
pub fn masq_rules_v6(
    network: ipnetwork::Ipv6Network,
    subnet: ipnetwork::Ipv6Network,
    random_fully: bool,
) -> Vec<Rule> {
    let (n, sn) = (network.to_string(), subnet.to_string());
    masq_chain(
        random_fully,
        &[
            (&["-s", &sn, "-d", &n], Masq::Return),
            (&["-s", &n, "-d", &sn], Masq::Return),
            (&["!", "-s", &n, "-d", &sn], Masq::Return),
            (&["-s", &n, "!", "-d", "ff00::/8"], Masq::Masquerade),
            (&["!", "-s", &n, "-d", &n], Masq::Masquerade),
        ],
    )
}

/// Install and keep the ip6tables rules for a dual-stack node (IPv6Network, our IPv6 subnet).
pub async fn install_and_keep_v6(
    opts: RuleOptions,
    network: ipnetwork::Ipv6Network,
    subnet: ipnetwork::Ipv6Network,
) -> Result<(), IptablesError> {
    if !opts.ip_masq && !opts.forward {
        return Ok(());
    }
    let random_fully = random_fully(IP6TABLES, &opts).await?;
    let want = move |subnet| {
        rules_for_flags(
            &opts,
            || forward_rules_v6(network),
            || masq_rules_v6(network, subnet, random_fully),
        )
    };
    let set = RuleSet::with_command(IP6TABLES, want(subnet));
    set.ensure().await?;
    log::info!("ip6tables: {} rules in place", set.rules().len());
    // Our IPv6 subnet does not change while we run: a closed channel, never followed.
    let (_, fixed) = watch::channel(subnet);
    tokio::spawn(set.keep(opts.resync.max(Duration::from_secs(1)), fixed, want));
    Ok(())
}

/// What a rule of our masquerade chain does with the packets it matches.
#[derive(Debug, Clone, Copy)]
enum Masq {
    Return,
    Masquerade,
}

/// Either family's masquerade rules: POSTROUTING's jump into our chain (inserted: ahead of
/// other NAT rules), RETURN for what kube-proxy marked, then `rules` (match, action) in order.
fn masq_chain(random_fully: bool, rules: &[(&[&str], Masq)]) -> Vec<Rule> {
    let c = MASQ_COMMENT;
    let masquerade: &[&str] = if random_fully {
        &["-j", "MASQUERADE", "--random-fully"]
    } else {
        &["-j", "MASQUERADE"]
    };
    let marked: (&[&str], Masq) = (&["-m", "mark", "--mark", KUBE_PROXY_MARK], Masq::Return);
    let chain_rules = std::iter::once(&marked).chain(rules).map(|(head, action)| {
        let tail = match action {
            Masq::Return => &["-j", "RETURN"][..],
            Masq::Masquerade => masquerade,
        };
        Rule {
            table: "nat",
            position: Position::Append,
            chain: MASQ_CHAIN,
            spec: head
                .iter()
                .chain(["-m", "comment", "--comment", c].iter())
                .chain(tail)
                .map(|s| s.to_string())
                .collect(),
        }
    });
    let jump = Rule::new(
        "nat",
        Position::Insert,
        "POSTROUTING",
        &["-m", "comment", "--comment", c, "-j", MASQ_CHAIN],
    );
    std::iter::once(jump).chain(chain_rules).collect()
}

/// `--random-fully` exists since iptables 1.6.2.
pub fn version_supports_random_fully(version_output: &str) -> bool {
    let Some(v) = version_output
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
    else {
        return false;
    };
    let nums: Vec<u32> = v.split('.').map_while(|p| p.parse().ok()).collect();
    match nums.as_slice() {
        [major, minor, patch, ..] => (*major, *minor, *patch) >= (1, 6, 2),
        [major, minor] => (*major, *minor) > (1, 6),
        _ => false,
    }
}

/// `iptables` for IPv4 rules, `ip6tables` for IPv6 ones.
pub const IPTABLES: &str = "iptables";
pub const IP6TABLES: &str = "ip6tables";

async fn iptables(bin: &'static str, args: &[&str]) -> Result<Output, IptablesError> {
    Command::new(bin)
        .args(args)
        .output()
        .await
        .map_err(IptablesError::Spawn)
}

/// Run `iptables -w <args>`, failing with its stderr.
async fn run(bin: &'static str, args: &[&str]) -> Result<(), IptablesError> {
    let mut full = vec!["-w"];
    full.extend_from_slice(args);
    let out = iptables(bin, &full).await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IptablesError::Failed {
            bin,
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

async fn chain_exists(bin: &'static str, table: &str, chain: &str) -> Result<bool, IptablesError> {
    Ok(run(bin, &["-t", table, "-S", chain]).await.is_ok())
}

async fn rule_exists(bin: &'static str, rule: &Rule) -> Result<bool, IptablesError> {
    let mut args = vec!["-t", rule.table, "-C", rule.chain];
    args.extend(rule.spec.iter().map(String::as_str));
    Ok(run(bin, &args).await.is_ok())
}

/// Delete every copy of `rule` (it may have been added more than once).
async fn delete_rule(bin: &'static str, table: &str, chain: &str, spec: &[String]) {
    let mut args = vec!["-t", table, "-D", chain];
    args.extend(spec.iter().map(String::as_str));
    for _ in 0..64 {
        if run(bin, &args).await.is_err() {
            break;
        }
    }
}

/// The rules this node wants, kept in place.
pub struct RuleSet {
    rules: Vec<Rule>,
    bin: &'static str,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Self {
        Self::with_command(IPTABLES, rules)
    }

    /// Rules kept with `bin` (`iptables` or `ip6tables`).
    pub fn with_command(bin: &'static str, rules: Vec<Rule>) -> Self {
        RuleSet { rules, bin }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// True when every rule (and our chains) exists.
    pub async fn complete(&self) -> Result<bool, IptablesError> {
        for rule in &self.rules {
            if !chain_exists(self.bin, rule.table, rule.own_chain()).await?
                || !rule_exists(self.bin, rule).await?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Make all rules exist in upstream's order; returns whether anything had to change.
    /// Like upstream, a gap anywhere means: remove ours and add them all again in order.
    pub async fn ensure(&self) -> Result<bool, IptablesError> {
        if self.complete().await? {
            return Ok(false);
        }
        for rule in &self.rules {
            let chain = rule.own_chain();
            if !chain_exists(self.bin, rule.table, chain).await? {
                // Another agent on this host (another network) may create it at the same time.
                if let Err(e) = run(self.bin, &["-t", rule.table, "-N", chain]).await {
                    if !chain_exists(self.bin, rule.table, chain).await? {
                        return Err(e);
                    }
                }
            }
            delete_rule(self.bin, rule.table, rule.chain, &rule.spec).await;
        }
        for rule in &self.rules {
            let mut args = vec![
                "-t",
                rule.table,
                match rule.position {
                    Position::Insert => "-I",
                    Position::Append => "-A",
                },
                rule.chain,
            ];
            args.extend(rule.spec.iter().map(String::as_str));
            run(self.bin, &args).await?;
        }
        Ok(true)
    }

    /// Re-check every `period`, forever; when our subnet changes, swap the rules that name
    /// it (the old ones are deleted, the new ones put in upstream's order).
    pub async fn keep<N: Copy + std::fmt::Display>(
        mut self,
        period: Duration,
        subnet: watch::Receiver<N>,
        want: impl Fn(N) -> Vec<Rule>,
    ) {
        let mut resync = crate::resync::Resync::new(period, subnet);
        loop {
            if let Some(now) = resync.next().await {
                let next = want(now);
                for old in self
                    .rules
                    .iter()
                    .filter(|r| !next.contains(r) && r.position == Position::Append)
                {
                    delete_rule(self.bin, old.table, old.chain, &old.spec).await;
                }
                self.rules = next;
                log::info!("iptables: our subnet is now {now}: rules follow");
            }
            match self.ensure().await {
                Ok(true) => log::info!("{}: rules were missing and have been restored", self.bin),
                Ok(false) => {}
                Err(e) => log::warn!("{}: {e}", self.bin),
            }
        }
    }
}

/// The rule set for the flags: forward rules unless disabled, masquerading with `--ip-masq`.
pub fn wanted_rules(
    opts: &RuleOptions,
    network: Ipv4Network,
    subnet: Ipv4Network,
    random_fully: bool,
) -> Vec<Rule> {
    rules_for_flags(
        opts,
        || forward_rules(network),
        || masq_rules(network, subnet, random_fully),
    )
}

/// Either family's rule set for the flags, from its forward and masquerade rules.
fn rules_for_flags(
    opts: &RuleOptions,
    forward: impl FnOnce() -> Vec<Rule>,
    masq: impl FnOnce() -> Vec<Rule>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    if opts.forward {
        rules.extend(forward());
    }
    if opts.ip_masq {
        rules.extend(masq());
    }
    rules
}

/// Whether masquerading uses `--random-fully`: asked for, and `bin` supports it (only then
/// is `bin` run).
async fn random_fully(bin: &'static str, opts: &RuleOptions) -> Result<bool, IptablesError> {
    if !opts.ip_masq || opts.random_fully_disable {
        return Ok(false);
    }
    let version = iptables(bin, &["--version"]).await?;
    Ok(version_supports_random_fully(&String::from_utf8_lossy(
        &version.stdout,
    )))
}

/// What the flags ask of the traffic rules (iptables or nftables alike).
#[derive(Debug, Clone, Copy)]
pub struct RuleOptions {
    /// `--ip-masq`
    pub ip_masq: bool,
    /// `--iptables-forward-rules`
    pub forward: bool,
    /// `--ip-masq-fully-random-disable`
    pub random_fully_disable: bool,
    /// `--iptables-resync`
    pub resync: Duration,
}

/// Rules a previous run (recorded in the old subnet.env) installed that the current ones do
/// not cover: those for an old Network or an old subnet.
pub fn stale_rules(previous: &PreviousSubnetEnv, current: &[Rule]) -> Vec<Rule> {
    let (Some(network), Some(subnet)) = (previous.network, previous.subnet) else {
        return Vec::new();
    };
    let mut old = forward_rules(network);
    old.extend(masq_rules(network, subnet, true));
    old.extend(masq_rules(network, subnet, false));
    old.retain(|r| !current.contains(r) && r.position == Position::Append);
    old.dedup();
    old
}

/// Clean up after the previous run, install our rules and spawn the periodic re-check.
/// Returns once the rules are in place (readiness depends on it).
pub async fn install_and_keep(
    opts: RuleOptions,
    network: Ipv4Network,
    subnet: watch::Receiver<Ipv4Network>,
    previous: &PreviousSubnetEnv,
) -> Result<(), IptablesError> {
    if !opts.ip_masq && !opts.forward {
        return Ok(());
    }
    let random_fully = random_fully(IPTABLES, &opts).await?;
    let want = move |subnet| wanted_rules(&opts, network, subnet, random_fully);
    let rules = want(*subnet.borrow());
    for stale in stale_rules(previous, &rules) {
        if chain_exists(IPTABLES, stale.table, stale.chain).await?
            && rule_exists(IPTABLES, &stale).await?
        {
            log::info!("iptables: removing rule of a previous network/subnet: {stale}");
            delete_rule(IPTABLES, stale.table, stale.chain, &stale.spec).await;
        }
    }
    let set = RuleSet::new(rules);
    set.ensure().await?;
    log::info!("iptables: {} rules in place", set.rules().len());
    tokio::spawn(set.keep(opts.resync.max(Duration::from_secs(1)), subnet, want));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn forward_rules_are_upstreams() {
        assert_eq!(
            lines(&forward_rules(net("10.244.0.0/16"))),
            [
                "-t filter -A FORWARD -m comment --comment flanneld forward -j FLANNEL-FWD",
                "-t filter -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
                "-t filter -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
            ]
        );
        assert_eq!(
            forward_rules(net("10.244.0.0/16"))[0].position,
            Position::Insert
        );
    }

    #[test]
    fn masq_rules_are_upstreams_in_order() {
        let rules = masq_rules(net("10.244.0.0/16"), net("10.244.58.0/24"), true);
        assert_eq!(
            lines(&rules),
            [
                "-t nat -A POSTROUTING -m comment --comment flanneld masq -j FLANNEL-POSTRTG",
                "-t nat -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
                "-t nat -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.58.0/24 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
            ]
        );
        assert_eq!(rules[0].position, Position::Insert);
        assert!(rules[1..].iter().all(|r| r.position == Position::Append));
        let plain = masq_rules(net("10.244.0.0/16"), net("10.244.58.0/24"), false);
        assert!(plain
            .iter()
            .all(|r| !r.spec.contains(&"--random-fully".to_string())));
        assert_eq!(plain.len(), 6);
    }

    #[test]
    fn ip6tables_rules_are_upstreams_in_order() {
        let n6 = "fd00:10:244::/48".parse().unwrap();
        let s6 = "fd00:10:244:3a::/64".parse().unwrap();
        let mut rules = forward_rules_v6(n6);
        rules.extend(masq_rules_v6(n6, s6, true));
        assert_eq!(
            lines(&rules),
            [
                "-t filter -A FORWARD -m comment --comment flanneld forward -j FLANNEL-FWD",
                "-t filter -A FLANNEL-FWD -s fd00:10:244::/48 -m comment --comment flanneld forward -j ACCEPT",
                "-t filter -A FLANNEL-FWD -d fd00:10:244::/48 -m comment --comment flanneld forward -j ACCEPT",
                "-t nat -A POSTROUTING -m comment --comment flanneld masq -j FLANNEL-POSTRTG",
                "-t nat -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s fd00:10:244:3a::/64 -d fd00:10:244::/48 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s fd00:10:244::/48 -d fd00:10:244:3a::/64 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG ! -s fd00:10:244::/48 -d fd00:10:244:3a::/64 -m comment --comment flanneld masq -j RETURN",
                "-t nat -A FLANNEL-POSTRTG -s fd00:10:244::/48 ! -d ff00::/8 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
                "-t nat -A FLANNEL-POSTRTG ! -s fd00:10:244::/48 -d fd00:10:244::/48 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
            ]
        );
    }

    #[test]
    fn random_fully_needs_iptables_1_6_2() {
        assert!(version_supports_random_fully(
            "iptables v1.8.9 (nf_tables)\n"
        ));
        assert!(version_supports_random_fully("iptables v1.6.2"));
        assert!(!version_supports_random_fully("iptables v1.6.1"));
        assert!(!version_supports_random_fully("iptables v1.4.21"));
        assert!(!version_supports_random_fully("garbage"));
    }

    #[test]
    fn stale_rules_are_the_old_network_and_subnet_ones_only() {
        let current = {
            let mut r = forward_rules(net("10.244.0.0/16"));
            r.extend(masq_rules(net("10.244.0.0/16"), net("10.244.7.0/24"), true));
            r
        };
        // Same network and subnet: only the MASQUERADE variants we do not use now are stale.
        let same = PreviousSubnetEnv {
            network: Some(net("10.244.0.0/16")),
            subnet: Some(net("10.244.7.0/24")),
            ipv6_subnet: None,
        };
        let stale = stale_rules(&same, &current);
        assert_eq!(stale.len(), 2, "{stale:?}");
        assert!(stale
            .iter()
            .all(|r| r.spec.last().map(String::as_str) == Some("MASQUERADE")));
        // A new subnet: only the old subnet's RETURN rule goes.
        let moved = PreviousSubnetEnv {
            network: Some(net("10.244.0.0/16")),
            subnet: Some(net("10.244.9.0/24")),
            ipv6_subnet: None,
        };
        let stale = lines(&stale_rules(&moved, &current));
        assert!(stale.contains(
            &"-t nat -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.9.0/24 -m comment --comment flanneld masq -j RETURN".to_string()
        ));
        assert!(
            stale
                .iter()
                .all(|l| !l.contains("FORWARD ") && !l.contains("POSTROUTING ")),
            "jumps stay: {stale:?}"
        );
        // A new network: the old forward rules go too.
        let renumbered = PreviousSubnetEnv {
            network: Some(net("10.1.0.0/16")),
            subnet: Some(net("10.1.3.0/24")),
            ipv6_subnet: None,
        };
        let stale = lines(&stale_rules(&renumbered, &current));
        assert!(stale.contains(&"-t filter -A FLANNEL-FWD -s 10.1.0.0/16 -m comment --comment flanneld forward -j ACCEPT".to_string()));
        assert!(stale_rules(&PreviousSubnetEnv::default(), &current).is_empty());
    }
}
