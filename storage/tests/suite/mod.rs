//! The behavioural test suite, written once and run against every `MessageStore`.
//!
//! Each check takes a factory so that it can choose the idempotency window; `suite!`
//! expands to one `#[test]` per check.

use std::time::Duration;

use bytes::Bytes;
use tern_storage::{
    AppendRequest, Appended, ConversationInfo, ConversationSettings, DedupWindow, GroupChange,
    MAX_CLIENT_MSG_ID_LEN, MAX_GROUP_ID, MAX_META_CHANGES, MAX_META_KEY_LEN, MAX_META_SCAN,
    MAX_META_VALUE_LEN, MAX_RELATION_CHANGES, MAX_USER_ID, MessageStore, MetaChange, Peer,
    RelationChange, RelationKind, SettingsChange, SettingsUpdate, StorageError, SyncView,
    direct_conversation, group_conversation,
};

/// A store plus whatever must live as long as it (a temporary directory).
pub struct Fixture {
    pub store: Box<dyn MessageStore>,
    pub _keep: Option<tempfile::TempDir>,
}

pub type Factory = fn(DedupWindow) -> Fixture;

pub fn msg(conv: u64, sender: u64, id: &str, body: &str) -> AppendRequest {
    AppendRequest {
        conversation: conv,
        sender,
        client_msg_id: id.to_owned(),
        content_type: 1,
        custom_type: String::new(),
        payload: Bytes::copy_from_slice(body.as_bytes()),
        participants: Vec::new(),
        ..AppendRequest::default()
    }
}

fn append(s: &dyn MessageStore, r: AppendRequest) -> Appended {
    s.append(r).wait().expect("append")
}

fn fill(s: &dyn MessageStore, conv: u64, n: u64) {
    let pending: Vec<_> = (1..=n)
        .map(|i| {
            s.append(msg(
                conv,
                1,
                &format!("fill-{conv}-{i}"),
                &format!("body {i}"),
            ))
        })
        .collect();
    for (i, c) in pending.into_iter().enumerate() {
        assert_eq!(c.wait().unwrap().seq, i as u64 + 1);
    }
}

fn seqs(v: &[tern_storage::StoredMessage]) -> Vec<u64> {
    v.iter().map(|m| m.seq).collect()
}

pub fn append_assigns_contiguous_seqs(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let a = direct_conversation(1, 2).unwrap();
    let b = group_conversation(1).unwrap();
    let mut last_version = 0;
    let mut last_time = 0;
    for i in 1..=5u64 {
        for conv in [a, b] {
            let r = append(s, msg(conv, 1, &format!("{conv}-{i}"), "x"));
            assert_eq!(r.seq, i);
            assert_eq!(r.conversation, conv);
            assert!(!r.duplicate);
            assert!(r.version > last_version, "versions strictly increase");
            assert!(r.server_time_ms >= last_time, "time never goes back");
            last_version = r.version;
            last_time = r.server_time_ms;
        }
    }
    assert_eq!(s.latest_seq(a).unwrap(), 5);
    assert_eq!(s.latest_seq(b).unwrap(), 5);
    assert_eq!(s.latest_seq(direct_conversation(3, 4).unwrap()).unwrap(), 0);
}

pub fn concurrent_submissions_keep_per_thread_order(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            scope.spawn(move || {
                let conv = group_conversation(100 + t).unwrap();
                let shared = group_conversation(99).unwrap();
                let mut pending = Vec::new();
                for i in 0..200u64 {
                    pending.push((conv, i, s.append(msg(conv, t + 1, &format!("{t}-{i}"), ""))));
                    pending.push((
                        shared,
                        i,
                        s.append(msg(shared, t + 1, &format!("s{t}-{i}"), "")),
                    ));
                }
                let mut last_shared = 0;
                for (c, i, p) in pending {
                    let r = p.wait().unwrap();
                    if c == conv {
                        assert_eq!(r.seq, i + 1);
                    } else {
                        assert!(r.seq > last_shared, "FIFO per submitting thread");
                        last_shared = r.seq;
                    }
                }
            });
        }
    });
    let shared = s
        .read_forward(group_conversation(99).unwrap(), 1, 10_000)
        .unwrap();
    assert_eq!(seqs(&shared), (1..=800).collect::<Vec<_>>());
}

pub fn append_rejects_invalid_requests(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = group_conversation(1).unwrap();
    let inval = |r: AppendRequest| {
        assert!(matches!(
            s.append(r).wait(),
            Err(StorageError::InvalidArgument(_))
        ))
    };
    inval(msg(0, 1, "a", ""));
    inval(msg(c, 0, "a", ""));
    inval(msg(c, 1, &"x".repeat(MAX_CLIENT_MSG_ID_LEN + 1), ""));
    let mut r = msg(c, 1, "a", "");
    r.custom_type = "t".repeat(tern_storage::MAX_CUSTOM_TYPE_LEN + 1);
    inval(r);
    let mut r = msg(c, 1, "a", "");
    r.participants = vec![0];
    inval(r);
    assert_eq!(s.latest_seq(c).unwrap(), 0, "nothing was written");
    // The maximal id length is accepted.
    let r = append(s, msg(c, 1, &"x".repeat(MAX_CLIENT_MSG_ID_LEN), ""));
    assert_eq!(r.seq, 1);
}

pub fn idempotent_retry_returns_original(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = direct_conversation(1, 2).unwrap();
    let first = append(s, msg(c, 1, "m-1", "hello"));
    let again = append(s, msg(c, 1, "m-1", "hello (retry)"));
    assert!(again.duplicate);
    assert_eq!(
        (
            again.seq,
            again.server_time_ms,
            again.version,
            again.conversation
        ),
        (
            first.seq,
            first.server_time_ms,
            first.version,
            first.conversation
        )
    );
    assert_eq!(s.latest_seq(c).unwrap(), 1);
    let stored = s.read_forward(c, 1, 10).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].payload,
        Bytes::from_static(b"hello"),
        "original kept"
    );

    // Same id, other sender: a different message.
    assert_eq!(append(s, msg(c, 2, "m-1", "")).seq, 2);
    // Empty id: never de-duplicated.
    assert_eq!(append(s, msg(c, 1, "", "")).seq, 3);
    assert_eq!(append(s, msg(c, 1, "", "")).seq, 4);

    // Both copies in flight at once (the dual channel): one write, same seq.
    let p1 = s.append(msg(c, 1, "m-2", "a"));
    let p2 = s.append(msg(c, 1, "m-2", "a"));
    let (r1, r2) = (p1.wait().unwrap(), p2.wait().unwrap());
    assert_eq!((r1.seq, r1.duplicate), (5, false));
    assert_eq!((r2.seq, r2.duplicate), (5, true));
    assert_eq!(s.latest_seq(c).unwrap(), 5);
}

pub fn dedup_window_by_count(make: Factory) {
    let f = make(DedupWindow {
        max_entries: 2,
        max_age: Duration::from_secs(3600),
    });
    let s = &*f.store;
    let c = group_conversation(7).unwrap();
    for id in ["a", "b", "c"] {
        append(s, msg(c, 1, id, ""));
    }
    assert!(append(s, msg(c, 1, "c", "")).duplicate);
    assert!(append(s, msg(c, 1, "b", "")).duplicate);
    let a = append(s, msg(c, 1, "a", ""));
    assert!(!a.duplicate, "fell out of the window");
    assert_eq!(a.seq, 4);
}

pub fn dedup_window_by_age(make: Factory) {
    let f = make(DedupWindow {
        max_entries: 1000,
        max_age: Duration::from_millis(1500),
    });
    let s = &*f.store;
    let c = group_conversation(7).unwrap();
    append(s, msg(c, 1, "a", ""));
    // Well inside the window even on a loaded machine.
    assert!(append(s, msg(c, 1, "a", "")).duplicate);
    // The feature under test is ageing: let the entry age past the window.
    std::thread::sleep(Duration::from_millis(1600));
    let r = append(s, msg(c, 1, "a", ""));
    assert!(!r.duplicate);
    assert_eq!(r.seq, 2);
}

pub fn read_forward_pages(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = direct_conversation(1, 2).unwrap();
    let mut r = msg(c, 2, "id-1", "payload one");
    r.content_type = 42;
    r.custom_type = "app.card".into();
    let a = append(s, r);
    fill(s, group_conversation(1).unwrap(), 3);
    for i in 2..=10 {
        append(s, msg(c, 1, &format!("id-{i}"), &format!("p{i}")));
    }
    let first = &s.read_forward(c, 1, 1).unwrap()[0];
    assert_eq!(first.seq, 1);
    assert_eq!(first.conversation, c);
    assert_eq!(first.sender, 2);
    assert_eq!(first.client_msg_id, "id-1");
    assert_eq!(first.content_type, 42);
    assert_eq!(first.custom_type, "app.card");
    assert_eq!(first.payload, Bytes::from_static(b"payload one"));
    assert_eq!(first.timestamp_ms, a.server_time_ms);
    assert_eq!(first.version, a.version);

    assert_eq!(seqs(&s.read_forward(c, 1, 4).unwrap()), vec![1, 2, 3, 4]);
    assert_eq!(seqs(&s.read_forward(c, 5, 4).unwrap()), vec![5, 6, 7, 8]);
    assert_eq!(seqs(&s.read_forward(c, 9, 4).unwrap()), vec![9, 10]);
    assert!(s.read_forward(c, 11, 4).unwrap().is_empty());
    assert!(s.read_forward(c, u64::MAX, 4).unwrap().is_empty());
    assert_eq!(
        seqs(&s.read_forward(c, 0, 3).unwrap()),
        vec![1, 2, 3],
        "0 reads from 1"
    );
    assert!(s.read_forward(c, 1, 0).unwrap().is_empty());
    assert_eq!(s.read_forward(c, 1, 1000).unwrap().len(), 10);
    assert!(
        s.read_forward(direct_conversation(5, 6).unwrap(), 1, 10)
            .unwrap()
            .is_empty()
    );
}

pub fn read_backward_pages(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = direct_conversation(1, 2).unwrap();
    fill(s, c, 10);
    fill(s, direct_conversation(1, 3).unwrap(), 2);
    assert_eq!(seqs(&s.read_backward(c, 0, 4).unwrap()), vec![10, 9, 8, 7]);
    assert_eq!(seqs(&s.read_backward(c, 7, 4).unwrap()), vec![6, 5, 4, 3]);
    assert_eq!(seqs(&s.read_backward(c, 3, 4).unwrap()), vec![2, 1]);
    assert!(s.read_backward(c, 1, 4).unwrap().is_empty());
    assert_eq!(seqs(&s.read_backward(c, 100, 2).unwrap()), vec![10, 9]);
    assert_eq!(seqs(&s.read_backward(c, 11, 1).unwrap()), vec![10]);
    // Just past the head, and a page larger than the conversation.
    assert_eq!(seqs(&s.read_backward(c, 12, 3).unwrap()), vec![10, 9, 8]);
    assert_eq!(
        seqs(&s.read_backward(c, 11, 20).unwrap()),
        (1..=10).rev().collect::<Vec<_>>()
    );
    assert!(s.read_backward(c, 0, 0).unwrap().is_empty());
    assert!(
        s.read_backward(direct_conversation(5, 6).unwrap(), 0, 4)
            .unwrap()
            .is_empty()
    );
    let m = &s.read_backward(c, 0, 1).unwrap()[0];
    assert_eq!(m.client_msg_id, format!("fill-{c}-10"));
    assert_eq!(m.payload, Bytes::from_static(b"body 10"));
}

