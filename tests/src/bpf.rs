//! Running the agent's pinned programs once on a packet (BPF_PROG_TEST_RUN, through aya), and
//! the Internet checksum the tests check packets with.

use std::path::Path;
use std::sync::Arc;

use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya_obj::programs::XdpAttachType;

/// A program the agent pinned, opened for test runs. Clones share the program, so one can be
/// moved into the closure that runs it inside a namespace.
#[derive(Clone)]
pub struct PinnedProgram(Arc<Kind>);

enum Kind {
    Tc(SchedClassifier),
    Xdp(Xdp),
}

impl PinnedProgram {
    /// The TC program pinned at `path`.
    pub fn tc(path: &Path) -> Self {
        let prog = SchedClassifier::from_pin(path)
            .unwrap_or_else(|e| panic!("pinned TC program {}: {e}", path.display()));
        PinnedProgram(Arc::new(Kind::Tc(prog)))
    }

    /// The XDP program pinned at `path`.
    pub fn xdp(path: &Path) -> Self {
        let prog = Xdp::from_pin(path, XdpAttachType::Interface)
            .unwrap_or_else(|e| panic!("pinned XDP program {}: {e}", path.display()));
        PinnedProgram(Arc::new(Kind::Xdp(prog)))
    }

    /// Runs the program once on the Ethernet frame `packet` (the kernel wants one) as received
    /// on `ifindex`. Returns (verdict, bytes out). TC: the skb's device is `ifindex`, so for a
    /// TUN the program sees the packet from the IPv4 header on, as on the real device; out is
    /// the packet as the program left it. XDP: the frame arrives on the first receive queue of
    /// `ifindex`; out is the metadata the program put in front of the frame, then the frame.
    pub fn run(&self, packet: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; packet.len() + 256];
        let result = match &*self.0 {
            Kind::Tc(prog) => {
                // struct __sk_buff, with ifindex at offset 40.
                let mut ctx = [0u8; 192];
                ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
                prog.test_run(TestRunOptions {
                    data_in: Some(packet),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::new()
                })
            }
            Kind::Xdp(prog) => {
                // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
                // egress_ifindex.
                let mut ctx = [0u32; 6];
                ctx[1] = packet.len() as u32;
                ctx[3] = ifindex;
                let ctx: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
                let with_ctx = prog.test_run(TestRunOptions {
                    data_in: Some(packet),
                    data_out: Some(&mut out),
                    ctx_in: Some(&ctx),
                    ..TestRunOptions::new()
                });
                match with_ctx {
                    // Kernels before 5.15 take no xdp_md for XDP test runs (EINVAL); the
                    // frame then "arrives" on lo, which our XDP program never looks at.
                    Err(ProgramError::SyscallError(e))
                        if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        prog.test_run(TestRunOptions {
                            data_in: Some(packet),
                            data_out: Some(&mut out),
                            ..TestRunOptions::new()
                        })
                    }
                    other => other,
                }
            }
        };
        let result = result.expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
