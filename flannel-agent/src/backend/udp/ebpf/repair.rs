//! The eBPF data plane's share of the udp resync: each program on the hook it was attached to
//! at start, the way it was attached then (TCX link or cls_bpf filter, and XDP decap if it
//! runs), put back where it is missing or where another program took its place. What is in
//! place is only read: a healthy data plane keeps its program ids and loses no packet.

use std::path::Path;

use aya::programs::{SchedClassifier, TcAttachType, Xdp};
use aya::Ebpf;
use flannel_common::prog_names;

use super::attach::AttachMode;
use super::cls_bpf::{self, HANDLE, PREF};
use super::error::{io_err, prog_err};
use super::links::{self, TcHook};
use super::EbpfError;

/// What sat on a hook where our program belongs, before the repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Found {
    /// Ours, as attached: nothing was done.
    Ours,
    /// Nothing of ours and nobody else's in our place: ours attached again.
    Missing,
    /// Another program where ours belongs (named, with its id): ours put back.
    Foreign(String),
}

/// The kernel's id of the loaded program `name`.
fn program_id<'a, P>(bpf: &'a mut Ebpf, name: &'static str) -> Result<u32, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    P: HasInfo + 'a,
{
    let program: &mut P = links::program_mut(bpf, name)?;
    program.id().map_err(prog_err(name))
}

/// `info()` of the program types we attach (aya has it per type, not as a trait).
trait HasInfo {
    fn id(&self) -> Result<u32, aya::programs::ProgramError>;
}

impl HasInfo for SchedClassifier {
    fn id(&self) -> Result<u32, aya::programs::ProgramError> {
        self.info().map(|i| i.id())
    }
}

impl HasInfo for Xdp {
    fn id(&self) -> Result<u32, aya::programs::ProgramError> {
        self.info().map(|i| i.id())
    }
}

/// Checks `hook` and repairs it: our program attached in `mode`.
pub(super) fn tc_hook(
    bpf: &mut Ebpf,
    hook: &TcHook<'_>,
    mode: AttachMode,
    pin_dir: &Path,
) -> Result<Found, EbpfError> {
    let ours = program_id::<SchedClassifier>(bpf, hook.program)?;
    match mode {
        AttachMode::Tcx => tcx_hook(bpf, hook, ours, pin_dir),
        AttachMode::Tc => classic_hook(bpf, hook, ours),
    }
}

fn tcx_hook(
    bpf: &mut Ebpf,
    hook: &TcHook<'_>,
    ours: u32,
    pin_dir: &Path,
) -> Result<Found, EbpfError> {
    if links::tcx_linked(pin_dir, hook, ours) {
        return Ok(Found::Ours);
    }
    // TCX keeps every program attached to a hook; ours is appended again and the others
    // (someone else's, there while ours was away) are named.
    let others = SchedClassifier::query_tcx(hook.ifname, hook.direction)
        .map(|(_, programs)| {
            programs
                .iter()
                .filter(|p| p.id() != ours)
                .map(|p| format!("{} (id {})", p.name_as_str().unwrap_or("?"), p.id()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_else(|e| {
            log::debug!("listing the programs on {}: {e}", describe(hook, "tcx"));
            Vec::new()
        });
    links::attach_tcx(bpf, hook, pin_dir)?;
    Ok(if others.is_empty() {
        Found::Missing
    } else {
        Found::Foreign(others.join(", "))
    })
}

fn classic_hook(bpf: &mut Ebpf, hook: &TcHook<'_>, ours: u32) -> Result<Found, EbpfError> {
    let cls = cls_bpf::Hook {
        ifname: hook.ifname,
        ifindex: hook.ifindex,
        direction: hook.direction,
    };
    let present =
        cls_bpf::filters(hook.ifindex, hook.direction).map_err(io_err(format!("listing {cls}")))?;
    let slot = present
        .iter()
        .find(|f| f.pref == PREF && f.handle == HANDLE);
    let program: &mut SchedClassifier = links::program_mut(bpf, hook.program)?;
    match slot {
        Some(f) if f.prog_id == Some(ours) => Ok(Found::Ours),
        Some(f) => {
            cls_bpf::take_back(program, hook.program, cls)?;
            let id = f.prog_id.map(|id| format!(", program id {id}"));
            Ok(Found::Foreign(format!(
                "{}{}",
                f.describe(),
                id.unwrap_or_default()
            )))
        }
        None => {
            cls_bpf::attach(program, hook.program, cls)?;
            Ok(Found::Missing)
        }
    }
}

/// Checks XDP decap on device `ifindex` and repairs it.
pub(super) fn xdp_decap(bpf: &mut Ebpf, ifindex: u32, pin_dir: &Path) -> Result<Found, EbpfError> {
    let ours = program_id::<Xdp>(bpf, prog_names::DECAP_XDP)?;
    if links::xdp_linked(pin_dir, ifindex, ours) {
        return Ok(Found::Ours);
    }
    links::relink_xdp_decap(bpf, ifindex, pin_dir)?;
    Ok(Found::Missing)
}

/// "tcx ingress of eth0", "tc egress of flannel0".
pub(super) fn describe(hook: &TcHook<'_>, mode: &str) -> String {
    let direction = match hook.direction {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    };
    format!("{mode} {direction} of {}", hook.ifname)
}
