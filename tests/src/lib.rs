//! Test harness: network namespaces, a real etcd server, hosts and flanneld agents, containers
//! attached by the real CNI plugins, all kept inside namespaces this process creates (and
//! removes on success and failure). `overlay::Overlay` puts them together.

pub mod agent;
pub mod bpf;
pub mod cluster;
pub mod cni;
pub mod container;
pub mod dual_stack;
pub mod ebpf_host;
pub mod etcd;
pub mod etcd_cluster;
pub mod netns;
pub mod overlay;
pub mod pki;
pub mod pktgen;
pub mod rng;
pub mod tc;
pub mod tls;
pub mod traffic;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use agent::Agent;
pub use cluster::{Cluster, Host, Underlay};
pub use cni::SubnetEnv;
pub use container::Container;
pub use etcd::Etcd;
pub use netns::Netns;
pub use overlay::{Overlay, OverlayBuilder};
pub use traffic::{tcp_send, tcp_transfer, Transfer};

pub type Result<T> = anyhow::Result<T>;

/// `$FLANNEL_TEST_TIME_SCALE` (default 1): how much longer than on this machine things may take
/// where the tests run. The kernel matrix sets it for its VMs (qemu without KVM runs 5-20x
/// slower): three agents starting at once there need more than `overlay::READY` to be ready.
pub fn time_scale() -> f64 {
    std::env::var("FLANNEL_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f >= 1.0)
        .unwrap_or(1.0)
}

/// Poll `probe` until it returns `Some`, or fail after `timeout` (times `time_scale()`) saying
/// what we waited for.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let timeout = timeout.mul_f64(time_scale());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// These tests need root (namespaces, etcd in a namespace). Fail loudly otherwise.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these integration tests create network namespaces and must run as root (they never skip)"
    );
}

/// The flanneld binary under test: $FLANNELD_BIN, else `flanneld` in the release or debug
/// dir of the target dir this test binary was built in (`<target>/<profile>/deps/<test>`), so
/// no guess about `CARGO_TARGET_DIR` or the working directory is needed.
pub fn flanneld_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLANNELD_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("flanneld");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "flanneld binary not found under {}: build it first (cargo xtask build) or set FLANNELD_BIN",
        target.display()
    );
}

/// A scratch directory for one test, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
