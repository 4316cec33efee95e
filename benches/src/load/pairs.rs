//! `pairs`: P sender→receiver pairs. Each sender pipelines Sends with at most `window` unanswered;
//! each receiver checks what arrives against what was acknowledged.
//!
//! Every connection is one task on a single-threaded runtime: a sender appends due Sends to one
//! buffer and writes it with one syscall, then reads SendAcks; a receiver reads Delivers in
//! batches, stamps the whole batch with one clock read, and acks every `ack_every` messages.
//!
//! With `--transport dual` every user has two connections, TCP and a QUIC one joined to the same
//! logical session (docs/PROTOCOL.md, "Dual channel"). A sender writes each Send to both and
//! counts the SendAck that comes second as expected; a receiver reads both, keeps the first copy
//! of each message (latency is measured on it) and counts the second copy as expected. Anything
//! beyond that (a copy twice on one path) is a duplicate.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hdrhistogram::Histogram;
use tern_protocol::{Ack, Body, Codec, Frame, decode_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::spawn_local;

use crate::login::{self, Conn, parse_duration};
use crate::sys::{self, ProcSnap};
use crate::token::Minter;
use crate::wire::{self, RID_BASE, Scanned, SendTemplate, Stamp, WireError};

/// Options of `tern-load pairs`.
#[derive(Debug, clap::Args)]
pub struct PairsArgs {
    /// Gateway address (loopback only): its TCP address, or its QUIC one with `--transport quic`.
    #[arg(long, default_value = "127.0.0.1:7600")]
    server: SocketAddr,
    /// `tcp`, `quic` (one bidirectional stream per connection) or `dual` (a TCP connection to
    /// `--server` and a QUIC one to `--quic-server` per user, one logical session).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "quic", "dual"])]
    transport: String,
    /// The gateway's QUIC address (loopback only); required with `--transport dual`.
    #[arg(long)]
    quic_server: Option<SocketAddr>,
    /// Certificate to trust for QUIC (PEM). Default: the gateway's development certificate,
    /// `<data-dir>/tls/cert.pem`.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The gateway's data directory, to read its token secret.
    #[arg(long)]
    data_dir: PathBuf,
    /// Number of sender→receiver pairs (two connections each).
    #[arg(long, default_value_t = 100)]
    pairs: u32,
    /// How long senders send.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Total Sends per second over all senders; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Sends per sender that may await their SendAck.
    #[arg(long, default_value_t = 64)]
    window: u32,
    /// Payload bytes per message (at least 20: timestamp, sequence, pair).
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// A receiver sends one Ack per this many messages (and one at the end).
    #[arg(long, default_value_t = 256)]
    ack_every: u64,
    /// After sending stops, how long to wait for outstanding SendAcks and Delivers.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain: Duration,
    /// Gateway process id: report its CPU time per delivered message and I/O counters.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Free text copied into the RESULT line (e.g. the durability under test).
    #[arg(long, default_value = "")]
    label: String,
}

struct Shared {
    t0: Instant,
    send_end: Instant,
    drain_end: Instant,
    pairs: u32,
    /// Per pair: SendAcks the sender got, published when it has stopped; `u64::MAX` before.
    final_acked: Vec<Cell<u64>>,
    latency_ns: RefCell<Histogram<u64>>,
    /// From writing a Send to reading its (first) SendAck.
    ack_latency_ns: RefCell<Histogram<u64>>,
}

impl Shared {
    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.t0).as_nanos() as u64
    }
}

/// Problems one connection saw; summed into the report.
#[derive(Debug, Default)]
struct Events {
    errors: u64,
    kicks: u64,
    sync_needed: u64,
    unexpected: u64,
    first: Option<String>,
}

impl Events {
    fn note(&mut self, what: String) {
        if self.first.is_none() {
            self.first = Some(what);
        }
    }

    /// Counts a frame the fast scanner does not handle.
    fn other(&mut self, who: &str, body: &[u8]) -> Result<Option<Frame>, WireError> {
        let frame = decode_frame(Bytes::copy_from_slice(body))
            .map_err(|e| WireError(format!("{who}: {e}")))?;
        match &frame.body {
            Some(Body::Error(e)) => {
                self.errors += 1;
                self.note(format!("{who}: Error code {} {}", e.code, e.message));
            }
            Some(Body::Kick(k)) => {
                self.kicks += 1;
                self.note(format!("{who}: Kick reason {} {}", k.reason, k.message));
            }
            Some(Body::SyncNeeded(_)) => {
                self.sync_needed += 1;
                self.note(format!("{who}: SyncNeeded"));
            }
            _ => {
                self.unexpected += 1;
                self.note(format!("{who}: unexpected {}", frame.body_name()));
            }
        }
        Ok(Some(frame))
    }