pub fn conversations_do_not_leak_into_neighbours(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    // Adjacent ids, and the very last conversation id (no upper bound key exists).
    let top = group_conversation(MAX_GROUP_ID).unwrap();
    assert_eq!(top, u64::MAX);
    let below = group_conversation(MAX_GROUP_ID - 1).unwrap();
    let lowest_group = group_conversation(1).unwrap();
    let highest_direct = lowest_group - 1;
    fill(s, top, 3);
    fill(s, below, 2);
    fill(s, highest_direct, 2);
    fill(s, lowest_group, 1);
    assert_eq!(seqs(&s.read_forward(top, 1, 10).unwrap()), vec![1, 2, 3]);
    assert_eq!(seqs(&s.read_backward(top, 0, 10).unwrap()), vec![3, 2, 1]);
    assert_eq!(seqs(&s.read_forward(below, 1, 10).unwrap()), vec![1, 2]);
    assert_eq!(seqs(&s.read_backward(below, 0, 10).unwrap()), vec![2, 1]);
    assert_eq!(
        seqs(&s.read_backward(lowest_group, 0, 10).unwrap()),
        vec![1]
    );
    assert_eq!(
        seqs(&s.read_forward(highest_direct, 2, 10).unwrap()),
        vec![2]
    );
    assert_eq!(s.latest_seq(top).unwrap(), 3);
    assert_eq!(s.latest_seq(below).unwrap(), 2);
    assert_eq!(s.latest_seq(below - 1).unwrap(), 0);
}

pub fn interning(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let alice = s.intern_user("alice").unwrap();
    let bob = s.intern_user("bob").unwrap();
    assert!(alice >= 1 && bob >= 1 && alice != bob);
    assert_eq!(s.intern_user("alice").unwrap(), alice);
    assert_eq!(s.lookup_user("alice").unwrap(), Some(alice));
    assert_eq!(s.lookup_user("carol").unwrap(), None);
    assert_eq!(s.user_name(bob).unwrap().as_deref(), Some("bob"));
    assert_eq!(s.user_name(999).unwrap(), None);
    assert_eq!(s.user_name(0).unwrap(), None);
    // Groups are a separate space.
    assert_eq!(s.lookup_group("alice").unwrap(), None);
    let g = s.intern_group("alice").unwrap();
    assert_eq!(s.intern_group("alice").unwrap(), g);
    assert_eq!(s.lookup_group("alice").unwrap(), Some(g));
    assert_eq!(s.group_name(g).unwrap().as_deref(), Some("alice"));
    assert!(matches!(
        s.intern_user(""),
        Err(StorageError::InvalidArgument(_))
    ));
    // Unicode names round-trip.
    let u = s.intern_user("zoë ✓").unwrap();
    assert_eq!(s.user_name(u).unwrap().as_deref(), Some("zoë ✓"));
}

pub fn membership(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let g = s.intern_group("team").unwrap();
    let g2 = s.intern_group("other").unwrap();
    for u in 1..=5 {
        assert!(s.add_member(g, u).wait().unwrap());
    }
    assert!(!s.add_member(g, 3).wait().unwrap(), "already a member");
    assert!(s.add_member(g2, 3).wait().unwrap());
    // Added without a message: they may read from the group's next message on.
    assert_eq!(s.joined_seq(3, g).unwrap(), 1);
    assert_eq!(s.members(g, 0, 2).unwrap(), vec![1, 2]);
    assert_eq!(s.members(g, 2, 2).unwrap(), vec![3, 4]);
    assert_eq!(s.members(g, 4, 2).unwrap(), vec![5]);
    assert!(s.members(g, 5, 2).unwrap().is_empty());
    assert!(s.members(g, u64::MAX, 2).unwrap().is_empty());
    assert_eq!(s.members(g2, 0, 100).unwrap(), vec![3]);
    let mut gs = vec![g, g2];
    gs.sort();
    assert_eq!(s.groups_of(3).unwrap(), gs);
    assert!(s.remove_member(g, 3).wait().unwrap());
    assert!(
        !s.remove_member(g, 3).wait().unwrap(),
        "not a member any more"
    );
    assert_eq!(s.members(g, 0, 100).unwrap(), vec![1, 2, 4, 5]);
    assert_eq!(s.groups_of(3).unwrap(), vec![g2]);
    assert!(s.groups_of(42).unwrap().is_empty());
    // Add and remove in one batch.
    let a = s.add_member(g, 9);
    let r = s.remove_member(g, 9);
    assert!(a.wait().unwrap() && r.wait().unwrap());
    assert!(!s.members(g, 0, 100).unwrap().contains(&9));
    assert!(matches!(
        s.add_member(0, 1).wait(),
        Err(StorageError::InvalidArgument(_))
    ));
    assert!(matches!(
        s.add_member(g, 0).wait(),
        Err(StorageError::InvalidArgument(_))
    ));

    // The user's conversation index follows membership.
    let conv = group_conversation(g).unwrap();
    let infos = s.conversations_changed_since(3, 0, None).unwrap();
    let i = infos.iter().find(|i| i.conversation == conv).unwrap();
    assert!(!i.active);
    assert_eq!(i.peer, Peer::Group(g));
    let i1 = s.conversations_changed_since(1, 0, None).unwrap();
    assert_eq!(i1.len(), 1);
    assert!(i1[0].active);
}

pub fn sync_state(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let (alice, bob, carol) = (1, 2, 3);
    let ab = direct_conversation(alice, bob).unwrap();
    let ac = direct_conversation(alice, carol).unwrap();
    assert_eq!(s.user_version(alice).unwrap(), 0);
    assert!(
        s.conversations_changed_since(alice, 0, None)
            .unwrap()
            .is_empty()
    );

    // Bob writes, so that alice's read position is hers to move.
    let mut r = msg(ab, bob, "1", "hi");
    r.participants = vec![alice, bob];
    let m1 = append(s, r.clone());
    r.client_msg_id = "2".into();
    let m2 = append(s, r.clone());
    let infos = s
        .conversations_changed_since(alice, 0, Some("phone"))
        .unwrap();
    assert_eq!(infos.len(), 1);
    let i = infos[0];
    assert_eq!(i.conversation, ab);
    assert_eq!(i.peer, Peer::User(bob));
    assert!(i.active);
    assert_eq!((i.latest_seq, i.read_seq, i.delivered_seq), (2, 0, 0));
    assert_eq!(i.last_version, m2.version);
    assert_eq!(s.user_version(alice).unwrap(), m2.version);
    assert_eq!(s.user_version(bob).unwrap(), m2.version);
    assert_eq!(
        s.conversations_changed_since(bob, 0, None).unwrap()[0].peer,
        Peer::User(alice)
    );
    assert!(m1.version < m2.version);
    assert!(
        s.conversations_changed_since(alice, m2.version, None)
            .unwrap()
            .is_empty()
    );

    // A message in another conversation: only that one changed since V.
    let v = s.user_version(alice).unwrap();
    let mut r2 = msg(ac, carol, "c1", "yo");
    r2.participants = vec![alice, carol];
    let m3 = append(s, r2);
    let changed = s.conversations_changed_since(alice, v, None).unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].conversation, ac);
    assert_eq!(s.user_version(alice).unwrap(), m3.version);
    assert_eq!(s.user_version(bob).unwrap(), m2.version, "bob is not in it");
    let mut both: Vec<u64> = s
        .conversations_changed_since(alice, 0, None)
        .unwrap()
        .iter()
        .map(|i| i.conversation)
        .collect();
    both.sort();
    let mut want = vec![ab, ac];
    want.sort();
    assert_eq!(both, want);

    // Read positions: monotonic, clamped, and they advance the user's version.
    let v = s.user_version(alice).unwrap();
    assert_eq!(s.set_read(alice, ab, 1).wait().unwrap(), 1);
    assert_eq!(s.read_seq(alice, ab).unwrap(), 1);
    let v2 = s.user_version(alice).unwrap();
    assert!(v2 > v);
    let changed = s.conversations_changed_since(alice, v, None).unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!((changed[0].conversation, changed[0].read_seq), (ab, 1));
    assert_eq!(
        s.set_read(alice, ab, 0).wait().unwrap(),
        1,
        "never backwards"
    );
    assert_eq!(
        s.user_version(alice).unwrap(),
        v2,
        "a no-op changes nothing"
    );
    assert_eq!(
        s.set_read(alice, ab, 99).wait().unwrap(),
        2,
        "clamped to latest"
    );
    assert_eq!(
        s.read_seq(carol, ac).unwrap(),
        1,
        "per user: carol wrote it"
    );
    assert_eq!(s.read_seq(alice, ac).unwrap(), 0, "per user");
    assert_eq!(
        s.read_seq(alice, group_conversation(5).unwrap()).unwrap(),
        0
    );

    // Delivered cursors: per device, monotonic, clamped; no version change.
    let v3 = s.user_version(alice).unwrap();
    assert_eq!(s.set_delivered(alice, "phone", ab, 1).wait().unwrap(), 1);
    assert_eq!(s.set_delivered(alice, "phone", ab, 0).wait().unwrap(), 1);
    assert_eq!(s.set_delivered(alice, "phone", ab, 50).wait().unwrap(), 2);
    assert_eq!(s.delivered(alice, "phone", ab).unwrap(), 2);
    assert_eq!(s.delivered(alice, "laptop", ab).unwrap(), 0);
    assert_eq!(s.delivered(bob, "phone", ab).unwrap(), 0);
    assert_eq!(s.set_delivered(alice, "laptop", ab, 1).wait().unwrap(), 1);
    // Several updates of one cursor in one batch.
    let p: Vec<_> = [1, 2, 1]
        .into_iter()
        .map(|q| s.set_delivered(bob, "tab", ab, q))
        .collect();
    let got: Vec<u64> = p.into_iter().map(|c| c.wait().unwrap()).collect();
    assert_eq!(got, vec![1, 2, 2]);
    assert_eq!(s.user_version(alice).unwrap(), v3);
    let i = s
        .conversations_changed_since(alice, 0, Some("laptop"))
        .unwrap()
        .into_iter()
        .find(|i| i.conversation == ab)
        .unwrap();
    assert_eq!((i.read_seq, i.delivered_seq, i.latest_seq), (2, 1, 2));
}

