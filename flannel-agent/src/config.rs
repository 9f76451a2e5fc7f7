//! The network config stored at `<prefix>/config`, parsed and validated as upstream does.
//!
//! Like Go's encoding/json, key names match case-insensitively and unknown keys are ignored,
//! so every config an upstream node accepts is accepted here.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::{Map, Value};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("config is not a JSON object: {0}")]
    NotJson(String),
    #[error("config field {field}: {message} (value {value})")]
    Field {
        field: &'static str,
        value: String,
        message: String,
    },
    #[error("config: {0}")]
    Invalid(String),
}

fn field_err(field: &'static str, value: impl ToString, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        value: value.to_string(),
        message: message.into(),
    }
}

/// The `Backend` section: its type plus the raw JSON each backend parses itself.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub backend_type: String,
    pub raw: Value,
}

impl BackendConfig {
    /// A backend option by case-insensitive name (Go semantics).
    pub fn get(&self, name: &str) -> Option<&Value> {
        match &self.raw {
            Value::Object(map) => get_ci(map, name),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    pub enable_ipv4: bool,
    pub enable_ipv6: bool,
    pub network: Ipv4Network,
    pub subnet_len: u8,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub ipv6_network: Option<Ipv6Network>,
    pub ipv6_subnet_len: u8,
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// `EnableNFTables`: traffic rules in nftables tables instead of iptables chains.
    pub enable_nftables: bool,
    pub backend: BackendConfig,
}

fn get_ci<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    // Go prefers an exact match, then any case-insensitive one.
    map.get(name)
        .or_else(|| {
            map.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn get_bool(
    map: &Map<String, Value>,
    field: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get_ci(map, field) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(field_err(field, v, "must be true or false")),
    }
}

fn get_str<'a>(
    map: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, ConfigError> {
    match get_ci(map, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(field_err(field, v, "must be a string")),
    }
}

fn get_uint(
    map: &Map<String, Value>,
    field: &'static str,
    max: u64,
) -> Result<Option<u64>, ConfigError> {
    match get_ci(map, field) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(field_err(
                field,
                v,
                format!("must be an integer from 0 to {max}"),
            )),
        },
    }
}

fn parse_v4_net(field: &'static str, s: &str) -> Result<Ipv4Network, ConfigError> {
    let net: Ipv4Network = s
        .parse()
        .map_err(|_| field_err(field, format!("{s:?}"), "is not an IPv4 CIDR"))?;
    if !s.contains('/') {
        return Err(field_err(field, format!("{s:?}"), "is not an IPv4 CIDR"));
    }
    // Go's net.ParseCIDR masks the address.
    Ipv4Network::new(net.network(), net.prefix())
        .map_err(|_| field_err(field, format!("{s:?}"), "is not an IPv4 CIDR"))
}

fn parse_v4_addr(
    map: &Map<String, Value>,
    field: &'static str,
) -> Result<Option<Ipv4Addr>, ConfigError> {
    get_str(map, field)?
        .map(|s| {
            s.parse()
                .map_err(|_| field_err(field, format!("{s:?}"), "is not an IPv4 address"))
        })
        .transpose()
}

impl NetworkConfig {
    pub fn parse(json: &[u8]) -> Result<Self, ConfigError> {
        let value: Value =
            serde_json::from_slice(json).map_err(|e| ConfigError::NotJson(e.to_string()))?;
        let Value::Object(map) = value else {
            return Err(ConfigError::NotJson(format!("got {value}")));
        };

        let enable_ipv4 = get_bool(&map, "EnableIPv4", true)?;
        let enable_ipv6 = get_bool(&map, "EnableIPv6", false)?;
        let enable_nftables = get_bool(&map, "EnableNFTables", false)?;
        if !enable_ipv4 && !enable_ipv6 {
            return Err(ConfigError::Invalid(
                "EnableIPv4 and EnableIPv6 are both false: nothing to do".into(),
            ));
        }

        let network = match get_str(&map, "Network")? {
            Some(s) => Some(parse_v4_net("Network", s)?),
            None => None,
        };
        let network = match (enable_ipv4, network) {
            (true, None) => {
                return Err(field_err(
                    "Network",
                    "missing",
                    "please define a correct Network parameter in the flannel config",
                ))
            }
            (_, Some(n)) => n,
            (false, None) => Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?,
        };

        let subnet_len = get_uint(&map, "SubnetLen", 32)?.unwrap_or(0) as u8;
        let prefix = network.prefix();
        let subnet_len = if !enable_ipv4 {
            subnet_len
        } else if subnet_len > 0 {
            if subnet_len > 30 {
                return Err(field_err("SubnetLen", subnet_len, "must be less than /31"));
            }
            if subnet_len < prefix + 2 {
                return Err(field_err(
                    "SubnetLen",
                    subnet_len,
                    format!("Network {network} must be able to accommodate at least four subnets"),
                ));
            }
            subnet_len
        } else if prefix > 28 {
            return Err(field_err(
                "Network",
                network,
                "is too small: the minimum useful network prefix is /28",
            ));
        } else if prefix <= 22 {
            24
        } else {
            prefix + 2
        };

        let (subnet_min, subnet_max) = if enable_ipv4 {
            let size = 1u32 << (32 - subnet_len);
            let mask = u32::MAX << (32 - subnet_len);
            let net = u32::from(network.network());
            let last = net | !(u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0));
            let min = match parse_v4_addr(&map, "SubnetMin")? {
                None => Ipv4Addr::from(net + size),
                Some(a) if !network.contains(a) => {
                    return Err(field_err(
                        "SubnetMin",
                        a,
                        format!("is not in the range of the Network {network}"),
                    ))
                }
                Some(a) => a,
            };
            let max = match parse_v4_addr(&map, "SubnetMax")? {
                None => Ipv4Addr::from(last.wrapping_add(1).wrapping_sub(size)),
                Some(a) if !network.contains(a) => {
                    return Err(field_err(
                        "SubnetMax",
                        a,
                        format!("is not in the range of the Network {network}"),
                    ))
                }
                Some(a) => a,
            };
            if u32::from(min) & mask != u32::from(min) {
                return Err(field_err(
                    "SubnetMin",
                    min,
                    format!("is not on a SubnetLen (/{subnet_len}) boundary"),
                ));
            }
            if u32::from(max) & mask != u32::from(max) {
                return Err(field_err(
                    "SubnetMax",
                    max,
                    format!("is not on a SubnetLen (/{subnet_len}) boundary"),
                ));
            }
            if u32::from(min) > u32::from(max) {
                return Err(field_err(
                    "SubnetMin",
                    min,
                    format!("is above SubnetMax {max}"),
                ));
            }
            (min, max)
        } else {
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
        };

