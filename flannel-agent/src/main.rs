//! flanneld: acquires this host's subnet lease in etcd, runs the configured backend, follows
//! peer leases and keeps subnet.env up to date.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use flannel_agent::backend::{AnyBackend, Backend, BackendOptions};
use flannel_agent::cli::Flags;
use flannel_agent::error_line;
use flannel_agent::health::{self, AgentState};
use flannel_agent::iface::{lookup_external_interface, IfaceSelector};
use flannel_agent::instance_lock::InstanceLock;
use flannel_agent::lease::Lease;
use flannel_agent::metrics;
use flannel_agent::notify;
use flannel_agent::subnet::config_wait::wait_for_config;
use flannel_agent::subnet::manager::ManagerError;
use flannel_agent::subnet::manager::RenewOutcome;
use flannel_agent::subnet::registry::{explain_with, EtcdSettings};
use flannel_agent::subnet::sanity::LeaseSanity;
use flannel_agent::subnet::RegistryError;
use flannel_agent::subnet::{EtcdRegistry, LeaseManager, PeerEvent, PeerWatcher, WatchUpdate};
use flannel_agent::subnet_env::{PreviousSubnetEnv, SubnetEnv};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

mod inspect;
mod uninstall;

const RESYNC_INTERVAL: Duration = Duration::from_secs(10);
/// How often the data plane counters behind `/metrics` are refreshed.
const METRICS_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    // Subcommands come before flanneld's own (Go-style) flags.
    match std::env::args().nth(1).as_deref() {
        Some("uninstall") => return run_uninstall(),
        Some("dataplane") => return run_dataplane(),
        _ => {}
    }
    let flags = match Flags::parse_go_style(std::env::args()) {
        Ok(f) => f,
        Err(e) => e.exit(),
    };
    init_logging(flags.verbosity);
    for line in &flags.env_errors {
        log::error!("{line}");
    }
    if flags.kube_subnet_mgr {
        log::error!(
            "--kube-subnet-mgr is not supported by this flanneld: it manages subnets in etcd only"
        );
        return ExitCode::from(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(run(flags));
    // Never wait for stuck background work on the way out: exit within a second.
    rt.shutdown_timeout(Duration::from_millis(300));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", error_line::anyhow_line(&e));
            ExitCode::from(1)
        }
    }
}

/// Arguments after the subcommand name, for its own parser.
fn subcommand_args() -> impl Iterator<Item = String> {
    std::env::args()
        .enumerate()
        .filter_map(|(i, a)| (i != 1).then_some(a))
}

fn run_uninstall() -> ExitCode {
    use clap::Parser;
    let args = uninstall::UninstallArgs::parse_from(subcommand_args());
    init_logging(0);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(uninstall::uninstall(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", error_line::anyhow_line(&e));
            ExitCode::from(1)
        }
    }
}

