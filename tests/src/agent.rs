//! A flanneld process running in a host namespace, with its log, subnet.env and HTTP endpoints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cluster::Host;
use crate::netns::Netns;
use crate::{wait_for, Result};

pub const HEALTH_PORT: u16 = 8471;

pub struct Agent {
    child: Option<Child>,
    pub ns_path: PathBuf,
    ns_name: String,
    pub ip: std::net::Ipv4Addr,
    /// The `--healthz-port` it was started with (the last one given, as flanneld reads them).
    pub health_port: u16,
    pub subnet_file: PathBuf,
    pub log_file: PathBuf,
    /// Where this process's part of the (shared, appended) log file starts.
    log_start: u64,
    status: Option<ExitStatus>,
}

impl Agent {
    pub fn start(host: &Host, etcd_endpoint: &str, extra: &[&str]) -> Result<Self> {
        Self::start_with_env(host, etcd_endpoint, extra, &[])
    }

    pub fn start_with_env(
        host: &Host,
        etcd_endpoint: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut flags = Self::harness_flags(host, etcd_endpoint);
        // --iface collects every value, and beats --iface-regex and --iface-can-reach: any
        // interface option in `extra` replaces the harness's eth0.
        let names_iface = |f: &&str| {
            ["--iface=", "--iface-regex=", "--iface-can-reach="]
                .iter()
                .any(|p| f.starts_with(p))
        };
        if extra.iter().any(names_iface) {
            flags.retain(|f| f != "--iface=eth0");
        }
        flags.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(host, &flags, env)
    }

    /// The flags the harness passes by default: etcd, `--iface=eth0`, subnet file, health
    /// listener and pin dir of `host`.
    pub fn harness_flags(host: &Host, etcd_endpoint: &str) -> Vec<String> {
        vec![
            format!("--etcd-endpoints={etcd_endpoint}"),
            "--iface=eth0".to_owned(),
            format!("--subnet-file={}", host.dir.join("subnet.env").display()),
            format!("--healthz-ip={}", host.ip),
            format!("--healthz-port={HEALTH_PORT}"),
            format!("--bpf-pin-dir=/sys/fs/bpf/{}", host.ns.name),
        ]
    }

    /// Start flanneld in `host` with exactly `flags` (see [`Agent::harness_flags`]).
    pub fn spawn(host: &Host, flags: &[String], env: &[(&str, &str)]) -> Result<Self> {
        let subnet_file = flags
            .iter()
            .find_map(|f| f.strip_prefix("--subnet-file="))
            .map(PathBuf::from)
            .unwrap_or_else(|| host.dir.join("subnet.env"));
        let health_port = flags
            .iter()
            .rev()
            .find_map(|f| f.strip_prefix("--healthz-port=")?.parse().ok())
            .unwrap_or(HEALTH_PORT);
        let log_file = host.dir.join("flanneld.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)?;
        let log_start = log.metadata()?.len();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", host.ns.path().display()))
            .arg(crate::flanneld_bin())
            .args(flags)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("FLANNELD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().context("starting flanneld")?;
        Ok(Agent {
            child: Some(child),
            ns_path: host.ns.path(),
            ns_name: host.ns.name.clone(),
            ip: host.ip,
            health_port,
            subnet_file,
            log_file,
            log_start,
            status: None,
        })
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    /// What this process wrote to the log (earlier agents on the host share the file).
    pub fn own_log(&self) -> String {
        let all = std::fs::read(&self.log_file).unwrap_or_default();
        let start = usize::try_from(self.log_start).unwrap_or(0).min(all.len());
        String::from_utf8_lossy(&all[start..]).into_owned()
    }

    /// Wait until /readyz says ready (fails early if the process exits).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let mut exited = None;
        let r = wait_for(timeout, "flanneld /readyz", || {
            if let Ok(Some(st)) = self.try_wait() {
                exited = Some(st);
                return Some(false);
            }
            matches!(self.http_get("/readyz"), Ok((200, _))).then_some(true)
        });
        match (r, exited) {
            (_, Some(st)) => bail!("flanneld exited ({st}) before ready:\n{}", self.log()),
            (Err(e), _) => bail!("{e}\n--- flanneld log ---\n{}", self.log()),
            (Ok(_), None) => Ok(()),
        }
    }

    /// GET a path on the agent's health listener: (status, body).
    pub fn http_get(&self, path: &str) -> Result<(u16, String)> {
        let ns = Netns {
            name: self.ns_name.clone(),
        };
        let addr = SocketAddr::from((self.ip, self.health_port));
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let r = ns.run_in(move || -> Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(req.as_bytes())?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            Ok(buf)
        });
        // The namespace belongs to the cluster; do not delete it when this handle goes.
        std::mem::forget(ns);
        let resp = r??;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("bad HTTP response")?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        // Undo chunked encoding if present (axum streams small bodies with a length, usually).
        Ok((status, body))
    }

    /// The labels of `flannel_dataplane_info` on /metrics (`kind`; for eBPF also `attach`
    /// and `decap`), once the sampler has reported the data plane (it samples every second).
    pub fn dataplane_info(&self) -> Result<std::collections::BTreeMap<String, String>> {
        crate::wait_for(Duration::from_secs(5), "flannel_dataplane_info", || {
            let (_, body) = self.http_get("/metrics").ok()?;
            let line = body
                .lines()
                .find(|l| l.starts_with("flannel_dataplane_info{"))?;
            let labels = line
                .strip_prefix("flannel_dataplane_info{")?
                .split_once('}')?
                .0;
            Some(
                labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                    .collect(),
            )
        })
        .with_context(|| format!("--- flanneld log ---\n{}", self.log()))
    }

    /// `flannel_repairs_total{what="<what>"}` on /metrics: how often the resync repaired it.
    pub fn repairs(&self, what: &str) -> Result<u64> {
        let (_, body) = self.http_get("/metrics")?;
        let series = format!("flannel_repairs_total{{what=\"{what}\"}} ");
        let line = body
            .lines()
            .find(|l| l.starts_with(&series))
            .with_context(|| format!("no {series} in /metrics"))?;
        Ok(line[series.len()..].trim().parse()?)
    }

    /// Checks that the eBPF paths `/metrics` reports are the ones the agent logged choosing
    /// (one INFO line per choice, with its reason).
    pub fn assert_logged_paths(&self, info: &std::collections::BTreeMap<String, String>) {
        let log = self.log();
        record_paths(&log);
        let decap = match info.get("decap").map(String::as_str) {
            Some("xdp") => "decapsulating with native XDP on ",
            Some("tc") => "decapsulating on TC ingress of ",
            other => panic!("decap label {other:?} in {info:?}"),
        };
        assert!(log.contains(decap), "expected {decap:?} in the log:\n{log}");
        let attach = match info.get("attach").map(String::as_str) {
            Some("tcx") => "attaching with TCX",
            Some("tc") => "attaching with classic TC (clsact + cls_bpf)",
            other => panic!("attach label {other:?} in {info:?}"),
        };
        assert!(
            log.contains(attach),
            "expected {attach:?} in the log:\n{log}"
        );
    }

    /// This agent's view of its peers: sorted (subnet, public IP).
    pub fn peers(&self) -> Result<Vec<(String, String)>> {
        let (status, body) = self.http_get("/peers")?;
        if status != 200 {
            bail!("/peers returned {status}");
        }
        let v: serde_json::Value = serde_json::from_str(body.trim()).context("parsing /peers")?;
        let mut peers: Vec<(String, String)> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["Subnet"].as_str().unwrap_or("").to_owned(),
                    p["Lease"]["PublicIP"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        peers.sort();
        Ok(peers)
    }

    /// The value of `key` in subnet.env, if the file has it.
    pub fn subnet_env_value(&self, key: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.subnet_file).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('=').map(str::to_owned))
    }

