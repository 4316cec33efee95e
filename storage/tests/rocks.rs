//! RocksStore-specific behaviour: restarts, the format check, exclusive opening, shutdown.

use std::time::Duration;

use bytes::Bytes;
use tern_storage::{
    AppendRequest, DedupWindow, Durability, FORMAT_VERSION, GroupChange, MessageStore, RocksStore,
    StorageError, StoreOptions, direct_conversation, group_conversation,
};

fn msg(conv: u64, sender: u64, id: &str) -> AppendRequest {
    AppendRequest {
        conversation: conv,
        sender,
        client_msg_id: id.to_owned(),
        content_type: 0,
        custom_type: String::new(),
        payload: Bytes::from_static(b"body"),
        participants: Vec::new(),
        ..AppendRequest::default()
    }
}

fn open(dir: &std::path::Path, d: Durability) -> RocksStore {
    RocksStore::open(dir, StoreOptions::with_durability(d)).unwrap()
}

#[test]
fn restart_continues_sequences_and_keeps_state() {
    for d in [
        Durability::Fsync,
        Durability::Wal {
            sync_interval_ms: 5,
        },
        Durability::Memory,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let c = direct_conversation(1, 2).unwrap();
        let (alice, g, v_before) = {
            let s = open(dir.path(), d);
            let alice = s.intern_user("alice").unwrap();
            let g = s.intern_group("g").unwrap();
            assert!(s.add_member(g, alice).wait().unwrap());
            // User 2 writes, so that alice's read position is hers to move.
            for i in 1..=5 {
                let mut r = msg(c, 2, &format!("m{i}"));
                r.participants = vec![1, 2];
                assert_eq!(s.append(r).wait().unwrap().seq, i);
            }
            assert_eq!(s.set_read(alice, c, 3).wait().unwrap(), 3);
            assert_eq!(s.set_delivered(alice, "phone", c, 4).wait().unwrap(), 4);
            let v = s.user_version(alice).unwrap();
            s.close().unwrap();
            (alice, g, v)
        };
        let s = open(dir.path(), d);
        assert_eq!(s.latest_seq(c).unwrap(), 5, "{d:?}");
        let r = s.append(msg(c, 2, "m6")).wait().unwrap();
        assert_eq!(r.seq, 6);
        assert!(r.version > v_before, "versions continue after a restart");
        assert_eq!(s.read_forward(c, 1, 100).unwrap().len(), 6);
        assert_eq!(s.lookup_user("alice").unwrap(), Some(alice));
        assert_eq!(s.lookup_group("g").unwrap(), Some(g));
        let bob = s.intern_user("bob").unwrap();
        assert_eq!(bob, alice + 1, "ids continue");
        assert_eq!(s.members(g, 0, 10).unwrap(), vec![alice]);
        assert_eq!(s.groups_of(alice).unwrap(), vec![g]);
        assert_eq!(s.read_seq(alice, c).unwrap(), 3);
        assert_eq!(s.delivered(alice, "phone", c).unwrap(), 4);
        assert!(s.user_version(alice).unwrap() > v_before);
        let convs = s.conversations_changed_since(alice, 0, None).unwrap();
        assert_eq!(convs.len(), 2, "the 1:1 and the group");
        drop(s);
        // Dropping the last handle (without close) also flushes and releases the directory.
        let s = open(dir.path(), d);
        assert_eq!(s.latest_seq(c).unwrap(), 6, "{d:?}");
    }
}

#[test]
fn settings_recalls_relations_and_profiles_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = tern_storage::direct_conversation(1, 2).unwrap();
    let muted = tern_storage::ConversationSettings {
        muted: true,
        cleared_seq: 1,
        ..Default::default()
    };
    {
        let s = open(dir.path(), Durability::Fsync);
        s.append(msg(c, 1, "m1")).wait().unwrap();
        let mut tomb = msg(c, 1, "t1");
        tomb.recall = Some(1);
        s.append(tomb).wait().unwrap();
        s.set_conversation_settings(2, c, muted.into())
            .wait()
            .unwrap();
        s.set_relations(vec![tern_storage::RelationChange {
            user: 2,
            kind: tern_storage::RelationKind::Blocked,
            other: 1,
            value: Some(Bytes::new()),
        }])
        .wait()
        .unwrap();
        s.set_user_profile(2, Bytes::from_static(b"me"))
            .wait()
            .unwrap();
        s.close().unwrap();
    }
    let s = open(dir.path(), Durability::Fsync);
    let page = s.read_forward(c, 1, 10).unwrap();
    assert!(page[0].recalled && page[0].payload.is_empty());
    assert_eq!(page.len(), 2);
    assert_eq!(s.conversation_settings(2, c).unwrap(), muted);
    assert!(
        s.relation(2, tern_storage::RelationKind::Blocked, 1)
            .unwrap()
            .is_some()
    );
    assert_eq!(s.user_profile(2).unwrap(), Some(Bytes::from_static(b"me")));
}

