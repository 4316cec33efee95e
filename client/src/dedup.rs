//! Client-side de-duplication by (conversation, seq).
//!
//! Messages reach the client on two paths that may overlap: sync pages and live `Deliver`
//! pushes (the server says so in tern.proto, `SyncDone`). Every message of both paths goes through
//! [`Dedup::accept`], which lets each (conversation, seq) through once.
//!
//! Per conversation the state is the highest seq up to which *every* message has been handed to
//! the application (`contiguous`) plus the seqs handed over above it (`above`). Messages are
//! handed over as they arrive, not reordered: a live push may overtake the sync page that
//! carries its predecessors, and holding it back could stall forever if the gap never fills.
//!
//! # The base of a conversation
//!
//! `contiguous` only means something once the client knows where the conversation starts for
//! this device. The base comes from, in order of preference:
//! - `ConversationState` in a `SyncConversations` page: the sync continues from the highest of
//!   the device's cursor on the server (`delivered_seq`), what the user cleared
//!   (`settings.cleared_seq`) and what a bounded sync left out (`skipped_to_seq`) —
//!   [`Dedup::raise_floor`];
//! - the first message of a `SyncMessages` page (pages start right after the cursor) —
//!   [`Dedup::floor_if_unknown`];
//! - outside a sync, the first live message of a conversation not seen before (the server pushes
//!   in seq order and would have said `SyncNeeded` if it had dropped any) — `seq - 1`;
//! - during a sync, a live message of an unknown conversation waits in `above` until the sync
//!   supplies the base, or `SyncDone` settles it at the lowest seq seen minus one
//!   ([`Dedup::settle`]).
//!
//! # Invariants
//! - `accept` returns `true` at most once per (conversation, seq), for the lifetime of the value.
//! - Every seq in `above` is greater than `contiguous + 1` once the base is known.
//! - `above` holds at most [`MAX_ABOVE`] seqs; past that the lowest gap is given up (its seqs
//!   count as seen), which trades a message that never came for bounded memory.

use std::collections::{BTreeSet, HashMap};

/// Most out-of-order seqs remembered per conversation.
pub const MAX_ABOVE: usize = 1024;

#[derive(Debug, Default, Clone)]
struct Window {
    /// Every seq `<= contiguous` has been handed over (or lies below the device's cursor).
    contiguous: u64,
    /// Seqs handed over above `contiguous + 1`.
    above: BTreeSet<u64>,
    /// False while the conversation's starting point is unknown (see the module docs).
    based: bool,
    /// Highest seq acknowledged to the server (or known to be acknowledged already).
    acked: u64,
    /// The lowest seq handed over (0: none yet).
    first: u64,
}

impl Window {
    fn advance(&mut self) {
        while self.above.first() == Some(&(self.contiguous + 1)) {
            self.above.pop_first();
            self.contiguous += 1;
        }
    }

    fn set_base(&mut self, floor: u64) {
        self.contiguous = self.contiguous.max(floor);
        self.based = true;
        self.acked = self.acked.max(floor);
        let contiguous = self.contiguous;
        self.above.retain(|&s| s > contiguous);
        self.advance();
    }

    fn bound(&mut self) {
        while self.above.len() > MAX_ABOVE {
            // Give up the lowest gap: jump to the lowest seq seen and advance from there.
            if let Some(lowest) = self.above.pop_first() {
                self.contiguous = lowest;
                self.based = true;
                self.advance();
            }
        }
    }
}

/// De-duplication state for all conversations of one client.
#[derive(Debug, Default, Clone)]
pub struct Dedup {
    windows: HashMap<u64, Window>,
}

impl Dedup {
    /// An empty state: no conversation known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns `true` if `(conversation_id, seq)` has not been accepted before, and records it.
    ///
    /// `syncing` says whether a sync is in progress; it decides how an unknown conversation's
    /// base is chosen (see the module docs).
    pub fn accept(&mut self, conversation_id: u64, seq: u64, syncing: bool) -> bool {
        if seq == 0 {
            // Seqs start at 1; a 0 is malformed and never handed over.
            return false;
        }
        let window = self.windows.entry(conversation_id).or_insert_with(|| {
            let mut w = Window::default();
            if !syncing {
                w.based = true;
                w.contiguous = seq - 1;
                w.acked = seq - 1;
            }
            w
        });
        if seq <= window.contiguous && window.based {
            return false;
        }
        if !window.above.insert(seq) {
            return false;
        }
        if window.first == 0 || seq < window.first {
            window.first = seq;
        }
        if window.based {
            window.advance();
        }
        window.bound();
        true
    }

