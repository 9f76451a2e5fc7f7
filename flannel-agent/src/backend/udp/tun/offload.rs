//! Pure packet surgery for the TUN data plane, free of I/O so it can be tested without
//! privileges: Internet checksums, splitting TCP super-packets read from the TUN into MTU-sized
//! inner packets (what a NIC does for TSO), grouping wire datagrams for UDP GSO, merging received
//! TCP segments back into super-packets for the TUN (what GRO does), and ICMP net-unreachable.

use std::net::Ipv4Addr;

/// Size of `struct virtio_net_hdr` that a TUN with IFF_VNET_HDR puts before every packet.
pub(crate) const VNET_HDR_LEN: usize = 10;
const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_F_DATA_VALID: u8 = 2;
const VNET_GSO_NONE: u8 = 0;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_ECN: u8 = 0x80;

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;

/// Largest UDP payload of one IPv4 datagram, which bounds one UDP GSO send.
pub(crate) const MAX_UDP_PAYLOAD: usize = 65_507;
/// The kernel refuses UDP GSO sends of more segments than this (UDP_MAX_SEGMENTS).
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;
const MAX_IPV4_LEN: usize = 65_535;
/// RFC 1812: quote as much of the offending packet as fits in 576 bytes.
const ICMP_ERROR_MAX_LEN: usize = 576;

