//! Which of an interface's IPv6 addresses other hosts should reach us at, as upstream v0.28.0
//! chooses: never a deprecated, tentative (DAD still running or failed) or temporary (privacy)
//! address, whose lifetime or reachability is not ours to promise; among the rest permanent
//! (configured) addresses before dynamic (SLAAC, DHCPv6) ones. Link-local and host scope never
//! qualify. Pure over what rtnetlink reports, so it is tested without a kernel.

use std::net::Ipv6Addr;

// The kernel's IFA_F_* address flags (include/uapi/linux/if_addr.h). In IPv6 the "secondary"
// bit marks temporary (privacy) addresses.
pub const IFA_F_TEMPORARY: u32 = 0x01;
pub const IFA_F_DADFAILED: u32 = 0x08;
pub const IFA_F_DEPRECATED: u32 = 0x20;
pub const IFA_F_TENTATIVE: u32 = 0x40;
pub const IFA_F_PERMANENT: u32 = 0x80;

// Address scopes (RT_SCOPE_*): only these two are reachable from other hosts.
pub const RT_SCOPE_UNIVERSE: u8 = 0;
pub const RT_SCOPE_SITE: u8 = 200;
pub const RT_SCOPE_LINK: u8 = 253;

/// One IPv6 address of an interface as rtnetlink reports it: the IFA_FLAGS attribute (32
/// bits; the 8-bit `ifa_flags` header field when the kernel sends no attribute) and the scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv6IfAddr {
    pub addr: Ipv6Addr,
    pub flags: u32,
    pub scope: u8,
}

impl Ipv6IfAddr {
    /// An address configured by hand (`ip addr add`), with the scope the kernel gives it.
    pub fn permanent(addr: Ipv6Addr) -> Self {
        let scope = if is_link_local(addr) {
            RT_SCOPE_LINK
        } else {
            RT_SCOPE_UNIVERSE
        };
        Ipv6IfAddr {
            addr,
            flags: IFA_F_PERMANENT,
            scope,
        }
    }

    fn is_permanent(&self) -> bool {
        self.flags & IFA_F_PERMANENT != 0
    }
}

fn is_link_local(a: Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}

/// Why `a` cannot be the address other hosts reach us at (`None`: it can).
pub fn why_not_public(a: &Ipv6IfAddr) -> Option<&'static str> {
    if is_link_local(a.addr) {
        return Some("a link-local address, which other hosts cannot route to");
    }
    if a.addr.is_loopback() || a.addr.is_unspecified() || a.addr.is_multicast() {
        return Some("not a unicast address other hosts can reach");
    }
    if a.scope != RT_SCOPE_UNIVERSE && a.scope != RT_SCOPE_SITE {
        return Some("not of global scope");
    }
    if a.flags & IFA_F_DADFAILED != 0 {
        Some("a duplicate (duplicate address detection failed)")
    } else if a.flags & IFA_F_TENTATIVE != 0 {
        Some("tentative (duplicate address detection still running)")
    } else if a.flags & IFA_F_DEPRECATED != 0 {
        Some("deprecated (its preferred lifetime is over)")
    } else if a.flags & IFA_F_TEMPORARY != 0 {
        Some("a temporary (privacy) address")
    } else {
        None
    }
}

/// The usable addresses of `addrs`, best first: permanent ones, then dynamic ones, each in the
/// order the kernel lists them.
pub fn usable_by_preference(addrs: &[Ipv6IfAddr]) -> Vec<Ipv6Addr> {
    let usable = || addrs.iter().filter(|a| why_not_public(a).is_none());
    let permanent = usable().filter(|a| a.is_permanent());
    let dynamic = usable().filter(|a| !a.is_permanent());
    permanent.chain(dynamic).map(|a| a.addr).collect()
}

