//! The whole gateway is killed (SIGKILL) at random moments under load and restarted; clients
//! reconnect, resend what was not acknowledged (same client message id) and sync. Afterwards every
//! acknowledged message has been delivered to its recipient exactly once, in order, with
//! contiguous sequence numbers and its exact bytes.
//!
//! `TERN_CRASH_ROUNDS` (default 3) sets the number of kills, `TERN_CRASH_MESSAGES` (default 300)
//! the messages per sender; the seed is printed and can be replayed with `TERN_CRASH_SEED`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern_protocol::v1::frame::Body;
use tern_protocol::{Ack, Codec, Deliver, Frame, SyncRequest, Target};
use tern_tests::{Gateway, WAIT, hello};

const PAIRS: usize = 4;
const WINDOW: usize = 32;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small xorshift generator: the test needs reproducible randomness, not quality.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The payload of message `idx` from pair `pair`: its length and bytes depend on both, so a
/// torn or mixed-up record cannot pass for another.
fn payload(pair: usize, idx: u64) -> Bytes {
    let len = 16 + ((idx * 37 + pair as u64 * 11) % 700) as usize;
    (0..len)
        .map(|i| (i as u64 * 31 + idx * 7 + pair as u64) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// A client connection whose failures are values (the server dies under it), not panics.
struct Client {
    stream: TcpStream,
    buf: BytesMut,
    codec: Codec,
    next_id: u64,
}

impl Client {
    /// Connects and logs in, retrying while the gateway is down (bounded by WAIT).
    fn login(addr: SocketAddr, token: &str, device: &str, sync: bool) -> Client {
        let deadline = Instant::now() + WAIT;
        loop {
            match Client::try_login(addr, token, device, sync) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    // Paces reconnect attempts while the gateway restarts.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot log in again within {WAIT:?}: {e}"),
            }
        }
    }

    fn try_login(
        addr: SocketAddr,
        token: &str,
        device: &str,
        sync: bool,
    ) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(WAIT))?;
        let mut c = Client {
            stream,
            buf: BytesMut::new(),
            codec: Codec::default(),
            next_id: 1,
        };
        let mut h = hello(token, device);
        h.sync_on_login = sync;
        c.send(Body::Hello(h))?;
        match c.recv()?.body {
            Some(Body::HelloOk(_)) => Ok(c),
            other => Err(std::io::Error::other(format!("login refused: {other:?}"))),
        }
    }

    fn send(&mut self, body: Body) -> std::io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = BytesMut::new();
        self.codec
            .encode(
                &Frame {
                    request_id: id,
                    body: Some(body),
                },
                &mut out,
            )
            .expect("encode");
        self.stream.write_all(&out)?;
        Ok(id)
    }

    fn recv(&mut self) -> std::io::Result<Frame> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => panic!("server sent an undecodable frame: {e}"),
            }
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Acknowledged sends so far, for the thread that decides when to kill, and the gate that
/// holds new sends back once the next kill point is reached (so a kill always finds senders
/// with messages left to send, however fast they are).
struct Progress {
    /// (acknowledged, the kill point new sends stop at).
    state: Mutex<(u64, u64)>,
    changed: Condvar,
}

impl Progress {
    fn new(first_kill_at: u64) -> Progress {
        Progress {
            state: Mutex::new((0, first_kill_at)),
            changed: Condvar::new(),
        }
    }

    fn add(&self) {
        self.state.lock().unwrap().0 += 1;
        self.changed.notify_all();
    }

    /// Whether a new message may be sent (the next kill point is not reached yet).
    fn may_send(&self) -> bool {
        let s = self.state.lock().unwrap();
        s.0 < s.1
    }

