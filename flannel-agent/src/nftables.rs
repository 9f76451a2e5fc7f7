//! `EnableNFTables: true`: upstream's nftables mode. Table `ip flannel-ipv4` with chain
//! `forward` (filter, hook forward) accepting overlay traffic and, with `--ip-masq`, chain
//! `postrtg` (nat, hook postrouting) masquerading what leaves the overlay; an empty
//! `ip6 flannel-ipv6` table as upstream creates it. Rule text is upstream's (its e2e `rules.go`
//! compares `nft list chain` output), written here in the form `nft` prints it back so that a
//! listing can be compared line for line. Each install is one `nft -f` transaction that
//! flushes our chains and adds the rules, so rules for an old Network/subnet never linger.
//! Re-checked every `--iptables-resync` (upstream does not resync; we do, as in iptables mode).

use std::process::Stdio;
use std::time::Duration;

use ipnetwork::{Ipv4Network, Ipv6Network};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::watch;

use crate::iptables::RuleOptions;

pub const IPV4_TABLE: &str = "flannel-ipv4";
pub const IPV6_TABLE: &str = "flannel-ipv6";
pub const FORWARD_CHAIN: &str = "forward";
pub const POSTRTG_CHAIN: &str = "postrtg";
const FORWARD_COMMENT: &str = "chain to accept flannel traffic";
const POSTRTG_COMMENT: &str = "chain to manage traffic masquerading by flannel";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running nft: {0} (install the nftables package, or drop EnableNFTables from the network config)")]
    Spawn(std::io::Error),
    #[error("nft {what}: {stderr}")]
    Failed { what: String, stderr: String },
}

/// One of our chains: its header as `nft` lists it and its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// `ip` (table flannel-ipv4) or `ip6` (table flannel-ipv6).
    pub family: &'static str,
    pub name: &'static str,
    pub comment: &'static str,
    /// `type ... hook ... priority ...` as in `nft list` (policy accept is implied).
    pub kind: &'static str,
    pub rules: Vec<String>,
}

/// Upstream's forward chain for `network`.
pub fn forward_chain(network: Ipv4Network) -> Chain {
    forward_chain_for("ip", &network.to_string())
}

/// Upstream's IPv6 forward chain (table ip6 flannel-ipv6) for IPv6Network.
pub fn forward_chain_v6(network: Ipv6Network) -> Chain {
    forward_chain_for("ip6", &network.to_string())
}

fn forward_chain_for(family: &'static str, network: &str) -> Chain {
    Chain {
        family,
        name: FORWARD_CHAIN,
        comment: FORWARD_COMMENT,
        kind: "type filter hook forward priority filter",
        rules: vec![
            format!("{family} saddr {network} accept"),
            format!("{family} daddr {network} accept"),
        ],
    }
}

/// Upstream's masquerade chain for `network` and our `subnet`, in upstream's order.
pub fn postrtg_chain(network: Ipv4Network, subnet: Ipv4Network, fully_random: bool) -> Chain {
    postrtg_chain_for(
        "ip",
        &network.to_string(),
        &subnet.to_string(),
        "224.0.0.0/4",
        fully_random,
    )
}

/// Upstream's IPv6 masquerade chain: the same rules with `ip6` and multicast ff00::/8.
pub fn postrtg_chain_v6(network: Ipv6Network, subnet: Ipv6Network, fully_random: bool) -> Chain {
    postrtg_chain_for(
        "ip6",
        &network.to_string(),
        &subnet.to_string(),
        "ff00::/8",
        fully_random,
    )
}

fn postrtg_chain_for(
    f: &'static str,
    network: &str,
    subnet: &str,
    multicast: &str,
    fully_random: bool,
) -> Chain {
    let masq = if fully_random {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    Chain {
        family: f,
        name: POSTRTG_CHAIN,
        comment: POSTRTG_COMMENT,
        kind: "type nat hook postrouting priority srcnat",
        rules: vec![
            // kube-proxy's mark: it masquerades those itself (double NAT breaks some kernels).
            "meta mark 0x00004000 return".to_owned(),
            format!("{f} saddr {subnet} {f} daddr {network} return"),
            format!("{f} saddr {network} {f} daddr {subnet} return"),
            format!("{f} saddr != {subnet} {f} daddr {network} return"),
            format!("{f} saddr {network} {f} daddr != {multicast} {masq}"),
            format!("{f} saddr != {network} {f} daddr {network} {masq}"),
        ],
    }
}

/// The chains the flags ask for: the ip ones for `network` (`None`: IPv6-only), and with
/// `ipv6` (IPv6Network, our IPv6 subnet) the ip6 ones.
pub fn wanted_chains(
    opts: &RuleOptions,
    network: Option<Ipv4Network>,
    subnet: Ipv4Network,
    ipv6: Option<(Ipv6Network, Ipv6Network)>,
    fully_random: bool,
) -> Vec<Chain> {
    let mut chains = Vec::new();
    if let Some(network) = network {
        if opts.forward {
            chains.push(forward_chain(network));
        }
        if opts.ip_masq {
            chains.push(postrtg_chain(network, subnet, fully_random));
        }
    }
    if let Some((network6, subnet6)) = ipv6 {
        if opts.forward {
            chains.push(forward_chain_v6(network6));
        }
        if opts.ip_masq {
            chains.push(postrtg_chain_v6(network6, subnet6, fully_random));
        }
    }
    chains
}

fn table_of(c: &Chain) -> &'static str {
    if c.family == "ip6" {
        IPV6_TABLE
    } else {
        IPV4_TABLE
    }
}

