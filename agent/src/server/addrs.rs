//! Which addresses the TCP listeners may bind (SPEC §4.5, §7): loopback, or the link-local
//! addresses that AWS SDKs accept for a plain-HTTP credentials URL, and nothing else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The ECS container-credentials address.
pub const ECS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 2);
/// The EKS Pod Identity address (IPv4).
pub const EKS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The EKS Pod Identity address (IPv6).
pub const EKS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// The EC2 instance metadata address (IPv4), for the IMDS listener only.
pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The EC2 instance metadata address (IPv6), for the IMDS listener only.
pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

/// Which listener an address is meant for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// `[serve] listen`: the container-credentials API of §4.1.
    Credentials,
    /// `[serve.imds] listen`: the IMDSv2-compatible endpoint of §4.4.
    Imds,
}

impl ListenerKind {
    /// The link-local addresses this listener may bind besides loopback.
    pub fn link_local(self) -> &'static [IpAddr] {
        const CREDENTIALS: &[IpAddr] =
            &[IpAddr::V4(ECS_V4), IpAddr::V4(EKS_V4), IpAddr::V6(EKS_V6)];
        const IMDS: &[IpAddr] = &[
            IpAddr::V4(ECS_V4),
            IpAddr::V4(EKS_V4),
            IpAddr::V6(EKS_V6),
            IpAddr::V4(IMDS_V4),
            IpAddr::V6(IMDS_V6),
        ];
        match self {
            ListenerKind::Credentials => CREDENTIALS,
            ListenerKind::Imds => IMDS,
        }
    }

    /// The allowed link-local addresses as text for messages, e.g.
    /// `169.254.170.2, 169.254.170.23, [fd00:ec2::23]`.
    pub fn link_local_text(self) -> String {
        self.link_local()
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether `ip` is one of the link-local addresses of §4.5 that `kind` may bind (an
/// IPv4-mapped IPv6 address counts as its IPv4 address).
pub fn is_link_local_listen(ip: IpAddr, kind: ListenerKind) -> bool {
    kind.link_local().contains(&ip.to_canonical())
}

/// Whether a listener of `kind` may bind `ip`: loopback, or a link-local address of §4.5.
pub fn listen_allowed(ip: IpAddr, kind: ListenerKind) -> bool {
    ip.to_canonical().is_loopback() || is_link_local_listen(ip, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn credentials_listener_addresses() {
        let k = ListenerKind::Credentials;
        for ok in [
            "127.0.0.1",
            "127.3.4.5",
            "::1",
            "169.254.170.2",
            "169.254.170.23",
            "fd00:ec2::23",
            "::ffff:169.254.170.2",
            "::ffff:127.0.0.1",
        ] {
            assert!(listen_allowed(ip(ok), k), "{ok}");
        }
        for bad in [
            "0.0.0.0",
            "::",
            "169.254.169.254",
            "fd00:ec2::254",
            "169.254.170.3",
            "169.254.1.1",
            "fe80::1",
            "10.0.0.1",
            "192.168.1.1",
            "fd00:ec2::24",
        ] {
            assert!(!listen_allowed(ip(bad), k), "{bad}");
        }
    }

    #[test]
    fn imds_listener_adds_the_metadata_addresses() {
        let k = ListenerKind::Imds;
        for ok in [
            "169.254.169.254",
            "fd00:ec2::254",
            "169.254.170.2",
            "127.0.0.1",
        ] {
            assert!(listen_allowed(ip(ok), k), "{ok}");
        }
        for bad in ["0.0.0.0", "169.254.169.253", "fd00:ec2::1"] {
            assert!(!listen_allowed(ip(bad), k), "{bad}");
        }
        assert!(is_link_local_listen(ip("169.254.169.254"), k));
        assert!(!is_link_local_listen(ip("127.0.0.1"), k));
        assert_eq!(
            ListenerKind::Credentials.link_local_text(),
            "169.254.170.2, 169.254.170.23, [fd00:ec2::23]"
        );
    }
}
