//! What can go wrong loading and driving the eBPF data plane.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::MapError;
use aya::programs::links::LinkError;
use aya::programs::ProgramError;
use ipnetwork::Ipv4Network;

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("the eBPF object is not compiled into this binary (run `cargo xtask build-ebpf`, then rebuild)")]
    NotEmbedded,
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not on a bpf filesystem")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] Box<aya::EbpfError>),
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("no network interface with index {0}")]
    NoSuchInterface(u32),
    #[error("subnet {subnet} is not a /{expected} like every subnet of the network")]
    SubnetLength { subnet: Ipv4Network, expected: u8 },
    #[error("--udp-decap=xdp: XDP decap cannot run on {ifname}: {reason}")]
    XdpDecap { ifname: String, reason: String },
    #[error("{0} leftover entries remain in {1}")]
    NotEmpty(usize, PathBuf),
}

impl EbpfError {
    /// A path the operator forced cannot run here (no fallback may replace it).
    pub fn is_forced_path(&self) -> bool {
        matches!(self, EbpfError::XdpDecap { .. })
    }
}

pub(super) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EbpfError {
    let context = context.into();
    move |source| EbpfError::Io { context, source }
}

pub(super) fn map_err(name: &'static str) -> impl FnOnce(MapError) -> EbpfError {
    move |source| EbpfError::Map { name, source }
}

pub(super) fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> EbpfError {
    move |source| EbpfError::Program { name, source }
}

pub(super) fn link_err(path: &Path) -> impl FnOnce(LinkError) -> EbpfError + '_ {
    move |source| EbpfError::Link {
        path: path.to_path_buf(),
        source,
    }
}

pub(super) fn pin_err(path: &Path) -> impl FnOnce(aya::pin::PinError) -> EbpfError + '_ {
    move |source| EbpfError::Pin {
        path: path.to_path_buf(),
        source,
    }
}

/// A program load or attach error in one line: for a verifier refusal the verifier's own last
/// words (e.g. `program of this type cannot use helper bpf_xdp_adjust_meta#54`), not its
/// whole log.
pub fn verifier_reason(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = format!("{verifier_log:?}");
            let said = log
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !is_verifier_summary(l))
                .next_back();
            match said {
                Some(line) => format!("the verifier refused it: {line} ({io_error})"),
                None => format!("loading it failed: {io_error}"),
            }
        }
        other => other.to_string(),
    }
}

/// The statistics lines the verifier ends every log with.
fn is_verifier_summary(line: &str) -> bool {
    [
        "verification time",
        "stack depth",
        "processed ",
        "-- END PROG LOAD LOG --",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

/// [`EbpfError`] in one line, with [`verifier_reason`] for program errors.
pub fn one_line(e: &EbpfError) -> String {
    match e {
        EbpfError::Program { name, source } => format!("{name}: {}", verifier_reason(source)),
        other => other.to_string(),
    }
}
