//! The pinned links that keep the programs attached while no agent runs: TCX on the overlay's
//! egress (encap) and the external device's ingress (decap), and optionally XDP decap on the
//! external device. TCX and XDP take one path: a new agent adopts the pinned link when it
//! still sits on the same hook and swaps its program in atomically (bpf_link_update), else it
//! replaces the link.

use std::os::fd::AsFd;
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::xdp::XdpLink;
use aya::programs::{
    LinkOrder, Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use aya::Ebpf;
use flannel_common::prog_names;

use super::bpf_sys::{self, LinkTarget};
use super::error::{io_err, link_err, one_line, pin_err, prog_err, verifier_reason};
use super::loader::remove_pin;
use super::{EbpfError, EbpfOptions};
use crate::cli::UdpDecap;

/// File names of the pinned links (next to the maps and programs, which use their own names).
pub const ENCAP_LINK: &str = "flannel_encap_link";
pub const DECAP_LINK: &str = "flannel_decap_link";
pub const DECAP_XDP_LINK: &str = "flannel_decap_xdp_link";
pub const OVERLAY_IN_LINK: &str = "flannel_overlay_in_link";

/// Where a program hangs through a link: what differs between TCX and XDP.
trait Hook {
    /// The program, loaded into the kernel and pinned at `path`.
    fn load_and_pin(&mut self, name: &'static str, path: &Path) -> Result<(), EbpfError>;
    /// What the kernel reports for a link on this hook.
    fn target(&self) -> LinkTarget;
    /// Swaps our program into `link`, the adopted link pinned at `path`.
    fn replace_program(
        &mut self,
        name: &'static str,
        link: FdLink,
        path: &Path,
    ) -> Result<(), EbpfError>;
    /// Attaches our program through a new link, to be pinned at `path`.
    fn attach_new(&mut self, name: &'static str, path: &Path) -> Result<FdLink, EbpfError>;
}

/// The part of a [`Hook`] that is the same for every program type, which aya offers as
/// inherent methods of each: load and pin, and swapping the program of an adopted link.
macro_rules! load_and_replace {
    ($link:ty) => {
        fn load_and_pin(&mut self, name: &'static str, path: &Path) -> Result<(), EbpfError> {
            self.program.load().map_err(prog_err(name))?;
            remove_pin(path)?;
            self.program.pin(path).map_err(pin_err(path))
        }

        fn replace_program(
            &mut self,
            name: &'static str,
            link: FdLink,
            path: &Path,
        ) -> Result<(), EbpfError> {
            let link = <$link>::try_from(link).map_err(link_err(path))?;
            let id = self.program.attach_to_link(link).map_err(prog_err(name))?;
            // The pin keeps the link; our handle may go.
            let _ = self.program.take_link(id).map_err(prog_err(name))?;
            Ok(())
        }
    };
}

/// A TC program on one direction of a device (TCX).
struct Tcx<'a> {
    program: &'a mut SchedClassifier,
    ifname: &'a str,
    ifindex: u32,
    direction: TcAttachType,
}

impl Tcx<'_> {
    fn target_of(ifindex: u32, direction: TcAttachType) -> LinkTarget {
        let attach_type = match direction {
            TcAttachType::Egress => bpf_sys::BPF_TCX_EGRESS,
            _ => bpf_sys::BPF_TCX_INGRESS,
        };
        LinkTarget {
            link_type: bpf_sys::BPF_LINK_TYPE_TCX,
            ifindex,
            attach_type,
        }
    }
}

impl Hook for Tcx<'_> {
    load_and_replace!(SchedClassifierLink);

    fn target(&self) -> LinkTarget {
        Tcx::target_of(self.ifindex, self.direction)
    }

    fn attach_new(&mut self, name: &'static str, path: &Path) -> Result<FdLink, EbpfError> {
        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
        let id = (self.program)
            .attach_with_options(self.ifname, self.direction, options)
            .map_err(prog_err(name))?;
        let link = self.program.take_link(id).map_err(prog_err(name))?;
        link.try_into().map_err(link_err(path))
    }
}

/// An XDP program on a device, in driver (native) mode.
struct XdpDriver<'a> {
    program: &'a mut Xdp,
    ifindex: u32,
}

