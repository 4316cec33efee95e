//! Entry point of the `quic_datagrams` fuzz target. Not a stable API.
//!
//! A quinn-proto client handshakes with the endpoints of two cores in memory (no sockets, no
//! executors), as in the routing test; the fuzz input decides, datagram by datagram, whether
//! the client's packets arrive intact, are dropped, have a byte flipped, are truncated, or are
//! replaced by arbitrary bytes, and whether they arrive at the core that owns the connection or
//! at the other one (as after a NAT rebinding). Every datagram goes through the same decision
//! the endpoint driver makes: [`owner_core`] routes it, and a datagram routed to the other
//! core is forwarded there.
//!
//! Checked: nothing panics; every datagram the routing sends to a core is accepted or dropped
//! by that core's endpoint, never answered with a stateless reset for a connection of the other
//! core; the client's intact short-header packets name the core that accepted the connection.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::{ClientConfig, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig};

use crate::route::{CoreCidGenerator, owner_core};

struct Configs {
    server: Arc<quinn_proto::ServerConfig>,
    client: ClientConfig,
}

fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        let identity = crate::tls::generate_in_memory().expect("generate a certificate");
        let server = Arc::new(crate::tls::quic_server_config(&identity).expect("server config"));
        let tls =
            crate::tls::client_config_trusting_der(identity.cert_chain()).expect("client config");
        let client = ClientConfig::new(Arc::new(
            quinn_proto::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client"),
        ));
        Configs { server, client }
    })
}

/// Reads the fuzz input one byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        a.to_vec()
    }
}

/// Runs one fuzz case. Returns whether the client completed its handshake.
pub fn mutated_handshake(data: &[u8]) -> bool {
    let configs = configs();
    let mut input = Input(data);
    let now = Instant::now();
    let client_addr: SocketAddr = "127.0.0.1:40000".parse().expect("static");
    let server_addr: SocketAddr = "127.0.0.1:7443".parse().expect("static");
    let seed = |b: u8| Some([b; 32]);

    let mut client_ep = Endpoint::new(Arc::new(EndpointConfig::default()), None, false, seed(1));
    let Ok((client_h, mut client)) =
        client_ep.connect(now, configs.client.clone(), server_addr, "localhost")
    else {
        return false;
    };
    let mut cores: Vec<Endpoint> = (0..2u8)
        .map(|core| {
            let mut config = EndpointConfig::default();
            config.cid_generator(move || Box::new(CoreCidGenerator::new(core)));
            Endpoint::new(
                Arc::new(config),
                Some(configs.server.clone()),
                false,
                seed(10 + core),
            )
        })
        .collect();
    // The connection, on the core that accepted it.
    let mut server: Option<(usize, ConnectionHandle, quinn_proto::Connection)> = None;
    let mut t = now;
    let mut connected = false;

    for _round in 0..24 {
        t += Duration::from_millis(u64::from(input.byte() % 50));
        let mut datagrams = Vec::new();
        loop {
            let mut buf = Vec::new();
            match client.poll_transmit(t, 1, &mut buf) {
                Some(tx) => {
                    buf.truncate(tx.size);
                    datagrams.push(buf);
                }
                None => break,
            }
        }
        for mut d in datagrams {
            // The client's own short-header packets name the owning core.
            if let (Some((owner, _, _)), Some(named)) = (&server, owner_core(&d))
                && d[0] & 0x80 == 0
            {
                assert_eq!(
                    usize::from(named),
                    *owner,
                    "a server-issued id names its core"
                );
            }
            match input.byte() % 8 {
                1 => continue,
                2 if !d.is_empty() => {
                    let at = usize::from(input.byte()) % d.len();
                    d[at] ^= input.byte() | 1;
                }
                3 if !d.is_empty() => {
                    let at = usize::from(input.byte()) % d.len();
                    d.truncate(at);
                }
                4 => {
                    let n = usize::from(input.byte());
                    d = input.bytes(n);
                }
                _ => {}
            }
            // Which core the kernel hands it to; routing may move it to another.
            let arrival = usize::from(input.byte() % 2);
            let core = match owner_core(&d) {
                Some(c) if usize::from(c) < cores.len() => usize::from(c),
                Some(_) => continue, // names no core of ours: the driver drops it
                None => arrival,
            };
            let mut buf = Vec::new();
            let from = if input.byte() % 4 == 3 {
                "127.0.0.1:40001".parse().expect("static")
            } else {
                client_addr
            };
            match cores[core].handle(t, from, None, None, BytesMut::from(&d[..]), &mut buf) {
                Some(DatagramEvent::NewConnection(incoming)) => {
                    if server.is_none() {
                        if let Ok((h, conn)) = cores[core].accept(incoming, t, &mut buf, None) {
                            server = Some((core, h, conn));
                        }
                    } else {
                        cores[core].ignore(incoming);
                    }
                }
                Some(DatagramEvent::ConnectionEvent(h, e)) => {
                    let (owner, sh, conn) = server.as_mut().expect("an event needs a connection");
                    assert_eq!((core, h), (*owner, *sh), "events reach the owning core");
                    conn.handle_event(e);
                }
                Some(DatagramEvent::Response(_)) | None => {}
            }
        }
        if let Some((core, h, conn)) = server.as_mut() {
            while let Some(e) = conn.poll_endpoint_events() {
                if let Some(reply) = cores[*core].handle_event(*h, e) {
                    conn.handle_event(reply);
                }
            }
            if conn.poll_timeout().is_some_and(|deadline| deadline <= t) {
                conn.handle_timeout(t);
            }
            while conn.poll().is_some() {}
            loop {
                let mut buf = Vec::new();
                let Some(tx) = conn.poll_transmit(t, 1, &mut buf) else {
                    break;
                };
                buf.truncate(tx.size);
                let mut out = Vec::new();
                if let Some(DatagramEvent::ConnectionEvent(_, e)) = client_ep.handle(
                    t,
                    server_addr,
                    None,
                    None,
                    BytesMut::from(&buf[..]),
                    &mut out,
                ) {
                    client.handle_event(e);
                }
            }
        }
        while let Some(e) = client.poll_endpoint_events() {
            if let Some(reply) = client_ep.handle_event(client_h, e) {
                client.handle_event(reply);
            }
        }
        if client.poll_timeout().is_some_and(|deadline| deadline <= t) {
            client.handle_timeout(t);
        }
        while let Some(e) = client.poll() {
            connected |= matches!(e, quinn_proto::Event::Connected);
        }
        if client.is_drained() {
            break;
        }
    }
    connected
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_on_plain_and_hostile_inputs() {
        // No mutation, everything at core 0: the handshake completes, so the fuzzer starts
        // from a working connection.
        assert!(super::mutated_handshake(&[]));
        // Every datagram dropped: no handshake, no panic.
        assert!(!super::mutated_handshake(&[1; 300]));
        super::mutated_handshake(&(0..=255).collect::<Vec<u8>>());
    }
}