/// The address to use of `addrs`, if any is usable.
pub fn preferred(addrs: &[Ipv6IfAddr]) -> Option<Ipv6Addr> {
    usable_by_preference(addrs).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str, flags: u32) -> Ipv6IfAddr {
        Ipv6IfAddr {
            addr: s.parse().expect("test constant"),
            flags,
            scope: RT_SCOPE_UNIVERSE,
        }
    }

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().expect("test constant")
    }

    #[test]
    fn a_permanent_global_address_is_used() {
        assert_eq!(
            preferred(&[a("2001:db8::1", IFA_F_PERMANENT)]),
            Some(ip("2001:db8::1"))
        );
        // A ULA is global scope too.
        assert_eq!(
            preferred(&[a("fd00::1", IFA_F_PERMANENT)]),
            Some(ip("fd00::1"))
        );
    }

    #[test]
    fn each_unusable_flag_excludes_the_address() {
        for (flag, why) in [
            (IFA_F_DEPRECATED, "deprecated"),
            (IFA_F_TENTATIVE, "tentative"),
            (IFA_F_DADFAILED, "duplicate"),
            (IFA_F_TEMPORARY, "temporary"),
        ] {
            // Permanent or not, the flag decides.
            for base in [0, IFA_F_PERMANENT] {
                let addr = a("2001:db8::5", base | flag);
                let reason = why_not_public(&addr).unwrap_or_default();
                assert!(reason.contains(why), "{flag:#x}: {reason:?}");
                assert_eq!(preferred(&[addr]), None, "{flag:#x}");
            }
        }
        // DAD failed comes with tentative set: the reason names the failure.
        let failed = a("2001:db8::5", IFA_F_TENTATIVE | IFA_F_DADFAILED);
        assert!(why_not_public(&failed)
            .unwrap_or_default()
            .contains("duplicate"));
    }

    #[test]
    fn flags_that_do_not_matter_leave_the_address_usable() {
        // nodad, managetempaddr, noprefixroute, stable-privacy (a stable SLAAC address).
        for flag in [0x02, 0x100, 0x200, 0x800] {
            assert_eq!(
                preferred(&[a("2001:db8::6", flag)]),
                Some(ip("2001:db8::6")),
                "{flag:#x}"
            );
        }
    }

    #[test]
    fn link_local_and_host_scope_never_qualify() {
        let ll = Ipv6IfAddr::permanent(ip("fe80::1"));
        assert_eq!(ll.scope, RT_SCOPE_LINK);
        assert!(why_not_public(&ll)
            .unwrap_or_default()
            .contains("link-local"));
        // Even if reported with global scope.
        let ll_global = a("fe80::2", IFA_F_PERMANENT);
        assert!(why_not_public(&ll_global)
            .unwrap_or_default()
            .contains("link-local"));
        // A global-looking address the kernel scopes to the link is not reachable either.
        let scoped = Ipv6IfAddr {
            scope: RT_SCOPE_LINK,
            ..a("2001:db8::7", IFA_F_PERMANENT)
        };
        assert_eq!(why_not_public(&scoped), Some("not of global scope"));
        assert_eq!(
            preferred(&[ll, scoped, Ipv6IfAddr::permanent(ip("::1"))]),
            None
        );
        let site = Ipv6IfAddr {
            scope: RT_SCOPE_SITE,
            ..a("fec0::1", IFA_F_PERMANENT)
        };
        assert_eq!(preferred(&[site]), Some(ip("fec0::1")));
    }

    #[test]
    fn permanent_beats_dynamic_whatever_the_kernel_order() {
        let addrs = [
            Ipv6IfAddr::permanent(ip("fe80::1")),
            a("2001:db8::100", IFA_F_TEMPORARY),
            a("2001:db8::aaaa", 0),
            a("2001:db8::bbbb", 0),
            a("2001:db8::dead", IFA_F_PERMANENT | IFA_F_DEPRECATED),
            a("2001:db8::1", IFA_F_PERMANENT),
            a("2001:db8::2", IFA_F_PERMANENT),
        ];
        assert_eq!(preferred(&addrs), Some(ip("2001:db8::1")));
        assert_eq!(
            usable_by_preference(&addrs),
            [
                "2001:db8::1",
                "2001:db8::2",
                "2001:db8::aaaa",
                "2001:db8::bbbb"
            ]
            .map(ip)
        );
        // Without a permanent one the first dynamic one (SLAAC) is used.
        assert_eq!(preferred(&addrs[..4]), Some(ip("2001:db8::aaaa")));
    }

    #[test]
    fn nothing_usable_is_none() {
        assert_eq!(preferred(&[]), None);
        assert_eq!(
            preferred(&[
                a("2001:db8::1", IFA_F_PERMANENT | IFA_F_DEPRECATED),
                a("2001:db8::2", IFA_F_TEMPORARY | IFA_F_DEPRECATED),
                a("2001:db8::3", IFA_F_TENTATIVE),
            ]),
            None
        );
    }
}
