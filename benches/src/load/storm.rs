//! `conns --storm`: a reconnect storm.
//!
//! The workers (`--child --storm`, one per `--procs`) open their share of the C idle connections
//! as `conns` does; before they report READY, every `--message-every`th user receives one
//! message from the next user over those connections (SendAck awaited, the Deliver left unread
//! and unacknowledged). After the hold the parent writes `DROP <unix µs>` to every worker at
//! once; each closes all its connections, and every client then reconnects on its own: a random
//! delay over `--jitter` (full jitter), then attempts until its sync completes, each failure
//! followed by an exponential backoff with jitter ([`backoff`]), all within `--storm-timeout`.
//! An attempt logs in with `sync_on_login` and `sync_version` 0 and waits for SyncDone; the
//! sync must hold exactly the message the user was sent, if any, from its sender. Recovered
//! connections stay open until the parent ends the run.
//!
//! The parent samples the gateway's VmRSS every 100 ms from just before the drop until every
//! worker has reported, and reports the time from the drop until 50 %, 99 % and 100 % of the
//! clients completed their sync, failed attempts by cause, and clients that never recovered.
//!
//! Worker → parent lines: `READY ...`, then after the storm `ERR <cause> <count> <example>`
//! lines and one `STORM ... times=ms,ms,...` line, and `CLOSED alive=N` at the end.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, ChildStdout};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tern_protocol::{Body, Codec, ContentType, ErrorCode, Frame, Send, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::spawn_local;

use crate::conns::{self, ConnsArgs, DEVICE, field, source_ip, user_id};
use crate::login::{self, HELLO_REQUEST_ID};
use crate::sys::{self, ProcSnap};
use crate::token::Minter;
use crate::wire::MAX_FRAME;

/// First retry ceiling; doubles per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Largest retry ceiling.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// One attempt (connect, login, whole sync) longer than this counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// A pre-storm Send without SendAck within this long counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Request id of the pre-storm Send (the Hello has [`HELLO_REQUEST_ID`]).
const SEND_REQUEST_ID: u64 = 2;
/// How often the parent samples the gateway's memory during the storm.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// A small deterministic generator (splitmix64): enough for jitter, no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max)`; zero if `max` is zero.
    pub fn below(&mut self, max: Duration) -> Duration {
        let ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        if ns == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % ns)
    }
}

/// The backoff ceiling after `failures` failed attempts (1 or more): [`BACKOFF_INITIAL`] ×
/// 2^(failures−1), at most [`BACKOFF_MAX`].
pub fn backoff_ceiling(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    BACKOFF_INITIAL
        .saturating_mul(1 << doublings)
        .min(BACKOFF_MAX)
}

/// The wait after `failures` failed attempts: "equal jitter", half the ceiling plus a uniform
/// random part of the other half, so retries back off for certain and still spread out.
pub fn backoff(failures: u32, rng: &mut Rng) -> Duration {
    let ceiling = backoff_ceiling(failures);
    let half = ceiling / 2;
    half + rng.below(ceiling - half)
}

/// The cause of a failed attempt, from its error text, for counting: the name of the error code
/// the gateway answered with, or a kind of socket failure.
pub fn cause(error: &str) -> &'static str {
    let code = ["login refused: code ", "sync: error code "]
        .iter()
        .find_map(|p| error.split_once(p))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<i32>().ok());
    if let Some(code) = code {
        return ErrorCode::try_from(code).map_or("unknown_error_code", |c| c.as_str_name());
    }
    let e = error.to_ascii_lowercase();
    if e.contains("connection refused") {
        "refused"
    } else if e.contains("reset by peer") {
        "reset"
    } else if e.contains("no hellook within") {
        "hellook_timeout"
    } else if e.contains("no syncdone within") {
        "syncdone_timeout"
    } else if e.contains("kicked") {
        "kicked"
    } else if e.contains("server closed") {
        "closed"
    } else if e.contains("cannot assign requested address") || e.contains("address already in use")
    {
        "no_local_port"
    } else if e.contains("too many open files") {
        "no_file_descriptor"
    } else {
        "other"
    }
}