    fn add(&mut self, o: Events) {
        self.errors += o.errors;
        self.kicks += o.kicks;
        self.sync_needed += o.sync_needed;
        self.unexpected += o.unexpected;
        if self.first.is_none() {
            self.first = o.first;
        }
    }
}

/// A bit per per-pair sequence number.
#[derive(Debug, Default)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was already set.
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1 + w / 2, 0);
        }
        let was = self.0[w] >> b & 1 == 1;
        self.0[w] |= 1 << b;
        was
    }

    /// Bits set here and not in `other`.
    fn missing_from(&self, other: &Bits) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.0.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

#[derive(Debug, Default)]
struct SenderOut {
    sent: u64,
    /// Messages with a SendAck (the first one in dual mode).
    acked: u64,
    /// SendAcks not expected: a second one for a message (in dual mode: on the same path).
    dup_acks: u64,
    /// Dual mode: the SendAcks that came second, on the other path (expected).
    second_acks: u64,
    acked_bits: Bits,
    events: Events,
}

#[derive(Debug, Default)]
struct RecvOut {
    /// Deliver frames; in dual mode without the expected second copies.
    delivered: u64,
    unique: u64,
    dup: u64,
    reordered: u64,
    misrouted: u64,
    seq_gaps: u64,
    /// Dual mode: second copies, from the other path (expected).
    dual_copies: u64,
    /// Dual mode: the first copies each path (TCP, QUIC) brought.
    first_on: [u64; 2],
    bits: Bits,
    last_delivery: Option<Instant>,
    events: Events,
}

/// Where a run's connections go: one path per user (TCP or QUIC), or TCP plus QUIC joined to it.
#[derive(Debug, Clone)]
struct Route {
    server: SocketAddr,
    /// QUIC client settings, for `quic` and `dual`.
    quic: Option<quinn::ClientConfig>,
    /// `dual`: the QUIC address the second path connects to.
    dual: Option<SocketAddr>,
}

/// How a SendAck or Deliver of a load message relates to the copies that came before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// The message's first copy.
    First,
    /// Dual mode: its first copy on this path, after the other path's.
    Second,
    /// A copy on a path that had already brought it: a duplicate.
    Repeat,
}

/// Records that a copy of message `seq` (its SendAck, or its Deliver) came on path `p` and says
/// which copy it is. `seen` holds the messages any path brought; `per_path` is empty with one
/// path, and in dual mode holds per path what that path brought.
fn arrival(seen: &mut Bits, per_path: &mut [Bits], p: usize, seq: u64) -> Arrival {
    if per_path.is_empty() {
        if seen.set(seq) {
            Arrival::Repeat
        } else {
            Arrival::First
        }
    } else if per_path[p].set(seq) {
        Arrival::Repeat
    } else if seen.set(seq) {
        Arrival::Second
    } else {
        Arrival::First
    }
}

/// Names of the paths of a dual-mode user, in `Vec<Conn>` order.
const PATH_NAMES: [&str; 2] = ["tcp", "quic"];

/// Per path, how errors name it: `who`, and in dual mode which path.
fn path_names(who: &str, paths: usize) -> Vec<String> {
    (0..paths)
        .map(|p| {
            if paths > 1 {
                format!("{who} ({} path)", PATH_NAMES[p])
            } else {
                who.to_string()
            }
        })
        .collect()
}

