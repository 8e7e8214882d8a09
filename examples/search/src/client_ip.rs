//! Who the client is, behind proxies: `X-Forwarded-For` read from the right.
//!
//! Each proxy that appends to `X-Forwarded-For` adds the address *it* saw on the right, so
//! the entries on the right were written by proxies you run and the ones on the left by
//! whoever sent the request first, which may be the client making things up. The leftmost
//! entry is therefore whatever the client wants it to be. Read from the right instead:
//!
//! 1. Start from the connection's peer. If it is not one of your proxies, it is the
//!    client, and the header (which anyone can send) is ignored.
//! 2. Otherwise walk the header's entries from the right, skipping your proxies. The
//!    first address that is not one of them is the client: the last hop you trust saw it.
//! 3. If every entry is one of your proxies, the leftmost is as far as the trust goes; if
//!    an entry is not an address, stop at the last trusted hop before it.
//!
//! Several `X-Forwarded-For` lines count as one list, in order (RFC 9110, section 5.3).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use axum::http::HeaderMap;

/// One trusted proxy, or a range of them: `10.0.0.7`, `10.0.0.0/8`, `fd00::/8`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr {
    net: IpAddr, // with the host bits cleared
    prefix: u8,
}

impl Cidr {
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(u32::from(ip), self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(u128::from(ip), self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

/// `bits` with all but the first `prefix` bits cleared (`checked_shl`: a shift by the
/// whole width, for `/0`, is `None`, and the mask is then zero).
fn mask_v4(bits: u32, prefix: u8) -> u32 {
    bits & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(bits: u128, prefix: u8) -> u128 {
    bits & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Why a `--trust-proxy` value was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BadCidr(String);

impl fmt::Display for BadCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not an address or a range (10.0.0.7, 10.0.0.0/8, fd00::/8)",
            self.0
        )
    }
}

impl FromStr for Cidr {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Cidr, BadCidr> {
        let bad = || BadCidr(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let ip = IpAddr::from_str(addr).map_err(|_| bad())?.to_canonical();
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|&p| p <= max).ok_or_else(bad)?
            }
            Some(_) => return Err(bad()),
        };
        let net = match ip {
            IpAddr::V4(v4) => IpAddr::from(mask_v4(u32::from(v4), prefix).to_be_bytes()),
            IpAddr::V6(v6) => IpAddr::from(mask_v6(u128::from(v6), prefix).to_be_bytes()),
        };
        Ok(Cidr { net, prefix })
    }
}

/// The proxies whose `X-Forwarded-For` entries are believed (`--trust-proxy`, repeatable).
#[derive(Clone, Debug, Default)]
pub(crate) struct TrustedProxies(pub(crate) Vec<Cidr>);

impl TrustedProxies {
    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client's address, for a request that came from `peer` with `headers`.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client; // not from a proxy of ours: the header proves nothing
        }
        let entries: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for entry in entries.iter().rev() {
            let Ok(ip) = entry.parse::<IpAddr>() else {
                break; // garbage: the last trusted hop is as far as we can see
            };
            client = ip.to_canonical();
            if !self.trusts(client) {
                break;
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|s| s.parse().unwrap()).collect())
    }

    fn xff(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_static(v));
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_addresses_and_ranges() {
        let c: Cidr = "10.1.2.3/8".parse().unwrap();
        assert!(c.contains(ip("10.200.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        let one: Cidr = "192.168.1.1".parse().unwrap();
        assert!(one.contains(ip("192.168.1.1")));
        assert!(!one.contains(ip("192.168.1.2")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        assert!(!all.contains(ip("::1")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")));
        assert!(!v6.contains(ip("fe80::1")));
        // An IPv4 peer seen on an IPv6 socket is the same address.
        assert!(one.contains(ip("::ffff:192.168.1.1")));
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "proxy",
            "::/129",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(
            "x/8".parse::<Cidr>().unwrap_err().to_string(),
            "`x/8` is not an address or a range (10.0.0.7, 10.0.0.0/8, fd00::/8)"
        );
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_the_header_says() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = ip("203.0.113.9");
        assert_eq!(trusted.client_ip(peer, &xff(&["1.2.3.4"])), peer);
        assert_eq!(
            TrustedProxies::default().client_ip(peer, &xff(&["1.2.3.4"])),
            peer
        );
    }

    #[test]
    fn walks_from_the_right_skipping_trusted_proxies() {
        let trusted = proxies(&["10.0.0.0/8", "192.168.0.5"]);
        let peer = ip("10.0.0.1");
        // The client wrote "6.6.6.6" itself; our proxies appended the rest.
        let h = xff(&["6.6.6.6, 198.51.100.7, 192.168.0.5"]);
        assert_eq!(trusted.client_ip(peer, &h), ip("198.51.100.7"));
        // The same list over several lines.
        let h = xff(&["6.6.6.6", "198.51.100.7", "192.168.0.5"]);
        assert_eq!(trusted.client_ip(peer, &h), ip("198.51.100.7"));
        // Only our proxy's entry: the client is what it saw.
        assert_eq!(
            trusted.client_ip(peer, &xff(&["198.51.100.7"])),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn edges() {
        let trusted = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.1");
        // No header: the proxy itself is all we know.
        assert_eq!(trusted.client_ip(peer, &HeaderMap::new()), peer);
        // Every entry trusted: the leftmost.
        assert_eq!(
            trusted.client_ip(peer, &xff(&["10.0.0.3, 10.0.0.2"])),
            ip("10.0.0.3")
        );
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(
            trusted.client_ip(peer, &xff(&["6.6.6.6, nonsense, 10.0.0.2"])),
            ip("10.0.0.2")
        );
        // IPv6, and spaces.
        assert_eq!(
            trusted.client_ip(peer, &xff(&[" 2001:db8::1 ,10.0.0.2 "])),
            ip("2001:db8::1")
        );
    }
}
