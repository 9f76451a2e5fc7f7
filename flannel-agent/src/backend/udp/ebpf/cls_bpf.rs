//! Classic TC, for kernels without TCX (before 6.6): a clsact qdisc on the device and one
//! direct-action cls_bpf filter per hook at flannel's own pref and handle. Other tools' filters
//! on the same hook keep running (ours return TC_ACT_UNSPEC for packets that are not ours,
//! which goes on to the next filter); ours are told apart by (pref, handle, program name).
//!
//! A new agent swaps the program of our existing filter in place: a change request without
//! NLM_F_EXCL makes cls_bpf replace the program atomically, so the hook is never without it.
//! Removal deletes exactly our filter and leaves the clsact qdisc: another tool may use it, and
//! the kernel has no "delete if empty" (deleting the qdisc deletes every filter on it).
//!
//! Listing uses a blocking rtnetlink socket with netlink-packet-route's messages (aya lists
//! filters only internally, and the data plane loads without an async runtime); adding,
//! replacing and deleting go through aya.

use std::fmt;
use std::io;

use aya::programs::links::Link as _;
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use flannel_common::prog_names;
use rtnetlink::packet_core::{
    NetlinkBuffer, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use rtnetlink::packet_route::tc::{
    TcAttribute, TcFilterBpfOption, TcHandle as NlTcHandle, TcMessage, TcOption,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::error::{io_err, prog_err};
use super::{netdev, EbpfError};

/// Our filters' pref (priority; tc prints it in decimal, 17996) and handle: "FL".
pub const PREF: u16 = 0x464c;
pub const HANDLE: u32 = 0x464c;

/// The programs that may sit in a filter of ours.
const OURS: [&str; 3] = [prog_names::ENCAP, prog_names::DECAP, prog_names::OVERLAY_IN];

/// One direction of a device, as the messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook<'a> {
    pub ifname: &'a str,
    pub ifindex: u32,
    pub direction: TcAttachType,
}

impl fmt::Display for Hook<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tc {} of {}",
            direction_name(self.direction),
            self.ifname
        )
    }
}

pub fn direction_name(direction: TcAttachType) -> &'static str {
    match direction {
        TcAttachType::Egress => "egress",
        _ => "ingress",
    }
}

/// A filter on a clsact hook, as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcFilter {
    pub pref: u16,
    pub handle: u32,
    /// The classifier: `bpf` for cls_bpf.
    pub kind: String,
    /// cls_bpf: the name the filter was given (for eBPF programs, the program's).
    pub name: Option<String>,
    /// cls_bpf with an eBPF program: its id.
    pub prog_id: Option<u32>,
}

impl TcFilter {
    /// One of ours: a cls_bpf filter at our pref and handle holding one of our programs.
    pub fn is_ours(&self) -> bool {
        self.pref == PREF
            && self.handle == HANDLE
            && self.kind == "bpf"
            && self.name.as_deref().is_some_and(|n| OURS.contains(&n))
    }

    /// How `flanneld dataplane` and error messages name it: "flannel_decap (pref 17996 handle
    /// 0x464c)", "bpf (pref 7 handle 0x1)".
    pub fn describe(&self) -> String {
        let what = self.name.as_deref().unwrap_or(&self.kind);
        format!("{what} (pref {} handle {:#x})", self.pref, self.handle)
    }
}

/// The filters on `direction` of device `ifindex`, in the order the kernel runs them (empty
/// when the device has no clsact qdisc).
pub fn filters(ifindex: u32, direction: TcAttachType) -> io::Result<Vec<TcFilter>> {
    let mut request = TcMessage::with_index(ifindex_i32(ifindex)?);
    request.header.parent = parent(direction);
    let mut filters: Vec<TcFilter> = dump(RouteNetlinkMessage::GetTrafficFilter(request))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(m) => filter_of(&m),
            _ => None,
        })
        .collect();
    // The dump lists pref by pref already; keep it so whatever the kernel does.
    filters.sort_by_key(|f| f.pref);
    Ok(filters)
}

