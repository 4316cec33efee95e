//! `flood`: a flood of TCP connection attempts that never log in, to see whether it starves the
//! gateway's logged-in users (benches/gateway-load.sh `flood` runs `pairs` alongside it).
//!
//! `--concurrency` tasks each loop until `--duration` is over: connect (from `--source-ips`
//! round-robin, each bound with `IP_BIND_ADDRESS_NO_PORT`, or from the default address), then by
//! `--mode`:
//! - `connect-close`: close at once (an orderly close: the generator's side of each connection
//!   goes to TIME_WAIT, which a loopback connect may reuse with `net.ipv4.tcp_tw_reuse` = 2, the
//!   kernel's default);
//! - `silent`: send nothing and read until the gateway closes the connection (its login
//!   timeout) or the flood ends;
//! - `garbage`: send one frame whose body is not a protobuf message ([`garbage`]) and read until
//!   the gateway closes the connection or the flood ends.
//!
//! So at most `--concurrency` sockets are open at once ([`MAX_CONCURRENCY`] at most), and the run
//! ends by itself: whatever is still connecting or open when `--duration` is over is dropped.
//! It reports attempts per second, connects, failed connects by cause, the connect time, and for
//! `silent` and `garbage` how each connection ended (the code of the gateway's Error frame) and
//! how long the gateway kept it; with `--gateway-pid`, the gateway's CPU time and memory.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hdrhistogram::Histogram;
use tern_protocol::{Body, Codec, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::spawn_local;

use crate::login::{self, parse_duration};
use crate::storm::{self, Rng};
use crate::sys::{self, ProcSnap};
use crate::wire::MAX_FRAME;

/// Most sockets in flight at once: well under the open-file limit of the generator (and of the
/// gateway, which holds the other end of each).
pub const MAX_CONCURRENCY: usize = 10_000;

/// Descriptors kept free besides the flood's sockets (runtime, stdio, /proc reads).
const FD_RESERVE: u64 = 256;

/// Bytes of the gateway's answer kept per connection: enough for its Error frame.
const ANSWER_BYTES: usize = 4096;

/// How often the gateway's memory is sampled during the flood.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// What each connection does once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Close at once.
    ConnectClose,
    /// Send nothing; hold until the gateway closes it (login timeout) or the flood ends.
    Silent,
    /// Send a few bytes that are not a valid frame; read until the gateway closes it.
    Garbage,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::ConnectClose => "connect-close",
            Mode::Silent => "silent",
            Mode::Garbage => "garbage",
        }
    }
}

/// Options of `tern-load flood`.
#[derive(Debug, clap::Args)]
pub struct FloodArgs {
    /// Gateway TCP address (loopback only).
    #[arg(long, default_value = "127.0.0.1:7600")]
    server: SocketAddr,
    /// How long to flood.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Connection attempts in flight at once; with `silent` and `garbage` also the most sockets
    /// open at once (at most 10 000).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// What each connection does once connected.
    #[arg(long, value_enum, default_value_t = Mode::ConnectClose)]
    mode: Mode,
    /// Local addresses to connect from, round-robin (127.0.0.0/8 only); default: the kernel's
    /// choice.
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Gateway process id: report its CPU time and its memory (start, peak, end, and 1 s after
    /// the flood's sockets are closed).
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Free text copied into the RESULT line.
    #[arg(long, default_value = "")]
    label: String,
}

/// Checks `--concurrency` against [`MAX_CONCURRENCY`] and the open-file limit `nofile`.
pub fn check_concurrency(concurrency: usize, nofile: u64) -> Result<(), String> {
    if concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if concurrency > MAX_CONCURRENCY {
        return Err(format!(
            "--concurrency {concurrency} is over the maximum of {MAX_CONCURRENCY}"
        ));
    }
    if concurrency as u64 + FD_RESERVE > nofile {
        return Err(format!(
            "--concurrency {concurrency} needs {} open files; the limit is {nofile}",
            concurrency as u64 + FD_RESERVE
        ));
    }
    Ok(())
}

/// One length-prefixed frame of 8 to 39 body bytes that the gateway cannot decode: the body
/// starts with a zero byte, a protobuf field key of field number 0, which no message has; the
/// rest is random. The prefix is honest, so the gateway reads the whole frame and has to parse
/// it (rather than rejecting an oversized prefix unread).
pub fn garbage(rng: &mut Rng) -> Vec<u8> {
    let len = 8 + (rng.next_u64() % 32) as usize;
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(0);
    while out.len() < 4 + len {
        out.push(rng.next_u64() as u8);
    }
    out
}

/// How the gateway ended a connection, from the bytes it sent first: the name of the code of its
/// Error frame, `frame_<Body>` for another frame, `undecodable` for bytes that are not a frame,
/// or `no_frame` if it sent nothing (or less than one frame).
pub fn answer(bytes: &[u8]) -> String {
    let mut buf = BytesMut::from(bytes);
    match Codec::new(MAX_FRAME).decode(&mut buf) {
        Ok(Some(frame)) => match &frame.body {
            Some(Body::Error(e)) => ErrorCode::try_from(e.code).map_or_else(
                |_| format!("error_code_{}", e.code),
                |c| c.as_str_name().into(),
            ),
            _ => format!("frame_{}", frame.body_name()),
        },
        Ok(None) => "no_frame".into(),
        Err(_) => "undecodable".into(),
    }
}

/// Everything the workers count.
struct Tally {
    attempts: u64,
    connected: u64,
    /// Connects still under way when the flood ended.
    unfinished: u64,
    /// Failed connects by cause ([`storm::cause`]).
    errors: BTreeMap<&'static str, u64>,
    first_error: Option<String>,
    /// `silent` and `garbage`: how each connection ended ([`answer`], with `reset_` prefixed if
    /// the gateway reset it, or `open_at_end` if it was still open when the flood ended).
    endings: BTreeMap<String, u64>,
    /// Microseconds from the start of a connect to its completion.
    connect_us: Histogram<u64>,
    /// `silent` and `garbage`: microseconds from connected to the gateway's close.
    held_us: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        let hist = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds");
        Tally {
            attempts: 0,
            connected: 0,
            unfinished: 0,
            errors: BTreeMap::new(),
            first_error: None,
            endings: BTreeMap::new(),
            connect_us: hist(),
            held_us: hist(),
        }
    }