/// A user's unread count (`latest_seq - read_seq`) leaves out their own messages and
/// everything before they joined a group; reads only move forward.
pub fn unread_leaves_out_own_messages_and_what_came_before_joining(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let (alice, bob, carol, dave) = (1, 2, 3, 4);
    let unread = |user: u64, conv: u64| {
        let i = conv_info(s, user, conv).unwrap();
        (i.latest_seq - i.read_seq, i.read_seq)
    };

    // 1:1: bob writes twice, alice once; alice's reply reads bob's messages before it.
    let ab = direct_conversation(alice, bob).unwrap();
    let send = |sender: u64, id: &str| {
        let mut r = msg(ab, sender, id, "x");
        r.participants = vec![alice, bob];
        append(s, r)
    };
    send(bob, "b1");
    let b2 = send(bob, "b2");
    assert_eq!(unread(alice, ab), (2, 0));
    assert_eq!(unread(bob, ab), (0, 2));
    let a3 = send(alice, "a3");
    assert_eq!(unread(alice, ab), (0, 3));
    assert_eq!(unread(bob, ab), (1, 2));
    // The read moves with the append's own version: nothing else is reported as changed.
    assert_eq!(conv_info(s, alice, ab).unwrap().last_version, a3.version);
    assert_eq!(s.user_version(bob).unwrap(), a3.version);
    // A retry is a duplicate: it moves nothing.
    assert_eq!(s.set_read(bob, ab, 3).wait().unwrap(), 3);
    let v = s.user_version(bob).unwrap();
    let mut retry = msg(ab, bob, "b2", "x");
    retry.participants = vec![alice, bob];
    assert!(append(s, retry).duplicate);
    assert_eq!((unread(bob, ab), s.user_version(bob).unwrap()), ((0, 3), v));
    assert_eq!(b2.seq, 2);

    // A group: created by alice with bob; both start with nothing unread.
    let g = s.intern_group("unread").unwrap();
    let gc = group_conversation(g).unwrap();
    let mut create = group_msg(
        g,
        "create",
        Some("g"),
        &[(alice, Some("")), (bob, Some(""))],
    );
    create.sender = alice;
    append(s, create);
    assert_eq!(unread(alice, gc), (0, 1));
    assert_eq!(unread(bob, gc), (0, 1));
    for i in 0..3 {
        append(s, msg(gc, alice, &format!("g{i}"), "x"));
    }
    assert_eq!(unread(bob, gc), (3, 1));
    assert_eq!(unread(alice, gc), (0, 4));
    // Carol joins through a change at seq 5: everything up to it is read.
    let mut join = group_msg(g, "join", None, &[(carol, Some(""))]);
    join.sender = bob;
    assert_eq!(append(s, join).seq, 5);
    assert_eq!(unread(carol, gc), (0, 5));
    assert_eq!(unread(bob, gc), (0, 5), "bob wrote the join event");
    append(s, msg(gc, alice, "g-after", "x"));
    assert_eq!(unread(carol, gc), (1, 5));
    // Dave is added by the member call: nothing unread either.
    assert!(s.add_member(g, dave).wait().unwrap());
    assert_eq!(unread(dave, gc), (0, 6));

    // A sender without the conversation in their index gets no entry; one who left, no read.
    append(s, msg(gc, 9, "outsider", "x"));
    assert_eq!(conv_info(s, 9, gc), None);
    assert!(s.remove_member(g, carol).wait().unwrap());
    append(s, msg(gc, carol, "after-leaving", "x"));
    assert_eq!(conv_info(s, carol, gc).unwrap().read_seq, 5);

    // Rejoining reads what was said while away.
    assert!(s.remove_member(g, dave).wait().unwrap());
    assert_eq!(append(s, msg(gc, alice, "while-away", "x")).seq, 9);
    assert!(s.add_member(g, dave).wait().unwrap());
    assert_eq!(unread(dave, gc), (0, 9));
    // Leaving by one's own event reads it: nothing unread in a group one left.
    let mut leave = group_msg(g, "bob-leaves", None, &[(bob, None)]);
    leave.sender = bob;
    assert_eq!(append(s, leave).seq, 10);
    let i = conv_info(s, bob, gc).unwrap();
    assert_eq!((i.active, i.left_seq, i.read_seq), (false, 10, 10));
}

/// Sync reports the other user's read position of a 1:1 conversation (moved by their reads
/// and their own messages), and a move of it alone marks the conversation changed.
pub fn sync_reports_the_peers_read_position(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let (alice, bob) = (1, 2);
    let ab = direct_conversation(alice, bob).unwrap();
    let send = |sender: u64, id: &str| {
        let mut r = msg(ab, sender, id, "x");
        r.participants = vec![alice, bob];
        append(s, r)
    };
    send(alice, "a1");
    send(alice, "a2");
    let peer = |user: u64| conv_info(s, user, ab).unwrap().peer_read_seq;
    assert_eq!((peer(alice), peer(bob)), (0, 2));
    let v = s.user_version(alice).unwrap();
    assert_eq!(s.set_read(bob, ab, 1).wait().unwrap(), 1);
    let changed = s.conversations_changed_since(alice, v, None).unwrap();
    assert_eq!(
        changed.len(),
        1,
        "bob's read alone changes alice's conversation"
    );
    assert_eq!((changed[0].peer_read_seq, changed[0].read_seq), (1, 2));
    assert!(changed[0].last_version > v);
    assert_eq!(s.user_version(alice).unwrap(), changed[0].last_version);
    // Bob's reply reads alice's messages.
    send(bob, "b3");
    assert_eq!((peer(alice), peer(bob)), (3, 2));
    // Groups have none; a conversation with oneself reports one's own.
    let gc = group_conversation(4).unwrap();
    assert!(s.add_member(4, alice).wait().unwrap());
    append(s, msg(gc, bob, "g1", "x"));
    assert_eq!(conv_info(s, alice, gc).unwrap().peer_read_seq, 0);
    let me = direct_conversation(alice, alice).unwrap();
    let mut note = msg(me, alice, "self", "x");
    note.participants = vec![alice];
    append(s, note);
    let i = conv_info(s, alice, me).unwrap();
    assert_eq!((i.read_seq, i.peer_read_seq), (1, 1));
}

/// A sync view taken while messages and read positions are written is one consistent view:
/// every change with a version up to the view's user version is in it, so a sync from that
/// version later misses nothing. The parts (changed conversations, user version) agree with it.
pub fn sync_view_is_consistent_while_written(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let convs: Vec<u64> = (2..10)
        .map(|peer| direct_conversation(1, peer).unwrap())
        .collect();
    // Views taken, so that the writer can wait for one now and then.
    let taken = std::sync::atomic::AtomicUsize::new(0);
    let (views, appended) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut appended = Vec::new();
            for i in 0..300u64 {
                if i % 25 == 10 {
                    // Let a view be taken in the middle of the writes.
                    let seen = taken.load(std::sync::atomic::Ordering::Acquire);
                    while taken.load(std::sync::atomic::Ordering::Acquire) == seen {
                        std::thread::yield_now();
                    }
                }
                let (c, peer) = (convs[(i % 8) as usize], i % 8 + 2);
                // Peer's message, then user 1 reads an earlier conversation: message versions
                // and record versions interleave.
                let mut r = msg(c, peer, &format!("m{i}"), "x");
                r.participants = vec![1, peer];
                let a = append(s, r);
                appended.push((c, a.seq, a.version));
                let earlier = convs[((i + 3) % 8) as usize];
                s.set_read(1, earlier, u64::MAX).wait().unwrap();
            }
            appended
        });
        let mut views = Vec::new();
        while !writer.is_finished() {
            let device = (views.len() % 2 == 0).then_some("d");
            views.push(s.sync_view(1, 0, device).unwrap());
            taken.fetch_add(1, std::sync::atomic::Ordering::Release);
        }
        (views, writer.join().unwrap())
    });
    let last = s.sync_view(1, 0, Some("d")).unwrap();
    assert_eq!(last.conversations.len(), 8);
    assert_eq!(s.user_version(1).unwrap(), last.user_version);
    assert_eq!(
        s.conversations_changed_since(1, 0, Some("d")).unwrap(),
        last.conversations
    );
    assert!(
        s.sync_view(1, last.user_version, None)
            .unwrap()
            .conversations
            .is_empty()
    );
    // Views taken while messages were still being written, not all before or after.
    let mid = |v: &&SyncView| v.user_version > 0 && v.user_version < last.user_version;
    assert!(
        views.iter().filter(mid).count() > 1,
        "no view was taken while writing"
    );
    for view in &views {
        // Each conversation's latest seq is that of its newest message with a version up to
        // the view's: every message the version covers is in the view, none after it.
        for &c in &convs {
            let want = appended
                .iter()
                .filter(|&&(conv, _, version)| conv == c && version <= view.user_version)
                .map(|&(_, seq, _)| seq)
                .max();
            let seen = view.conversations.iter().find(|v| v.conversation == c);
            assert_eq!(seen.map(|v| v.latest_seq), want, "{view:?}");
        }
        let newest = view.conversations.iter().map(|c| c.last_version).max();
        assert_eq!(newest.unwrap_or(0), view.user_version);
    }
}

/// A change sets only the fields it names, against what is stored when it is written: two
/// devices changing different settings at once both keep theirs, and a change that leaves
/// `hidden` out does not hide again a conversation that a new message showed.
pub fn a_settings_change_keeps_the_fields_it_leaves_out(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = direct_conversation(1, 2).unwrap();
    let send = |id: &str| {
        let mut r = msg(c, 2, id, "x");
        r.participants = vec![1, 2];
        append(s, r)
    };
    send("m1");
    let change = |change: SettingsChange| s.set_conversation_settings(1, c, change).wait().unwrap();
    let pin = SettingsChange {
        pinned: Some(true),
        ..SettingsChange::default()
    };
    let mute = SettingsChange {
        muted: Some(true),
        ..SettingsChange::default()
    };
    // Both submitted before the first is waited for, as from two devices (the RocksDB store
    // may write them in one batch).
    let (pinned, muted) = (
        s.set_conversation_settings(1, c, pin),
        s.set_conversation_settings(1, c, mute),
    );
    assert!(pinned.wait().unwrap().changed);
    let both = ConversationSettings {
        pinned: true,
        muted: true,
        ..ConversationSettings::default()
    };
    assert_eq!(muted.wait().unwrap().settings, both);
    assert_eq!(s.conversation_settings(1, c).unwrap(), both);

    // Hidden, then shown by a new message: unpinning leaves it shown.
    let hide = SettingsChange {
        hidden: Some(true),
        ..SettingsChange::default()
    };
    assert!(change(hide).settings.hidden);
    send("m2");
    let unpin = SettingsChange {
        pinned: Some(false),
        ..SettingsChange::default()
    };
    let unpinned = ConversationSettings {
        pinned: false,
        ..both
    };
    assert_eq!(
        change(unpin),
        SettingsUpdate {
            settings: unpinned,
            changed: true
        }
    );
    assert_eq!(conv_info(s, 1, c).unwrap().settings, unpinned);

    // Clearing alone keeps the flags; an empty change writes nothing.
    let clear = SettingsChange {
        clear_upto_seq: 1,
        ..SettingsChange::default()
    };
    let cleared = ConversationSettings {
        cleared_seq: 1,
        ..unpinned
    };
    assert_eq!(change(clear).settings, cleared);
    let v = s.user_version(1).unwrap();
    assert_eq!(
        change(SettingsChange::default()),
        SettingsUpdate {
            settings: cleared,
            changed: false
        }
    );
    assert_eq!(s.user_version(1).unwrap(), v);
}

