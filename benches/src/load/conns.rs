//! `conns`: C idle logged-in connections, and what they cost the gateway in memory.
//!
//! One process can hold fewer than its open-file limit, so `--procs K` starts K copies of this
//! program (`--child`), each opening its share and reporting `READY` on stdout; the parent
//! measures the gateway's RSS once all are ready, holds, then closes their stdin to end them.
//!
//! With `--storm` the connections are then all dropped at once and reconnect (module `storm`).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::spawn_local;

use crate::login::{self, parse_duration};
use crate::sys::{self, ProcSnap};
use crate::token::Minter;

/// Options of `tern-load conns`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnsArgs {
    /// Gateway address (loopback only).
    #[arg(long, default_value = "127.0.0.1:7600")]
    pub(crate) server: SocketAddr,
    /// The gateway's data directory, to read its token secret.
    #[arg(long)]
    pub(crate) data_dir: PathBuf,
    /// Connections to open in total (one user each).
    #[arg(long)]
    pub(crate) count: u64,
    /// Local addresses to connect from, round-robin (127.0.0.0/8 only); each gives ~28k ports.
    #[arg(long, value_delimiter = ',')]
    pub(crate) source_ips: Vec<IpAddr>,
    /// Gateway process id: report its RSS before, with the connections, and after closing.
    #[arg(long)]
    pub(crate) gateway_pid: Option<u32>,
    /// How long to hold the connections open after the last login (`--storm`: before the drop).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) hold: Duration,
    /// How long after the last login the gateway's RSS with the connections is read (time for
    /// queued login work, and for idle connections to park: `park_after_ms`, 2 s by default).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(crate) settle: Duration,
    /// Generator processes to spread the connections over (each is limited by `ulimit -n`).
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: u32,
    /// Logins in flight at once per process.
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
    /// Worker mode, used by `--procs`.
    #[arg(long, hide = true)]
    pub(crate) child: bool,
    /// User-id prefix shared by the workers of one run.
    #[arg(long, hide = true)]
    pub(crate) prefix: Option<String>,
    /// Index of this worker's first user.
    #[arg(long, hide = true, default_value_t = 0)]
    pub(crate) offset: u64,
    /// Reconnect storm: after the hold, every client drops its connection at the same moment
    /// and reconnects (random delay over `--jitter`, then exponential backoff with jitter),
    /// logging in with a full sync; reports the time until every client's sync completed.
    #[arg(long)]
    pub(crate) storm: bool,
    /// Storm: each client's first reconnect is delayed uniformly at random over this window.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub(crate) jitter: Duration,
    /// Storm: a client that has not completed its sync this long after the drop gives up.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub(crate) storm_timeout: Duration,
    /// Storm: before the drop, every Nth user receives one message from the next user, which
    /// its sync after the reconnect must contain (0: no messages; otherwise at least 2).
    #[arg(long, default_value_t = 10)]
    pub(crate) message_every: u64,
}

/// What one process opened.
#[derive(Debug, Default)]
pub(crate) struct Opened {
    pub(crate) streams: Vec<TcpStream>,
    /// The user index of each stream, ascending.
    pub(crate) users: Vec<u64>,
    pub(crate) failed: u64,
    pub(crate) first_error: Option<String>,
}

