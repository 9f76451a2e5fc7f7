//! Wire datagrams collected for one sendmmsg, grouped into UDP GSO sends (UDP_SEGMENT).

use std::net::Ipv4Addr;

/// Largest UDP payload of one IPv4 datagram, which bounds one UDP GSO send.
pub(crate) const MAX_UDP_PAYLOAD: usize = 65_507;
/// The kernel refuses UDP GSO sends of more segments than this (UDP_MAX_SEGMENTS).
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