        let (ipv6_network, ipv6_subnet_len, ipv6_subnet_min, ipv6_subnet_max) =
            parse_ipv6(&map, enable_ipv6)?;

        let backend = match get_ci(&map, "Backend") {
            None => BackendConfig {
                backend_type: "udp".into(),
                raw: Value::Object(Map::new()),
            },
            Some(raw @ Value::Object(b)) => {
                let t = get_str(b, "Type")?.unwrap_or("");
                BackendConfig {
                    // Upstream's code (not its docs) falls back to udp.
                    backend_type: if t.is_empty() {
                        "udp".into()
                    } else {
                        t.to_owned()
                    },
                    raw: raw.clone(),
                }
            }
            Some(v) => return Err(field_err("Backend", v, "must be a JSON object")),
        };

        Ok(NetworkConfig {
            enable_ipv4,
            enable_ipv6,
            network,
            subnet_len,
            subnet_min,
            subnet_max,
            ipv6_network,
            ipv6_subnet_len,
            ipv6_subnet_min,
            ipv6_subnet_max,
            enable_nftables,
            backend,
        })
    }

    /// Is `subnet` one this config could hand out (right length, inside SubnetMin..SubnetMax)?
    pub fn contains_subnet(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.subnet_len
            && u32::from(subnet.network()) >= u32::from(self.subnet_min)
            && u32::from(subnet.network()) <= u32::from(self.subnet_max)
    }

    /// Number of subnets in SubnetMin..=SubnetMax.
    pub fn subnet_count(&self) -> u64 {
        let size = 1u64 << (32 - self.subnet_len);
        (u64::from(u32::from(self.subnet_max)) - u64::from(u32::from(self.subnet_min))) / size + 1
    }

    /// The `i`-th subnet from SubnetMin.
    pub fn nth_subnet(&self, i: u64) -> Option<Ipv4Network> {
        if i >= self.subnet_count() {
            return None;
        }
        let size = 1u64 << (32 - self.subnet_len);
        let addr = u64::from(u32::from(self.subnet_min)) + i * size;
        Ipv4Network::new(Ipv4Addr::from(addr as u32), self.subnet_len).ok()
    }
}