/// The `nft -f` transaction that creates our tables and (re)fills `chains`.
pub fn script(chains: &[Chain]) -> String {
    let mut s = String::new();
    for (family, table) in [("ip", IPV4_TABLE), ("ip6", IPV6_TABLE)] {
        s += &format!("add table {family} {table} {{ comment \"rules for {table}\" ; }}\n");
    }
    for c in chains {
        let (family, table) = (c.family, table_of(c));
        s += &format!(
            "add chain {family} {table} {} {{ {} ; comment \"{}\" ; }}\n",
            c.name, c.kind, c.comment
        );
        s += &format!("flush chain {family} {table} {}\n", c.name);
        for r in &c.rules {
            s += &format!("add rule {family} {table} {} {r}\n", c.name);
        }
    }
    s
}

/// What `nft list chain ip flannel-ipv4 <chain>` prints for `c` (upstream's e2e golden text).
pub fn listing(c: &Chain) -> String {
    let mut lines = vec![
        format!("table {} {} {{", c.family, table_of(c)),
        format!("\tchain {} {{", c.name),
        format!("\t\tcomment \"{}\"", c.comment),
        format!("\t\t{}; policy accept;", c.kind),
    ];
    lines.extend(c.rules.iter().map(|r| format!("\t\t{r}")));
    lines.push("\t}".to_owned());
    lines.push("}".to_owned());
    lines.join("\n")
}

async fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NftError::Failed {
            what: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
        })
    }
}

/// Upstream checks whether the kernel takes `masquerade fully-random` (a check-only run).
async fn supports_fully_random() -> Result<bool, NftError> {
    let probe = "add table ip flannel-probe\n\
                 add chain ip flannel-probe masqueradeTest { type nat hook postrouting priority srcnat ; }\n\
                 add rule ip flannel-probe masqueradeTest ip saddr != 127.0.0.1 masquerade fully-random\n";
    match nft(&["-c", "-f", "-"], Some(probe)).await {
        Ok(_) => Ok(true),
        Err(NftError::Spawn(e)) => Err(NftError::Spawn(e)),
        Err(_) => {
            log::warn!("nftables: random fully unsupported");
            Ok(false)
        }
    }
}

/// True when every chain is listed exactly as we install it.
pub async fn complete(chains: &[Chain]) -> Result<bool, NftError> {
    for c in chains {
        match nft(&["list", "chain", c.family, table_of(c), c.name], None).await {
            Ok(text) if text.trim_end() == listing(c) => {}
            Ok(_) => return Ok(false),
            Err(NftError::Spawn(e)) => return Err(NftError::Spawn(e)),
            Err(_) => return Ok(false),
        }
    }
    Ok(true)
}

/// Install unless already complete; returns whether anything had to change.
pub async fn ensure(chains: &[Chain]) -> Result<bool, NftError> {
    if complete(chains).await? {
        return Ok(false);
    }
    nft(&["-f", "-"], Some(&script(chains))).await?;
    Ok(true)
}

/// Install our tables and rules and spawn the periodic re-check (which also follows a change
/// of our subnet). Returns once the rules are in place (readiness depends on it).
pub async fn install_and_keep(
    opts: RuleOptions,
    network: Option<Ipv4Network>,
    mut subnet: watch::Receiver<Ipv4Network>,
    ipv6: Option<(Ipv6Network, Ipv6Network)>,
) -> Result<(), NftError> {
    log::info!("starting flannel in nftables mode");
    let fully_random =
        opts.ip_masq && !opts.random_fully_disable && supports_fully_random().await?;
    let want = move |s| wanted_chains(&opts, network, s, ipv6, fully_random);
    let mut chains = want(*subnet.borrow_and_update());
    // The tables exist even with no chains, as upstream's Init creates them.
    nft(&["-f", "-"], Some(&script(&chains))).await?;
    log::info!(
        "nftables: tables ip {IPV4_TABLE} and ip6 {IPV6_TABLE}, {} rules in place",
        chains.iter().map(|c| c.rules.len()).sum::<usize>()
    );
    let period = opts.resync.max(Duration::from_secs(1));
    let mut resync = crate::resync::Resync::new(period, subnet);
    tokio::spawn(async move {
        loop {
            if let Some(now) = resync.next().await {
                chains = want(now);
                log::info!("nftables: our subnet is now {now}: rules follow");
            }
            match ensure(&chains).await {
                Ok(true) => {
                    log::info!("nftables: rules were missing or changed and have been restored")
                }
                Ok(false) => {}
                Err(e) => log::warn!("nftables: {e}"),
            }
        }
    });
    Ok(())
}

