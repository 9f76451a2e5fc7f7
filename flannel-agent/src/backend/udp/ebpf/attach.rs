//! How the three TC programs get attached (`--udp-attach`): through pinned TCX links
//! (`links.rs`, Linux 6.6 and later) or classic TC (`cls_bpf.rs`). `auto` tries a TCX link and
//! takes classic TC where the kernel refuses it: it asks the kernel, never its version.
//!
//! Whichever mode runs, the other mode's attachments of ours are removed, so a hook never
//! keeps two of ours (a switch of modes across a restart included). Encap and decap are
//! attached before the old ones go: no moment without them, and while both exist each packet
//! still meets one of them only, as TCX runs before the classic filters and every verdict of
//! ours but "next" (TC_ACT_UNSPEC, for packets that are not ours) ends the hook there. The
//! overlay guard is the exception ([`consumes_token`]).

use std::path::Path;

use aya::Ebpf;
use flannel_common::prog_names;

use super::cls_bpf;
use super::links::{self, TcHook};
use super::{EbpfError, EbpfOptions};
use crate::cli::UdpAttach;
use crate::error_line;

/// How the TC programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Pinned TCX links.
    Tcx,
    /// A clsact qdisc and direct-action cls_bpf filters (netlink).
    Tc,
}

impl AttachMode {
    /// As `--udp-attach` and the `/metrics` label spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Tc => "tc",
        }
    }
}

/// The mode the TC programs were attached with, and why that one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub mode: AttachMode,
    /// E.g. `--udp-attach=tc`, or `TCX unavailable (<the kernel's error>)`.
    pub reason: String,
}

impl Attachment {
    /// The line the agent logs for the choice.
    pub fn log_line(&self) -> String {
        match self.mode {
            AttachMode::Tcx => format!("attaching with TCX: {}", self.reason),
            AttachMode::Tc => format!(
                "attaching with classic TC (clsact + cls_bpf): {}",
                self.reason
            ),
        }
    }
}

/// Loads and pins the TC programs, attaches them as `opts.attach` asks, then removes the other
/// mode's attachments of ours.
pub(super) fn attach_tc(
    bpf: &mut Ebpf,
    opts: &EbpfOptions,
    overlay_name: &str,
    ext_name: &str,
) -> Result<Attachment, EbpfError> {
    let hooks = links::tc_hooks(opts, overlay_name, ext_name);
    // Loading first: a verifier error is no verdict on TCX.
    for hook in &hooks {
        links::load_tc(bpf, hook, &opts.pin_dir)?;
    }
    let attachment = match opts.attach {
        UdpAttach::Tcx => {
            for hook in &hooks {
                attach_tcx(bpf, hook, &opts.pin_dir).map_err(tcx_refused(hook))?;
            }
            tcx("--udp-attach=tcx")
        }
        UdpAttach::Tc => {
            attach_classic(bpf, &hooks, &opts.pin_dir)?;
            classic("--udp-attach=tc".to_owned())
        }
        UdpAttach::Auto => match attach_tcx(bpf, &hooks[0], &opts.pin_dir) {
            Ok(()) => {
                for hook in &hooks[1..] {
                    attach_tcx(bpf, hook, &opts.pin_dir)?;
                }
                tcx("--udp-attach=auto, the kernel accepts TCX links")
            }
            Err(refused) => {
                attach_classic(bpf, &hooks, &opts.pin_dir)?;
                let reason = error_line::one_line(&refused);
                classic(format!("TCX unavailable ({reason})"))
            }
        },
    };
    log::info!("{}", attachment.log_line());
    // Ours are in place. What may be left is an encap or decap of the other mode (of the two,
    // whichever runs first handles our packets and the other never sees them; both read the
    // same maps) or a filter of ours on a device we no longer use: failing to remove those is
    // worth a warning, not stopping the agent.
    let cleanup = match attachment.mode {
        AttachMode::Tcx => cls_bpf::remove_ours(&[]).map(|_| ()),
        AttachMode::Tc => {
            let keep: Vec<_> = hooks.iter().map(|h| (h.ifindex, h.direction)).collect();
            cls_bpf::remove_ours(&keep).and_then(|_| links::remove_tcx_links(&opts.pin_dir))
        }
    };
    if let Err(e) = cleanup {
        log::warn!(
            "removing flannel's attachments of the other mode or on other devices: {}",
            error_line::one_line(&e)
        );
    }
    Ok(attachment)
}