/// Runs the workload and prints the report; `Ok(false)` if messages were lost or duplicated.
pub async fn run(a: PairsArgs) -> Result<bool, String> {
    if !a.server.ip().is_loopback() {
        return Err("--server must be a loopback address".into());
    }
    match (a.transport.as_str(), a.quic_server) {
        ("dual", None) => {
            return Err(
                "--transport dual needs --quic-server (the gateway's QUIC address; --server is its TCP one)"
                    .into(),
            );
        }
        ("dual", Some(q)) if !q.ip().is_loopback() => {
            return Err("--quic-server must be a loopback address".into());
        }
        ("dual", Some(_)) | (_, None) => {}
        (_, Some(_)) => return Err("--quic-server is only used with --transport dual".into()),
    }
    if a.pairs == 0 || a.window == 0 || a.ack_every == 0 {
        return Err("--pairs, --window and --ack-every must be at least 1".into());
    }
    let minter = Minter::from_data_dir(&a.data_dir)?;
    let prefix = login::run_prefix();
    let rate_label = if a.rate == 0 {
        "max".to_string()
    } else {
        format!("{}/s", a.rate)
    };
    let over = match a.quic_server {
        Some(q) if a.transport == "dual" => format!("dual (TCP {} + QUIC {q})", a.server),
        _ => a.transport.clone(),
    };
    eprintln!(
        "tern-load pairs: {} pairs over {over}, {:?}, rate {rate_label}, window {}, payload {} B, users {prefix}-sN/-rN",
        a.pairs, a.duration, a.window, a.payload
    );

    let route = Route {
        server: a.server,
        quic: match a.transport.as_str() {
            "quic" | "dual" => Some(login::quic_client_config(
                &a.ca
                    .clone()
                    .unwrap_or_else(|| a.data_dir.join("tls").join("cert.pem")),
            )?),
            _ => None,
        },
        dual: a.quic_server.filter(|_| a.transport == "dual"),
    };
    // Receivers first: a message committed before its receiver is online would not be pushed.
    let receivers = login_all(&a, &route, &minter, &prefix, 'r').await?;
    let senders = login_all(&a, &route, &minter, &prefix, 's').await?;

    let gw0 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let cpu0 = sys::self_cpu();
    let udp0 = sys::udp_datagrams();
    let t0 = Instant::now();
    let send_end = t0 + a.duration;
    let shared = Rc::new(Shared {
        t0,
        send_end,
        drain_end: send_end + a.drain,
        pairs: a.pairs,
        final_acked: (0..a.pairs).map(|_| Cell::new(u64::MAX)).collect(),
        latency_ns: RefCell::new(wire::latency_histogram()),
        ack_latency_ns: RefCell::new(wire::latency_histogram()),
    });
    let rate_per_sender = a.rate as f64 / f64::from(a.pairs);
    let mut send_tasks = Vec::new();
    let mut recv_tasks = Vec::new();
    for (i, (s, r)) in senders.into_iter().zip(receivers).enumerate() {
        let i = i as u32;
        let tpl = SendTemplate::new(
            i,
            &format!("{prefix}-s{i}"),
            &format!("{prefix}-r{i}"),
            a.payload,
        );
        recv_tasks.push(spawn_local(receiver(shared.clone(), i, r, a.ack_every)));
        send_tasks.push(spawn_local(sender(
            shared.clone(),
            i,
            s,
            tpl,
            u64::from(a.window),
            rate_per_sender,
        )));
    }
    let mut sends = Vec::new();
    for t in send_tasks {
        sends.push(t.await.map_err(|e| format!("sender task: {e}"))?);
    }
    let mut recvs = Vec::new();
    for t in recv_tasks {
        recvs.push(t.await.map_err(|e| format!("receiver task: {e}"))?);
    }
    let gw1 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let gen_cpu = sys::self_cpu() - cpu0;
    let udp1 = sys::udp_datagrams();
    let udp_sent = udp1.1.saturating_sub(udp0.1);

    Ok(report(
        &a,
        &shared,
        &sends,
        &recvs,
        gw0.zip(gw1),
        gen_cpu,
        udp_sent,
    ))
}

