//! `fanout`: one group with K online members, one of them sending. Reports deliveries per
//! second, end-to-end latency of every delivery, lost and duplicated deliveries, and the
//! gateway's CPU time per delivery.
//!
//! With `--room`, a live room instead: every connection enters the room and the sender sends to
//! it. A viewer that falls behind misses room messages by design, so missing deliveries are
//! reported (`lost`) but do not fail the run; duplicates do.
//!
//! The sender creates the group (a fresh id per run) with the other members, inviting them in
//! chunks of 500, then pipelines Sends with at most `window` unanswered (or paces them at
//! `rate`). Every other member reads in batches, stamps each batch with one clock read, counts
//! the load messages (group events are told apart by the payload's magic number) and acks every
//! `ack_every` messages.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use tern_protocol::v1::group_request::Op;
use tern_protocol::v1::{CreateGroup, EnterRoom, InviteMembers, room_request};
use tern_protocol::{
    Ack, Body, Codec, Frame, GroupRequest, RoomRequest, Target, TargetKind, decode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::spawn_local;

use crate::login::{self, Conn, parse_duration};
use crate::sys::{self, ProcSnap};
use crate::token::Minter;
use crate::wire::{self, MAX_FRAME, RID_BASE, Scanned, SendTemplate, Stamp};

/// The `pair` field of every load message's stamp: group events never carry it.
const MAGIC: u32 = 0xFA17_0001;
/// The stamp of the warm-up message, sent before the clock starts.
const WARM: u32 = 0xFA17_0002;
/// Users per CreateGroup / InviteMembers.
const CHUNK: usize = 500;

/// Options of `tern-load fanout`.
#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    /// Gateway TCP address (loopback only).
    #[arg(long, default_value = "127.0.0.1:7600")]
    server: SocketAddr,
    /// The gateway's data directory, to read its token secret.
    #[arg(long)]
    data_dir: PathBuf,
    /// Online members of the group, the sender included.
    #[arg(long, default_value_t = 1000)]
    members: u32,
    /// How long the sender sends.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Sends per second; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Most unanswered Sends.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Payload bytes per message (at least 20).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Each member acks every this many messages.
    #[arg(long, default_value_t = 64)]
    ack_every: u64,
    /// Threads reading the members' connections, each through its own epoll set (member i
    /// goes to thread i mod n); 0 = one per CPU. One thread keeps the generator's CPU per
    /// delivery lowest; more read in parallel, as members on other machines would.
    #[arg(long, default_value_t = 1)]
    readers: usize,
    /// Microseconds each reader thread waits after a round of reads before it looks for more
    /// (0: none). Readiness gathers meanwhile: one `epoll_wait` returns more members, and a
    /// delivery wakes no sleeping reader. The wait counts in the measured latency.
    #[arg(long, default_value_t = 0)]
    read_pause_us: u64,
    /// How long to wait for outstanding deliveries after the last Send.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain: Duration,
    /// The gateway's process id, for its CPU time per delivery.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Logins in flight while connecting the members.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Free text copied into the RESULT line.
    #[arg(long, default_value = "")]
    label: String,
    /// A live room instead of a group.
    #[arg(long)]
    room: bool,
    /// With `--room`: every this-many-th message is a priority message (0: none).
    #[arg(long, default_value_t = 0)]
    priority_every: u64,
}

/// What the members' reader threads report, read by the sender's thread.
struct Shared {
    t0: Instant,
    received: AtomicU64,
    dup: AtomicU64,
    errors: AtomicU64,
    /// Members that got the warm-up message.
    warm: AtomicU64,
    /// Nanoseconds from `t0` to the latest read that brought deliveries (0: none yet).
    last_delivery_ns: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn ns(&self, at: Instant) -> u64 {
        at.duration_since(self.t0).as_nanos() as u64
    }

    fn get(n: &AtomicU64) -> u64 {
        n.load(Ordering::Relaxed)
    }
}

