//! Certificates for etcd with TLS and client-certificate auth, made by Debian's openssl: a CA,
//! a server certificate for the etcd members' addresses, a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netns::run;
use crate::Result;

pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("openssl").current_dir(dir).args(args)).map(|_| ())
}

/// A P-256 key and a certificate for it signed by the CA in `dir`.
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> Result<()> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ],
    )?;
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ],
    )
}

impl TlsFiles {
    /// Make a CA and certificates in `dir`; the server certificate names `server_ips`.
    pub fn generate(dir: &Path, server_ips: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=flannel-test-ca",
            ],
        )?;
        let sans: Vec<String> = server_ips.iter().map(|ip| format!("IP:{ip}")).collect();
        issue(
            dir,
            "server",
            "/CN=etcd",
            &format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                sans.join(",")
            ),
        )?;
        issue(
            dir,
            "client",
            "/CN=flanneld",
            "extendedKeyUsage=clientAuth\n",
        )?;
        Ok(TlsFiles {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        })
    }
}