/// A hidden conversation shows again with the next message (in its sync entry and in the
/// settings read back), stays hidden while none comes, and can be hidden again.
pub fn a_hidden_conversation_shows_again_with_a_new_message(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = direct_conversation(1, 2).unwrap();
    let send = |sender: u64, id: &str| {
        let mut r = msg(c, sender, id, "x");
        r.participants = vec![1, 2];
        append(s, r)
    };
    send(2, "m1");
    let hidden = ConversationSettings {
        hidden: true,
        pinned: true,
        ..ConversationSettings::default()
    };
    // User 1's settings of `conv`, set.
    let set = |conv: u64, settings: ConversationSettings| {
        s.set_conversation_settings(1, conv, settings.into())
            .wait()
            .unwrap()
            .settings
    };
    assert_eq!(set(c, hidden), hidden);
    let v = s.user_version(1).unwrap();
    // A read leaves it hidden.
    s.set_read(1, c, 1).wait().unwrap();
    assert_eq!(s.conversation_settings(1, c).unwrap(), hidden);
    assert_eq!(conv_info(s, 1, c).unwrap().settings, hidden);
    // Hiding it again changes nothing.
    let v2 = s.user_version(1).unwrap();
    assert_eq!(set(c, hidden), hidden);
    assert_eq!(s.user_version(1).unwrap(), v2);

    // A new message: shown again, pinned still; sync reports the conversation as changed.
    let m2 = send(2, "m2");
    let shown = ConversationSettings {
        hidden: false,
        ..hidden
    };
    assert_eq!(s.conversation_settings(1, c).unwrap(), shown);
    let changed = s.conversations_changed_since(1, v, None).unwrap();
    assert_eq!((changed.len(), changed[0].settings), (1, shown));
    assert_eq!(changed[0].last_version, m2.version);
    // Hidden again (a real change now: a new version), then the user's own message shows it.
    assert_eq!(set(c, hidden), hidden);
    assert!(s.user_version(1).unwrap() > m2.version);
    assert_eq!(conv_info(s, 1, c).unwrap().settings, hidden);
    send(1, "m3");
    assert_eq!(conv_info(s, 1, c).unwrap().settings, shown);
    // Unhiding a shown conversation is no change.
    let v3 = s.user_version(1).unwrap();
    assert_eq!(set(c, shown), shown);
    assert_eq!(s.user_version(1).unwrap(), v3);

    // Hidden while empty: the first message shows it.
    let empty = direct_conversation(1, 3).unwrap();
    assert_eq!(set(empty, hidden), hidden);
    let mut first = msg(empty, 3, "e1", "x");
    first.participants = vec![1, 3];
    append(s, first);
    assert_eq!(s.conversation_settings(1, empty).unwrap(), shown);

    // A group the user left stays hidden, whatever is said after.
    let g = 7;
    let gc = group_conversation(g).unwrap();
    assert!(s.add_member(g, 1).wait().unwrap());
    append(s, msg(gc, 2, "g1", "x"));
    assert!(s.remove_member(g, 1).wait().unwrap());
    assert_eq!(set(gc, hidden), hidden);
    append(s, msg(gc, 2, "g2", "x"));
    assert_eq!(conv_info(s, 1, gc).unwrap().settings, hidden);
    // Hidden, then removed by an event: the event does not show it again.
    let g = 8;
    let gc = group_conversation(g).unwrap();
    append(
        s,
        group_msg(g, "create-8", Some("g"), &[(2, Some("")), (1, Some(""))]),
    );
    assert_eq!(set(gc, hidden), hidden);
    append(s, group_msg(g, "kick-1", None, &[(1, None)]));
    let i = conv_info(s, 1, gc).unwrap();
    assert_eq!((i.active, i.left_seq, i.settings), (false, 2, hidden));
    append(s, msg(gc, 2, "g8", "x"));
    assert_eq!(conv_info(s, 1, gc).unwrap().settings, hidden);
}