    /// Waits until new sends are allowed again (after the kill and restart).
    fn wait_open(&self) {
        let guard = self.state.lock().unwrap();
        let (_g, timeout) = self
            .changed
            .wait_timeout_while(guard, WAIT, |s| s.0 >= s.1)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "the send gate stayed closed for {WAIT:?}"
        );
    }

    /// Opens the gate up to the next kill point (`u64::MAX`: no more kills).
    fn reopen(&self, next_kill_at: u64) {
        self.state.lock().unwrap().1 = next_kill_at;
        self.changed.notify_all();
    }

    fn wait_for(&self, n: u64) {
        let guard = self.state.lock().unwrap();
        let (_g, timeout) = self
            .changed
            .wait_timeout_while(guard, WAIT, |s| s.0 < n)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "no progress to {n} acks within {WAIT:?}"
        );
    }
}

/// Sends `n` messages, resending every unacknowledged one with its original client message id
/// after each reconnect. Returns the sequence number acknowledged for each message, the number of
/// reconnections and the number of messages sent again.
fn sender(
    addr: SocketAddr,
    token: String,
    pair: usize,
    n: u64,
    progress: Arc<Progress>,
) -> (Vec<u64>, u64, u64) {
    let mut seqs: Vec<Option<u64>> = vec![None; n as usize];
    let mut next = 0u64;
    let to = format!("bob{pair}");
    let (mut connections, mut resent) = (0u64, 0u64);
    while seqs.iter().any(Option::is_none) {
        let mut c = Client::login(addr, &token, "phone", false);
        connections += 1;
        let mut retry: VecDeque<u64> = (0..next).filter(|&i| seqs[i as usize].is_none()).collect();
        resent += retry.len() as u64;
        let mut inflight: HashMap<u64, u64> = HashMap::new();
        let result: std::io::Result<()> = (|| {
            loop {
                while inflight.len() < WINDOW {
                    let idx = match retry.pop_front() {
                        Some(i) => i,
                        // At a kill point: only what is in flight finishes.
                        None if next < n && !progress.may_send() => break,
                        None if next < n => {
                            next += 1;
                            next - 1
                        }
                        None => break,
                    };
                    let rid = c.send(Body::Send(tern_protocol::Send {
                        client_msg_id: format!("m{idx}"),
                        target: Some(Target::user(&to)),
                        content_type: 1,
                        custom_type: String::new(),
                        payload: payload(pair, idx),
                        priority: false,
                    }))?;
                    inflight.insert(rid, idx);
                }
                if inflight.is_empty() {
                    if next < n {
                        // Held at a kill point: the kill and restart come, then the next send
                        // finds the connection gone and reconnects.
                        progress.wait_open();
                        continue;
                    }
                    return Ok(());
                }
                let f = c.recv()?;
                let idx = inflight
                    .remove(&f.request_id)
                    .expect("answer to a request in flight");
                match f.body {
                    Some(Body::SendAck(a)) => {
                        if let Some(prev) = seqs[idx as usize] {
                            assert_eq!(prev, a.seq, "a retried message got another sequence");
                        }
                        seqs[idx as usize] = Some(a.seq);
                        progress.add();
                    }
                    other => panic!("pair {pair} message {idx}: unexpected {other:?}"),
                }
            }
        })();
        if result.is_ok() {
            break;
        }
    }
    let seqs = seqs.into_iter().map(|s| s.expect("acked")).collect();
    (seqs, connections - 1, resent)
}

