//! The behavioural test suite, written once and run against every `MessageStore`.
//!
//! Each check takes a factory so that it can choose the idempotency window; `suite!`
//! expands to one `#[test]` per check.

use std::time::Duration;

use bytes::Bytes;
use tern_storage::{
    AppendRequest, Appended, DedupWindow, MAX_CLIENT_MSG_ID_LEN, MAX_GROUP_ID, MessageStore, Peer,
    StorageError, direct_conversation, group_conversation,
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

    let mut r = msg(ab, alice, "1", "hi");
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
    assert_eq!(s.read_seq(bob, ab).unwrap(), 0, "per user");
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

pub fn close_rejects_later_calls(make: Factory) {
    let f = make(DedupWindow::default());
    let s = &*f.store;
    let c = group_conversation(1).unwrap();
    append(s, msg(c, 1, "a", ""));
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