/// An append to group `g`'s conversation carrying a change of it.
pub fn group_msg(
    g: u64,
    id: &str,
    record: Option<&'static str>,
    members: &[(u64, Option<&'static str>)],
) -> AppendRequest {
    let mut r = msg(group_conversation(g).unwrap(), 1, id, "group event");
    r.group_change = Some(Box::new(GroupChange {
        group: g,
        record: record.map(Bytes::from),
        members: members
            .iter()
            .map(|&(u, a)| (u, a.map(Bytes::from)))
            .collect(),
        joiners_read_history: false,
    }));
    r
}

/// `user`'s entry for `conv` in their conversation index.
fn conv_info(s: &dyn MessageStore, user: u64, conv: u64) -> Option<ConversationInfo> {
    s.conversations_changed_since(user, 0, None)
        .unwrap()
        .into_iter()
        .find(|i| i.conversation == conv)
}

fn records(v: &[(u64, &'static str)]) -> Vec<(u64, Bytes)> {
    v.iter()
        .map(|&(u, a)| (u, Bytes::from_static(a.as_bytes())))
        .collect()
}

pub fn group_record_set_without_a_message(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let g = s.intern_group("reviewed").unwrap();
    let conv = group_conversation(g).unwrap();
    append(s, group_msg(g, "create", Some("v1"), &[(1, Some("owner"))]));
    let version = s.user_version(1).unwrap();
    s.set_group_record(g, Bytes::from_static(b"v1+request"))
        .wait()
        .unwrap();
    assert_eq!(
        s.group_record(g).unwrap(),
        Some(Bytes::from_static(b"v1+request"))
    );
    // Nothing else moved: no message, no new version, the same members.
    assert_eq!(s.latest_seq(conv).unwrap(), 1);
    assert_eq!(s.user_version(1).unwrap(), version);
    assert_eq!(
        s.member_records(g, 0, 10).unwrap(),
        records(&[(1, "owner")])
    );
    // A later change replaces it, and a later record replaces that.
    append(s, group_msg(g, "joined", Some("v2"), &[(2, Some(""))]));
    assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v2")));
    let set = s.set_group_record(g, Bytes::from_static(b"v2-declined"));
    let chat = s.append(msg(conv, 1, "chat", "after"));
    set.wait().unwrap();
    assert_eq!(chat.wait().unwrap().seq, 3);
    assert_eq!(
        s.group_record(g).unwrap(),
        Some(Bytes::from_static(b"v2-declined"))
    );
    // A group that had no record gets one.
    let other = s.intern_group("fresh").unwrap();
    s.set_group_record(other, Bytes::from_static(b"r"))
        .wait()
        .unwrap();
    assert_eq!(
        s.group_record(other).unwrap(),
        Some(Bytes::from_static(b"r"))
    );
}

pub fn group_change_commits_with_its_append(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let g = s.intern_group("team").unwrap();
    let conv = group_conversation(g).unwrap();
    assert_eq!(s.group_record(g).unwrap(), None);
    assert_eq!(s.membership(1, g).unwrap(), None);

    // Created with two members.
    let created = append(
        s,
        group_msg(
            g,
            "create",
            Some("v1"),
            &[(1, Some("owner")), (2, Some(""))],
        ),
    );
    assert_eq!(created.seq, 1);
    assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v1")));
    assert_eq!(
        s.member_records(g, 0, 10).unwrap(),
        records(&[(1, "owner"), (2, "")])
    );
    assert_eq!(s.member_records(g, 1, 10).unwrap(), records(&[(2, "")]));
    assert_eq!(s.member_records(g, 0, 1).unwrap(), records(&[(1, "owner")]));
    assert!(s.member_records(g, 2, 10).unwrap().is_empty());
    assert!(s.member_records(g, u64::MAX, 10).unwrap().is_empty());
    assert_eq!(s.members(g, 0, 10).unwrap(), vec![1, 2]);
    assert_eq!(s.groups_of(1).unwrap(), vec![g]);
    assert_eq!(s.groups_of(2).unwrap(), vec![g]);
    assert_eq!(s.membership(1, g).unwrap(), Some(0));
    assert_eq!(s.membership(2, g).unwrap(), Some(0));
    assert_eq!(s.membership(3, g).unwrap(), None);
    assert_eq!(s.membership(1, 0).unwrap(), None);
    assert_eq!(s.joined_seq(3, g).unwrap(), 0);
    assert_eq!(s.joined_seq(1, 0).unwrap(), 0);
    for u in [1, 2] {
        let i = conv_info(s, u, conv).unwrap();
        assert!(i.active);
        assert_eq!(i.peer, Peer::Group(g));
        assert_eq!((i.latest_seq, i.left_seq, i.joined_seq), (1, 0, 1));
        assert_eq!(s.joined_seq(u, g).unwrap(), 1);
        assert_eq!(s.read_and_joined_seq(u, conv).unwrap(), (1, 1));
        assert_eq!(i.last_version, created.version);
        assert_eq!(s.user_version(u).unwrap(), created.version);
    }
    let m = &s.read_forward(conv, 1, 10).unwrap()[0];
    assert_eq!(
        (m.seq, m.version, &m.payload[..]),
        (1, created.version, &b"group event"[..])
    );

    // A message without a change changes no group state.
    append(s, msg(conv, 1, "chat", "hello"));
    assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v1")));

    // Removing a member: the record stays (None leaves it), left_seq = the removal's seq.
    let removed = append(s, group_msg(g, "kick", None, &[(2, None)]));
    assert_eq!(removed.seq, 3);
    assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v1")));
    assert_eq!(s.members(g, 0, 10).unwrap(), vec![1]);
    assert_eq!(
        s.member_records(g, 0, 10).unwrap(),
        records(&[(1, "owner")])
    );
    assert!(s.groups_of(2).unwrap().is_empty());
    assert_eq!(s.membership(2, g).unwrap(), Some(3));
    assert_eq!(s.membership(1, g).unwrap(), Some(0));
    let i = conv_info(s, 2, conv).unwrap();
    assert!(!i.active);
    assert_eq!((i.left_seq, i.latest_seq, i.joined_seq), (3, 3, 1));
    assert_eq!(i.last_version, removed.version);
    assert_eq!(
        s.conversations_changed_since(2, created.version, None)
            .unwrap()
            .len(),
        1,
        "the removal is a change since the creation"
    );

    // Re-adding resets left_seq, makes the conversation active again and moves joined_seq to
    // the event that added them back.
    let back = append(s, group_msg(g, "back", Some("v2"), &[(2, Some("guest"))]));
    assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v2")));
    assert_eq!(s.membership(2, g).unwrap(), Some(0));
    let i = conv_info(s, 2, conv).unwrap();
    assert!(i.active);
    assert_eq!(
        (i.left_seq, i.last_version, i.joined_seq),
        (0, back.version, back.seq)
    );
    assert_eq!(s.joined_seq(2, g).unwrap(), back.seq);
    assert_eq!(
        s.read_and_joined_seq(2, conv).unwrap(),
        (back.seq, back.seq)
    );
    assert_eq!(s.read_and_joined_seq(3, conv).unwrap(), (0, 0));
    assert_eq!(s.joined_seq(1, g).unwrap(), 1);
    assert_eq!(s.groups_of(2).unwrap(), vec![g]);

    // An attribute update of a member is not a join: membership and index unchanged.
    append(s, group_msg(g, "promote", None, &[(2, Some("admin"))]));
    assert_eq!(s.joined_seq(2, g).unwrap(), back.seq);
    assert_eq!(
        s.member_records(g, 0, 10).unwrap(),
        records(&[(1, "owner"), (2, "admin")])
    );
    assert_eq!(s.membership(2, g).unwrap(), Some(0));
    assert!(conv_info(s, 2, conv).unwrap().active);
    assert_eq!(s.groups_of(2).unwrap(), vec![g]);

    // A change that lets its joiners read the history: joined_seq 0.
    let mut r = group_msg(g, "moderator", None, &[(5, Some("m"))]);
    if let Some(change) = r.group_change.as_mut() {
        change.joiners_read_history = true;
    }
    s.append(r).wait().unwrap();
    assert_eq!(s.membership(5, g).unwrap(), Some(0));
    assert_eq!(
        (
            s.joined_seq(5, g).unwrap(),
            conv_info(s, 5, conv).unwrap().joined_seq
        ),
        (0, 0)
    );

    // Entries apply in order; removing a non-member is a no-op.
    let r = append(
        s,
        group_msg(
            g,
            "churn",
            None,
            &[
                (7, Some("a")),
                (7, None),
                (8, None),
                (9, Some("x")),
                (9, Some("y")),
            ],
        ),
    );
    assert_eq!(s.membership(7, g).unwrap(), Some(r.seq));
    assert!(!conv_info(s, 7, conv).unwrap().active);
    assert_eq!(s.membership(8, g).unwrap(), None);
    assert!(conv_info(s, 8, conv).is_none());
    assert_eq!(s.membership(9, g).unwrap(), Some(0));
    assert_eq!(
        s.member_records(g, 0, 10).unwrap(),
        records(&[(1, "owner"), (2, "admin"), (5, "m"), (9, "y")])
    );
    assert_eq!(s.members(g, 0, 10).unwrap(), vec![1, 2, 5, 9]);
    assert_eq!(s.latest_seq(conv).unwrap(), r.seq);
}

pub fn group_change_of_a_duplicate_is_not_applied(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let g = s.intern_group("team").unwrap();
    let conv = group_conversation(g).unwrap();
    let first = append(s, group_msg(g, "add-5", Some("v1"), &[(5, Some("a"))]));
    append(s, group_msg(g, "remove-5", None, &[(5, None)]));
    // The retry carries a different change: nothing of it is applied.
    let retry = append(s, group_msg(g, "add-5", Some("v2"), &[(5, Some("b"))]));
    assert!(retry.duplicate);
    assert_eq!(retry.seq, first.seq);
    assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v1")));
    assert!(s.members(g, 0, 10).unwrap().is_empty());
    assert_eq!(s.membership(5, g).unwrap(), Some(2));
    assert_eq!(s.latest_seq(conv).unwrap(), 2);

    // Both copies in flight at once: one write, one change.
    let p1 = s.append(group_msg(g, "add-6", Some("v3"), &[(6, Some("x"))]));
    let p2 = s.append(group_msg(
        g,
        "add-6",
        Some("v4"),
        &[(6, None), (7, Some("y"))],
    ));
    let (r1, r2) = (p1.wait().unwrap(), p2.wait().unwrap());
    assert_eq!((r1.seq, r1.duplicate), (3, false));
    assert_eq!((r2.seq, r2.duplicate), (3, true));
    assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v3")));
    assert_eq!(s.member_records(g, 0, 10).unwrap(), records(&[(6, "x")]));
    assert_eq!(s.membership(7, g).unwrap(), None);
}

pub fn invalid_group_change_writes_nothing(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let g = s.intern_group("team").unwrap();
    let g2 = s.intern_group("other").unwrap();
    let conv = group_conversation(g).unwrap();
    let inval = |r: AppendRequest, why: &str| {
        let e = s.append(r).wait().unwrap_err();
        assert!(
            matches!(e, StorageError::InvalidArgument(m) if m.contains(why)),
            "{why}: {e:?}"
        );
    };
    let mut other = group_msg(g2, "a", Some("v"), &[(1, Some(""))]);
    other.conversation = conv;
    inval(other, "another conversation");
    let mut direct = group_msg(g, "b", Some("v"), &[(1, Some(""))]);
    direct.conversation = direct_conversation(1, 2).unwrap();
    inval(direct, "another conversation");
    let mut no_group = group_msg(g, "c", Some("v"), &[]);
    no_group.group_change.as_mut().unwrap().group = 0;
    inval(no_group, "group id");
    inval(
        group_msg(g, "d", Some("v"), &[(1, Some("")), (0, None)]),
        "user id",
    );
    inval(
        group_msg(g, "e", Some("v"), &[(MAX_USER_ID + 1, Some(""))]),
        "user id",
    );
    for c in [conv, group_conversation(g2).unwrap()] {
        assert_eq!(s.latest_seq(c).unwrap(), 0, "no message");
    }
    assert_eq!(s.latest_seq(direct_conversation(1, 2).unwrap()).unwrap(), 0);
    for group in [g, g2] {
        assert_eq!(s.group_record(group).unwrap(), None);
        assert!(s.member_records(group, 0, 10).unwrap().is_empty());
        assert_eq!(s.membership(1, group).unwrap(), None);
    }
    assert!(
        s.conversations_changed_since(1, 0, None)
            .unwrap()
            .is_empty()
    );
    // Nothing was remembered for idempotency either.
    let r = append(s, group_msg(g, "a", Some("v"), &[(1, Some(""))]));
    assert_eq!((r.seq, r.duplicate), (1, false));
    assert_eq!(s.membership(1, g).unwrap(), Some(0));
}

pub fn member_calls_and_group_changes_agree(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let g = s.intern_group("team").unwrap();
    let conv = group_conversation(g).unwrap();
    fill(s, conv, 3);
    // add_member stores empty attributes; remove_member leaves at the latest seq.
    assert!(s.add_member(g, 4).wait().unwrap());
    assert_eq!(s.member_records(g, 0, 10).unwrap(), records(&[(4, "")]));
    assert_eq!(s.membership(4, g).unwrap(), Some(0));
    assert!(s.remove_member(g, 4).wait().unwrap());
    assert_eq!(s.membership(4, g).unwrap(), Some(3));
    let i = conv_info(s, 4, conv).unwrap();
    assert!(!i.active);
    assert_eq!(i.left_seq, 3);
    assert!(s.add_member(g, 4).wait().unwrap());
    assert_eq!(s.membership(4, g).unwrap(), Some(0));
    assert!(conv_info(s, 4, conv).unwrap().active);

    // A member added by add_member is a member for a group change, and the other way round.
    append(
        s,
        group_msg(g, "attrs", None, &[(4, Some("admin")), (5, Some("new"))]),
    );
    assert_eq!(
        s.member_records(g, 0, 10).unwrap(),
        records(&[(4, "admin"), (5, "new")])
    );
    assert!(!s.add_member(g, 5).wait().unwrap(), "already a member");
    assert!(s.remove_member(g, 5).wait().unwrap());
    let r = append(s, group_msg(g, "re-remove", None, &[(5, None)]));
    assert_eq!(
        s.membership(5, g).unwrap(),
        Some(r.seq - 1),
        "removing a non-member changes nothing"
    );
    // Queued back to back (so usually built into one batch).
    let a = s.add_member(g, 6);
    let b = s.append(group_msg(g, "kick-6", None, &[(6, None)]));
    let c = s.add_member(g, 6);
    assert!(a.wait().unwrap());
    let kicked = b.wait().unwrap();
    assert!(c.wait().unwrap(), "a join after the removal");
    assert_eq!(s.membership(6, g).unwrap(), Some(0));
    assert_eq!(s.groups_of(6).unwrap(), vec![g]);
    assert!(conv_info(s, 6, conv).unwrap().last_version > kicked.version);
    // Direct conversations have left_seq 0.
    let d = direct_conversation(4, 5).unwrap();
    let mut m = msg(d, 4, "dm", "hi");
    m.participants = vec![4, 5];
    append(s, m);
    assert_eq!(conv_info(s, 4, d).unwrap().left_seq, 0);
}

pub fn close_rejects_later_calls(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = group_conversation(1).unwrap();
    append(s, msg(c, 1, "a", ""));
    s.intern_user("y").unwrap();
    assert_eq!(s.sync_interned(), Ok(()));
    s.close().unwrap();
    s.close().unwrap();
    assert_eq!(
        s.append(msg(c, 1, "b", "")).wait(),
        Err(StorageError::Closed)
    );
    assert_eq!(s.latest_seq(c), Err(StorageError::Closed));
    assert_eq!(s.read_forward(c, 1, 1), Err(StorageError::Closed));
    assert_eq!(s.set_read(1, c, 1).wait(), Err(StorageError::Closed));
    assert_eq!(s.intern_user("x"), Err(StorageError::Closed));
    assert_eq!(s.sync_interned(), Err(StorageError::Closed));
    assert_eq!(
        s.set_meta(vec![put(b"k", b"v")]).wait(),
        Err(StorageError::Closed)
    );
    assert_eq!(s.meta(b"k"), Err(StorageError::Closed));
    assert_eq!(s.scan_meta(b"", b"", 1), Err(StorageError::Closed));
}

pub fn conversation_settings(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let c = direct_conversation(1, 2).unwrap();
    let mut m = msg(c, 1, "", "x");
    m.participants = vec![1, 2];
    append(s, m);
    fill_more(s, c, 3);
    let read = s.read_seq(1, c).unwrap();
    assert_eq!(
        s.conversation_settings(1, c).unwrap(),
        ConversationSettings::default()
    );
    let v0 = s.user_version(1).unwrap();
    let want = ConversationSettings {
        pinned: true,
        hidden: false,
        muted: true,
        cleared_seq: 2,
    };
    // User 1's settings of `conv`, all set to `to`.
    let set = |conv: u64, to: ConversationSettings| {
        s.set_conversation_settings(1, conv, to.into())
            .wait()
            .unwrap()
    };
    let update =
        |settings: ConversationSettings, changed: bool| SettingsUpdate { settings, changed };
    assert_eq!(set(c, want), update(want, true));
    assert_eq!(s.conversation_settings(1, c).unwrap(), want);
    // The other user is untouched.
    assert_eq!(
        s.conversation_settings(2, c).unwrap(),
        ConversationSettings::default()
    );
    // The change shows in sync, with the settings.
    let v1 = s.user_version(1).unwrap();
    assert!(v1 > v0);
    let changed = s.conversations_changed_since(1, v0, None).unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].settings, want);
    // Unchanged: no write, no new version.
    assert_eq!(set(c, want), update(want, false));
    assert_eq!(s.user_version(1).unwrap(), v1);
    // cleared_seq never moves backwards and is clamped to the latest seq (4).
    let back = ConversationSettings {
        cleared_seq: 1,
        ..want
    };
    assert_eq!(set(c, back), update(want, false));
    let far = ConversationSettings {
        cleared_seq: 99,
        pinned: false,
        ..want
    };
    let got = set(c, far);
    assert!(got.changed);
    let got = got.settings;
    assert_eq!((got.cleared_seq, got.pinned), (4, false));
    let v2 = s.user_version(1).unwrap();
    assert!(v2 > v1);
    let changed = s.conversations_changed_since(1, v1, None).unwrap();
    assert_eq!(changed.len(), 1);
    assert_eq!((changed[0].last_version, changed[0].settings), (v2, got));
    assert_eq!(s.conversation_settings(1, c).unwrap(), got);
    // Only a lower cleared seq: nothing changes.
    let lower = ConversationSettings {
        cleared_seq: 3,
        ..got
    };
    assert_eq!(set(c, lower), update(got, false));
    assert_eq!(s.user_version(1).unwrap(), v2);
    assert!(
        s.conversations_changed_since(1, v2, None)
            .unwrap()
            .is_empty()
    );
    // Settings leave the read position and membership alone.
    assert_eq!(s.read_seq(1, c).unwrap(), read);
    assert!(conv_info(s, 1, c).unwrap().active);
    // A conversation never seen gets a record.
    let other = direct_conversation(1, 3).unwrap();
    let hidden = ConversationSettings {
        hidden: true,
        ..ConversationSettings::default()
    };
    assert_eq!(set(other, hidden), update(hidden, true));
    let info = conv_info(s, 1, other).unwrap();
    assert_eq!(
        (info.settings, info.active, info.latest_seq),
        (hidden, true, 0)
    );
    // Nothing to clear in an empty conversation.
    let clear = ConversationSettings {
        cleared_seq: 5,
        ..hidden
    };
    assert_eq!(set(other, clear), update(hidden, false));
    // A group the user left keeps its membership state.
    let g = 6;
    let gc = group_conversation(g).unwrap();
    assert!(s.add_member(g, 1).wait().unwrap());
    append(s, msg(gc, 2, "g1", "x"));
    assert!(s.remove_member(g, 1).wait().unwrap());
    let muted = ConversationSettings {
        muted: true,
        ..ConversationSettings::default()
    };
    assert_eq!(set(gc, muted), update(muted, true));
    let info = conv_info(s, 1, gc).unwrap();
    assert_eq!(
        (info.active, info.left_seq, info.settings),
        (false, 1, muted)
    );
    assert_eq!(s.membership(1, g).unwrap(), Some(1));
    for bad in [0, MAX_USER_ID + 1] {
        assert!(matches!(
            s.set_conversation_settings(bad, c, want.into()).wait(),
            Err(StorageError::InvalidArgument(_))
        ));
    }
}

fn fill_more(s: &dyn MessageStore, conv: u64, n: u64) {
    for i in 0..n {
        append(s, msg(conv, 2, &format!("more-{conv}-{i}"), "y"));
    }
}

pub fn recall_empties_a_message_with_its_event(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let c = direct_conversation(1, 2).unwrap();
    append(s, msg(c, 1, "m1", "secret"));
    append(s, msg(c, 2, "m2", "reply"));
    let mut original = s.read_forward(c, 1, 1).unwrap().remove(0);
    assert!(!original.recalled);
    // A duplicate carrying a recall applies nothing.
    let mut dup = msg(c, 2, "m2", "reply");
    dup.recall = Some(1);
    let d = append(s, dup);
    assert_eq!((d.seq, d.duplicate), (2, true));
    assert_eq!(s.read_forward(c, 1, 1).unwrap()[0], original);
    let mut tomb = msg(c, 1, "recall-1", "");
    tomb.recall = Some(1);
    let a = append(s, tomb.clone());
    assert_eq!((a.seq, a.duplicate), (3, false));
    let page = s.read_forward(c, 1, 10).unwrap();
    assert_eq!(seqs(&page), vec![1, 2, 3]);
    assert!(page[0].recalled);
    assert!(page[0].payload.is_empty());
    // Everything else about it stays.
    original.recalled = true;
    original.payload = Bytes::new();
    assert_eq!(page[0], original);
    assert!(!page[1].recalled);
    assert_eq!(&page[1].payload[..], b"reply");
    let back = s.read_backward(c, 0, 10).unwrap();
    assert!(back[2].recalled && back[2].seq == 1);
    // A retry of the tombstone is a duplicate and appends nothing.
    let again = append(s, tomb);
    assert_eq!((again.seq, again.duplicate), (3, true));
    assert_eq!(s.latest_seq(c).unwrap(), 3);
    // Recalling it once more changes nothing but appends the event.
    let mut twice = msg(c, 1, "recall-1b", "");
    twice.recall = Some(1);
    assert_eq!(append(s, twice).seq, 4);
    assert!(s.read_forward(c, 1, 1).unwrap()[0].recalled);
    // No such message (0, the seq this append would get, beyond): nothing written, and the
    // idempotency key stays free.
    let v = s.user_version(1).unwrap();
    for bad in [0, 5, 9] {
        let mut r = msg(c, 1, "bad", "");
        r.participants = vec![1, 2, 3];
        r.recall = Some(bad);
        assert!(matches!(
            s.append(r).wait(),
            Err(StorageError::InvalidArgument(_))
        ));
    }
    assert_eq!(s.latest_seq(c).unwrap(), 4);
    assert_eq!(s.user_version(1).unwrap(), v);
    assert!(
        s.conversations_changed_since(3, 0, None)
            .unwrap()
            .is_empty()
    );
    let mut ok = msg(c, 1, "bad", "");
    ok.recall = Some(2);
    let r = append(s, ok);
    assert_eq!((r.seq, r.duplicate), (5, false));
    let page = s.read_forward(c, 1, 10).unwrap();
    assert_eq!(
        page.iter().map(|m| m.recalled).collect::<Vec<_>>(),
        vec![true, true, false, false, false]
    );
    // Another conversation's seq 1 is not touched.
    let other = direct_conversation(1, 3).unwrap();
    append(s, msg(other, 1, "o1", "keep"));
    assert_eq!(
        &s.read_forward(other, 1, 1).unwrap()[0].payload[..],
        b"keep"
    );
}

/// A recall right behind the message it recalls, submitted before that was acknowledged
/// (possibly in the same batch): the recall sees it.
pub fn recall_of_a_message_in_flight(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let c = direct_conversation(1, 2).unwrap();
    for round in 0..20 {
        let seq = s.latest_seq(c).unwrap() + 1;
        let sent = s.append(msg(c, 1, &format!("m{round}"), "oops"));
        let mut tomb = msg(c, 1, &format!("r{round}"), "");
        tomb.recall = Some(seq);
        let recalled = s.append(tomb);
        // And a second recall of it, queued right behind.
        let mut again = msg(c, 1, &format!("rr{round}"), "");
        again.recall = Some(seq);
        let again = s.append(again);
        assert_eq!(sent.wait().unwrap().seq, seq);
        assert_eq!(recalled.wait().unwrap().seq, seq + 1);
        assert_eq!(again.wait().unwrap().seq, seq + 2);
        let m = &s.read_forward(c, seq, 1).unwrap()[0];
        assert!(m.recalled && m.payload.is_empty(), "round {round}");
        assert_eq!(m.client_msg_id, format!("m{round}"));
    }
    assert_eq!(s.latest_seq(c).unwrap(), 60);
}

pub fn relations_and_profiles(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let change = |user, kind, other, value: Option<&'static str>| RelationChange {
        user,
        kind,
        other,
        value: value.map(|v: &'static str| Bytes::from_static(v.as_bytes())),
    };
    s.set_relations(vec![
        change(1, RelationKind::Friend, 2, Some("")),
        change(2, RelationKind::Friend, 1, Some("")),
        change(1, RelationKind::Friend, 5, Some("")),
        change(1, RelationKind::Friend, 3, Some("")),
        change(1, RelationKind::Blocked, 4, Some("")),
        change(4, RelationKind::FriendRequestReceived, 1, Some("hi")),
    ])
    .wait()
    .unwrap();
    assert_eq!(
        s.relation(1, RelationKind::Friend, 2).unwrap(),
        Some(Bytes::new())
    );
    assert_eq!(s.relation(1, RelationKind::Friend, 4).unwrap(), None);
    assert_eq!(
        s.relation(1, RelationKind::Blocked, 4).unwrap(),
        Some(Bytes::new())
    );
    assert_eq!(
        s.relation(4, RelationKind::FriendRequestReceived, 1)
            .unwrap(),
        Some(Bytes::from_static(b"hi"))
    );
    let firsts = s.relations(1, RelationKind::Friend, 0, 2).unwrap();
    assert_eq!(
        firsts.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
        vec![2, 3]
    );
    let rest = s.relations(1, RelationKind::Friend, 3, 10).unwrap();
    assert_eq!(rest.iter().map(|(u, _)| *u).collect::<Vec<_>>(), vec![5]);
    assert_eq!(s.count_relations(1, RelationKind::Friend).unwrap(), 3);
    assert_eq!(s.count_relations(1, RelationKind::Blocked).unwrap(), 1);
    assert_eq!(s.count_relations(2, RelationKind::Blocked).unwrap(), 0);
    // Deletes, in one batch with a set.
    s.set_relations(vec![
        change(1, RelationKind::Friend, 3, None),
        change(1, RelationKind::FriendRequestSent, 9, Some("x")),
    ])
    .wait()
    .unwrap();
    assert_eq!(s.count_relations(1, RelationKind::Friend).unwrap(), 2);
    assert_eq!(
        s.relations(1, RelationKind::FriendRequestSent, 0, 10)
            .unwrap(),
        vec![(9, Bytes::from_static(b"x"))]
    );
    // A bad batch writes nothing.
    assert!(
        s.set_relations(vec![
            change(1, RelationKind::Friend, 7, Some("")),
            change(0, RelationKind::Friend, 1, Some("")),
        ])
        .wait()
        .is_err()
    );
    assert_eq!(s.relation(1, RelationKind::Friend, 7).unwrap(), None);
    for bad in [
        change(MAX_USER_ID + 1, RelationKind::Friend, 1, Some("")),
        change(1, RelationKind::Friend, MAX_USER_ID + 1, Some("")),
        change(1, RelationKind::Friend, 0, None),
    ] {
        assert!(matches!(
            s.set_relations(vec![change(1, RelationKind::Friend, 7, Some("")), bad])
                .wait(),
            Err(StorageError::InvalidArgument(_))
        ));
    }
    let too_many: Vec<_> = (1..=MAX_RELATION_CHANGES as u64 + 1)
        .map(|u| change(8, RelationKind::Blocked, u, Some("")))
        .collect();
    assert!(matches!(
        s.set_relations(too_many).wait(),
        Err(StorageError::InvalidArgument(_))
    ));
    assert_eq!(s.count_relations(8, RelationKind::Blocked).unwrap(), 0);
    assert_eq!(s.relation(1, RelationKind::Friend, 7).unwrap(), None);
    // The most allowed: all or nothing, in order (the last change of a key wins).
    let mut most: Vec<_> = (1..=MAX_RELATION_CHANGES as u64 - 2)
        .map(|u| change(8, RelationKind::Blocked, u, Some("")))
        .collect();
    most.push(change(8, RelationKind::Blocked, 1, None));
    most.push(change(8, RelationKind::Blocked, 2, Some("last")));
    s.set_relations(most).wait().unwrap();
    assert_eq!(
        s.count_relations(8, RelationKind::Blocked).unwrap(),
        MAX_RELATION_CHANGES as u64 - 3
    );
    assert_eq!(s.relation(8, RelationKind::Blocked, 1).unwrap(), None);
    assert_eq!(
        s.relation(8, RelationKind::Blocked, 2).unwrap(),
        Some(Bytes::from_static(b"last"))
    );
    // Kinds and users are separate lists; paging edges.
    assert_eq!(s.count_relations(8, RelationKind::Friend).unwrap(), 0);
    assert_eq!(s.count_relations(9, RelationKind::Blocked).unwrap(), 0);
    assert!(
        s.relations(8, RelationKind::Blocked, 0, 0)
            .unwrap()
            .is_empty()
    );
    assert!(
        s.relations(8, RelationKind::Blocked, u64::MAX, 10)
            .unwrap()
            .is_empty()
    );
    let tail = s
        .relations(
            8,
            RelationKind::Blocked,
            MAX_RELATION_CHANGES as u64 - 4,
            10,
        )
        .unwrap();
    assert_eq!(
        tail.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
        vec![
            MAX_RELATION_CHANGES as u64 - 3,
            MAX_RELATION_CHANGES as u64 - 2
        ]
    );
    // Relations and profiles are not part of sync: no conversation, no version.
    assert_eq!(s.user_version(1).unwrap(), 0);
    assert!(s.set_relations(Vec::new()).wait().is_ok());

    assert_eq!(s.user_profile(1).unwrap(), None);
    s.set_user_profile(1, Bytes::from_static(b"p1"))
        .wait()
        .unwrap();
    s.set_user_profile(1, Bytes::from_static(b"p2"))
        .wait()
        .unwrap();
    assert_eq!(s.user_profile(1).unwrap(), Some(Bytes::from_static(b"p2")));
    assert_eq!(s.user_profile(2).unwrap(), None);
    s.set_user_profile(2, Bytes::new()).wait().unwrap();
    assert_eq!(s.user_profile(2).unwrap(), Some(Bytes::new()));
    for bad in [0, MAX_USER_ID + 1] {
        assert!(matches!(
            s.set_user_profile(bad, Bytes::new()).wait(),
            Err(StorageError::InvalidArgument(_))
        ));
    }
    assert_eq!(s.user_version(1).unwrap(), 0);
}

fn put(key: &[u8], value: &[u8]) -> MetaChange {
    MetaChange {
        key: Bytes::copy_from_slice(key),
        value: Some(Bytes::copy_from_slice(value)),
    }
}

fn del(key: &[u8]) -> MetaChange {
    MetaChange {
        key: Bytes::copy_from_slice(key),
        value: None,
    }
}

/// The keys of a scan's result.
fn keys_of(entries: &[(Bytes, Bytes)]) -> Vec<&[u8]> {
    entries.iter().map(|(k, _)| &k[..]).collect()
}

pub fn account_meta(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let get = |k: &[u8]| s.meta(k).unwrap();
    assert_eq!(get(b"ban/1"), None);
    assert!(s.scan_meta(b"", b"", 10).unwrap().is_empty());

    // Put, overwrite, empty value, delete.
    s.set_meta(vec![put(b"ban/1", b"spam")]).wait().unwrap();
    assert_eq!(get(b"ban/1"), Some(Bytes::from_static(b"spam")));
    assert_eq!(get(b"ban/"), None);
    assert_eq!(get(b"ban/10"), None);
    s.set_meta(vec![put(b"ban/1", b"abuse")]).wait().unwrap();
    assert_eq!(get(b"ban/1"), Some(Bytes::from_static(b"abuse")));
    s.set_meta(vec![put(b"alias/bob", b"")]).wait().unwrap();
    assert_eq!(get(b"alias/bob"), Some(Bytes::new()), "empty is not absent");
    s.set_meta(vec![del(b"ban/1")]).wait().unwrap();
    assert_eq!(get(b"ban/1"), None);
    s.set_meta(vec![del(b"never/set")]).wait().unwrap();
    assert_eq!(get(b"never/set"), None);
    assert!(s.set_meta(Vec::new()).wait().is_ok());

    // One call: all changes in order, the last change of a key wins.
    s.set_meta(vec![
        put(b"push/1/phone", b"t1"),
        put(b"push/1/tablet", b"t2"),
        put(b"tag/1", b"old"),
        del(b"alias/bob"),
        put(b"tag/1", b"new"),
        put(b"gone", b"x"),
        del(b"gone"),
        del(b"back"),
        put(b"back", b"y"),
    ])
    .wait()
    .unwrap();
    assert_eq!(
        s.scan_meta(b"", b"", 100).unwrap(),
        vec![
            (Bytes::from_static(b"back"), Bytes::from_static(b"y")),
            (
                Bytes::from_static(b"push/1/phone"),
                Bytes::from_static(b"t1")
            ),
            (
                Bytes::from_static(b"push/1/tablet"),
                Bytes::from_static(b"t2")
            ),
            (Bytes::from_static(b"tag/1"), Bytes::from_static(b"new")),
        ]
    );

    // A call with one invalid change writes none of its changes.
    let e = s
        .set_meta(vec![
            put(b"tag/1", b"changed"),
            del(b"back"),
            put(b"tag/2", b"added"),
            put(b"", b"bad"),
        ])
        .wait();
    assert!(matches!(e, Err(StorageError::InvalidArgument(_))), "{e:?}");
    assert_eq!(get(b"tag/1"), Some(Bytes::from_static(b"new")));
    assert_eq!(get(b"back"), Some(Bytes::from_static(b"y")));
    assert_eq!(get(b"tag/2"), None);

    // The store's own counters live elsewhere: keys named like them are plain account state.
    s.set_meta(vec![
        put(b"version", b"not a number"),
        put(b"format_version", b"\xff"),
        put(b"next_user_id", b""),
    ])
    .wait()
    .unwrap();
    let u = s.intern_user("meta-user").unwrap();
    assert_eq!(s.intern_user("meta-user-2").unwrap(), u + 1);
    let c = direct_conversation(u, u + 1).unwrap();
    let a = append(s, msg(c, u, "m1", "hi"));
    assert_eq!((a.seq, a.version), (1, 1));
    assert_eq!(get(b"version"), Some(Bytes::from_static(b"not a number")));

    // Account state is not part of sync: it takes no version.
    s.set_meta(vec![put(b"tag/3", b"")]).wait().unwrap();
    assert_eq!(append(s, msg(c, u, "m2", "hi")).version, 2);
}

pub fn account_meta_scans(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let all: [&[u8]; 16] = [
        b"\x00",
        b"tag/",
        b"tag/`",
        b"tag/a",
        b"tag/a/1",
        b"tag/a/15",
        b"tag/a/2",
        b"tag/a\xfe",
        b"tag/a\xff",
        b"tag/a\xff\x00",
        b"tag/a\xff\xff",
        b"tag/a\xff\xff\xff",
        b"tag/b",
        b"\xfe\xff",
        b"\xff",
        b"\xff\xff\x01",
    ];
    // Written in an order other than the key order, in two calls.
    let mut changes: Vec<_> = all
        .iter()
        .rev()
        .map(|k| put(k, &k[k.len() - 1..]))
        .collect();
    let rest = changes.split_off(7);
    s.set_meta(rest).wait().unwrap();
    s.set_meta(changes).wait().unwrap();
    let scan = |prefix: &[u8], after: &[u8], limit| s.scan_meta(prefix, after, limit).unwrap();

    let everything = scan(b"", b"", 100);
    assert_eq!(keys_of(&everything), all.to_vec(), "bytewise key order");
    assert!(everything.iter().all(|(k, v)| v[..] == k[k.len() - 1..]));
    assert_eq!(
        keys_of(&scan(b"tag/a", b"", 100)),
        vec![
            &b"tag/a"[..],
            b"tag/a/1",
            b"tag/a/15",
            b"tag/a/2",
            b"tag/a\xfe",
            b"tag/a\xff",
            b"tag/a\xff\x00",
            b"tag/a\xff\xff",
            b"tag/a\xff\xff\xff",
        ]
    );
    // Prefixes ending in 0xFF: the next key outside them is "tag/b".
    assert_eq!(
        keys_of(&scan(b"tag/a\xff", b"", 100)),
        vec![
            &b"tag/a\xff"[..],
            b"tag/a\xff\x00",
            b"tag/a\xff\xff",
            b"tag/a\xff\xff\xff",
        ]
    );
    assert_eq!(
        keys_of(&scan(b"tag/a\xff\xff", b"", 100)),
        vec![&b"tag/a\xff\xff"[..], b"tag/a\xff\xff\xff"]
    );
    // All 0xFF: no key after the prefix is outside it; "\xfe\xff" is before it.
    assert_eq!(
        keys_of(&scan(b"\xff", b"", 100)),
        vec![&b"\xff"[..], b"\xff\xff\x01"]
    );
    assert_eq!(
        keys_of(&scan(b"\xff\xff", b"", 100)),
        vec![&b"\xff\xff\x01"[..]]
    );
    assert_eq!(keys_of(&scan(b"tag/b", b"", 100)), vec![&b"tag/b"[..]]);
    assert!(scan(b"tag/c", b"", 100).is_empty());
    assert!(scan(b"tag/a/3", b"", 100).is_empty());
    assert!(scan(b"\x01", b"", 100).is_empty());

    // `after`: strictly greater; before the prefix = from its start; past it = nothing.
    assert_eq!(
        keys_of(&scan(b"tag/a/", b"tag/a/1", 100)),
        vec![&b"tag/a/15"[..], b"tag/a/2"]
    );
    assert_eq!(
        keys_of(&scan(b"tag/a/", b"tag/a/10", 100)),
        vec![&b"tag/a/15"[..], b"tag/a/2"],
        "after need not be a key"
    );
    assert_eq!(
        keys_of(&scan(b"tag/a/", b"tag/a/", 100)),
        vec![&b"tag/a/1"[..], b"tag/a/15", b"tag/a/2"]
    );
    assert_eq!(
        keys_of(&scan(b"tag/a", b"tag/a", 2)),
        vec![&b"tag/a/1"[..], b"tag/a/15"],
        "the prefix itself is excluded when it is `after`"
    );
    assert_eq!(keys_of(&scan(b"tag/a/", b"tag/", 1)), vec![&b"tag/a/1"[..]]);
    assert_eq!(keys_of(&scan(b"tag/a/", b"\x00", 1)), vec![&b"tag/a/1"[..]]);
    assert!(scan(b"tag/a/", b"tag/a/2", 100).is_empty());
    assert!(scan(b"tag/a/", b"tag/a0", 100).is_empty());
    assert!(scan(b"tag/a", b"tag/a\xff\xff\xff", 100).is_empty());
    assert!(scan(b"tag/a", b"\xff", 100).is_empty());
    assert_eq!(
        keys_of(&scan(b"tag/a\xff", b"tag/a\xff\x00", 100)),
        vec![&b"tag/a\xff\xff"[..], b"tag/a\xff\xff\xff"]
    );
    assert_eq!(
        keys_of(&scan(b"\xff", b"\xff", 100)),
        vec![&b"\xff\xff\x01"[..]]
    );
    assert!(scan(b"\xff", b"\xff\xff\x01", 100).is_empty());

    // `limit`, and paging with `after` = the last key of the previous page.
    assert!(scan(b"tag/a", b"", 0).is_empty());
    assert_eq!(
        keys_of(&scan(b"tag/a", b"", 3)),
        vec![&b"tag/a"[..], b"tag/a/1", b"tag/a/15"]
    );
    for page in 1..=4 {
        let mut paged = Vec::new();
        let mut after = Bytes::new();
        loop {
            let p = scan(b"", &after, page);
            assert!(p.len() <= page);
            let Some((last, _)) = p.last() else { break };
            after = last.clone();
            paged.extend(p);
        }
        assert_eq!(paged, everything, "pages of {page}");
    }

    // Deleted keys are skipped.
    s.set_meta(vec![del(b"tag/a/15"), del(b"tag/a\xff")])
        .wait()
        .unwrap();
    assert_eq!(
        keys_of(&scan(b"tag/a", b"tag/a/1", 3)),
        vec![&b"tag/a/2"[..], b"tag/a\xfe", b"tag/a\xff\x00"]
    );

    // A larger limit is capped.
    for round in 0..=MAX_META_SCAN / MAX_META_CHANGES {
        let batch = (0..MAX_META_CHANGES)
            .map(|i| {
                put(
                    format!("cap/{:05}", round * MAX_META_CHANGES + i).as_bytes(),
                    b"",
                )
            })
            .collect();
        s.set_meta(batch).wait().unwrap();
    }
    let first = scan(b"cap/", b"", usize::MAX);
    assert_eq!(first.len(), MAX_META_SCAN);
    assert_eq!(&first[0].0[..], b"cap/00000");
    let last = format!("cap/{:05}", MAX_META_SCAN - 1);
    assert_eq!(&first[MAX_META_SCAN - 1].0[..], last.as_bytes());
    let next = scan(b"cap/", last.as_bytes(), usize::MAX);
    assert_eq!(next.len(), MAX_META_CHANGES);
    assert_eq!(
        next.last().unwrap().0,
        format!("cap/{:05}", MAX_META_SCAN + MAX_META_CHANGES - 1)
    );
    assert_eq!(
        keys_of(&scan(b"tag/b", b"", usize::MAX)),
        vec![&b"tag/b"[..]]
    );
}

/// Every prefix, `after` and limit over the keys of up to 3 bytes from {0x00, 'a', 0xFF}
/// (some of them deleted), against a filter of the sorted keys.
pub fn account_meta_scans_exhaustive(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let alphabet = [0x00, b'a', 0xFF];
    let mut words: Vec<Vec<u8>> = vec![Vec::new()];
    for len in 1..=3 {
        let shorter: Vec<Vec<u8>> = words
            .iter()
            .filter(|w| w.len() == len - 1)
            .cloned()
            .collect();
        for w in shorter {
            for b in alphabet {
                words.push([&w[..], &[b]].concat());
            }
        }
    }
    words.sort();
    let keys: Vec<&Vec<u8>> = words.iter().filter(|w| !w.is_empty()).collect();
    s.set_meta(keys.iter().map(|k| put(k, k)).collect())
        .wait()
        .unwrap();
    // Every third key deleted: tombstones inside and at the edges of prefixes.
    let live: Vec<&Vec<u8>> = keys.iter().copied().step_by(3).collect();
    s.set_meta(
        keys.iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, k)| del(k))
            .collect(),
    )
    .wait()
    .unwrap();
    let mut scans = 0;
    for prefix in words.iter().filter(|w| w.len() <= 2) {
        for after in &words {
            for limit in [0, 1, 2, 100] {
                let want: Vec<&[u8]> = live
                    .iter()
                    .filter(|k| k.starts_with(prefix) && k[..] > after[..])
                    .take(limit)
                    .map(|k| &k[..])
                    .collect();
                let got = s.scan_meta(prefix, after, limit).unwrap();
                assert_eq!(
                    keys_of(&got),
                    want,
                    "prefix {prefix:?} after {after:?} {limit}"
                );
                assert!(got.iter().all(|(k, v)| k == v));
                scans += 1;
            }
        }
    }
    assert_eq!(scans, 13 * 40 * 4);
}