    /// FLANNEL_MTU from subnet.env.
    pub fn mtu(&self) -> Option<u32> {
        self.subnet_env_value("FLANNEL_MTU")?.parse().ok()
    }

    /// FLANNEL_SUBNET from subnet.env, as the network address (e.g. 10.244.5.0/24).
    pub fn subnet(&self) -> Option<String> {
        self.subnet_env().ok()?.subnet_network().ok()
    }

    /// FLANNEL_IPV6_SUBNET from subnet.env, as the network address (e.g. fd00:10:244:5::/64).
    pub fn ipv6_subnet(&self) -> Option<String> {
        let v = self.subnet_env_value("FLANNEL_IPV6_SUBNET")?;
        let (ip, len) = v.split_once('/')?;
        let ip: std::net::Ipv6Addr = ip.parse().ok()?;
        let len: u32 = len.parse().ok().filter(|l| *l <= 128)?;
        let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
        Some(format!(
            "{}/{len}",
            std::net::Ipv6Addr::from(u128::from(ip) & mask)
        ))
    }

    /// This agent's subnet.env, as the CNI rendering reads it.
    pub fn subnet_env(&self) -> Result<crate::cni::SubnetEnv> {
        crate::cni::SubnetEnv::read(&self.subnet_file)
    }

    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self.pid().context("agent not running")?;
        kill(Pid::from_raw(pid), sig)?;
        Ok(())
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(st) = self.status {
            return Ok(Some(st));
        }
        match self.child.as_mut() {
            None => Ok(None),
            Some(c) => {
                let st = c.try_wait()?;
                self.status = st;
                Ok(st)
            }
        }
    }

    /// Wait for the process to exit, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        wait_for(timeout, "flanneld to exit", || {
            self.try_wait().ok().flatten()
        })
    }

    /// Stop with SIGTERM (SIGKILL if it does not exit within 2 s).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            return Ok(st);
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(Duration::from_secs(2)) {
            Ok(st) => Ok(st),
            Err(_) => {
                self.signal(Signal::SIGKILL)?;
                self.wait_exit(Duration::from_secs(2))
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.try_wait() {
            let _ = self.signal(Signal::SIGKILL);
            if let Some(c) = self.child.as_mut() {
                let _ = c.wait();
            }
        }
    }
}

/// The agent's path choices (its INFO lines on attach, decap and what the kernel takes),
/// appended to `$FLANNEL_TEST_PATHS_FILE` when set: the kernel matrix reports per kernel what
/// the agents chose there.
fn record_paths(log: &str) {
    use std::io::Write;
    const CHOICES: &[&str] = &[
        "attaching with ",
        "decapsulating ",
        "BPF_F_ADJ_ROOM_DECAP_L4_UDP",
        "bpf_skb_adjust_room",
        "BTF",
    ];
    let Some(path) = std::env::var_os("FLANNEL_TEST_PATHS_FILE") else {
        return;
    };
    let lines: String = log
        .lines()
        .filter(|l| CHOICES.iter().any(|c| l.contains(c)))
        // Without env_logger's "[time level module] ": the same choice reads the same on
        // every agent.
        .map(|l| l.split_once("] ").map_or(l, |(_, message)| message).trim())
        .map(|l| format!("{l}\n"))
        .collect();
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(lines.as_bytes()));
    if let Err(e) = appended {
        eprintln!("FLANNEL_TEST_PATHS_FILE {}: {e}", path.to_string_lossy());
    }
}
