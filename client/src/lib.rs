//! Async Rust client for the Tern instant-messaging gateway, and the `tern` command-line client
//! built on it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, ContentType, Event, Target};
//!
//! let client = Client::connect(ClientConfig::new("127.0.0.1:7600", "TOKEN", "laptop")).await?;
//! let mut incoming = client.incoming();
//! let ack = client.send(Target::user("bob"), ContentType::Text as u32, "hi bob").await?;
//! println!("stored as seq {} of conversation {}", ack.seq, ack.conversation_id);
//! while let Some(event) = incoming.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("{}: {:?}", m.sender, m.payload);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Groups ([`Client::group`] and its conveniences) are managed with requests; their messages
//! are sent like any other, to [`Target::group`]. Every change of a group is a message in its
//! conversation as well, which [`group_event`] decodes:
//!
//! ```no_run
//! # async fn demo(client: tern_client::Client) -> Result<(), tern_client::ClientError> {
//! use tern_client::{ContentType, Event, GroupProfile, JoinPolicy, Target, group_event};
//!
//! let profile = GroupProfile {
//!     name: Some("Book club".into()),
//!     join_policy: Some(JoinPolicy::InviteOnly.into()),
//!     ..Default::default()
//! };
//! let created = client.create_group("books", profile, ["bob", "carol"]).await?;
//! println!("conversation {}", created.conversation_id);
//! client.send(Target::group("books"), ContentType::Text as u32, "welcome").await?;
//! let mut incoming = client.incoming();
//! while let Some(event) = incoming.recv().await {
//!     if let Event::Message(m) = event
//!         && let Some(change) = group_event(&m)
//!     {
//!         println!("{:?} by {}: {:?}", change.kind(), change.actor, change.user_ids);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Live rooms ([`Client::enter_room`], [`Client::leave_room`], [`Client::send_room`]) are for
//! live streams: anyone may enter, and a room's messages reach only the connections in it at
//! that moment, as [`Event::Message`] with a `ROOM` target and the room's conversation id
//! ([`is_room_conversation`]). Nothing is stored: no history beyond the latest few messages
//! [`Client::enter_room_with_recent`] may ask for, no sync, no acks (the client sends none for
//! rooms), and the seqs number the room's messages of one server run. A viewer that
//! falls behind misses room messages, priority ones last (`send_room(.., priority: true)` for
//! gifts and notices). Membership belongs to a connection, so the client remembers the rooms
//! the application entered and enters them again on each new connection: after a reconnect,
//! before [`Event::Reconnected`] is reported and before any other request on the new
//! connection (a room the server refuses then is reported as [`Event::RoomLost`]); and with the
//! dual channel on a path that joins the session. A room stays entered from
//! [`Client::enter_room`] until [`Client::leave_room`] or until the server refuses that
//! EnterRoom; de-duplication of rooms starts afresh with each new session, whose room messages
//! are all new (a restarted server numbers them from 1 again).
//!
//! ```no_run
//! # async fn demo(client: tern_client::Client) -> Result<(), tern_client::ClientError> {
//! use tern_client::{ContentType, Event};
//!
//! let room = client.enter_room("launch-stream").await?.conversation_id;
//! client.send_room("launch-stream", ContentType::Text as u32, "hello", false).await?;
//! let mut incoming = client.incoming();
//! while let Some(event) = incoming.recv().await {
//!     match event {
//!         Event::Message(m) if m.conversation_id == room => {
//!             println!("{}: {:?}", m.sender, m.payload);
//!         }
//!         Event::RoomLost { room_id, reason } => eprintln!("out of {room_id}: {reason}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Read positions and receipts: [`Client::mark_read`] moves this user's read position in a
//! conversation (returned; the user's other devices get [`Event::ReadState`], and the other
//! user of a 1:1 conversation [`Event::ReadReceipt`]); [`Client::read_counts`] tells how many
//! members read given messages. [`Client::typing`] is fire and forget: nothing answers it
//! unless the server refuses it, and others' typing arrives as [`Event::Typing`].
//! [`Client::subscribe_presence`] follows users (see Presence below); their state arrives as
//! [`Event::Presence`].
//! [`Client::set_conversation`] pins, hides, mutes or clears a conversation for this user (other
//! devices: [`Event::ConversationSettings`]). [`Client::recall`] recalls a message: the message
//! is then served with `recalled` set and no payload, and a tombstone message follows it in the
//! conversation, which [`recall_event`] decodes. Friends, the blacklist and profiles go through
//! [`Client::social`] and its conveniences ([`Client::add_friend`], [`Client::list_users`],
//! [`Client::get_profiles`], ...); friend requests and changes arrive as [`Event::Social`].
//!
//! ```no_run
//! # async fn demo(client: tern_client::Client) -> Result<(), tern_client::ClientError> {
//! use tern_client::{Event, ListKind, Target, recall_event};
//!
//! client.typing(Target::user("alice"), true)?;
//! let read = client.mark_read(12, 40).await?;
//! println!("read up to {read}");
//! let mut token = 0;
//! loop {
//!     let page = client.list_users(ListKind::ListFriends, token, 100).await?;
//!     for friend in &page.users {
//!         println!("friend {}", friend.user_id);
//!     }
//!     if page.next_page_token == 0 {
//!         break;
//!     }
//!     token = page.next_page_token;
//! }
//! client.subscribe_presence(["alice"], false).await?;
//! let mut incoming = client.incoming();
//! while let Some(event) = incoming.recv().await {
//!     match event {
//!         Event::Presence(p) => println!("{} online={}", p.user_id, p.online),
//!         Event::ReadReceipt(r) => println!("{} read up to {}", r.reader, r.read_seq),
//!         Event::Social(e) => println!("{:?} from {}", e.kind(), e.user_id),
//!         Event::Message(m) => match recall_event(&m) {
//!             Some(recall) => println!("{} recalled seq {}", recall.actor, recall.seq),
//!             None if m.recalled => println!("seq {} (recalled)", m.seq),
//!             None => println!("{}: {:?}", m.sender, m.payload),
//!         },
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Presence: the server follows users for one connection only, so the client remembers whom the
//! application follows and follows them again on each new connection that carries presence:
//! after a reconnect, before [`Event::Reconnected`] is reported and before any other request
//! on the new connection except entering rooms; and with the dual channel, on the other path
//! when the path that carried presence is lost while the session goes on (presence is followed
//! on one path only, and pushed only there). A user is followed from the answer to
//! [`Client::subscribe_presence`] until the answer to its unsubscription: a call that fails,
//! including one whose connection is lost before the answer, changes nothing the client keeps
//! (call it again). The client tells the application a user's online state only when it
//! differs from what it told last: the first state after a subscription, then each change. So
//! after a reconnect (or a lost path) there is an [`Event::Presence`] for each followed user
//! whose online state changed meanwhile and for no other, and the application ends up with
//! every followed user's current state; a user who went offline and came back while the client
//! was away is not reported. `Presence::devices` is the count when the state changed; changes
//! of the count alone are not reported. Presence of a user the client does not follow (e.g. a
//! notice already on its way when an unsubscription was answered) is handed over as it comes. If
//! the server refuses to follow users again (e.g. `LIMIT_EXCEEDED`), they are no longer
//! followed and [`Event::PresenceLost`] names them; presence is best effort on the server too
//! (a notice to a connection whose queue is full is dropped).
//!
//! ```no_run
//! # async fn demo(client: tern_client::Client) -> Result<(), tern_client::ClientError> {
//! use std::collections::HashMap;
//! use tern_client::Event;
//!
//! client.subscribe_presence(["alice", "bob"], false).await?;
//! let mut online = HashMap::new();
//! let mut incoming = client.incoming();
//! while let Some(event) = incoming.recv().await {
//!     match event {
//!         // Right after subscribing, after a reconnect, and on every change.
//!         Event::Presence(p) => {
//!             online.insert(p.user_id, p.online);
//!         }
//!         Event::PresenceLost { user_ids, reason } => {
//!             eprintln!("no longer following {user_ids:?}: {reason}");
//!             for user in user_ids {
//!                 online.remove(&user);
//!             }
//!         }
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! What it does: one connection task per [`Client`] owns the socket, logs in, matches answers to
//! requests by request id, hands every (conversation, seq) to the application exactly once
//! (sync pages and live pushes overlap; see [`dedup`]), acknowledges delivered messages
//! (coalesced per conversation; not those of rooms), pings when idle, and reconnects with
//! exponential backoff and full jitter, resuming from the last sync position, entering its
//! rooms and following its users again. A Send in flight when the connection drops, or made
//! while the client reconnects, is sent again with the same client message id once the client
//! is connected again (the server stores it once; its SendAck may then say `duplicate`), within
//! the call's [`ClientConfig::request_timeout`]; other requests in flight fail with
//! [`ClientError::Disconnected`].
//!
//! Tokens expire (`HelloOk.token_expires_at` in [`Client::login`]): the server ends a session
//! whose token expired (Kick `EXPIRED`). With a [`TokenSource`] in
//! [`ClientConfig::token_source`] the client asks it for a fresh token before that and hands it
//! to the server without reconnecting, and logs in again with a fresh one if the session ended
//! anyway; without one, call [`Client::refresh_token`], or the client stops
//! ([`Event::Stopped`]) when the token expires.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, TokenSource};
//!
//! let mut config = ClientConfig::new("127.0.0.1:7600", "TOKEN", "laptop");
//! // Typically an HTTPS call to the application's backend, which mints tokens.
//! config.token_source = Some(TokenSource::new(|| async { Ok("NEW TOKEN".to_owned()) }));
//! let client = Client::connect(config).await?;
//! # Ok(()) }
//! ```
//!
//! Transports ([`ClientConfig::transport`]), each carrying the same frames, with timeouts,
//! heartbeats and reconnects working the same:
//!
//! - [`Transport::Tcp`] (the default): plain TCP.
//! - [`Transport::Tls`]: TLS 1.3 or 1.2 over TCP. ALPN `tern/1` is offered, and a server that
//!   selects no protocol is accepted. [`ClientConfig::connect_timeout`] bounds the TCP connect
//!   and the handshake together; [`Client::close`] sends a TLS close_notify (bounded by a short
//!   grace period). A server that ends the TCP connection without close_notify (the gateway
//!   does) is a lost connection like a TCP one, not a TLS error.
//! - [`Transport::Quic`]: one QUIC connection per session, TLS 1.3 with ALPN `tern/1` required,
//!   and one bidirectional stream that the client opens and writes its Hello on.
//! - [`Transport::Dual`]: one session over a plain TCP and a QUIC connection at once (the dual
//!   channel; [`ClientConfig::server`] is `TCP_ADDR,QUIC_ADDR`). It logs in over TCP (QUIC if
//!   TCP fails) and joins the other path in the background. Every `Send` goes out on both paths
//!   (stored once; the first SendAck answers the call, and it may be the one flagged
//!   `duplicate`; the server de-duplicates room Sends too); deliveries come on both and are
//!   handed over once. EnterRoom and LeaveRoom go on both paths as well (room messages reach
//!   only the connections in the room; the first answer answers the call), and a path that
//!   joins enters the rooms again. SubscribePresence goes on the path that carries presence
//!   (see Presence). Other requests use one path. When a path fails
//!   ([`Event::PathDown`]) the session goes on over the other; requests made on the failed path
//!   only fail with [`ClientError::Disconnected`] (a sync and a Send are asked again: such a
//!   Send, made while only the failed path was up, may then be stored after Sends made later
//!   on both paths); the path is joined
//!   again with its own backoff ([`Event::PathUp`]). Each path has its own heartbeat, so a path
//!   whose network goes silent is noticed within three heartbeat intervals. Only when both
//!   paths are down does the client reconnect as a new session, alternating between TCP and
//!   QUIC.
//!
//! TLS and QUIC check the server's certificate the same way, with the same code: against the PEM
//! file in [`ClientConfig::ca`] (e.g. the gateway's development certificate,
//! `<data-dir>/tls/cert.pem`) or, without one, the Mozilla roots compiled in; the server name is
//! the host part of [`ClientConfig::server`] (an IP address for an IP literal, then no SNI is
//! sent). With [`ClientConfig::pin`] instead, the one certificate with that SHA-256 is trusted,
//! whatever its issuer and names (the handshake's signatures are still checked); it applies to
//! TLS and QUIC only, not to plain TCP (nor the TCP path of the dual channel). Handshake failures — an untrusted certificate, one for another name, a TLS alert from
//! the server, a server that does not speak TLS — are [`ClientError::Tls`], whose reason names
//! the problem and what was trusted; QUIC's ALPN refusal is [`ClientError::Alpn`]; an unusable
//! CA file is [`ClientError::CaFile`], reported before any connection is made.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, Transport};
//!
//! // The port of the gateway's TLS listener (`--tls ADDR`); for QUIC, of its `--quic ADDR`.
//! let mut config = ClientConfig::new("127.0.0.1:7602", "TOKEN", "laptop");
//! config.transport = Transport::Tls; // or Transport::Quic
//! config.ca = Some("/var/lib/tern/tls/cert.pem".into());
//! let client = Client::connect(config).await?;
//! # Ok(()) }
//! ```
//!
//! What it does not do: it keeps nothing on disk (store [`Client::sync_version`] yourself to
//! resume a later process from it), does not reorder messages that arrive out of order, does not
//! queue requests while disconnected, does not use TLS on the TCP path of the dual channel,
//! does not read the system's certificate store, does not present client
//! certificates, does not send TLS early data (0-RTT), and does not require ALPN over TLS (only
//! over QUIC). It needs a tokio runtime.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod client;
mod config;
pub mod dedup;
mod error;
mod group;
pub mod line;
mod presence;
mod rooms;
mod session;
mod social;
mod transport;