/// Logs in every user of one role; per user its paths (one, or TCP then QUIC in dual mode).
async fn login_all(
    a: &PairsArgs,
    route: &Route,
    minter: &Minter,
    prefix: &str,
    role: char,
) -> Result<Vec<Vec<Conn>>, String> {
    let tasks: Vec<_> = (0..a.pairs)
        .map(|i| {
            let token = minter.mint(&format!("{prefix}-{role}{i}"));
            spawn_local(login_paths(route.clone(), token))
        })
        .collect();
    let mut users = Vec::with_capacity(tasks.len());
    for t in tasks {
        users.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok(users)
}

/// One user's paths: in dual mode TCP first, then QUIC joined to its session.
async fn login_paths(route: Route, token: String) -> Result<Vec<Conn>, String> {
    match (route.quic, route.dual) {
        (Some(q), Some(quic_server)) => {
            let tcp = login::connect(route.server, None, token.clone(), "load").await?;
            let quic = login::connect_quic(quic_server, q, token, "load", tcp.session_id)
                .await
                .map_err(|e| format!("QUIC path joining TCP session {}: {e}", tcp.session_id))?;
            Ok(vec![tcp, quic])
        }
        (Some(q), None) => Ok(vec![
            login::connect_quic(route.server, q, token, "load", 0).await?,
        ]),
        (None, _) => Ok(vec![
            login::connect(route.server, None, token, "load").await?,
        ]),
    }
}

async fn sender(
    sh: Rc<Shared>,
    pair: u32,
    mut paths: Vec<Conn>,
    tpl: SendTemplate,
    window: u64,
    rate: f64,
) -> SenderOut {
    let mut out = SenderOut::default();
    let who = path_names(&format!("sender {pair}"), paths.len());
    let dual = paths.len() > 1;
    // Spread the senders' pacing phases evenly over one interval.
    let phase = f64::from(pair) / f64::from(sh.pairs);
    let mut wbuf = Vec::with_capacity(tpl.len() * window as usize);
    let mut next = 0u64;
    // Sends each path has not answered yet; the window applies to the one furthest behind.
    let mut outstanding = vec![0u64; paths.len()];
    // Dual mode: the SendAcks each path brought, to tell a second path's answer from a repeat.
    let mut path_acked: Vec<Bits> = if dual {
        paths.iter().map(|_| Bits::default()).collect()
    } else {
        Vec::new()
    };
    // When each Send in flight was written, by seq modulo the window: at most `window` Sends
    // await their first SendAck, so a slot is reused only after its Send was answered (or
    // refused). The seq is kept to tell a stale slot.
    let mut written_ns = vec![(u64::MAX, 0u64); window.max(1) as usize];
    let mut deadline = sh.send_end;
    let mut sleep = pin!(tokio::time::sleep_until(deadline.into()));
    'run: loop {
        let now = Instant::now();
        let behind = outstanding.iter().copied().max().unwrap_or(0);
        let mut wake = sh.send_end;
        if now < sh.send_end {
            let mut n = window.saturating_sub(behind);
            if rate > 0.0 {
                let x = now.duration_since(sh.t0).as_secs_f64() * rate - phase;
                let due = if x < 0.0 { 0 } else { x as u64 + 1 };
                n = n.min(due.saturating_sub(next));
                if behind + n < window {
                    let k = (next + n) as f64;
                    wake = sh.t0 + Duration::from_secs_f64((k + phase) / rate);
                }
            }
            if n > 0 {
                let ts = sh.ns(now);
                for _ in 0..n {
                    tpl.write(&mut wbuf, next, ts);
                    written_ns[(next % window) as usize] = (next, ts);
                    next += 1;
                }
                for o in &mut outstanding {
                    *o += n;
                }
                out.sent += n;
                // The same bytes (request and client message ids included) on every path.
                for (p, conn) in paths.iter_mut().enumerate() {
                    let w =
                        tokio::time::timeout_at(sh.drain_end.into(), conn.stream.write_all(&wbuf));
                    match w.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            out.events.note(format!("{}: write: {e}", who[p]));
                            break 'run;
                        }
                        Err(_) => {
                            out.events.note(format!(
                                "{}: write blocked until the end of the drain",
                                who[p]
                            ));
                            break 'run;
                        }
                    }
                }
                wbuf.clear();
            }
        } else if behind == 0 || now >= sh.drain_end {
            break;
        } else {
            wake = sh.drain_end;
        }
        if wake != deadline {
            deadline = wake;
            sleep.as_mut().reset(deadline.into());
        }
        let p = match read_any(&mut paths, sleep.as_mut()).await {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err((p, e)) => {
                out.events.note(format!("{}: {e}", who[p]));
                break;
            }
        };
        let who_p = who[p].as_str();
        let conn = &mut paths[p];
        let outstanding = &mut outstanding[p];
        let read_ns = sh.ns(Instant::now());
        let mut ack_latency = sh.ack_latency_ns.borrow_mut();
        let parsed = wire::for_each_frame(&conn.rbuf, |body| {
            match wire::scan(body)? {
                Scanned::SendAck { request_id } if request_id & RID_BASE != 0 => {
                    let seq = request_id & !RID_BASE;
                    match arrival(&mut out.acked_bits, &mut path_acked, p, seq) {
                        Arrival::First => {
                            out.acked += 1;
                            *outstanding = outstanding.saturating_sub(1);
                            let (written_seq, at) = written_ns[(seq % window) as usize];
                            if written_seq == seq {
                                let _ = ack_latency.record(read_ns.saturating_sub(at).max(1));
                            }
                        }
                        Arrival::Second => {
                            // The other path answered first.
                            out.second_acks += 1;
                            *outstanding = outstanding.saturating_sub(1);
                        }
                        Arrival::Repeat => out.dup_acks += 1,
                    }
                }
                _ => {
                    let f = out.events.other(who_p, body)?;
                    if let Some(f) = f
                        && matches!(f.body, Some(Body::Error(_)))
                        && f.request_id & RID_BASE != 0
                    {
                        // That Send was refused: it will get no SendAck on this path.
                        *outstanding = outstanding.saturating_sub(1);
                    }
                }
            }
            Ok(())
        });
        drop(ack_latency);
        match parsed {
            Ok(n) => conn.rbuf.advance(n),
            Err(e) => {
                out.events.note(e.0);
                break;
            }
        }
    }
    sh.final_acked[pair as usize].set(out.acked);
    out
}

