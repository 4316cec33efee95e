//! The sans-IO core of a client: fed the frames read from the server (`handle_frame`) and the
//! application's requests, it keeps the de-duplication and sync state and queues what to do:
//! frames to write (`poll_transmit`), events for the application (`poll_event`) and answers to
//! requests (`poll_completion`). The async driver in `client.rs` only moves bytes and timers.
//!
//! The state outlives connections: de-duplication and the sync position carry over reconnects,
//! which is what lets a reconnect resume without handing a message over twice.

use std::collections::{BTreeSet, VecDeque};

use tern_protocol::{
    Ack, Body, Deliver, Frame, Hello, Kick, KickReason, PROTOCOL_VERSION, Ping, PushAck,
    PushNotice, RoomResponse, SyncRequest,
};

use crate::{
    ClientConfig, ClientError, Event, dedup::Dedup, presence::Following,
    rooms::is_room_conversation,
};

/// The answer to one request: the response frame's body, or why there is none.
pub(crate) type Completion = (u64, Result<Body, ClientError>);

#[derive(Debug)]
pub(crate) struct Session {
    dedup: Dedup,
    sync_version: u64,
    /// The per-conversation bound of the syncs until the first one completes
    /// ([`ClientConfig::initial_sync_limit`] for a client without a sync position); 0 from
    /// then on, and as soon as a message was handed over outside a sync.
    initial_sync_limit: u32,
    /// Request ids of the syncs in flight (a login sync has its Hello's id).
    syncs: BTreeSet<u64>,
    /// The server sent SyncNeeded since the driver last asked ([`Session::take_sync_needed`]).
    sync_needed: bool,
    auto_ack: bool,
    next_request_id: u64,
    /// Conversations that handed messages over since the last `flush_acks`.
    touched: BTreeSet<u64>,
    transmit: VecDeque<Frame>,
    events: VecDeque<Event>,
    completions: VecDeque<Completion>,
    kick: Option<Kick>,
    fatal: Option<ClientError>,
    /// Push ids seen lately (a push can come on both paths, or again at a login).
    pushes: VecDeque<u64>,
    /// The users the application follows (presence), kept across connections.
    following: Following,
}

