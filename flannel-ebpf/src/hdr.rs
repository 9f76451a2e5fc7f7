//! Header layouts (byte offsets inside each header) and the Internet checksum arithmetic the
//! programs share. Offsets are relative to the start of their own header; the programs read
//! and write headers as byte arrays at these offsets (packet memory has no alignment).

pub mod eth {
    pub const LEN: usize = 14;
    /// Destination and source MAC addresses, in that order, from offset 0.
    pub const ADDRS_LEN: usize = 12;
    pub const DST_LEN: usize = 6;
    pub const PROTO: usize = 12;
    pub const P_IP: u16 = 0x0800;

    /// Whether the destination address is a group (broadcast/multicast) address.
    #[inline(always)]
    pub fn is_group(frame: &[u8]) -> bool {
        frame[0] & 1 != 0
    }
}

pub mod ipv4 {
    pub const MIN_LEN: usize = 20;
    pub const MAX_LEN: usize = 60;
    pub const VERSION: u8 = 4;
    pub const VER_IHL: usize = 0;
    /// The smallest header length, in 32-bit words (a header without options).
    pub const MIN_IHL_WORDS: u8 = 5;
    /// Version 4, header length 5 words: a header without options.
    pub const VER_IHL_NO_OPTIONS: u8 = 0x45;
    pub const TOS: usize = 1;
    pub const ID: usize = 4;
    pub const TOT_LEN: usize = 2;
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// Flags/fragment-offset word: don't fragment, more fragments, offset.
    pub const DF: u16 = 0x4000;
    pub const MF: u16 = 0x2000;
    pub const OFFSET_MASK: u16 = 0x1fff;
    pub const PROTO_TCP: u8 = 6;
    pub const PROTO_UDP: u8 = 17;

    /// The version nibble of the first header byte.
    #[inline(always)]
    pub fn version(ver_ihl: u8) -> u8 {
        ver_ihl >> 4
    }

    /// The header length in 32-bit words (5 without options).
    #[inline(always)]
    pub fn ihl_words(ver_ihl: u8) -> u8 {
        ver_ihl & 0x0f
    }

    /// The header length in bytes.
    #[inline(always)]
    pub fn ihl_bytes(ver_ihl: u8) -> usize {
        usize::from(ihl_words(ver_ihl)) * 4
    }
}

pub mod udp {
    pub const LEN: usize = 8;
    pub const SPORT: usize = 0;
    pub const DPORT: usize = 2;
    pub const LENGTH: usize = 4;
    pub const CSUM: usize = 6;
}

/// VXLAN (RFC 7348), as the kernel's VXLAN device receives it.
pub mod vxlan {
    pub const LEN: usize = 8;
    /// First byte: the I flag (a valid VNI follows).
    pub const FLAGS_VNI: u8 = 0x08;
    /// Offset of the 24-bit VNI (big-endian).
    pub const VNI: usize = 4;
}

pub mod tcp {
    pub const MIN_LEN: usize = 20;
    pub const CSUM: usize = 16;
}

/// `skb->pkt_type` of a frame addressed to another host's MAC.
pub const PACKET_OTHERHOST: u32 = 3;

#[inline(always)]
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline(always)]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
pub fn addr(b: &[u8], at: usize) -> [u8; 4] {
    [b[at], b[at + 1], b[at + 2], b[at + 3]]
}

/// Ones'-complement sum folded to 16 bits (not inverted).
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Sum of the two 16-bit words of an IPv4 address.
#[inline(always)]
pub fn addr_sum(a: [u8; 4]) -> u32 {
    u32::from(u16::from_be_bytes([a[0], a[1]])) + u32::from(u16::from_be_bytes([a[2], a[3]]))
}

/// Unfolded sum of a TCP/UDP pseudo-header (RFC 793/768).
#[inline(always)]
pub fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize) -> u32 {
    addr_sum(src) + addr_sum(dst) + u32::from(proto) + l4_len as u32
}

/// Unfolded sum of the 16-bit words of a 20-byte IPv4 header.
#[inline(always)]
pub fn ipv4_base_sum(h: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < ipv4::MIN_LEN {
        sum += u32::from(be16(h, i));
        i += 2;
    }
    sum
}