pub async fn run(a: FanoutArgs) -> Result<bool, String> {
    if !a.server.ip().is_loopback() {
        return Err(format!("{}: tern-load only talks to loopback", a.server));
    }
    if a.members < 2 {
        return Err("--members must be at least 2".into());
    }
    let minter = Rc::new(Minter::from_data_dir(&a.data_dir)?);
    let prefix = login::run_prefix();
    let group = format!("{prefix}-fanout");
    let names: Vec<String> = (0..a.members).map(|i| format!("{prefix}-m{i}")).collect();

    // Connect every member, a bounded number at a time.
    let t_login = Instant::now();
    let sem = Rc::new(tokio::sync::Semaphore::new(a.connect_concurrency.max(1)));
    let mut logins = Vec::with_capacity(names.len());
    let room = a.room.then(|| group.clone());
    for name in &names {
        let (sem, minter, name, server) = (sem.clone(), minter.clone(), name.clone(), a.server);
        let room = room.clone();
        logins.push(spawn_local(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            let mut c = login::connect(server, None, minter.mint(&name), "load").await?;
            let mut conv = 0;
            if let Some(room) = room {
                let enter = Body::Room(RoomRequest {
                    room_id: room,
                    op: Some(room_request::Op::Enter(EnterRoom::default())),
                });
                if let Body::RoomResponse(r) = request(&mut c, 2, enter).await? {
                    conv = r.conversation_id;
                }
            }
            Ok::<(Conn, u64), String>((c, conv))
        }));
    }
    let mut conns = Vec::with_capacity(logins.len());
    let mut conv = 0;
    for l in logins {
        let (c, room_conv) = l.await.map_err(|e| e.to_string())??;
        conv = room_conv;
        conns.push(c);
    }
    eprintln!(
        "fanout: {} members logged in in {:.1}s",
        conns.len(),
        t_login.elapsed().as_secs_f64()
    );
    let mut sender = conns.remove(0);

    // Create the group and invite the rest.
    let others = &names[1..];
    for (i, chunk) in others.chunks(CHUNK).enumerate().filter(|_| !a.room) {
        let users: Vec<String> = chunk.to_vec();
        let op = if i == 0 {
            Op::Create(CreateGroup {
                profile: None,
                members: users,
            })
        } else {
            Op::Invite(InviteMembers { user_ids: users })
        };
        let body = Body::Group(GroupRequest {
            group_id: group.clone(),
            op: Some(op),
        });
        if let Body::GroupResponse(r) = request(&mut sender, i as u64 + 10, body).await? {
            conv = r.conversation_id;
        }
    }

    let shared = Arc::new(Shared {
        t0: Instant::now(),
        received: AtomicU64::new(0),
        dup: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        warm: AtomicU64::new(0),
        last_delivery_ns: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let readers = match a.readers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
    .min(conns.len().max(1));
    // Round robin, so that the gateway's delivery order does not favour one reader.
    let mut groups: Vec<Vec<Member>> = (0..readers).map(|_| Vec::new()).collect();
    for (i, c) in conns.into_iter().enumerate() {
        let tcp = c
            .stream
            .into_tcp()
            .ok_or("fanout members connect over TCP")?;
        let std = tcp.into_std().map_err(|e| format!("member socket: {e}"))?;
        groups[i % readers].push(Member::new(
            mio::net::TcpStream::from_std(std),
            c.rbuf.to_vec(),
        ));
    }
    let mut reader_threads = Vec::with_capacity(readers);
    for (i, members) in groups.into_iter().enumerate() {
        let (shared, ack_every) = (shared.clone(), a.ack_every);
        let pause = Duration::from_micros(a.read_pause_us);
        let thread = std::thread::Builder::new()
            .name(format!("fanout-members-{i}"))
            .spawn(move || read_members(members, &shared, ack_every, pause))
            .map_err(|e| format!("reader thread: {e}"))?;
        reader_threads.push(thread);
    }

    warm_up(&mut sender, &a, &group, &prefix, &shared).await?;

    let gw0 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let cpu0 = sys::self_cpu();
    let send_start = Instant::now();
    let sent = send(&mut sender, &a, &group, &prefix, &shared).await?;
    let send_time = send_start.elapsed();
    let expected = sent * u64::from(a.members - 1);
    let deadline = Instant::now() + a.drain;
    while Shared::get(&shared.received) + Shared::get(&shared.dup) < expected
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gw1 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let gen_cpu = sys::self_cpu() - cpu0;
    shared.stop.store(true, Ordering::Relaxed);
    drop(sender);
    let mut h = wire::latency_histogram();
    for thread in reader_threads {
        let part = thread
            .join()
            .map_err(|_| "a members' reader panicked".to_string())??;
        h.add(part).map_err(|e| format!("latency histogram: {e}"))?;
    }

    let received = Shared::get(&shared.received);
    let lost = expected.saturating_sub(received);
    let last = Shared::get(&shared.last_delivery_ns);
    let span = if last == 0 {
        send_time
    } else {
        (shared.t0 + Duration::from_nanos(last))
            .saturating_duration_since(send_start)
            .max(send_time)
    };
    let per_s = received as f64 / span.as_secs_f64();
    let q = |p: f64| h.value_at_quantile(p) as f64 / 1e6;
    let gw_cpu = match (gw0, gw1) {
        (Some(x), Some(y)) if received > 0 => format!(
            "{:.3}",
            (y.cpu - x.cpu).as_secs_f64() * 1e6 / received as f64
        ),
        _ => "n/a".into(),
    };
    println!(
        "RESULT workload={} label={} members={} rate={} window={} payload={} duration_s={:.1} conversation={conv} sent={sent} expected={expected} delivered={received} lost={lost} dup={} errors={} deliveries_per_s={per_s:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} gateway_cpu_us_per_delivery={gw_cpu} gen_cpu_us_per_delivery={:.3}",
        if a.room { "room" } else { "fanout" },
        a.label,
        a.members,
        a.rate,
        a.window,
        a.payload,
        send_time.as_secs_f64(),
        Shared::get(&shared.dup),
        Shared::get(&shared.errors),
        q(0.5),
        q(0.99),
        h.max() as f64 / 1e6,
        gen_cpu.as_secs_f64() * 1e6 / received.max(1) as f64,
    );
    Ok((a.room || lost == 0) && Shared::get(&shared.dup) == 0 && Shared::get(&shared.errors) == 0)
}

/// Sends one request on `c` and waits for its answer (an Error answer is an error).
async fn request(c: &mut Conn, rid: u64, body: Body) -> Result<Body, String> {
    let frame = Frame::new(rid, body);
    let mut out = BytesMut::new();
    Codec::new(MAX_FRAME)
        .encode(&frame, &mut out)
        .map_err(|e| e.to_string())?;
    c.stream
        .write_all(&out)
        .await
        .map_err(|e| format!("group request: {e}"))?;
    let mut codec = Codec::new(MAX_FRAME);
    loop {
        while let Some(f) = codec.decode(&mut c.rbuf).map_err(|e| e.to_string())? {
            match f.body {
                Some(Body::Error(e)) if f.request_id == rid => {
                    return Err(format!("request refused: {} {}", e.code, e.message));
                }
                Some(body) if f.request_id == rid => return Ok(body),
                _ => {}
            }
        }
        read_more(c, "a group request").await?;
    }
}

/// Reads more of `c` into its buffer, waiting at most the login timeout for `what`'s answer.
async fn read_more(c: &mut Conn, what: &str) -> Result<(), String> {
    let n = tokio::time::timeout(login::LOGIN_TIMEOUT, c.stream.read_buf(&mut c.rbuf))
        .await
        .map_err(|_| format!("no answer to {what}"))?
        .map_err(|e| format!("{what}: {e}"))?;
    if n == 0 {
        return Err(format!("the connection closed during {what}"));
    }
    Ok(())
}

/// Sends one message that is not counted and waits until every member got it, so that the
/// clock starts with nothing queued: the membership events of the invitations (one per chunk,
/// each to every member invited so far) or the room entries are delivered by then.
async fn warm_up(
    c: &mut Conn,
    a: &FanoutArgs,
    group: &str,
    prefix: &str,
    shared: &Shared,
) -> Result<(), String> {
    let target = if a.room {
        Target::new(TargetKind::Room, group)
    } else {
        Target::group(group)
    };
    let mut out = Vec::new();
    SendTemplate::to_target(WARM, &format!("{prefix}-w"), target, a.payload, a.room)
        .write(&mut out, 1, 0);
    c.stream
        .write_all(&out)
        .await
        .map_err(|e| format!("warm-up send: {e}"))?;
    let want = u64::from(a.members - 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Shared::get(&shared.warm) < want {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {want} members got the warm-up message within 30 s",
                Shared::get(&shared.warm)
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Its SendAck (or refusal) is in the sender's buffer by now.
    loop {
        let mut answer = None;
        let used = wire::for_each_frame(&c.rbuf, |body| {
            match wire::scan(body)? {
                Scanned::SendAck { request_id } if request_id == RID_BASE | 1 => {
                    answer = Some(true);
                }
                Scanned::Other(_) => {
                    if let Ok(Frame {
                        request_id,
                        body: Some(Body::Error(_)),
                    }) = decode_frame(bytes::Bytes::copy_from_slice(body))
                        && request_id == RID_BASE | 1
                    {
                        answer = Some(false);
                    }
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(|e| e.0)?;
        let _ = c.rbuf.split_to(used);
        match answer {
            Some(true) => return Ok(()),
            Some(false) => return Err("the warm-up message was refused".into()),
            None => {}
        }
        read_more(c, "the warm-up message").await?;
    }
}

/// Sends for the run's duration; returns how many Sends were acknowledged.
async fn send(
    c: &mut Conn,
    a: &FanoutArgs,
    group: &str,
    prefix: &str,
    shared: &Shared,
) -> Result<u64, String> {
    let target = if a.room {
        Target::new(TargetKind::Room, group)
    } else {
        Target::group(group)
    };
    let template = SendTemplate::to_target(
        MAGIC,
        &format!("{prefix}-f"),
        target.clone(),
        a.payload,
        false,
    );
    let priority = (a.room && a.priority_every > 0)
        .then(|| SendTemplate::to_target(MAGIC, &format!("{prefix}-p"), target, a.payload, true));
    let interval = (a.rate > 0).then(|| Duration::from_secs_f64(1.0 / a.rate as f64));
    let start = Instant::now();
    let end = start + a.duration;
    let (mut next_seq, mut acked) = (1u64, 0u64);
    let mut out = Vec::with_capacity(64 << 10);
    loop {
        let now = Instant::now();
        let sending = now < end;
        if !sending && acked + 1 == next_seq {
            return Ok(acked);
        }
        out.clear();
        while sending && next_seq - 1 - acked < a.window {
            if let Some(iv) = interval
                && start + iv.mul_f64((next_seq - 1) as f64) > now
            {
                break;
            }
            match &priority {
                Some(p) if next_seq % a.priority_every == 0 => {
                    p.write(&mut out, next_seq, shared.ns(now));
                }
                _ => template.write(&mut out, next_seq, shared.ns(now)),
            }
            next_seq += 1;
        }
        if !out.is_empty() {
            c.stream
                .write_all(&out)
                .await
                .map_err(|e| format!("send: {e}"))?;
        }
        let wait = match interval {
            Some(iv) if sending && next_seq - 1 - acked < a.window => {
                (start + iv.mul_f64((next_seq - 1) as f64)).saturating_duration_since(now)
            }
            _ => Duration::from_secs(5),
        };
        match tokio::time::timeout(wait, c.stream.read_buf(&mut c.rbuf)).await {
            Err(_) if interval.is_some() && sending => continue,
            Err(_) => return Err("no SendAck within 5 s".into()),
            Ok(Ok(0)) => return Err("the sender's connection closed".into()),
            Ok(Err(e)) => return Err(format!("sender read: {e}")),
            Ok(Ok(_)) => {}
        }
        let mut errors = 0;
        let used = wire::for_each_frame(&c.rbuf, |body| {
            match wire::scan(body)? {
                Scanned::SendAck { request_id } if request_id & RID_BASE != 0 => acked += 1,
                Scanned::Other(_) => {
                    if let Ok(Frame {
                        body: Some(Body::Error(_)),
                        ..
                    }) = decode_frame(bytes::Bytes::copy_from_slice(body))
                    {
                        errors += 1;
                    }
                }
                _ => {}
            }
            Ok(())
        })
        .map_err(|e| e.0)?;
        let _ = c.rbuf.split_to(used);
        if errors > 0 {
            shared.errors.fetch_add(errors, Ordering::Relaxed);
            return Err(format!("{errors} Sends refused"));
        }
    }
}

/// One member's connection, on the reader thread.
struct Member {
    stream: mio::net::TcpStream,
    /// The start of a frame that has not all arrived yet.
    partial: Vec<u8>,
    last_seq: u64,
    since_ack: u64,
    alive: bool,
}

impl Member {
    fn new(stream: mio::net::TcpStream, partial: Vec<u8>) -> Member {
        Member {
            stream,
            partial,
            last_seq: 0,
            since_ack: 0,
            alive: true,
        }
    }
}

/// Delivery counts of one reader, added to [`Shared`] once per batch of readiness events so
/// that the reader threads do not contend for its counters on every delivery.
#[derive(Default)]
struct Counts {
    received: u64,
    dup: u64,
    warm: u64,
    last_ns: u64,
}

impl Counts {
    fn publish(&mut self, shared: &Shared) {
        for (local, total) in [
            (self.received, &shared.received),
            (self.dup, &shared.dup),
            (self.warm, &shared.warm),
        ] {
            if local > 0 {
                total.fetch_add(local, Ordering::Relaxed);
            }
        }
        if self.last_ns > 0 {
            shared
                .last_delivery_ns
                .fetch_max(self.last_ns, Ordering::Relaxed);
        }
        *self = Counts::default();
    }
}

/// Reads its share of the members' connections on one thread, through epoll (mio): one `recv`
/// per readiness event into a shared buffer (a short read means the socket is drained; more
/// data raises a new event), so that the generator's cost per delivery stays small next to the
/// gateway's on the same cores. Records each delivery's latency, counts, and acks every
/// `ack_every` messages, and waits `pause` after each round that read something. Returns the
/// latency histogram once `shared.stop` is set.
fn read_members(
    mut members: Vec<Member>,
    shared: &Shared,
    ack_every: u64,
    pause: Duration,
) -> Result<Histogram<u64>, String> {
    let mut hist = wire::latency_histogram();
    let mut counts = Counts::default();
    let mut poll = mio::Poll::new().map_err(|e| format!("epoll: {e}"))?;
    for (i, m) in members.iter_mut().enumerate() {
        poll.registry()
            .register(&mut m.stream, mio::Token(i), mio::Interest::READABLE)
            .map_err(|e| format!("epoll register: {e}"))?;
    }
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 256 << 10];
    let mut ack_out = BytesMut::new();
    let mut codec = Codec::new(MAX_FRAME);
    while !shared.stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(20))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll wait: {e}")),
        }
        for event in &events {
            let m = &mut members[event.token().0];
            while m.alive {
                let kept = m.partial.len();
                if buf.len() < kept + (64 << 10) {
                    buf.resize(kept + (64 << 10), 0);
                }
                buf[..kept].copy_from_slice(&m.partial);
                let n = match m.stream.read(&mut buf[kept..]) {
                    Ok(0) => {
                        m.alive = false;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        m.alive = false;
                        break;
                    }
                };
                let now_ns = shared.ns(Instant::now());
                // mio asks for reads until WouldBlock. A short read from a TCP socket took
                // everything queued, and every segment queued after it raises a new edge, so
                // stopping here loses nothing and saves a `recv` per delivery.
                let drained = kept + n < buf.len();
                let mut latest = None;
                let result = wire::for_each_frame(&buf[..kept + n], |body| {
                    if let Scanned::Deliver {
                        conversation_id,
                        seq,
                        payload,
                    } = wire::scan(body)?
                    {
                        latest = Some((conversation_id, seq));
                        let stamp = Stamp::parse(payload);
                        if stamp.as_ref().is_some_and(|st| st.pair == WARM) {
                            counts.warm += 1;
                        }
                        if let Some(st) = stamp
                            && st.pair == MAGIC
                        {
                            if st.seq <= m.last_seq {
                                counts.dup += 1;
                            } else {
                                m.last_seq = st.seq;
                                counts.received += 1;
                                hist.saturating_record(now_ns.saturating_sub(st.ts_ns).max(1));
                            }
                            m.since_ack += 1;
                        }
                    }
                    Ok(())
                });
                let Ok(used) = result else {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    m.alive = false;
                    break;
                };
                m.partial.clear();
                m.partial.extend_from_slice(&buf[used..kept + n]);
                counts.last_ns = now_ns;
                if m.since_ack >= ack_every
                    && let Some((conversation_id, seq)) = latest
                {
                    m.since_ack = 0;
                    ack_out.clear();
                    let ack = Frame::new(
                        0,
                        Ack {
                            conversation_id,
                            seq,
                        },
                    );
                    // A few bytes on an idle socket: written whole, or the member is dropped
                    // (counted) rather than left with a torn frame.
                    let written = codec
                        .encode(&ack, &mut ack_out)
                        .ok()
                        .and_then(|()| m.stream.write(&ack_out).ok());
                    if written != Some(ack_out.len()) {
                        shared.errors.fetch_add(1, Ordering::Relaxed);
                        m.alive = false;
                    }
                }
                if drained {
                    break;
                }
            }
        }
        counts.publish(shared);
        if !pause.is_zero() && !events.is_empty() {
            std::thread::sleep(pause);
        }
    }
    Ok(hist)
}