pub fn account_meta_limits(make: Factory) {
    let f = make(DedupWindow::default());
    let s = f.store.as_ref();
    let ok = put(b"limits/ok", b"v");
    let rejected = |bad: Vec<MetaChange>, limit: &str| {
        let mut changes = vec![ok.clone()];
        changes.extend(bad);
        match s.set_meta(changes).wait() {
            Err(StorageError::InvalidArgument(m)) => {
                assert!(m.contains(limit), "{m:?} names {limit}")
            }
            r => panic!("{r:?}"),
        }
        assert_eq!(s.meta(b"limits/ok").unwrap(), None, "nothing written");
        assert!(s.scan_meta(b"", b"", 10).unwrap().is_empty());
    };
    let key = |n: usize| vec![b'k'; n];
    let value = |n: usize| vec![b'v'; n];

    rejected(vec![put(b"", b"")], "512");
    rejected(vec![del(b"")], "512");
    rejected(vec![put(&key(MAX_META_KEY_LEN + 1), b"")], "512");
    rejected(vec![del(&key(MAX_META_KEY_LEN + 1))], "512");
    rejected(
        vec![put(b"limits/big", &value(MAX_META_VALUE_LEN + 1))],
        "65536",
    );
    let too_many = (1..MAX_META_CHANGES)
        .map(|i| put(format!("limits/{i}").as_bytes(), b""))
        .chain([put(b"limits/last", b"")])
        .collect();
    rejected(too_many, "1000");

    // At the limits: accepted, whole.
    let longest = key(MAX_META_KEY_LEN);
    let biggest = value(MAX_META_VALUE_LEN);
    s.set_meta(vec![put(&longest, &biggest), put(b"k", b"")])
        .wait()
        .unwrap();
    assert_eq!(s.meta(&longest).unwrap().unwrap(), biggest);
    let most: Vec<_> = (0..MAX_META_CHANGES)
        .map(|i| put(format!("most/{i:04}").as_bytes(), &i.to_be_bytes()))
        .collect();
    s.set_meta(most).wait().unwrap();
    let stored = s.scan_meta(b"most/", b"", usize::MAX).unwrap();
    assert_eq!(stored.len(), MAX_META_CHANGES);
    for (i, (k, v)) in stored.iter().enumerate() {
        assert_eq!(k, format!("most/{i:04}").as_bytes());
        assert_eq!(v[..], i.to_be_bytes());
    }
    // Reads of keys no write may use find nothing.
    assert_eq!(s.meta(b"").unwrap(), None);
    assert_eq!(s.meta(&key(MAX_META_KEY_LEN + 1)).unwrap(), None);
}

