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
    #[error("--udp-decap=xdp: {ifname} (driver {driver}) has no native XDP: {source}")]
    NoNativeXdp {
        ifname: String,
        driver: String,
        #[source]
        source: Box<EbpfError>,
    },
    /// `--udp-attach=tcx` where the kernel refuses TCX links: `reason` is the kernel's answer.
    #[error("--udp-attach=tcx: the kernel refused a TCX link on {hook} ({reason}); TCX needs Linux 6.6 or later, --udp-attach=auto or tc attaches with classic TC (clsact + cls_bpf)")]
    TcxRefused { hook: String, reason: String },
    #[error("adding a clsact qdisc to {ifname}: {source}")]
    Clsact {
        ifname: String,
        #[source]
        source: aya::programs::tc::TcError,
    },
    #[error("{hook}: pref {pref} handle {handle:#x}, where flannel puts its cls_bpf filter, holds another filter ({holder}): remove it, or attach with --udp-attach=tcx", pref = super::cls_bpf::PREF, handle = super::cls_bpf::HANDLE)]
    TcSlotTaken { hook: String, holder: String },
    #[error("deleting flannel's cls_bpf filter on {hook}: {source}")]
    TcFilter {
        hook: String,
        #[source]
        source: ProgramError,
    },
    #[error("--bpf-pin-dir {dir} holds the data plane of network namespace {theirs}, but this is {ours}: run this in that namespace (its devices and TC filters are there)")]
    OtherNamespace {
        dir: PathBuf,
        theirs: String,
        ours: String,
    },
    #[error("{0} leftover entries remain in {1}")]
    NotEmpty(usize, PathBuf),
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
