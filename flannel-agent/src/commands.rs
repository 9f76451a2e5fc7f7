//! flanneld's subcommands (`uninstall`, `dataplane`) and logging set-up.

use std::process::ExitCode;

use flannel_agent::error_line;

use crate::{inspect, uninstall};

/// Arguments after the subcommand name, for its own parser.
fn subcommand_args() -> impl Iterator<Item = String> {
    std::env::args()
        .enumerate()
        .filter_map(|(i, a)| (i != 1).then_some(a))
}

pub fn run_uninstall() -> ExitCode {
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

pub fn run_dataplane() -> ExitCode {
    use clap::Parser;
    let args = inspect::DataplaneArgs::parse_from(subcommand_args());
    match inspect::render(&args.bpf_pin_dir) {
        Ok(report) => {
            print!("{}", report.text);
            if let Some(why) = report.wrong_namespace {
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

pub fn init_logging(verbosity: u8) {
    let default = match verbosity {
        0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .init();
}

/// flanneld's runtime: two worker threads are plenty for one agent.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::Error::new(e).context("starting the async runtime"))
}
