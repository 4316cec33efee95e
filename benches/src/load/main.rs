//! `tern-load`: the load generator for the Tern gateway.
//!
//! - `pairs`: sender→receiver pairs pipelining Sends; reports delivered messages per second,
//!   end-to-end latency from a timestamp in each payload, lost / duplicated / reordered messages,
//!   and the gateway's CPU time per message.
//! - `conns`: idle logged-in connections; reports the gateway's memory per connection. With
//!   `--storm`, a reconnect storm: all of them dropped at once, then reconnecting with backoff and
//!   a sync each; reports the time until every client's sync completed and the gateway's memory.
//! - `fanout`: one group with K online members and one sender; reports deliveries per second,
//!   latency of every delivery, lost and duplicated deliveries, and the gateway's CPU time per
//!   delivery.
//! - `flood`: a flood of TCP connection attempts that never log in (connect and close, connect
//!   and stay silent until the login timeout, or send garbage); reports attempts per second,
//!   connects, failures, how the gateway ended each connection, and its CPU time and memory.
//! - `blackhole`: a dead HTTP endpoint that accepts connections and never answers, for runs with
//!   the gateway's webhooks pointed at it; reports the connections and bytes it swallowed.
//!
//! It shares the machine with the gateway, so it is frugal: one thread, a current-thread tokio
//! runtime, raw sockets, pre-encoded Send frames patched in place, and a frame scanner that reads
//! SendAck and Deliver without decoding them into owned messages. It is not a client SDK: it
//! never syncs, reconnects or retries, because any of those would hide the faults it counts —
//! except in the reconnect storm, where reconnecting and syncing are what is measured, and in
//! the flood, where reconnecting is the load.
//! It only talks to loopback addresses, and every run ends by itself.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod blackhole;
mod conns;
mod fanout;
mod flood;
mod login;
mod pairs;
mod storm;
mod sys;
mod token;
mod wire;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for the Tern gateway. Every run prints a final `RESULT key=value ...` line.
#[derive(Debug, Parser)]
#[command(name = "tern-load", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Sender→receiver pairs: throughput, latency, loss and duplication.
    Pairs(pairs::PairsArgs),
    /// Idle logged-in connections: gateway memory per connection (`--storm`: a reconnect storm).
    Conns(conns::ConnsArgs),
    /// A flood of connection attempts that never log in: attempts/s, failures, gateway memory.
    Flood(flood::FloodArgs),
    /// One group with K online members and one sender: deliveries/s, latency, gateway CPU per
    /// delivery.
    Fanout(fanout::FanoutArgs),
    /// A dead HTTP endpoint: accepts connections, reads, never answers; exits after
    /// `--duration`.
    Blackhole(blackhole::BlackholeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    sys::raise_nofile();
    sys::no_transparent_huge_pages();
    let result = match cli.command {
        Cmd::Pairs(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))
            .and_then(|rt| tokio::task::LocalSet::new().block_on(&rt, pairs::run(a))),
        Cmd::Conns(a) => conns::run(a),
        Cmd::Fanout(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))
            .and_then(|rt| tokio::task::LocalSet::new().block_on(&rt, fanout::run(a))),
        Cmd::Flood(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))
            .and_then(|rt| tokio::task::LocalSet::new().block_on(&rt, flood::run(a))),
        Cmd::Blackhole(a) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))
            .and_then(|rt| tokio::task::LocalSet::new().block_on(&rt, blackhole::run(a))),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tern-load: {e}");
            ExitCode::from(2)
        }
    }
}
