//! The `struct virtio_net_hdr` a TUN opened with IFF_VNET_HDR puts before every packet: how the
//! kernel hands us TSO super-packets and checksum-partial packets, and how we hand them back.

/// Size of `struct virtio_net_hdr` that a TUN with IFF_VNET_HDR puts before every packet.
pub(crate) const VNET_HDR_LEN: usize = 10;
pub(super) const VNET_F_NEEDS_CSUM: u8 = 1;
pub(super) const VNET_F_DATA_VALID: u8 = 2;
pub(super) const VNET_GSO_NONE: u8 = 0;
pub(super) const VNET_GSO_TCPV4: u8 = 1;
pub(super) const VNET_GSO_ECN: u8 = 0x80;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::udp::tun::test_packets::tso_hdr;

    #[test]
    fn vnet_header_round_trips() {
        let h = tso_hdr(1432, 52);
        assert_eq!(VirtioNetHdr::parse(&h.encode()), Some(h));
        assert_eq!(VirtioNetHdr::parse(&[0; 9]), None);
    }
}