impl Hook for XdpDriver<'_> {
    load_and_replace!(XdpLink);

    fn target(&self) -> LinkTarget {
        LinkTarget {
            link_type: bpf_sys::BPF_LINK_TYPE_XDP,
            ifindex: self.ifindex,
            attach_type: 0,
        }
    }

    fn attach_new(&mut self, name: &'static str, path: &Path) -> Result<FdLink, EbpfError> {
        let id = (self.program)
            .attach_to_if_index(self.ifindex, XdpMode::Driver)
            .map_err(prog_err(name))?;
        let link = self.program.take_link(id).map_err(prog_err(name))?;
        link.try_into().map_err(link_err(path))
    }
}

/// Attaches the loaded program `name` through the link pinned as `link_file`: replacing the
/// program of that link atomically when it is still on `hook`, else creating a new link (and
/// dropping the stale one).
fn link_pinned(
    hook: &mut impl Hook,
    name: &'static str,
    pin_dir: &Path,
    link_file: &str,
) -> Result<(), EbpfError> {
    let link_path = pin_dir.join(link_file);
    if link_path.exists() {
        match adopt_link(&link_path, hook.target()) {
            Ok(Some(link)) => return hook.replace_program(name, link, &link_path),
            Ok(None) => log::info!(
                "pinned link {} is for another device or detached: replacing it",
                link_path.display()
            ),
            Err(e) => log::warn!(
                "pinned link {} unusable ({e}): replacing it",
                link_path.display()
            ),
        }
        // Best effort: the new link replaces it either way.
        let _ = detach(&link_path);
        remove_pin(&link_path)?;
    }
    let link = hook.attach_new(name, &link_path)?;
    link.pin(&link_path).map_err(pin_err(&link_path))?;
    Ok(())
}

/// The link pinned at `path` if it still sits on `want` (same kind, device and direction).
fn adopt_link(path: &Path, want: LinkTarget) -> Result<Option<FdLink>, EbpfError> {
    let fd =
        bpf_sys::obj_get(path).map_err(io_err(format!("opening pinned {}", path.display())))?;
    let target = bpf_sys::link_target(fd.as_fd()).map_err(io_err("reading link info"))?;
    drop(fd);
    if target != want {
        return Ok(None);
    }
    let pinned = PinnedLink::from_pin(path).map_err(link_err(path))?;
    Ok(Some(FdLink::from(pinned)))
}

/// Detaches the link pinned at `path` from its hook. Explicitly: another process may still
/// hold the link open, so removing the pin alone would leave it attached.
pub(super) fn detach(path: &Path) -> Result<(), EbpfError> {
    let fd =
        bpf_sys::obj_get(path).map_err(io_err(format!("opening pinned {}", path.display())))?;
    bpf_sys::link_detach(fd.as_fd()).map_err(io_err(format!("detaching {}", path.display())))
}

/// Program `name` of the object, as its type (`SchedClassifier`, `Xdp`).
pub(super) fn program_mut<'a, P>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = bpf.program_mut(name).ok_or(EbpfError::Missing(name))?;
    program.try_into().map_err(prog_err(name))
}

/// A TC program on one hook, and the file of its TCX link.
#[derive(Debug, Clone, Copy)]
pub(super) struct TcHook<'a> {
    pub program: &'static str,
    pub ifname: &'a str,
    pub ifindex: u32,
    pub direction: TcAttachType,
    pub link_file: &'static str,
}

/// The TC programs' hooks: encap on the overlay's egress, decap on the external device's
/// ingress, and the overlay's ingress guard.
pub(super) fn tc_hooks<'a>(
    opts: &EbpfOptions,
    overlay_name: &'a str,
    ext_name: &'a str,
) -> [TcHook<'a>; 3] {
    let hook = |program, ifname, ifindex, direction, link_file| TcHook {
        program,
        ifname,
        ifindex,
        direction,
        link_file,
    };
    [
        hook(
            prog_names::ENCAP,
            overlay_name,
            opts.overlay_ifindex,
            TcAttachType::Egress,
            ENCAP_LINK,
        ),
        hook(
            prog_names::DECAP,
            ext_name,
            opts.ext_ifindex,
            TcAttachType::Ingress,
            DECAP_LINK,
        ),
        hook(
            prog_names::OVERLAY_IN,
            overlay_name,
            opts.overlay_ifindex,
            TcAttachType::Ingress,
            OVERLAY_IN_LINK,
        ),
    ]
}