/// `flanneld uninstall`: delete both tables. Returns what was removed.
pub async fn remove_tables() -> Result<Vec<String>, NftError> {
    let mut removed = Vec::new();
    for (family, table) in [("ip", IPV4_TABLE), ("ip6", IPV6_TABLE)] {
        if nft(&["list", "table", family, table], None).await.is_ok() {
            nft(&["delete", "table", family, table], None).await?;
            removed.push(format!("{family} {table}"));
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    /// Upstream's e2e golden text (e2e/rules.go expectedNftPostrouting / expectedNftForward).
    #[test]
    fn listings_are_upstreams_golden_text() {
        let post = postrtg_chain(net("10.244.0.0/16"), net("10.244.7.0/24"), true);
        assert_eq!(
            listing(&post),
            "table ip flannel-ipv4 {\n\
             \tchain postrtg {\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark 0x00004000 return\n\
             \t\tip saddr 10.244.7.0/24 ip daddr 10.244.0.0/16 return\n\
             \t\tip saddr 10.244.0.0/16 ip daddr 10.244.7.0/24 return\n\
             \t\tip saddr != 10.244.7.0/24 ip daddr 10.244.0.0/16 return\n\
             \t\tip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random\n\
             \t\tip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random\n\
             \t}\n\
             }"
        );
        assert_eq!(
            listing(&forward_chain(net("10.244.0.0/16"))),
            "table ip flannel-ipv4 {\n\
             \tchain forward {\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tip saddr 10.244.0.0/16 accept\n\
             \t\tip daddr 10.244.0.0/16 accept\n\
             \t}\n\
             }"
        );
        // Upstream's e2e expectedNft6Postrouting / expectedNft6Forward.
        let n6 = "fd00:10:244::/48".parse().unwrap();
        let s6 = "fd00:10:244:3a::/64".parse().unwrap();
        assert_eq!(
            listing(&postrtg_chain_v6(n6, s6, true)),
            "table ip6 flannel-ipv6 {\n\
             \tchain postrtg {\n\
             \t\tcomment \"chain to manage traffic masquerading by flannel\"\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tmeta mark 0x00004000 return\n\
             \t\tip6 saddr fd00:10:244:3a::/64 ip6 daddr fd00:10:244::/48 return\n\
             \t\tip6 saddr fd00:10:244::/48 ip6 daddr fd00:10:244:3a::/64 return\n\
             \t\tip6 saddr != fd00:10:244:3a::/64 ip6 daddr fd00:10:244::/48 return\n\
             \t\tip6 saddr fd00:10:244::/48 ip6 daddr != ff00::/8 masquerade fully-random\n\
             \t\tip6 saddr != fd00:10:244::/48 ip6 daddr fd00:10:244::/48 masquerade fully-random\n\
             \t}\n\
             }"
        );
        assert_eq!(
            listing(&forward_chain_v6(n6)),
            "table ip6 flannel-ipv6 {\n\
             \tchain forward {\n\
             \t\tcomment \"chain to accept flannel traffic\"\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tip6 saddr fd00:10:244::/48 accept\n\
             \t\tip6 daddr fd00:10:244::/48 accept\n\
             \t}\n\
             }"
        );
        let plain = postrtg_chain(net("10.244.0.0/16"), net("10.244.7.0/24"), false);
        assert!(plain.rules.iter().all(|r| !r.contains("fully-random")));
    }

    #[test]
    fn script_flushes_each_chain_before_filling_it() {
        let opts = RuleOptions {
            ip_masq: true,
            forward: true,
            random_fully_disable: false,
            resync: Duration::from_secs(5),
        };
        let s = script(&wanted_chains(
            &opts,
            Some(net("10.244.0.0/16")),
            net("10.244.7.0/24"),
            None,
            true,
        ));
        assert!(s.starts_with("add table ip flannel-ipv4 { comment \"rules for flannel-ipv4\" ; }\nadd table ip6 flannel-ipv6"));
        let flush = s.find("flush chain ip flannel-ipv4 postrtg").unwrap();
        let first = s.find("add rule ip flannel-ipv4 postrtg").unwrap();
        assert!(flush < first);
        assert_eq!(s.matches("add rule ").count(), 8);
    }

    #[test]
    fn ipv6_only_has_ip6_chains_alone() {
        let opts = RuleOptions {
            ip_masq: true,
            forward: true,
            random_fully_disable: false,
            resync: Duration::from_secs(5),
        };
        let v6 = (
            "fd00:10:244::/48".parse().unwrap(),
            "fd00:10:244:7::/64".parse().unwrap(),
        );
        let chains = wanted_chains(&opts, None, net("0.0.0.0/0"), Some(v6), true);
        assert_eq!(chains.len(), 2);
        assert!(chains.iter().all(|c| c.family == "ip6"), "{chains:?}");
        let s = script(&chains);
        assert!(!s.contains("add rule ip flannel-ipv4"), "{s}");
    }
}