impl Session {
    pub(crate) fn new(config: &ClientConfig) -> Self {
        Self {
            dedup: Dedup::new(),
            sync_version: config.sync_version,
            initial_sync_limit: if config.sync_version == 0 {
                config.initial_sync_limit
            } else {
                0
            },
            syncs: BTreeSet::new(),
            sync_needed: false,
            auto_ack: config.auto_ack,
            next_request_id: 1,
            touched: BTreeSet::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            completions: VecDeque::new(),
            kick: None,
            fatal: None,
            pushes: VecDeque::new(),
            following: Following::default(),
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    /// The position the next sync starts from (the last `SyncDone.user_version`).
    pub(crate) fn sync_version(&self) -> u64 {
        self.sync_version
    }

    fn is_syncing(&self) -> bool {
        !self.syncs.is_empty()
    }

    /// The Hello that opens a new session. Not queued: login is done by the driver before the
    /// session sees any other frame. A reconnect (`resume`) always asks for a sync, so nothing
    /// sent while the client was away is missed.
    pub(crate) fn hello(&mut self, config: &ClientConfig, resume: bool) -> Frame {
        self.hello_frame(config, resume || config.sync_on_login, 0)
    }

    /// The Hello of a further path of the live logical session `session_id` (dual channel): no
    /// sync, the session's other path already delivers everything.
    pub(crate) fn path_hello(&mut self, config: &ClientConfig, session_id: u64) -> Frame {
        self.hello_frame(config, false, session_id)
    }

    fn hello_frame(&mut self, config: &ClientConfig, sync: bool, resume_session_id: u64) -> Frame {
        let id = self.next_id();
        Frame::new(
            id,
            Hello {
                protocol_version: PROTOCOL_VERSION,
                token: config.token.clone(),
                device_id: config.device_id.clone(),
                platform: config.platform.into(),
                client_version: config.client_version.clone(),
                sync_version: self.sync_version,
                sync_on_login: sync,
                resume_session_id,
                sync_max_messages_per_conversation: self.initial_sync_limit,
            },
        )
    }

    /// A new session logged in with the Hello `hello`; the server syncs it if it asked to.
    ///
    /// Rooms start afresh: a new session only gets room messages sent after it entered them,
    /// and a restarted server numbers them from 1 again.
    pub(crate) fn on_login(&mut self, hello: &Frame) {
        self.dedup.forget_if(is_room_conversation);
        self.syncs.clear();
        if matches!(&hello.body, Some(Body::Hello(h)) if h.sync_on_login) {
            self.syncs.insert(hello.request_id);
        }
        self.kick = None;
        self.fatal = None;
    }

    /// The session is gone (every path): drop what was not written. De-duplication and the
    /// sync position stay.
    pub(crate) fn on_disconnect(&mut self) {
        self.syncs.clear();
        self.sync_needed = false;
        self.transmit.clear();
        self.touched.clear();
        self.following.disconnected();
    }

    /// True if `request_id` is a sync in flight.
    pub(crate) fn is_sync(&self, request_id: u64) -> bool {
        self.syncs.contains(&request_id)
    }

    /// The path that carried sync `request_id` is gone: the sync will not finish. Returns the
    /// id of the sync started in its place, on whatever path the driver picks.
    pub(crate) fn sync_lost(&mut self, request_id: u64) -> Option<u64> {
        self.syncs.remove(&request_id).then(|| self.start_sync())
    }

    /// True once after the server sent SyncNeeded: the path it came on is the one to sync on
    /// (it is the one whose live pushes stopped).
    pub(crate) fn take_sync_needed(&mut self) -> bool {
        std::mem::take(&mut self.sync_needed)
    }

    /// A Kick or fatal Error that ended one path of a dual-channel session but not the session:
    /// forget it.
    pub(crate) fn clear_path_end(&mut self) {
        self.kick = None;
        self.fatal = None;
    }

    /// Queues a request and returns its request id.
    pub(crate) fn request(&mut self, body: Body) -> u64 {
        let id = self.next_id();
        self.following.requested(id, &body);
        self.transmit.push_back(Frame::new(id, body));
        id
    }

    /// The application's request `id` was lost with the path it was written on.
    pub(crate) fn request_lost(&mut self, id: u64) {
        self.following.forget(id);
    }

    /// The SubscribePresence requests that follow every user the application follows again,
    /// for the driver to write first thing on path `leg`, which now carries presence (not
    /// queued). None when nobody is followed.
    pub(crate) fn follow_again(&mut self, leg: usize) -> Vec<Frame> {
        let Self {
            following,
            next_request_id,
            ..
        } = self;
        following.follow_again(leg, || {
            let id = *next_request_id;
            *next_request_id += 1;
            id
        })
    }

    /// Path `leg` of a session that goes on is gone: the presence requests the client made
    /// there by itself will not be answered.
    pub(crate) fn presence_path_lost(&mut self, leg: usize) {
        self.following.path_lost(leg);
    }

    /// Queues a SyncRequest from the stored position and returns its request id.
    pub(crate) fn start_sync(&mut self) -> u64 {
        let since_version = self.sync_version;
        let id = self.request(Body::Sync(SyncRequest {
            since_version,
            page_size: 0,
            max_messages_per_conversation: self.initial_sync_limit,
        }));
        self.syncs.insert(id);
        id
    }

    /// A request with a fresh request id, for the driver to write on one path (not queued).
    pub(crate) fn unqueued(&mut self, body: Body) -> Frame {
        let id = self.next_id();
        Frame::new(id, body)
    }

    /// A Ping stamped `now_ms`, for the driver to write on the path it checks (not queued).
    pub(crate) fn ping(&mut self, now_ms: u64) -> Frame {
        let id = self.next_id();
        Frame::new(
            id,
            Ping {
                client_time_ms: now_ms,
            },
        )
    }

    /// Queues an Ack the application asked for; none for a room, whose messages are not
    /// stored (the server ignores such acks).
    pub(crate) fn ack(&mut self, conversation_id: u64, seq: u64) {
        if is_room_conversation(conversation_id) {
            return;
        }
        self.dedup.note_acked(conversation_id, seq);
        self.transmit.push_back(Frame::new(
            0,
            Ack {
                conversation_id,
                seq,
            },
        ));
    }

    /// Handles one frame from the server.
    pub(crate) fn handle_frame(&mut self, frame: Frame) {
        let Frame { request_id, body } = frame;
        let Some(body) = body else { return };
        match body {
            Body::Deliver(message) => self.deliver(message),
            Body::SyncConversations(page) => {
                for state in &page.conversations {
                    // The sync starts after the device's cursor, what the user cleared and
                    // what the initial limit left out: all of that counts as seen.
                    let cleared = state.settings.as_ref().map_or(0, |s| s.cleared_seq);
                    let floor = state.delivered_seq.max(cleared).max(state.skipped_to_seq);
                    self.dedup.raise_floor(state.conversation_id, floor);
                }
                self.events
                    .push_back(Event::Conversations(page.conversations));
            }
            Body::SyncMessages(page) => {
                if let Some(first) = page.messages.first() {
                    self.dedup
                        .floor_if_unknown(page.conversation_id, first.seq.saturating_sub(1));
                }
                for mut message in page.messages {
                    if message.conversation_id == 0 {
                        message.conversation_id = page.conversation_id;
                    }
                    self.deliver(message);
                }
            }
            Body::SyncDone(done) => {
                self.syncs.remove(&request_id);
                self.sync_version = self.sync_version.max(done.user_version);
                // Every later sync brings every message this device has not acknowledged.
                self.initial_sync_limit = 0;
                if !self.is_syncing() {
                    // Conversations still without a base kept their place in `touched` (see
                    // `flush_acks`), so the next flush acks what settling bases.
                    self.dedup.settle();
                }
                self.events.push_back(Event::SyncDone {
                    user_version: done.user_version,
                });
                if request_id != 0 {
                    self.completions
                        .push_back((request_id, Ok(Body::SyncDone(done))));
                }
            }
            Body::SyncNeeded(_) => {
                tracing::debug!("server asked for a sync");
                self.sync_needed = true;
                self.start_sync();
            }
            Body::Kick(kick) => {
                self.kick = Some(kick.clone());
                self.events.push_back(Event::Kicked(kick));
            }
            Body::Error(error) => {
                let err = ClientError::from_wire(&error);
                if self.syncs.remove(&request_id) && !self.is_syncing() {
                    // A refused sync (e.g. rate-limited) is over too.
                    self.dedup.settle();
                }
                if error.fatal {
                    tracing::warn!(request_id, %err, "fatal error from server");
                    self.fatal = Some(err.clone());
                }
                if request_id != 0 {
                    if let Some(lost) = self.following.answered(request_id, Err(&err)) {
                        self.events.push_back(lost);
                    }
                    self.completions.push_back((request_id, Err(err)));
                } else if !error.fatal {
                    tracing::warn!(%err, "error from server");
                }
            }
            body @ (Body::SendAck(_)
            | Body::HistoryPage(_)
            | Body::GroupResponse(_)
            | Body::RoomResponse(_)
            | Body::ReadCounts(_)
            | Body::RecallOk(_)
            | Body::SocialResponse(_)
            | Body::Pong(_)
            | Body::RefreshOk(_)
            | Body::HelloOk(_)) => {
                self.completions.push_back((request_id, Ok(body)));
            }
            body @ Body::PresenceSubscribed(_) => {
                // Before any Presence read after it: those are of the users it follows.
                self.following.answered(request_id, Ok(()));
                self.completions.push_back((request_id, Ok(body)));
            }
            // Answers when they carry a request id, news from the server otherwise.
            body @ (Body::ReadState(_) | Body::ConversationSettings(_)) if request_id != 0 => {
                self.completions.push_back((request_id, Ok(body)));
            }
            Body::ReadState(s) => self.events.push_back(Event::ReadState(s)),
            Body::ConversationSettings(s) => {
                self.events.push_back(Event::ConversationSettings(s));
            }
            Body::ReadReceipt(r) => self.events.push_back(Event::ReadReceipt(r)),
            Body::Typing(t) => self.events.push_back(Event::Typing(t)),
            Body::Presence(p) => {
                if let Some(event) = self.following.presence(p) {
                    self.events.push_back(event);
                }
            }
            Body::SocialEvent(e) => self.events.push_back(Event::Social(e)),
            Body::PushNotice(p) => self.push(p),
            body @ Body::DeviceSettings(_) => {
                self.completions.push_back((request_id, Ok(body)));
            }
            other => {
                tracing::debug!(kind = other.name(), "ignoring unexpected frame from server");
            }
        }
    }

    /// Queues a PushAck (acknowledges every push up to `push_id`).
    pub(crate) fn ack_push(&mut self, push_id: u64) {
        self.transmit.push_back(Frame::new(0, PushAck { push_id }));
    }

    fn push(&mut self, notice: PushNotice) {
        const REMEMBERED: usize = 1024;
        let id = notice.push_id;
        if self.pushes.contains(&id) {
            return;
        }
        if self.pushes.len() == REMEMBERED {
            self.pushes.pop_front();
        }
        self.pushes.push_back(id);
        self.events.push_back(Event::Push(notice));
        if self.auto_ack {
            self.ack_push(id);
        }
    }

    fn deliver(&mut self, message: Deliver) {
        let conversation_id = message.conversation_id;
        // A sync never says where a room starts: its first message does, and it is not acked.
        let room = is_room_conversation(conversation_id);
        let syncing = self.is_syncing() && !room;
        if self.dedup.accept(conversation_id, message.seq, syncing) {
            if !room {
                self.touched.insert(conversation_id);
                if !syncing {
                    // Live messages were handed over: a later sync must not skip any.
                    self.initial_sync_limit = 0;
                }
            }
            self.events.push_back(Event::Message(message));
        }
    }

    /// Takes out of an EnterRoom's answer the earlier messages that came as events already
    /// (a dual-channel session's other path may have been in the room first), and makes sure
    /// the rest never come as events too.
    pub(crate) fn admit_recent(&mut self, response: &mut RoomResponse) {
        let room = response.conversation_id;
        response
            .recent
            .retain(|m| self.dedup.accept_earlier(room, m.seq));
    }

    /// With auto-ack on, queues one Ack per conversation whose contiguous seq advanced since
    /// the last call. Call it after handling everything read at once, so acks coalesce.
    pub(crate) fn flush_acks(&mut self) {
        if !self.auto_ack {
            self.touched.clear();
            return;
        }
        let touched = std::mem::take(&mut self.touched);
        for conversation_id in touched {
            if let Some(seq) = self.dedup.take_ack(conversation_id) {
                self.transmit.push_back(Frame::new(
                    0,
                    Ack {
                        conversation_id,
                        seq,
                    },
                ));
            } else if self.dedup.contiguous(conversation_id).is_none() {
                // Base still unknown (mid-sync): look again later.
                self.touched.insert(conversation_id);
            }
        }
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    pub(crate) fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub(crate) fn poll_completion(&mut self) -> Option<Completion> {
        self.completions.pop_front()
    }

    /// A Kick received on this connection, if any.
    pub(crate) fn kick(&self) -> Option<&Kick> {
        self.kick.as_ref()
    }

    /// A fatal Error received on this connection, if any.
    pub(crate) fn fatal(&self) -> Option<&ClientError> {
        self.fatal.as_ref()
    }
}

/// True if a Kick for this reason means the client must not reconnect.
pub(crate) fn kick_is_final(kick: &Kick) -> bool {
    matches!(
        KickReason::try_from(kick.reason),
        Ok(KickReason::Replaced | KickReason::Revoked | KickReason::Expired)
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tern_protocol::{
        ConversationState, SyncConversations, SyncDone, SyncMessages, SyncNeeded, Target,
    };

    use super::*;

    fn session() -> Session {
        Session::new(&ClientConfig::new("127.0.0.1:1", "t", "d"))
    }

    fn msg(conversation_id: u64, seq: u64) -> Deliver {
        Deliver {
            conversation_id,
            seq,
            sender: "alice".into(),
            target: Some(Target::user("alice")),
            server_time_ms: 1000 + seq,
            client_msg_id: format!("m{seq}"),
            content_type: 1,
            custom_type: String::new(),
            payload: Bytes::from(format!("hello {seq}")),
            recalled: false,
        }
    }

    fn drain(s: &mut Session) -> (Vec<Frame>, Vec<Event>) {
        let frames = std::iter::from_fn(|| s.poll_transmit()).collect();
        let events = std::iter::from_fn(|| s.poll_event()).collect();
        (frames, events)
    }

    fn seqs(events: &[Event]) -> Vec<(u64, u64)> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some((m.conversation_id, m.seq)),
                _ => None,
            })
            .collect()
    }

    fn acks(frames: &[Frame]) -> Vec<(u64, u64)> {
        frames
            .iter()
            .filter_map(|f| match &f.body {
                Some(Body::Ack(a)) => Some((a.conversation_id, a.seq)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn login_sync_racing_live_push_hands_each_message_over_once() {
        let mut s = session();
        let hello = s.hello(&ClientConfig::new("x:1", "t", "d"), false);
        assert!(
            matches!(hello.body, Some(Body::Hello(ref h)) if h.sync_on_login && h.protocol_version == 1)
        );
        assert_eq!(hello.request_id, 1);
        s.on_login(&hello);

        // Live 4 overtakes the sync pages.
        s.handle_frame(Frame::new(0, msg(10, 4)));
        s.flush_acks();
        let (frames, events) = drain(&mut s);
        assert_eq!(seqs(&events), [(10, 4)]);
        assert!(acks(&frames).is_empty(), "no ack while the base is unknown");

        s.handle_frame(Frame::new(
            1,
            SyncConversations {
                conversations: vec![ConversationState {
                    conversation_id: 10,
                    delivered_seq: 1,
                    latest_seq: 4,
                    ..Default::default()
                }],
            },
        ));
        s.handle_frame(Frame::new(
            1,
            SyncMessages {
                conversation_id: 10,
                messages: vec![msg(10, 2), msg(10, 3), msg(10, 4)],
            },
        ));
        s.handle_frame(Frame::new(1, SyncDone { user_version: 42 }));
        s.handle_frame(Frame::new(0, msg(10, 4)));
        s.handle_frame(Frame::new(0, msg(10, 5)));
        s.flush_acks();
        let (frames, events) = drain(&mut s);
        assert_eq!(seqs(&events), [(10, 2), (10, 3), (10, 5)]);
        assert_eq!(acks(&frames), [(10, 5)], "one coalesced ack");
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::SyncDone { user_version: 42 }))
        );
        assert_eq!(s.sync_version(), 42);
        assert!(!s.is_syncing());

        // The next Hello resumes from the stored position.
        let hello = s.hello(&ClientConfig::new("x:1", "t", "d"), false);
        assert!(matches!(hello.body, Some(Body::Hello(ref h)) if h.sync_version == 42));
    }

    #[test]
    fn sync_needed_asks_for_a_sync_from_the_stored_position() {
        let mut s = session();
        let hello = s.hello(&ClientConfig::new("x:1", "t", "d"), false);
        s.on_login(&hello);
        s.handle_frame(Frame::new(1, SyncDone { user_version: 7 }));
        s.handle_frame(Frame::new(0, SyncNeeded { user_version: 9 }));
        let (frames, _) = drain(&mut s);
        match &frames[..] {
            [
                Frame {
                    request_id,
                    body: Some(Body::Sync(r)),
                },
            ] => {
                assert_ne!(*request_id, 0);
                assert_eq!(r.since_version, 7);
            }
            other => panic!("expected one SyncRequest, got {other:?}"),
        }
        assert!(s.is_syncing());
    }

    #[test]
    fn a_refused_sync_ends_the_syncing_state() {
        let mut s = session();
        let hello = s.hello(&ClientConfig::new("x:1", "t", "d"), false);
        s.on_login(&hello);
        s.handle_frame(Frame::new(1, SyncDone { user_version: 3 }));
        let id = s.start_sync();
        assert!(s.is_syncing());
        // A live message of a conversation not seen before waits while syncing...
        s.handle_frame(Frame::new(0, msg(5, 9)));
        s.flush_acks();
        assert!(acks(&drain(&mut s).0).is_empty());
        // ...and the sync is refused: the state ends, the conversation starts at that message.
        s.handle_frame(Frame::error(
            id,
            tern_protocol::ErrorCode::RateLimited,
            "slow down",
            false,
        ));
        assert!(!s.is_syncing());
        s.flush_acks();
        let (frames, _) = drain(&mut s);
        assert_eq!(acks(&frames), [(5, 9)]);
        assert!(std::iter::from_fn(|| s.poll_completion()).any(|(got, r)| got == id && r.is_err()));
    }

    #[test]
    fn a_sync_lost_with_its_path_is_asked_again() {
        let mut s = session();
        let hello = s.hello(&ClientConfig::new("x:1", "t", "d"), false);
        s.on_login(&hello);
        assert!(s.is_sync(hello.request_id));
        let again = s.sync_lost(hello.request_id).expect("a new sync");
        assert!(s.is_sync(again) && !s.is_sync(hello.request_id));
        let (frames, _) = drain(&mut s);
        assert!(
            matches!(&frames[..], [f] if f.request_id == again && matches!(f.body, Some(Body::Sync(_))))
        );
        assert_eq!(s.sync_lost(hello.request_id), None, "only once");
    }

    #[test]
    fn errors_complete_their_request_with_a_typed_error() {
        let mut s = session();
        let id = s.request(Body::Ping(Ping::default()));
        s.handle_frame(Frame::error(
            id,
            tern_protocol::ErrorCode::Forbidden,
            "no",
            false,
        ));
        let (got, result) = s.poll_completion().unwrap();
        assert_eq!(got, id);
        match result {
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, tern_protocol::ErrorCode::Forbidden);
                assert_eq!(message, "no");
            }
            other => panic!("{other:?}"),
        }
        assert!(s.fatal().is_none());
    }

    #[test]
    fn manual_ack_mode_sends_no_acks_by_itself() {
        let mut cfg = ClientConfig::new("x:1", "t", "d");
        cfg.auto_ack = false;
        let mut s = Session::new(&cfg);
        s.handle_frame(Frame::new(0, msg(1, 1)));
        s.flush_acks();
        let (frames, events) = drain(&mut s);
        assert!(frames.is_empty());
        assert_eq!(seqs(&events), [(1, 1)]);
        s.ack(1, 1);
        let (frames, _) = drain(&mut s);
        assert_eq!(acks(&frames), [(1, 1)]);
    }

    #[test]
    fn replaced_and_revoked_kicks_are_final() {
        let kick = |r: KickReason| Kick {
            reason: r.into(),
            message: String::new(),
        };
        assert!(kick_is_final(&kick(KickReason::Replaced)));
        assert!(kick_is_final(&kick(KickReason::Revoked)));
        assert!(!kick_is_final(&kick(KickReason::Shutdown)));
        assert!(!kick_is_final(&kick(KickReason::SlowConsumer)));
        assert!(!kick_is_final(&kick(KickReason::Idle)));
    }
}
