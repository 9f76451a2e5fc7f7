//! Packet access the programs share: the directly readable bytes of a TC or XDP frame, and
//! the skb helpers that resize it or write into it.

use aya_ebpf::{
    bindings::BPF_F_RECOMPUTE_CSUM,
    helpers::{bpf_skb_change_tail, bpf_skb_store_bytes},
    programs::{TcContext, XdpContext},
};

use flannel_common::Counter;

/// What the shared ingress checks need from a program context: the directly accessible
/// packet bytes, and a bounds-checked read for the (rare) outer IP options.
pub trait Frame {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
    fn word(&self, offset: usize) -> Option<[u8; 4]>;
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
    fn word(&self, offset: usize) -> Option<[u8; 4]> {
        self.load::<[u8; 4]>(offset).ok()
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
    fn word(&self, offset: usize) -> Option<[u8; 4]> {
        // SAFETY: bounds checked against data_end by bytes_at.
        bytes_at::<_, 4>(self, offset).map(|p| unsafe { *p })
    }
}

/// The first `N` bytes at `offset`, if the linear part of the packet holds them.
#[inline(always)]
pub fn bytes_at<F: Frame, const N: usize>(ctx: &F, offset: usize) -> Option<*mut [u8; N]> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + N > end {
        return None;
    }
    Some((start + offset) as *mut [u8; N])
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