#[test]
fn account_meta_survives_reopen() {
    let put = |k: &'static [u8], v: &'static [u8]| tern_storage::MetaChange {
        key: Bytes::from_static(k),
        value: Some(Bytes::from_static(v)),
    };
    let del = |k: &'static [u8]| tern_storage::MetaChange {
        key: Bytes::from_static(k),
        value: None,
    };
    for d in [
        Durability::Fsync,
        Durability::Wal {
            sync_interval_ms: 5,
        },
        Durability::Memory,
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path(), d);
            s.set_meta(vec![
                put(b"ban/7", b"until 2030"),
                put(b"push/7/phone", b"token"),
                put(b"tag/a\xff", b"x"),
                put(b"tag/b", b"y"),
                put(b"gone", b"z"),
            ])
            .wait()
            .unwrap();
            s.set_meta(vec![del(b"gone"), put(b"push/7/phone", b"token2")])
                .wait()
                .unwrap();
            // Keys named like the store's own counters must not touch them.
            s.set_meta(vec![
                put(b"format_version", b"\xff\xff\xff\xff"),
                put(b"version", b""),
                put(b"next_user_id", b"1"),
            ])
            .wait()
            .unwrap();
            assert_eq!(s.intern_user("alice").unwrap(), 1);
            s.close().unwrap();
        }
        let s = open(dir.path(), d);
        assert_eq!(
            s.meta(b"ban/7").unwrap(),
            Some(Bytes::from_static(b"until 2030")),
            "{d:?}"
        );
        assert_eq!(
            s.meta(b"push/7/phone").unwrap(),
            Some(Bytes::from_static(b"token2"))
        );
        assert_eq!(s.meta(b"gone").unwrap(), None);
        assert_eq!(
            s.scan_meta(b"tag/a", b"", 10).unwrap(),
            vec![(Bytes::from_static(b"tag/a\xff"), Bytes::from_static(b"x"))]
        );
        assert_eq!(s.meta(b"version").unwrap(), Some(Bytes::new()));
        assert_eq!(s.intern_user("bob").unwrap(), 2, "ids continue");
        assert_eq!(s.scan_meta(b"", b"", 100).unwrap().len(), 7);
        drop(s);
        // Dropping the last handle (without close) keeps it too.
        let s = open(dir.path(), d);
        assert_eq!(s.scan_meta(b"", b"", 100).unwrap().len(), 7, "{d:?}");
    }
}

#[test]
fn group_changes_survive_reopen() {
    for d in [Durability::Fsync, Durability::Memory] {
        let dir = tempfile::tempdir().unwrap();
        let (g, conv) = {
            let s = open(dir.path(), d);
            let g = s.intern_group("g").unwrap();
            let conv = group_conversation(g).unwrap();
            let mut r = msg(conv, 1, "create");
            r.group_change = Some(Box::new(GroupChange {
                group: g,
                record: Some(Bytes::from_static(b"profile")),
                members: vec![
                    (1, Some(Bytes::from_static(b"owner"))),
                    (2, Some(Bytes::new())),
                    (3, Some(Bytes::from_static(b"x"))),
                ],
                joiners_read_history: false,
            }));
            assert_eq!(s.append(r).wait().unwrap().seq, 1);
            let mut r = msg(conv, 1, "kick");
            r.group_change = Some(Box::new(GroupChange {
                group: g,
                record: None,
                members: vec![(3, None)],
                joiners_read_history: false,
            }));
            assert_eq!(s.append(r).wait().unwrap().seq, 2);
            s.close().unwrap();
            (g, conv)
        };
        let s = open(dir.path(), d);
        assert_eq!(
            s.group_record(g).unwrap(),
            Some(Bytes::from_static(b"profile")),
            "{d:?}"
        );
        assert_eq!(
            s.member_records(g, 0, 10).unwrap(),
            vec![(1, Bytes::from_static(b"owner")), (2, Bytes::new()),]
        );
        assert_eq!(s.membership(3, g).unwrap(), Some(2));
        assert_eq!(s.membership(2, g).unwrap(), Some(0));
        assert_eq!(
            (s.joined_seq(2, g).unwrap(), s.joined_seq(3, g).unwrap()),
            (1, 1)
        );
        let i = s.conversations_changed_since(3, 0, None).unwrap();
        assert_eq!(
            (i[0].conversation, i[0].active, i[0].left_seq),
            (conv, false, 2)
        );
        // The writer reloads membership from the database: 2 is a member, 3 is not.
        assert!(!s.add_member(g, 2).wait().unwrap());
        assert!(s.add_member(g, 3).wait().unwrap());
        assert_eq!(s.membership(3, g).unwrap(), Some(0));
        assert_eq!(s.joined_seq(3, g).unwrap(), 3);
    }
}

