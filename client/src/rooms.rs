//! Live rooms: entering, leaving and sending, and keeping the application in the rooms it
//! entered while connections come and go.
//!
//! Room membership belongs to a connection on the server, so the connection task remembers the
//! rooms the application is in ([`Rooms`]) and enters them again on every new connection: after
//! a reconnect, and on a path that joins a dual-channel session.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use tern_protocol::v1::{EnterRoom, LeaveRoom, room_request::Op};
use tern_protocol::{Body, Frame, RoomRequest, RoomResponse, SendAck, Target, TargetKind};

use crate::{Client, ClientError, Event, Result, client::unexpected, new_client_msg_id};

/// True for a room's conversation id: bit 62 set, bit 63 clear (1:1 conversations are below
/// 2^62, groups have bit 63). Room messages are not stored, so they are never acknowledged.
pub fn is_room_conversation(conversation_id: u64) -> bool {
    conversation_id >> 62 == 1
}

impl Client {
    async fn room(&self, room: impl Into<String>, op: Op) -> Result<RoomResponse> {
        let body = Body::Room(RoomRequest {
            room_id: room.into(),
            op: Some(op),
        });
        match self.request(body).await? {
            Body::RoomResponse(r) => Ok(r),
            other => Err(unexpected("RoomResponse", &other)),
        }
    }

    /// Enters live room `room` (at most 16 at once: `LIMIT_EXCEEDED`); returns the room's
    /// conversation id. Its messages then arrive as [`Event::Message`] with a `ROOM` target and
    /// that conversation id, only while the client is in the room: rooms store no history and
    /// are never synced.
    ///
    /// The client stays in the room until [`Client::leave_room`] or a refusal by the server: it
    /// enters it again on each new connection (see the crate docs, Rooms).
    pub async fn enter_room(&self, room: impl Into<String>) -> Result<RoomResponse> {
        self.enter_room_with_recent(room, 0).await
    }

    /// Enters live room `room` as [`Client::enter_room`] does, and gets back up to `recent` of
    /// the room's latest messages in `RoomResponse::recent`, oldest first (by default the server
    /// keeps the last 20 of each room, none older than 5 minutes). The room's next messages
    /// arrive as events; none is in both, over both paths of the dual channel too. None if the
    /// client is in the room already; entering again after a reconnect asks for none.
    pub async fn enter_room_with_recent(
        &self,
        room: impl Into<String>,
        recent: u32,
    ) -> Result<RoomResponse> {
        self.room(room, Op::Enter(EnterRoom { recent })).await
    }

    /// Leaves live room `room`; it is no longer entered again after a reconnect.
    pub async fn leave_room(&self, room: impl Into<String>) -> Result<RoomResponse> {
        self.room(room, Op::Leave(LeaveRoom {})).await
    }

    /// Sends to live room `room`, which the client must have entered (else `NOT_MEMBER`), with a
    /// fresh client message id. `priority` messages (gifts, notices) still reach viewers who are
    /// too far behind for ordinary room messages. The SendAck's seq numbers the room's messages
    /// of this server run.
    pub async fn send_room(
        &self,
        room: impl Into<String>,
        content_type: u32,
        payload: impl Into<Bytes>,
        priority: bool,
    ) -> Result<SendAck> {
        self.send_message(tern_protocol::Send {
            client_msg_id: new_client_msg_id(),
            target: Some(Target::new(TargetKind::Room, room)),
            content_type,
            custom_type: String::new(),
            payload: payload.into(),
            priority,
        })
        .await
    }
}

/// An EnterRoom or LeaveRoom: the room and whether it is entered.
pub(crate) type RoomOp = (String, bool);

/// The room and direction of `body` if it is a RoomRequest.
pub(crate) fn room_op(body: &Body) -> Option<RoomOp> {
    match body {
        Body::Room(RoomRequest {
            room_id,
            op: Some(op),
        }) => Some((room_id.clone(), matches!(op, Op::Enter(_)))),
        _ => None,
    }
}

/// A room request in flight.
#[derive(Debug)]
struct Call {
    room: String,
    enter: bool,
    /// `None`: the application's. Otherwise the client's own EnterRoom on a new connection.
    again: Option<Again>,
}

