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

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
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

/// What every member's reader adds to.
struct Shared {
    t0: Instant,
    hist: RefCell<Histogram<u64>>,
    received: Cell<u64>,
    dup: Cell<u64>,
    last_delivery: Cell<Option<Instant>>,
    errors: Cell<u64>,
    /// Members that got the warm-up message.
    warm: Cell<u64>,
}

impl Shared {
    fn ns(&self, at: Instant) -> u64 {
        at.duration_since(self.t0).as_nanos() as u64
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
                    op: Some(room_request::Op::Enter(EnterRoom {})),
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

    let shared = Rc::new(Shared {
        t0: Instant::now(),
        hist: RefCell::new(
            Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static bounds"),
        ),
        received: Cell::new(0),
        dup: Cell::new(0),
        last_delivery: Cell::new(None),
        errors: Cell::new(0),
        warm: Cell::new(0),
    });
    let stop = Rc::new(Cell::new(false));
    let mut readers = Vec::with_capacity(conns.len());
    for c in conns {
        readers.push(spawn_local(member(
            c,
            shared.clone(),
            stop.clone(),
            a.ack_every,
        )));
    }

    warm_up(&mut sender, &a, &group, &prefix, &shared).await?;

    let gw0 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let cpu0 = sys::self_cpu();
    let send_start = Instant::now();
    let sent = send(&mut sender, &a, &group, &prefix, &shared).await?;
    let send_time = send_start.elapsed();
    let expected = sent * u64::from(a.members - 1);
    let deadline = Instant::now() + a.drain;
    while shared.received.get() + shared.dup.get() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gw1 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let gen_cpu = sys::self_cpu() - cpu0;
    stop.set(true);
    drop(sender);
    for r in readers {
        r.abort();
    }

    let received = shared.received.get();
    let lost = expected.saturating_sub(received);
    let span = shared
        .last_delivery
        .get()
        .map_or(send_time, |t| t.duration_since(send_start))
        .max(send_time);
    let per_s = received as f64 / span.as_secs_f64();
    let h = shared.hist.borrow();
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
        shared.dup.get(),
        shared.errors.get(),
        q(0.5),
        q(0.99),
        h.max() as f64 / 1e6,
        gen_cpu.as_secs_f64() * 1e6 / received.max(1) as f64,
    );
    Ok((a.room || lost == 0) && shared.dup.get() == 0 && shared.errors.get() == 0)
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
        let n = tokio::time::timeout(login::LOGIN_TIMEOUT, c.stream.read_buf(&mut c.rbuf))
            .await
            .map_err(|_| "no answer to a group request".to_string())?
            .map_err(|e| format!("group request: {e}"))?;
        if n == 0 {
            return Err("connection closed during a group request".into());
        }
    }
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
    while shared.warm.get() < want {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} of {want} members got the warm-up message within 30 s",
                shared.warm.get()
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
        let n = tokio::time::timeout(login::LOGIN_TIMEOUT, c.stream.read_buf(&mut c.rbuf))
            .await
            .map_err(|_| "no SendAck for the warm-up message".to_string())?
            .map_err(|e| format!("warm-up: {e}"))?;
        if n == 0 {
            return Err("the sender's connection closed during the warm-up".into());
        }
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
            shared.errors.set(shared.errors.get() + errors);
            return Err(format!("{errors} Sends refused"));
        }
    }
}

/// One member: reads deliveries, records latency and acks.
async fn member(mut c: Conn, shared: Rc<Shared>, stop: Rc<Cell<bool>>, ack_every: u64) {
    let mut last_seq = 0u64;
    let mut since_ack = 0u64;
    let mut ack_out = BytesMut::new();
    let mut codec = Codec::new(MAX_FRAME);
    while !stop.get() {
        match c.stream.read_buf(&mut c.rbuf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let now = Instant::now();
        let now_ns = shared.ns(now);
        let mut latest = None;
        let result = wire::for_each_frame(&c.rbuf, |body| {
            if let Scanned::Deliver {
                conversation_id,
                seq,
                payload,
            } = wire::scan(body)?
            {
                latest = Some((conversation_id, seq));
                let stamp = Stamp::parse(payload);
                if stamp.as_ref().is_some_and(|st| st.pair == WARM) {
                    shared.warm.set(shared.warm.get() + 1);
                }
                if let Some(st) = stamp
                    && st.pair == MAGIC
                {
                    if st.seq <= last_seq {
                        shared.dup.set(shared.dup.get() + 1);
                    } else {
                        last_seq = st.seq;
                        shared.received.set(shared.received.get() + 1);
                        shared
                            .hist
                            .borrow_mut()
                            .saturating_record(now_ns.saturating_sub(st.ts_ns).max(1));
                    }
                    since_ack += 1;
                }
            }
            Ok(())
        });
        let Ok(used) = result else {
            shared.errors.set(shared.errors.get() + 1);
            return;
        };
        let _ = c.rbuf.split_to(used);
        shared.last_delivery.set(Some(now));
        if since_ack >= ack_every
            && let Some((conversation_id, seq)) = latest
        {
            since_ack = 0;
            ack_out.clear();
            let ack = Frame::new(
                0,
                Ack {
                    conversation_id,
                    seq,
                },
            );
            if codec.encode(&ack, &mut ack_out).is_err()
                || c.stream.write_all(&ack_out).await.is_err()
            {
                return;
            }
        }
    }
}
