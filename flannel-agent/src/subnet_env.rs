//! `subnet.env`, the file the flannel CNI plugin reads: written atomically in upstream's format.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use ipnetwork::{Ipv4Network, Ipv6Network};

/// What a previous run left in subnet.env (all fields optional: the file may be partial).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PreviousSubnetEnv {
    pub network: Option<Ipv4Network>,
    pub subnet: Option<Ipv4Network>,
    /// FLANNEL_IPV6_SUBNET, as a network.
    pub ipv6_subnet: Option<Ipv6Network>,
}

/// Contents to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// Network and our subnet; `None` in an IPv6-only network (upstream then writes no
    /// FLANNEL_NETWORK / FLANNEL_SUBNET lines).
    pub ipv4: Option<(Ipv4Network, Ipv4Network)>,
    pub mtu: u32,
    pub ip_masq: bool,
    /// With EnableIPv6: IPv6Network and our IPv6 subnet.
    pub ipv6: Option<(Ipv6Network, Ipv6Network)>,
}

impl SubnetEnv {
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some((network, subnet)) = self.ipv4 {
            // FLANNEL_SUBNET is the subnet's first host address with the subnet length.
            let first_host = Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1));
            out += &format!(
                "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first_host}/{}\n",
                subnet.prefix()
            );
        }
        if let Some((network, subnet)) = self.ipv6 {
            let first = std::net::Ipv6Addr::from(u128::from(subnet.network()).wrapping_add(1));
            out += &format!(
                "FLANNEL_IPV6_NETWORK={network}\nFLANNEL_IPV6_SUBNET={first}/{}\n",
                subnet.prefix()
            );
        }
        out + &format!(
            "FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.mtu, self.ip_masq
        )
    }

    /// Write via a temporary file and rename, so readers never see half a file.
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "subnet file has no name")
        })?;
        let tmp = dir.join(format!(".{}", name.to_string_lossy()));
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    }
}

impl PreviousSubnetEnv {
    /// The subnets to ask for again (upstream reuses them when still free).
    pub fn subnets(&self) -> crate::subnet::allocate::Previous {
        crate::subnet::allocate::Previous {
            ipv4: self.subnet,
            ipv6: self.ipv6_subnet,
        }
    }

    /// Read what a previous run wrote; a missing or garbled file is simply "nothing known".
    pub fn read(path: &Path) -> Self {
        let Ok(text) = fs::read_to_string(path) else {
            return Self::default();
        };
        let mut prev = Self::default();
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"');
            match k.trim() {
                "FLANNEL_NETWORK" => prev.network = v.parse().ok(),
                "FLANNEL_SUBNET" => {
                    prev.subnet = v
                        .parse::<Ipv4Network>()
                        .ok()
                        .and_then(|n| Ipv4Network::new(n.network(), n.prefix()).ok())
                }
                "FLANNEL_IPV6_SUBNET" => {
                    prev.ipv6_subnet = v
                        .parse::<Ipv6Network>()
                        .ok()
                        .and_then(|n| Ipv6Network::new(n.network(), n.prefix()).ok())
                }
                _ => {}
            }
        }
        prev
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_ipv6_subnet_is_read_back() {
        let dir = std::env::temp_dir().join(format!("fl-subnet-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("subnet.env");
        std::fs::write(
            &path,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.58.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:3a::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        let prev = PreviousSubnetEnv::read(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        let subnets = prev.subnets();
        assert_eq!(subnets.ipv4, Some("10.244.58.0/24".parse().unwrap()));
        assert_eq!(subnets.ipv6, Some("fd00:10:244:3a::/64".parse().unwrap()));
    }

    #[test]
    fn renders_upstream_format_and_reads_back() {
        let env = SubnetEnv {
            ipv4: Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.58.0/24".parse().unwrap(),
            )),
            mtu: 1472,
            ip_masq: false,
            ipv6: None,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.58.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("fl-subnetenv-{}", std::process::id()));
        let path = dir.join("deep/subnet.env");
        env.write(&path).unwrap();
        let prev = PreviousSubnetEnv::read(&path);
        assert_eq!(prev.subnet, Some("10.244.58.0/24".parse().unwrap()));
        assert_eq!(prev.network, Some("10.244.0.0/16".parse().unwrap()));
        assert!(!dir.join("deep/.subnet.env").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Upstream's WriteSubnetFile for a dual-stack node, byte for byte.
    #[test]
    fn dual_stack_renders_upstreams_ipv6_lines() {
        let env = SubnetEnv {
            ipv4: Some((
                "10.244.0.0/16".parse().unwrap(),
                "10.244.58.0/24".parse().unwrap(),
            )),
            mtu: 1450,
            ip_masq: true,
            ipv6: Some((
                "fd00:10:244::/48".parse().unwrap(),
                "fd00:10:244:3a::/64".parse().unwrap(),
            )),
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.58.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:3a::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    /// Upstream's WriteSubnetFile with EnableIPv4 false: no IPv4 lines at all.
    #[test]
    fn ipv6_only_renders_no_ipv4_lines_and_reads_back_its_ipv6_subnet() {
        let env = SubnetEnv {
            ipv4: None,
            mtu: 1430,
            ip_masq: false,
            ipv6: Some((
                "fd00:10:244::/48".parse().unwrap(),
                "fd00:10:244:3a::/64".parse().unwrap(),
            )),
        };
        assert_eq!(
            env.render(),
            "FLANNEL_IPV6_NETWORK=fd00:10:244::/48\nFLANNEL_IPV6_SUBNET=fd00:10:244:3a::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
        );
        let dir = std::env::temp_dir().join(format!("fl-subnetenv-v6-{}", std::process::id()));
        let path = dir.join("subnet.env");
        env.write(&path).unwrap();
        let prev = PreviousSubnetEnv::read(&path);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!((prev.network, prev.subnet), (None, None));
        assert_eq!(
            prev.subnets().ipv6,
            Some("fd00:10:244:3a::/64".parse().unwrap())
        );
    }

    #[test]
    fn garbage_reads_as_nothing() {
        let dir = std::env::temp_dir().join(format!("fl-subnetenv-bad-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("subnet.env");
        fs::write(&path, "FLANNEL_SUBNET=banana\n\0\0 junk").unwrap();
        assert_eq!(PreviousSubnetEnv::read(&path), PreviousSubnetEnv::default());
        assert_eq!(
            PreviousSubnetEnv::read(&dir.join("missing")),
            PreviousSubnetEnv::default()
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