pub use backoff::{Backoff, BackoffConfig};
pub use client::{Client, Conversation, Incoming, new_client_msg_id};
pub use config::{ClientConfig, TokenFuture, TokenSource, Transport};
pub use error::{ClientError, Result};
pub use group::group_event;
pub use rooms::is_room_conversation;
pub use social::recall_event;
pub use tern_protocol::v1::ListedUser;
pub use tern_protocol::v1::group_request::Op as GroupOp;
pub use tern_protocol::v1::social_request::Op as SocialOp;
pub use tern_protocol::{
    ContentType, ConversationSettings, ConversationState, Deliver, DeviceSettings, DoNotDisturb,
    ErrorCode, GroupEvent, GroupEventKind, GroupInfo, GroupMember, GroupProfile, GroupResponse,
    GroupRole, HelloOk, HistoryPage, JoinPolicy, Kick, KickReason, ListKind, MemberPage, Platform,
    Presence, PushNotice, ReadCounts, ReadReceipt, ReadState, RecallEvent, RecallOk, RoomResponse,
    SendAck, SetConversation, SetDevice, SocialEvent, SocialEventKind, SocialResponse, Target,
    TargetKind, Typing, UserProfile,
};

/// What the client tells the application, in the order it happened.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A message, live or from a sync page. Each (conversation_id, seq) comes once.
    Message(Deliver),
    /// The conversations that changed, from a sync (before their messages). `skipped_to_seq`
    /// names messages a bounded first sync left out ([`ClientConfig::initial_sync_limit`]).
    Conversations(Vec<ConversationState>),
    /// A sync finished; `user_version` is the new sync position.
    SyncDone {
        /// The new sync position.
        user_version: u64,
    },
    /// The server kicked this connection. For `REPLACED` and `REVOKED` the client stops
    /// ([`Event::Stopped`] follows); otherwise it reconnects.
    Kicked(Kick),
    /// The connection was lost; requests in flight failed with [`ClientError::Disconnected`],
    /// except Sends, which go out again once the client is connected (see [`Client::send_with_id`]).
    Disconnected {
        /// What ended it.
        reason: ClientError,
    },
    /// Logged in again after [`Event::Disconnected`]; a sync from the stored position follows.
    /// The rooms the application is in have been asked to be entered again, and the users it
    /// follows to be followed again, before anything else on the new connection
    /// ([`Event::RoomLost`] or [`Event::PresenceLost`] if the server refuses). An
    /// [`Event::Presence`] follows for each followed user whose online state changed meanwhile.
    Reconnected,
    /// Dual channel only: one path (TCP or QUIC) failed and the session goes on over the other.
    /// Requests sent on that path only failed with [`ClientError::Disconnected`] (a sync or a
    /// Send is asked again on the other path); the path is added again in the background.
    PathDown {
        /// The transport of the lost path.
        transport: Transport,
        /// What ended it.
        reason: ClientError,
    },
    /// Dual channel only: a path joined the session (after login, and after each
    /// [`Event::PathDown`] once the path works again).
    PathUp {
        /// The transport of the added path.
        transport: Transport,
    },
    /// The client gave up (final kick, rejected token, or reconnect turned off); the stream
    /// ends after this.
    Stopped(ClientError),
    /// Another device of this user moved a read position ([`Client::mark_read`]).
    ReadState(ReadState),
    /// The other user of a 1:1 conversation read up to a position.
    ReadReceipt(ReadReceipt),
    /// Someone is (or stopped) typing to this user or in one of their groups.
    Typing(Typing),
    /// A followed user's online state ([`Client::subscribe_presence`]): the first after a
    /// subscription, then only when it differs from the last one reported, including a change
    /// that happened while the client was disconnected (reported after the reconnect).
    Presence(Presence),
    /// Another device of this user changed a conversation's settings.
    ConversationSettings(ConversationSettings),
    /// A friend request, or a friendship added, declined or deleted; the decision on this
    /// user's request to join a group (`JOIN_APPROVED`, `JOIN_DECLINED`, with `group_id`); or,
    /// for a group this user owns or administers, someone's request to join it
    /// (`JOIN_REQUESTED`: `user_id` asks, with `message`).
    Social(SocialEvent),
    /// A server push (admin API). Each push id comes once; with auto-ack on it is acknowledged
    /// at once, otherwise call [`Client::ack_push`].
    Push(PushNotice),
    /// After a reconnect the server refused to let the client enter a room it was in again
    /// (e.g. `LIMIT_EXCEEDED`): it is no longer in the room and gets none of its messages.
    RoomLost {
        /// The room.
        room_id: String,
        /// The server's refusal.
        reason: ClientError,
    },
    /// After a reconnect (or the loss of the dual-channel path that carried presence) the
    /// server refused to follow these users again: they are no longer followed and no
    /// [`Event::Presence`] comes for them. Subscribe again to retry.
    PresenceLost {
        /// The users.
        user_ids: Vec<String>,
        /// The server's refusal.
        reason: ClientError,
    },
}