impl NetworkConfig {
    /// The IPv6 subnet range as network addresses: IPv6SubnetMin (default: the second subnet
    /// of IPv6Network, as upstream) to IPv6SubnetMax (default: the last one).
    fn ipv6_range(&self) -> Option<(u128, u128, u128)> {
        let net = self.ipv6_network.filter(|_| self.enable_ipv6)?;
        let len = self.ipv6_subnet_len;
        if len == 0 || len > 128 || len < net.prefix() {
            return None;
        }
        let size = 1u128.checked_shl(u32::from(128 - len)).unwrap_or(0);
        let mask = |a: u128| if size == 0 { a } else { a & !(size - 1) };
        let base = u128::from(net.network());
        let last = base | (u128::MAX.checked_shr(u32::from(net.prefix())).unwrap_or(0));
        let min = self
            .ipv6_subnet_min
            .map_or(base.wrapping_add(size), |a| mask(u128::from(a)));
        let max = self
            .ipv6_subnet_max
            .map_or(mask(last), |a| mask(u128::from(a)));
        (size > 0 && min <= max).then_some((min, max, size))
    }

    /// The `i`-th IPv6 subnet from IPv6SubnetMin (None past IPv6SubnetMax or without IPv6).
    pub fn nth_ipv6_subnet(&self, i: u64) -> Option<Ipv6Network> {
        let (min, max, size) = self.ipv6_range()?;
        let addr = min.checked_add(size.checked_mul(u128::from(i))?)?;
        (addr <= max)
            .then(|| Ipv6Network::new(Ipv6Addr::from(addr), self.ipv6_subnet_len).ok())
            .flatten()
    }

    /// Is `subnet` one this config could hand out as an IPv6 subnet?
    pub fn contains_ipv6_subnet(&self, subnet: Ipv6Network) -> bool {
        let Some((min, max, _)) = self.ipv6_range() else {
            return false;
        };
        let a = u128::from(subnet.network());
        subnet.prefix() == self.ipv6_subnet_len && a >= min && a <= max
    }
}

type V6Parts = (Option<Ipv6Network>, u8, Option<Ipv6Addr>, Option<Ipv6Addr>);

