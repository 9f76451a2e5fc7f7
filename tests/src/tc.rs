//! TC filters as `tc -j -s filter show` lists them: what the eBPF udp data plane's classic TC
//! mode (`--udp-attach=tc`) puts on a hook, and what other tools put there.

use anyhow::Context;

use crate::netns::Netns;
use crate::Result;

/// flanneld's cls_bpf filters: pref 0x464c (tc prints it in decimal), handle 0x464c.
pub const FLANNEL_PREF: u64 = 0x464c;
pub const FLANNEL_HANDLE: &str = "0x464c";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub pref: u64,
    pub kind: String,
    /// As tc prints it, e.g. "0x464c".
    pub handle: String,
    /// cls_bpf with an eBPF program: the filter's name and the program's id.
    pub bpf_name: Option<String>,
    pub prog_id: Option<u64>,
    /// Packets counted by the filter's first action, if it has one.
    pub action_packets: Option<u64>,
}

impl Filter {
    /// flanneld's: our pref and handle.
    pub fn is_flannels(&self) -> bool {
        self.pref == FLANNEL_PREF && self.handle == FLANNEL_HANDLE
    }
}

/// The filters on `direction` ("ingress" or "egress") of `dev` in `ns`, in the order they run;
/// empty when the device has no clsact qdisc.
pub fn filters(ns: &Netns, dev: &str, direction: &str) -> Result<Vec<Filter>> {
    let out = ns.exec("tc", &["-j", "-s", "filter", "show", "dev", dev, direction])?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("tc -j filter show: {out}"))?;
    let entries = v.as_array().context("tc -j filter show: not an array")?;
    // Each pref comes first as a header without options.
    Ok(entries
        .iter()
        .filter(|e| e.get("options").is_some())
        .map(|e| {
            let o = &e["options"];
            Filter {
                pref: e["pref"].as_u64().unwrap_or(0),
                kind: e["kind"].as_str().unwrap_or("").to_owned(),
                handle: o["handle"].as_str().unwrap_or("").to_owned(),
                bpf_name: o["bpf_name"].as_str().map(str::to_owned),
                prog_id: o["prog"]["id"].as_u64(),
                action_packets: o["actions"][0]["stats"]["packets"].as_u64(),
            }
        })
        .collect())
}

/// flanneld's filters on `direction` of `dev`.
pub fn flannels(ns: &Netns, dev: &str, direction: &str) -> Result<Vec<Filter>> {
    Ok(filters(ns, dev, direction)?
        .into_iter()
        .filter(Filter::is_flannels)
        .collect())
}

/// Whether `dev` in `ns` has a clsact qdisc.
pub fn has_clsact(ns: &Netns, dev: &str) -> Result<bool> {
    let out = ns.exec("tc", &["qdisc", "show", "dev", dev])?;
    Ok(out.lines().any(|l| l.starts_with("qdisc clsact ")))
}

/// The names of the eBPF programs on `direction` of `dev` in `ns`, TCX links first, then
/// cls_bpf filters: one list whichever way the data plane attached (TCX where the kernel has
/// it, classic TC where it does not). A kernel without TCX refuses the query with EINVAL.
pub fn attached_programs(ns: &Netns, dev: &str, direction: &str) -> Result<Vec<String>> {
    Ok(programs_on(ns, dev, direction)?
        .into_iter()
        .map(|(name, _)| name)
        .collect())
}

/// The eBPF programs on `direction` of `dev` in `ns` as (name, id), TCX links first, then
/// cls_bpf filters (as [`attached_programs`]): the ids change only when a program is
/// attached again.
pub fn attached_program_ids(ns: &Netns, dev: &str, direction: &str) -> Result<Vec<(String, u64)>> {
    Ok(programs_on(ns, dev, direction)?
        .into_iter()
        .filter_map(|(name, id)| Some((name, id?)))
        .collect())
}

/// (name, id) of each program on the hook, TCX first; a cls_bpf filter's id as tc lists it.
fn programs_on(ns: &Netns, dev: &str, direction: &str) -> Result<Vec<(String, Option<u64>)>> {
    use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
    let attach = match direction {
        "egress" => TcAttachType::Egress,
        "ingress" => TcAttachType::Ingress,
        other => anyhow::bail!("direction {other}: expected ingress or egress"),
    };
    let (owned, dir) = (dev.to_owned(), direction.to_owned());
    let mut found: Vec<(String, Option<u64>)> =
        ns.enter(move || match SchedClassifier::query_tcx(&owned, attach) {
            Ok((_, progs)) => Ok(progs
                .iter()
                .map(|p| {
                    let name = p.name_as_str().unwrap_or("?").to_owned();
                    (name, Some(u64::from(p.id())))
                })
                .collect()),
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                Ok(Vec::new())
            }
            Err(e) => Err(anyhow::anyhow!("query tcx {dir} of {owned}: {e}")),
        })?;
    found.extend(
        filters(ns, dev, direction)?
            .into_iter()
            .filter_map(|f| Some((f.bpf_name?, f.prog_id))),
    );
    Ok(found)
}
