//! flanneld: the overlay-network agent, as a library so tests and tools can reuse its parts.

pub mod backend;
pub mod blackhole;
pub mod br_netfilter;
pub mod cli;
pub mod config;
pub mod error_line;
pub mod health;
pub mod iface;
pub mod iface_ipv6;
pub mod instance_lock;
pub mod iptables;
pub mod lease;
pub mod metrics;
pub mod nftables;
pub mod notify;
pub mod repair;
pub mod resync;
pub mod retry;
pub mod sampling;
pub mod startup;
pub mod status;
pub mod subnet;
pub mod subnet_env;
