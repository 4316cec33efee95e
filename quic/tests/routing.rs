//! Connection-ID routing, stepped by hand: a quinn-proto client and the endpoints of two cores
//! in memory, no sockets, no executors. Shows that every packet after the client's Initials
//! names the core that accepted the connection, and that the other core drops such a packet
//! silently where a plain endpoint would kill the connection with a stateless reset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tern_quic::quinn_proto::{
    self, ClientConfig, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig, Event,
    RandomConnectionIdGenerator,
};
use tern_quic::route::{CID_LEN, CoreCidGenerator, owner_core};

const CLIENT: &str = "127.0.0.1:40000";
const SERVER: &str = "127.0.0.1:7443";

fn server_endpoint(core: u8, server_config: &Arc<quinn_proto::ServerConfig>) -> Endpoint {
    let mut config = EndpointConfig::default();
    config.cid_generator(move || Box::new(CoreCidGenerator::new(core)));
    Endpoint::new(Arc::new(config), Some(server_config.clone()), false, None)
}

/// Every datagram `conn` wants to send now.
fn drain(conn: &mut quinn_proto::Connection) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut buf = Vec::new();
        match conn.poll_transmit(Instant::now(), 1, &mut buf) {
            Some(t) => {
                buf.truncate(t.size);
                out.push(buf);
            }
            None => return out,
        }
    }
}

/// Relays `conn`'s endpoint events to `endpoint` and back.
fn endpoint_events(
    endpoint: &mut Endpoint,
    handle: ConnectionHandle,
    conn: &mut quinn_proto::Connection,
) {
    while let Some(e) = conn.poll_endpoint_events() {
        if let Some(reply) = endpoint.handle_event(handle, e) {
            conn.handle_event(reply);
        }
    }
}

fn connected(conn: &mut quinn_proto::Connection) -> bool {
    let mut yes = false;
    while let Some(e) = conn.poll() {
        if matches!(e, Event::Connected) {
            yes = true;
        }
    }
    yes
}

#[test]
fn packets_name_the_accepting_core_and_other_cores_drop_them() {
    let dir = tempfile::tempdir().unwrap();
    let identity = tern_quic::tls::load_or_generate(dir.path()).unwrap();
    let server_config = Arc::new(tern_quic::tls::quic_server_config(&identity).unwrap());
    let client_tls = tern_quic::tls::client_config_trusting_der(identity.cert_chain()).unwrap();
    let client_config = ClientConfig::new(Arc::new(
        quinn_proto::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
    ));
    let client_addr: SocketAddr = CLIENT.parse().unwrap();
    let server_addr: SocketAddr = SERVER.parse().unwrap();

    let mut client_ep = Endpoint::new(Arc::new(EndpointConfig::default()), None, false, None);
    let (client_h, mut client) = client_ep
        .connect(Instant::now(), client_config, server_addr, "localhost")
        .unwrap();
    // Core 1 receives the first flight (as if the kernel hashed the client there) and so owns
    // the connection.
    let mut core0 = server_endpoint(0, &server_config);
    let mut core1 = server_endpoint(1, &server_config);
    let mut server: Option<(ConnectionHandle, quinn_proto::Connection)> = None;
    let (mut client_up, mut server_up) = (false, false);
    let mut routed = 0;

    for _round in 0..20 {
        for d in drain(&mut client) {
            match owner_core(&d) {
                None => assert_eq!(d[0] & 0xb0, 0x80, "only long-header Initials are unrouted"),
                Some(core) => {
                    assert_eq!(core, 1, "routed to the accepting core");
                    routed += 1;
                }
            }
            let mut buf = Vec::new();
            let event = core1.handle(
                Instant::now(),
                client_addr,
                None,
                None,
                BytesMut::from(&d[..]),
                &mut buf,
            );
            match event {
                Some(DatagramEvent::NewConnection(incoming)) => {
                    assert!(server.is_none());
                    server = Some(
                        core1
                            .accept(incoming, Instant::now(), &mut buf, None)
                            .unwrap(),
                    );
                }
                Some(DatagramEvent::ConnectionEvent(h, e)) => {
                    let (sh, conn) = server.as_mut().unwrap();
                    assert_eq!(*sh, h);
                    conn.handle_event(e);
                }
                Some(DatagramEvent::Response(_)) => panic!("unexpected endpoint response"),
                None => {}
            }
        }
        if let Some((sh, conn)) = server.as_mut() {
            endpoint_events(&mut core1, *sh, conn);
            server_up |= connected(conn);
            for d in drain(conn) {
                let mut buf = Vec::new();
                if let Some(DatagramEvent::ConnectionEvent(_, e)) = client_ep.handle(
                    Instant::now(),
                    server_addr,
                    None,
                    None,
                    BytesMut::from(&d[..]),
                    &mut buf,
                ) {
                    client.handle_event(e);
                }
            }
        }
        endpoint_events(&mut client_ep, client_h, &mut client);
        client_up |= connected(&mut client);
        if client_up && server_up && routed > 0 {
            break;
        }
    }
    assert!(client_up && server_up, "handshake completes");
    assert!(routed > 0, "the client sent routed packets");

    // A 1-RTT packet from the client, as core 0 would see it after a NAT rebinding.
    client.ping();
    let packets = drain(&mut client);
    let short = packets
        .iter()
        .find(|d| d[0] & 0x80 == 0)
        .expect("a short-header packet");
    assert_eq!(owner_core(short), Some(1));
    assert_eq!(short[1], 1);
    assert!(short.len() > 1 + CID_LEN);
    let rebound: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let mut buf = Vec::new();
    let at_core0 = core0.handle(
        Instant::now(),
        rebound,
        None,
        None,
        BytesMut::from(&short[..]),
        &mut buf,
    );
    assert!(at_core0.is_none(), "core 0 drops it: no stateless reset");

    // A generator that cannot tell its IDs from others' (random IDs, as many deployments use)
    // makes the stranger answer with a stateless reset, which would kill the connection.
    let mut config = EndpointConfig::default();
    config.cid_generator(|| Box::new(RandomConnectionIdGenerator::new(CID_LEN)));
    let mut plain = Endpoint::new(Arc::new(config), Some(server_config.clone()), false, None);
    let mut buf = Vec::new();
    let at_plain = plain.handle(
        Instant::now(),
        rebound,
        None,
        None,
        BytesMut::from(&short[..]),
        &mut buf,
    );
    assert!(
        matches!(at_plain, Some(DatagramEvent::Response(_))),
        "a validating-nothing endpoint answers with a reset"
    );

    // The owner takes it as part of the connection.
    let mut buf = Vec::new();
    let at_core1 = core1.handle(
        Instant::now(),
        rebound,
        None,
        None,
        BytesMut::from(&short[..]),
        &mut buf,
    );
    assert!(
        matches!(at_core1, Some(DatagramEvent::ConnectionEvent(h, _)) if h == server.as_ref().unwrap().0)
    );
}
