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

impl EbpfError {
    /// A path the operator forced cannot run here (no fallback may replace it).
    pub fn is_forced_path(&self) -> bool {
        matches!(
            self,
            EbpfError::XdpDecap { .. } | EbpfError::TcxRefused { .. }
        )
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
            match verifier_last_words(&log) {
                Some(line) => format!("the verifier refused it: {line} ({io_error})"),
                None => format!("loading it failed: {io_error}"),
            }
        }
        other => with_sources(other),
    }
}

/// `e` and the errors under it, as "a: b: c" (aya's syscall errors keep the errno there).
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let said = s.to_string();
        if !line.contains(&said) {
            line.push_str(": ");
            line.push_str(&said);
        }
        source = s.source();
    }
    line
}

/// The verifier's verdict: the last line of its log before the statistics it ends with.
fn verifier_last_words(log: &str) -> Option<&str> {
    log.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !is_verifier_summary(l))
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
        other => with_sources(other),
    }
}

#[cfg(test)]
mod tests {
    use super::verifier_last_words;

    #[test]
    fn the_verifiers_verdict_is_its_last_line_before_the_statistics() {
        // As 6.18 (one build of it) and 5.10 ended their logs for programs they refused.
        let helper = "614: (18) r2 = 0xfffffffc\n615: (85) call bpf_xdp_adjust_meta#54\nprogram of this type cannot use helper bpf_xdp_adjust_meta#54\nverification time 6630 usec\nstack depth 152+0\nprocessed 658 insns (limit 1000000) max_states_per_insn 1 total_states 28 peak_states 28 mark_read 0\n";
        assert_eq!(
            verifier_last_words(helper),
            Some("program of this type cannot use helper bpf_xdp_adjust_meta#54")
        );
        let too_large = "1029: (79) r1 = *(u64 *)(r10 -184)\nBPF program is too large. Processed 1000001 insn\nprocessed 1000001 insns (limit 1000000) max_states_per_insn 15 total_states 12146 peak_states 1602 mark_read 29\n\n";
        assert_eq!(
            verifier_last_words(too_large),
            Some("BPF program is too large. Processed 1000001 insn")
        );
        assert_eq!(verifier_last_words("\n  \n"), None);
    }
}