/// Reads what the server sent into `conn.rbuf`, or returns `Ok(false)` when `sleep` fires first.
/// An error names why the connection ended.
async fn read_or_wake(
    conn: &mut Conn,
    sleep: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Result<bool, String> {
    conn.rbuf.reserve(64 << 10);
    tokio::select! {
        biased;
        r = conn.stream.read_buf(&mut conn.rbuf) => read_result(r),
        () = sleep => Ok(false),
    }
}

fn read_result(r: std::io::Result<usize>) -> Result<bool, String> {
    match r {
        Ok(0) => Err("server closed the connection".into()),
        Err(e) => Err(format!("read: {e}")),
        Ok(_) => Ok(true),
    }
}

/// [`read_or_wake`] over a user's paths: `Ok(Some(p))` when path `p` read something into its
/// `rbuf`, `Ok(None)` when `sleep` fired first; an error names the path that ended. With two
/// paths neither is preferred (`select!` polls them in random order), so a busy path cannot
/// starve the other. Reads are cancel-safe: the read that lost the race loses no bytes.
async fn read_any(
    paths: &mut [Conn],
    sleep: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Result<Option<usize>, (usize, String)> {
    match paths {
        [conn] => read_or_wake(conn, sleep)
            .await
            .map(|read| read.then_some(0))
            .map_err(|e| (0, e)),
        [a, b] => {
            a.rbuf.reserve(64 << 10);
            b.rbuf.reserve(64 << 10);
            tokio::select! {
                r = a.stream.read_buf(&mut a.rbuf) => read_result(r).map(|_| Some(0)).map_err(|e| (0, e)),
                r = b.stream.read_buf(&mut b.rbuf) => read_result(r).map(|_| Some(1)).map_err(|e| (1, e)),
                () = sleep => Ok(None),
            }
        }
        _ => unreachable!("a user has one or two paths"),
    }
}

async fn receiver(sh: Rc<Shared>, pair: u32, mut paths: Vec<Conn>, ack_every: u64) -> RecvOut {
    let mut out = RecvOut::default();
    let who = path_names(&format!("receiver {pair}"), paths.len());
    let dual = paths.len() > 1;
    let mut codec = Codec::new(wire::MAX_FRAME);
    let (mut conv, mut acked_seq) = (0u64, 0u64);
    // Per path: the last server seq it delivered (each path delivers in seq order on its own).
    let mut last_seq = vec![0u64; paths.len()];
    // Dual mode: the messages each path delivered, to tell a second copy from a repeat.
    let mut path_seen: Vec<Bits> = if dual {
        paths.iter().map(|_| Bits::default()).collect()
    } else {
        Vec::new()
    };
    let mut high: Option<u64> = None;
    let mut since_ack = 0u64;
    let mut abuf = BytesMut::new();
    let mut deadline = sh.send_end;
    let mut sleep = pin!(tokio::time::sleep_until(deadline.into()));
    loop {
        let now = Instant::now();
        let fin = sh.final_acked[pair as usize].get();
        // Dual mode: also wait for the second copies (the slower path's tail), up to the drain.
        let done = fin != u64::MAX && out.unique >= fin && (!dual || out.dual_copies >= out.unique);
        if done || now >= sh.drain_end {
            break;
        }
        // While senders run, reads wake us; afterwards poll for the sender's final count.
        let wake = if now < sh.send_end {
            sh.send_end
        } else {
            now + Duration::from_millis(2)
        };
        if wake != deadline {
            deadline = wake;
            sleep.as_mut().reset(deadline.into());
        }
        let p = match read_any(&mut paths, sleep.as_mut()).await {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err((p, e)) => {
                out.events.note(format!("{}: {e}", who[p]));
                break;
            }
        };
        let who_p = who[p].as_str();
        let now = Instant::now();
        let now_ns = sh.ns(now);
        let before = out.delivered;
        let conn = &mut paths[p];
        let last_seq_p = &mut last_seq[p];
        let parsed = {
            let mut hist = sh.latency_ns.borrow_mut();
            wire::for_each_frame(&conn.rbuf, |body| {
                match wire::scan(body)? {
                    Scanned::Deliver {
                        conversation_id,
                        seq,
                        payload,
                    } => {
                        if conv == 0 {
                            conv = conversation_id;
                        }
                        if conversation_id != conv || (*last_seq_p != 0 && seq != *last_seq_p + 1) {
                            out.seq_gaps += 1;
                        }
                        *last_seq_p = seq;
                        let Some(st) = Stamp::parse(payload).filter(|s| s.pair == pair) else {
                            out.delivered += 1;
                            since_ack += 1;
                            out.misrouted += 1;
                            return Ok(());
                        };
                        let copy = arrival(&mut out.bits, &mut path_seen, p, st.seq);
                        if copy == Arrival::Second {
                            // From the other path, expected: not a delivery of its own.
                            out.dual_copies += 1;
                            return Ok(());
                        }
                        out.delivered += 1;
                        since_ack += 1;
                        if !dual || copy == Arrival::First {
                            hist.saturating_record(now_ns.saturating_sub(st.ts_ns).max(1));
                        }
                        if copy == Arrival::Repeat {
                            out.dup += 1;
                        } else {
                            out.unique += 1;
                            out.first_on[p] += 1;
                            if high.is_some_and(|h| st.seq < h) {
                                out.reordered += 1;
                            }
                            high = high.max(Some(st.seq));
                        }
                    }
                    Scanned::SendAck { .. } | Scanned::Other(_) => {
                        out.events.other(who_p, body)?;
                    }
                }
                Ok(())
            })
        };
        match parsed {
            Ok(n) => conn.rbuf.advance(n),
            Err(e) => {
                out.events.note(e.0);
                break;
            }
        }
        if out.delivered > before {
            out.last_delivery = Some(now);
        }
        // Acks go on the first path (TCP in dual mode), up to the highest seq any path brought:
        // each path delivers in order, so everything below it has arrived.
        let seen = last_seq.iter().copied().max().unwrap_or(0);
        if since_ack >= ack_every && conv != 0 {
            since_ack = 0;
            acked_seq = seen;
            if let Err(e) = send_ack(&mut paths[0], &mut codec, &mut abuf, conv, seen).await {
                out.events.note(format!("{}: write Ack: {e}", who[0]));
                break;
            }
        }
    }
    let seen = last_seq.iter().copied().max().unwrap_or(0);
    if conv != 0 && seen > acked_seq {
        // Best effort: the run is over either way.
        let _ = send_ack(&mut paths[0], &mut codec, &mut abuf, conv, seen).await;
    }
    out
}

async fn send_ack(
    conn: &mut Conn,
    codec: &mut Codec,
    buf: &mut BytesMut,
    conversation_id: u64,
    seq: u64,
) -> std::io::Result<()> {
    buf.clear();
    let ack = Frame::new(
        0,
        Ack {
            conversation_id,
            seq,
        },
    );
    codec
        .encode(&ack, buf)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tokio::time::timeout(Duration::from_secs(5), conn.stream.write_all(buf))
        .await
        .map_err(|_| std::io::Error::other("Ack write blocked for 5 s"))?
}

fn report(
    a: &PairsArgs,
    sh: &Shared,
    sends: &[SenderOut],
    recvs: &[RecvOut],
    gw: Option<(ProcSnap, ProcSnap)>,
    gen_cpu: Duration,
    udp_sent: u64,
) -> bool {
    let sum_s = |f: fn(&SenderOut) -> u64| sends.iter().map(f).sum::<u64>();
    let sum_r = |f: fn(&RecvOut) -> u64| recvs.iter().map(f).sum::<u64>();
    let (sent, acked, dup_acks) = (sum_s(|s| s.sent), sum_s(|s| s.acked), sum_s(|s| s.dup_acks));
    let delivered = sum_r(|r| r.delivered);
    let dup = sum_r(|r| r.dup);
    let lost: u64 = sends
        .iter()
        .zip(recvs)
        .map(|(s, r)| s.acked_bits.missing_from(&r.bits))
        .sum();
    let (reordered, misrouted, gaps) = (
        sum_r(|r| r.reordered),
        sum_r(|r| r.misrouted),
        sum_r(|r| r.seq_gaps),
    );
    let dual = a.transport == "dual";
    let (second_acks, dual_copies, unique) = (
        sum_s(|s| s.second_acks),
        sum_r(|r| r.dual_copies),
        sum_r(|r| r.unique),
    );
    let mut ev = Events::default();
    for e in sends
        .iter()
        .map(|s| &s.events)
        .chain(recvs.iter().map(|r| &r.events))
    {
        ev.add(Events {
            first: e.first.clone(),
            ..*e
        });
    }
    let last = recvs.iter().filter_map(|r| r.last_delivery).max();
    let span = last.map_or(Duration::ZERO, |l| l.duration_since(sh.t0));
    let per_s = if span.is_zero() {
        0.0
    } else {
        delivered as f64 / span.as_secs_f64()
    };
    let h = sh.latency_ns.borrow();
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1e3;
    let (p50, p99, p999, max) = (q(0.5), q(0.99), q(0.999), h.max() as f64 / 1e3);
    let ah = sh.ack_latency_ns.borrow();
    let aq = |p: f64| ah.value_at_quantile(p) as f64 / 1e3;
    let (ack_p50, ack_p99, ack_max) = (aq(0.5), aq(0.99), ah.max() as f64 / 1e3);
    let per_msg = |d: Duration| {
        if delivered == 0 {
            0.0
        } else {
            d.as_secs_f64() * 1e6 / delivered as f64
        }
    };

    println!(
        "sent {sent}  acked {acked}  delivered {delivered}  (sent but unacked {}, duplicate SendAcks {dup_acks})",
        sent - acked
    );
    println!(
        "throughput  {per_s:.0} delivered msgs/s ({delivered} in {:.2} s)",
        span.as_secs_f64()
    );
    println!(
        "latency     p50 {} p99 {} p99.9 {} max {}  (send to receipt, {} samples)",
        fmt_us(p50),
        fmt_us(p99),
        fmt_us(p999),
        fmt_us(max),
        h.len()
    );
    println!(
        "sendack     p50 {} p99 {} max {}  (Send written to SendAck read, {} samples)",
        fmt_us(ack_p50),
        fmt_us(ack_p99),
        fmt_us(ack_max),
        ah.len()
    );
    println!(
        "integrity   lost {lost}  duplicated {dup}  reordered {reordered}  misrouted {misrouted}  server-seq gaps {gaps}"
    );
    println!(
        "events      SyncNeeded {}  Error {}  Kick {}  unexpected {}{}",
        ev.sync_needed,
        ev.errors,
        ev.kicks,
        ev.unexpected,
        ev.first
            .as_deref()
            .map(|f| format!("  first: {f}"))
            .unwrap_or_default()
    );
    if dual {
        let first_on = |p: usize| recvs.iter().map(|r| r.first_on[p]).sum::<u64>();
        println!(
            "dual        second-path SendAcks {second_acks} of {acked} ({} missing)  second copies {dual_copies} of {unique} messages ({} missing)  first copy on tcp {} / quic {}",
            acked.saturating_sub(second_acks),
            unique.saturating_sub(dual_copies),
            first_on(0),
            first_on(1),
        );
    }
    let mut gw_cpu = None;
    if let Some((g0, g1)) = &gw {
        let cpu = g1.cpu.saturating_sub(g0.cpu);
        gw_cpu = Some(per_msg(cpu));
        let wall = last
            .unwrap_or(sh.t0)
            .duration_since(sh.t0)
            .as_secs_f64()
            .max(1e-9);
        println!(
            "gateway     cpu {:.2} s = {:.2} us/msg ({:.0}% of one core over the run), rss {} MiB",
            cpu.as_secs_f64(),
            per_msg(cpu),
            cpu.as_secs_f64() / wall * 100.0,
            g1.rss_kib / 1024
        );
        let threads: Vec<String> = g1
            .threads
            .iter()
            .map(|(name, t)| {
                let d = t.saturating_sub(g0.threads.get(name).copied().unwrap_or_default());
                (name, d)
            })
            .filter(|(_, d)| !d.is_zero())
            .map(|(name, d)| format!("{name} {:.2}", per_msg(d)))
            .collect();
        println!("            us/msg by thread: {}", threads.join(", "));
        let d =
            |f: fn(&ProcSnap) -> u64| f(g1).saturating_sub(f(g0)) as f64 / delivered.max(1) as f64;
        println!(
            "            per msg: {:.3} read syscalls, {:.3} write syscalls, {:.0} bytes to disk, {:.3} context switches",
            d(|s| s.syscr),
            d(|s| s.syscw),
            d(|s| s.write_bytes),
            d(|s| s.ctx_switches),
        );
    }
    println!(
        "generator   cpu {:.2} s = {:.2} us/msg",
        gen_cpu.as_secs_f64(),
        per_msg(gen_cpu)
    );
    let udp_per_s = if span.is_zero() {
        0.0
    } else {
        udp_sent as f64 / span.as_secs_f64()
    };
    if a.transport != "tcp" {
        println!(
            "udp         {udp_sent} datagrams sent by client and server ({udp_per_s:.0}/s, {:.2} per message; whole machine)",
            if delivered == 0 {
                0.0
            } else {
                udp_sent as f64 / delivered as f64
            }
        );
    }
    let healthy = lost == 0 && dup == 0;
    println!(
        "RESULT workload=pairs transport={} udp_datagrams_per_s={udp_per_s:.0} label={} pairs={} rate={} window={} payload={} duration_s={:.1} sent={sent} acked={acked} delivered={delivered} delivered_per_s={per_s:.0} p50_us={p50:.0} p99_us={p99:.0} p999_us={p999:.0} max_us={max:.0} ack_p50_us={ack_p50:.0} ack_p99_us={ack_p99:.0} ack_max_us={ack_max:.0} lost={lost} dup={dup} reordered={reordered} sync_needed={} errors={} cpu_us_per_msg={} gen_cpu_us_per_msg={:.2}{}",
        a.transport,
        if a.label.is_empty() { "-" } else { &a.label },
        a.pairs,
        a.rate,
        a.window,
        a.payload,
        a.duration.as_secs_f64(),
        ev.sync_needed,
        ev.errors + ev.kicks,
        gw_cpu.map_or("-".into(), |c| format!("{c:.2}")),
        per_msg(gen_cpu),
        if dual {
            format!(" second_acks={second_acks} dual_copies={dual_copies}")
        } else {
            String::new()
        },
    );
    if !healthy {
        eprintln!("tern-load: {lost} lost and {dup} duplicated messages");
    }
    healthy
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_path_counts_every_repeat() {
        let (mut seen, mut none) = (Bits::default(), Vec::new());
        assert_eq!(arrival(&mut seen, &mut none, 0, 5), Arrival::First);
        assert_eq!(arrival(&mut seen, &mut none, 0, 5), Arrival::Repeat);
        assert_eq!(arrival(&mut seen, &mut none, 0, 500), Arrival::First);
    }

    #[test]
    fn two_paths_expect_one_copy_each() {
        let mut seen = Bits::default();
        let mut paths = vec![Bits::default(), Bits::default()];
        // Either path may come first; the other's copy is the expected second one.
        assert_eq!(arrival(&mut seen, &mut paths, 0, 1), Arrival::First);
        assert_eq!(arrival(&mut seen, &mut paths, 1, 1), Arrival::Second);
        assert_eq!(arrival(&mut seen, &mut paths, 1, 2), Arrival::First);
        assert_eq!(arrival(&mut seen, &mut paths, 0, 2), Arrival::Second);
        // A copy twice on one path is a duplicate, before or after the other path's.
        assert_eq!(arrival(&mut seen, &mut paths, 0, 3), Arrival::First);
        assert_eq!(arrival(&mut seen, &mut paths, 0, 3), Arrival::Repeat);
        assert_eq!(arrival(&mut seen, &mut paths, 1, 3), Arrival::Second);
        assert_eq!(arrival(&mut seen, &mut paths, 1, 1), Arrival::Repeat);
        assert_eq!(seen.missing_from(&paths[0]), 0);
        assert_eq!(seen.missing_from(&paths[1]), 0);
    }
}
