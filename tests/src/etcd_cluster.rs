//! A real etcd cluster of N members, each in its own namespace, for the reliability tests:
//! clients reach every member on the hosts' underlay bridge (192.0.2.2+i:2379 on the switch's
//! `br0`), members talk to each other over a separate peer bridge (198.51.100.2+i:2380), so a
//! member can be cut off from its cluster while its clients still reach it. Optional
//! username/password auth with a role limited to flannel's prefix.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::netns::Netns;
use crate::tls::TlsFiles;
use crate::{wait_for, Result};

pub const ROOT_PASSWORD: &str = "rootpw";
pub const FLANNEL_USER: &str = "flannel";
pub const FLANNEL_PASSWORD: &str = "flannelpw";

pub struct Member {
    pub name: String,
    pub ns: Netns,
    /// Client address (on the hosts' bridge).
    pub ip: String,
    /// Peer address (on the peer bridge).
    pub peer_ip: String,
    data_dir: PathBuf,
    child: Option<Child>,
    /// `https` when clients must present a certificate.
    scheme: &'static str,
}

impl Member {
    pub fn endpoint(&self) -> String {
        format!("{}://{}:2379", self.scheme, self.ip)
    }

    fn peer_url(&self) -> String {
        format!("http://{}:2380", self.peer_ip)
    }
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    /// Whether auth is on: etcdctl then logs in as root.
    auth: bool,
    /// Where etcdctl runs (the switch: it reaches every member).
    switch_path: PathBuf,
    /// Extra etcd flags for every member.
    extra: Vec<String>,
    /// Client TLS with client certificates, when on.
    pub tls: Option<TlsFiles>,
}

impl EtcdCluster {
    /// Start `n` members joined to `switch`'s `br0` (clients) and a new `brp` (peers).
    pub fn start(switch: &Netns, tag: &str, dir: &std::path::Path, n: usize) -> Result<Self> {
        Self::start_with(switch, tag, dir, n, &[])
    }

    /// [`Self::start`] with extra etcd flags for every member.
    pub fn start_with(
        switch: &Netns,
        tag: &str,
        dir: &std::path::Path,
        n: usize,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_full(switch, tag, dir, n, extra, None)
    }

    /// Members that serve clients over TLS and require a client certificate signed by the
    /// test CA (certificates made in `dir`).
    pub fn start_tls(switch: &Netns, tag: &str, dir: &std::path::Path, n: usize) -> Result<Self> {
        let ips: Vec<String> = (0..n).map(|i| format!("192.0.2.{}", 2 + i)).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let tls = TlsFiles::generate(&dir.join("tls"), &ips)?;
        Self::start_full(switch, tag, dir, n, &[], Some(tls))
    }

    fn start_full(
        switch: &Netns,
        tag: &str,
        dir: &std::path::Path,
        n: usize,
        extra: &[&str],
        tls: Option<TlsFiles>,
    ) -> Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        switch.ip(&["link", "add", "brp", "type", "bridge"])?;
        switch.ip(&["link", "set", "brp", "up"])?;
        let mut members = Vec::new();
        for i in 0..n {
            let ns = Netns::create(&format!("{tag}-e{i}"))?;
            for (bridge, port, dev, ip) in [
                (
                    "br0",
                    format!("e{i}c"),
                    "eth0",
                    format!("192.0.2.{}", 2 + i),
                ),
                (
                    "brp",
                    format!("e{i}p"),
                    "eth1",
                    format!("198.51.100.{}", 2 + i),
                ),
            ] {
                switch.ip(&["link", "add", &port, "type", "veth", "peer", "name", dev])?;
                switch.ip(&["link", "set", dev, "netns", &ns.path().to_string_lossy()])?;
                switch.ip(&["link", "set", &port, "master", bridge, "up"])?;
                ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", dev])?;
                ns.ip(&["link", "set", dev, "up"])?;
            }
            members.push(Member {
                name: format!("m{i}"),
                ip: format!("192.0.2.{}", 2 + i),
                peer_ip: format!("198.51.100.{}", 2 + i),
                ns,
                data_dir: dir.join(format!("etcd-m{i}")),
                child: None,
                scheme,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members,
            initial_cluster,
            auth: false,
            switch_path: switch.path(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    /// `--etcd-endpoints` for an agent: every member.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::endpoint)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let initial_cluster = self.initial_cluster.clone();
        let mut extra = self.extra.clone();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.server_cert),
                ("--key-file", &tls.server_key),
                ("--trusted-ca-file", &tls.ca),
            ] {
                extra.push(format!("{flag}={}", path.display()));
            }
            extra.push("--client-cert-auth".into());
        }
        let m = &mut self.members[i];
        if m.child.is_some() {
            bail!("etcd member {} already running", m.name);
        }
        std::fs::create_dir_all(&m.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.data_dir.with_extension("log"))?;
        let child =
            m.ns.command("etcd")
                .args(["--name", &m.name, "--data-dir"])
                .arg(&m.data_dir)
                .args(["--listen-client-urls", &m.endpoint()])
                .args(["--advertise-client-urls", &m.endpoint()])
                .args(["--listen-peer-urls", &m.peer_url()])
                .args(["--initial-advertise-peer-urls", &m.peer_url()])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args([
                    "--log-level",
                    "error",
                    "--logger",
                    "zap",
                    "--unsafe-no-fsync",
                ])
                .args(&extra)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd member")?;
        m.child = Some(child);
        Ok(())
    }

