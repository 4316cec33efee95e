//! Presence: the users the application follows, kept across connections.
//!
//! The server's presence subscriptions belong to one connection and end with it, so the session
//! remembers the users the application follows ([`Following`]) and follows them again on each
//! new connection that carries presence: after a reconnect, and in a dual-channel session when
//! the path that carried them is lost while the other goes on. The server answers such a
//! subscription with every user's current state; the application is told only what differs
//! from what it was last told, so that it ends up with the right state without a burst of
//! repeats.

use std::collections::{BTreeMap, HashMap};

use tern_protocol::{Body, Frame, Presence, SubscribePresence};

use crate::{ClientError, Event};

/// Most users one SubscribePresence may name (the server refuses more: `INVALID_ARGUMENT`).
const MAX_PER_REQUEST: usize = 1000;

/// Most bytes of user ids in one SubscribePresence the client sends by itself, so that the
/// frame stays well below any frame size limit a server is likely to set.
const MAX_BYTES_PER_REQUEST: usize = 16 * 1024;

/// A SubscribePresence in flight.
#[derive(Debug)]
struct Call {
    users: Vec<String>,
    unsubscribe: bool,
    /// `None`: the application's. Otherwise the client's own, on this path (leg).
    again: Option<usize>,
}

/// The users the application follows and the SubscribePresence requests in flight. Sans-IO,
/// owned by the session, which feeds it the frames in the order they were read.
///
/// A user is followed from the server's answer to the application's subscription until the
/// answer to its unsubscription, or a refusal to follow them again on a new connection. A call
/// that fails (refused, or its connection lost before the answer) changes nothing here.
#[derive(Debug, Default)]
pub(crate) struct Following {
    /// Followed users, with the online state the application was last told (`None`: not yet).
    users: BTreeMap<String, Option<bool>>,
    calls: HashMap<u64, Call>,
}

impl Following {
    /// The application's request `id` is `body`: noted if it is a SubscribePresence.
    pub(crate) fn requested(&mut self, id: u64, body: &Body) {
        if let Body::SubscribePresence(s) = body {
            let call = Call {
                users: s.user_ids.clone(),
                unsubscribe: s.unsubscribe,
                again: None,
            };
            self.calls.insert(id, call);
        }
    }

    /// The SubscribePresence frames that follow every followed user again, for the connection
    /// of path `leg` that now carries presence; `next_id` gives fresh request ids. None when
    /// nobody is followed.
    pub(crate) fn follow_again(
        &mut self,
        leg: usize,
        mut next_id: impl FnMut() -> u64,
    ) -> Vec<Frame> {
        let mut chunks: Vec<Vec<String>> = Vec::new();
        let mut bytes = 0;
        for user in self.users.keys() {
            match chunks.last_mut() {
                Some(chunk)
                    if chunk.len() < MAX_PER_REQUEST
                        && bytes + user.len() <= MAX_BYTES_PER_REQUEST =>
                {
                    bytes += user.len();
                    chunk.push(user.clone());
                }
                _ => {
                    bytes = user.len();
                    chunks.push(vec![user.clone()]);
                }
            }
        }
        chunks
            .into_iter()
            .map(|users| {
                let id = next_id();
                let frame = Frame::new(
                    id,
                    SubscribePresence {
                        user_ids: users.clone(),
                        unsubscribe: false,
                    },
                );
                let call = Call {
                    users,
                    unsubscribe: false,
                    again: Some(leg),
                };
                self.calls.insert(id, call);
                frame
            })
            .collect()
    }

    /// The server answered request `id`: `Ok` for PresenceSubscribed, `Err` for its refusal.
    /// Returns [`Event::PresenceLost`] if it refused to follow users again.
    pub(crate) fn answered(&mut self, id: u64, result: Result<(), &ClientError>) -> Option<Event> {
        let call = self.calls.remove(&id)?;
        match (result, call.again) {
            (Ok(()), None) if call.unsubscribe => {
                for user in &call.users {
                    self.users.remove(user);
                }
                None
            }
            (Ok(()), None) => {
                for user in call.users {
                    self.users.entry(user).or_insert(None);
                }
                None
            }
            // Followed again, or the application's call refused: nothing changed.
            (Ok(()), Some(_)) | (Err(_), None) => None,
            (Err(reason), Some(leg)) => {
                let user_ids: Vec<String> = call
                    .users
                    .into_iter()
                    .filter(|user| self.users.remove(user).is_some())
                    .collect();
                if user_ids.is_empty() {
                    return None;
                }
                tracing::warn!(users = user_ids.len(), leg, %reason, "cannot follow users again");
                Some(Event::PresenceLost {
                    user_ids,
                    reason: reason.clone(),
                })
            }
        }
    }

