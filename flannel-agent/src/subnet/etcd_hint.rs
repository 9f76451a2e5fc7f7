//! etcd errors as one line an operator can act on: which endpoint, which flag or file, and
//! the likely fix, instead of the client's nested debug output.
//!
//! etcd-client's errors do not expose their causes through `source()`, so the transport and
//! gRPC layers are opened here by hand and their texts (rustls, hyper, io) classified.

use std::error::Error as StdError;

use tonic::Code;

/// What the hints need to know of the `--etcd-*` flags (never the password).
#[derive(Debug, Clone, Default)]
pub struct EtcdTarget {
    pub endpoints: Vec<String>,
    pub cafile: String,
    pub certfile: String,
    pub keyfile: String,
    pub username: String,
    pub prefix: String,
}

impl EtcdTarget {
    fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }

    fn any_plain_http(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("http://"))
    }
}

/// Every message in the chain below `err`, outermost first, lower-cased for matching.
fn chain_texts(err: &etcd_client::Error) -> Vec<String> {
    let mut texts = Vec::new();
    let mut next: Option<&(dyn StdError + 'static)> = match err {
        etcd_client::Error::TransportError(e) => {
            texts.push(err.to_string());
            e.source()
        }
        // A Status's Display includes a Debug dump of its source: take its parts instead.
        etcd_client::Error::GRpcStatus(s) => {
            texts.push(s.message().to_owned());
            s.source()
        }
        etcd_client::Error::IoError(e) => {
            texts.push(err.to_string());
            e.source()
        }
        _ => {
            texts.push(err.to_string());
            None
        }
    };
    while let Some(e) = next {
        texts.push(e.to_string());
        next = e.source();
    }
    texts
}

/// The deepest cause that says something (the io/rustls error, not "transport error").
fn root_text(texts: &[String]) -> String {
    texts
        .iter()
        .rev()
        .find(|t| !t.is_empty() && !t.eq_ignore_ascii_case("transport error"))
        .cloned()
        .unwrap_or_default()
}

/// A mistake in our own files that no retry can fix (the client could not even be built).
pub fn is_local_mistake(err: &etcd_client::Error) -> bool {
    let all = chain_texts(err).join(" | ").to_lowercase();
    is_key_mismatch(&all)
}

fn is_key_mismatch(all: &str) -> bool {
    all.contains("keymismatch")
        || all.contains("key mismatch")
        || all.contains("inconsistent") && all.contains("key")
}

