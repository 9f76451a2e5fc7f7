//! The certificate set an etcd cluster with TLS and client-certificate auth needs: a CA, a
//! server certificate for the members' addresses and a client certificate (see `pki`).

use std::path::{Path, PathBuf};

use crate::pki::Ca;
use crate::Result;

pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Make a CA and certificates in `dir`; the server certificate names `server_ips`.
    pub fn generate(dir: &Path, server_ips: &[&str]) -> Result<Self> {
        let ca = Ca::new(dir, "ca")?;
        let server = ca.server("server", server_ips)?;
        let client = ca.client("client", "flanneld")?;
        Ok(TlsFiles {
            ca: ca.pair.cert,
            server_cert: server.cert,
            server_key: server.key,
            client_cert: client.cert,
            client_key: client.key,
        })
    }
}