fn parse_ipv6(map: &Map<String, Value>, enabled: bool) -> Result<V6Parts, ConfigError> {
    let net = get_str(map, "IPv6Network")?
        .map(|s| {
            s.parse::<Ipv6Network>()
                .ok()
                .filter(|_| s.contains('/'))
                .and_then(|n| Ipv6Network::new(n.network(), n.prefix()).ok())
                .ok_or_else(|| field_err("IPv6Network", format!("{s:?}"), "is not an IPv6 CIDR"))
        })
        .transpose()?;
    let len = get_uint(map, "IPv6SubnetLen", 128)?.unwrap_or(0) as u8;
    let addr = |field: &'static str| -> Result<Option<Ipv6Addr>, ConfigError> {
        get_str(map, field)?
            .map(|s| {
                s.parse()
                    .map_err(|_| field_err(field, format!("{s:?}"), "is not an IPv6 address"))
            })
            .transpose()
    };
    let (min, max) = (addr("IPv6SubnetMin")?, addr("IPv6SubnetMax")?);
    if !enabled {
        return Ok((net, len, min, max));
    }
    let Some(net) = net else {
        return Err(field_err(
            "IPv6Network",
            "missing",
            "please define a correct IPv6Network parameter in the flannel config",
        ));
    };
    let prefix = net.prefix();
    let len = if len > 0 {
        if len > 126 {
            return Err(field_err("IPv6SubnetLen", len, "must be less than /127"));
        }
        if len < prefix + 2 {
            return Err(field_err(
                "IPv6SubnetLen",
                len,
                "IPv6Network must be able to accommodate at least four subnets",
            ));
        }
        len
    } else if prefix > 124 {
        return Err(field_err(
            "IPv6Network",
            net,
            "is too small: the minimum useful prefix is /124",
        ));
    } else if prefix <= 62 {
        64
    } else {
        prefix + 2
    };
    for (field, a) in [("IPv6SubnetMin", min), ("IPv6SubnetMax", max)] {
        if let Some(a) = a {
            if !net.contains(a) {
                return Err(field_err(
                    field,
                    a,
                    format!("is not in the range of the IPv6Network {net}"),
                ));
            }
        }
    }
    Ok((Some(net), len, min, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse(s.as_bytes())
    }

    #[test]
    fn defaults_follow_upstream() {
        let c = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, "10.244.1.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.subnet_max, "10.244.255.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.backend.backend_type, "udp");
        assert!(c.enable_ipv4 && !c.enable_ipv6);

        let c = parse(r#"{"Network":"10.244.0.0/24"}"#).unwrap();
        assert_eq!(c.subnet_len, 26);
        assert_eq!(c.subnet_min, "10.244.0.64".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.subnet_max, "10.244.0.192".parse::<Ipv4Addr>().unwrap());
        assert_eq!(c.subnet_count(), 3);

        let c = parse(r#"{"Network":"10.244.0.0/22"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);

        // A network reaching the top of the address space must not overflow.
        let c = parse(r#"{"Network":"255.0.0.0/8"}"#).unwrap();
        assert_eq!(c.subnet_max, "255.255.255.0".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_keys_ignored() {
        let c = parse(r#"{"network":"10.5.0.0/16","subnetlen":20,"backend":{"type":"vxlan","vni":4},"Extra":1}"#)
            .unwrap();
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.backend.backend_type, "vxlan");
        assert_eq!(c.backend.get("VNI"), Some(&Value::from(4)));
    }

    #[test]
    fn backend_without_type_is_udp() {
        let c = parse(r#"{"Network":"10.5.0.0/16","Backend":{"Port":9000}}"#).unwrap();
        assert_eq!(c.backend.backend_type, "udp");
    }

    #[test]
    fn invalid_configs_name_field_and_value() {
        let cases = [
            (r#"{"Network":"10.5.0.0/29"}"#, "Network"),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":31}"#, "SubnetLen"),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":17}"#, "SubnetLen"),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}"#,
                "SubnetMin",
            ),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.7"}"#,
                "SubnetMax",
            ),
            (
                r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.3.0"}"#,
                "SubnetMin",
            ),
            (r#"{"Network":"banana"}"#, "Network"),
            (r#"{"Network":"10.5.0.0"}"#, "Network"),
            (r#"{"Network":5}"#, "Network"),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":"24"}"#, "SubnetLen"),
            (r#"{"Network":"10.5.0.0/16","SubnetLen":-1}"#, "SubnetLen"),
            (
                r#"{"Network":"10.5.0.0/16","EnableIPv6":true}"#,
                "IPv6Network",
            ),
            (r#"{"Network":"10.5.0.0/16","Backend":"udp"}"#, "Backend"),
            (r#"{}"#, "Network"),
        ];
        for (json, field) in cases {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.contains(field), "{json}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        assert!(matches!(parse("nope"), Err(ConfigError::NotJson(_))));
        assert!(matches!(parse("[1]"), Err(ConfigError::NotJson(_))));
    }

    #[test]
    fn network_address_is_masked_like_go() {
        let c = parse(r#"{"Network":"10.244.7.9/16"}"#).unwrap();
        assert_eq!(c.network.to_string(), "10.244.0.0/16");
    }

    #[test]
    fn ipv6_subnets_walk_upstreams_default_range() {
        let c = parse(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48"}"#,
        )
        .unwrap();
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(
            c.nth_ipv6_subnet(0).unwrap().to_string(),
            "fd00:10:244:1::/64"
        );
        assert_eq!(
            c.nth_ipv6_subnet(65534).unwrap().to_string(),
            "fd00:10:244:ffff::/64"
        );
        assert!(c.nth_ipv6_subnet(65535).is_none());
        assert!(c.contains_ipv6_subnet("fd00:10:244:7::/64".parse().unwrap()));
        assert!(!c.contains_ipv6_subnet("fd00:10:244::/64".parse().unwrap()));
        assert!(!c.contains_ipv6_subnet("fd00:10:245:7::/64".parse().unwrap()));
        let v4 = parse(r#"{"Network":"10.244.0.0/16"}"#).unwrap();
        assert!(v4.nth_ipv6_subnet(0).is_none());
    }

    #[test]
    fn nth_subnet_walks_the_range() {
        let c = parse(
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.12.0"}"#,
        )
        .unwrap();
        assert_eq!(c.subnet_count(), 3);
        assert_eq!(c.nth_subnet(2).unwrap().to_string(), "10.244.12.0/24");
        assert!(c.nth_subnet(3).is_none());
        assert!(c.contains_subnet("10.244.11.0/24".parse().unwrap()));
        assert!(!c.contains_subnet("10.244.13.0/24".parse().unwrap()));
        assert!(!c.contains_subnet("10.244.11.0/25".parse().unwrap()));
    }
}