pub fn run(a: ConnsArgs) -> Result<bool, String> {
    if !a.server.ip().is_loopback() || a.source_ips.iter().any(|ip| !ip.is_loopback()) {
        return Err("--server and --source-ips must be loopback addresses".into());
    }
    if a.procs == 0 || a.concurrency == 0 {
        return Err("--procs and --concurrency must be at least 1".into());
    }
    if a.message_every == 1 {
        return Err("--message-every must be 0 or at least 2".into());
    }
    let nofile = sys::raise_nofile();
    if a.child {
        return if a.storm {
            crate::storm::child(a)
        } else {
            child(a)
        };
    }
    let prefix = a.prefix.clone().unwrap_or_else(login::run_prefix);
    let per_proc = a.count.div_ceil(u64::from(a.procs));
    if per_proc + 64 > nofile {
        eprintln!(
            "tern-load: warning: {per_proc} connections per process but the open-file limit is {nofile}; use more --procs"
        );
    }
    if a.storm {
        return crate::storm::run(a, prefix);
    }
    eprintln!(
        "tern-load conns: {} connections in {} process(es), users {prefix}-cN",
        a.count, a.procs
    );
    let snap = |pid: Option<u32>| pid.map(ProcSnap::take).transpose();
    let before = snap(a.gateway_pid)?;
    let started = Instant::now();

    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    let mut children = Vec::new();
    let (mut opened, mut failed, mut first_error) = (0u64, 0u64, None);
    let mut own = Opened::default();
    if a.procs == 1 {
        own = local.block_on(&rt, open(&a, &prefix, 0, a.count))?;
        opened = own.streams.len() as u64;
        failed = own.failed;
        first_error = own.first_error.take();
    } else {
        let mut offset = 0;
        for _ in 0..a.procs {
            let n = per_proc.min(a.count - offset);
            if n == 0 {
                break;
            }
            let mut cmd = worker_command(&a, &prefix, offset, n, a.hold)?;
            children.push(cmd.spawn().map_err(|e| format!("spawn worker: {e}"))?);
            offset += n;
        }
        for c in &mut children {
            let line = read_line(c)?;
            // READY opened=N failed=M [error]
            opened += field(&line, "opened=");
            failed += field(&line, "failed=");
            if first_error.is_none() {
                first_error = line.split_once(" error=").map(|(_, e)| e.to_string());
            }
        }
    }
    let setup = started.elapsed();
    // Let the gateway finish whatever login work is still queued (and park idle connections)
    // before reading its RSS.
    std::thread::sleep(a.settle);
    let during = snap(a.gateway_pid)?;
    eprintln!(
        "tern-load conns: {opened} logged in, {failed} failed, in {:.2} s; holding {:?}",
        setup.as_secs_f64(),
        a.hold
    );
    std::thread::sleep(a.hold);

    let mut alive = 0;
    if a.procs == 1 {
        alive = own
            .streams
            .iter()
            .filter(|s| !sys::peer_closed(s.as_raw_fd()))
            .count() as u64;
        let _guard = rt.enter();
        drop(own.streams);
    } else {
        for mut c in children {
            drop(c.stdin.take());
            alive += field(&read_line(&mut c)?, "alive=");
            let _ = c.wait();
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = snap(a.gateway_pid)?;

    println!(
        "connections {opened} logged in, {failed} failed, {alive} still open after the hold; setup {:.2} s ({:.0} logins/s)",
        setup.as_secs_f64(),
        opened as f64 / setup.as_secs_f64().max(1e-9)
    );
    if let Some(e) = &first_error {
        println!("first error: {e}");
    }
    let mut per_conn = None;
    if let (Some(b), Some(d), Some(af)) = (&before, &during, &after) {
        let bytes = (d.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / opened.max(1) as f64;
        per_conn = Some(bytes);
        println!(
            "gateway rss {} KiB before, {} KiB with the connections, {} KiB after closing: {bytes:.0} bytes per connection",
            b.rss_kib, d.rss_kib, af.rss_kib
        );
    }
    println!(
        "RESULT workload=conns count={} procs={} opened={opened} failed={failed} alive={alive} setup_s={:.2} rss_before_kib={} rss_with_kib={} rss_after_kib={} bytes_per_conn={}",
        a.count,
        a.procs,
        setup.as_secs_f64(),
        before.as_ref().map_or(0, |s| s.rss_kib),
        during.as_ref().map_or(0, |s| s.rss_kib),
        after.as_ref().map_or(0, |s| s.rss_kib),
        per_conn.map_or("-".into(), |b| format!("{b:.0}")),
    );
    Ok(failed == 0 && alive == opened)
}

/// The number after `key` (e.g. "opened=") in a worker's report line, 0 if absent.
pub(crate) fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn read_line(c: &mut Child) -> Result<String, String> {
    let out = c.stdout.as_mut().ok_or("worker has no stdout")?;
    // One byte at a time: the worker writes two short lines in its whole life.
    let mut line = String::new();
    BufReader::with_capacity(1, out)
        .read_line(&mut line)
        .map_err(|e| format!("worker: {e}"))?;
    if line.is_empty() {
        return Err("a worker exited early (see its stderr)".into());
    }
    Ok(line.trim_end().to_string())
}

/// Worker: open, report, hold until stdin closes (or `--hold` runs out), report, close.
fn child(a: ConnsArgs) -> Result<bool, String> {
    let prefix = a.prefix.clone().ok_or("--child needs --prefix")?;
    let rt = runtime()?;
    let local = tokio::task::LocalSet::new();
    let opened = local.block_on(&rt, open(&a, &prefix, a.offset, a.count))?;
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "READY opened={} failed={}{}",
        opened.streams.len(),
        opened.failed,
        opened
            .first_error
            .as_deref()
            .map(|e| format!(" error={e}"))
            .unwrap_or_default()
    );
    let _ = stdout.flush();
    hold_then_report(&mut stdout, a.hold, &opened.streams);
    let _guard = rt.enter();
    drop(opened.streams);
    Ok(true)
}

/// The command of a worker process for users `offset..offset + n`: this program in `--child`
/// mode with the run's server, data directory, prefix, concurrency and source addresses, stdin
/// and stdout piped. It stops by itself `hold` plus 120 s after its logins if the parent never
/// closes its stdin. The caller adds mode-specific options.
pub(crate) fn worker_command(
    a: &ConnsArgs,
    prefix: &str,
    offset: u64,
    n: u64,
    hold: Duration,
) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("conns")
        .args(["--child", "--prefix", prefix])
        .args(["--server", &a.server.to_string()])
        .arg("--data-dir")
        .arg(&a.data_dir)
        .args(["--count", &n.to_string(), "--offset", &offset.to_string()])
        .args(["--concurrency", &a.concurrency.to_string()])
        .args(["--hold", &format!("{}s", hold.as_secs() + 120)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    if !a.source_ips.is_empty() {
        let ips: Vec<String> = a.source_ips.iter().map(ToString::to_string).collect();
        cmd.args(["--source-ips", &ips.join(",")]);
    }
    Ok(cmd)
}

/// Worker side: holds until the parent closes stdin (or `hold` passes), then prints
/// `CLOSED alive=N`, the number of `streams` the gateway still had open.
pub(crate) fn hold_then_report(stdout: &mut impl Write, hold: Duration, streams: &[TcpStream]) {
    let eof = Arc::new(AtomicBool::new(false));
    let flag = eof.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        flag.store(true, Ordering::Relaxed);
    });
    let until = Instant::now() + hold;
    while !eof.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive = streams
        .iter()
        .filter(|s| !sys::peer_closed(s.as_raw_fd()))
        .count();
    let _ = writeln!(stdout, "CLOSED alive={alive}");
    let _ = stdout.flush();
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

/// The device id of every connection of `conns` (the storm reconnects as the same device).
pub(crate) const DEVICE: &str = "idle";

/// The source address of user `n`'s connections: `--source-ips` round-robin, or the default.
pub(crate) fn source_ip(a: &ConnsArgs, n: u64) -> Option<IpAddr> {
    (!a.source_ips.is_empty()).then(|| a.source_ips[(n % a.source_ips.len() as u64) as usize])
}

/// User `n`'s id.
pub(crate) fn user_id(prefix: &str, n: u64) -> String {
    format!("{prefix}-c{n}")
}

/// Opens `count` connections for users `offset..offset+count`, `concurrency` logins at a time.
pub(crate) async fn open(
    a: &ConnsArgs,
    prefix: &str,
    offset: u64,
    count: u64,
) -> Result<Opened, String> {
    let minter = Rc::new(Minter::from_data_dir(&a.data_dir)?);
    let mut out = Opened::default();
    let mut next = offset;
    let end = offset + count;
    let mut inflight = std::collections::VecDeque::new();
    while next < end || !inflight.is_empty() {
        while next < end && inflight.len() < a.concurrency {
            let source = source_ip(a, next);
            let token = minter.mint(&user_id(prefix, next));
            let login = spawn_local(login::connect(a.server, source, token, DEVICE));
            inflight.push_back((next, login));
            next += 1;
        }
        let Some((user, t)) = inflight.pop_front() else {
            break;
        };
        match t.await.map_err(|e| e.to_string())? {
            Ok(c) => {
                out.streams.push(c.stream.into_tcp().expect("TCP"));
                out.users.push(user);
            }
            Err(e) => {
                out.failed += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(e);
                }
            }
        }
    }
    Ok(out)
}