/// `struct virtio_net_hdr` (legacy layout, native byte order as TUN uses it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VirtioNetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16::from_ne_bytes([b[2], b[3]]),
            gso_size: u16::from_ne_bytes([b[4], b[5]]),
            csum_start: u16::from_ne_bytes([b[6], b[7]]),
            csum_offset: u16::from_ne_bytes([b[8], b[9]]),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Why a packet cannot be forwarded (mapped onto `DataplaneStats` drop counters by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PacketError {
    NotIpv4,
    Malformed,
    TtlExpired,
}

// ---------------------------------------------------------------------------------------------
// Checksums (RFC 1071)

/// Adds `data`, as big-endian 16-bit words, to a running ones'-complement sum. `data` must start
/// at an even offset of the summed region; an odd trailing byte is padded with zero.
pub(crate) fn csum_add(mut acc: u64, data: &[u8]) -> u64 {
    // 32-bit words into a 64-bit accumulator: carries are kept and folded at the end, which is
    // equivalent to the 16-bit ones'-complement sum and several times faster.
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let mut words = chunks.remainder().chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds a running sum to 16 bits (not inverted).
pub(crate) fn csum_fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Sum of the IPv4 pseudo-header of a TCP/UDP segment of `l4_len` bytes.
fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u64 {
    csum_add(csum_add(0, src), dst) + u64::from(proto) + l4_len as u64
}

/// Recomputes the IPv4 header checksum in place.
fn fix_ipv4_checksum(ip: &mut [u8], ihl: usize) {
    ip[10] = 0;
    ip[11] = 0;
    let c = !csum_fold(csum_add(0, &ip[..ihl]));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// True when the 16-bit ones'-complement sum over `data` (checksum field included) checks out.
#[cfg(test)]
fn csum_ok(acc: u64) -> bool {
    csum_fold(acc) == 0xffff
}

// ---------------------------------------------------------------------------------------------
// IPv4 parsing

/// Header length and total length of an IPv4 packet, validated against the buffer.
fn ipv4_lengths(pkt: &[u8]) -> Result<(usize, usize), PacketError> {
    let first = *pkt.first().ok_or(PacketError::NotIpv4)?;
    if first >> 4 != 4 {
        return Err(PacketError::NotIpv4);
    }
    let ihl = usize::from(first & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl {
        return Err(PacketError::Malformed);
    }
    let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
    if total < ihl || total > pkt.len() {
        return Err(PacketError::Malformed);
    }
    Ok((ihl, total))
}

/// Validates an inner IPv4 packet received from the wire and returns it trimmed to its total
/// length (a datagram may carry padding after it) with its source address.
pub(crate) fn inner_packet(seg: &[u8]) -> Result<(&[u8], Ipv4Addr), PacketError> {
    let (_, total) = ipv4_lengths(seg)?;
    let src = Ipv4Addr::new(seg[12], seg[13], seg[14], seg[15]);
    Ok((&seg[..total], src))
}

/// Total length field of the IPv4 packet at the start of `data`, if it looks like one.
pub(crate) fn ipv4_total_len(data: &[u8]) -> Option<usize> {
    (data.len() >= 20 && data[0] >> 4 == 4)
        .then(|| usize::from(u16::from_be_bytes([data[2], data[3]])))
}

/// A TCP/IPv4 packet from the wire that is longer than the device MTU: a TSO super-packet that
/// an eBPF node on this machine encapsulated whole. Prepared in `out` for the TUN: with virtio
/// headers as one GSO write (returns its header; the checksum field is reset to the pseudo-header
/// sum, as for any checksum-offloaded packet), without them cut into MTU-sized segments with
/// complete checksums (lengths in `lens`, returns None). `mss_hint` is the sender's segment size
/// when known.
pub(crate) fn oversized_tcp_for_tun(
    pkt: &[u8],
    mtu: usize,
    mss_hint: Option<usize>,
    vnet: bool,
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<Option<VirtioNetHdr>, PacketError> {
    let (ihl, total) = ipv4_lengths(pkt)?;
    let pkt = &pkt[..total];
    if pkt[9] != IPPROTO_TCP || total < ihl + 20 {
        return Err(PacketError::Malformed);
    }
    let hl = ihl + usize::from(pkt[ihl + 12] >> 4) * 4;
    if hl < ihl + 20 || hl >= total || hl >= mtu {
        return Err(PacketError::Malformed);
    }
    let mss = mss_hint
        .filter(|&m| m > 0)
        .map_or(mtu - hl, |m| m.min(mtu - hl));
    out.clear();
    lens.clear();
    if !vnet {
        segment_tcp4(pkt, ihl, mss, out, lens)?;
        return Ok(None);
    }
    out.extend_from_slice(pkt);
    let pseudo = csum_fold(pseudo_header_sum(
        &pkt[12..16],
        &pkt[16..20],
        IPPROTO_TCP,
        total - ihl,
    ));
    out[ihl + 16..ihl + 18].copy_from_slice(&pseudo.to_be_bytes());
    Ok(Some(VirtioNetHdr {
        flags: VNET_F_NEEDS_CSUM,
        gso_type: VNET_GSO_TCPV4,
        hdr_len: hl as u16,
        gso_size: mss as u16,
        csum_start: ihl as u16,
        csum_offset: 16,
    }))
}

/// Destination address of an IPv4 packet (caller checked it has at least a minimal header).
pub(crate) fn ipv4_dst(pkt: &[u8]) -> Option<Ipv4Addr> {
    let d = pkt.get(16..20)?;
    Some(Ipv4Addr::new(d[0], d[1], d[2], d[3]))
}

// ---------------------------------------------------------------------------------------------
// TUN -> wire

/// Turns one packet read from the TUN into the inner packets that go on the wire: a TCP
/// super-packet (virtio GSO) becomes one packet per `gso_size` of payload, anything else stays
/// one packet. TTL is decremented (the tunnel is one hop, as in upstream's proxy) and every
/// checksum is complete. Packets are appended to `out`, their lengths to `lens`; on error nothing
/// is appended.
pub(crate) fn tun_packet_to_wire(
    vnet: Option<&VirtioNetHdr>,
    pkt: &mut [u8],
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<(), PacketError> {
    let (ihl, total) = ipv4_lengths(pkt)?;
    let pkt = &mut pkt[..total];
    if pkt[8] <= 1 {
        return Err(PacketError::TtlExpired);
    }
    pkt[8] -= 1;
    let vnet = vnet.copied().unwrap_or_default();
    match vnet.gso_type & !VNET_GSO_ECN {
        VNET_GSO_NONE => {
            if vnet.flags & VNET_F_NEEDS_CSUM != 0 {
                complete_partial_checksum(pkt, ihl, &vnet)?;
            }
            fix_ipv4_checksum(pkt, ihl);
            out.extend_from_slice(pkt);
            lens.push(total);
            Ok(())
        }
        VNET_GSO_TCPV4 => segment_tcp4(pkt, ihl, usize::from(vnet.gso_size), out, lens),
        _ => Err(PacketError::Malformed),
    }
}

/// Finishes a CHECKSUM_PARTIAL packet: the field at csum_start + csum_offset holds the
/// pseudo-header sum, the rest of the L4 data still has to be added.
fn complete_partial_checksum(
    pkt: &mut [u8],
    ihl: usize,
    vnet: &VirtioNetHdr,
) -> Result<(), PacketError> {
    let start = usize::from(vnet.csum_start);
    let field = start + usize::from(vnet.csum_offset);
    if start < ihl || field + 2 > pkt.len() {
        return Err(PacketError::Malformed);
    }
    let mut c = !csum_fold(csum_add(0, &pkt[start..]));
    if c == 0 {
        // 0 means "no checksum" for UDP; 0xffff is the same value in ones' complement.
        c = 0xffff;
    }
    pkt[field..field + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Software TSO: splits a TCP/IPv4 super-packet into segments of at most `mss` payload bytes,
/// the way the kernel's tcp_gso_segment does (sequence numbers advance, IP IDs increment, FIN
/// and PSH only on the last segment, CWR only on the first).
fn segment_tcp4(
    pkt: &[u8],
    ihl: usize,
    mss: usize,
    out: &mut Vec<u8>,
    lens: &mut Vec<usize>,
) -> Result<(), PacketError> {
    if pkt[9] != IPPROTO_TCP || mss == 0 || pkt.len() < ihl + 20 {
        return Err(PacketError::Malformed);
    }
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    let hl = ihl + thl;
    if thl < 20 || hl > pkt.len() {
        return Err(PacketError::Malformed);
    }
    let payload = &pkt[hl..];
    let seq0 = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let id0 = u16::from_be_bytes([pkt[4], pkt[5]]);
    let flags0 = pkt[ihl + 13];
    let nsegs = payload.len().div_ceil(mss).max(1);
    let src_dst_sum = csum_add(0, &pkt[12..20]);
    out.reserve(payload.len() + nsegs * hl);
    for i in 0..nsegs {
        let chunk = payload
            .get(i * mss..((i + 1) * mss).min(payload.len()))
            .unwrap_or(&[]);
        let start = out.len();
        out.extend_from_slice(&pkt[..hl]);
        out.extend_from_slice(chunk);
        let seg = &mut out[start..];
        let seg_len = hl + chunk.len();
        seg[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
        seg[4..6].copy_from_slice(&id0.wrapping_add(i as u16).to_be_bytes());
        fix_ipv4_checksum(seg, ihl);
        let tcp = &mut seg[ihl..];
        let seq = seq0.wrapping_add((i * mss) as u32);
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        let mut flags = flags0;
        if i + 1 < nsegs {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        tcp[13] = flags;
        tcp[16] = 0;
        tcp[17] = 0;
        let sum = src_dst_sum + u64::from(IPPROTO_TCP) + (thl + chunk.len()) as u64;
        let sum = csum_add(csum_add(sum, &tcp[..thl]), chunk);
        tcp[16..18].copy_from_slice(&(!csum_fold(sum)).to_be_bytes());
        lens.push(seg_len);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Wire datagrams -> UDP GSO sends

/// One UDP send: `segs` datagrams of `seg_size` bytes laid end to end in the batch buffer (the
/// last may be shorter), which the kernel splits with UDP_SEGMENT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WireMsg {
    pub dst: Ipv4Addr,
    pub start: usize,
    pub len: usize,
    pub seg_size: usize,
    pub segs: usize,
    /// A shorter segment ended this send: UDP GSO allows that only for the last one.
    closed: bool,
}

/// Wire datagrams collected for one sendmmsg, grouped into UDP GSO sends.
pub(crate) struct WireBatch {
    pub buf: Vec<u8>,
    pub msgs: Vec<WireMsg>,
    committed: usize,
    max_segs: usize,
}

impl WireBatch {
    pub fn new(capacity: usize, gso: bool) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
            msgs: Vec::new(),
            committed: 0,
            max_segs: if gso { MAX_GSO_SEGMENTS } else { 1 },
        }
    }

    pub fn set_gso(&mut self, gso: bool) {
        self.max_segs = if gso { MAX_GSO_SEGMENTS } else { 1 };
    }

    pub fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Drops bytes appended after the last commit (a packet that turned out to be undeliverable).
    pub fn rollback(&mut self) {
        self.buf.truncate(self.committed);
    }

    /// Declares the next `len` bytes appended to `buf` since the last commit as one datagram for
    /// `dst`, extending the previous send when UDP GSO rules allow.
    pub fn commit(&mut self, dst: Ipv4Addr, len: usize) {
        let start = self.committed;
        self.committed += len;
        if let Some(last) = self.msgs.last_mut() {
            if last.dst == dst
                && !last.closed
                && last.segs < self.max_segs
                && len <= last.seg_size
                && last.len + len <= MAX_UDP_PAYLOAD
            {
                last.len += len;
                last.segs += 1;
                last.closed = len < last.seg_size;
                return;
            }
        }
        self.msgs.push(WireMsg {
            dst,
            start,
            len,
            seg_size: len,
            segs: 1,
            closed: false,
        });
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.msgs.clear();
        self.committed = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// Wire -> TUN: TCP coalescing

/// What makes a received packet a candidate for merging.
struct TcpSegInfo {
    hl: usize,
    seq: u32,
    payload: usize,
    psh: bool,
    /// The checksum is still to be computed (see `partial_checksum_field`).
    partial: bool,
}

const IPPROTO_UDP: u8 = 17;

/// Offset of the TCP/UDP checksum field of an unfragmented IPv4 packet (no IP options) whose
/// field holds only the pseudo-header sum: the packet left a kernel on this machine as
/// CHECKSUM_PARTIAL (the checksum left to "hardware"), and a veth and the UDP socket that split
/// a tunnel GSO train hand it over like that. Our eBPF nodes send such packets when the underlay
/// is a veth. Whoever finally delivers it must complete the checksum.
fn partial_checksum_field(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < 28 || pkt[0] != 0x45 || u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
        return None;
    }
    let field = match pkt[9] {
        IPPROTO_TCP if pkt.len() >= 40 => 20 + 16,
        IPPROTO_UDP => 20 + 6,
        _ => return None,
    };
    let pseudo = csum_fold(pseudo_header_sum(
        &pkt[12..16],
        &pkt[16..20],
        pkt[9],
        pkt.len() - 20,
    ));
    let have = u16::from_be_bytes([pkt[field], pkt[field + 1]]);
    // 0 and 0xffff are the same number in ones' complement; a UDP 0 means "no checksum".
    let same = have == pseudo || (have == 0 && pseudo == 0xffff && pkt[9] == IPPROTO_TCP);
    same.then_some(field)
}

/// The virtio header under which a packet from the wire goes to the TUN when it is not merged:
/// checksum-partial packets are passed on as such (the kernel completes or trusts them exactly
/// as it would have on the sending host), everything else as received.
fn passthrough_hdr(pkt: &[u8]) -> VirtioNetHdr {
    match partial_checksum_field(pkt) {
        Some(field) => VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: (field - 20) as u16,
            ..Default::default()
        },
        None => VirtioNetHdr::default(),
    }
}

/// For a TUN without virtio headers: the packet with its checksum completed in software when it
/// arrived checksum-partial (copied into `scratch`), else the packet itself.
pub(crate) fn with_complete_checksum<'a>(pkt: &'a [u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
    let Some(field) = partial_checksum_field(pkt) else {
        return pkt;
    };
    scratch.clear();
    scratch.extend_from_slice(pkt);
    let mut c = !csum_fold(csum_add(0, &scratch[20..]));
    if c == 0 && scratch[9] == IPPROTO_UDP {
        c = 0xffff;
    }
    scratch[field..field + 2].copy_from_slice(&c.to_be_bytes());
    scratch
}

/// A plain TCP/IPv4 data segment (no IP options, not a fragment, only ACK/PSH set) whose
/// checksum verifies or is still to be computed (checksum-partial). The checksum is checked
/// because merged packets are handed to the kernel as verified, and the outer UDP checksum may
/// be zero (our eBPF nodes send none).
fn tcp_seg_info(pkt: &[u8]) -> Option<TcpSegInfo> {
    if pkt.len() < 40 || pkt[0] != 0x45 || pkt[9] != IPPROTO_TCP {
        return None;
    }
    if usize::from(u16::from_be_bytes([pkt[2], pkt[3]])) != pkt.len() {
        return None;
    }
    if u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
        return None;
    }
    let thl = usize::from(pkt[32] >> 4) * 4;
    let hl = 20 + thl;
    let flags = pkt[33];
    if thl < 20 || hl >= pkt.len() || flags & !(TCP_ACK | TCP_PSH) != 0 || flags & TCP_ACK == 0 {
        return None;
    }
    let sum = pseudo_header_sum(&pkt[12..16], &pkt[16..20], IPPROTO_TCP, pkt.len() - 20);
    let partial = if csum_fold(csum_add(sum, &pkt[20..])) == 0xffff {
        false
    } else if partial_checksum_field(pkt).is_some() {
        true
    } else {
        return None;
    };
    Some(TcpSegInfo {
        hl,
        seq: u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]]),
        payload: pkt.len() - hl,
        psh: flags & TCP_PSH != 0,
        partial,
    })
}

/// Software GRO for the TUN write side: consecutive in-order segments of one TCP flow become
/// one super-packet with a virtio GSO header, so the kernel gets one write instead of dozens.
/// Everything else is passed through unchanged and in order.
pub(crate) struct TcpCoalescer {
    pkt: Vec<u8>,
    active: bool,
    hl: usize,
    gso_size: usize,
    segs: usize,
    next_seq: u32,
    /// No more segments may follow (a short or PSH segment ended the run).
    closed: bool,
    /// The pending packet (when alone) still needs its checksum.
    partial: bool,
}

impl Default for TcpCoalescer {
    fn default() -> Self {
        Self {
            pkt: Vec::with_capacity(MAX_IPV4_LEN),
            active: false,
            hl: 0,
            gso_size: 0,
            segs: 0,
            next_seq: 0,
            closed: false,
            partial: false,
        }
    }
}

impl TcpCoalescer {
    /// Offers one validated inner IPv4 packet; `emit` receives what to write to the TUN.
    pub fn push(&mut self, pkt: &[u8], emit: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        let Some(info) = tcp_seg_info(pkt) else {
            self.flush(emit);
            emit(&passthrough_hdr(pkt), pkt);
            return;
        };
        if self.active && self.can_append(pkt, &info) {
            self.pkt.extend_from_slice(&pkt[info.hl..]);
            self.segs += 1;
            self.next_seq = info.seq.wrapping_add(info.payload as u32);
            if info.psh {
                self.pkt[20 + 13] |= TCP_PSH;
            }
            self.closed = info.psh || info.payload < self.gso_size;
            return;
        }
        self.flush(emit);
        self.pkt.clear();
        self.pkt.extend_from_slice(pkt);
        self.active = true;
        self.hl = info.hl;
        self.gso_size = info.payload;
        self.segs = 1;
        self.next_seq = info.seq.wrapping_add(info.payload as u32);
        self.closed = info.psh;
        self.partial = info.partial;
    }

    fn can_append(&self, pkt: &[u8], info: &TcpSegInfo) -> bool {
        let cur = &self.pkt;
        let hl = self.hl;
        !self.closed
            && info.hl == hl
            && info.seq == self.next_seq
            && info.payload <= self.gso_size
            && cur.len() + info.payload <= MAX_IPV4_LEN
            // IP: version/ihl/tos, frag flags/ttl/proto, addresses (length, id, csum may differ)
            && pkt[0..2] == cur[0..2]
            && pkt[6..10] == cur[6..10]
            && pkt[12..20] == cur[12..20]
            // TCP: ports, ack/data offset, flags except PSH, window, urgent pointer and options
            && pkt[20..24] == cur[20..24]
            && pkt[28..33] == cur[28..33]
            && pkt[33] & !TCP_PSH == cur[33] & !TCP_PSH
            && pkt[34..36] == cur[34..36]
            && pkt[38..hl] == cur[38..hl]
    }

    /// Emits the pending merged packet, if any.
    pub fn flush(&mut self, emit: &mut impl FnMut(&VirtioNetHdr, &[u8])) {
        if !self.active {
            return;
        }
        self.active = false;
        if self.segs == 1 {
            // Unchanged; its checksum was verified above, or is still to be computed.
            let hdr = if self.partial {
                passthrough_hdr(&self.pkt)
            } else {
                VirtioNetHdr {
                    flags: VNET_F_DATA_VALID,
                    ..Default::default()
                }
            };
            emit(&hdr, &self.pkt);
            return;
        }
        let total = self.pkt.len();
        let p = &mut self.pkt;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        fix_ipv4_checksum(p, 20);
        // CHECKSUM_PARTIAL convention: the field holds the folded pseudo-header sum.
        let pseudo = csum_fold(pseudo_header_sum(
            &p[12..16],
            &p[16..20],
            IPPROTO_TCP,
            total - 20,
        ));
        p[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let hdr = VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4,
            hdr_len: self.hl as u16,
            gso_size: self.gso_size as u16,
            csum_start: 20,
            csum_offset: 16,
        };
        emit(&hdr, p);
    }
}

// ---------------------------------------------------------------------------------------------
// ICMP

/// Builds an ICMP "destination net unreachable" from `from` answering `orig` into `out`.
/// Returns false (nothing built) where RFC 1122 forbids an error: for ICMP errors, non-first
/// fragments, and multicast/broadcast/unspecified sources or destinations.
pub(crate) fn icmp_net_unreachable(orig: &[u8], from: Ipv4Addr, out: &mut Vec<u8>) -> bool {
    let Ok((ihl, total)) = ipv4_lengths(orig) else {
        return false;
    };
    let src = Ipv4Addr::new(orig[12], orig[13], orig[14], orig[15]);
    let dst = Ipv4Addr::new(orig[16], orig[17], orig[18], orig[19]);
    let frag_offset = u16::from_be_bytes([orig[6], orig[7]]) & 0x1fff;
    if frag_offset != 0
        || src.is_unspecified()
        || src.is_multicast()
        || src.is_broadcast()
        || dst.is_multicast()
        || dst.is_broadcast()
    {
        return false;
    }
    if orig[9] == IPPROTO_ICMP {
        match orig.get(ihl) {
            // Only echo request/reply and other queries get an error back.
            Some(0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) => {}
            _ => return false,
        }
    }
    let quoted = &orig[..total.min(ICMP_ERROR_MAX_LEN - 28)];
    let len = 28 + quoted.len();
    out.clear();
    out.extend_from_slice(&[0x45, 0xc0]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
    out.extend_from_slice(&from.octets());
    out.extend_from_slice(&src.octets());
    fix_ipv4_checksum(out, 20);
    out.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(quoted);
    let c = !csum_fold(csum_add(0, &out[20..]));
    out[22..24].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: [u8; 4] = [10, 244, 1, 2];
    const DST: [u8; 4] = [10, 244, 2, 2];

    /// A TCP/IPv4 packet; `csum` fills both checksums completely (else the TCP field gets the
    /// pseudo-header sum, as in a CHECKSUM_PARTIAL super-packet from the TUN).
    fn tcp_packet(seq: u32, flags: u8, options: &[u8], payload: &[u8], csum: bool) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let thl = 20 + options.len();
        let total = 20 + thl + payload.len();
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, IPPROTO_TCP, 0, 0];
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&SRC);
        p.extend_from_slice(&DST);
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&5201u16.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&777u32.to_be_bytes());
        p.push(((thl / 4) as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&[0x01, 0xf5, 0, 0, 0, 0]);
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        fix_ipv4_checksum(&mut p, 20);
        let pseudo = pseudo_header_sum(&SRC, &DST, IPPROTO_TCP, thl + payload.len());
        let c = if csum {
            !csum_fold(csum_add(pseudo, &p[20..]))
        } else {
            csum_fold(pseudo)
        };
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn assert_valid_tcp4(p: &[u8]) {
        assert!(csum_ok(csum_add(0, &p[..20])), "IP checksum");
        let sum = pseudo_header_sum(&p[12..16], &p[16..20], IPPROTO_TCP, p.len() - 20);
        assert!(csum_ok(csum_add(sum, &p[20..])), "TCP checksum");
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
    }

    fn split<'a>(out: &'a [u8], lens: &[usize]) -> Vec<&'a [u8]> {
        let mut at = 0;
        lens.iter()
            .map(|l| {
                at += l;
                &out[at - l..at]
            })
            .collect()
    }

    fn tso_hdr(mss: u16, hl: u16) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type: VNET_GSO_TCPV4,
            hdr_len: hl,
            gso_size: mss,
            csum_start: 20,
            csum_offset: 16,
        }
    }

    #[test]
    fn ipv4_header_checksum_matches_known_value() {
        // Classic example header, checksum 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        fix_ipv4_checksum(&mut h, 20);
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
    }

    #[test]
    fn checksum_of_odd_and_unaligned_lengths_matches_naive_sum() {
        let data = pattern(1001);
        for len in [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1000, 1001] {
            let naive: u64 = data[..len]
                .chunks(2)
                .map(|w| u64::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
                .sum();
            assert_eq!(
                csum_fold(csum_add(0, &data[..len])),
                csum_fold(naive),
                "len {len}"
            );
        }
    }

    #[test]
    fn vnet_header_round_trips() {
        let h = tso_hdr(1432, 52);
        assert_eq!(VirtioNetHdr::parse(&h.encode()), Some(h));
        assert_eq!(VirtioNetHdr::parse(&[0; 9]), None);
    }

    #[test]
    fn super_packet_is_split_into_valid_mss_sized_segments() {
        let payload = pattern(5000);
        let opts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
        let mut sp = tcp_packet(
            1000,
            TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR,
            &opts,
            &payload,
            false,
        );
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&tso_hdr(1420, 52)), &mut sp, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![52 + 1420, 52 + 1420, 52 + 1420, 52 + 740]);
        let segs = split(&out, &lens);
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            assert_valid_tcp4(s);
            assert_eq!(s[8], 63, "TTL decremented");
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16, "IP ID");
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 1000 + 1420 * i as u32);
            let flags = s[33];
            let last = i == segs.len() - 1;
            assert_eq!(
                flags & (TCP_FIN | TCP_PSH) != 0,
                last,
                "FIN/PSH only on last"
            );
            assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on first");
            assert_eq!(&s[40..52], &opts);
            joined.extend_from_slice(&s[52..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn partial_checksum_of_plain_packet_is_completed() {
        let mut p = tcp_packet(5, TCP_ACK, &[], &pattern(101), false);
        let hdr = VirtioNetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&hdr), &mut p, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![141]);
        assert_valid_tcp4(&out);
        assert_eq!(out[8], 63);
    }

    #[test]
    fn plain_packet_keeps_payload_and_gets_new_ttl_and_checksum() {
        let mut p = tcp_packet(5, TCP_ACK, &[], b"hello", true);
        p.extend_from_slice(&[0xee; 3]); // trailing garbage beyond total length is not sent
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(None, &mut p, &mut out, &mut lens).unwrap();
        assert_eq!(lens, vec![45]);
        assert_valid_tcp4(&out);
        assert_eq!(&out[40..], b"hello");
    }

    #[test]
    fn bad_packets_are_refused_without_output() {
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        let mut v6 = vec![0x60; 40];
        assert_eq!(
            tun_packet_to_wire(None, &mut v6, &mut out, &mut lens),
            Err(PacketError::NotIpv4)
        );
        let mut ttl1 = tcp_packet(1, TCP_ACK, &[], b"x", true);
        ttl1[8] = 1;
        assert_eq!(
            tun_packet_to_wire(None, &mut ttl1, &mut out, &mut lens),
            Err(PacketError::TtlExpired)
        );
        let mut short = tcp_packet(1, TCP_ACK, &[], b"x", true);
        short[2..4].copy_from_slice(&500u16.to_be_bytes());
        assert_eq!(
            tun_packet_to_wire(None, &mut short, &mut out, &mut lens),
            Err(PacketError::Malformed)
        );
        let mut no_mss = tcp_packet(1, TCP_ACK, &[], &pattern(3000), false);
        assert_eq!(
            tun_packet_to_wire(Some(&tso_hdr(0, 40)), &mut no_mss, &mut out, &mut lens),
            Err(PacketError::Malformed)
        );
        assert_eq!(
            tun_packet_to_wire(None, &mut [], &mut out, &mut lens),
            Err(PacketError::NotIpv4)
        );
        assert!(out.is_empty() && lens.is_empty());
    }

    fn coalesce(pkts: &[Vec<u8>]) -> Vec<(VirtioNetHdr, Vec<u8>)> {
        let mut c = TcpCoalescer::default();
        let mut got = Vec::new();
        let mut emit = |h: &VirtioNetHdr, p: &[u8]| got.push((*h, p.to_vec()));
        for p in pkts {
            c.push(p, &mut emit);
        }
        c.flush(&mut emit);
        got
    }

    #[test]
    fn segments_of_one_flow_merge_into_a_super_packet_that_resegments_identically() {
        let payload = pattern(10_000);
        let mut sp = tcp_packet(42, TCP_ACK | TCP_PSH, &[], &payload, false);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&tso_hdr(1432, 40)), &mut sp, &mut out, &mut lens).unwrap();
        let segs: Vec<Vec<u8>> = split(&out, &lens).iter().map(|s| s.to_vec()).collect();
        assert_eq!(segs.len(), 7);

        let got = coalesce(&segs);
        assert_eq!(got.len(), 1);
        let (hdr, merged) = &got[0];
        assert_eq!(*hdr, tso_hdr(1432, 40));
        assert_eq!(merged.len(), 40 + payload.len());
        assert_eq!(&merged[40..], &payload[..]);
        assert!(csum_ok(csum_add(0, &merged[..20])));
        assert_eq!(merged[33], TCP_ACK | TCP_PSH);
        let pseudo = csum_fold(pseudo_header_sum(
            &SRC,
            &DST,
            IPPROTO_TCP,
            merged.len() - 20,
        ));
        assert_eq!(u16::from_be_bytes([merged[36], merged[37]]), pseudo);

        // What the kernel will do with it: segment again; same segments (one more TTL hop).
        let mut again = merged.clone();
        let (mut out2, mut lens2) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(hdr), &mut again, &mut out2, &mut lens2).unwrap();
        assert_eq!(lens2, lens);
        for (a, b) in split(&out2, &lens2).iter().zip(&segs) {
            assert_valid_tcp4(a);
            assert_eq!(a[8] + 1, b[8]);
            assert_eq!(a[20..], b[20..]);
        }
    }

    #[test]
    fn single_verified_segment_passes_unchanged_and_marked_valid() {
        let p = tcp_packet(1, TCP_ACK, &[], b"abc", true);
        let got = coalesce(std::slice::from_ref(&p));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.flags, VNET_F_DATA_VALID);
        assert_eq!(got[0].0.gso_type, VNET_GSO_NONE);
        assert_eq!(got[0].1, p);
    }

    #[test]
    fn non_mergeable_packets_pass_through_in_order() {
        let a = tcp_packet(100, TCP_ACK, &[], &[1; 100], true);
        let gap = tcp_packet(300, TCP_ACK, &[], &[2; 100], true); // seq gap
        let mut bad = tcp_packet(400, TCP_ACK, &[], &[3; 100], true);
        bad[60] ^= 0xff; // corrupted payload: must not be marked valid
        let syn = tcp_packet(500, 0x02, &[], &[], true);
        let mut udp = tcp_packet(0, 0, &[], &[4; 8], true);
        udp[9] = 17;
        let got = coalesce(&[
            a.clone(),
            gap.clone(),
            bad.clone(),
            syn.clone(),
            udp.clone(),
        ]);
        let pkts: Vec<&Vec<u8>> = got.iter().map(|(_, p)| p).collect();
        assert_eq!(pkts, vec![&a, &gap, &bad, &syn, &udp]);
        assert_eq!(
            got[2].0,
            VirtioNetHdr::default(),
            "bad checksum left to the kernel"
        );
        assert_eq!(got[3].0, VirtioNetHdr::default());
    }

    #[test]
    fn short_or_psh_segment_ends_a_merge_and_other_flows_do_not_join() {
        let s1 = tcp_packet(0, TCP_ACK, &[], &[1; 100], true);
        let s2 = tcp_packet(100, TCP_ACK | TCP_PSH, &[], &[2; 100], true);
        let s3 = tcp_packet(200, TCP_ACK, &[], &[3; 100], true);
        let s4 = tcp_packet(300, TCP_ACK, &[], &[4; 50], true);
        let s5 = tcp_packet(350, TCP_ACK, &[], &[5; 50], true);
        let mut other = tcp_packet(400, TCP_ACK, &[], &[6; 50], true);
        other[22] = 0x99; // another source port
        fix_csums(&mut other);
        let got = coalesce(&[s1, s2, s3, s4, s5, other.clone()]);
        let sizes: Vec<usize> = got.iter().map(|(_, p)| p.len()).collect();
        assert_eq!(sizes, vec![40 + 200, 40 + 150, 40 + 50, 90]);
        assert_eq!(got[0].1[33], TCP_ACK | TCP_PSH);
        assert_eq!(got[1].0.gso_size, 100);
        assert_eq!(got[3].1, other);
    }

    fn fix_csums(p: &mut [u8]) {
        fix_ipv4_checksum(p, 20);
        p[36] = 0;
        p[37] = 0;
        let sum = pseudo_header_sum(&SRC, &DST, IPPROTO_TCP, p.len() - 20);
        let c = !csum_fold(csum_add(sum, &p[20..]));
        p[36..38].copy_from_slice(&c.to_be_bytes());
    }

    /// The packet as a sending kernel leaves it for checksum offload.
    fn make_partial(mut p: Vec<u8>) -> Vec<u8> {
        let field = if p[9] == IPPROTO_TCP { 36 } else { 26 };
        let pseudo = csum_fold(pseudo_header_sum(
            &p[12..16],
            &p[16..20],
            p[9],
            p.len() - 20,
        ));
        p[field..field + 2].copy_from_slice(&pseudo.to_be_bytes());
        p
    }

    #[test]
    fn checksum_partial_segments_from_a_local_sender_merge_and_pass_as_partial() {
        let payload = pattern(3000);
        let mut sp = tcp_packet(9, TCP_ACK, &[], &payload, false);
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        tun_packet_to_wire(Some(&tso_hdr(1432, 40)), &mut sp, &mut out, &mut lens).unwrap();
        let segs: Vec<Vec<u8>> = split(&out, &lens)
            .iter()
            .map(|s| make_partial(s.to_vec()))
            .collect();
        let got = coalesce(&segs);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, tso_hdr(1432, 40));
        assert_eq!(&got[0].1[40..], &payload[..]);

        // Alone, it stays partial: the kernel computes the checksum.
        let single = make_partial(tcp_packet(1, TCP_ACK, &[], b"abc", true));
        let got = coalesce(std::slice::from_ref(&single));
        assert_eq!(
            (got[0].0.flags, got[0].0.csum_start, got[0].0.csum_offset),
            (VNET_F_NEEDS_CSUM, 20, 16)
        );
        assert_eq!(got[0].1, single);

        // UDP too; a complete UDP packet is left alone.
        let mut udp = tcp_packet(0, 0, &[], &[4; 8], true);
        udp[9] = IPPROTO_UDP;
        let partial_udp = make_partial(udp.clone());
        let got = coalesce(&[partial_udp.clone(), udp.clone()]);
        assert_eq!(
            (got[0].0.flags, got[0].0.csum_offset),
            (VNET_F_NEEDS_CSUM, 6)
        );
        assert_eq!(got[1].0, VirtioNetHdr::default());
    }

    #[test]
    fn oversized_tcp_from_the_wire_becomes_one_gso_write_or_mtu_sized_segments() {
        let payload = pattern(20_000);
        let sp = make_partial(tcp_packet(5, TCP_ACK | TCP_PSH, &[], &payload, true));
        let (mut out, mut lens) = (Vec::new(), Vec::new());
        let hdr = oversized_tcp_for_tun(&sp, 1472, Some(1400), true, &mut out, &mut lens).unwrap();
        assert_eq!(hdr, Some(tso_hdr(1400, 40)));
        assert_eq!(out, sp);

        let hdr = oversized_tcp_for_tun(&sp, 1472, None, false, &mut out, &mut lens).unwrap();
        assert_eq!(hdr, None);
        assert_eq!(lens.len(), 20_000usize.div_ceil(1432));
        let mut joined = Vec::new();
        for s in split(&out, &lens) {
            assert!(s.len() <= 1472);
            assert_valid_tcp4(s);
            joined.extend_from_slice(&s[40..]);
        }
        assert_eq!(joined, payload);

        let mut udp = sp.clone();
        udp[9] = IPPROTO_UDP;
        assert_eq!(
            oversized_tcp_for_tun(&udp, 1472, None, true, &mut out, &mut lens),
            Err(PacketError::Malformed)
        );
    }

    #[test]
    fn checksum_partial_packets_are_completed_for_a_tun_without_virtio_headers() {
        let complete = tcp_packet(1, TCP_ACK, &[], &pattern(333), true);
        let partial = make_partial(complete.clone());
        assert_ne!(partial, complete);
        let mut scratch = Vec::new();
        assert_eq!(
            with_complete_checksum(&partial, &mut scratch),
            &complete[..]
        );
        assert_eq!(
            with_complete_checksum(&complete, &mut scratch),
            &complete[..]
        );
    }

    #[test]
    fn wire_batch_groups_equal_datagrams_per_destination() {
        let a = Ipv4Addr::new(192, 0, 2, 1);
        let b = Ipv4Addr::new(192, 0, 2, 2);
        let mut w = WireBatch::new(1 << 20, true);
        for len in [1000, 1000, 1000, 400, 1000, 1000] {
            w.buf.extend(std::iter::repeat_n(0u8, len));
            w.commit(a, len);
        }
        w.buf.extend([0u8; 1000]);
        w.commit(b, 1000);
        let shape: Vec<_> = w
            .msgs
            .iter()
            .map(|m| (m.dst, m.start, m.len, m.seg_size, m.segs))
            .collect();
        assert_eq!(
            shape,
            vec![
                (a, 0, 3400, 1000, 4),
                (a, 3400, 2000, 1000, 2),
                (b, 5400, 1000, 1000, 1)
            ]
        );

        // A send never exceeds one datagram's worth of payload.
        w.clear();
        for _ in 0..60 {
            w.buf.extend([0u8; 1472]);
            w.commit(a, 1472);
        }
        assert!(w.msgs.iter().all(|m| m.len <= MAX_UDP_PAYLOAD));
        assert_eq!(w.msgs[0].segs, MAX_UDP_PAYLOAD / 1472);

        w.clear();
        w.set_gso(false);
        for _ in 0..3 {
            w.buf.extend([0u8; 100]);
            w.commit(a, 100);
        }
        assert_eq!(w.msgs.len(), 3);
    }

    #[test]
    fn net_unreachable_quotes_the_packet_and_checks_out() {
        let orig = tcp_packet(1, TCP_ACK, &[], &pattern(1000), true);
        let from = Ipv4Addr::new(10, 244, 1, 0);
        let mut out = Vec::new();
        assert!(icmp_net_unreachable(&orig, from, &mut out));
        assert_eq!(out.len(), 576);
        assert!(csum_ok(csum_add(0, &out[..20])));
        assert!(csum_ok(csum_add(0, &out[20..])));
        assert_eq!(&out[12..16], &from.octets());
        assert_eq!(&out[16..20], &SRC);
        assert_eq!((out[20], out[21]), (3, 0));
        assert_eq!(&out[28..], &orig[..548]);

        // Never an error about an error.
        let mut err = tcp_packet(1, 0, &[], &[3, 1, 0, 0], true);
        err[9] = IPPROTO_ICMP;
        err[20] = 3;
        assert!(!icmp_net_unreachable(&err, from, &mut out));
    }
}
