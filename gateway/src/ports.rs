//! Refusing a port another process serves. The cores listen with SO_REUSEPORT, and so would a
//! second gateway started on the same address: the kernel would then share the port between
//! the two and hand each a part of the connections, with nothing said. Before binding, the
//! gateway looks for a listening TCP socket (or a bound UDP socket, for QUIC) on the port in
//! `/proc/net`, and for one it finds, asks the kernel whether a plain bind (without
//! SO_REUSEPORT) to the address would be refused: an IPv6 socket that takes no IPv4 traffic
//! (IPV6_V6ONLY, which `/proc/net` does not show) then does not count. Sockets left in
//! TIME_WAIT by a gateway that crashed do not count either. Two gateways started at the same
//! moment can both pass the check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Socket, Type};

/// The transport a port is wanted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// TCP's LISTEN state in `/proc/net/tcp`.
const TCP_LISTEN: &str = "0A";

/// Whether a socket of this machine's network namespace already serves `addr`: a listening
/// TCP socket, or a bound UDP socket, that `/proc/net` lists on `addr`'s port (on its IP or a
/// wildcard address, or any IP when `addr` is a wildcard) and that a plain bind to `addr`
/// collides with. Port 0 never is.
pub fn in_use(addr: SocketAddr, proto: Proto) -> std::io::Result<bool> {
    Ok(addr.port() != 0 && listed(addr, proto)? && plain_bind_refused(addr, proto))
}

/// Whether the kernel refuses a socket without SO_REUSEPORT on `addr` because the address is
/// in use (TCP with SO_REUSEADDR, so that TIME_WAIT sockets do not count).
fn plain_bind_refused(addr: SocketAddr, proto: Proto) -> bool {
    let ty = match proto {
        Proto::Tcp => Type::STREAM,
        Proto::Udp => Type::DGRAM,
    };
    let Ok(socket) = Socket::new(Domain::for_address(addr), ty, None) else {
        // No socket to ask with: go by the listing.
        return true;
    };
    if proto == Proto::Tcp {
        let _ = socket.set_reuse_address(true);
    }
    matches!(socket.bind(&addr.into()), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

/// Whether `/proc/net` lists a socket that may serve `addr` (see [`in_use`]).
fn listed(addr: SocketAddr, proto: Proto) -> std::io::Result<bool> {
    let files: [&str; 2] = match proto {
        Proto::Tcp => ["/proc/net/tcp", "/proc/net/tcp6"],
        Proto::Udp => ["/proc/net/udp", "/proc/net/udp6"],
    };
    for file in files {
        let table = match std::fs::read_to_string(file) {
            Ok(t) => t,
            // No IPv6 in this kernel: nothing bound there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if table
            .lines()
            .skip(1)
            .filter_map(|line| parse_line(line, proto))
            .any(|bound| conflicts(bound, addr))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The local address of one `/proc/net/{tcp,udp}[6]` line, if it counts for `proto` (TCP: only
/// listening sockets).
fn parse_line(line: &str, proto: Proto) -> Option<SocketAddr> {
    let mut fields = line.split_whitespace();
    let local = fields.nth(1)?;
    let state = fields.nth(1)?;
    if proto == Proto::Tcp && state != TCP_LISTEN {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each 32-bit word of the address as a number in the machine's order.
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket bound to `bound` takes connections or datagrams meant for `wanted`.
fn conflicts(bound: SocketAddr, wanted: SocketAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (a, b) = (plain(bound.ip()), plain(wanted.ip()));
    bound.port() == wanted.port() && (a.is_unspecified() || b.is_unspecified() || a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    // The tables print each 32-bit word of an address in the machine's order.
    #[cfg(target_endian = "little")]
    #[test]
    fn reads_the_kernels_tables() {
        let v4 = "   0: 0100007F:1DB0 00000000:0000 0A 00000000:00000000 00:00000000 00000000  0 \
                  0 1 1 0000000000000000 100 0 0 10 0";
        assert_eq!(parse_line(v4, Proto::Tcp), Some(addr("127.0.0.1:7600")));
        let waiting = v4.replace(" 0A ", " 06 ");
        assert_eq!(parse_line(&waiting, Proto::Tcp), None);
        assert_eq!(
            parse_line(&waiting, Proto::Udp),
            Some(addr("127.0.0.1:7600"))
        );
        let v6 = "   0: 00000000000000000000000001000000:1DB1 \
                  00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 \
                  00000000 0 0 1 2 0000000000000000 0";
        assert_eq!(parse_line(v6, Proto::Udp), Some(addr("[::1]:7601")));
        assert_eq!(
            parse_line("  sl  local_address rem_address", Proto::Udp),
            None
        );
        assert_eq!(parse_line("0: 7F:1DB0 0:0 0A", Proto::Tcp), None);
    }

    #[test]
    fn wildcards_and_mapped_addresses_conflict() {
        assert!(conflicts(addr("0.0.0.0:7600"), addr("127.0.0.1:7600")));
        assert!(conflicts(addr("127.0.0.1:7600"), addr("0.0.0.0:7600")));
        assert!(conflicts(addr("[::]:7600"), addr("10.0.0.1:7600")));
        assert!(conflicts(
            addr("[::ffff:127.0.0.1]:7600"),
            addr("127.0.0.1:7600")
        ));
        assert!(!conflicts(addr("127.0.0.1:7600"), addr("127.0.0.2:7600")));
        assert!(!conflicts(addr("0.0.0.0:7601"), addr("127.0.0.1:7600")));
    }

    #[test]
    fn finds_a_listener_and_a_udp_socket_of_this_process() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
        assert!(in_use(at("127.0.0.1"), Proto::Tcp).unwrap());
        assert!(in_use(at("0.0.0.0"), Proto::Tcp).unwrap());
        drop(tcp);
        assert!(!in_use(at("127.0.0.1"), Proto::Tcp).unwrap());

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        let at = SocketAddr::new("127.0.0.1".parse().unwrap(), port);
        assert!(in_use(at, Proto::Udp).unwrap());
        drop(udp);
        assert!(!in_use(at, Proto::Udp).unwrap());
        assert!(!in_use(addr("127.0.0.1:0"), Proto::Tcp).unwrap());
    }

    #[test]
    fn an_ipv6_only_socket_leaves_the_ipv4_port_free() {
        let v6 = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
        if v6.set_only_v6(true).is_err() || v6.bind(&addr("[::]:0").into()).is_err() {
            // No IPv6 on this machine: nothing to check.
            return;
        }
        v6.listen(8).unwrap();
        let port = v6.local_addr().unwrap().as_socket().unwrap().port();
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
        // Listed as [::]:port, which may take IPv4 too; the kernel says it does not.
        assert!(in_use(at("::1"), Proto::Tcp).unwrap());
        assert!(!in_use(at("127.0.0.1"), Proto::Tcp).unwrap());
        assert!(!in_use(at("0.0.0.0"), Proto::Tcp).unwrap());
    }
}