/// Where the client entered a room again by itself.
#[derive(Debug, Clone, Copy)]
struct Again {
    /// The path (leg) of the connection.
    leg: usize,
    /// The first connection of a new session (a reconnect), rather than a path joining a
    /// dual-channel session that is in the room on its other path.
    new_session: bool,
}

/// The rooms the application is in, and the room requests in flight. Sans-IO, owned by the
/// connection task.
///
/// A room is in from the application's EnterRoom (so that a path joining while the answer is
/// on its way enters it too) until its LeaveRoom, or a refusal of that EnterRoom by the server.
/// If the connection drops before the answer, the room stays in: the next connection enters it.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    entered: BTreeSet<String>,
    calls: HashMap<u64, Call>,
}

impl Rooms {
    /// The application's room request `id` was queued.
    pub(crate) fn requested(&mut self, id: u64, (room, enter): RoomOp) {
        if enter {
            self.entered.insert(room.clone());
        } else {
            self.entered.remove(&room);
        }
        self.calls.insert(
            id,
            Call {
                room,
                enter,
                again: None,
            },
        );
    }

    /// Takes the EnterRoom frames for every room the application is in, for the connection just
    /// logged in on path `leg`; `new_session` for a reconnect. `frame` makes a frame with a fresh
    /// request id.
    pub(crate) fn enter_again(
        &mut self,
        leg: usize,
        new_session: bool,
        mut frame: impl FnMut(Body) -> Frame,
    ) -> Vec<Frame> {
        let Self { entered, calls } = self;
        entered
            .iter()
            .map(|room| {
                let f = frame(Body::Room(RoomRequest {
                    room_id: room.clone(),
                    op: Some(Op::Enter(EnterRoom::default())),
                }));
                let again = Some(Again { leg, new_session });
                let call = Call {
                    room: room.clone(),
                    enter: true,
                    again,
                };
                calls.insert(f.request_id, call);
                f
            })
            .collect()
    }

    /// Request `id` got its final answer (for a request made on several paths, the one that
    /// answers the call). Returns [`Event::RoomLost`] if the server refused to let the client
    /// enter a room again after a reconnect.
    pub(crate) fn answered(&mut self, id: u64, result: &Result<Body>) -> Option<Event> {
        let call = self.calls.remove(&id)?;
        let Err(reason @ ClientError::Server { .. }) = result else {
            // Entered or left; or the connection is gone, and the next one enters again.
            return None;
        };
        let Some(again) = call.again else {
            // The application's EnterRoom was refused: not in the room.
            if call.enter {
                self.entered.remove(&call.room);
            }
            return None;
        };
        if !again.new_session {
            // The session is still in the room on its other path.
            tracing::warn!(
                room = %call.room, leg = again.leg, %reason,
                "cannot enter the room on the added path"
            );
            return None;
        }
        self.entered.remove(&call.room).then(|| {
            tracing::warn!(room = %call.room, %reason, "cannot enter the room again");
            Event::RoomLost {
                room_id: call.room,
                reason: reason.clone(),
            }
        })
    }

    /// Path `leg` is gone: its own EnterRooms will not be answered.
    pub(crate) fn path_lost(&mut self, leg: usize) {
        self.calls
            .retain(|_, call| call.again.is_none_or(|again| again.leg != leg));
    }

    /// Every connection is gone: no answer will come.
    pub(crate) fn disconnected(&mut self) {
        self.calls.clear();
    }