/// Whether a client's sync holds what it should: from other users, exactly the one message of
/// `expect_from` if it was sent one, nothing otherwise. Its own messages (the sender's copy of
/// what it sent) do not count.
pub fn sync_matches(me: &str, expect_from: Option<&str>, senders: &[String]) -> bool {
    let mut others = senders.iter().map(String::as_str).filter(|s| *s != me);
    match expect_from {
        Some(from) => others.next() == Some(from) && others.next().is_none(),
        None => others.next().is_none(),
    }
}

/// The `p`-quantile (0 < p <= 1) of the completion times of `clients` clients, `sorted`
/// ascending holding those that completed: `None` if fewer than that share completed.
pub fn quantile(sorted: &[u64], clients: usize, p: f64) -> Option<u64> {
    if clients == 0 {
        return None;
    }
    let rank = ((p * clients as f64).ceil() as usize).clamp(1, clients);
    sorted.get(rank - 1).copied()
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------------------------------------
// Worker

/// What one worker's clients went through in the storm.
#[derive(Debug, Default)]
struct Tally {
    /// Milliseconds from the drop to each recovered client's SyncDone.
    times_ms: Vec<u64>,
    attempts: u64,
    /// Failed attempts by cause: count, ms from the drop to the first and the last, and the
    /// first error text.
    errors: BTreeMap<&'static str, Failures>,
    unrecovered: u64,
    /// Recovered clients whose sync did not hold what it should.
    mismatched: u64,
    first_mismatch: Option<String>,
    /// Expected messages found in syncs.
    found: u64,
    /// Messages of a client's own in its sync (the sender's copy).
    own: u64,
    /// The recovered connections, held until the end of the run.
    held: Vec<TcpStream>,
}

/// Failed attempts of one cause.
#[derive(Debug)]
struct Failures {
    count: u64,
    first_ms: u64,
    last_ms: u64,
    example: String,
}

/// What every client of a worker shares.
#[derive(Debug)]
struct Shared {
    server: SocketAddr,
    jitter: Duration,
    deadline: Instant,
    /// The parent's drop time (µs since the Unix epoch) that completion times count from.
    t0_us: u64,
    tally: RefCell<Tally>,
}

/// Worker: open, send the messages, report READY, wait for DROP, drop everything, reconnect,
/// report, hold the new connections until stdin closes (or `--hold` runs out), report, close.
pub fn child(a: ConnsArgs) -> Result<bool, String> {
    let prefix = a.prefix.clone().ok_or("--child needs --prefix")?;
    let rt = conns::runtime()?;
    let local = tokio::task::LocalSet::new();
    let minter = Minter::from_data_dir(&a.data_dir)?;
    let mut opened = local.block_on(&rt, conns::open(&a, &prefix, a.offset, a.count))?;
    let users = std::mem::take(&mut opened.users);
    let (streams, expect, send_failed, send_error) =
        local.block_on(&rt, send_messages(&a, &prefix, opened.streams, &users));
    let first_error = opened.first_error.or(send_error);
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "READY opened={} failed={} sent={} send_failed={send_failed}{}",
        streams.len(),
        opened.failed,
        expect.len(),
        first_error
            .as_deref()
            .map(|e| format!(" error={e}"))
            .unwrap_or_default()
    );
    let _ = stdout.flush();

    let mut line = String::new();
    let mut stdin = std::io::stdin().lock();
    stdin
        .read_line(&mut line)
        .map_err(|e| format!("stdin: {e}"))?;
    drop(stdin);
    let Some(t0_us) = line
        .strip_prefix("DROP ")
        .and_then(|t| t.trim().parse::<u64>().ok())
    else {
        // The parent gave up before the storm.
        let _guard = rt.enter();
        drop(streams);
        return Ok(false);
    };

    // Every client drops its connection at this moment.
    let dropping = Instant::now();
    {
        let _guard = rt.enter();
        drop(streams);
    }
    let drop_ms = dropping.elapsed().as_secs_f64() * 1e3;

    let shared = Rc::new(Shared {
        server: a.server,
        jitter: a.jitter,
        deadline: dropping + a.storm_timeout,
        t0_us,
        tally: RefCell::default(),
    });
    let seed = unix_micros() ^ (u64::from(std::process::id()) << 32);
    local.block_on(&rt, async {
        let mut tasks = Vec::with_capacity(users.len());
        for &n in &users {
            let me = user_id(&prefix, n);
            let token = minter.mint(&me);
            let from = expect.get(&n).map(|&s| user_id(&prefix, s));
            let rng = Rng::new(seed ^ n.wrapping_mul(0x2545_f491_4f6c_dd1d));
            tasks.push(spawn_local(recover(
                shared.clone(),
                source_ip(&a, n),
                me,
                token,
                from,
                rng,
            )));
        }
        for t in tasks {
            let _ = t.await;
        }
    });

    let tally = std::mem::take(&mut *shared.tally.borrow_mut());
    for (cause, f) in &tally.errors {
        let _ = writeln!(
            stdout,
            "ERR {cause} {} {} {} {}",
            f.count,
            f.first_ms,
            f.last_ms,
            f.example.replace('\n', " ")
        );
    }
    if let Some(m) = &tally.first_mismatch {
        let _ = writeln!(stdout, "MISMATCH {m}");
    }
    let times: Vec<String> = tally.times_ms.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        stdout,
        "STORM clients={} recovered={} unrecovered={} attempts={} mismatched={} found={} own={} drop_us={:.0} cpu_ms={} times={}",
        users.len(),
        tally.times_ms.len(),
        tally.unrecovered,
        tally.attempts,
        tally.mismatched,
        tally.found,
        tally.own,
        drop_ms * 1e3,
        sys::self_cpu().as_millis(),
        times.join(",")
    );
    let _ = stdout.flush();

    // Hold the recovered connections until the parent closes stdin.
    crate::conns::hold_then_report(&mut stdout, a.hold, &tally.held);
    let _guard = rt.enter();
    drop(tally.held);
    Ok(true)
}

