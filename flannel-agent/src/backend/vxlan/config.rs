//! The vxlan backend's options (the `Backend` section of the network config), with upstream's
//! defaults, and the names and MTUs that follow from them.

use serde_json::Value;

use super::BACKEND_TYPE;
use crate::backend::BackendError;
use crate::config::BackendConfig;

/// Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8) headers.
pub const ENCAP_OVERHEAD: u32 = 50;
/// Outer Ethernet (14) + IPv6 (40) + UDP (8) + VXLAN (8) headers (the `flannel-v6` device).
pub const ENCAP_OVERHEAD_V6: u32 = 70;
/// The port the kernel uses when none is configured (Linux's historic VXLAN port).
pub const KERNEL_DEFAULT_PORT: u16 = 8472;
const MAX_VNI: u64 = (1 << 24) - 1;

/// The backend options of the network config (`Backend` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// 0: the kernel default (8472).
    pub port: u16,
    pub gbp: bool,
    pub learning: bool,
    pub direct_routing: bool,
    /// None: external interface MTU minus the encapsulation overhead.
    pub mtu: Option<u32>,
}

fn bad(option: &'static str, message: impl Into<String>) -> BackendError {
    BackendError::BadOption {
        backend: BACKEND_TYPE,
        option,
        message: message.into(),
    }
}

fn uint_option(
    cfg: &BackendConfig,
    option: &'static str,
    max: u64,
) -> Result<Option<u64>, BackendError> {
    match cfg.get(option) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(bad(
                option,
                format!("{v} is not an integer from 0 to {max}"),
            )),
        },
    }
}

fn bool_option(cfg: &BackendConfig, option: &'static str) -> Result<bool, BackendError> {
    match cfg.get(option) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bad(option, format!("{v} is not true or false"))),
    }
}

impl VxlanConfig {
    pub fn parse(cfg: &BackendConfig) -> Result<Self, BackendError> {
        let mtu = match uint_option(cfg, "MTU", 65535)? {
            None | Some(0) => None,
            Some(m) if m < 68 => {
                return Err(bad("MTU", format!("{m} is below the IPv4 minimum of 68")))
            }
            Some(m) => Some(m as u32),
        };
        Ok(VxlanConfig {
            vni: uint_option(cfg, "VNI", MAX_VNI)?.unwrap_or(1) as u32,
            port: uint_option(cfg, "Port", u16::MAX.into())?.unwrap_or(0) as u16,
            gbp: bool_option(cfg, "GBP")?,
            learning: bool_option(cfg, "Learning")?,
            direct_routing: bool_option(cfg, "DirectRouting")?,
            mtu,
        })
    }

    /// The port on the wire (0 in the config means the kernel's default).
    pub fn effective_port(&self) -> u16 {
        if self.port == 0 {
            KERNEL_DEFAULT_PORT
        } else {
            self.port
        }
    }

    /// `flannel.<VNI>`: the device over the IPv4 underlay.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// `flannel-v6.<VNI>`: the device over the IPv6 underlay (upstream's name).
    pub fn device_name_v6(&self) -> String {
        format!("flannel-v6.{}", self.vni)
    }

    /// The IPv4 device's MTU on an external interface of MTU `ext_mtu`.
    pub fn mtu_v4(&self, ext_mtu: u32) -> u32 {
        self.mtu.unwrap_or(ext_mtu.saturating_sub(ENCAP_OVERHEAD))
    }

    /// The IPv6 device's MTU: its outer IPv6 header is 20 bytes longer than IPv4's, so a
    /// full-size inner packet still fits the external interface unfragmented.
    pub fn mtu_v6(&self, ext_mtu: u32) -> u32 {
        self.mtu
            .unwrap_or(ext_mtu.saturating_sub(ENCAP_OVERHEAD_V6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NetworkConfig;

    pub(crate) fn backend_config(json: &str) -> BackendConfig {
        let cfg = NetworkConfig::parse(
            format!(r#"{{"Network":"10.244.0.0/16","Backend":{json}}}"#).as_bytes(),
        )
        .unwrap();
        cfg.backend
    }

    #[test]
    fn options_default_like_upstream() {
        let c = VxlanConfig::parse(&backend_config(r#"{"Type":"vxlan"}"#)).unwrap();
        assert_eq!(
            c,
            VxlanConfig {
                vni: 1,
                port: 0,
                gbp: false,
                learning: false,
                direct_routing: false,
                mtu: None
            }
        );
        assert_eq!(c.device_name(), "flannel.1");
        assert_eq!(c.device_name_v6(), "flannel-v6.1");
        assert_eq!(c.effective_port(), 8472);
        assert_eq!(c.mtu_v4(1500), 1450);
        assert_eq!(c.mtu_v6(1500), 1430);
    }

    #[test]
    fn options_parse_case_insensitively() {
        let c = VxlanConfig::parse(&backend_config(
            r#"{"type":"vxlan","vni":4096,"port":4789,"gbp":true,"Learning":true,"directRouting":true,"mtu":1400}"#,
        ))
        .unwrap();
        assert_eq!(
            c,
            VxlanConfig {
                vni: 4096,
                port: 4789,
                gbp: true,
                learning: true,
                direct_routing: true,
                mtu: Some(1400)
            }
        );
        assert_eq!(c.device_name_v6(), "flannel-v6.4096");
        assert_eq!((c.mtu_v4(1500), c.mtu_v6(1500)), (1400, 1400));
    }

    #[test]
    fn bad_options_are_clear_errors() {
        for (json, option) in [
            (r#"{"Type":"vxlan","VNI":16777216}"#, "VNI"),
            (r#"{"Type":"vxlan","VNI":-1}"#, "VNI"),
            (r#"{"Type":"vxlan","Port":"8472"}"#, "Port"),
            (r#"{"Type":"vxlan","Port":70000}"#, "Port"),
            (r#"{"Type":"vxlan","DirectRouting":"yes"}"#, "DirectRouting"),
            (r#"{"Type":"vxlan","MTU":10}"#, "MTU"),
        ] {
            let err = VxlanConfig::parse(&backend_config(json))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(option) && err.contains("vxlan"),
                "{json}: {err}"
            );
        }
    }
}