/// Adds the clsact qdisc to the hook's device if it has none, then attaches `program` (`name`)
/// in our filter there: replacing the program of our existing filter in place, or creating it.
pub(super) fn attach(
    program: &mut SchedClassifier,
    name: &'static str,
    hook: Hook<'_>,
) -> Result<(), EbpfError> {
    add_clsact(hook.ifname)?;
    let present = filters(hook.ifindex, hook.direction)
        .map_err(io_err(format!("listing the filters on {hook}")))?;
    let handle = TcHandle::from(HANDLE);
    let id = match present
        .iter()
        .find(|f| f.pref == PREF && f.handle == HANDLE)
    {
        Some(ours) if ours.is_ours() => {
            let link =
                SchedClassifierLink::attached(hook.ifname, hook.direction, PREF, handle, None)
                    .map_err(io_err(format!("{hook}")))?;
            program.attach_to_link(link).map_err(prog_err(name))?
        }
        Some(other) => {
            return Err(EbpfError::TcSlotTaken {
                hook: hook.to_string(),
                holder: other.describe(),
            })
        }
        None => {
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: PREF,
                handle,
                classid: None,
            });
            (program.attach_with_options(hook.ifname, hook.direction, options))
                .map_err(prog_err(name))?
        }
    };
    let link = program.take_link(id).map_err(prog_err(name))?;
    // Dropping aya's handle would delete the filter; it must outlive this process. The handle
    // owns no descriptor (a netlink filter is named by device, pref and handle).
    std::mem::forget(link);
    Ok(())
}

/// Puts `program` (`name`) into the filter at our pref and handle on `hook`, whatever holds
/// it now (a change request without NLM_F_EXCL: the program is swapped in place).
pub(super) fn take_back(
    program: &mut SchedClassifier,
    name: &'static str,
    hook: Hook<'_>,
) -> Result<(), EbpfError> {
    let link = SchedClassifierLink::attached(
        hook.ifname,
        hook.direction,
        PREF,
        TcHandle::from(HANDLE),
        None,
    )
    .map_err(io_err(format!("{hook}")))?;
    let id = program.attach_to_link(link).map_err(prog_err(name))?;
    let link = program.take_link(id).map_err(prog_err(name))?;
    // As in `attach`: the filter must outlive aya's handle.
    std::mem::forget(link);
    Ok(())
}

/// Deletes every filter of ours in this network namespace except those on `keep`; returns how
/// many it deleted.
pub(super) fn remove_ours(keep: &[(u32, TcAttachType)]) -> Result<usize, EbpfError> {
    let mut removed = 0;
    for ifindex in clsact_devices().map_err(io_err("listing the clsact qdiscs"))? {
        for direction in [TcAttachType::Ingress, TcAttachType::Egress] {
            if keep.contains(&(ifindex, direction)) {
                continue;
            }
            let ifname = netdev::interface_name(ifindex)?;
            let hook = Hook {
                ifname: &ifname,
                ifindex,
                direction,
            };
            removed += remove_from(hook)?;
        }
    }
    Ok(removed)
}

/// Deletes our filter on `hook`, if it has one; returns how many it deleted (0 or 1).
pub(super) fn remove_from(hook: Hook<'_>) -> Result<usize, EbpfError> {
    let present = filters(hook.ifindex, hook.direction)
        .map_err(io_err(format!("listing the filters on {hook}")))?;
    let mut removed = 0;
    for filter in present.iter().filter(|f| f.is_ours()) {
        delete(hook)?;
        log::info!(
            "removed flannel's cls_bpf filter {} from {hook}",
            filter.describe()
        );
        removed += 1;
    }
    Ok(removed)
}

/// Deletes our filter on `hook` (exactly our pref and handle: nothing else at that pref).
fn delete(hook: Hook<'_>) -> Result<(), EbpfError> {
    let link = SchedClassifierLink::attached(
        hook.ifname,
        hook.direction,
        PREF,
        TcHandle::from(HANDLE),
        None,
    )
    .map_err(io_err(format!("{hook}")))?;
    link.detach().map_err(|source| EbpfError::TcFilter {
        hook: hook.to_string(),
        source,
    })
}