/// Receives until `n` messages arrived, acknowledging each (the device cursor), reconnecting
/// with a sync after each crash. Duplicates (a cursor write lost in a crash) must be identical
/// copies and are dropped, as the client SDK does; a gap or reordering fails the test.
fn receiver(addr: SocketAddr, token: String, n: u64) -> BTreeMap<u64, Deliver> {
    let mut got: BTreeMap<u64, Deliver> = BTreeMap::new();
    while (got.len() as u64) < n {
        let mut c = Client::login(addr, &token, "phone", true);
        let result: std::io::Result<()> = (|| {
            while (got.len() as u64) < n {
                let f = c.recv()?;
                let msgs = match f.body {
                    Some(Body::Deliver(d)) => vec![d],
                    Some(Body::SyncMessages(m)) => m.messages,
                    Some(Body::SyncNeeded(_)) => {
                        c.send(Body::Sync(SyncRequest {
                            since_version: 0,
                            page_size: 0,
                            ..Default::default()
                        }))?;
                        continue;
                    }
                    Some(Body::SyncConversations(_)) | Some(Body::SyncDone(_)) => continue,
                    other => panic!("receiver: unexpected {other:?}"),
                };
                let mut last = None;
                for d in msgs {
                    let top = got.keys().next_back().copied().unwrap_or(0);
                    if d.seq <= top {
                        assert_eq!(got[&d.seq], d, "a redelivered message differs");
                        continue;
                    }
                    assert_eq!(d.seq, top + 1, "gap before seq {}", d.seq);
                    last = Some((d.conversation_id, d.seq));
                    got.insert(d.seq, d);
                }
                if let Some((conversation_id, seq)) = last {
                    c.send(Body::Ack(Ack {
                        conversation_id,
                        seq,
                    }))?;
                }
            }
            Ok(())
        })();
        let _ = result;
    }
    got
}

#[test]
fn acknowledged_messages_survive_repeated_sigkill_exactly_once_and_in_order() {
    let rounds = env_or("TERN_CRASH_ROUNDS", 3);
    let per_sender = env_or("TERN_CRASH_MESSAGES", 300);
    let seed = env_or(
        "TERN_CRASH_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    println!("TERN_CRASH_SEED={seed} TERN_CRASH_ROUNDS={rounds} TERN_CRASH_MESSAGES={per_sender}");
    let mut rng = Rng(seed);

    let mut gw = Gateway::start(&["--cores", "2"]);
    let addr = gw.addr;
    // Kill at random points of the acknowledged stream.
    let total = per_sender * PAIRS as u64;
    let mut kill_points = Vec::new();
    let mut at = 0;
    for _ in 0..rounds {
        at += 1 + rng.next() % (total / (rounds + 1)).max(1);
        kill_points.push(at);
    }
    let progress = Arc::new(Progress::new(
        kill_points.first().copied().unwrap_or(u64::MAX),
    ));
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for pair in 0..PAIRS {
        let (a, b) = (
            gw.token(&format!("alice{pair}")),
            gw.token(&format!("bob{pair}")),
        );
        let p = progress.clone();
        senders.push(std::thread::spawn(move || {
            sender(addr, a, pair, per_sender, p)
        }));
        receivers.push(std::thread::spawn(move || receiver(addr, b, per_sender)));
    }

    for (i, &at) in kill_points.iter().enumerate() {
        progress.wait_for(at);
        gw.kill();
        gw.start_again();
        progress.reopen(kill_points.get(i + 1).copied().unwrap_or(u64::MAX));
    }

    let (mut reconnects, mut resent_total) = (0, 0);
    for (pair, (s, r)) in senders.into_iter().zip(receivers).enumerate() {
        let (acked, reconnected, resent) = s.join().expect("sender");
        reconnects += reconnected;
        resent_total += resent;
        let got = r.join().expect("receiver");
        // Contiguous sequences, one per message, in the order they were sent.
        assert_eq!(
            got.keys().copied().collect::<Vec<_>>(),
            (1..=per_sender).collect::<Vec<_>>()
        );
        for (idx, seq) in acked.iter().enumerate() {
            let d = &got[seq];
            assert_eq!(d.client_msg_id, format!("m{idx}"), "pair {pair} seq {seq}");
            assert_eq!(
                d.payload,
                payload(pair, idx as u64),
                "pair {pair} seq {seq}"
            );
            assert_eq!(d.sender, format!("alice{pair}"));
        }
        assert_eq!(acked, (1..=per_sender).collect::<Vec<_>>(), "pair {pair}");
    }
    println!(
        "{rounds} kills, {total} messages: senders reconnected {reconnects} times and sent \
         {resent_total} unacknowledged messages again; 0 lost, 0 duplicated"
    );
    // Every kill came while senders were held with messages left: they were cut off.
    assert!(reconnects >= 1, "no sender was ever disconnected");
}
