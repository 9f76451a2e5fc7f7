//! Certificates for etcd TLS tests, made with Debian's `openssl` in a scratch directory: a CA,
//! server certificates for an IP, client certificates, and a second, unrelated CA.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netns::run;
use crate::Result;

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertPair {
    pub fn cert_str(&self) -> String {
        self.cert.display().to_string()
    }
    pub fn key_str(&self) -> String {
        self.key.display().to_string()
    }
}

/// A certificate authority that signs server and client certificates.
pub struct Ca {
    dir: PathBuf,
    pub pair: CertPair,
}

fn openssl(args: &[&str]) -> Result<()> {
    run(Command::new("openssl").args(args)).map(|_| ())
}

impl Ca {
    /// A new self-signed CA named `name` under `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pair = CertPair {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &pair.key_str(),
            "-out",
            &pair.cert_str(),
        ])?;
        Ok(Ca {
            dir: dir.to_owned(),
            pair,
        })
    }

    /// The CA certificate's path (what `--etcd-cafile` takes).
    pub fn cert_path(&self) -> String {
        self.pair.cert_str()
    }

    /// A certificate for `cn`, valid for the IPs in `ips` (server) or for client auth.
    fn issue(&self, name: &str, cn: &str, ext: &str) -> Result<CertPair> {
        let pair = CertPair {
            cert: self.dir.join(format!("{name}.pem")),
            key: self.dir.join(format!("{name}-key.pem")),
        };
        let csr = self.dir.join(format!("{name}.csr"));
        let ext_file = self.dir.join(format!("{name}.ext"));
        std::fs::write(&ext_file, ext)?;
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &pair.key_str(),
            "-out",
            &csr.display().to_string(),
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr.display().to_string(),
            "-CA",
            &self.pair.cert_str(),
            "-CAkey",
            &self.pair.key_str(),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file.display().to_string(),
            "-out",
            &pair.cert_str(),
        ])?;
        Ok(pair)
    }

    /// A server certificate for `ips` (subjectAltName IPs); etcd members also present it to
    /// each other as clients.
    pub fn server(&self, name: &str, ips: &[&str]) -> Result<CertPair> {
        let sans: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        self.issue(
            name,
            name,
            &format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
                sans.join(",")
            ),
        )
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, name: &str, cn: &str) -> Result<CertPair> {
        self.issue(
            name,
            cn,
            "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
        )
    }
}
