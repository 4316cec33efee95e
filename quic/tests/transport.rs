//! End-to-end: a tern-quic server on two glommio cores, quinn (tokio) clients, real UDP on
//! 127.0.0.1.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Mode, ServerEvent, TestServer, connect, echo, pattern, runtime, within};
use tern_quic::{ConnectionError, TransportConfig};

#[test]
fn echoes_one_mebibyte_and_fifty_concurrent_connections() {
    let mut server = TestServer::start(2, None);
    let rt = runtime();
    rt.block_on(within(120, "echo", async {
        let endpoint = common::client(&server.cert_path);

        // One stream, 1 MiB in 16 KiB writes.
        let conn = connect(&endpoint, server.addr).await;
        let data = pattern(1 << 20, 1);
        let back = echo(&conn, &data, 16 * 1024).await;
        assert_eq!(back.len(), data.len());
        assert!(back == data, "1 MiB echo differs");

        // Fifty connections at once, each with its own bytes.
        let mut tasks = Vec::new();
        for i in 0..50u64 {
            let endpoint = endpoint.clone();
            let addr = server.addr;
            tasks.push(tokio::spawn(async move {
                let conn = connect(&endpoint, addr).await;
                let data = pattern(64 * 1024 + i as usize * 1000, 100 + i);
                let back = echo(&conn, &data, 4096).await;
                (i, back == data, conn)
            }));
        }
        let mut conns = Vec::new();
        for t in tasks {
            let (i, same, conn) = t.await.unwrap();
            assert!(same, "connection {i} got different bytes back");
            conns.push(conn);
        }

        // The server saw exactly 51 handshakes, all established, none refused.
        let snaps = server.snapshots();
        assert_eq!(snaps.iter().map(|s| s.established).sum::<u64>(), 51);
        assert_eq!(snaps.iter().map(|s| s.handshakes).sum::<u64>(), 51);
        assert_eq!(snaps.iter().map(|s| s.refused).sum::<u64>(), 0);
        assert_eq!(snaps.iter().map(|s| s.open).sum::<u64>(), 51);
        let accepted: Vec<_> = server
            .drain_events()
            .into_iter()
            .map(|e| match e {
                ServerEvent::Accepted { core, id, .. } => (core, id),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(accepted.len(), 51);
        let ids: HashSet<u64> = accepted.iter().map(|(_, id)| *id).collect();
        assert_eq!(ids.len(), 51, "connection ids are unique");
        for (core, id) in &accepted {
            assert_eq!((id >> 56) as usize, *core, "id names its core");
        }

        // Nothing was reset on the way.
        assert!(conn.close_reason().is_none());
        for c in &conns {
            assert!(c.close_reason().is_none());
        }
        conns.push(conn);
        conns
    }));
}

#[test]
fn migration_to_another_core_is_forwarded_and_survives() {
    let mut server = TestServer::start(2, None);
    let rt = runtime();
    rt.block_on(within(120, "migration", async {
        let endpoint = common::client(&server.cert_path);
        let conn = connect(&endpoint, server.addr).await;
        let data = pattern(32 * 1024, 7);
        assert!(echo(&conn, &data, 4096).await == data);
        let (_, forwarded_before) = server.forwarded();

        let mut rebinds = 0;
        let mut ports = HashSet::new();
        while rebinds < 64 {
            // A new local port: a new 4-tuple, which the kernel hashes to either core.
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            ports.insert(socket.local_addr().unwrap().port());
            endpoint.rebind(socket).unwrap();
            rebinds += 1;
            let data = pattern(32 * 1024, 1000 + rebinds);
            let back = echo(&conn, &data, 4096).await;
            assert!(back == data, "echo after rebind {rebinds} differs");
            if server.forwarded().1 > forwarded_before {
                break;
            }
        }
        let (out, into) = server.forwarded();
        assert!(
            into > forwarded_before,
            "no datagram was forwarded in {rebinds} rebinds"
        );
        assert!(out >= into, "every forwarded datagram was sent by a reader");
        // The connection was never reset or replaced.
        assert!(conn.close_reason().is_none());
        let snaps = server.snapshots();
        assert_eq!(snaps.iter().map(|s| s.handshakes).sum::<u64>(), 1);
        assert_eq!(snaps.iter().map(|s| s.forward_dropped).sum::<u64>(), 0);
        let events = server.drain_events();
        assert_eq!(events.len(), 1, "{events:?}");
        let ServerEvent::Accepted { core, .. } = events[0] else {
            panic!("{events:?}")
        };
        // Only the other core forwarded, only to the owner. (Counters move while datagrams are
        // in flight: read what arrived before what was sent, so sent >= arrived must hold.)
        let owner_in = server.stats[core].snapshot().forwarded_in;
        let other = server.stats[1 - core].snapshot();
        assert!(owner_in >= into);
        assert!(other.forwarded_out >= owner_in);
        assert_eq!(other.forwarded_in, 0);
        assert_eq!(server.stats[core].snapshot().forwarded_out, 0);
        eprintln!("forwarded after {rebinds} rebind(s), {into} datagram(s)");

        // And the connection keeps working afterwards.
        let data = pattern(256 * 1024, 99);
        assert!(echo(&conn, &data, 8192).await == data);
        conn
    }));
}

#[test]
fn idle_connection_is_closed_by_the_server() {
    let mut transport = TransportConfig::default();
    // Long enough that a stalled handshake on a loaded machine does not time out first.
    let idle = Duration::from_secs(2);
    transport.max_idle_timeout(Some(idle.try_into().unwrap()));
    let mut server = TestServer::start(2, Some(transport));
    let rt = runtime();
    let started = Instant::now();
    let (conn, accepted, closed) = rt.block_on(within(30, "idle close", async {
        let endpoint = common::client(&server.cert_path);
        let conn = connect(&endpoint, server.addr).await;
        let accepted = server.next_event(10).await;
        // Nothing is sent; the server's idle timer must end the connection and `closed()`
        // resolve.
        let closed = server.next_event(10).await;
        ((endpoint, conn), accepted, closed)
    }));
    let ServerEvent::Accepted { core, id, .. } = accepted else {
        panic!("{accepted:?}")
    };
    assert_eq!(
        closed,
        ServerEvent::Closed {
            core,
            id,
            reason: ConnectionError::TimedOut
        }
    );
    assert!(started.elapsed() >= idle);
    // The client's idle timer (the same negotiated 2 s) ends its side too; if it happened to
    // send one last packet (an ACK, a probe) after the server dropped the connection, the
    // server's answer was a stateless reset. Either way the client did not close it.
    let client_reason = rt.block_on(within(10, "client idle", conn.1.closed()));
    assert!(
        matches!(
            client_reason,
            quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset
        ),
        "{client_reason:?}"
    );
    // And the server forgot the connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.snapshots().iter().map(|s| s.open).sum::<u64>() != 0 {
        assert!(Instant::now() < deadline, "connection not drained");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn shutdown_closes_connections_with_the_listener_code() {
    let mut server = TestServer::start(2, None);
    let rt = runtime();
    let (endpoint, conn) = rt.block_on(within(30, "connect", async {
        let endpoint = common::client(&server.cert_path);
        let conn = connect(&endpoint, server.addr).await;
        let data = pattern(1000, 3);
        assert!(echo(&conn, &data, 1000).await == data);
        (endpoint, conn)
    }));
    server.stop();
    let reason = rt.block_on(within(10, "client sees close", conn.closed()));
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(common::SHUTDOWN_CODE)
            );
            assert_eq!(&close.reason[..], common::SHUTDOWN_REASON);
        }
        other => panic!("unexpected close {other:?}"),
    }
    let events = server.drain_events();
    let closed: Vec<_> = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                ServerEvent::Closed {
                    reason: ConnectionError::LocallyClosed,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(closed.len(), 1, "{events:?}");
    let idle = events
        .iter()
        .filter(|e| matches!(e, ServerEvent::Idle { .. }))
        .count();
    assert_eq!(idle, 2, "both cores drained: {events:?}");
    drop(endpoint);
}

#[test]
fn writers_wait_for_flow_control_credit() {
    // The client grants 100 000 bytes per stream and reads nothing at first: the server's
    // writes must stop at exactly that much instead of buffering the whole megabyte.
    const WINDOW: u32 = 100_000;
    const TOTAL: usize = 1 << 20;
    let mut server = TestServer::start_with(
        2,
        None,
        Mode::Fill {
            total: TOTAL,
            seed: 11,
        },
    );
    let rt = runtime();
    rt.block_on(within(60, "flow control", async {
        let mut transport = quinn::TransportConfig::default();
        transport.stream_receive_window(quinn::VarInt::from_u32(WINDOW));
        let endpoint = common::client_with(&server.cert_path, Some(transport));
        let conn = connect(&endpoint, server.addr).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"go").await.unwrap();
        send.finish().unwrap();
        assert!(matches!(
            server.next_event(10).await,
            ServerEvent::Accepted { .. }
        ));
        assert_eq!(
            server.next_event(10).await,
            ServerEvent::Blocked {
                written: WINDOW as usize
            }
        );
        // Reading grants credit; the waiting writer resumes and everything arrives in order.
        let back = recv.read_to_end(usize::MAX).await.unwrap();
        assert_eq!(back.len(), TOTAL);
        assert!(back == pattern(TOTAL, 11));
        assert!(conn.close_reason().is_none());
    }));
}