    /// Wait until every running member reports healthy (a leader, committed proposals).
    pub fn wait_healthy(&self) -> Result<()> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_some() {
                wait_for(Duration::from_secs(30), "etcd member to be healthy", || {
                    self.ctl_at(i, &["endpoint", "health"]).ok()
                })
                .with_context(|| format!("member {}", m.name))?;
            }
        }
        Ok(())
    }

    /// kill -9 a member.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            child.wait()?;
        }
        Ok(())
    }

    /// Stop a member gracefully (SIGTERM).
    pub fn stop(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            child.wait()?;
        }
        Ok(())
    }

    /// Start a stopped member again on its data.
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.spawn(i)
    }

    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// Cut member `i` off from the other members; its clients still reach it.
    pub fn isolate(&self, i: usize) -> Result<()> {
        self.members[i]
            .ns
            .ip(&["link", "set", "eth1", "down"])
            .map(|_| ())
    }

    pub fn heal(&self, i: usize) -> Result<()> {
        self.members[i]
            .ns
            .ip(&["link", "set", "eth1", "up"])
            .map(|_| ())
    }

    /// Turn on auth: user root, and user `flannel` whose role may only read and write
    /// `prefix`. etcdctl logs in as root from then on.
    pub fn enable_auth(&mut self, prefix: &str) -> Result<()> {
        self.ctl(&["user", "add", &format!("root:{ROOT_PASSWORD}")])?;
        self.ctl(&["role", "add", "flannel"])?;
        self.ctl(&[
            "role",
            "grant-permission",
            "flannel",
            "--prefix=true",
            "readwrite",
            prefix,
        ])?;
        self.ctl(&["user", "add", &format!("{FLANNEL_USER}:{FLANNEL_PASSWORD}")])?;
        self.ctl(&["user", "grant-role", FLANNEL_USER, "flannel"])?;
        self.ctl(&["auth", "enable"])?;
        self.auth = true;
        Ok(())
    }

    /// Change a user's password (invalidates the tokens etcd handed out to it).
    pub fn set_password(&self, user: &str, password: &str) -> Result<()> {
        self.ctl_stdin(
            &["user", "passwd", user, "--interactive=false"],
            format!("{password}\n").as_bytes(),
        )
        .map(|_| ())
    }

    fn etcdctl(&self, endpoints: &str, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.switch_path.display()))
            .arg("etcdctl")
            .args(["--endpoints", endpoints])
            .args(["--dial-timeout", "2s", "--command-timeout", "5s"]);
        if self.auth {
            c.arg(format!("--user=root:{ROOT_PASSWORD}"));
        }
        if let Some(tls) = &self.tls {
            c.arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.client_cert.display()))
                .arg(format!("--key={}", tls.client_key.display()));
        }
        c.args(args).env("ETCDCTL_API", "3");
        c
    }

    fn output(mut cmd: Command, args: &[&str], stdin: &[u8]) -> Result<String> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running etcdctl")?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin)?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// etcdctl against every running member.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        self.ctl_stdin(args, b"")
    }

    pub fn ctl_stdin(&self, args: &[&str], stdin: &[u8]) -> Result<String> {
        let eps: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::endpoint)
            .collect();
        Self::output(self.etcdctl(&eps.join(","), args), args, stdin)
    }

    /// etcdctl against member `i` only.
    pub fn ctl_at(&self, i: usize, args: &[&str]) -> Result<String> {
        Self::output(self.etcdctl(&self.members[i].endpoint(), args), args, b"")
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.ctl_stdin(&["put", key], value.as_bytes()).map(|_| ())
    }

    /// Put through member `i` (one that still has a leader).
    pub fn put_at(&self, i: usize, key: &str, value: &str) -> Result<()> {
        Self::output(
            self.etcdctl(&self.members[i].endpoint(), &["put", key]),
            &["put", key],
            value.as_bytes(),
        )
        .map(|_| ())
    }

    pub fn del(&self, key: &str) -> Result<()> {
        self.ctl(&["del", key]).map(|_| ())
    }

    /// All keys under `prefix` with their values, etcd lease IDs and mod revisions.
    pub fn list(&self, prefix: &str) -> Result<Vec<crate::etcd::KeyValue>> {
        crate::etcd::parse_kvs(&self.ctl(&["get", prefix, "--prefix", "-w", "json"])?)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `etcdctl put` with the value on stdin (values larger than an argument may be), against the
/// etcd at `endpoint`, run inside `ns`.
pub fn put_stdin(ns: &Netns, endpoint: &str, key: &str, value: &[u8]) -> Result<()> {
    let mut cmd = ns.command("etcdctl");
    cmd.args([
        "--endpoints",
        endpoint,
        "--command-timeout",
        "10s",
        "put",
        key,
    ])
    .env("ETCDCTL_API", "3");
    EtcdCluster::output(cmd, &["put", key], value).map(|_| ())
}
