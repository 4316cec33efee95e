//! `tern`: the command-line client. See `tern --help`; output formats are in
//! `tern_client::line`.

use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand, ValueEnum};
use tern_client::{
    Client, ClientConfig, ClientError, ContentType, Conversation, Event, GroupProfile, GroupRole,
    Incoming, JoinPolicy, ListKind, Platform, ReadState, Target, TargetKind, Transport,
    UserProfile, line,
};
use tokio::io::AsyncBufReadExt;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Command-line client for the Tern messaging gateway.
#[derive(Debug, Parser)]
#[command(name = "tern", version)]
struct Cli {
    /// Gateway address, HOST:PORT. For TLS and QUIC, HOST must be a name or IP address the
    /// gateway's certificate is valid for. For --transport dual: the TCP and the QUIC address,
    /// TCP_HOST:PORT,QUIC_HOST:PORT.
    #[arg(
        long,
        env = "TERN_SERVER",
        default_value = "127.0.0.1:7600",
        global = true
    )]
    server: String,
    /// How to reach the gateway: plain TCP, TLS over TCP, QUIC, or TCP and QUIC at once. The
    /// port is that of the gateway's listener for it.
    #[arg(
        long,
        env = "TERN_TRANSPORT",
        value_enum,
        default_value_t = TransportArg::Tcp,
        global = true
    )]
    transport: TransportArg,
    /// TLS, QUIC and dual only: PEM file with the certificate(s) to trust, e.g. the gateway's
    /// development certificate DATA_DIR/tls/cert.pem [default: the built-in Mozilla root
    /// certificates].
    #[arg(long, env = "TERN_CA", value_name = "PEM", global = true)]
    ca: Option<PathBuf>,
    /// TLS, QUIC and dual only: trust exactly the server certificate with this SHA-256 (64 hex
    /// digits; colons and a `sha256:` prefix are allowed), whatever its names, e.g. the
    /// development certificate reached by a LAN address. The gateway logs it at start.
    #[arg(long, env = "TERN_PIN", value_name = "SHA256", global = true, conflicts_with = "ca", value_parser = parse_pin)]
    pin: Option<[u8; 32]>,
    /// Login token (mint one with `tern-gateway token --user NAME`).
    #[arg(long, env = "TERN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// A shell command that prints a fresh login token, e.g. `tern-gateway token --data-dir
    /// ./demo --user bob --ttl 1h`: run for the first token when --token is not given, and
    /// again before each token expires, so that `listen` and `chat` stay logged in.
    #[arg(
        long,
        env = "TERN_TOKEN_COMMAND",
        value_name = "COMMAND",
        global = true
    )]
    token_command: Option<String>,
    /// Device id to log in as [default: cli-COMMAND, e.g. cli-listen]. A second login with the same device id
    /// kicks the first.
    #[arg(long, env = "TERN_DEVICE", global = true)]
    device: Option<String>,
    /// Seconds to keep retrying the first connection while the server refuses it or the
    /// `--ca` file does not exist yet (it may be starting). 0 = fail at once. Over QUIC a
    /// server that is not there yet does not refuse, it is silent: the handshake keeps trying
    /// for up to 10 s whatever this says.
    #[arg(long, env = "TERN_WAIT", default_value_t = 5, global = true)]
    wait: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    /// Plain TCP.
    Tcp,
    /// TLS 1.3 or 1.2 over TCP, ALPN tern/1 offered (see --ca).
    Tls,
    /// QUIC: TLS 1.3, ALPN tern/1, one stream (see --ca).
    Quic,
    /// TCP and QUIC at once as one session: each message goes both ways (see --server).
    Dual,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send one message and print its SendAck: `sent conversation=<id> seq=<n> time=<ms>`.
    Send {
        /// Recipient user id.
        #[arg(
            long,
            required_unless_present_any = ["group", "room"],
            conflicts_with_all = ["group", "room"]
        )]
        to: Option<String>,
        /// Recipient group id.
        #[arg(long, conflicts_with = "room")]
        group: Option<String>,
        /// Live room id. The room is entered first: only a connection in a room may send to it.
        #[arg(long)]
        room: Option<String>,
        /// Room messages only: keep the message for viewers too far behind for ordinary room
        /// messages (gifts, notices).
        #[arg(long, conflicts_with_all = ["to", "group"])]
        priority: bool,
        /// Client message id; repeat a send with the same id to retry it safely
        /// [default: random].
        #[arg(long)]
        id: Option<String>,
        /// The text to send.
        text: String,
    },
    /// Print each incoming message as it arrives, one line each:
    /// `conversation=<id> seq=<n> from=<user> time=<ms> text=<text>`.
    ///
    /// A change of a group prints `event=<kind>` and what it concerns instead of the text, e.g.
    /// `conversation=<id> seq=<n> from=<user> time=<ms> event=kicked users=bob,carol`. A
    /// recalled message prints `recalled=true` instead of its text, and the recall's tombstone
    /// `... event=recall recalled_seq=<recalled seq>`.
    ///
    /// What else the server pushes is printed as it comes, not counted by --count:
    /// `read conversation=<id> read_seq=<n>` (read on another device), `read conversation=<id>
    /// reader=<user> read_seq=<n>` (the other user read), `typing from=<user>
    /// target=<user|group>:<id> typing=<bool>`, `presence user=<user> online=<bool>
    /// devices=<n>`, `settings conversation=<id> pinned=<bool> hidden=<bool> muted=<bool>
    /// cleared_seq=<n>` and `friend event=<request|added|declined|deleted> user=<user>
    /// message=<text>`.
    Listen {
        /// Exit 0 after printing this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds (exit 0, or 1 if --count was not reached).
        #[arg(long)]
        timeout: Option<f64>,
        /// Of the messages this device has not acknowledged, print at most the latest N of each
        /// conversation (0: all). The older ones stay on the server for `tern history`, but
        /// count as delivered to this device: a later `listen` does not print them either.
        #[arg(long, default_value_t = 0, value_name = "N")]
        recent: u32,
    },
    /// Enter a live room and print each of its messages as it arrives, in the `listen` format:
    /// `conversation=<id> seq=<n> from=<user> time=<ms> text=<text>`.
    ///
    /// Rooms store no history: only messages sent while this command is in the room are
    /// printed, after the latest few with --recent. After a reconnect the room is entered again.
    Room {
        /// The room id.
        room: String,
        /// Exit 0 after printing this many messages.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds (exit 0, or 1 if --count was not reached).
        #[arg(long)]
        timeout: Option<f64>,
        /// First print up to N of the room's latest messages from before it entered (by default
        /// the server keeps the last 20 of each room, none older than 5 minutes); they count
        /// towards --count.
        #[arg(long, default_value_t = 0, value_name = "N")]
        recent: u32,
    },
    /// Print a conversation's history, oldest first, in the `listen` format.
    History {
        /// The 1:1 conversation with this user.
        #[arg(long, required_unless_present_any = ["group", "conversation"], conflicts_with_all = ["group", "conversation"])]
        with: Option<String>,
        /// The conversation of this group.
        #[arg(long, conflicts_with = "conversation")]
        group: Option<String>,
        /// The conversation with this id.
        #[arg(long)]
        conversation: Option<u64>,
        /// At most this many messages (the most recent ones before --before).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only messages with a seq below this.
        #[arg(long)]
        before: Option<u64>,
    },
    /// Chat with a user: lines typed on stdin are sent, incoming messages and events are
    /// printed as by `listen`.
    Chat {
        /// The user to chat with.
        user: String,
    },
    /// Mark a conversation read up to and including SEQ and print the resulting position:
    /// `read conversation=<id> read_seq=<n>` (never lower than before, at most the latest
    /// message).
    Read {
        /// The 1:1 conversation with this user.
        #[arg(long, required_unless_present_any = ["group", "conversation"], conflicts_with_all = ["group", "conversation"])]
        to: Option<String>,
        /// The conversation of this group.
        #[arg(long, conflicts_with = "conversation")]
        group: Option<String>,
        /// The conversation with this id.
        #[arg(long)]
        conversation: Option<u64>,
        /// The seq read up to.
        seq: u64,
    },
    /// Recall message SEQ of a conversation and print `recalled conversation=<id> seq=<n>
    /// event_seq=<n>`, `event_seq` being the seq of the tombstone added to the conversation
    /// (printed by `listen` as `... event=recall recalled_seq=<n>`).
    Recall {
        /// The conversation with this id.
        #[arg(long)]
        conversation: u64,
        /// The seq of the message to recall.
        seq: u64,
    },
    /// Friends and the blacklist.
    ///
    /// A change prints `friend <op> user=<user>` (`add` adds ` friends=true` when the other user
    /// had asked already, so you are friends at once); `list` prints `user=<user>
    /// message=<text>` for each user. `listen` prints friend events as `friend event=<request|
    /// added|declined|deleted> user=<user> message=<text>`.
    Friend {
        #[command(subcommand)]
        command: FriendCommand,
    },
    /// Set your profile or read profiles.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Create, join, leave and manage groups.
    ///
    /// A change prints `group=<id> conversation=<id> event_seq=<n>`: the sequence number of the
    /// event it added to the group's conversation (0 if nothing changed). Send to a group with
    /// `send --group GROUP`; `listen` and `history` print a group's changes as
    /// `conversation=<id> seq=<n> from=<user> time=<ms> event=<kind> ...`.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group owned by you.
    Create {
        /// The group id, 1 to 64 bytes.
        group: String,
        /// The group's name.
        #[arg(long)]
        name: Option<String>,
        /// Who may join [default: free].
        #[arg(long, value_enum)]
        policy: Option<PolicyArg>,
        /// Members to add besides you.
        members: Vec<String>,
    },
    /// Join a group whose policy is free.
    Join {
        /// The group id.
        group: String,
    },
    /// Leave a group (its owner transfers or dissolves it instead).
    Leave {
        /// The group id.
        group: String,
    },
    /// Add users to a group.
    Invite {
        /// The group id.
        group: String,
        /// The users to add.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove members from a group (owner and admins).
    Kick {
        /// The group id.
        group: String,
        /// The members to remove.
        #[arg(required = true)]
        users: Vec<String>,
        /// Why, recorded in the group's event.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Make a member an admin, or a member again (owner only).
    Role {
        /// The group id.
        group: String,
        /// The member.
        user: String,
        /// The new role.
        #[arg(value_enum)]
        role: RoleArg,
    },
    /// Mute a member for a while (owner and admins).
    Mute {
        /// The group id.
        group: String,
        /// The member.
        user: String,
        /// How long: a number with a unit, ms, s, m, h or d (10m, 1.5h; no unit: seconds).
        /// 0 unmutes.
        #[arg(value_parser = parse_duration)]
        duration: Duration,
    },
    /// Mute every member except the owner and admins, or lift it.
    MuteAll {
        /// The group id.
        group: String,
        /// Whether every member is muted.
        #[arg(value_enum)]
        state: Switch,
    },
    /// Change the group's profile (owner and admins): only the fields given change.
    #[command(group(clap::ArgGroup::new("change").required(true).multiple(true)))]
    Update {
        /// The group id.
        group: String,
        /// The new name.
        #[arg(long, group = "change")]
        name: Option<String>,
        /// The new notice.
        #[arg(long, group = "change")]
        notice: Option<String>,
        /// The new introduction.
        #[arg(long, group = "change")]
        introduction: Option<String>,
        /// The new avatar URL.
        #[arg(long, group = "change")]
        avatar_url: Option<String>,
        /// The new join policy.
        #[arg(long, value_enum, group = "change")]
        policy: Option<PolicyArg>,
        /// An application-defined field, KEY=VALUE; KEY= removes it. Repeatable.
        #[arg(long = "field", value_name = "KEY=VALUE", value_parser = parse_field, group = "change")]
        fields: Vec<(String, String)>,
    },
    /// Hand the ownership to another member (owner only); you become a member.
    Transfer {
        /// The group id.
        group: String,
        /// The new owner.
        user: String,
    },
    /// Dissolve the group (owner only); its id cannot be used again.
    Dissolve {
        /// The group id.
        group: String,
    },
    /// Print the group's info.
    ///
    /// First `group=<id> conversation=<id> owner=<user> members=<n> max_members=<n>
    /// muted_all=<bool> policy=<policy> created=<ms> latest_seq=<n> name=<name>`, then
    /// `notice=<text>`, `introduction=<text>`, `avatar_url=<text>` and `field=<key>=<value>`
    /// lines for what is set.
    Info {
        /// The group id.
        group: String,
    },
    /// Print every member, one line each.
    ///
    /// `member=<user> role=<owner|admin|member> muted_until=<ms> joined=<ms>`, muted_until 0
    /// if not muted.
    Members {
        /// The group id.
        group: String,
        /// Members per request [default: the server's].
        #[arg(long)]
        limit: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum FriendCommand {
    /// Ask a user to be friends (or accept their request, if they asked first).
    Add {
        /// The user.
        user: String,
        /// Shown to the user with the request.
        #[arg(long, default_value = "")]
        message: String,
    },
    /// Accept a user's friend request.
    Accept {
        /// The user who asked.
        user: String,
    },
    /// Decline a user's friend request.
    Decline {
        /// The user who asked.
        user: String,
    },
    /// End a friendship.
    Delete {
        /// The friend.
        user: String,
    },
    /// Block a user: their 1:1 messages and friend requests are refused, and a friendship with
    /// them ends (unless the server keeps friends).
    Block {
        /// The user.
        user: String,
    },
    /// Unblock a user.
    Unblock {
        /// The user.
        user: String,
    },
    /// Print every user of a list, one `user=<user> message=<text>` line each (the message of
    /// a friend request; empty otherwise).
    List {
        /// Which list.
        #[arg(value_enum, default_value_t = ListArg::Friends)]
        list: ListArg,
        /// Users per request [default: the server's].
        #[arg(long)]
        limit: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListArg {
    /// Your friends.
    Friends,
    /// Friend requests others sent you, waiting for accept or decline.
    Requests,
    /// Friend requests you sent.
    Sent,
    /// The users you blocked.
    Blocked,
}

impl From<ListArg> for ListKind {
    fn from(list: ListArg) -> Self {
        match list {
            ListArg::Friends => Self::ListFriends,
            ListArg::Requests => Self::ListRequestsReceived,
            ListArg::Sent => Self::ListRequestsSent,
            ListArg::Blocked => Self::ListBlocked,
        }
    }
}

#[derive(Debug, Subcommand)]
enum ProfileCommand {
    /// Replace your profile with the one given (what is not given is cleared) and print
    /// `profile set`.
    Set {
        /// Your nickname.
        #[arg(long, default_value = "")]
        nickname: String,
        /// Your avatar's URL.
        #[arg(long, default_value = "")]
        avatar_url: String,
        /// An application-defined field, KEY=VALUE. Repeatable.
        #[arg(long = "field", value_name = "KEY=VALUE", value_parser = parse_field)]
        fields: Vec<(String, String)>,
    },
    /// Print users' profiles: `user=<user> avatar_url=<url> nickname=<name>`, then `user=<user>
    /// field=<key>=<value>` for each field. Users without a profile are left out.
    Get {
        /// The users (at most 100).
        #[arg(required = true)]
        users: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PolicyArg {
    /// Anyone may join.
    Free,
    /// Members invite users; nobody joins by themselves.
    InviteOnly,
    /// The owner and admins invite users; nobody joins by themselves.
    Approval,
}

impl From<PolicyArg> for JoinPolicy {
    fn from(policy: PolicyArg) -> Self {
        match policy {
            PolicyArg::Free => Self::Free,
            PolicyArg::InviteOnly => Self::InviteOnly,
            PolicyArg::Approval => Self::Approval,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    /// An admin.
    Admin,
    /// A member.
    Member,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    /// Mute.
    On,
    /// Lift the mute.
    Off,
}

/// Parses a duration: a non-negative number with an optional unit, `ms`, `s`, `m`, `h` or `d`
/// (no unit: seconds), e.g. `10m`, `1.5h`, `0`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "`{text}` is not a duration: a number with an optional unit ms, s, m, h or d (e.g. 10m)"
        )
    };
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "ms" => number / 1e3,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86_400.0,
        _ => return Err(invalid()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

/// Parses `KEY=VALUE` (split at the first `=`; the value may be empty).
fn parse_field(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Self::Send { .. } => "send",
            Self::Listen { .. } => "listen",
            Self::Room { .. } => "room",
            Self::History { .. } => "history",
            Self::Chat { .. } => "chat",
            Self::Read { .. } => "read",
            Self::Recall { .. } => "recall",
            Self::Friend { .. } => "friend",
            Self::Profile { .. } => "profile",
            Self::Group { .. } => "group",
        }
    }
}

fn platform() -> Platform {
    match std::env::consts::OS {
        "linux" => Platform::Linux,
        "macos" => Platform::Macos,
        "windows" => Platform::Windows,
        _ => Platform::Other,
    }
}

fn fail(e: &ClientError) -> ExitCode {
    eprintln!("{}", line::error(e));
    match e {
        // A bad option, found before any connection: a usage error.
        ClientError::Config(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

/// Prints `text` and flushes; false if stdout is gone (a closed pipe).
fn print_line(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped instead of panicking in eprintln!.
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(cli));
    // Do not wait for the blocking stdin reader of `chat`: it cannot be cancelled.
    runtime.shutdown_background();
    code
}

async fn run(cli: Cli) -> ExitCode {
    let transport = match cli.transport {
        TransportArg::Tcp => Transport::Tcp,
        TransportArg::Tls => Transport::Tls,
        TransportArg::Quic => Transport::Quic,
        TransportArg::Dual => Transport::Dual,
    };
    let source = cli.token_command.clone().map(|command| {
        tern_client::TokenSource::new(move || {
            let command = command.clone();
            async move { run_token_command(&command).await }
        })
    });
    let token = match (cli.token.filter(|t| !t.is_empty()), &cli.token_command) {
        (Some(token), _) => token,
        (None, Some(command)) => {
            match tokio::time::timeout(TOKEN_COMMAND_TIMEOUT, run_token_command(command))
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "token command: no token within {TOKEN_COMMAND_TIMEOUT:?}"
                    ))
                }) {
                Ok(token) => token,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        (None, None) => {
            eprintln!(
                "error: a token is required: --token TOKEN, TERN_TOKEN or --token-command COMMAND"
            );
            return ExitCode::from(2);
        }
    };
    let device = cli
        .device
        .unwrap_or_else(|| format!("cli-{}", cli.command.name()));
    let mut config = ClientConfig::new(&cli.server, token, device);
    config.platform = platform();
    config.transport = transport;
    config.ca = cli.ca;
    config.pin = cli.pin;
    config.token_source = source;
    if matches!(
        cli.command,
        Command::Send { .. }
            | Command::History { .. }
            | Command::Read { .. }
            | Command::Recall { .. }
            | Command::Friend { .. }
            | Command::Profile { .. }
            | Command::Group { .. }
    ) {
        // One request and out: nothing to sync, nothing to reconnect for.
        config.sync_on_login = false;
        config.reconnect = false;
    }
    if matches!(cli.command, Command::Room { .. }) {
        // Live messages only: rooms are never synced.
        config.sync_on_login = false;
    }
    if let Command::Listen { recent, .. } = &cli.command {
        // The CLI keeps no sync position: every run is a first sync.
        config.initial_sync_limit = *recent;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(cli.wait);
    let mut delay = std::time::Duration::from_millis(20);
    let mut told = false;
    let client = loop {
        let e = match Client::connect(config.clone()).await {
            Ok(client) => break client,
            Err(e) => e,
        };
        // A server that is starting refuses connections; one starting for the first time also
        // writes its development certificate (the `--ca` file) only once its log is open.
        let starting = match &e {
            tern_client::ClientError::Io(io) => io.kind() == std::io::ErrorKind::ConnectionRefused,
            tern_client::ClientError::CaFile { path, .. } => matches!(path.try_exists(), Ok(false)),
            _ => false,
        };
        if !starting || std::time::Instant::now() + delay >= deadline {
            return fail(&e);
        }
        if let tern_client::ClientError::CaFile { path, .. } = &e
            && !told
        {
            eprintln!("# waiting for {} (--wait {}s)", path.display(), cli.wait);
            told = true;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_millis(500));
    };
    let code = match cli.command {
        Command::Send {
            to,
            group,
            room,
            priority,
            id,
            text,
        } => {
            let target = match (to, group, room) {
                (Some(user), _, _) => Target::user(user),
                (None, Some(group), _) => Target::group(group),
                (None, None, Some(room)) => match client.enter_room(&room).await {
                    Ok(_) => Target::new(TargetKind::Room, room),
                    Err(e) => return close_with(&client, fail(&e)).await,
                },
                (None, None, None) => unreachable!("clap requires --to, --group or --room"),
            };
            let send = tern_protocol::Send {
                client_msg_id: id.unwrap_or_else(tern_client::new_client_msg_id),
                target: Some(target),
                content_type: ContentType::Text as u32,
                custom_type: String::new(),
                payload: text.into(),
                priority,
            };
            match client.send_message(send).await {
                Ok(ack) => {
                    print_line(&line::send_ack(&ack));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Listen { count, timeout, .. } => listen(&client, count, timeout, None).await,
        Command::Room {
            room,
            count,
            timeout,
            recent,
        } => match client.enter_room_with_recent(&room, recent).await {
            Ok(entered) => {
                eprintln!(
                    "# in room={} conversation={}",
                    entered.room_id, entered.conversation_id
                );
                // The latest of them, if --count allows fewer.
                let recent = &entered.recent;
                let skip = count.map_or(0, |n| recent.len().saturating_sub(n as usize));
                for m in &recent[skip..] {
                    if !print_line(&line::message(m)) {
                        return close_with(&client, ExitCode::SUCCESS).await;
                    }
                }
                let shown = (recent.len() - skip) as u64;
                let count = count.map(|n| n.saturating_sub(shown));
                listen(&client, count, timeout, Some(entered.conversation_id)).await
            }
            Err(e) => fail(&e),
        },
        Command::History {
            with,
            group,
            conversation,
            limit,
            before,
        } => {
            let conversation = match (with, group, conversation) {
                (Some(user), _, _) => Conversation::With(Target::user(user)),
                (None, Some(group), _) => Conversation::With(Target::group(group)),
                (None, None, Some(id)) => Conversation::Id(id),
                (None, None, None) => unreachable!("clap requires one of them"),
            };
            history(&client, conversation, limit, before.unwrap_or(0)).await
        }
        Command::Chat { user } => chat(&client, &user).await,
        Command::Read {
            to,
            group,
            conversation,
            seq,
        } => {
            let conversation = match (to, group, conversation) {
                (Some(user), _, _) => Conversation::With(Target::user(user)),
                (None, Some(group), _) => Conversation::With(Target::group(group)),
                (None, None, Some(id)) => Conversation::Id(id),
                (None, None, None) => unreachable!("clap requires one of them"),
            };
            read(&client, conversation, seq).await
        }
        Command::Recall { conversation, seq } => match client.recall(conversation, seq).await {
            Ok(ok) => {
                print_line(&line::recall_ok(&ok));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Friend { command } => friend(&client, command).await,
        Command::Profile { command } => profile(&client, command).await,
        Command::Group { command } => group(&client, command).await,
    };
    close_with(&client, code).await
}

/// Closes the client, then returns `code`.
async fn close_with(client: &Client, code: ExitCode) -> ExitCode {
    client.close().await;
    code
}

/// What the CLI does with one event; `Some(code)` ends the command.
fn show(event: Option<Event>) -> Result<bool, ExitCode> {
    match event {
        Some(Event::Message(m)) => {
            if print_line(&line::message(&m)) {
                Ok(true)
            } else {
                Err(ExitCode::SUCCESS)
            }
        }
        Some(Event::Disconnected { reason }) => {
            eprintln!("# disconnected ({reason}); reconnecting");
            Ok(false)
        }
        Some(Event::Reconnected) => {
            eprintln!("# reconnected");
            Ok(false)
        }
        Some(Event::Kicked(kick)) => {
            eprintln!(
                "# kicked: {} {}",
                tern_client::KickReason::try_from(kick.reason)
                    .map_or("UNKNOWN", |r| r.as_str_name()),
                kick.message
            );
            Ok(false)
        }
        Some(Event::RoomLost { reason, .. } | Event::Stopped(reason)) => Err(fail(&reason)),
        None => Err(fail(&ClientError::Closed)),
        Some(event) => match pushed(&event) {
            Some(text) if !print_line(&text) => Err(ExitCode::SUCCESS),
            _ => Ok(false),
        },
    }
}

/// The line for what the server pushed besides messages (read positions and receipts, typing,
/// presence, conversation settings, friend events); `None` for other events.
fn pushed(event: &Event) -> Option<String> {
    Some(match event {
        Event::ReadState(s) => line::read_state(s),
        Event::ReadReceipt(r) => line::read_receipt(r),
        Event::Typing(t) => line::typing(t),
        Event::Presence(p) => line::presence(p),
        Event::ConversationSettings(s) => line::conversation_settings(s),
        Event::Social(e) => line::social_event(e),
        Event::Push(p) => line::push_notice(p),
        _ => return None,
    })
}

async fn next(incoming: &mut Incoming, deadline: Option<Instant>) -> Option<Option<Event>> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at.into(), incoming.recv())
            .await
            .ok(),
        None => Some(incoming.recv().await),
    }
}

/// Prints incoming messages (only those of conversation `only` if given) until `count` of
/// them or `timeout` seconds.
async fn listen(
    client: &Client,
    count: Option<u64>,
    timeout: Option<f64>,
    only: Option<u64>,
) -> ExitCode {
    let mut incoming = client.incoming();
    if let Some(ok) = client.login() {
        eprintln!("# listening as user={} device={}", ok.user_id, ok.device_id);
    }
    let deadline = match timeout.map(Duration::try_from_secs_f64) {
        None => None,
        Some(Ok(d)) => Some(Instant::now() + d),
        Some(Err(_)) => {
            eprintln!("error: --timeout must be a non-negative number of seconds");
            return ExitCode::from(2);
        }
    };
    let mut printed = 0u64;
    loop {
        if count.is_some_and(|n| printed >= n) {
            return ExitCode::SUCCESS;
        }
        let Some(event) = next(&mut incoming, deadline).await else {
            return match count {
                Some(n) => {
                    eprintln!("error: timed out after {printed} of {n} messages");
                    ExitCode::FAILURE
                }
                None => ExitCode::SUCCESS,
            };
        };
        if let Some(only) = only {
            match &event {
                Some(Event::Message(m)) if m.conversation_id != only => continue,
                // Only the room's messages.
                Some(other) if pushed(other).is_some() => continue,
                _ => {}
            }
        }
        match show(event) {
            Ok(true) => printed += 1,
            Ok(false) => {}
            Err(code) => return code,
        }
    }
}

async fn history(client: &Client, conversation: Conversation, limit: u32, before: u64) -> ExitCode {
    let mut messages = Vec::new();
    let mut before = before;
    loop {
        let remaining = limit.saturating_sub(u32::try_from(messages.len()).unwrap_or(u32::MAX));
        let page = match client
            .history(conversation.clone(), before, remaining)
            .await
        {
            Ok(page) => page,
            Err(e) => return fail(&e),
        };
        let Some(oldest) = page.messages.last().map(|m| m.seq) else {
            break;
        };
        messages.extend(page.messages);
        if !page.has_more || limit == 0 || messages.len() >= limit as usize || oldest <= 1 {
            break;
        }
        before = oldest;
    }
    if limit > 0 {
        messages.truncate(limit as usize);
    }
    // Pages come newest first; print oldest first.
    for m in messages.iter().rev() {
        if !print_line(&line::message(m)) {
            break;
        }
    }
    ExitCode::SUCCESS
}

async fn group(client: &Client, command: GroupCommand) -> ExitCode {
    let changed = match command {
        GroupCommand::Create {
            group,
            name,
            policy,
            members,
        } => {
            let profile = GroupProfile {
                name,
                join_policy: policy.map(|p| JoinPolicy::from(p).into()),
                ..Default::default()
            };
            client.create_group(group, profile, members).await
        }
        GroupCommand::Join { group } => client.join_group(group).await,
        GroupCommand::Leave { group } => client.leave_group(group).await,
        GroupCommand::Invite { group, users } => client.invite(group, users).await,
        GroupCommand::Kick {
            group,
            users,
            reason,
        } => client.kick_members(group, users, reason).await,
        GroupCommand::Role { group, user, role } => {
            let role = match role {
                RoleArg::Admin => GroupRole::RoleAdmin,
                RoleArg::Member => GroupRole::RoleMember,
            };
            client.set_role(group, user, role).await
        }
        GroupCommand::Mute {
            group,
            user,
            duration,
        } => client.mute_member(group, user, duration).await,
        GroupCommand::MuteAll { group, state } => client.mute_all(group, state == Switch::On).await,
        GroupCommand::Update {
            group,
            name,
            notice,
            introduction,
            avatar_url,
            policy,
            fields,
        } => {
            let profile = GroupProfile {
                name,
                notice,
                introduction,
                avatar_url,
                join_policy: policy.map(|p| JoinPolicy::from(p).into()),
                custom: fields.into_iter().collect(),
            };
            client.update_group(group, profile).await
        }
        GroupCommand::Transfer { group, user } => client.transfer_owner(group, user).await,
        GroupCommand::Dissolve { group } => client.dissolve_group(group).await,
        GroupCommand::Info { group } => {
            return match client.group_info(group).await {
                Ok(info) => {
                    for text in line::group_info(&info) {
                        if !print_line(&text) {
                            break;
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
        GroupCommand::Members { group, limit } => {
            return members(client, &group, limit.unwrap_or(0)).await;
        }
    };
    match changed {
        Ok(response) => {
            print_line(&line::group_response(&response));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Marks `conversation` read up to `seq` and prints the resulting position. A conversation
/// named by its user or group is looked up first (one message of its history).
async fn read(client: &Client, conversation: Conversation, seq: u64) -> ExitCode {
    let conversation_id = match conversation {
        Conversation::Id(id) => id,
        with @ Conversation::With(_) => match client.history(with, 0, 1).await {
            Ok(page) => page.conversation_id,
            Err(e) => return fail(&e),
        },
    };
    match client.mark_read(conversation_id, seq).await {
        Ok(read_seq) => {
            print_line(&line::read_state(&ReadState {
                conversation_id,
                read_seq,
            }));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

async fn friend(client: &Client, command: FriendCommand) -> ExitCode {
    let (op, user, done) = match command {
        FriendCommand::Add { user, message } => {
            let done = client.add_friend(&user, message).await;
            ("add", user, done)
        }
        FriendCommand::Accept { user } => {
            let done = client.accept_friend(&user).await.map(|()| false);
            ("accept", user, done)
        }
        FriendCommand::Decline { user } => {
            let done = client.decline_friend(&user).await.map(|()| false);
            ("decline", user, done)
        }
        FriendCommand::Delete { user } => {
            let done = client.delete_friend(&user).await.map(|()| false);
            ("delete", user, done)
        }
        FriendCommand::Block { user } => {
            let done = client.block(&user).await.map(|()| false);
            ("block", user, done)
        }
        FriendCommand::Unblock { user } => {
            let done = client.unblock(&user).await.map(|()| false);
            ("unblock", user, done)
        }
        FriendCommand::List { list, limit } => {
            return list_users(client, list.into(), limit.unwrap_or(0)).await;
        }
    };
    match done {
        Ok(friends) => {
            print_line(&line::friend_done(op, &user, friends));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Prints every user of list `kind`, asking for pages of `limit` until the last.
async fn list_users(client: &Client, kind: ListKind, limit: u32) -> ExitCode {
    let mut token = 0;
    loop {
        let page = match client.list_users(kind, token, limit).await {
            Ok(page) => page,
            Err(e) => return fail(&e),
        };
        for user in &page.users {
            if !print_line(&line::listed_user(user)) {
                return ExitCode::SUCCESS;
            }
        }
        if page.next_page_token == 0 {
            return ExitCode::SUCCESS;
        }
        if page.next_page_token == token {
            return fail(&ClientError::Protocol(format!(
                "the list page after token {token} points at itself"
            )));
        }
        token = page.next_page_token;
    }
}

async fn profile(client: &Client, command: ProfileCommand) -> ExitCode {
    match command {
        ProfileCommand::Set {
            nickname,
            avatar_url,
            fields,
        } => {
            let profile = UserProfile {
                user_id: String::new(),
                nickname,
                avatar_url,
                custom: fields.into_iter().collect(),
            };
            match client.set_profile(profile).await {
                Ok(()) => {
                    print_line("profile set");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        ProfileCommand::Get { users } => match client.get_profiles(users).await {
            Ok(profiles) => {
                for text in profiles.iter().flat_map(line::profile) {
                    if !print_line(&text) {
                        break;
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

/// Prints every member of `group`, asking for pages of `limit` until the last.
async fn members(client: &Client, group: &str, limit: u32) -> ExitCode {
    let mut token = 0;
    loop {
        let page = match client.list_members(group, token, limit).await {
            Ok(page) => page,
            Err(e) => return fail(&e),
        };
        for member in &page.members {
            if !print_line(&line::group_member(member)) {
                return ExitCode::SUCCESS;
            }
        }
        if page.next_page_token == 0 {
            return ExitCode::SUCCESS;
        }
        if page.next_page_token == token {
            return fail(&ClientError::Protocol(format!(
                "the member page after token {token} points at itself"
            )));
        }
        token = page.next_page_token;
    }
}

async fn chat(client: &Client, user: &str) -> ExitCode {
    let mut incoming = client.incoming();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    if let Some(ok) = client.login() {
        eprintln!("# chatting with {user} as {}; end with Ctrl-D", ok.user_id);
    }
    // Lines are sent one after the other, in the order typed, by their own task: a send that
    // waits for a reconnect holds up the later lines, not the incoming messages.
    let (lines, mut to_send) = tokio::sync::mpsc::unbounded_channel::<String>();
    let sender = {
        let (client, user) = (client.clone(), user.to_owned());
        tokio::spawn(async move {
            while let Some(text) = to_send.recv().await {
                match client
                    .send(Target::user(&user), ContentType::Text as u32, text)
                    .await
                {
                    Ok(ack) => {
                        print_line(&line::send_ack(&ack));
                    }
                    Err(e) => eprintln!("{}", line::error(&e)),
                }
            }
        })
    };
    // Until the input ends (or cannot be read): true if it ended.
    let ended = loop {
        tokio::select! {
            read = stdin.next_line() => match read {
                Ok(Some(text)) if text.trim().is_empty() => {}
                Ok(Some(text)) => {
                    let _ = lines.send(text);
                }
                Ok(None) => break true,
                Err(e) => {
                    eprintln!("error: reading stdin: {e}");
                    break false;
                }
            },
            event = incoming.recv() => {
                if let Err(code) = show(event) {
                    return code;
                }
            }
        }
    };
    // The lines read are sent, then what has arrived is printed.
    drop(lines);
    let _ = sender.await;
    if !ended {
        return ExitCode::FAILURE;
    }
    while let Some(event) = incoming.try_recv() {
        if let Err(code) = show(Some(event)) {
            return code;
        }
    }
    ExitCode::SUCCESS
}

/// How long the first `--token-command` may take (later ones are bounded by the client's
/// request timeout).
const TOKEN_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `--token-command` with `sh -c` and returns the first line it printed. The shell is
/// killed if the future is dropped (a timeout).
async fn run_token_command(command: &str) -> Result<String, String> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("token command: cannot run sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "token command failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    match String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::trim)
    {
        Some(token) if !token.is_empty() => Ok(token.to_owned()),
        _ => Err("token command printed no token".to_owned()),
    }
}

/// `--pin`: 64 hex digits (colons between bytes allowed), with or without `sha256:`.
fn parse_pin(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text
        .strip_prefix("sha256:")
        .unwrap_or(text)
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "expected the certificate's SHA-256 as 64 hex digits, got {} characters",
            digits.len()
        ));
    }
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
            .map_err(|e| format!("not hex: {e}"))?;
    }
    Ok(pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF";
        let mut want = [0u8; 32];
        for (i, b) in want.iter_mut().enumerate() {
            *b = u8::try_from(i % 16).unwrap() * 0x11;
        }
        assert_eq!(parse_pin(hex), Ok(want));
        assert_eq!(parse_pin(&format!("sha256:{hex}")), Ok(want));
        let colons: Vec<String> = (0..32).map(|i| hex[2 * i..2 * i + 2].to_owned()).collect();
        assert_eq!(parse_pin(&colons.join(":")), Ok(want));
        for bad in [
            "",
            "abc",
            &hex[1..],
            &format!("{hex}00"),
            &hex.replace('f', "g"),
        ] {
            assert!(parse_pin(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        for bad in ["", "m", "10x", "-1m", "ten", "1h30m", "inf"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fields() {
        assert_eq!(
            parse_field("topic=books"),
            Ok(("topic".into(), "books".into()))
        );
        assert_eq!(parse_field("topic="), Ok(("topic".into(), String::new())));
        assert_eq!(parse_field("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_field("topic").is_err());
        assert!(parse_field("=x").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
