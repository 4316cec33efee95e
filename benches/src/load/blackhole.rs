//! `blackhole`: a dead HTTP endpoint for the webhook benchmark (benches/gateway-load.sh
//! `webhook`). It listens on a loopback address, accepts every connection, reads and throws
//! away whatever arrives, and never answers, so each webhook call the gateway makes waits for
//! its own timeout.
//!
//! Bounded: at most `--max-conns` connections are held (later ones are closed at once), and the
//! process exits when `--duration` is over or, with `--watch-pid`, as soon as that process has
//! ended, dropping every connection. Once listening it prints `blackhole listening on ADDR` on
//! stderr; at the end a RESULT line with what it saw.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::task::spawn_local;

use crate::login::parse_duration;

/// Options of `tern-load blackhole`.
#[derive(Debug, clap::Args)]
pub struct BlackholeArgs {
    /// Where to listen (loopback only); port 0 picks a free port, printed on stderr.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// How long to run; then every connection is dropped and the process exits.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Most connections held at once; more are closed as soon as they are accepted.
    #[arg(long, default_value_t = 1000)]
    max_conns: usize,
    /// Also stop when this process (e.g. the gateway) has ended.
    #[arg(long)]
    watch_pid: Option<u32>,
}

#[derive(Default)]
struct Seen {
    accepted: Cell<u64>,
    refused: Cell<u64>,
    open: Cell<usize>,
    peak: Cell<usize>,
    bytes: Cell<u64>,
    closed_by_peer: Cell<u64>,
}

pub async fn run(a: BlackholeArgs) -> Result<bool, String> {
    if !a.listen.ip().is_loopback() {
        return Err("--listen must be a loopback address".into());
    }
    let listener = TcpListener::bind(a.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", a.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("blackhole listening on {addr}");
    let started = Instant::now();
    let seen = Rc::new(Seen::default());
    let accept = async {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                // Out of descriptors, say: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if seen.open.get() >= a.max_conns {
                seen.refused.set(seen.refused.get() + 1);
                continue;
            }
            seen.accepted.set(seen.accepted.get() + 1);
            seen.open.set(seen.open.get() + 1);
            seen.peak.set(seen.peak.get().max(seen.open.get()));
            let seen = seen.clone();
            spawn_local(async move {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.bytes.set(seen.bytes.get() + n as u64),
                    }
                }
                seen.closed_by_peer.set(seen.closed_by_peer.get() + 1);
                seen.open.set(seen.open.get() - 1);
            });
        }
    };
    let watch = async {
        match a.watch_pid {
            Some(pid) => {
                while alive(pid) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            None => std::future::pending().await,
        }
    };
    // The accept loop never ends by itself; the deadline or the watched process ends it, and
    // dropping the runtime drops every connection task.
    let _ = tokio::time::timeout(a.duration, async {
        tokio::select! {
            () = accept => {}
            () = watch => {}
        }
    })
    .await;
    println!(
        "RESULT workload=blackhole listen={addr} duration_s={:.1} accepted={} refused={} open_at_end={} open_peak={} bytes_read={} closed_by_peer={}",
        started.elapsed().as_secs_f64(),
        seen.accepted.get(),
        seen.refused.get(),
        seen.open.get(),
        seen.peak.get(),
        seen.bytes.get(),
        seen.closed_by_peer.get(),
    );
    Ok(true)
}

/// Whether process `pid` exists and has not exited (a zombie has).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|state| !state.trim_start().starts_with(['Z', 'X']))
    })
}