    fn error(&mut self, e: String) {
        *self.errors.entry(storm::cause(&e)).or_default() += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// What every worker needs to know.
struct Plan {
    server: SocketAddr,
    sources: Vec<IpAddr>,
    mode: Mode,
    end: Instant,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Runs the flood and prints the report.
pub async fn run(a: FloodArgs) -> Result<bool, String> {
    if !a.server.ip().is_loopback() || a.source_ips.iter().any(|ip| !ip.is_loopback()) {
        return Err("--server and --source-ips must be loopback addresses".into());
    }
    check_concurrency(a.concurrency, sys::raise_nofile())?;
    let sources = if a.source_ips.is_empty() {
        "the default address".to_string()
    } else {
        a.source_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    eprintln!(
        "tern-load flood: {} to {}, {} in flight, from {sources}, {:?}",
        a.mode.name(),
        a.server,
        a.concurrency,
        a.duration
    );

    let gw0 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let cpu0 = sys::self_cpu();
    let drops0 = sys::listen_drops();
    let t0 = Instant::now();
    let plan = Rc::new(Plan {
        server: a.server,
        sources: a.source_ips.clone(),
        mode: a.mode,
        end: t0 + a.duration,
    });
    let tally = Rc::new(RefCell::new(Tally::new()));
    let sampler = a
        .gateway_pid
        .map(|pid| spawn_local(sample_gateway(pid, plan.end)));
    let workers: Vec<_> = (0..a.concurrency)
        .map(|i| {
            spawn_local(worker(
                plan.clone(),
                tally.clone(),
                i as u64,
                a.concurrency as u64,
            ))
        })
        .collect();
    for w in workers {
        w.await.map_err(|e| format!("flood task: {e}"))?;
    }
    let elapsed = t0.elapsed();
    let gen_cpu = sys::self_cpu() - cpu0;
    let gw1 = a.gateway_pid.map(ProcSnap::take).transpose()?;
    let drops1 = sys::listen_drops();
    let (overflows, drops) = (drops1.0 - drops0.0, drops1.1 - drops0.1);
    let (peak_rss, peak_fds) = match sampler {
        Some(s) => s.await.map_err(|e| format!("sampler task: {e}"))?,
        None => (0, 0),
    };
    // Every worker has dropped its socket; give the gateway a moment to let go of its ends.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let gw_after = a.gateway_pid.map(ProcSnap::take).transpose()?;

    let t = tally.borrow();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let q = |h: &Histogram<u64>, p: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(p)
        }
    };
    let failed = t.failed();
    println!(
        "flood       {} for {secs:.1} s, {} in flight: {} attempts ({:.0}/s), {} connected ({:.0}/s), {failed} failed, {} unfinished at the end",
        a.mode.name(),
        a.concurrency,
        t.attempts,
        t.attempts as f64 / secs,
        t.connected,
        t.connected as f64 / secs,
        t.unfinished,
    );
    println!(
        "connect     p50 {} p99 {} p99.9 {} max {}",
        fmt_us(q(&t.connect_us, 0.5)),
        fmt_us(q(&t.connect_us, 0.99)),
        fmt_us(q(&t.connect_us, 0.999)),
        fmt_us(t.connect_us.max()),
    );
    println!(
        "listen      {overflows} SYNs dropped with the accept queue full, {drops} listen drops in all (whole machine; a dropped SYN is retried after 1 s)"
    );
    let errors = join_counts(t.errors.iter().map(|(k, v)| (*k, *v)));
    println!(
        "failed      {}{}",
        if errors.is_empty() { "none" } else { &errors },
        t.first_error
            .as_deref()
            .map(|e| format!("  first: {e}"))
            .unwrap_or_default()
    );
    let endings = join_counts(t.endings.iter().map(|(k, v)| (k.as_str(), *v)));
    if a.mode != Mode::ConnectClose {
        println!(
            "endings     {}  held until the gateway closed: p50 {} p99 {} max {}",
            if endings.is_empty() { "none" } else { &endings },
            fmt_us(q(&t.held_us, 0.5)),
            fmt_us(q(&t.held_us, 0.99)),
            fmt_us(t.held_us.max()),
        );
    }
    let mut gw_fields = String::new();
    if let (Some(g0), Some(g1), Some(ga)) = (&gw0, &gw1, &gw_after) {
        let cpu = g1.cpu.saturating_sub(g0.cpu);
        let pct = cpu.as_secs_f64() / secs * 100.0;
        let (peak_rss, peak_fds) = (peak_rss.max(g1.rss_kib), peak_fds.max(g1.fds));
        println!(
            "gateway     cpu {:.2} s ({pct:.0}% of one core); rss {} KiB at the start, {peak_rss} KiB peak, {} KiB at the end, {} KiB 1 s after",
            cpu.as_secs_f64(),
            g0.rss_kib,
            g1.rss_kib,
            ga.rss_kib
        );
        println!(
            "            open descriptors {} at the start, {peak_fds} peak, {} at the end, {} 1 s after",
            g0.fds, g1.fds, ga.fds
        );
        gw_fields = format!(
            " gw_cpu_pct={pct:.0} gw_rss_start_kib={} gw_rss_peak_kib={peak_rss} gw_rss_end_kib={} gw_rss_after_kib={} gw_fds_start={} gw_fds_peak={peak_fds} gw_fds_after={}",
            g0.rss_kib, g1.rss_kib, ga.rss_kib, g0.fds, ga.fds
        );
    }
    println!(
        "generator   cpu {:.2} s ({:.0}% of one core)",
        gen_cpu.as_secs_f64(),
        gen_cpu.as_secs_f64() / secs * 100.0
    );
    let held = if a.mode == Mode::ConnectClose {
        String::new()
    } else {
        format!(
            " endings={} held_p50_ms={} held_max_ms={}",
            if endings.is_empty() {
                "-".to_string()
            } else {
                endings.replace(' ', ",").replace('=', ":")
            },
            q(&t.held_us, 0.5) / 1000,
            t.held_us.max() / 1000
        )
    };
    println!(
        "RESULT workload=flood mode={} label={} concurrency={} duration_s={secs:.1} attempts={} attempts_per_s={:.0} connected={} connected_per_s={:.0} errors={failed} refused={} unfinished={} connect_p50_us={} connect_p99_us={} connect_max_us={} listen_overflows={overflows}{held}{gw_fields}",
        a.mode.name(),
        if a.label.is_empty() { "-" } else { &a.label },
        a.concurrency,
        t.attempts,
        t.attempts as f64 / secs,
        t.connected,
        t.connected as f64 / secs,
        t.errors.get("refused").copied().unwrap_or(0),
        t.unfinished,
        q(&t.connect_us, 0.5),
        q(&t.connect_us, 0.99),
        t.connect_us.max(),
    );
    Ok(t.connected > 0)
}

/// `a=1 b=2` from counts.
fn join_counts<'a>(counts: impl Iterator<Item = (&'a str, u64)>) -> String {
    counts
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn fmt_us(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} us"),
        1_000..1_000_000 => format!("{:.2} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// The gateway's peak VmRSS (KiB) and peak number of open descriptors until `end`.
async fn sample_gateway(pid: u32, end: Instant) -> (u64, u64) {
    let (mut rss, mut fds) = (0, 0);
    while Instant::now() < end {
        if let Ok(s) = ProcSnap::take(pid) {
            rss = rss.max(s.rss_kib);
            fds = fds.max(s.fds);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    (rss, fds)
}

/// One slot of the flood: connection after connection until the plan's end. Worker `first` of
/// `step` uses source addresses `first`, `first + step`, ... round-robin.
async fn worker(plan: Rc<Plan>, tally: Rc<RefCell<Tally>>, first: u64, step: u64) {
    let mut rng = Rng::new(0xf100d ^ first);
    let mut n = first;
    while Instant::now() < plan.end {
        let source = (!plan.sources.is_empty())
            .then(|| plan.sources[(n % plan.sources.len() as u64) as usize]);
        n += step;
        tally.borrow_mut().attempts += 1;
        let started = Instant::now();
        let connect = login::tcp_connect(plan.server, source);
        let stream = match tokio::time::timeout_at(plan.end.into(), connect).await {
            Err(_) => {
                tally.borrow_mut().unfinished += 1;
                break;
            }
            Ok(Err(e)) => {
                tally.borrow_mut().error(e);
                // A connect can fail without ever waiting (no local port, no descriptor): let
                // the other tasks and the timer run.
                tokio::task::yield_now().await;
                continue;
            }
            Ok(Ok(s)) => s,
        };
        let connected = Instant::now();
        {
            let mut t = tally.borrow_mut();
            t.connected += 1;
            t.connect_us.saturating_record(micros(connected - started));
        }
        let (ending, held) = match plan.mode {
            Mode::ConnectClose => {
                drop(stream);
                continue;
            }
            Mode::Silent => hold(stream, None, plan.end).await,
            Mode::Garbage => hold(stream, Some(garbage(&mut rng)), plan.end).await,
        };
        let mut t = tally.borrow_mut();
        *t.endings.entry(ending).or_default() += 1;
        if let Some(h) = held {
            t.held_us.saturating_record(micros(h));
        }
    }
}

/// Writes `send` (if any), then reads until the gateway ends the connection or `end`; returns
/// how it ended and, if the gateway ended it, after how long.
async fn hold(
    mut stream: TcpStream,
    send: Option<Vec<u8>>,
    end: Instant,
) -> (String, Option<Duration>) {
    let connected = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let session = async {
        if let Some(bytes) = send
            && stream.write_all(&bytes).await.is_err()
        {
            return false;
        }
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return true,
                Ok(n) => {
                    let keep = n.min(ANSWER_BYTES.saturating_sub(got.len()));
                    got.extend_from_slice(&buf[..keep]);
                }
                Err(_) => return false,
            }
        }
    };
    match tokio::time::timeout_at(end.into(), session).await {
        Err(_) => ("open_at_end".into(), None),
        Ok(orderly) => {
            let held = connected.elapsed();
            let what = answer(&got);
            (
                if orderly {
                    what
                } else {
                    format!("reset_{what}")
                },
                Some(held),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::Frame;

    #[test]
    fn garbage_is_a_whole_frame_the_codec_rejects() {
        let mut rng = Rng::new(7);
        for _ in 0..1000 {
            let g = garbage(&mut rng);
            let len = u32::from_be_bytes([g[0], g[1], g[2], g[3]]) as usize;
            assert_eq!(len + 4, g.len());
            assert!((8..40).contains(&len));
            assert_eq!(g[4], 0);
            assert!(
                Codec::new(MAX_FRAME)
                    .decode(&mut BytesMut::from(&g[..]))
                    .is_err()
            );
            assert_eq!(answer(&g), "undecodable");
        }
    }

    #[test]
    fn answers_name_the_error_code() {
        let mut out = BytesMut::new();
        let f = Frame::error(0, ErrorCode::LoginTimeout, "no Hello", true);
        Codec::new(MAX_FRAME).encode(&f, &mut out).unwrap();
        assert_eq!(answer(&out), "LOGIN_TIMEOUT");
        // Only the first frame counts, and a partial frame is no frame.
        let mut two = out.to_vec();
        let mut more = BytesMut::new();
        let f = Frame::error(0, ErrorCode::ConnectionLimit, "full", true);
        Codec::new(MAX_FRAME).encode(&f, &mut more).unwrap();
        two.extend_from_slice(&more);
        assert_eq!(answer(&two), "LOGIN_TIMEOUT");
        assert_eq!(answer(&more), "CONNECTION_LIMIT");
        assert_eq!(answer(&more[..more.len() - 1]), "no_frame");
        assert_eq!(answer(&[]), "no_frame");
    }

    #[test]
    fn concurrency_is_bounded_by_the_cap_and_the_file_limit() {
        assert!(check_concurrency(0, 20_000).is_err());
        assert!(check_concurrency(1, 20_000).is_ok());
        assert!(check_concurrency(MAX_CONCURRENCY, 20_000).is_ok());
        assert!(check_concurrency(MAX_CONCURRENCY + 1, 1 << 20).is_err());
        assert!(check_concurrency(1000, 1024).is_err());
        assert!(check_concurrency(768, 1024).is_ok());
    }

    #[test]
    fn durations_print_in_their_unit() {
        assert_eq!(fmt_us(999), "999 us");
        assert_eq!(fmt_us(1500), "1.50 ms");
        assert_eq!(fmt_us(10_020_000), "10.02 s");
    }
}