    /// For a live room's earlier messages handed over outside its stream of messages
    /// (`RoomResponse.recent`, in ascending seq): whether `seq` may be handed over, i.e. it
    /// was not handed over from the stream already. One above everything handed over from the
    /// stream is recorded, so that a copy the stream brings later (on another path) is not
    /// handed over again; one below it never will be.
    pub fn accept_earlier(&mut self, conversation_id: u64, seq: u64) -> bool {
        match self.windows.get(&conversation_id) {
            Some(w) if w.first != 0 && seq < w.first => true,
            _ => self.accept(conversation_id, seq, false),
        }
    }

    /// Records that every seq up to `floor` counts as seen (a sync continues after it, see the
    /// module docs), also as acknowledged. Never lowers the state.
    pub fn raise_floor(&mut self, conversation_id: u64, floor: u64) {
        self.windows
            .entry(conversation_id)
            .or_default()
            .set_base(floor);
    }

    /// Sets the base to `floor` if the conversation's base is not known yet.
    pub fn floor_if_unknown(&mut self, conversation_id: u64, floor: u64) {
        let window = self.windows.entry(conversation_id).or_default();
        if !window.based {
            window.set_base(floor);
        }
    }

    /// Ends a sync: every conversation still without a base starts right below the lowest seq
    /// handed over for it.
    pub fn settle(&mut self) {
        for window in self.windows.values_mut().filter(|w| !w.based) {
            let floor = window.above.first().map_or(0, |s| s - 1);
            window.set_base(floor);
        }
    }

    /// The highest seq of `conversation_id` up to which every message has been handed over, if
    /// the conversation's base is known.
    pub fn contiguous(&self, conversation_id: u64) -> Option<u64> {
        self.windows
            .get(&conversation_id)
            .filter(|w| w.based)
            .map(|w| w.contiguous)
    }

    /// If `conversation_id`'s contiguous seq is above what was last acknowledged, marks it
    /// acknowledged and returns it: the seq to put in an `Ack`.
    pub fn take_ack(&mut self, conversation_id: u64) -> Option<u64> {
        let window = self.windows.get_mut(&conversation_id)?;
        if window.based && window.contiguous > window.acked {
            window.acked = window.contiguous;
            Some(window.contiguous)
        } else {
            None
        }
    }

    /// Records an acknowledgement the application sent itself.
    pub fn note_acked(&mut self, conversation_id: u64, seq: u64) {
        if let Some(window) = self.windows.get_mut(&conversation_id) {
            window.acked = window.acked.max(seq);
        }
    }

    /// Forgets every conversation for which `forget` is true: their next message sets their
    /// base again, as for a conversation never seen. For conversations whose numbering may
    /// start again (live rooms, after a new login).
    pub fn forget_if(&mut self, mut forget: impl FnMut(u64) -> bool) {
        self.windows
            .retain(|&conversation_id, _| !forget(conversation_id));
    }