fn run_dataplane() -> ExitCode {
    use clap::Parser;
    let args = inspect::DataplaneArgs::parse_from(subcommand_args());
    match inspect::render(&args.bpf_pin_dir) {
        Ok(text) => {
            print!("{text}");
            if let Some(why) = inspect::wrong_namespace(&args.bpf_pin_dir) {
                eprintln!(
                    "flanneld dataplane: wrong network namespace ({why}): peers and counters are shown, the hooks are not"
                );
                return ExitCode::from(2);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flanneld dataplane: {}", error_line::anyhow_line(&e));
            ExitCode::from(1)
        }
    }
}

fn init_logging(verbosity: u8) {
    let default = match verbosity {
        0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        r = agent(flags) => r,
        _ = sigterm.recv() => { log::info!("SIGTERM: exiting"); notify::stopping(); Ok(()) }
        _ = sigint.recv() => { log::info!("SIGINT: exiting"); notify::stopping(); Ok(()) }
    }
}

/// How often a failure that keeps repeating word for word is logged again.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Retry `op` with capped exponential backoff until it succeeds (etcd may not be up yet).
/// Each distinct failure is logged once (then every 30 s while it lasts), as one line.
async fn with_retry<T, E, F, Fut>(what: &str, describe: impl Fn(&E) -> String, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut delay = RETRY_MIN;
    let mut last: Option<(String, tokio::time::Instant)> = None;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                let line = describe(&e);
                let now = tokio::time::Instant::now();
                let repeat = last
                    .as_ref()
                    .is_some_and(|(l, at)| *l == line && now - *at < REPEAT_LOG_INTERVAL);
                if !repeat {
                    log::warn!("{what}: {line}; retrying");
                    last = Some((line, now));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Connects to etcd, retrying while it is unreachable; a mistake in the flags or files ends
/// the agent with one line naming it.
async fn connect_etcd(settings: &EtcdSettings) -> anyhow::Result<EtcdRegistry> {
    let target = settings.target();
    with_retry(
        "connecting to etcd",
        |e: &RegistryError| explain_with(e, &target),
        || async {
            match EtcdRegistry::connect(settings).await {
                Err(e) if e.is_permanent() => Ok(Err(anyhow::anyhow!(explain_with(&e, &target)))),
                Err(e) => Err(e),
                Ok(r) => Ok(Ok(r)),
            }
        },
    )
    .await
}

async fn agent(flags: Flags) -> anyhow::Result<()> {
    // Held until we exit: a second agent for the same network here refuses to start.
    let _instance = InstanceLock::acquire(&flags.subnet_file)?;
    let state = Arc::new(AgentState::default());
    if flags.healthz_port != 0 {
        let addr = SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on --healthz-ip/--healthz-port {addr}"))?;
        tokio::spawn(health::serve(listener, state.clone()));
    }

    let settings = EtcdSettings {
        endpoints: flags.etcd_endpoint_list(),
        prefix: flags.etcd_prefix.clone(),
        keyfile: flags.etcd_keyfile.clone(),
        certfile: flags.etcd_certfile.clone(),
        cafile: flags.etcd_cafile.clone(),
        username: flags.etcd_username.clone(),
        password: flags.etcd_password.clone(),
    };
    let registry = connect_etcd(&settings).await?;

    // The interface first (as upstream): the backend a config names is built for it, so a
    // config naming an unknown backend or bad options is waited out like an invalid one.
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    tokio::spawn(conn);
    let selector = IfaceSelector {
        ifaces: flags.iface.clone(),
        regexes: flags.iface_regex.clone(),
        can_reach: flags.iface_can_reach,
        public_ip: flags.public_ip,
    };
    let ext = lookup_external_interface(&handle, &selector)
        .await
        .context("finding the external interface")?;
    log::info!(
        "using interface {} (index {}, mtu {}), address {}, public address {}",
        ext.name,
        ext.index,
        ext.mtu,
        ext.iface_addr,
        ext.ext_addr
    );
    let opts = BackendOptions {
        udp_dataplane: flags.udp_dataplane,
        udp_decap: flags.udp_decap,
        bpf_pin_dir: flags.bpf_pin_dir.clone(),
    };
    let (config, mut backend) = wait_for_config(&registry, |c| {
        AnyBackend::new(c, &ext, &opts).map_err(|e| e.to_string())
    })
    .await;
    log::info!(
        "network {} subnets /{} from {} to {}, backend {}",
        config.network,
        config.subnet_len,
        config.subnet_min,
        config.subnet_max,
        config.backend.backend_type
    );

    let mut attrs = backend.lease_attrs(ext.ext_addr);
    if config.enable_ipv6 {
        attrs.public_ipv6 = match flags.public_ipv6 {
            Some(std::net::IpAddr::V6(ip)) => Some(ip),
            Some(other) => bail!("--public-ipv6 {other} is not an IPv6 address"),
            None => flannel_agent::iface::ipv6_address(&handle, ext.index)
                .await
                .context("reading the external interface's IPv6 addresses")?,
        };
        if attrs.public_ipv6.is_none() {
            bail!(
                "EnableIPv6: interface {} has no global IPv6 address; add one or pass --public-ipv6",
                ext.name
            );
        }
    }
    let manager = LeaseManager::new(
        registry.clone(),
        config.clone(),
        attrs,
        flags.subnet_lease_ttl,
        Duration::from_secs(u64::from(flags.subnet_lease_renew_margin) * 60),
    );
    let previous = PreviousSubnetEnv::read(&flags.subnet_file);
    let mut own = with_retry(
        "acquiring a subnet lease",
        |e: &ManagerError| match e {
            ManagerError::Registry(r) => registry.explain(r),
            other => error_line::one_line(other),
        },
        || async {
            match manager.acquire(previous.subnet).await {
                Err(e @ ManagerError::NoFreeSubnet { .. }) => Ok(Err(e)),
                Err(e) => Err(e),
                Ok(l) => Ok(Ok(l)),
            }
        },
    )
    .await?;
    log::info!("lease acquired: {}", own.subnet());
    *state.own.write().unwrap_or_else(|e| e.into_inner()) = Some(own.clone());
    state.set_lease_expiry(&own, flags.subnet_lease_ttl);

    backend
        .start(&own, &config)
        .await
        .with_context(|| format!("starting the {} backend", backend.name()))?;
    let env = SubnetEnv {
        network: config.network,
        subnet: own.subnet(),
        mtu: backend.mtu(),
        ip_masq: flags.ip_masq,
        ipv6: config.ipv6_network.zip(own.key.ipv6),
    };
    env.write(&flags.subnet_file)
        .with_context(|| format!("writing {}", flags.subnet_file.display()))?;
    // Rules and routes that name our subnet follow it when a lost lease comes back as another.
    let (subnet_tx, subnet_rx) = tokio::sync::watch::channel(own.subnet());
    let rule_opts = flannel_agent::iptables::RuleOptions {
        ip_masq: flags.ip_masq,
        forward: flags.iptables_forward_rules,
        random_fully_disable: flags.ip_masq_fully_random_disable,
        resync: Duration::from_secs(flags.iptables_resync),
    };
    if config.enable_nftables {
        flannel_agent::nftables::install_and_keep(
            rule_opts,
            config.network,
            subnet_rx.clone(),
            config.ipv6_network.zip(own.key.ipv6),
        )
        .await
        .context("installing nftables rules")?;
    } else {
        flannel_agent::iptables::install_and_keep(
            rule_opts,
            config.network,
            subnet_rx.clone(),
            &previous,
        )
        .await
        .context("installing iptables rules")?;
        if let (Some(network6), Some(subnet6)) = (config.ipv6_network, own.key.ipv6) {
            flannel_agent::iptables::install_and_keep_v6(rule_opts, network6, subnet6)
                .await
                .context("installing ip6tables rules")?;
        }
    }
    if flags.ip_blackhole_route {
        tokio::spawn(flannel_agent::blackhole::keep(
            handle.clone(),
            subnet_rx.clone(),
            rule_opts.resync,
        ));
    }

    let (tx, mut rx) = mpsc::channel(64);
    let watcher = PeerWatcher::new(registry.clone(), own.key, state.watch.clone())
        .checked_by(LeaseSanity::new(config.network, own.attrs.public_ip));
    tokio::spawn(watcher.run(tx));

    let mut renew_at = tokio::time::Instant::now() + manager.renew_interval();
    let mut resync = tokio::time::interval(RESYNC_INTERVAL);
    let mut sample = tokio::time::interval(METRICS_SAMPLE_INTERVAL);
    let mut announced = false;
    // Our key is gone and putting it back failed for a reason that may pass (etcd down): the
    // renewal timer retries the reclaim instead of renewing.
    let mut reclaim_pending = false;
    loop {
        tokio::select! {
            update = rx.recv() => {
                let Some(update) = update else { bail!("lease watch ended") };
                match update {
                    WatchUpdate::Peers(events) => {
                        apply_peer_events(&mut backend, &state, &events).await;
                        if !announced {
                            // The first listing is the full view: drop what a previous agent
                            // left installed for peers that went away while it was down.
                            let all: Vec<Lease> = state.peers.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
                            if let Err(e) = backend.sync_peers(&all).await {
                                log::warn!("reconciling peers after start: {e:#}");
                            }
                            announced = true;
                            state.ready.store(true, Ordering::Relaxed);
                            notify::ready();
                            log::info!("running: subnet {}, {} peers", own.subnet(), state.peers.read().map(|p| p.len()).unwrap_or(0));
                        }
                    }
                    WatchUpdate::OwnKey(None) => {
                        match handle_own_key_gone(&manager, &registry, &own).await {
                            Ok(l) => {
                                own = l;
                                reclaim_pending = false;
                                state.set_lease_expiry(&own, flags.subnet_lease_ttl);
                            }
                            Err(e) => {
                                let e = fatal_reclaim_error(e)?;
                                log::warn!("putting our lease {} back: {e}; retrying", own.subnet());
                                reclaim_pending = true;
                                renew_at = tokio::time::Instant::now() + Duration::from_secs(1);
                            }
                        }
                    }
                    WatchUpdate::OwnKey(Some(current)) => {
                        if current.attrs.public_ip != own.attrs.public_ip {
                            bail!("our subnet {} is now leased to {}: exiting rather than using it", own.subnet(), current.attrs.public_ip);
                        }
                        own = current;
                    }
                }
                *state.own.write().unwrap_or_else(|e| e.into_inner()) = Some(own.clone());
                subnet_tx.send_if_modified(|s| std::mem::replace(s, own.subnet()) != own.subnet());
            }
            _ = tokio::time::sleep_until(renew_at) => {
                let outcome = if reclaim_pending {
                    Ok(RenewOutcome::Lost)
                } else {
                    manager.renew(&own).await
                };
                renew_at = tokio::time::Instant::now() + match outcome {
                    Ok(RenewOutcome::Renewed) => {
                        state.set_lease_expiry(&own, flags.subnet_lease_ttl);
                        manager.renew_interval()
                    }
                    Ok(RenewOutcome::Lost) => {
                        if !reclaim_pending {
                            log::warn!("our etcd lease for {} expired or was revoked", own.subnet());
                        }
                        match manager.reclaim(&own).await {
                            Ok(l) => {
                                own = l;
                                reclaim_pending = false;
                                subnet_tx.send_if_modified(|s| std::mem::replace(s, own.subnet()) != own.subnet());
                                state.set_lease_expiry(&own, flags.subnet_lease_ttl);
                                manager.renew_interval()
                            }
                            Err(e) => {
                                log::warn!("putting our lease {} back: {}; retrying", own.subnet(), fatal_reclaim_error(ReclaimError::Manager(e))?);
                                reclaim_pending = true;
                                Duration::from_secs(1)
                            }
                        }
                    }
                    Err(e) => {
                        log::warn!("renewing lease {}: {e}; retrying", own.subnet());
                        Duration::from_secs(1)
                    }
                };
            }
            _ = resync.tick() => {
                if let Err(e) = backend.resync().await {
                    log::warn!("backend resync: {e:#}");
                }
            }
            _ = sample.tick() => {
                let dp = metrics::DataplaneSample::collect(backend.stats(), flags.udp_dataplane, &flags.bpf_pin_dir);
                *state.dataplane.write().unwrap_or_else(|e| e.into_inner()) = dp;
            }
        }
    }
}

/// Exit (the error) when our subnet now belongs to someone else; anything else is passed back
/// to be retried.
fn fatal_reclaim_error(e: ReclaimError) -> anyhow::Result<ReclaimError> {
    match e {
        ReclaimError::Manager(e @ ManagerError::SubnetTaken { .. }) | ReclaimError::Deleted(e) => {
            Err(e.into())
        }
        e => Ok(e),
    }
}

#[derive(Debug, thiserror::Error)]
enum ReclaimError {
    #[error(transparent)]
    Manager(ManagerError),
    /// Deleted by hand: exit (carried as the message to exit with).
    #[error(transparent)]
    Deleted(ManagerError),
}

/// Our key is gone. Deleted by hand while our etcd lease lives: the operator wants us off it,
/// so exit as upstream does (a restart acquires afresh). Expired: put it back if still free.
async fn handle_own_key_gone(
    manager: &LeaseManager,
    registry: &EtcdRegistry,
    own: &Lease,
) -> Result<Lease, ReclaimError> {
    // The event may be stale: the renewal path can already have put the key back.
    if let Ok(Some(current)) = registry.get_lease(&own.key).await {
        if current.attrs.public_ip == own.attrs.public_ip {
            return Ok(current);
        }
    }
    if !own.is_reservation() && registry.keep_alive_once(own.etcd_lease).await.unwrap_or(0) > 0 {
        if let Err(e) = manager.release(own).await {
            log::warn!("revoking our etcd lease: {e}");
        }
        return Err(ReclaimError::Deleted(ManagerError::DeletedByHand(
            own.subnet(),
        )));
    }
    manager.reclaim(own).await.map_err(ReclaimError::Manager)
}

async fn apply_peer_events(backend: &mut AnyBackend, state: &AgentState, events: &[PeerEvent]) {
    for ev in events {
        match ev {
            PeerEvent::Added(l) => log::info!(
                "peer {} at {} {}",
                l.subnet(),
                l.attrs.public_ip,
                if l.is_reservation() {
                    "(reservation)"
                } else {
                    ""
                }
            ),
            PeerEvent::Removed(l) => {
                log::info!("peer {} at {} removed", l.subnet(), l.attrs.public_ip)
            }
        }
    }
    // The backend logs and counts its own failures; the view follows etcd regardless, and the
    // periodic resync repairs what could not be applied.
    if let Err(e) = backend.handle_events(events).await {
        log::warn!("applying peer changes: {e:#}");
    }
    let mut peers = state.peers.write().unwrap_or_else(|e| e.into_inner());
    for ev in events {
        match ev {
            PeerEvent::Added(l) => {
                peers.insert(l.subnet(), l.clone());
            }
            PeerEvent::Removed(l) => {
                peers.remove(&l.subnet());
            }
        }
    }
}