    /// A Presence from the server: the event for the application, unless the user is followed
    /// and their online state is what the application was last told.
    pub(crate) fn presence(&mut self, presence: Presence) -> Option<Event> {
        let Some(told) = self.users.get_mut(&presence.user_id) else {
            // Not the client's to judge (e.g. late news of a user just unsubscribed).
            return Some(Event::Presence(presence));
        };
        if *told == Some(presence.online) {
            return None;
        }
        *told = Some(presence.online);
        Some(Event::Presence(presence))
    }

    /// The application's request `id` was lost with its connection: no answer will come.
    pub(crate) fn forget(&mut self, id: u64) {
        self.calls.remove(&id);
    }

    /// Path `leg` is gone: the client's own calls on it will not be answered.
    pub(crate) fn path_lost(&mut self, leg: usize) {
        self.calls.retain(|_, call| call.again != Some(leg));
    }

    /// Every connection is gone: no answer will come.
    pub(crate) fn disconnected(&mut self) {
        self.calls.clear();
    }

    /// True if the application follows nobody.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The followed users and what the application was last told of each.
    #[cfg(test)]
    fn users(&self) -> Vec<(&str, Option<bool>)> {
        self.users.iter().map(|(u, t)| (u.as_str(), *t)).collect()
    }
}

#[cfg(test)]
mod tests {
    use tern_protocol::ErrorCode;

    use super::*;

    fn subscribe(users: &[&str], unsubscribe: bool) -> Body {
        Body::SubscribePresence(SubscribePresence {
            user_ids: users.iter().map(|u| (*u).to_owned()).collect(),
            unsubscribe,
        })
    }

    fn presence(user: &str, online: bool) -> Presence {
        Presence {
            user_id: user.into(),
            online,
            devices: u32::from(online),
        }
    }

    fn told(following: &mut Following, user: &str, online: bool) -> Option<(String, bool)> {
        match following.presence(presence(user, online)) {
            Some(Event::Presence(p)) => Some((p.user_id, p.online)),
            None => None,
            other => panic!("expected Presence, got {other:?}"),
        }
    }

    fn refused() -> ClientError {
        ClientError::Server {
            code: ErrorCode::LimitExceeded,
            message: "a connection follows at most 5000 users".into(),
        }
    }

