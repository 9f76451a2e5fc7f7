//! Packet access the programs share: the directly readable bytes of a TC or XDP frame, and
//! the skb helpers that resize it or write into it.

use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM,
    helpers::{bpf_skb_change_tail, bpf_skb_store_bytes},
    programs::{TcContext, XdpContext},
};

use flannel_common::Counter;

/// What the shared ingress checks need from a program context: the directly accessible
/// packet bytes, and a copy of bytes at a variable offset (behind outer IP options).
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    /// `N` bytes at a variable `offset`, copied by a helper (no packet pointer arithmetic
    /// with a variable offset, which the 6.12 verifier mistracks). `None`: out of the packet,
    /// or a context without such a helper (XDP before 5.18), which leaves those packets to TC.
    fn load_at<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl Frame for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn load_at<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.load::<[u8; N]>(offset).ok()
    }
}

impl Frame for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn load_at<const N: usize>(&self, _offset: usize) -> Option<[u8; N]> {
        None
    }
}

/// The first `N` bytes at `offset`, if the linear part of the packet holds them.
///
/// Pointer arithmetic rather than integers: the compiler then adds the offset to the packet
/// pointer (`ptr += off`), the form every verifier follows. As `off += ptr` the 6.12
/// verifier loses the pointer and refuses the read.
#[inline(always)]
pub fn bytes_at<F: Frame, const N: usize>(ctx: &F, offset: usize) -> Option<*mut [u8; N]> {
    let start = ctx.start() as *mut u8;
    let end = ctx.end() as *const u8;
    let at = start.wrapping_add(offset);
    if at.wrapping_add(N).cast_const() > end {
        return None;
    }
    Some(at.cast())
}

/// `n` (1..=`MAX`, a power of two) in a form the verifier can bound from below as well: a
/// helper's size argument must be provably non-zero, and the compiler would fold a plain
/// `(n - 1) % MAX + 1` away as it knows the range. The volatile read hides it.
#[inline(always)]
pub fn nonzero_len<const MAX: usize>(n: usize) -> usize {
    // SAFETY: reads a local.
    let n = unsafe { core::ptr::read_volatile(&n) };
    (n.wrapping_sub(1) & (MAX - 1)) + 1
}

/// Grows (zero-filled) or trims the packet to `len` bytes.
#[inline(always)]
pub fn change_tail(ctx: &TcContext, len: u32) -> Result<(), Counter> {
    // SAFETY: helper call on our own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } != 0 {
        return Err(Counter::DropHelperError);
    }
    Ok(())
}

/// Writes the first `len` bytes of `saved` at `offset`, keeping a CHECKSUM_COMPLETE sum right.
#[inline(always)]
pub fn store_saved<const N: usize>(
    ctx: &TcContext,
    offset: usize,
    saved: &[u8; N],
    len: usize,
) -> Result<(), Counter> {
    if len == 0 || len > N {
        return Err(Counter::DropHelperError);
    }
    // Every caller's N is below 128; bounded again where the verifier sees it.
    let len = nonzero_len::<128>(len);
    if len > N {
        return Err(Counter::DropHelperError);
    }
    // SAFETY: saved holds N >= len bytes.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb as *mut _,
            offset as u32,
            saved.as_ptr().cast(),
            len as u32,
            u64::from(BPF_F_RECOMPUTE_CSUM),
        )
    };
    if rc != 0 {
        return Err(Counter::DropHelperError);
    }
    Ok(())
}