fn add_clsact(ifname: &str) -> Result<(), EbpfError> {
    match tc::qdisc_add_clsact(ifname) {
        Ok(()) => {
            log::info!("added a clsact qdisc to {ifname}");
            Ok(())
        }
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(source) => Err(EbpfError::Clsact {
            ifname: ifname.to_string(),
            source,
        }),
    }
}

/// The devices of this namespace with a clsact qdisc.
fn clsact_devices() -> io::Result<Vec<u32>> {
    let qdiscs = dump(RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()))?;
    let mut devices: Vec<u32> = qdiscs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) => Some(q),
            _ => None,
        })
        .filter(|q| {
            q.attributes
                .iter()
                .any(|a| matches!(a, TcAttribute::Kind(k) if k == "clsact"))
        })
        .filter_map(|q| u32::try_from(q.header.index).ok())
        .collect();
    devices.sort_unstable();
    devices.dedup();
    Ok(devices)
}

fn parent(direction: TcAttachType) -> NlTcHandle {
    let minor = match direction {
        TcAttachType::Egress => NlTcHandle::MIN_EGRESS,
        _ => NlTcHandle::MIN_INGRESS,
    };
    NlTcHandle {
        major: 0xffff,
        minor,
    }
}

/// A filter message as a [`TcFilter`]; `None` for the per-pref header the dump also sends
/// (handle 0).
fn filter_of(m: &TcMessage) -> Option<TcFilter> {
    let handle = u32::from(m.header.handle);
    if handle == 0 {
        return None;
    }
    let mut filter = TcFilter {
        pref: (m.header.info >> 16) as u16,
        handle,
        kind: String::new(),
        name: None,
        prog_id: None,
    };
    for attr in &m.attributes {
        match attr {
            TcAttribute::Kind(k) => filter.kind = k.clone(),
            TcAttribute::Options(options) => {
                for o in options {
                    match o {
                        TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => {
                            filter.name = Some(n.clone())
                        }
                        TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.prog_id = Some(*id),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(filter)
}

fn ifindex_i32(ifindex: u32) -> io::Result<i32> {
    i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Sends `request` as a dump and collects the replies (blocking).
fn dump(request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = NetlinkMessage::from(request);
    message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    message.header.sequence_number = 1;
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut replies = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        let mut rest = data.as_slice();
        while !rest.is_empty() {
            let len = NetlinkBuffer::new_checked(rest)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
                .length() as usize;
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) {
                Ok(reply) => match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                    NetlinkPayload::InnerMessage(m) => replies.push(m),
                    _ => {}
                },
                // Some other kind of qdisc or filter with attributes the parser does not know:
                // not one of ours.
                Err(e) => log::debug!("skipping a netlink message that does not parse: {e}"),
            }
            // Messages are 4-byte aligned within a datagram (and checked to be at least a
            // header long, so this moves on).
            rest = rest.get((len + 3) & !3..).unwrap_or_default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(pref: u16, handle: u32, kind: &str, name: Option<&str>) -> TcFilter {
        TcFilter {
            pref,
            handle,
            kind: kind.into(),
            name: name.map(Into::into),
            prog_id: None,
        }
    }

    #[test]
    fn ours_needs_our_pref_handle_and_program() {
        assert!(filter(PREF, HANDLE, "bpf", Some("flannel_decap")).is_ours());
        assert!(filter(PREF, HANDLE, "bpf", Some("flannel_overlay_in")).is_ours());
        assert!(!filter(PREF, 1, "bpf", Some("flannel_decap")).is_ours());
        assert!(!filter(7, HANDLE, "bpf", Some("flannel_decap")).is_ours());
        assert!(!filter(PREF, HANDLE, "bpf", Some("cil_from_netdev")).is_ours());
        assert!(!filter(PREF, HANDLE, "bpf", None).is_ours());
        assert!(!filter(PREF, HANDLE, "u32", Some("flannel_decap")).is_ours());
    }

    #[test]
    fn filters_are_described_by_name_or_kind() {
        assert_eq!(
            filter(PREF, HANDLE, "bpf", Some("flannel_decap")).describe(),
            "flannel_decap (pref 17996 handle 0x464c)"
        );
        assert_eq!(
            filter(7, 1, "bpf", None).describe(),
            "bpf (pref 7 handle 0x1)"
        );
    }
}