#[macro_export]
macro_rules! suite {
    ($factory:expr) => {
        $crate::suite!(@tests $factory;
            append_assigns_contiguous_seqs,
            concurrent_submissions_keep_per_thread_order,
            append_rejects_invalid_requests,
            idempotent_retry_returns_original,
            dedup_window_by_count,
            dedup_window_by_age,
            read_forward_pages,
            read_backward_pages,
            conversations_do_not_leak_into_neighbours,
            interning,
            membership,
            sync_state,
            unread_leaves_out_own_messages_and_what_came_before_joining,
            sync_reports_the_peers_read_position,
            group_change_commits_with_its_append,
            group_record_set_without_a_message,
            group_change_of_a_duplicate_is_not_applied,
            invalid_group_change_writes_nothing,
            member_calls_and_group_changes_agree,
            conversation_settings,
            sync_view_is_consistent_while_written,
            a_settings_change_keeps_the_fields_it_leaves_out,
            a_hidden_conversation_shows_again_with_a_new_message,
            recall_empties_a_message_with_its_event,
            recall_of_a_message_in_flight,
            relations_and_profiles,
            account_meta,
            account_meta_scans,
            account_meta_scans_exhaustive,
            account_meta_limits,
            close_rejects_later_calls,
        );
    };
    (@tests $factory:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::suite::$name($factory);
            }
        )*
    };
}