    /// Number of out-of-order seqs remembered for `conversation_id`.
    pub fn pending_above(&self, conversation_id: u64) -> usize {
        self.windows
            .get(&conversation_id)
            .map_or(0, |w| w.above.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(d: &mut Dedup, conv: u64, seqs: &[u64], syncing: bool) -> Vec<u64> {
        seqs.iter()
            .copied()
            .filter(|&s| d.accept(conv, s, syncing))
            .collect()
    }

    fn earlier(d: &mut Dedup, conv: u64, seqs: &[u64]) -> Vec<u64> {
        seqs.iter()
            .copied()
            .filter(|&s| d.accept_earlier(conv, s))
            .collect()
    }

    #[test]
    fn a_rooms_earlier_messages_and_its_stream_share_nothing() {
        // Nothing from the stream yet: all of them, and the stream's copies are duplicates.
        let mut d = Dedup::new();
        assert_eq!(earlier(&mut d, 9, &[3, 4, 5]), [3, 4, 5]);
        assert_eq!(accepted(&mut d, 9, &[4, 5, 6], false), [6]);
        // The stream brought 7 and 8 first (on another path): the rest, and never 9 again.
        let mut d = Dedup::new();
        assert_eq!(accepted(&mut d, 9, &[7, 8], false), [7, 8]);
        assert_eq!(earlier(&mut d, 9, &[5, 6, 7, 8, 9]), [5, 6, 9]);
        assert_eq!(accepted(&mut d, 9, &[6, 9, 10], false), [10]);
    }

    #[test]
    fn in_order_live_messages_pass_once() {
        let mut d = Dedup::new();
        assert_eq!(accepted(&mut d, 7, &[1, 2, 3, 2, 3, 1], false), [1, 2, 3]);
        assert_eq!(d.contiguous(7), Some(3));
        assert_eq!(d.pending_above(7), 0);
    }

    #[test]
    fn first_live_message_sets_the_base_outside_sync() {
        let mut d = Dedup::new();
        assert!(d.accept(1, 10, false));
        assert_eq!(d.contiguous(1), Some(10));
        assert!(!d.accept(1, 10, false));
        assert!(d.accept(1, 11, false));
        // Nothing to ack for the base itself, only for what was handed over.
        assert_eq!(d.take_ack(1), Some(11));
        assert_eq!(d.take_ack(1), None);
    }

    #[test]
    fn out_of_order_fills_the_gap() {
        let mut d = Dedup::new();
        d.raise_floor(5, 2);
        assert_eq!(accepted(&mut d, 5, &[5, 3, 5, 4, 3], true), [5, 3, 4]);
        assert_eq!(d.contiguous(5), Some(5));
        assert_eq!(d.pending_above(5), 0);
    }

    #[test]
    fn live_push_racing_a_sync_page_is_neither_lost_nor_duplicated() {
        let mut d = Dedup::new();
        // Live 5 and 6 arrive before the sync says where this device's cursor is.
        assert_eq!(accepted(&mut d, 9, &[5, 6], true), [5, 6]);
        assert_eq!(d.contiguous(9), None);
        assert_eq!(d.take_ack(9), None, "no ack while the base is unknown");
        d.raise_floor(9, 2);
        // The sync page carries 3..=6; only 3 and 4 are new.
        assert_eq!(accepted(&mut d, 9, &[3, 4, 5, 6], true), [3, 4]);
        assert_eq!(d.contiguous(9), Some(6));
        assert_eq!(d.take_ack(9), Some(6));
        // A live 7 afterwards.
        assert_eq!(accepted(&mut d, 9, &[7, 6], false), [7]);
    }

    #[test]
    fn sync_page_without_conversation_state_uses_its_first_seq() {
        let mut d = Dedup::new();
        assert!(d.accept(4, 8, true)); // live push during sync
        d.floor_if_unknown(4, 5); // page starts at 6
        assert_eq!(accepted(&mut d, 4, &[6, 7, 8, 9], true), [6, 7, 9]);
        assert_eq!(d.contiguous(4), Some(9));
    }

    #[test]
    fn settle_bases_unknown_conversations_on_their_lowest_seq() {
        let mut d = Dedup::new();
        assert_eq!(accepted(&mut d, 3, &[12, 11], true), [12, 11]);
        d.settle();
        assert_eq!(d.contiguous(3), Some(12));
        assert!(!d.accept(3, 11, false));
        assert!(d.accept(3, 13, false));
    }

    #[test]
    fn floor_never_goes_backwards() {
        let mut d = Dedup::new();
        assert_eq!(accepted(&mut d, 1, &[1, 2, 3, 4], false), [1, 2, 3, 4]);
        d.raise_floor(1, 2);
        assert_eq!(d.contiguous(1), Some(4));
        assert!(!d.accept(1, 3, false));
        d.raise_floor(1, 10);
        assert_eq!(d.contiguous(1), Some(10));
        assert!(!d.accept(1, 9, false));
        assert_eq!(d.take_ack(1), None, "the server's own cursor needs no ack");
    }

    #[test]
    fn conversations_are_independent() {
        let mut d = Dedup::new();
        assert!(d.accept(1, 1, false));
        assert!(d.accept(2, 1, false));
        assert!(!d.accept(1, 1, false));
        assert!(!d.accept(2, 1, false));
        assert!(!d.accept(2, 0, false), "seq 0 is never valid");
    }

    #[test]
    fn out_of_order_set_is_bounded() {
        let mut d = Dedup::new();
        d.raise_floor(1, 0);
        // Seq 1 never comes; 2..=MAX_ABOVE+2 do.
        let last = MAX_ABOVE as u64 + 2;
        for s in 2..=last {
            assert!(d.accept(1, s, false));
        }
        assert!(d.pending_above(1) <= MAX_ABOVE);
        assert_eq!(d.contiguous(1), Some(last), "the lowest gap was given up");
        for s in 1..=last {
            assert!(!d.accept(1, s, false), "seq {s} handed over twice");
        }
    }

    #[test]
    fn forgotten_conversations_start_again() {
        let mut d = Dedup::new();
        assert_eq!(accepted(&mut d, 1, &[1, 2, 3], false), [1, 2, 3]);
        assert_eq!(accepted(&mut d, 2, &[1, 2], false), [1, 2]);
        d.forget_if(|c| c == 2);
        assert_eq!(d.contiguous(2), None);
        assert_eq!(accepted(&mut d, 2, &[1, 2, 1], false), [1, 2]);
        assert_eq!(accepted(&mut d, 1, &[1, 2, 3, 4], false), [4]);
    }

    #[test]
    fn app_acks_are_remembered() {
        let mut d = Dedup::new();
        assert_eq!(accepted(&mut d, 1, &[1, 2, 3], false), [1, 2, 3]);
        d.note_acked(1, 3);
        assert_eq!(d.take_ack(1), None);
    }
}
