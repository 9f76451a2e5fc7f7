//! The subnet manager: flannel's etcd data (config, leases), lease acquisition and renewal, and
//! the watch that keeps each node's view of its peers equal to etcd's content.

pub mod allocate;
pub mod config_wait;
pub mod etcd_hint;
pub mod manager;
pub mod registry;
pub mod sanity;
pub mod watch;

pub use manager::{LeaseManager, OwnLease};
pub use registry::{EtcdRegistry, RegistryError};
pub use watch::{PeerEvent, PeerWatcher, WatchUpdate};