/// Every `--message-every`th user of this worker receives one message from the next user (when
/// both are logged in here), all Sends at once. Returns the streams (in order), receiver →
/// sender for every acknowledged Send, the number of failed Sends and the first failure.
async fn send_messages(
    a: &ConnsArgs,
    prefix: &str,
    streams: Vec<TcpStream>,
    users: &[u64],
) -> (Vec<TcpStream>, BTreeMap<u64, u64>, u64, Option<String>) {
    let mut expect = BTreeMap::new();
    let (mut failed, mut first_error) = (0, None);
    if a.message_every < 2 {
        return (streams, expect, failed, first_error);
    }
    let mut slots: Vec<Option<TcpStream>> = streams.into_iter().map(Some).collect();
    let mut tasks = Vec::new();
    for (i, &n) in users.iter().enumerate() {
        if n % a.message_every != 0 || users.get(i + 1) != Some(&(n + 1)) {
            continue;
        }
        let stream = slots[i + 1].take().expect("each sender once");
        let (from, to) = (user_id(prefix, n + 1), user_id(prefix, n));
        tasks.push((n, i + 1, spawn_local(send_one(stream, from, to))));
    }
    for (receiver, slot, t) in tasks {
        match t.await {
            Ok((stream, result)) => {
                slots[slot] = Some(stream);
                match result {
                    Ok(()) => {
                        expect.insert(receiver, receiver + 1);
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(format!("send task: {e}"));
            }
        }
    }
    (
        slots.into_iter().flatten().collect(),
        expect,
        failed,
        first_error,
    )
}

/// Sends one text message from `from` to `to` on `from`'s connection and waits for its SendAck.
async fn send_one(
    mut stream: TcpStream,
    from: String,
    to: String,
) -> (TcpStream, Result<(), String>) {
    let result = tokio::time::timeout(SEND_TIMEOUT, async {
        let frame = Frame::new(
            SEND_REQUEST_ID,
            Send {
                client_msg_id: format!("{from}-storm"),
                target: Some(Target::user(to)),
                content_type: ContentType::Text as u32,
                custom_type: String::new(),
                payload: Bytes::from(format!("before the storm, from {from}")),
                priority: false,
            },
        );
        let mut codec = Codec::new(MAX_FRAME);
        let mut buf = BytesMut::new();
        codec.encode(&frame, &mut buf).map_err(|e| e.to_string())?;
        stream
            .write_all(&buf)
            .await
            .map_err(|e| format!("write Send: {e}"))?;
        let mut rbuf = BytesMut::with_capacity(512);
        loop {
            while let Some(f) = codec.decode(&mut rbuf).map_err(|e| format!("send: {e}"))? {
                match f.body {
                    Some(Body::SendAck(_)) if f.request_id == SEND_REQUEST_ID => return Ok(()),
                    Some(Body::Error(e)) => {
                        return Err(format!("send refused: code {} {}", e.code, e.message));
                    }
                    Some(Body::Kick(k)) => {
                        return Err(format!("send: kicked, reason {}", k.reason));
                    }
                    _ => {}
                }
            }
            match stream.read_buf(&mut rbuf).await {
                Ok(0) => return Err("send: server closed the connection".to_string()),
                Ok(_) => {}
                Err(e) => return Err(format!("send: {e}")),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("no SendAck within {SEND_TIMEOUT:?}")));
    (stream, result)
}

/// One client after the drop: wait a random part of the jitter window, then log in with a sync
/// until the sync completes, backing off after each failure, until the deadline.
async fn recover(
    shared: Rc<Shared>,
    source: Option<IpAddr>,
    me: String,
    token: String,
    expect_from: Option<String>,
    mut rng: Rng,
) {
    tokio::time::sleep(rng.below(shared.jitter)).await;
    let mut failures = 0u32;
    loop {
        let now = Instant::now();
        if now >= shared.deadline {
            shared.tally.borrow_mut().unrecovered += 1;
            return;
        }
        shared.tally.borrow_mut().attempts += 1;
        let limit = (shared.deadline - now).min(ATTEMPT_TIMEOUT);
        let result = tokio::time::timeout(limit, attempt(shared.server, source, token.clone()))
            .await
            .unwrap_or_else(|_| Err(format!("no SyncDone within {limit:?}")));
        match result {
            Ok((stream, senders)) => {
                let done_ms = unix_micros().saturating_sub(shared.t0_us) / 1000;
                let mut t = shared.tally.borrow_mut();
                t.times_ms.push(done_ms);
                t.own += senders.iter().filter(|s| **s == me).count() as u64;
                if sync_matches(&me, expect_from.as_deref(), &senders) {
                    t.found += u64::from(expect_from.is_some());
                } else {
                    t.mismatched += 1;
                    t.first_mismatch.get_or_insert_with(|| {
                        format!("{me}: expected one message from {expect_from:?}, sync had senders {senders:?}")
                    });
                }
                t.held.push(stream);
                return;
            }
            Err(e) => {
                failures += 1;
                {
                    let at_ms = unix_micros().saturating_sub(shared.t0_us) / 1000;
                    let mut t = shared.tally.borrow_mut();
                    let f = t.errors.entry(cause(&e)).or_insert(Failures {
                        count: 0,
                        first_ms: at_ms,
                        last_ms: at_ms,
                        example: e,
                    });
                    f.count += 1;
                    f.last_ms = at_ms;
                }
                let wait = backoff(failures, &mut rng);
                let left = shared.deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(wait.min(left)).await;
            }
        }
    }
}

/// Connect, log in with `sync_on_login`, read the sync up to its SyncDone. Returns the
/// connection and the sender of every message the sync delivered.
async fn attempt(
    server: SocketAddr,
    source: Option<IpAddr>,
    token: String,
) -> Result<(TcpStream, Vec<String>), String> {
    let login::Conn {
        stream, mut rbuf, ..
    } = login::connect_syncing(server, source, token, DEVICE).await?;
    let mut stream = stream.into_tcp().ok_or("not a TCP connection")?;
    let mut codec = Codec::new(MAX_FRAME);
    let mut senders = Vec::new();
    loop {
        while let Some(frame) = codec.decode(&mut rbuf).map_err(|e| format!("sync: {e}"))? {
            match frame.body {
                Some(Body::SyncMessages(m)) => {
                    senders.extend(m.messages.into_iter().map(|d| d.sender));
                }
                Some(Body::SyncDone(_)) if frame.request_id == HELLO_REQUEST_ID => {
                    return Ok((stream, senders));
                }
                Some(Body::Error(e)) => {
                    return Err(format!("sync: error code {} {}", e.code, e.message));
                }
                Some(Body::Kick(k)) => {
                    return Err(format!("sync: kicked, reason {} {}", k.reason, k.message));
                }
                _ => {}
            }
        }
        match stream.read_buf(&mut rbuf).await {
            Ok(0) => return Err("sync: server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("sync: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parent

/// A worker process and its report lines.
#[derive(Debug)]
struct Worker {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Worker {
    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .map_err(|e| format!("worker: {e}"))?;
        if line.is_empty() {
            return Err("a worker exited early (see its stderr)".into());
        }
        Ok(line.trim_end().to_string())
    }
}

/// The gateway's memory as the parent saw it during the storm.
#[derive(Debug, Default)]
struct Samples {
    peak_kib: u64,
    /// (ms since the drop, VmRSS KiB), every [`SAMPLE_EVERY`].
    series: Vec<(u64, u64)>,
    /// When the gateway was first seen gone or a zombie.
    died_ms: Option<u64>,
}

/// The gateway's VmRSS, or `None` if it is gone (or a zombie).
fn gateway_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let state = status.lines().find(|l| l.starts_with("State:"))?;
    if state.contains("Z (") || state.contains("X (") {
        return None;
    }
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn sample(pid: u32, start: Instant, stop: &AtomicBool) -> Samples {
    let mut s = Samples::default();
    while !stop.load(Ordering::Relaxed) {
        let at = start.elapsed().as_millis() as u64;
        match gateway_rss(pid) {
            Some(kib) => {
                s.peak_kib = s.peak_kib.max(kib);
                s.series.push((at, kib));
            }
            None => {
                s.died_ms.get_or_insert(at);
            }
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    s
}

/// Parent: start the workers, wait for READY, hold, drop, collect, report.
pub fn run(a: ConnsArgs, prefix: String) -> Result<bool, String> {
    let per_proc = a.count.div_ceil(u64::from(a.procs));
    eprintln!(
        "tern-load conns --storm: {} clients in {} process(es), users {prefix}-cN, jitter {:?}, timeout {:?}",
        a.count, a.procs, a.jitter, a.storm_timeout
    );
    let started = Instant::now();
    let mut workers = Vec::new();
    let mut offset = 0;
    for _ in 0..a.procs {
        let n = per_proc.min(a.count - offset);
        if n == 0 {
            break;
        }
        let hold = a.hold + a.storm_timeout;
        let mut cmd = crate::conns::worker_command(&a, &prefix, offset, n, hold)?;
        cmd.arg("--storm")
            .args(["--jitter", &format!("{}ms", a.jitter.as_millis())])
            .args([
                "--storm-timeout",
                &format!("{}ms", a.storm_timeout.as_millis()),
            ])
            .args(["--message-every", &a.message_every.to_string()]);
        let mut child = cmd.spawn().map_err(|e| format!("spawn worker: {e}"))?;
        let out = BufReader::new(child.stdout.take().ok_or("worker has no stdout")?);
        workers.push(Worker { child, out });
        offset += n;
    }
    let (mut opened, mut failed, mut sent, mut send_failed, mut first_error) = (0, 0, 0, 0, None);
    for w in &mut workers {
        let line = w.line()?;
        opened += field(&line, "opened=");
        failed += field(&line, "failed=");
        sent += field(&line, "sent=");
        send_failed += field(&line, "send_failed=");
        if first_error.is_none() {
            first_error = line.split_once(" error=").map(|(_, e)| e.to_string());
        }
    }
    let setup = started.elapsed();
    eprintln!(
        "tern-load conns --storm: {opened} logged in, {failed} failed, {sent} messages sent ({send_failed} failed) in {:.2} s; holding {:?}",
        setup.as_secs_f64(),
        a.hold
    );
    std::thread::sleep(Duration::from_secs(1) + a.hold);
    let rss_before = a.gateway_pid.and_then(gateway_rss);
    let cpu_before = a.gateway_pid.and_then(|pid| ProcSnap::take(pid).ok());

    // The drop: one line to every worker, as close together as the pipes allow.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let sampler = a.gateway_pid.map(|pid| {
        let stop = stop.clone();
        std::thread::spawn(move || sample(pid, t0, &stop))
    });
    let t0_us = unix_micros();
    for w in &mut workers {
        if let Some(stdin) = w.child.stdin.as_mut() {
            let _ = writeln!(stdin, "DROP {t0_us}");
            let _ = stdin.flush();
        }
    }
    eprintln!("tern-load conns --storm: dropped all connections; reconnecting");

    let mut times: Vec<u64> = Vec::with_capacity(opened as usize);
    let (mut clients, mut unrecovered, mut attempts, mut mismatched, mut found, mut own) =
        (0, 0, 0, 0, 0, 0);
    let mut drop_us = 0;
    let mut worker_cpu_ms = 0;
    let mut first_mismatch = None;
    // Cause → (count, first ms, last ms, first example).
    let mut errors: BTreeMap<String, (u64, u64, u64, String)> = BTreeMap::new();
    for w in &mut workers {
        loop {
            let line = w.line()?;
            if let Some(rest) = line.strip_prefix("ERR ") {
                let mut it = rest.splitn(5, ' ');
                let cause = it.next().unwrap_or("?").to_string();
                let mut num = || it.next().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
                let (count, first, last) = (num(), num(), num());
                let example = it.next().unwrap_or("").to_string();
                let e = errors.entry(cause).or_insert((0, first, last, example));
                e.0 += count;
                e.1 = e.1.min(first);
                e.2 = e.2.max(last);
                continue;
            }
            if let Some(m) = line.strip_prefix("MISMATCH ") {
                first_mismatch.get_or_insert_with(|| m.to_string());
                continue;
            }
            let Some(rest) = line.strip_prefix("STORM ") else {
                return Err(format!("worker: unexpected line {line:?}"));
            };
            clients += field(rest, "clients=");
            unrecovered += field(rest, "unrecovered=");
            attempts += field(rest, "attempts=");
            mismatched += field(rest, "mismatched=");
            found += field(rest, "found=");
            own += field(rest, "own=");
            drop_us = drop_us.max(field(rest, "drop_us="));
            worker_cpu_ms += field(rest, "cpu_ms=");
            if let Some(list) = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("times="))
            {
                times.extend(list.split(',').filter_map(|t| t.parse::<u64>().ok()));
            }
            break;
        }
    }
    let storm_s = t0.elapsed().as_secs_f64();
    let cpu_storm = a.gateway_pid.and_then(|pid| ProcSnap::take(pid).ok());
    std::thread::sleep(Duration::from_secs(1));
    let rss_recovered = a.gateway_pid.and_then(gateway_rss);
    stop.store(true, Ordering::Relaxed);
    let samples = sampler
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();

    let mut alive = 0;
    for mut w in workers {
        drop(w.child.stdin.take());
        alive += field(&w.line()?, "alive=");
        let _ = w.child.wait();
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = a.gateway_pid.and_then(gateway_rss);
    let gateway_alive = match a.gateway_pid {
        Some(pid) => samples.died_ms.is_none() && gateway_rss(pid).is_some(),
        None => true,
    };

    times.sort_unstable();
    let recovered = times.len() as u64;
    let clients_n = usize::try_from(clients).unwrap_or(usize::MAX);
    let q = |p: f64| quantile(&times, clients_n, p);
    let secs = |v: Option<u64>| v.map_or("-".to_string(), |ms| format!("{:.2}", ms as f64 / 1e3));
    let retries = attempts.saturating_sub(recovered);
    let failed_attempts: u64 = errors.values().map(|e| e.0).sum();
    let kib = |v: Option<u64>| v.map_or("-".to_string(), |k| k.to_string());

    println!(
        "storm: {clients} clients dropped at once (closing took up to {:.1} ms per worker); {recovered} recovered, {unrecovered} never did",
        drop_us as f64 / 1e3
    );
    println!(
        "time to recover (drop → SyncDone): 50% {} s, 99% {} s, 100% {} s (jitter window {:.1} s); workers done after {storm_s:.2} s",
        secs(q(0.5)),
        secs(q(0.99)),
        secs(q(1.0)),
        a.jitter.as_secs_f64()
    );
    println!(
        "attempts {attempts}: {failed_attempts} failed, {retries} retries; sync: {found} of {sent} expected messages found, {mismatched} clients with a wrong sync, {own} own messages echoed"
    );
    for (cause, (count, first, last, example)) in &errors {
        println!(
            "  failed attempts {cause}: {count}, from {:.1} s to {:.1} s after the drop (first: {example})",
            *first as f64 / 1e3,
            *last as f64 / 1e3
        );
    }
    if let Some(m) = &first_mismatch {
        println!("  first wrong sync: {m}");
    }
    let mut by_time = Vec::new();
    for step in 1..=60 {
        let until = step * 5000;
        let n = times.partition_point(|&t| t <= until);
        by_time.push(format!("{}s:{n}", until / 1000));
        if n == times.len() {
            break;
        }
    }
    println!(
        "recovered clients, cumulative, by seconds from the drop: {}",
        by_time.join(" ")
    );
    if let Some(e) = &first_error {
        println!("first setup error: {e}");
    }
    if a.gateway_pid.is_some() {
        println!(
            "gateway rss {} KiB before the drop, peak {} KiB during the storm, {} KiB recovered, {} KiB after closing; alive: {}",
            kib(rss_before),
            samples.peak_kib,
            kib(rss_recovered),
            kib(rss_after),
            if gateway_alive { "yes" } else { "NO" }
        );
        if let (Some(b), Some(e)) = (&cpu_before, &cpu_storm) {
            let mut threads: Vec<(Duration, &String)> = e
                .threads
                .iter()
                .map(|(name, c)| {
                    (
                        c.saturating_sub(b.threads.get(name).copied().unwrap_or_default()),
                        name,
                    )
                })
                .collect();
            threads.sort_unstable_by(|x, y| y.cmp(x));
            let top: Vec<String> = threads
                .iter()
                .take(6)
                .map(|(c, name)| format!("{name} {:.1}", c.as_secs_f64()))
                .collect();
            println!(
                "gateway CPU during the storm: {:.1} s in {storm_s:.1} s ({}); generator workers {:.1} s in all",
                e.cpu.saturating_sub(b.cpu).as_secs_f64(),
                top.join(", "),
                worker_cpu_ms as f64 / 1e3
            );
        }
        let every_s: Vec<String> = samples
            .series
            .iter()
            .step_by(10)
            .map(|(ms, k)| format!("{:.0}s:{}M", *ms as f64 / 1e3, k / 1024))
            .collect();
        println!(
            "gateway rss each second from the drop: {}",
            every_s.join(" ")
        );
        if let Some(ms) = samples.died_ms {
            println!("gateway GONE {:.1} s after the drop", ms as f64 / 1e3);
        }
    }
    let error_list: Vec<String> = errors.iter().map(|(c, e)| format!("{c}:{}", e.0)).collect();
    println!(
        "RESULT workload=storm count={} procs={} opened={opened} failed={failed} sent={sent} send_failed={send_failed} setup_s={:.2} jitter_s={:.1} drop_ms={:.1} clients={clients} recovered={recovered} unrecovered={unrecovered} recover_p50_s={} recover_p99_s={} recover_p100_s={} attempts={attempts} retries={retries} errors={} sync_found={found} sync_mismatched={mismatched} alive={alive} rss_before_kib={} rss_peak_kib={} rss_recovered_kib={} rss_after_kib={} gateway_alive={}",
        a.count,
        a.procs,
        setup.as_secs_f64(),
        a.jitter.as_secs_f64(),
        drop_us as f64 / 1e3,
        secs(q(0.5)),
        secs(q(0.99)),
        secs(q(1.0)),
        if error_list.is_empty() {
            "none".to_string()
        } else {
            error_list.join(",")
        },
        kib(rss_before),
        samples.peak_kib,
        kib(rss_recovered),
        kib(rss_after),
        if gateway_alive { "yes" } else { "no" },
    );
    Ok(failed == 0
        && send_failed == 0
        && clients > 0
        && unrecovered == 0
        && recovered == clients
        && mismatched == 0
        && found == sent
        && gateway_alive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_5s_and_stays_within_its_bounds() {
        assert_eq!(backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(backoff_ceiling(6), Duration::from_millis(3200));
        assert_eq!(backoff_ceiling(7), BACKOFF_MAX);
        assert_eq!(backoff_ceiling(u32::MAX), BACKOFF_MAX);
        let mut rng = Rng::new(7);
        for failures in 1..40 {
            let c = backoff_ceiling(failures);
            let (mut lo, mut hi) = (c, Duration::ZERO);
            for _ in 0..2000 {
                let d = backoff(failures, &mut rng);
                assert!(
                    d >= c / 2 && d < c,
                    "{failures}: {d:?} outside [{:?}, {c:?})",
                    c / 2
                );
                lo = lo.min(d);
                hi = hi.max(d);
            }
            // Jittered: the draws spread over most of the upper half.
            assert!(hi - lo > c / 4, "{failures}: {lo:?}..{hi:?}");
        }
    }

    #[test]
    fn jitter_is_uniform_over_the_window() {
        let mut rng = Rng::new(42);
        let window = Duration::from_secs(2);
        let mut buckets = [0u32; 10];
        for _ in 0..100_000 {
            let d = rng.below(window);
            assert!(d < window);
            buckets[(d.as_nanos() * 10 / window.as_nanos()) as usize] += 1;
        }
        for b in buckets {
            assert!((9_000..11_000).contains(&b), "{buckets:?}");
        }
        assert_eq!(rng.below(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn causes_of_failed_attempts() {
        assert_eq!(
            cause("login refused: code 4006 too many connections"),
            "CONNECTION_LIMIT"
        );
        assert_eq!(
            cause("login refused: code 2006 no Hello within the login timeout"),
            "LOGIN_TIMEOUT"
        );
        assert_eq!(cause("sync: error code 5002 unavailable"), "UNAVAILABLE");
        assert_eq!(cause("login refused: code 77 ?"), "unknown_error_code");
        assert_eq!(
            cause("connect 127.0.0.1:7655: Connection refused (os error 111)"),
            "refused"
        );
        assert_eq!(
            cause("login: Connection reset by peer (os error 104)"),
            "reset"
        );
        assert_eq!(cause("no HelloOk within 15s"), "hellook_timeout");
        assert_eq!(cause("no SyncDone within 30s"), "syncdone_timeout");
        assert_eq!(cause("sync: kicked, reason 1 replaced"), "kicked");
        assert_eq!(cause("login: server closed the connection"), "closed");
        assert_eq!(
            cause("connect 127.0.0.1:7655: Cannot assign requested address (os error 99)"),
            "no_local_port"
        );
        assert_eq!(cause("something else"), "other");
    }

    #[test]
    fn sync_must_hold_exactly_the_expected_message() {
        let s = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert!(sync_matches("r", Some("s"), &s(&["s"])));
        assert!(sync_matches("r", Some("s"), &s(&["r", "s"])));
        assert!(!sync_matches("r", Some("s"), &s(&[])));
        assert!(!sync_matches("r", Some("s"), &s(&["s", "s"])));
        assert!(!sync_matches("r", Some("s"), &s(&["x"])));
        assert!(sync_matches("s", None, &s(&["s"])));
        assert!(sync_matches("s", None, &s(&[])));
        assert!(!sync_matches("s", None, &s(&["x"])));
    }

    #[test]
    fn quantiles_count_unrecovered_clients() {
        let t = [10, 20, 30, 40];
        assert_eq!(quantile(&t, 4, 0.5), Some(20));
        assert_eq!(quantile(&t, 4, 0.99), Some(40));
        assert_eq!(quantile(&t, 4, 1.0), Some(40));
        // A fifth client never recovered: no 100 % time.
        assert_eq!(quantile(&t, 5, 1.0), None);
        assert_eq!(quantile(&t, 5, 0.5), Some(30));
        assert_eq!(quantile(&[], 0, 0.5), None);
    }
}
