//! flanneld: acquires this host's subnet lease in etcd, runs the configured backend, follows
//! peer leases and keeps subnet.env up to date. This file is wiring: one task per concern.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flannel_agent::backend::network::Network;
use flannel_agent::cli::Flags;
use flannel_agent::status::AgentStatus;
use flannel_agent::subnet::lease_keeper::LeaseKeeper;
use flannel_agent::subnet::{sanity::LeaseSanity, LeaseManager, PeerWatcher};
use flannel_agent::subnet_env::PreviousSubnetEnv;
use flannel_agent::{error_line, health, instance_lock::InstanceLock, notify, sampling, startup};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

mod commands;
mod inspect;
mod uninstall;

fn main() -> ExitCode {
    // Subcommands come before flanneld's own (Go-style) flags.
    match std::env::args().nth(1).as_deref() {
        Some("uninstall") => return commands::run_uninstall(),
        Some("dataplane") => return commands::run_dataplane(),
        _ => {}
    }
    let flags = Flags::parse_go_style(std::env::args()).unwrap_or_else(|e| e.exit());
    commands::init_logging(flags.verbosity);
    for line in &flags.env_errors {
        log::error!("{line}");
    }
    if flags.kube_subnet_mgr {
        log::error!(
            "--kube-subnet-mgr is not supported by this flanneld: it manages subnets in etcd only"
        );
        return ExitCode::from(1);
    }
    let result = commands::runtime().and_then(|rt| {
        let r = rt.block_on(run(flags));
        // Never wait for stuck background work on the way out: exit within a second.
        rt.shutdown_timeout(Duration::from_millis(300));
        r
    });
    if let Err(e) = result {
        log::error!("{}", error_line::anyhow_line(&e));
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
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

async fn agent(flags: Flags) -> anyhow::Result<()> {
    // Held until we exit: a second agent for the same network here refuses to start.
    let _instance = InstanceLock::acquire(&flags.subnet_file)?;
    let status = Arc::new(AgentStatus::default());
    let latest_sample = Arc::new(sampling::LatestSample::default());
    if flags.healthz_port != 0 {
        let addr = SocketAddr::new(flags.healthz_ip, flags.healthz_port);
        health::listen(addr, status.clone(), latest_sample.clone())
            .await
            .with_context(|| format!("listening on --healthz-ip/--healthz-port {addr}"))?;
    }
    let registry = startup::connect_etcd(&flags).await?;
    let (handle, ext) = startup::external_interface(&flags).await?;
    let (config, backend) = startup::network_config(&registry, &ext, &flags).await;
    startup::check_br_netfilter(&config, &status);

    let (ttl, margin) = (flags.subnet_lease_ttl, flags.subnet_lease_renew_margin);
    let attrs = startup::lease_attrs(&config, &backend, &ext)?;
    let margin = Duration::from_secs(u64::from(margin) * 60);
    let manager = LeaseManager::new(registry.clone(), config.clone(), attrs, ttl, margin);
    let keeper = LeaseKeeper::new(manager, registry.clone(), status.clone(), ttl);
    let previous = PreviousSubnetEnv::read(&flags.subnet_file);
    let own = keeper.acquire(previous.subnets()).await?;
    let startup::HostSetUp { network, subnet_tx } =
        startup::set_up_host(&flags, &config, &own, backend, &previous, &handle).await?;

    // One task each: the watch, our lease, the backend network, data plane sampling.
    let (peers_tx, peers_rx) = mpsc::channel(64);
    let (own_tx, own_rx) = mpsc::channel(16);
    let sanity = LeaseSanity::new(config.network, own.attrs.owner());
    let watcher = PeerWatcher::new(registry, own.key, status.watch().clone()).checked_by(sanity);
    tokio::spawn(watcher.run_split(peers_tx, own_tx));
    let (stats_tx, stats_rx) = mpsc::channel(1);
    tokio::spawn(sampling::run(stats_tx, latest_sample));
    let network = tokio::spawn(Network::new(network, status).run(peers_rx, stats_rx));
    let lease = tokio::spawn(keeper.run(own, own_rx, subnet_tx));
    tokio::select! {
        r = network => r.context("the backend network task")??,
        r = lease => r.context("the lease keeper task")??,
    }
    Ok(())
}
