//! Address ranges in CIDR notation (`127.0.0.1/32`, `10.0.0.0/8`, `::1/128`), for the
//! addresses served without credentials.

use std::fmt;
use std::net::IpAddr;

/// One address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Reads `ADDR/PREFIX`, or a bare address (the one address).
    pub fn parse(text: &str) -> Result<Network, String> {
        let bad = |why: &str| format!("{text:?} is not an address range like 10.0.0.0/8: {why}");
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad("bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| bad("bad prefix length"))?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }

    /// True when `ip` is in the range (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }

    /// The loopback ranges, `127.0.0.0/8` and `::1/128`.
    pub fn loopback() -> Vec<Network> {
        vec![
            Network {
                addr: [127, 0, 0, 0].into(),
                prefix: 8,
            },
            Network {
                addr: std::net::Ipv6Addr::LOCALHOST.into(),
                prefix: 128,
            },
        ]
    }
}

fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    let shift = bits - u32::from(prefix);
    shift >= bits || (a >> shift) == (b >> shift)
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let one = Network::parse("127.0.0.1/32").unwrap();
        assert!(one.contains([127, 0, 0, 1].into()));
        assert!(!one.contains([127, 0, 0, 2].into()));
        let eight = Network::parse("10.0.0.0/8").unwrap();
        assert!(eight.contains([10, 9, 8, 7].into()));
        assert!(!eight.contains([11, 0, 0, 1].into()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains([1, 2, 3, 4].into()));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(Network::loopback()[0].contains(mapped));
        assert!(Network::loopback()[1].contains("::1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nowhere", "10.0.0.0/x"] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }
}