#[test]
fn server_opened_stream_reaches_the_client() {
    let server = TestServer::start_with(
        2,
        None,
        Mode::Push {
            len: 200_000,
            seed: 21,
        },
    );
    let rt = runtime();
    rt.block_on(within(60, "push", async {
        let endpoint = common::client(&server.cert_path);
        let conn = connect(&endpoint, server.addr).await;
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        let got = recv.read_to_end(usize::MAX).await.unwrap();
        assert!(got == pattern(200_000, 21));
        // The client's streams are still echoed on the same connection.
        let data = pattern(5000, 22);
        assert!(echo(&conn, &data, 1000).await == data);
    }));
}

#[test]
fn connections_come_and_go_in_waves() {
    // Three waves of twenty connections, each closed by the client after its echo: the server
    // sees every close with the client's code and forgets every connection (handles are
    // reused across waves).
    let mut server = TestServer::start(2, None);
    let rt = runtime();
    rt.block_on(within(120, "waves", async {
        let endpoint = common::client(&server.cert_path);
        for wave in 0..3u64 {
            let mut tasks = Vec::new();
            for i in 0..20u64 {
                let endpoint = endpoint.clone();
                let addr = server.addr;
                tasks.push(tokio::spawn(async move {
                    let conn = connect(&endpoint, addr).await;
                    let data = pattern(10_000, wave * 100 + i);
                    let same = echo(&conn, &data, 2000).await == data;
                    conn.close(quinn::VarInt::from_u32(3), b"done");
                    same
                }));
            }
            for t in tasks {
                assert!(t.await.unwrap());
            }
            let mut accepted = 0;
            let mut closed = 0;
            while closed < 20 {
                match server.next_event(10).await {
                    ServerEvent::Accepted { .. } => accepted += 1,
                    ServerEvent::Closed { reason, .. } => {
                        match reason {
                            ConnectionError::ApplicationClosed(c) => {
                                assert_eq!(c.error_code, tern_quic::VarInt::from_u32(3));
                                assert_eq!(&c.reason[..], b"done");
                            }
                            other => panic!("unexpected close {other:?}"),
                        }
                        closed += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(accepted, 20);
        }
        // Closed connections drain (after three probe timeouts) and are forgotten.
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.snapshots().iter().map(|s| s.open).sum::<u64>() != 0 {
            assert!(Instant::now() < deadline, "connections not drained");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let snaps = server.snapshots();
        assert_eq!(snaps.iter().map(|s| s.established).sum::<u64>(), 60);
        assert_eq!(snaps.iter().map(|s| s.refused).sum::<u64>(), 0);
    }));
    // Nothing left to close at shutdown.
    server.stop();
    let events = server.drain_events();
    let mut idle: Vec<usize> = events
        .iter()
        .map(|e| match e {
            ServerEvent::Idle { core } => *core,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    idle.sort();
    assert_eq!(idle, [0, 1]);
}