/// One line for `err` from talking to etcd at `target`.
pub fn explain(err: &etcd_client::Error, target: &EtcdTarget) -> String {
    let texts = chain_texts(err);
    let all = texts.join(" | ").to_lowercase();
    let at = target.endpoints_text();
    let root = root_text(&texts);
    let has = |needle: &str| all.contains(needle);

    if let etcd_client::Error::GRpcStatus(s) = err {
        let msg = s.message();
        match s.code() {
            _ if msg.contains("authentication failed") => {
                return format!(
                    "etcd at {at} rejected user {:?}: wrong user name or password (--etcd-username, --etcd-password)",
                    target.username
                )
            }
            _ if msg.contains("user name is empty") || msg.contains("user name not found") && target.username.is_empty() => {
                return format!(
                    "etcd at {at} requires authentication: set --etcd-username and --etcd-password"
                )
            }
            _ if msg.contains("authentication is not enabled") => {
                return format!(
                    "etcd at {at} has authentication disabled but --etcd-username {:?} was given: drop --etcd-username/--etcd-password or enable auth in etcd",
                    target.username
                )
            }
            _ if msg.contains("invalid auth token") => {
                return format!(
                    "etcd at {at} no longer accepts our auth token (etcd restarted or the token expired); signing in again"
                )
            }
            Code::PermissionDenied => {
                return format!(
                    "etcd at {at}: user {:?} may not use {}: grant its role readwrite on that prefix (etcdctl role grant-permission <role> --prefix=true readwrite {}/)",
                    target.username, target.prefix, target.prefix
                )
            }
            Code::DeadlineExceeded => {
                return format!("etcd at {at} did not answer in time ({msg}); is the cluster healthy?")
            }
            _ => {}
        }
    }
    // TLS: our trust in the server.
    if has("unknownissuer") || has("unknown issuer") || has("badsignature") {
        return format!(
            "etcd at {at} presented a certificate not signed by --etcd-cafile {}: give the CA that signed etcd's certificate",
            target.cafile
        );
    }
    if has("notvalidforname") || has("not valid for name") || has("certificate is not valid for") {
        return format!(
            "etcd at {at} presented a certificate that does not name that host or IP: use an endpoint that matches the certificate's names"
        );
    }
    if has("expired") && has("certificate") {
        return format!("etcd at {at} presented an expired certificate ({root})");
    }
    // TLS: the server's trust in us. TLS 1.3 servers reject a client certificate (or its
    // absence) after the handshake completed on our side: then all we see is the connection
    // closing, right after TLS was set up.
    let tls_rejected = has("certificaterequired")
        || has("certificate required")
        || has("badcertificate")
        || has("bad certificate")
        || has("unknownca")
        || has("unknown ca")
        || !target.cafile.is_empty()
            && [
                "connection closed",
                "connection reset",
                "broken pipe",
                "stream closed",
            ]
            .iter()
            .any(|s| has(s));
    if tls_rejected && target.certfile.is_empty() {
        return format!(
            "etcd at {at} requires a client certificate: set --etcd-certfile and --etcd-keyfile"
        );
    }
    if tls_rejected {
        return format!(
            "etcd at {at} rejected our client certificate (--etcd-certfile {}): it must be signed by a CA in etcd's --trusted-ca-file",
            target.certfile
        );
    }
    if is_key_mismatch(&all) {
        return format!(
            "--etcd-keyfile {} is not the private key of --etcd-certfile {}",
            target.keyfile, target.certfile
        );
    }
    // Plain HTTP/2 spoken to a TLS port gets an HTTP/1 "400 Bad Request" or a reset back.
    if target.any_plain_http()
        && (has("frame with invalid size")
            || has("invalid http version")
            || has("http2 error")
            || has("protocol error")
            || has("connection reset")
            || has("broken pipe")
            || has("connection closed"))
    {
        return format!(
            "etcd at {at} does not speak plain HTTP/2 ({root}); if it serves TLS, use https:// endpoints and --etcd-cafile"
        );
    }
    if has("https without tls") || has("invalid uri") || has("invalid endpoint") {
        return format!("--etcd-endpoints {at}: {root}");
    }
    if has("connection refused") {
        return format!(
            "etcd at {at} refused the connection: is etcd running and listening there? (--etcd-endpoints)"
        );
    }
    if has("timed out") || has("deadline") || has("elapsed") {
        return format!(
            "etcd at {at} did not answer in time: check --etcd-endpoints and the network path ({root})"
        );
    }
    if has("no route to host") || has("network is unreachable") || has("host is unreachable") {
        return format!("etcd at {at} is unreachable: {root} (--etcd-endpoints)");
    }
    if has("dns error") || has("failed to lookup") || has("name or service not known") {
        return format!("etcd at {at}: the host name does not resolve ({root})");
    }
    format!(
        "etcd at {at}: {}",
        crate::error_line::one_line_texts(&texts)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> EtcdTarget {
        EtcdTarget {
            endpoints: vec!["http://192.0.2.1:2379".into()],
            username: "flannel".into(),
            prefix: "/coreos.com/network".into(),
            ..Default::default()
        }
    }

    #[test]
    fn wrong_password_names_the_flags() {
        let e = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        ));
        assert_eq!(
            explain(&e, &target()),
            "etcd at http://192.0.2.1:2379 rejected user \"flannel\": wrong user name or password (--etcd-username, --etcd-password)"
        );
    }

    #[test]
    fn permission_denied_names_the_prefix() {
        let e = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
            "etcdserver: permission denied",
        ));
        assert!(explain(&e, &target()).contains("readwrite /coreos.com/network/"));
    }

    #[test]
    fn refused_connection_points_at_the_endpoint() {
        let e = etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "tcp connect error: Connection refused (os error 111)",
        ));
        assert_eq!(
            explain(&e, &target()),
            "etcd at http://192.0.2.1:2379 refused the connection: is etcd running and listening there? (--etcd-endpoints)"
        );
    }

    #[test]
    fn unknown_errors_stay_on_one_line() {
        let e = etcd_client::Error::WatchError("something\nodd".into());
        let line = explain(&e, &target());
        assert!(!line.contains('\n'));
        assert!(line.starts_with("etcd at http://192.0.2.1:2379: watch error: something odd"));
    }
}