#[test]
fn a_group_record_set_without_a_message_survives_reopen() {
    for d in [Durability::Fsync, Durability::Memory] {
        let dir = tempfile::tempdir().unwrap();
        let g = {
            let s = open(dir.path(), d);
            let g = s.intern_group("g").unwrap();
            s.set_group_record(g, Bytes::from_static(b"pending"))
                .wait()
                .unwrap();
            s.close().unwrap();
            g
        };
        let s = open(dir.path(), d);
        assert_eq!(
            s.group_record(g).unwrap(),
            Some(Bytes::from_static(b"pending")),
            "{d:?}"
        );
        assert_eq!(s.latest_seq(group_conversation(g).unwrap()).unwrap(), 0);
    }
}

#[test]
fn idempotent_retry_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let c = group_conversation(3).unwrap();
    let mut opts = StoreOptions::default();
    opts.dedup_window = DedupWindow {
        max_entries: 2,
        max_age: Duration::from_secs(3600),
    };
    let first = {
        let s = RocksStore::open(dir.path(), opts.clone()).unwrap();
        let first = s.append(msg(c, 1, "a")).wait().unwrap();
        s.append(msg(c, 1, "b")).wait().unwrap();
        s.append(msg(c, 1, "")).wait().unwrap();
        s.append(msg(c, 1, "c")).wait().unwrap();
        first
    };
    let s = RocksStore::open(dir.path(), opts.clone()).unwrap();
    let b = s.append(msg(c, 1, "b")).wait().unwrap();
    assert!(b.duplicate);
    assert_eq!(b.seq, 2);
    assert!(s.append(msg(c, 1, "c")).wait().unwrap().duplicate);
    let a = s.append(msg(c, 1, "a")).wait().unwrap();
    assert!(!a.duplicate, "evicted by count, also after a restart");
    assert_eq!(a.seq, 5);
    assert_ne!(a.seq, first.seq);
    drop(s);

    // A window by age, across a restart: within a generous window the retry is a duplicate;
    // reopened with a window shorter than the entry's age it is not (no timing assumptions
    // beyond "an open takes longer than 1 ms", which the explicit wait below guarantees).
    let mut long = opts.clone();
    long.dedup_window = DedupWindow {
        max_entries: 100,
        max_age: Duration::from_secs(600),
    };
    {
        let s = RocksStore::open(dir.path(), long.clone()).unwrap();
        s.append(msg(c, 2, "x")).wait().unwrap();
    }
    let s = RocksStore::open(dir.path(), long).unwrap();
    assert!(s.append(msg(c, 2, "x")).wait().unwrap().duplicate);
    drop(s);
    std::thread::sleep(Duration::from_millis(5));
    let mut short = opts.clone();
    short.dedup_window = DedupWindow {
        max_entries: 100,
        max_age: Duration::from_millis(1),
    };
    let s = RocksStore::open(dir.path(), short).unwrap();
    let x = s.append(msg(c, 2, "x")).wait().unwrap();
    assert!(!x.duplicate);
    assert_eq!(x.seq, 7);
}

#[test]
fn many_batches_keep_the_journal_bounded_and_correct() {
    let dir = tempfile::tempdir().unwrap();
    let c = group_conversation(3).unwrap();
    let mut opts = StoreOptions::with_durability(Durability::Memory);
    opts.dedup_window = DedupWindow {
        max_entries: 50,
        max_age: Duration::from_secs(3600),
    };
    {
        let s = RocksStore::open(dir.path(), opts.clone()).unwrap();
        // One append per batch: the journal is trimmed in chunks as entries are evicted.
        for i in 0..400 {
            assert_eq!(
                s.append(msg(c, 1, &format!("{i}"))).wait().unwrap().seq,
                i + 1
            );
        }
    }
    let s = RocksStore::open(dir.path(), opts).unwrap();
    assert!(s.append(msg(c, 1, "399")).wait().unwrap().duplicate);
    assert!(s.append(msg(c, 1, "350")).wait().unwrap().duplicate);
    let old = s.append(msg(c, 1, "349")).wait().unwrap();
    assert!(!old.duplicate);
    assert_eq!(old.seq, 401);
}

