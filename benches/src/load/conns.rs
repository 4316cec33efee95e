//! `conns`: C idle logged-in connections, and what they cost the gateway in memory.
//!
//! One process can hold fewer than its open-file limit, so `--procs K` starts K copies of this
//! program (`--child`), each opening its share and reporting `READY` on stdout; the parent
//! measures the gateway's RSS once all are ready, holds, then closes their stdin to end them.

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
    server: SocketAddr,
    /// The gateway's data directory, to read its token secret.
    #[arg(long)]
    data_dir: PathBuf,
    /// Connections to open in total (one user each).
    #[arg(long)]
    count: u64,
    /// Local addresses to connect from, round-robin (127.0.0.0/8 only); each gives ~28k ports.
    #[arg(long, value_delimiter = ',')]
    source_ips: Vec<IpAddr>,
    /// Gateway process id: report its RSS before, with the connections, and after closing.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// How long to hold the connections open after the last login.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    hold: Duration,
    /// Generator processes to spread the connections over (each is limited by `ulimit -n`).
    #[arg(long, default_value_t = 1)]
    procs: u32,
    /// Logins in flight at once per process.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Worker mode, used by `--procs`.
    #[arg(long, hide = true)]
    child: bool,
    /// User-id prefix shared by the workers of one run.
    #[arg(long, hide = true)]
    prefix: Option<String>,
    /// Index of this worker's first user.
    #[arg(long, hide = true, default_value_t = 0)]
    offset: u64,
}

/// What one process opened.
#[derive(Debug, Default)]
struct Opened {
    streams: Vec<TcpStream>,
    failed: u64,
    first_error: Option<String>,
}

pub fn run(a: ConnsArgs) -> Result<bool, String> {
    if !a.server.ip().is_loopback() || a.source_ips.iter().any(|ip| !ip.is_loopback()) {
        return Err("--server and --source-ips must be loopback addresses".into());
    }
    if a.procs == 0 || a.concurrency == 0 {
        return Err("--procs and --concurrency must be at least 1".into());
    }
    let nofile = sys::raise_nofile();
    if a.child {
        return child(a);
    }
    let prefix = a.prefix.clone().unwrap_or_else(login::run_prefix);
    let per_proc = a.count.div_ceil(u64::from(a.procs));
    if per_proc + 64 > nofile {
        eprintln!(
            "tern-load: warning: {per_proc} connections per process but the open-file limit is {nofile}; use more --procs"
        );
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
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
        let mut offset = 0;
        for _ in 0..a.procs {
            let n = per_proc.min(a.count - offset);
            if n == 0 {
                break;
            }
            let mut cmd = Command::new(&exe);
            cmd.arg("conns")
                .args(["--child", "--prefix", &prefix])
                .args(["--server", &a.server.to_string()])
                .arg("--data-dir")
                .arg(&a.data_dir)
                .args(["--count", &n.to_string(), "--offset", &offset.to_string()])
                .args(["--concurrency", &a.concurrency.to_string()])
                // Workers stop by themselves if the parent never closes their stdin.
                .args(["--hold", &format!("{}s", a.hold.as_secs() + 120)])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped());
            if !a.source_ips.is_empty() {
                let ips: Vec<String> = a.source_ips.iter().map(ToString::to_string).collect();
                cmd.args(["--source-ips", &ips.join(",")]);
            }
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
    // Let the gateway finish whatever login work is still queued before reading its RSS.
    std::thread::sleep(Duration::from_secs(1));
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
fn field(line: &str, key: &str) -> u64 {
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
    let eof = Arc::new(AtomicBool::new(false));
    let flag = eof.clone();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        flag.store(true, Ordering::Relaxed);
    });
    let until = Instant::now() + a.hold;
    while !eof.load(Ordering::Relaxed) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive = opened
        .streams
        .iter()
        .filter(|s| !sys::peer_closed(s.as_raw_fd()))
        .count();
    let _ = writeln!(stdout, "CLOSED alive={alive}");
    let _ = stdout.flush();
    let _guard = rt.enter();
    drop(opened.streams);
    Ok(true)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

/// Opens `count` connections for users `offset..offset+count`, `concurrency` logins at a time.
async fn open(a: &ConnsArgs, prefix: &str, offset: u64, count: u64) -> Result<Opened, String> {
    let minter = Rc::new(Minter::from_data_dir(&a.data_dir)?);
    let mut out = Opened::default();
    let mut next = offset;
    let end = offset + count;
    let mut inflight = std::collections::VecDeque::new();
    while next < end || !inflight.is_empty() {
        while next < end && inflight.len() < a.concurrency {
            let source = (!a.source_ips.is_empty())
                .then(|| a.source_ips[(next % a.source_ips.len() as u64) as usize]);
            let token = minter.mint(&format!("{prefix}-c{next}"));
            inflight.push_back(spawn_local(login::connect(a.server, source, token, "idle")));
            next += 1;
        }
        let Some(t) = inflight.pop_front() else { break };
        match t.await.map_err(|e| e.to_string())? {
            Ok(c) => out.streams.push(c.stream.into_tcp().expect("TCP")),
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
