//! A real etcd server running inside a namespace, and etcdctl against it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;

use crate::netns::Netns;
use crate::pki::CertPair;
use crate::{wait_for, Result};

pub struct Etcd {
    ns_path: PathBuf,
    pub ip: String,
    pub data_dir: PathBuf,
    child: Option<Child>,
    tls: Option<ServerTls>,
    /// `user:password` etcdctl signs in with once auth is enabled.
    ctl_user: Option<String>,
}

/// An etcd serving clients over TLS only.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The CA that signed `server` (and the client certificates etcd accepts).
    pub ca: String,
    pub server: CertPair,
    /// Require client certificates signed by `ca` (etcd's --client-cert-auth).
    pub client_cert_auth: bool,
    /// The certificate etcdctl presents.
    pub ctl_client: CertPair,
}

impl Etcd {
    /// Start etcd in `ns` listening on `ip:2379`, with its data under `data_dir`.
    pub fn start(ns: &Netns, ip: &str, data_dir: PathBuf) -> Result<Self> {
        for tool in ["etcd", "etcdctl"] {
            if Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
            {
                bail!("{tool} is not installed: run `cargo xtask setup` (installs etcd-server and etcd-client)");
            }
        }
        let mut etcd = Etcd {
            ns_path: ns.path(),
            ip: ip.to_owned(),
            data_dir,
            child: None,
            tls: None,
            ctl_user: None,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// Like [`Etcd::start`], serving clients over TLS only (`https://ip:2379`).
    pub fn start_tls(ns: &Netns, ip: &str, data_dir: PathBuf, tls: ServerTls) -> Result<Self> {
        let mut etcd = Etcd {
            ns_path: ns.path(),
            ip: ip.to_owned(),
            data_dir,
            child: None,
            tls: Some(tls),
            ctl_user: None,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:2379", self.ip)
    }

    /// Turn on username/password auth: a `root` user (password `root_password`, what etcdctl
    /// uses from now on) and `user` with a role that may read and write `prefix` only.
    pub fn enable_auth(
        &mut self,
        root_password: &str,
        user: &str,
        password: &str,
        prefix: &str,
    ) -> Result<()> {
        let role = format!("{user}-role");
        self.ctl(&["user", "add", &format!("root:{root_password}")])?;
        self.ctl(&["role", "add", &role])?;
        self.ctl(&[
            "role",
            "grant-permission",
            &role,
            "--prefix=true",
            "readwrite",
            &format!("{}/", prefix.trim_end_matches('/')),
        ])?;
        self.ctl(&["user", "add", &format!("{user}:{password}")])?;
        self.ctl(&["user", "grant-role", user, &role])?;
        self.ctl(&["auth", "enable"])?;
        self.ctl_user = Some(format!("root:{root_password}"));
        Ok(())
    }

    /// (Re)start the server on the same data directory and wait until it answers.
    pub fn resume(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("etcd already running");
        }
        std::fs::create_dir_all(&self.data_dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))?;
        // Peers on the client IP: several single-member servers can share one namespace.
        let peer = format!("http://{}:2380", self.ip);
        let peer = peer.as_str();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path.display()))
            .arg("etcd")
            .args(["--name", "fltest", "--data-dir"])
            .arg(&self.data_dir);
        if let Some(tls) = &self.tls {
            cmd.args(["--cert-file", &tls.server.cert_str()])
                .args(["--key-file", &tls.server.key_str()])
                .args(["--trusted-ca-file", &tls.ca]);
            if tls.client_cert_auth {
                cmd.arg("--client-cert-auth");
            }
        }
        let child = cmd
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args([
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
            ])
            .args(["--initial-cluster", &format!("fltest={peer}")])
            .args([
                "--log-level",
                "error",
                "--logger",
                "zap",
                "--unsafe-no-fsync",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.child = Some(child);
        wait_for(Duration::from_secs(20), "etcd to answer", || {
            self.ctl(&["endpoint", "health"]).ok()
        })?;
        Ok(())
    }

    /// Stop the server (simulating an outage); `resume` brings it back with its data.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            child.wait()?;
        }
        Ok(())
    }

    /// Run etcdctl (v3 API) against this server; returns stdout.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.ns_path.display()))
            .arg("etcdctl")
            .args([
                "--endpoints",
                &self.endpoint(),
                "--dial-timeout",
                "2s",
                "--command-timeout",
                "5s",
            ])
            .args(self.ctl_security())
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// etcdctl's TLS and auth flags for this server.
    fn ctl_security(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(tls) = &self.tls {
            args.push(format!("--cacert={}", tls.ca));
            args.push(format!("--cert={}", tls.ctl_client.cert_str()));
            args.push(format!("--key={}", tls.ctl_client.key_str()));
        }
        if let Some(user) = &self.ctl_user {
            args.push(format!("--user={user}"));
        }
        args
    }

    pub fn put(&self, key: &str, value: &str) -> Result<()> {
        self.ctl(&["put", key, value]).map(|_| ())
    }

    pub fn del(&self, key: &str) -> Result<()> {
        self.ctl(&["del", key]).map(|_| ())
    }

    /// Value of `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<String>> {
        let out = self.ctl(&["get", key, "--print-value-only"])?;
        let v = out.strip_suffix('\n').unwrap_or(&out);
        Ok((!out.is_empty()).then(|| v.to_owned()))
    }

    /// All keys under `prefix` with their values, their etcd lease IDs and mod revisions.
    pub fn list(&self, prefix: &str) -> Result<Vec<KeyValue>> {
        parse_kvs(&self.ctl(&["get", prefix, "--prefix", "-w", "json"])?)
    }

    /// The current revision of the store.
    pub fn revision(&self) -> Result<i64> {
        let out = self.ctl(&[
            "get",
            "/",
            "--prefix",
            "--keys-only",
            "--limit",
            "1",
            "-w",
            "json",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["header"]["revision"]
            .as_i64()
            .context("no revision in etcdctl output")
    }

    /// IDs of all live etcd leases.
    pub fn lease_ids(&self) -> Result<Vec<String>> {
        let out = self.ctl(&["lease", "list"])?;
        Ok(out
            .lines()
            .skip(1)
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect())
    }
}

/// The keys of `etcdctl get -w json` output (keys and values come base64-encoded).
pub(crate) fn parse_kvs(json: &str) -> Result<Vec<KeyValue>> {
    let v: serde_json::Value = serde_json::from_str(json)?;
    let b64 = |s: &serde_json::Value| -> Result<String> {
        let s = s.as_str().unwrap_or("");
        Ok(String::from_utf8(BASE64.decode(s)?)?)
    };
    let mut kvs = Vec::new();
    for kv in v["kvs"].as_array().into_iter().flatten() {
        kvs.push(KeyValue {
            key: b64(&kv["key"])?,
            value: b64(&kv["value"])?,
            lease: kv["lease"].as_i64().unwrap_or(0),
            mod_revision: kv["mod_revision"].as_i64().unwrap_or(0),
        });
    }
    Ok(kvs)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    pub lease: i64,
    pub mod_revision: i64,
}

/// The peers a node at `own_ip` must see, given the subnet leases `kvs` listed under the
/// key prefix `subnets`: (subnet as `a.b.c.d/len`, PublicIP) of every valid lease but its own,
/// sorted.
pub fn peer_view(
    kvs: impl IntoIterator<Item = KeyValue>,
    subnets: &str,
    own_ip: &str,
) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = kvs
        .into_iter()
        .filter_map(|kv| {
            let name = kv.key.strip_prefix(subnets)?;
            let (ip, len) = name.split_once('-')?;
            let attrs: serde_json::Value = serde_json::from_str(&kv.value).ok()?;
            let public = attrs["PublicIP"].as_str()?.to_owned();
            (public != own_ip).then(|| (format!("{ip}/{len}"), public))
        })
        .collect();
    v.sort();
    v
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