    /// The rooms the application is in.
    #[cfg(test)]
    fn entered(&self) -> Vec<&str> {
        self.entered.iter().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use tern_protocol::ErrorCode;

    use super::*;

    fn enter(room: &str) -> Body {
        Body::Room(RoomRequest {
            room_id: room.into(),
            op: Some(Op::Enter(EnterRoom::default())),
        })
    }

    fn leave(room: &str) -> Body {
        Body::Room(RoomRequest {
            room_id: room.into(),
            op: Some(Op::Leave(LeaveRoom {})),
        })
    }

    fn refused() -> Result<Body> {
        Err(ClientError::Server {
            code: ErrorCode::LimitExceeded,
            message: "too many rooms".into(),
        })
    }

    fn ok(room: &str) -> Result<Body> {
        Ok(Body::RoomResponse(RoomResponse {
            room_id: room.into(),
            conversation_id: 1 << 62 | 5,
            recent: Vec::new(),
        }))
    }

    /// `rooms.enter_again` with request ids from 100.
    fn again(rooms: &mut Rooms, leg: usize, new_session: bool) -> Vec<(u64, String)> {
        let mut next = 100;
        rooms
            .enter_again(leg, new_session, |body| {
                next += 1;
                Frame::new(next, body)
            })
            .into_iter()
            .map(|f| match f.body {
                Some(Body::Room(RoomRequest {
                    room_id,
                    op: Some(Op::Enter(_)),
                })) => (f.request_id, room_id),
                other => panic!("expected EnterRoom, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn room_conversation_ids_have_bit_62_and_not_63() {
        assert!(is_room_conversation(1 << 62));
        assert!(is_room_conversation((1 << 62) | 77));
        assert!(is_room_conversation(u64::MAX >> 1));
        assert!(!is_room_conversation(7));
        assert!(!is_room_conversation((1 << 62) - 1));
        assert!(!is_room_conversation(1 << 63), "a group");
        assert!(!is_room_conversation(u64::MAX));
    }

    #[test]
    fn rooms_are_in_from_enter_to_leave_or_refusal() {
        let mut rooms = Rooms::default();
        assert_eq!(room_op(&Body::Ping(tern_protocol::Ping::default())), None);
        rooms.requested(1, room_op(&enter("a")).unwrap());
        rooms.requested(2, room_op(&enter("b")).unwrap());
        rooms.requested(3, room_op(&enter("c")).unwrap());
        assert_eq!(
            rooms.entered(),
            ["a", "b", "c"],
            "in while the answer is on its way"
        );
        assert!(rooms.answered(1, &ok("a")).is_none());
        assert!(rooms.answered(2, &refused()).is_none());
        assert!(rooms.answered(3, &Err(ClientError::Disconnected)).is_none());
        assert_eq!(
            rooms.entered(),
            ["a", "c"],
            "only a refusal takes a room out"
        );
        rooms.requested(4, room_op(&leave("a")).unwrap());
        assert_eq!(rooms.entered(), ["c"], "out as soon as it is left");
        assert!(rooms.answered(4, &refused()).is_none());
        assert_eq!(rooms.entered(), ["c"]);
        assert!(rooms.answered(4, &ok("a")).is_none(), "answered once");
    }

    #[test]
    fn a_room_refused_after_a_reconnect_is_lost_and_on_an_added_path_is_not() {
        let mut rooms = Rooms::default();
        rooms.requested(1, room_op(&enter("a")).unwrap());
        rooms.requested(2, room_op(&enter("b")).unwrap());
        assert_eq!(
            again(&mut rooms, 0, true),
            [(101, "a".into()), (102, "b".into())]
        );
        assert!(rooms.answered(101, &ok("a")).is_none());
        match rooms.answered(102, &refused()) {
            Some(Event::RoomLost { room_id, reason }) => {
                assert_eq!(room_id, "b");
                assert_eq!(reason.code(), Some(ErrorCode::LimitExceeded));
            }
            other => panic!("expected RoomLost, got {other:?}"),
        }
        assert_eq!(rooms.entered(), ["a"]);

        // A dual-channel path that joins: a refusal there leaves the room entered.
        assert_eq!(again(&mut rooms, 1, false), [(101, "a".into())]);
        assert!(rooms.answered(101, &refused()).is_none());
        assert_eq!(rooms.entered(), ["a"]);
    }

    #[test]
    fn lost_paths_forget_their_calls() {
        let mut rooms = Rooms::default();
        rooms.requested(1, room_op(&enter("a")).unwrap());
        assert_eq!(again(&mut rooms, 1, false), [(101, "a".into())]);
        rooms.path_lost(1);
        assert!(rooms.answered(101, &refused()).is_none());
        assert_eq!(
            rooms.calls.len(),
            1,
            "the application's call is still waiting"
        );
        rooms.disconnected();
        assert!(rooms.calls.is_empty());
        assert_eq!(rooms.entered(), ["a"]);
    }
}