#[test]
fn unknown_format_version_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), Durability::Fsync));
    {
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&opts, dir.path(), &cfs).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(meta, b"format_version", 99u32.to_le_bytes())
            .unwrap();
    }
    let err = RocksStore::open(dir.path(), StoreOptions::default()).unwrap_err();
    match &err {
        StorageError::UnsupportedFormat {
            found, supported, ..
        } => {
            assert_eq!((*found, *supported), (99, FORMAT_VERSION));
        }
        other => panic!("unexpected {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("99")
            && text.contains(&dir.path().canonicalize().unwrap().display().to_string())
    );
    // The failed open released the directory.
    assert!(matches!(
        RocksStore::open(dir.path(), StoreOptions::default()),
        Err(StorageError::UnsupportedFormat { .. })
    ));
}

#[test]
fn unknown_record_version_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let c = group_conversation(1).unwrap();
    {
        let s = open(dir.path(), Durability::Fsync);
        s.append(msg(c, 1, "a")).wait().unwrap();
    }
    {
        let opts = rocksdb::Options::default();
        let cfs = rocksdb::DB::list_cf(&opts, dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&opts, dir.path(), &cfs).unwrap();
        let m = db.cf_handle("messages").unwrap();
        let mut key = c.to_be_bytes().to_vec();
        key.extend_from_slice(&2u64.to_be_bytes());
        db.put_cf(m, key, [9u8, 0, 0]).unwrap();
    }
    let s = open(dir.path(), Durability::Fsync);
    assert_eq!(
        s.read_forward(c, 1, 10),
        Err(StorageError::UnknownRecordVersion {
            found: 9,
            supported: tern_storage::RECALLED_RECORD_VERSION
        })
    );
    assert!(s.read_backward(c, 0, 10).is_err());
    assert_eq!(
        s.read_forward(c, 1, 1).unwrap().len(),
        1,
        "seq 1 still reads"
    );
    // The writer refuses to continue on an unreadable head instead of guessing a seq.
    assert!(s.append(msg(c, 1, "b")).wait().is_err());
}

#[test]
fn double_open_fails() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Durability::Fsync);
    let clone = s.clone();
    match RocksStore::open(dir.path(), StoreOptions::default()) {
        Err(StorageError::AlreadyOpen { path }) => {
            assert_eq!(path, dir.path().canonicalize().unwrap());
        }
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
    // Another spelling of the same directory is the same directory.
    let other_spelling = dir.path().join(".");
    assert!(matches!(
        RocksStore::open(&other_spelling, StoreOptions::default()),
        Err(StorageError::AlreadyOpen { .. })
    ));
    drop(s);
    assert!(
        RocksStore::open(dir.path(), StoreOptions::default()).is_err(),
        "a clone still holds it"
    );
    drop(clone);
    let again = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(again.path(), dir.path().canonicalize().unwrap());
}

#[test]
fn close_completes_or_fails_every_inflight_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path(), Durability::Fsync);
    let c = group_conversation(1).unwrap();
    let pending: Vec<_> = (0..5000)
        .map(|i| s.append(msg(c, 1, &format!("{i}"))))
        .collect();
    let closer = {
        let s = s.clone();
        std::thread::spawn(move || s.close())
    };
    let mut ok = Vec::new();
    for p in pending {
        match p.wait() {
            Ok(a) => ok.push(a.seq),
            Err(StorageError::Closed) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    closer.join().unwrap().unwrap();
    assert_eq!(ok, (1..=ok.len() as u64).collect::<Vec<_>>());
    drop(s);
    let s = open(dir.path(), Durability::Fsync);
    assert_eq!(s.latest_seq(c).unwrap(), ok.len() as u64);
}

#[test]
fn dropping_the_last_handle_completes_queued_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = group_conversation(1).unwrap();
    let pending: Vec<_> = {
        let s = open(dir.path(), Durability::Fsync);
        (0..1000)
            .map(|i| s.append(msg(c, 1, &format!("{i}"))))
            .collect()
    };
    for (i, p) in pending.into_iter().enumerate() {
        assert_eq!(p.wait().unwrap().seq, i as u64 + 1);
    }
    let s = open(dir.path(), Durability::Fsync);
    assert_eq!(s.latest_seq(c).unwrap(), 1000);
}