fn tcx<'a>(bpf: &'a mut Ebpf, hook: &TcHook<'a>) -> Result<Tcx<'a>, EbpfError> {
    Ok(Tcx {
        program: program_mut(bpf, hook.program)?,
        ifname: hook.ifname,
        ifindex: hook.ifindex,
        direction: hook.direction,
    })
}

/// Loads the program of `hook` and pins it (whichever way it is attached then).
pub(super) fn load_tc(bpf: &mut Ebpf, hook: &TcHook<'_>, pin_dir: &Path) -> Result<(), EbpfError> {
    tcx(bpf, hook)?.load_and_pin(hook.program, &pin_dir.join(hook.program))
}

/// Attaches the loaded program of `hook` through its pinned TCX link (adopting it).
pub(super) fn attach_tcx(
    bpf: &mut Ebpf,
    hook: &TcHook<'_>,
    pin_dir: &Path,
) -> Result<(), EbpfError> {
    link_pinned(&mut tcx(bpf, hook)?, hook.program, pin_dir, hook.link_file)
}

/// Whether decap should run as native XDP on the external device (`--udp-decap`, or `auto`:
/// where GRO is on, which XDP's stripping lets merge the inner stream). Logs why not.
pub(super) fn wants_xdp(decap: UdpDecap, ext_name: &str, gro: Option<bool>) -> bool {
    match decap {
        UdpDecap::Tc => {
            log::info!("decapsulating on TC ingress of {ext_name} (--udp-decap=tc)");
            false
        }
        UdpDecap::Xdp => true,
        UdpDecap::Auto if gro == Some(true) => true,
        UdpDecap::Auto => {
            log::info!(
                "decapsulating on TC ingress of {ext_name}: GRO is off there, so XDP decap would merge nothing (and on a veth it costs the peer its TSO)"
            );
            false
        }
    }
}

/// Attaches (or adopts) XDP decap on the external device. `Ok(false)`: it cannot run here
/// and `--udp-decap=auto` decapsulates on TC instead (logged with the kernel's reason:
/// the verifier's words when the program does not load, the driver's when it does not
/// attach); with `--udp-decap=xdp` that is an error.
pub(super) fn attach_xdp_decap(
    bpf: &mut Ebpf,
    opts: &EbpfOptions,
    ext_name: &str,
    driver: &str,
) -> Result<bool, EbpfError> {
    let reason = match attach_xdp(bpf, opts) {
        Ok(()) => {
            log::info!(
                "decapsulating with native XDP on {ext_name} (driver {driver}, --udp-decap={}): before GRO, which then merges the stream",
                if opts.decap == UdpDecap::Xdp { "xdp" } else { "auto, GRO on" }
            );
            return Ok(true);
        }
        Err(XdpFailure::Load(e)) => format!("{}: {}", prog_names::DECAP_XDP, verifier_reason(&e)),
        Err(XdpFailure::Attach(e)) => {
            format!("driver {driver} has no native XDP ({})", one_line(&e))
        }
        Err(XdpFailure::Other(e)) => one_line(&e),
    };
    if opts.decap == UdpDecap::Xdp {
        return Err(EbpfError::XdpDecap {
            ifname: ext_name.to_string(),
            reason,
        });
    }
    log::info!("decapsulating on TC ingress of {ext_name}: {reason}");
    remove_xdp_decap(&opts.pin_dir)?;
    Ok(false)
}

/// Detaches and unpins XDP decap (an earlier run's, or one that half attached).
pub(super) fn remove_xdp_decap(pin_dir: &Path) -> Result<(), EbpfError> {
    let link_path = pin_dir.join(DECAP_XDP_LINK);
    if link_path.exists() {
        let _ = detach(&link_path);
        remove_pin(&link_path)?;
    }
    remove_pin(&pin_dir.join(prog_names::DECAP_XDP))
}

/// Why XDP decap did not attach: the program did not load (verifier), or the device took no
/// native XDP, or something else (pins).
enum XdpFailure {
    Load(ProgramError),
    Attach(EbpfError),
    Other(EbpfError),
}