fn tcx(reason: &str) -> Attachment {
    Attachment {
        mode: AttachMode::Tcx,
        reason: reason.to_owned(),
    }
}

fn classic(reason: String) -> Attachment {
    Attachment {
        mode: AttachMode::Tc,
        reason,
    }
}

/// flannel_overlay_in admits a packet by clearing decap's token (tc_index) and letting it go
/// on ("next"): a second copy of it on the same hook would drop all the first one admitted.
/// So its other-mode attachment goes before the new one is attached: for that moment no guard,
/// which drops nothing genuine. (Same-mode restarts swap the program in place either way.)
fn consumes_token(hook: &TcHook<'_>) -> bool {
    hook.program == prog_names::OVERLAY_IN
}

fn classic_hook<'a>(hook: &TcHook<'a>) -> cls_bpf::Hook<'a> {
    cls_bpf::Hook {
        ifname: hook.ifname,
        ifindex: hook.ifindex,
        direction: hook.direction,
    }
}

fn attach_tcx(bpf: &mut Ebpf, hook: &TcHook<'_>, pin_dir: &Path) -> Result<(), EbpfError> {
    if consumes_token(hook) {
        cls_bpf::remove_from(classic_hook(hook))?;
    }
    links::attach_tcx(bpf, hook, pin_dir)
}

fn attach_classic(bpf: &mut Ebpf, hooks: &[TcHook<'_>], pin_dir: &Path) -> Result<(), EbpfError> {
    for hook in hooks {
        if consumes_token(hook) {
            links::remove_tcx_link(pin_dir, hook.link_file)?;
        }
        let program = links::program_mut(bpf, hook.program)?;
        cls_bpf::attach(program, hook.program, classic_hook(hook))?;
    }
    Ok(())
}

/// `--udp-attach=tcx` failing on `hook`: one line with the kernel's reason.
fn tcx_refused(hook: &TcHook<'_>) -> impl FnOnce(EbpfError) -> EbpfError {
    let hook = format!(
        "tcx {} of {}",
        cls_bpf::direction_name(hook.direction),
        hook.ifname
    );
    move |e| EbpfError::TcxRefused {
        hook,
        reason: error_line::one_line(&e),
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use aya::programs::ProgramError;
    use aya::sys::SyscallError;

    use super::*;

    /// What aya reports when the kernel has no TCX (Linux before 6.6 answers EINVAL).
    fn kernel_refusal() -> EbpfError {
        EbpfError::Program {
            name: prog_names::ENCAP,
            source: ProgramError::SyscallError(SyscallError {
                call: "bpf_mprog_attach",
                io_error: io::Error::from_raw_os_error(libc::EINVAL),
            }),
        }
    }

    fn hook() -> TcHook<'static> {
        TcHook {
            program: prog_names::ENCAP,
            ifname: "flannel0",
            ifindex: 5,
            direction: aya::programs::TcAttachType::Egress,
            link_file: links::ENCAP_LINK,
        }
    }

    #[test]
    fn forced_tcx_fails_in_one_line_with_the_kernels_reason() {
        let e = anyhow::Error::new(tcx_refused(&hook())(kernel_refusal()));
        assert_eq!(
            error_line::anyhow_line(&e),
            "--udp-attach=tcx: the kernel refused a TCX link on tcx egress of flannel0 \
             (program flannel_encap: `bpf_mprog_attach` failed: Invalid argument (os error 22)); \
             TCX needs Linux 6.6 or later, --udp-attach=auto or tc attaches with classic TC \
             (clsact + cls_bpf)"
        );
    }

    #[test]
    fn auto_names_the_kernels_reason_for_classic_tc() {
        let reason = error_line::one_line(&kernel_refusal());
        assert_eq!(
            classic(format!("TCX unavailable ({reason})")).log_line(),
            "attaching with classic TC (clsact + cls_bpf): TCX unavailable (program \
             flannel_encap: `bpf_mprog_attach` failed: Invalid argument (os error 22))"
        );
        assert_eq!(
            tcx("--udp-attach=tcx").log_line(),
            "attaching with TCX: --udp-attach=tcx"
        );
        assert_eq!(AttachMode::Tc.as_str(), "tc");
        assert_eq!(AttachMode::Tcx.as_str(), "tcx");
    }
}
