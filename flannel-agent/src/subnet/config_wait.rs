//! Waiting for a usable network config at `<prefix>/config`.
//!
//! Upstream keeps retrying until the config is there and valid; so do we, but by watching the
//! key: a config fixed in etcd heals every waiting node at once, without a restart. The node
//! stays unready (`/readyz` 503) meanwhile and says, once per change, what is wrong.

use std::time::Duration;

use crate::config::{ConfigError, NetworkConfig};
use crate::subnet::registry::{ConfigState, ConfigWatch, Registry};

/// How often a node still waiting for a missing config says so again.
const MISSING_REMINDER: Duration = Duration::from_secs(30);
/// Pause before reading again after etcd could not be read or watched.
const RETRY: Duration = Duration::from_secs(2);

/// An example config for the hint, in the form `etcdctl put` takes.
const EXAMPLE: &str = r#"'{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}'"#;

/// What was last reported, so that each state is logged once (plus slow reminders).
#[derive(Debug, PartialEq)]
enum Reported {
    Nothing,
    Missing,
    Invalid(i64),
    Unreachable(String),
}

/// Returns the config once it exists, is valid and `accept` (e.g. the backend it names can be
/// built from it) says it can run here, with what `accept` made of it. Never gives up.
pub async fn wait_for_config<R: Registry, T>(
    registry: &R,
    mut accept: impl FnMut(&NetworkConfig) -> Result<T, String>,
) -> (NetworkConfig, T) {
    let key = registry.config_key();
    let mut reported = Reported::Nothing;
    loop {
        let revision = match registry.read_config().await.map(runnable) {
            Ok((
                ConfigState::Valid {
                    config,
                    mod_revision,
                },
                rev,
            )) => match accept(&config) {
                Ok(made) => {
                    if matches!(reported, Reported::Invalid(_) | Reported::Unreachable(_)) {
                        log::info!("network config at {key} is usable now");
                    }
                    return (config, made);
                }
                Err(why) => {
                    if reported != Reported::Invalid(mod_revision) {
                        log::error!(
                            "network config at {key} cannot run here: {why}; fix it in etcd (etcdctl put {key} ...): waiting for the config to change"
                        );
                        reported = Reported::Invalid(mod_revision);
                    }
                    rev
                }
            },
            Ok((ConfigState::Missing, rev)) => {
                if reported != Reported::Missing {
                    log_missing(&key, registry.prefix());
                    reported = Reported::Missing;
                }
                rev
            }
            Ok((
                ConfigState::Invalid {
                    error,
                    mod_revision,
                },
                rev,
            )) => {
                if reported != Reported::Invalid(mod_revision) {
                    log::error!(
                        "invalid network config at {key}: {error}; fix it in etcd (etcdctl put {key} ...): waiting for the config to change"
                    );
                    reported = Reported::Invalid(mod_revision);
                }
                rev
            }
            Err(e) => {
                let line = registry.explain(&e);
                if reported != Reported::Unreachable(line.clone()) {
                    log::warn!("reading the network config: {line}; retrying");
                    reported = Reported::Unreachable(line);
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        wait_for_change(registry, revision, &key, &reported).await;
    }
}

/// A valid upstream config this node cannot run is as good as invalid here: wait for a change.
fn runnable((state, revision): (ConfigState, i64)) -> (ConfigState, i64) {
    match state {
        // IPv6-only runs where IPv6 does, the IPv4 side switched off; udp is IPv4 only.
        ConfigState::Valid {
            config,
            mod_revision,
        } if !config.enable_ipv4 && !runs_ipv6(&config.backend.backend_type) => (
            ConfigState::Invalid {
                error: ConfigError::Field {
                    field: "EnableIPv4",
                    value: "false".into(),
                    message: ipv6_refusal(&config.backend.backend_type).into(),
                },
                mod_revision,
            },
            revision,
        ),
        ConfigState::Valid {
            config,
            mod_revision,
        } if config.enable_ipv6 && !runs_ipv6(&config.backend.backend_type) => (
            ConfigState::Invalid {
                error: ConfigError::Field {
                    field: "EnableIPv6",
                    value: "true".into(),
                    message: ipv6_refusal(&config.backend.backend_type).into(),
                },
                mod_revision,
            },
            revision,
        ),
        other => (other, revision),
    }
}

/// Backends that carry IPv6 here, also IPv6-only: host-gw (IPv6 routes), vxlan
/// (`flannel-v6.<VNI>`) and alloc (leases only).
fn runs_ipv6(backend_type: &str) -> bool {
    ["host-gw", "vxlan", "alloc"]
        .iter()
        .any(|b| backend_type.eq_ignore_ascii_case(b))
}

/// Why EnableIPv6 cannot run: the udp backend is IPv4 only (upstream's too); the others are
/// IPv4 only in this flanneld for now.
fn ipv6_refusal(backend_type: &str) -> &'static str {
    if backend_type.eq_ignore_ascii_case("udp") {
        "the udp backend carries IPv4 only (as upstream's): use vxlan or host-gw for IPv6, or set EnableIPv6 to false"
    } else {
        "this flanneld carries IPv6 with the vxlan and host-gw backends only; use one of them or set EnableIPv6 to false"
    }
}

fn log_missing(key: &str, prefix: &str) {
    log::info!(
        "no network config at {key} yet: create it with the etcd v3 API, e.g. `ETCDCTL_API=3 etcdctl put {key} {EXAMPLE}` (or start flanneld with the --etcd-prefix that holds it; now {prefix})"
    );
}

/// Blocks until the config key changes after `revision` (or the watch breaks), reminding
/// slowly while the config is missing.
async fn wait_for_change<R: Registry>(registry: &R, revision: i64, key: &str, reported: &Reported) {
    let mut watch = match registry.watch_config(revision + 1).await {
        Ok(w) => w,
        Err(e) => {
            log::debug!("watching {key}: {}", registry.explain(&e));
            tokio::time::sleep(RETRY).await;
            return;
        }
    };
    loop {
        match tokio::time::timeout(MISSING_REMINDER, watch.changed()).await {
            // Changed, ended or broken: read the config again.
            Ok(_) => return,
            Err(_) if *reported == Reported::Missing => log_missing(key, registry.prefix()),
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(json: &str) -> String {
        let config = NetworkConfig::parse(json.as_bytes()).unwrap();
        let (state, _) = runnable((
            ConfigState::Valid {
                config,
                mod_revision: 7,
            },
            7,
        ));
        match state {
            ConfigState::Invalid { error, .. } => error.to_string(),
            _ => panic!("{json} runnable"),
        }
    }

    use crate::subnet::memory::MemoryRegistry;
    use std::time::Duration;

    const GOOD: &[u8] = br#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;

    /// Runs `wait_for_config` in a task: its result once it returns.
    fn waiting(
        registry: &MemoryRegistry,
        accept: impl FnMut(&NetworkConfig) -> Result<(), String> + Send + 'static,
    ) -> tokio::task::JoinHandle<NetworkConfig> {
        let registry = registry.clone();
        tokio::spawn(async move { wait_for_config(&registry, accept).await.0 })
    }

    /// Lets the waiting task run until it blocks (paused time runs ahead meanwhile).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_config_is_waited_for_and_taken_once_it_appears() {
        let registry = MemoryRegistry::new();
        let task = waiting(&registry, |_| Ok(()));
        // Longer than the reminder: still waiting, never giving up.
        tokio::time::sleep(MISSING_REMINDER * 3).await;
        assert!(!task.is_finished());
        registry.set_config(Some(GOOD));
        let config = task.await.unwrap();
        assert_eq!(config.network.to_string(), "10.244.0.0/16");
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalid_config_waits_until_fixed_and_a_refused_one_until_changed() {
        let registry = MemoryRegistry::new();
        registry.set_config(Some(br#"{"Network":"not a network"}"#));
        let mut offered = Vec::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = waiting(&registry, move |c| {
            let _ = tx.send(c.subnet_len);
            // This node refuses /25 subnets (as a backend may refuse a config).
            (c.subnet_len != 25)
                .then_some(())
                .ok_or("no /25 here".into())
        });
        settle().await;
        assert!(!task.is_finished());
        registry.set_config(Some(br#"{"Network":"10.244.0.0/16","SubnetLen":25}"#));
        settle().await;
        while let Ok(len) = rx.try_recv() {
            offered.push(len);
        }
        assert_eq!(offered, vec![25], "the valid config was offered once");
        assert!(!task.is_finished());
        registry.set_config(Some(GOOD));
        assert_eq!(task.await.unwrap().subnet_len, 24);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_waited_out() {
        let registry = MemoryRegistry::new();
        registry.set_down(true);
        let task = waiting(&registry, |_| Ok(()));
        tokio::time::sleep(RETRY * 5).await;
        assert!(!task.is_finished());
        registry.set_config(Some(GOOD));
        registry.set_down(false);
        assert_eq!(task.await.unwrap().network.to_string(), "10.244.0.0/16");
    }

    fn runs(json: &str) -> bool {
        let config = NetworkConfig::parse(json.as_bytes()).unwrap();
        let (state, _) = runnable((
            ConfigState::Valid {
                config,
                mod_revision: 7,
            },
            7,
        ));
        matches!(state, ConfigState::Valid { .. })
    }

    #[test]
    fn ipv6_only_and_dual_stack_run_with_vxlan() {
        assert!(runs(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"vxlan"}}"#
        ));
        assert!(runs(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"vxlan"}}"#
        ));
        assert!(runs(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"host-gw"}}"#
        ));
        assert!(runs(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"host-gw"}}"#
        ));
    }

    #[test]
    fn ipv6_only_with_udp_or_an_unknown_backend_is_refused_in_one_line() {
        let udp = refusal(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"udp"}}"#,
        );
        assert!(
            udp.contains("EnableIPv4") && udp.contains("udp backend carries IPv4 only"),
            "{udp}"
        );
        let other = refusal(
            r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"ipip"}}"#,
        );
        assert!(other.contains("vxlan and host-gw backends only"), "{other}");
        for line in [udp, other] {
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn udp_with_ipv6_is_refused_naming_the_backend() {
        let udp = refusal(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48","Backend":{"Type":"udp"}}"#,
        );
        assert!(
            udp.contains("EnableIPv6") && udp.contains("udp backend carries IPv4 only"),
            "{udp}"
        );
        // No Backend at all means udp too.
        let default = refusal(
            r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/48"}"#,
        );
        assert!(default.contains("udp backend"), "{default}");
    }
}
