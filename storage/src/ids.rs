//! Internal ids and conversation ids.
//!
//! String user ids and group ids from the wire are interned to compact `u64`s (see
//! [`crate::MessageStore::intern_user`]). Conversation ids are `u64`s computed from those:
//!
//! * **Direct (1:1) conversations**: the top bit is 0 and the two user ids are packed,
//!   smaller one first: `(low << 31) | high`. User ids are therefore limited to
//!   `1..=MAX_USER_ID` (2^31 - 1, about 2.1 billion users); interning refuses to go beyond.
//!   The function is order independent and injective, and the ids can be recovered from it,
//!   so no lookup table is needed. A user may have a conversation with themself (notes).
//! * **Group conversations**: the top bit is 1 and the low 63 bits are the group id.
//!
//! Id 0 is never allocated for users or groups, so conversation id 0 never exists.

/// An internal user id (`1..=MAX_USER_ID`).
pub type UserId = u64;
/// An internal group id (`1..=MAX_GROUP_ID`).
pub type GroupId = u64;
/// A conversation id, see the module docs.
pub type ConversationId = u64;
/// A per-conversation sequence number, starting at 1.
pub type Seq = u64;

/// The largest internal user id (31 bits, so that two fit in a direct conversation id).
pub const MAX_USER_ID: UserId = (1 << 31) - 1;
/// The largest internal group id.
pub const MAX_GROUP_ID: GroupId = (1 << 63) - 1;

const GROUP_BIT: u64 = 1 << 63;

/// The conversation id of the 1:1 conversation between users `a` and `b` (order
/// independent). `None` if either id is 0 or above [`MAX_USER_ID`].
pub fn direct_conversation(a: UserId, b: UserId) -> Option<ConversationId> {
    if a == 0 || b == 0 || a > MAX_USER_ID || b > MAX_USER_ID {
        return None;
    }
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    Some((low << 31) | high)
}

/// The conversation id of group `g`. `None` if `g` is 0 or above [`MAX_GROUP_ID`].
pub fn group_conversation(g: GroupId) -> Option<ConversationId> {
    if g == 0 || g > MAX_GROUP_ID {
        return None;
    }
    Some(GROUP_BIT | g)
}

/// What a conversation id denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConversationKind {
    /// A 1:1 conversation; `low <= high`.
    Direct {
        /// The smaller user id.
        low: UserId,
        /// The larger user id.
        high: UserId,
    },
    /// A group conversation.
    Group(GroupId),
}

/// Decodes a conversation id; `None` if it cannot have been produced by
/// [`direct_conversation`] or [`group_conversation`].
pub fn conversation_kind(conv: ConversationId) -> Option<ConversationKind> {
    if conv & GROUP_BIT != 0 {
        let g = conv & !GROUP_BIT;
        return (g != 0).then_some(ConversationKind::Group(g));
    }
    let low = conv >> 31;
    let high = conv & MAX_USER_ID;
    (low != 0 && low <= high).then_some(ConversationKind::Direct { low, high })
}

/// For user `me`, who or what is on the other side of `conv`.
#[cfg(any(feature = "mem", test))]
pub(crate) fn peer_of(me: UserId, conv: ConversationId) -> Peer {
    match conversation_kind(conv) {
        Some(ConversationKind::Direct { low, high }) => {
            Peer::User(if low == me { high } else { low })
        }
        Some(ConversationKind::Group(g)) => Peer::Group(g),
        None => Peer::Unknown,
    }
}

/// The other side of a conversation, as seen by one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Peer {
    /// A 1:1 conversation with this user (the user themself for a notes-to-self conversation).
    User(UserId),
    /// A group conversation.
    Group(GroupId),
    /// The id is not in either space (only for conversation ids the caller made up).
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_is_order_independent_and_invertible() {
        let c = direct_conversation(7, 3).unwrap();
        assert_eq!(c, direct_conversation(3, 7).unwrap());
        assert_eq!(
            conversation_kind(c),
            Some(ConversationKind::Direct { low: 3, high: 7 })
        );
        let m = direct_conversation(MAX_USER_ID, MAX_USER_ID - 1).unwrap();
        assert_eq!(
            conversation_kind(m),
            Some(ConversationKind::Direct {
                low: MAX_USER_ID - 1,
                high: MAX_USER_ID
            })
        );
        assert!(m < GROUP_BIT);
        assert_eq!(direct_conversation(0, 1), None);
        assert_eq!(direct_conversation(1, MAX_USER_ID + 1), None);
        assert_eq!(peer_of(3, c), Peer::User(7));
        assert_eq!(peer_of(7, c), Peer::User(3));
        let me = direct_conversation(5, 5).unwrap();
        assert_eq!(peer_of(5, me), Peer::User(5));
    }

    #[test]
    fn group_space_is_distinct() {
        let g = group_conversation(1).unwrap();
        assert_eq!(conversation_kind(g), Some(ConversationKind::Group(1)));
        assert_ne!(g, direct_conversation(1, 1).unwrap());
        assert_eq!(group_conversation(0), None);
        assert_eq!(group_conversation(MAX_GROUP_ID + 1), None);
        assert_eq!(conversation_kind(0), None);
        assert_eq!(conversation_kind(GROUP_BIT), None);
        assert_eq!(peer_of(9, g), Peer::Group(1));
    }
}