fn attach_xdp(bpf: &mut Ebpf, opts: &EbpfOptions) -> Result<(), XdpFailure> {
    let name = prog_names::DECAP_XDP;
    let mut hook = XdpDriver {
        program: program_mut(bpf, name).map_err(XdpFailure::Other)?,
        ifindex: opts.ext_ifindex,
    };
    // Loaded on its own first, so a refusal by the verifier is told apart from the driver's
    // (a program error from load_and_pin is the load's; pinning fails as EbpfError::Pin).
    hook.load_and_pin(name, &opts.pin_dir.join(name))
        .map_err(|e| match e {
            EbpfError::Program { source, .. } => XdpFailure::Load(source),
            other => XdpFailure::Other(other),
        })?;
    link_pinned(&mut hook, name, &opts.pin_dir, DECAP_XDP_LINK).map_err(|e| match e {
        EbpfError::Program { .. } | EbpfError::Link { .. } => XdpFailure::Attach(e),
        other => XdpFailure::Other(other),
    })
}

/// Detaches and unpins every link this data plane pinned in `pin_dir`.
pub(super) fn remove_links(pin_dir: &Path) -> Result<(), EbpfError> {
    remove_pinned_links(
        pin_dir,
        &[DECAP_XDP_LINK, ENCAP_LINK, DECAP_LINK, OVERLAY_IN_LINK],
    )
}

/// Detaches and unpins the TCX links of the TC programs (attached with classic TC now).
pub(super) fn remove_tcx_links(pin_dir: &Path) -> Result<(), EbpfError> {
    remove_pinned_links(pin_dir, &TCX_LINKS)
}

/// Detaches and unpins the TCX link `link_file`, if there is one.
pub(super) fn remove_tcx_link(pin_dir: &Path, link_file: &str) -> Result<(), EbpfError> {
    remove_pinned_links(pin_dir, &[link_file])
}

/// The TCX links' files.
pub const TCX_LINKS: [&str; 3] = [ENCAP_LINK, DECAP_LINK, OVERLAY_IN_LINK];

fn remove_pinned_links(pin_dir: &Path, links: &[&str]) -> Result<(), EbpfError> {
    for link in links {
        let path = pin_dir.join(link);
        if path.exists() {
            if let Err(e) = detach(&path) {
                log::warn!("{e}");
            }
            remove_pin(&path)?;
        }
    }
    Ok(())
}

/// Whether the link pinned as `link_file` sits on `hook`'s TCX hook running program `prog_id`.
pub(super) fn tcx_linked(pin_dir: &Path, hook: &TcHook<'_>, prog_id: u32) -> bool {
    let target = Tcx::target_of(hook.ifindex, hook.direction);
    linked(&pin_dir.join(hook.link_file), target, prog_id)
}

/// Whether XDP decap's pinned link sits on device `ifindex` running program `prog_id`.
pub(super) fn xdp_linked(pin_dir: &Path, ifindex: u32, prog_id: u32) -> bool {
    let target = LinkTarget {
        link_type: bpf_sys::BPF_LINK_TYPE_XDP,
        ifindex,
        attach_type: 0,
    };
    linked(&pin_dir.join(DECAP_XDP_LINK), target, prog_id)
}

fn linked(path: &Path, want: LinkTarget, prog_id: u32) -> bool {
    let Ok(fd) = bpf_sys::obj_get(path) else {
        return false;
    };
    bpf_sys::link_target(fd.as_fd()).is_ok_and(|t| t == want)
        && bpf_sys::link_program(fd.as_fd()).is_ok_and(|id| id == prog_id)
}

/// Attaches the already loaded XDP decap to device `ifindex` through its pinned link
/// (adopting the link when it is still there, else replacing it).
pub(super) fn relink_xdp_decap(
    bpf: &mut Ebpf,
    ifindex: u32,
    pin_dir: &Path,
) -> Result<(), EbpfError> {
    let name = prog_names::DECAP_XDP;
    let mut hook = XdpDriver {
        program: program_mut(bpf, name)?,
        ifindex,
    };
    link_pinned(&mut hook, name, pin_dir, DECAP_XDP_LINK)
}

/// The device XDP decap's pinned link in `pin_dir` is attached to, if any (0: its device is
/// gone).
pub fn xdp_decap_ifindex(pin_dir: &Path) -> Option<u32> {
    let fd = bpf_sys::obj_get(&pin_dir.join(DECAP_XDP_LINK)).ok()?;
    let target = bpf_sys::link_target(fd.as_fd()).ok()?;
    (target.link_type == bpf_sys::BPF_LINK_TYPE_XDP).then_some(target.ifindex)
}