    /// `following.follow_again` with request ids from 101: (id, users) of each frame.
    fn again(following: &mut Following, leg: usize) -> Vec<(u64, Vec<String>)> {
        let mut next = 100;
        following
            .follow_again(leg, || {
                next += 1;
                next
            })
            .into_iter()
            .map(|f| match f.body {
                Some(Body::SubscribePresence(SubscribePresence {
                    user_ids,
                    unsubscribe: false,
                })) => (f.request_id, user_ids),
                other => panic!("expected SubscribePresence, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn users_are_followed_from_the_answer_until_unsubscribed() {
        let mut f = Following::default();
        f.requested(1, &subscribe(&["bob", "carol"], false));
        f.requested(2, &subscribe(&["dave"], false));
        f.requested(3, &subscribe(&["erin"], false));
        f.requested(4, &Body::Ping(tern_protocol::Ping::default()));
        assert!(f.users().is_empty(), "nothing before the answer");
        assert!(f.answered(1, Ok(())).is_none());
        assert!(f.answered(2, Err(&refused())).is_none());
        f.forget(3);
        assert!(f.answered(3, Ok(())).is_none(), "forgotten: no answer");
        assert!(f.answered(4, Ok(())).is_none(), "not a presence call");
        assert_eq!(f.users(), [("bob", None), ("carol", None)]);

        // The state the server reports is news once, then each change; a user the client does
        // not follow is handed over as it comes.
        assert_eq!(told(&mut f, "bob", true), Some(("bob".into(), true)));
        assert_eq!(told(&mut f, "carol", false), Some(("carol".into(), false)));
        assert_eq!(told(&mut f, "bob", true), None);
        assert_eq!(told(&mut f, "dave", true), Some(("dave".into(), true)));
        assert_eq!(told(&mut f, "dave", true), Some(("dave".into(), true)));
        assert_eq!(told(&mut f, "bob", false), Some(("bob".into(), false)));

        // Subscribing a followed user again keeps what the application knows.
        f.requested(5, &subscribe(&["bob"], false));
        assert!(f.answered(5, Ok(())).is_none());
        assert_eq!(f.users(), [("bob", Some(false)), ("carol", Some(false))]);

        // Unsubscribed: followed until the answer, and no longer followed again after it.
        f.requested(6, &subscribe(&["carol"], true));
        assert_eq!(told(&mut f, "carol", true), Some(("carol".into(), true)));
        assert!(f.answered(6, Ok(())).is_none());
        assert_eq!(f.users(), [("bob", Some(false))]);
        assert_eq!(again(&mut f, 0), [(101, vec!["bob".into()])]);

        // Followed again later: its current state is news again.
        f.requested(7, &subscribe(&["carol"], false));
        assert!(f.answered(7, Ok(())).is_none());
        assert_eq!(told(&mut f, "carol", false), Some(("carol".into(), false)));
    }

    #[test]
    fn a_new_connection_follows_everyone_again_and_reports_only_changes() {
        let mut f = Following::default();
        assert!(again(&mut f, 0).is_empty(), "nobody followed: no request");
        f.requested(1, &subscribe(&["carol", "bob", "dave"], false));
        assert!(f.answered(1, Ok(())).is_none());
        assert_eq!(told(&mut f, "bob", true), Some(("bob".into(), true)));
        assert_eq!(told(&mut f, "carol", false), Some(("carol".into(), false)));
        f.disconnected();

        assert_eq!(
            again(&mut f, 0),
            [(101, vec!["bob".into(), "carol".into(), "dave".into()])]
        );
        assert!(f.answered(101, Ok(())).is_none());
        // bob went offline while the client was away; carol did not change; dave is new.
        assert_eq!(told(&mut f, "carol", false), None);
        assert_eq!(told(&mut f, "bob", false), Some(("bob".into(), false)));
        assert_eq!(told(&mut f, "dave", true), Some(("dave".into(), true)));
        assert_eq!(
            f.users(),
            [
                ("bob", Some(false)),
                ("carol", Some(false)),
                ("dave", Some(true))
            ]
        );
    }

    #[test]
    fn a_refusal_to_follow_again_is_reported_for_the_users_still_followed() {
        let mut f = Following::default();
        f.requested(1, &subscribe(&["bob", "carol"], false));
        assert!(f.answered(1, Ok(())).is_none());
        assert_eq!(
            again(&mut f, 1),
            [(101, vec!["bob".into(), "carol".into()])]
        );
        // The application unsubscribes carol before the refusal arrives.
        f.requested(2, &subscribe(&["carol"], true));
        assert!(f.answered(2, Ok(())).is_none());
        match f.answered(101, Err(&refused())) {
            Some(Event::PresenceLost { user_ids, reason }) => {
                assert_eq!(user_ids, ["bob"]);
                assert_eq!(reason.code(), Some(ErrorCode::LimitExceeded));
            }
            other => panic!("expected PresenceLost, got {other:?}"),
        }
        assert!(f.is_empty());
        assert!(again(&mut f, 0).is_empty());
    }

    #[test]
    fn lost_paths_and_connections_forget_their_calls() {
        let mut f = Following::default();
        f.requested(1, &subscribe(&["bob"], false));
        assert!(f.answered(1, Ok(())).is_none());
        assert_eq!(again(&mut f, 1), [(101, vec!["bob".into()])]);
        f.requested(2, &subscribe(&["carol"], false));
        f.path_lost(1);
        assert!(f.answered(101, Err(&refused())).is_none(), "forgotten");
        assert_eq!(f.calls.len(), 1, "the application's call is still waiting");
        f.disconnected();
        assert!(f.calls.is_empty());
        assert_eq!(f.users(), [("bob", None)]);
    }

    #[test]
    fn many_users_are_followed_again_in_requests_the_server_takes() {
        let mut f = Following::default();
        let users: Vec<String> = (0..2500).map(|i| format!("user-{i:05}")).collect();
        for (id, chunk) in (1..).zip(users.chunks(MAX_PER_REQUEST)) {
            let names: Vec<&str> = chunk.iter().map(String::as_str).collect();
            f.requested(id, &subscribe(&names, false));
            assert!(f.answered(id, Ok(())).is_none());
        }
        let sizes: Vec<usize> = again(&mut f, 0).iter().map(|(_, u)| u.len()).collect();
        assert_eq!(sizes, [1000, 1000, 500]);

        let mut f = Following::default();
        let long: Vec<String> = (0..600).map(|i| format!("{i:064}")).collect();
        let names: Vec<&str> = long.iter().map(String::as_str).collect();
        f.requested(1, &subscribe(&names, false));
        assert!(f.answered(1, Ok(())).is_none());
        let frames = again(&mut f, 0);
        let sizes: Vec<usize> = frames.iter().map(|(_, u)| u.len()).collect();
        assert_eq!(sizes, [256, 256, 88], "at most 16 KiB of ids each");
        let all: Vec<String> = frames.into_iter().flat_map(|(_, u)| u).collect();
        assert_eq!(all, long, "each user once, in order");
    }
}
