//! `tern-gateway`: run the server, or mint a login token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Parser, Subcommand, ValueEnum};
use tern_gateway::config::{Config, Durability};
use tern_gateway::token::{self, Claims};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tern instant-messaging gateway.
///
/// Without a subcommand it runs the server. Every server setting is a key of the TOML file
/// (--config) and can be set with --set KEY=VALUE (or TERN_SET); the common ones also have a
/// flag and a TERN_* environment variable of their own. From highest to lowest: an option's own
/// flag, its own variable, --set, TERN_SET, the file, the built-in defaults.
#[derive(Debug, Parser)]
#[command(name = "tern-gateway", version)]
struct Cli {
    /// TOML config file (`tern-gateway config` prints every key; Config in
    /// gateway/src/config.rs documents them).
    #[arg(long, env = "TERN_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Data directory (message log, secret). Default ./tern-data.
    #[arg(long, env = "TERN_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// TCP listen address. Default 127.0.0.1:7600.
    #[arg(long, env = "TERN_TCP")]
    tcp: Option<SocketAddr>,
    /// QUIC (UDP) listen address; QUIC is off unless given.
    #[arg(long, env = "TERN_QUIC")]
    quic: Option<SocketAddr>,
    /// TLS-over-TCP listen address; TLS is off unless given.
    #[arg(long, env = "TERN_TLS")]
    tls: Option<SocketAddr>,
    /// No plaintext TCP listener: clients connect over --tls or --quic only.
    #[arg(long)]
    no_plaintext: bool,
    /// Admin and push HTTP API listen address. Default 127.0.0.1:7680.
    #[arg(long, env = "TERN_API")]
    api: Option<SocketAddr>,
    /// No admin HTTP API.
    #[arg(long, conflicts_with = "api")]
    no_api: bool,
    /// Number of cores to use (0 = all).
    #[arg(long, env = "TERN_CORES")]
    cores: Option<usize>,
    /// When a message counts as stored: fsync (default), wal or memory.
    #[arg(long, env = "TERN_DURABILITY")]
    durability: Option<DurabilityArg>,
    /// Any key of the configuration file, e.g. `--set idle_timeout_ms=60000` or
    /// `--set webhook.url=http://127.0.0.1:9000/hook`; repeatable. The value is TOML (`30000`,
    /// `true`, `"text"`, `["a", "b"]`) or else a plain string. The environment variable
    /// TERN_SET holds settings too, separated by `;`, applied before the flags. Secrets are
    /// better set in the file or the environment than on a command line others can list.
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "tern_gateway=debug".
    #[arg(long, env = "TERN_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Fsync,
    Wal,
    Memory,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a signed login token for a user.
    Token {
        /// The user id (1..=64 bytes).
        #[arg(long)]
        user: String,
        /// Lifetime, e.g. 24h, 30m, 7d.
        #[arg(long, default_value = "24h")]
        ttl: humantime::Duration,
        /// Bind the token to one device id.
        #[arg(long)]
        device: Option<String>,
        /// Absolute expiry (Unix seconds) instead of --ttl; a past value mints an expired token.
        #[arg(long, conflicts_with = "ttl")]
        expires_at: Option<u64>,
    },
    /// Print the configuration the server would run with (every key: the defaults, the file,
    /// TERN_SET, --set and the flags applied), as TOML a --config file may hold. Secrets are
    /// left out.
    Config,
}

fn load_config(cli: &Cli) -> Result<Config, String> {
    // TERN_SET first, so that a flag given for one run overrides the environment's value.
    let mut settings: Vec<String> = std::env::var("TERN_SET")
        .unwrap_or_default()
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(str::to_owned)
        .collect();
    settings.extend(cli.set.iter().cloned());
    let mut cfg =
        Config::with_settings(cli.config.as_deref(), &settings).map_err(|e| e.to_string())?;
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    if let Some(t) = cli.tcp {
        cfg.tcp = t;
    }
    if let Some(q) = cli.quic {
        cfg.quic = Some(q);
    }
    if let Some(t) = cli.tls {
        cfg.tls = Some(t);
    }
    if cli.no_plaintext {
        cfg.plaintext = false;
    }
    if let Some(a) = cli.api {
        cfg.api = Some(a);
    }
    if cli.no_api {
        cfg.api = None;
    }
    if let Some(c) = cli.cores {
        cfg.cores = c;
    }
    if let Some(d) = cli.durability {
        cfg.durability = match d {
            DurabilityArg::Fsync => Durability::Fsync,
            DurabilityArg::Wal => Durability::Wal,
            DurabilityArg::Memory => Durability::Memory,
        };
    }
    if let Ok(s) = std::env::var("TERN_SECRET") {
        cfg.secret = Some(s);
    }
    if let Ok(s) = std::env::var("TERN_API_SECRET") {
        cfg.api_secret = Some(s);
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (stderr redirected to a full disk) is dropped. The
        // default reports the failure with eprintln!, which panics when stderr fails: a core
        // would die on its next log line.
        .log_internal_errors(false)
        .init();
    let cfg = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match &cli.command {
        Some(Command::Config) => match toml::to_string(&cfg) {
            Ok(text) => {
                println!(
                    "# The configuration tern-gateway would run with. Not printed: secret,\n\
                     # api_secret, webhook.secret and notify.webhook.secret; a password in a\n\
                     # URL is printed as REDACTED.\n{text}"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot print the configuration: {e}");
                ExitCode::from(1)
            }
        },
        Some(Command::Token {
            user,
            ttl,
            device,
            expires_at,
        }) => {
            if !token::valid_id(user) {
                eprintln!("error: --user must be 1..=64 bytes without control characters");
                return ExitCode::from(2);
            }
            if let Some(d) = device
                && !token::valid_id(d)
            {
                eprintln!("error: --device must be 1..=64 bytes without control characters");
                return ExitCode::from(2);
            }
            let secret = match tern_gateway::server::load_secret(&cfg) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(1);
                }
            };
            let claims = Claims {
                v: 1,
                sub: user.clone(),
                exp: expires_at.unwrap_or_else(|| token::now_secs() + ttl.as_secs().max(1)),
                dev: device.clone(),
                iat_ms: tern_gateway::core::now_ms(),
            };
            println!("{}", token::mint(&secret, &claims));
            ExitCode::SUCCESS
        }
        None => {
            // Only the server needs this, and before it allocates its heap.
            if !cfg.transparent_huge_pages
                && let Err(e) = tern_gateway::sys::disable_transparent_huge_pages()
            {
                tracing::warn!(error = %e, "cannot turn transparent huge pages off");
            }
            let shutdown = Arc::new(AtomicBool::new(false));
            match tern_gateway::run(cfg, shutdown, true, |ready| {
                if let Some(quic) = ready.quic {
                    eprintln!("tern-gateway QUIC listening on {quic}");
                }
                if let Some(tls) = ready.tls {
                    eprintln!("tern-gateway TLS listening on {tls}");
                }
                if let Some(api) = &ready.api {
                    eprintln!("tern-gateway API listening on {api}");
                }
                match ready.tcp {
                    Some(tcp) => eprintln!("tern-gateway listening on {tcp}"),
                    None => eprintln!("tern-gateway listening, plaintext TCP disabled"),
                }
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
