//! Groups end to end: a real gateway (two cores, so members live on both), real sockets,
//! RocksDB in a temp dir. Every operation, its permission errors, the events in the group's log,
//! fan-out, sync of members who were offline, and state across a restart.

use std::collections::BTreeSet;

use prost::Message;
use tern_protocol::v1::frame::Body;
use tern_protocol::v1::group_request::Op;
use tern_protocol::v1::{
    CreateGroup, DissolveGroup, GetGroup, InviteMembers, JoinGroup, KickMembers, LeaveGroup,
    ListJoinRequests, ListMembers, MuteAll, MuteMember, ReviewJoin, SetRole, TransferOwner,
    UpdateGroup,
};
use tern_protocol::{
    ContentType, Deliver, ErrorCode, Frame, GROUP_EVENT_TYPE, GroupEvent, GroupEventKind,
    GroupInfo, GroupProfile, GroupRequest, GroupResponse, GroupRole, HistoryRequest, JoinPolicy,
    SocialEvent, SocialEventKind, SyncRequest, Target,
};
use tern_tests::{
    Conn, Gateway, NO_RATE_LIMITS, Via, collect_sync, expect_deliver, send_group, send_group_acked,
    text,
};

fn login(gw: &Gateway, user: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), "phone").0
}

fn request(c: &mut Conn, group: &str, op: Op) -> u64 {
    c.send_body(Body::Group(GroupRequest {
        group_id: group.into(),
        op: Some(op),
    }))
}

/// Sends a group request and returns its GroupResponse (panics on anything else).
fn group_ok(c: &mut Conn, group: &str, op: Op) -> GroupResponse {
    let rid = request(c, group, op);
    match c.recv_frame() {
        Frame {
            request_id,
            body: Some(Body::GroupResponse(r)),
        } if request_id == rid => r,
        other => panic!("expected GroupResponse for {rid}, got {other:?}"),
    }
}

/// Sends a group request that must fail with `code`.
fn group_err(c: &mut Conn, group: &str, op: Op, code: ErrorCode) {
    let rid = request(c, group, op);
    let (got, fatal) = c.expect_error(code);
    assert_eq!((got, fatal), (rid, false));
}

fn create(c: &mut Conn, group: &str, members: &[&str], policy: JoinPolicy) -> GroupResponse {
    group_ok(
        c,
        group,
        Op::Create(CreateGroup {
            profile: Some(Box::new(GroupProfile {
                name: Some(format!("{group} name")),
                join_policy: Some(policy.into()),
                ..GroupProfile::default()
            })),
            members: members.iter().map(|m| m.to_string()).collect(),
        }),
    )
}

fn send_group_err(c: &mut Conn, group: &str, id: &str, code: ErrorCode) {
    let rid = send_group(c, group, id, "x");
    assert_eq!(c.expect_error(code), (rid, false));
}

fn event(d: &Deliver) -> GroupEvent {
    assert_eq!(d.content_type, ContentType::System as u32, "{d:?}");
    assert_eq!(d.custom_type, GROUP_EVENT_TYPE);
    GroupEvent::decode(d.payload.clone()).expect("group event payload")
}

fn expect_event(c: &mut Conn, kind: GroupEventKind) -> (Deliver, GroupEvent) {
    let d = expect_deliver(c);
    let e = event(&d);
    assert_eq!(e.kind, kind as i32, "{e:?}");
    (d, e)
}

fn info(c: &mut Conn, group: &str) -> GroupInfo {
    *group_ok(c, group, Op::Get(GetGroup {})).info.expect("info")
}

/// Every member as (name, role), paging with `limit`.
fn members(c: &mut Conn, group: &str, limit: u32) -> Vec<(String, GroupRole)> {
    let mut out = Vec::new();
    let mut token = 0;
    loop {
        let page = group_ok(
            c,
            group,
            Op::ListMembers(ListMembers {
                page_token: token,
                limit,
            }),
        )
        .members
        .expect("page");
        assert!(page.members.len() <= limit as usize);
        out.extend(
            page.members
                .into_iter()
                .map(|m| (m.user_id, GroupRole::try_from(m.role).unwrap())),
        );
        if page.next_page_token == 0 {
            return out;
        }
        token = page.next_page_token;
    }
}

fn users(list: &[&str]) -> Vec<String> {
    list.iter().map(|u| u.to_string()).collect()
}

#[test]
fn members_on_both_cores_get_every_message_once_and_outsiders_get_nothing() {
    let gw = Gateway::start(&["--cores", "2"]);
    let names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace"];
    let mut conns: Vec<Conn> = names.iter().map(|n| login(&gw, n)).collect();
    let mut alice_laptop = gw.login(Via::Tcp, &gw.token("alice"), "laptop").0;
    let mut outsider = login(&gw, "mallory");

    let created = create(&mut conns[0], "g1", &names[1..], JoinPolicy::InviteOnly);
    assert_eq!(created.event_seq, 1);
    let gi = *created.info.expect("create answers with the info");
    assert_eq!(
        (gi.owner.as_str(), gi.member_count, gi.latest_seq),
        ("alice", 7, 1)
    );
    assert_eq!(gi.profile.unwrap().name.as_deref(), Some("g1 name"));
    let conv = created.conversation_id;

    // Every member but the creating session sees the CREATED event, live.
    for c in conns[1..].iter_mut().chain([&mut alice_laptop]) {
        let (d, e) = expect_event(c, GroupEventKind::GroupCreated);
        assert_eq!(
            (d.conversation_id, d.seq, d.sender.as_str()),
            (conv, 1, "alice")
        );
        assert_eq!(d.target, Some(Target::group("g1")));
        assert_eq!(e.user_ids, users(&names[1..]));
    }

    for (i, sender) in [0usize, 3, 6].into_iter().enumerate() {
        let seq = send_group_acked(
            &mut conns[sender],
            "g1",
            &format!("m{i}"),
            &format!("hi {i}"),
        );
        assert_eq!(seq, 2 + i as u64);
        for (j, c) in conns.iter_mut().enumerate() {
            if j == sender {
                continue;
            }
            let d = expect_deliver(c);
            assert_eq!(
                (d.seq, d.sender.as_str(), text(&d)),
                (seq, names[sender], format!("hi {i}").as_str())
            );
            assert_eq!(d.target, Some(Target::group("g1")));
        }
        let d = expect_deliver(&mut alice_laptop);
        assert_eq!(d.seq, seq);
    }
    for c in conns.iter_mut().chain([&mut alice_laptop, &mut outsider]) {
        c.nothing_pending();
    }

    // An outsider can neither post, read, ask, nor join an invite-only group.
    send_group_err(&mut outsider, "g1", "x1", ErrorCode::NotMember);
    group_err(
        &mut outsider,
        "g1",
        Op::Get(GetGroup {}),
        ErrorCode::NotMember,
    );
    group_err(
        &mut outsider,
        "g1",
        Op::ListMembers(ListMembers::default()),
        ErrorCode::NotMember,
    );
    group_err(
        &mut outsider,
        "g1",
        Op::Join(JoinGroup::default()),
        ErrorCode::Forbidden,
    );
    let rid = outsider.send_body(Body::History(HistoryRequest {
        target: Some(Target::group("g1")),
        ..HistoryRequest::default()
    }));
    assert_eq!(outsider.expect_error(ErrorCode::Forbidden), (rid, false));
    let rid = outsider.send_body(Body::History(HistoryRequest {
        conversation_id: conv,
        ..HistoryRequest::default()
    }));
    assert_eq!(outsider.expect_error(ErrorCode::Forbidden), (rid, false));
    // Unknown groups.
    send_group_err(&mut outsider, "nope", "x2", ErrorCode::NotFound);
    group_err(
        &mut outsider,
        "nope",
        Op::Get(GetGroup {}),
        ErrorCode::NotFound,
    );
    // A second create of the same id.
    group_err(
        &mut conns[1],
        "g1",
        Op::Create(CreateGroup::default()),
        ErrorCode::Conflict,
    );

    // Members read the history, newest first.
    let rid = conns[4].send_body(Body::History(HistoryRequest {
        target: Some(Target::group("g1")),
        ..HistoryRequest::default()
    }));
    match conns[4].recv_frame() {
        Frame {
            request_id,
            body: Some(Body::HistoryPage(p)),
        } if request_id == rid => {
            let seqs: Vec<u64> = p.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, vec![4, 3, 2, 1]);
            assert!(!p.has_more);
        }
        other => panic!("expected HistoryPage, got {other:?}"),
    }
}

#[test]
fn roles_mutes_and_removals_are_enforced_and_recorded_in_order() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice");
    let mut bob = login(&gw, "bob");
    let mut carol = login(&gw, "carol");
    let mut dave = login(&gw, "dave");
    create(&mut alice, "g", &["bob", "carol", "dave"], JoinPolicy::Free);
    for c in [&mut bob, &mut carol, &mut dave] {
        expect_event(c, GroupEventKind::GroupCreated);
    }

    // Members cannot moderate.
    let kick = |users: &[&str]| {
        Op::Kick(KickMembers {
            user_ids: self::users(users),
            reason: "spam".into(),
        })
    };
    group_err(&mut bob, "g", kick(&["carol"]), ErrorCode::Forbidden);
    group_err(
        &mut bob,
        "g",
        Op::Mute(MuteMember {
            user_id: "carol".into(),
            duration_ms: 60_000,
        }),
        ErrorCode::Forbidden,
    );
    group_err(
        &mut bob,
        "g",
        Op::SetRole(SetRole {
            user_id: "bob".into(),
            role: GroupRole::RoleAdmin.into(),
        }),
        ErrorCode::Forbidden,
    );
    group_err(
        &mut bob,
        "g",
        Op::Dissolve(DissolveGroup {}),
        ErrorCode::Forbidden,
    );

    // The owner makes bob an admin.
    let r = group_ok(
        &mut alice,
        "g",
        Op::SetRole(SetRole {
            user_id: "bob".into(),
            role: GroupRole::RoleAdmin.into(),
        }),
    );
    assert_eq!(r.event_seq, 2);
    for c in [&mut bob, &mut carol, &mut dave] {
        let (d, e) = expect_event(c, GroupEventKind::GroupRoleChanged);
        assert_eq!(
            (d.seq, e.user_ids.clone(), e.role),
            (2, users(&["bob"]), GroupRole::RoleAdmin as i32)
        );
    }

    // The admin mutes carol: her sends fail, the others' go on.
    let r = group_ok(
        &mut bob,
        "g",
        Op::Mute(MuteMember {
            user_id: "carol".into(),
            duration_ms: 600_000,
        }),
    );
    assert_eq!(r.event_seq, 3);
    for c in [&mut alice, &mut carol, &mut dave] {
        let (_, e) = expect_event(c, GroupEventKind::GroupMuted);
        assert_eq!(e.user_ids, users(&["carol"]));
        assert!(e.muted_until_ms > 0);
    }
    send_group_err(&mut carol, "g", "c1", ErrorCode::Muted);
    // An admin cannot mute the owner.
    group_err(
        &mut bob,
        "g",
        Op::Mute(MuteMember {
            user_id: "alice".into(),
            duration_ms: 1,
        }),
        ErrorCode::Forbidden,
    );
    group_ok(
        &mut bob,
        "g",
        Op::Mute(MuteMember {
            user_id: "carol".into(),
            duration_ms: 0,
        }),
    );
    for c in [&mut alice, &mut carol, &mut dave] {
        expect_event(c, GroupEventKind::GroupUnmuted);
    }
    let seq = send_group_acked(&mut carol, "g", "c2", "free again");
    assert_eq!(seq, 5);
    for c in [&mut alice, &mut bob, &mut dave] {
        assert_eq!(text(&expect_deliver(c)), "free again");
    }

    // Mute all: members silenced, admins and the owner not.
    group_ok(&mut alice, "g", Op::MuteAll(MuteAll { muted: true }));
    for c in [&mut bob, &mut carol, &mut dave] {
        expect_event(c, GroupEventKind::GroupMutedAll);
    }
    send_group_err(&mut dave, "g", "d1", ErrorCode::Muted);
    assert_eq!(send_group_acked(&mut bob, "g", "b1", "admin speaks"), 7);
    for c in [&mut alice, &mut carol, &mut dave] {
        assert_eq!(text(&expect_deliver(c)), "admin speaks");
    }
    group_ok(&mut alice, "g", Op::MuteAll(MuteAll { muted: false }));
    for c in [&mut bob, &mut carol, &mut dave] {
        expect_event(c, GroupEventKind::GroupUnmutedAll);
    }

    // An admin cannot remove the owner; the owner removes dave, who hears it and nothing after.
    group_err(&mut bob, "g", kick(&["alice"]), ErrorCode::Forbidden);
    group_err(&mut bob, "g", kick(&["mallory"]), ErrorCode::NotMember);
    let r = group_ok(&mut bob, "g", kick(&["dave"]));
    assert_eq!(r.event_seq, 9);
    for c in [&mut alice, &mut carol, &mut dave] {
        let (d, e) = expect_event(c, GroupEventKind::GroupKicked);
        assert_eq!((d.seq, d.sender.as_str()), (9, "bob"));
        assert_eq!(
            (e.user_ids.clone(), e.reason.as_str()),
            (users(&["dave"]), "spam")
        );
    }
    assert_eq!(send_group_acked(&mut alice, "g", "a1", "after dave"), 10);
    for c in [&mut bob, &mut carol] {
        assert_eq!(text(&expect_deliver(c)), "after dave");
    }
    dave.nothing_pending();
    send_group_err(&mut dave, "g", "d2", ErrorCode::NotMember);
    // A free group shows dave its public face only (no latest seq).
    let seen = info(&mut dave, "g");
    assert_eq!((seen.member_count, seen.latest_seq), (3, 0));
    // Dave's history ends at the event that removed him.
    let rid = dave.send_body(Body::History(HistoryRequest {
        target: Some(Target::group("g")),
        ..HistoryRequest::default()
    }));
    match dave.recv_frame().body {
        Some(Body::HistoryPage(p)) => {
            assert_eq!(p.messages.first().map(|m| m.seq), Some(9), "{rid}");
            assert_eq!(p.messages.len(), 9);
        }
        other => panic!("expected HistoryPage, got {other:?}"),
    }
    // And so does his sync.
    let rid = dave.send_body(Body::Sync(SyncRequest::default()));
    let (convs, msgs, _) = collect_sync(&mut dave, rid);
    let g = convs
        .iter()
        .find(|c| c.target == Some(Target::group("g")))
        .expect("the group is in dave's list");
    assert!(g.left);
    assert_eq!(g.latest_seq, 9);
    assert_eq!(msgs.iter().map(|m| m.seq).max(), Some(9));

    // Free group: dave joins again by himself and gets what follows.
    let r = group_ok(&mut dave, "g", Op::Join(JoinGroup::default()));
    assert_eq!(r.event_seq, 11);
    for c in [&mut alice, &mut bob, &mut carol] {
        let (_, e) = expect_event(c, GroupEventKind::GroupJoined);
        assert_eq!(e.user_ids, users(&["dave"]));
    }
    group_err(
        &mut dave,
        "g",
        Op::Join(JoinGroup::default()),
        ErrorCode::Conflict,
    );

    // The owner cannot leave; ownership moves, then the old owner may.
    group_err(
        &mut alice,
        "g",
        Op::Leave(LeaveGroup {}),
        ErrorCode::Forbidden,
    );
    group_ok(
        &mut alice,
        "g",
        Op::Transfer(TransferOwner {
            user_id: "carol".into(),
        }),
    );
    for c in [&mut bob, &mut carol, &mut dave] {
        let (_, e) = expect_event(c, GroupEventKind::GroupOwnerChanged);
        assert_eq!(e.user_ids, users(&["carol"]));
    }
    group_ok(&mut alice, "g", Op::Leave(LeaveGroup {}));
    for c in [&mut bob, &mut carol, &mut dave] {
        let (_, e) = expect_event(c, GroupEventKind::GroupLeft);
        assert_eq!(e.user_ids, users(&["alice"]));
    }
    let listed: BTreeSet<(String, GroupRole)> = members(&mut carol, "g", 2).into_iter().collect();
    let want: BTreeSet<(String, GroupRole)> = [
        ("bob".to_string(), GroupRole::RoleAdmin),
        ("carol".to_string(), GroupRole::RoleOwner),
        ("dave".to_string(), GroupRole::RoleMember),
    ]
    .into();
    assert_eq!(listed, want);
    assert_eq!(info(&mut bob, "g").owner, "carol");
}

#[test]
fn an_offline_member_catches_up_on_events_and_messages_in_order() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice");
    create(&mut alice, "team", &["erin"], JoinPolicy::Free);
    send_group_acked(&mut alice, "team", "1", "one");
    group_ok(&mut alice, "team", invite(&["bob", "erin"]));
    send_group_acked(&mut alice, "team", "2", "two");
    group_ok(&mut alice, "team", notice("be kind"));
    send_group_acked(&mut alice, "team", "3", "three");

    // Erin was never online: her first sync has the whole log in order, events included.
    let (mut erin, (convs, msgs, _)) = gw.login_synced(Via::Tcp, "erin", "phone", 0);
    assert_eq!(convs.len(), 1);
    assert_eq!((convs[0].latest_seq, convs[0].left), (6, false));
    let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(event(&msgs[0]).kind, GroupEventKind::GroupCreated as i32);
    assert_eq!(text(&msgs[1]), "one");
    let invited = event(&msgs[2]);
    // Erin was already a member: only bob was added.
    assert_eq!(
        (invited.kind, invited.user_ids),
        (GroupEventKind::GroupInvited as i32, users(&["bob"]))
    );
    assert_eq!(text(&msgs[3]), "two");
    let changed = event(&msgs[4]);
    assert_eq!(changed.kind, GroupEventKind::GroupProfileChanged as i32);
    assert_eq!(changed.profile.unwrap().notice.as_deref(), Some("be kind"));
    assert_eq!(text(&msgs[5]), "three");
    // Live from here on.
    send_group_acked(&mut alice, "team", "4", "four");
    let d = expect_deliver(&mut erin);
    assert_eq!((d.seq, text(&d)), (7, "four"));
}

#[test]
fn group_state_survives_a_restart_and_dissolve_is_final() {
    let gw_dir = tempfile::tempdir().unwrap();
    let cfg = gw_dir.path().join("small-groups.toml");
    std::fs::write(&cfg, format!("{NO_RATE_LIMITS}group_max_members = 3\n")).unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let mut gw = Gateway::start_in(&gw_dir.path().join("data"), &["--config", &cfg]);
    let mut alice = login(&gw, "alice");
    create(&mut alice, "g", &["bob"], JoinPolicy::Approval);
    group_ok(
        &mut alice,
        "g",
        Op::SetRole(SetRole {
            user_id: "bob".into(),
            role: GroupRole::RoleAdmin.into(),
        }),
    );
    send_group_acked(&mut alice, "g", "1", "before restart");
    // Over the member limit of 3.
    group_err(
        &mut alice,
        "g",
        invite(&["carol", "dave"]),
        ErrorCode::LimitExceeded,
    );
    drop(alice);
    gw.restart();

    let mut alice = login(&gw, "alice");
    let mut carol = login(&gw, "carol");
    let gi = info(&mut alice, "g");
    assert_eq!(
        (gi.owner.as_str(), gi.member_count, gi.latest_seq),
        ("alice", 2, 3)
    );
    assert_eq!(
        members(&mut alice, "g", 10),
        vec![
            ("alice".to_string(), GroupRole::RoleOwner),
            ("bob".to_string(), GroupRole::RoleAdmin)
        ]
    );
    // Approval groups take invites only from admins.
    assert_eq!(send_group_acked(&mut alice, "g", "2", "after restart"), 4);
    group_ok(&mut alice, "g", invite(&["carol"]));
    expect_event(&mut carol, GroupEventKind::GroupInvited);
    group_err(&mut carol, "g", invite(&["dave"]), ErrorCode::Forbidden);

    let r = group_ok(&mut alice, "g", Op::Dissolve(DissolveGroup {}));
    assert_eq!(r.event_seq, 6);
    let (d, _) = expect_event(&mut carol, GroupEventKind::GroupDissolved);
    assert_eq!(d.seq, 6);
    send_group_err(&mut alice, "g", "3", ErrorCode::NotFound);
    send_group_err(&mut carol, "g", "3", ErrorCode::NotFound);
    group_err(
        &mut alice,
        "g",
        Op::Create(CreateGroup::default()),
        ErrorCode::Conflict,
    );
    // Everyone's sync shows the group as left at the dissolve event.
    let rid = carol.send_body(Body::Sync(SyncRequest::default()));
    let (convs, _, _) = collect_sync(&mut carol, rid);
    assert_eq!(convs.len(), 1);
    assert_eq!((convs[0].left, convs[0].latest_seq), (true, 6));
    drop(carol);
    gw.restart();
    let mut alice = login(&gw, "alice");
    send_group_err(&mut alice, "g", "4", ErrorCode::NotFound);
}

#[test]
fn bad_group_requests_get_their_error_codes() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice");
    let rid = alice.send_body(Body::Group(GroupRequest {
        group_id: "g".into(),
        op: None,
    }));
    assert_eq!(alice.expect_error(ErrorCode::InvalidArgument), (rid, false));
    group_err(
        &mut alice,
        "",
        Op::Create(CreateGroup::default()),
        ErrorCode::InvalidArgument,
    );
    group_err(
        &mut alice,
        &"x".repeat(65),
        Op::Create(CreateGroup::default()),
        ErrorCode::InvalidArgument,
    );
    group_err(
        &mut alice,
        "g",
        Op::Create(CreateGroup {
            profile: Some(Box::new(GroupProfile {
                name: Some("n".repeat(300)),
                ..GroupProfile::default()
            })),
            members: vec![],
        }),
        ErrorCode::InvalidArgument,
    );
    group_err(
        &mut alice,
        "g",
        Op::Create(CreateGroup {
            profile: None,
            members: (0..501).map(|i| format!("u{i}")).collect(),
        }),
        ErrorCode::InvalidArgument,
    );
    // None of the refused creates made the group.
    group_err(&mut alice, "g", Op::Get(GetGroup {}), ErrorCode::NotFound);
    create(&mut alice, "g", &[], JoinPolicy::Free);
    group_err(
        &mut alice,
        "g",
        Op::SetRole(SetRole {
            user_id: "alice".into(),
            role: GroupRole::RoleOwner.into(),
        }),
        ErrorCode::InvalidArgument,
    );
    group_err(
        &mut alice,
        "g",
        Op::SetRole(SetRole {
            user_id: "bob".into(),
            role: GroupRole::RoleAdmin.into(),
        }),
        ErrorCode::NotMember,
    );
    group_err(
        &mut alice,
        "g",
        Op::Kick(KickMembers {
            user_ids: users(&["alice"]),
            reason: String::new(),
        }),
        ErrorCode::InvalidArgument,
    );
    group_err(
        &mut alice,
        "g",
        Op::Invite(InviteMembers { user_ids: vec![] }),
        ErrorCode::InvalidArgument,
    );
    // Inviting only members already in changes nothing and appends no event.
    let r = group_ok(&mut alice, "g", invite(&["alice"]));
    assert_eq!(r.event_seq, 0);
    assert_eq!(info(&mut alice, "g").latest_seq, 1);
}

/// A join request goes to the owner and the admins, not to the group: members see neither
/// the request nor a decline, and neither takes a seq of the group's log.
#[test]
fn approval_groups_take_join_requests_that_admins_review() {
    let mut gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice");
    let mut bob = login(&gw, "bob");
    let mut carol = login(&gw, "carol");
    let mut erin = login(&gw, "erin");
    let mut frank = login(&gw, "frank");
    create(&mut alice, "club", &["bob", "frank"], JoinPolicy::Approval);
    group_ok(&mut alice, "club", set_role("bob", GroupRole::RoleAdmin));
    for c in [&mut bob, &mut frank] {
        expect_event(c, GroupEventKind::GroupCreated);
        expect_event(c, GroupEventKind::GroupRoleChanged);
    }

    let join = |message: &str| {
        Op::Join(JoinGroup {
            message: message.into(),
        })
    };
    let request = |user: &str, message: &str| {
        Body::SocialEvent(SocialEvent {
            kind: SocialEventKind::JoinRequested.into(),
            user_id: user.into(),
            message: message.into(),
            group_id: "club".into(),
        })
    };
    let r = group_ok(&mut carol, "club", join("let me in"));
    assert!(r.pending);
    assert_eq!(r.event_seq, 0, "nothing in the group's log");
    for admin in [&mut alice, &mut bob] {
        assert_eq!(admin.pushed(), request("carol", "let me in"));
    }
    group_err(&mut carol, "club", join("again"), ErrorCode::Conflict);
    // Not a member yet.
    send_group_err(&mut carol, "club", "c0", ErrorCode::NotMember);
    group_ok(&mut erin, "club", join(""));
    for admin in [&mut alice, &mut bob] {
        assert_eq!(admin.pushed(), request("erin", ""));
    }
    // A member who is not an admin heard of neither, and the log did not move.
    frank.nothing_pending();
    assert_eq!(info(&mut frank, "club").latest_seq, 2);
    // The applicant sees that the request waits; others do not see theirs.
    assert!(group_ok(&mut erin, "club", Op::Get(GetGroup {})).pending);
    let mut dave = login(&gw, "dave");
    assert!(!group_ok(&mut dave, "club", Op::Get(GetGroup {})).pending);
    let list = Op::ListJoinRequests(ListJoinRequests {});
    group_err(&mut frank, "club", list.clone(), ErrorCode::Forbidden);
    for admin in [&mut alice, &mut bob] {
        let pending: Vec<(String, String)> = group_ok(admin, "club", list.clone())
            .join_requests
            .into_iter()
            .map(|j| (j.user_id, j.message))
            .collect();
        assert_eq!(
            pending,
            vec![
                ("carol".to_string(), "let me in".to_string()),
                ("erin".to_string(), String::new())
            ]
        );
    }
    let review = |user: &str, approve| {
        Op::ReviewJoin(ReviewJoin {
            user_id: user.into(),
            approve,
        })
    };
    group_err(
        &mut frank,
        "club",
        review("carol", true),
        ErrorCode::Forbidden,
    );
    assert_eq!(
        group_ok(&mut alice, "club", review("carol", true)).event_seq,
        3
    );
    // Carol is in before the event: she hears her own admission, and is told of the decision.
    let decision = |kind: SocialEventKind| {
        Body::SocialEvent(SocialEvent {
            kind: kind.into(),
            user_id: "alice".into(),
            message: String::new(),
            group_id: "club".into(),
        })
    };
    let joined = expect_event(&mut bob, GroupEventKind::GroupJoined);
    assert_eq!(
        expect_event(&mut frank, GroupEventKind::GroupJoined),
        joined
    );
    let (d, e) = expect_event(&mut carol, GroupEventKind::GroupJoined);
    assert_eq!(
        (d.seq, d.sender.as_str(), &e),
        (joined.0.seq, "alice", &joined.1)
    );
    // Then the decision, once she is a member.
    assert_eq!(carol.pushed(), decision(SocialEventKind::JoinApproved));
    assert_eq!(
        (joined.0.sender.as_str(), joined.1.user_ids),
        ("alice", users(&["carol"]))
    );
    // A decline reaches the applicant only.
    let r = group_ok(&mut alice, "club", review("erin", false));
    assert_eq!(r.event_seq, 0);
    assert_eq!(erin.pushed(), decision(SocialEventKind::JoinDeclined));
    erin.nothing_pending();
    for c in [&mut bob, &mut carol, &mut frank] {
        c.nothing_pending();
    }
    assert!(!group_ok(&mut erin, "club", Op::Get(GetGroup {})).pending);
    group_err(
        &mut alice,
        "club",
        review("erin", true),
        ErrorCode::NotFound,
    );
    assert!(
        group_ok(&mut bob, "club", list.clone())
            .join_requests
            .is_empty()
    );
    assert_eq!(send_group_acked(&mut carol, "club", "c1", "thanks"), 4);
    assert_eq!(info(&mut carol, "club").member_count, 4);

    // A request is stored: it outlives a restart.
    let mut gina = login(&gw, "gina");
    group_ok(&mut gina, "club", join("still there?"));
    assert_eq!(expect_deliver(&mut alice).client_msg_id, "c1");
    assert_eq!(alice.pushed(), request("gina", "still there?"));
    drop((alice, bob, carol, dave, erin, frank, gina));
    gw.restart();
    let mut bob = login(&gw, "bob");
    let listed = group_ok(&mut bob, "club", list.clone()).join_requests;
    assert_eq!(
        listed
            .iter()
            .map(|j| (j.user_id.as_str(), j.message.as_str()))
            .collect::<Vec<_>>(),
        [("gina", "still there?")]
    );
    assert_eq!(info(&mut bob, "club").latest_seq, 4);
    // Once the group takes anyone, joining settles the request: it leaves the list, and cannot
    // be approved into a second membership.
    group_ok(
        &mut bob,
        "club",
        Op::Update(UpdateGroup {
            profile: Some(Box::new(GroupProfile {
                join_policy: Some(JoinPolicy::Free.into()),
                ..GroupProfile::default()
            })),
        }),
    );
    let mut gina = login(&gw, "gina");
    assert_eq!(group_ok(&mut gina, "club", join("")).event_seq, 6);
    assert_eq!(expect_event(&mut bob, GroupEventKind::GroupJoined).0.seq, 6);
    assert!(group_ok(&mut bob, "club", list).join_requests.is_empty());
    group_err(&mut bob, "club", review("gina", true), ErrorCode::NotFound);
    assert_eq!(info(&mut gina, "club").member_count, 5);
}

fn kick(users: &[&str]) -> Op {
    Op::Kick(KickMembers {
        user_ids: self::users(users),
        reason: String::new(),
    })
}

fn mute(user: &str, duration_ms: u64) -> Op {
    Op::Mute(MuteMember {
        user_id: user.into(),
        duration_ms,
    })
}

fn invite(users: &[&str]) -> Op {
    Op::Invite(InviteMembers {
        user_ids: self::users(users),
    })
}

/// An update of the group's notice only.
fn notice(text: &str) -> Op {
    Op::Update(UpdateGroup {
        profile: Some(Box::new(GroupProfile {
            notice: Some(text.into()),
            ..GroupProfile::default()
        })),
    })
}

fn set_role(user: &str, role: GroupRole) -> Op {
    Op::SetRole(SetRole {
        user_id: user.into(),
        role: role.into(),
    })
}

/// The refusals of roles and limits the other tests do not reach: each gets its code, and
/// none of them stores anything (the group's latest seq tells).
#[test]
fn role_and_limit_refusals_get_their_codes_and_store_nothing() {
    let gw = Gateway::start(&["--set", "group_max_members=4"]);
    let mut alice = login(&gw, "alice");
    let mut bob = login(&gw, "bob");
    let mut dave = login(&gw, "dave");
    let mut erin = login(&gw, "erin");
    // Five members with the owner: over the limit of four.
    group_err(
        &mut alice,
        "big",
        Op::Create(CreateGroup {
            profile: None,
            members: users(&["bob", "carol", "dave", "erin"]),
        }),
        ErrorCode::LimitExceeded,
    );
    group_err(&mut alice, "big", Op::Get(GetGroup {}), ErrorCode::NotFound);

    // Alice owns "g"; bob and carol are admins, dave a member: the group is full.
    create(&mut alice, "g", &["bob", "carol", "dave"], JoinPolicy::Free);
    for admin in ["bob", "carol"] {
        group_ok(&mut alice, "g", set_role(admin, GroupRole::RoleAdmin));
    }
    let latest = info(&mut alice, "g").latest_seq;
    assert_eq!(latest, 3);
    for c in [&mut bob, &mut dave] {
        expect_event(c, GroupEventKind::GroupCreated);
        expect_event(c, GroupEventKind::GroupRoleChanged);
        expect_event(c, GroupEventKind::GroupRoleChanged);
    }
    let join = Op::Join(JoinGroup {
        message: String::new(),
    });
    group_err(&mut erin, "g", join.clone(), ErrorCode::LimitExceeded);
    // An admin may touch neither another admin nor the owner's role.
    group_err(&mut bob, "g", kick(&["carol"]), ErrorCode::Forbidden);
    group_err(&mut bob, "g", mute("carol", 60_000), ErrorCode::Forbidden);
    group_err(&mut alice, "g", kick(&[]), ErrorCode::InvalidArgument);
    // The owner cannot step down by a role change (TransferOwner does that).
    group_err(
        &mut alice,
        "g",
        set_role("alice", GroupRole::RoleMember),
        ErrorCode::InvalidArgument,
    );
    // A plain member may not mute everyone, change the profile or hand the group over.
    group_err(
        &mut dave,
        "g",
        Op::MuteAll(MuteAll { muted: true }),
        ErrorCode::Forbidden,
    );
    let named = |name: &str| GroupProfile {
        name: Some(name.into()),
        ..GroupProfile::default()
    };
    group_err(
        &mut dave,
        "g",
        Op::Update(UpdateGroup {
            profile: Some(Box::new(named("mine"))),
        }),
        ErrorCode::Forbidden,
    );
    group_err(
        &mut dave,
        "g",
        Op::Transfer(TransferOwner {
            user_id: "dave".into(),
        }),
        ErrorCode::Forbidden,
    );
    // User ids that are not ids.
    for bad in ["", "line\nbreak", &"x".repeat(65)] {
        group_err(&mut alice, "g", invite(&[bad]), ErrorCode::InvalidArgument);
        group_err(&mut alice, "g", kick(&[bad]), ErrorCode::InvalidArgument);
    }
    assert_eq!(info(&mut alice, "g").latest_seq, latest, "nothing stored");

    // An approval group: a join message over 256 bytes is refused; approving a request into
    // a full group is too, and the request stays pending.
    create(&mut alice, "club", &["bob"], JoinPolicy::Approval);
    group_err(
        &mut dave,
        "club",
        Op::Join(JoinGroup {
            message: "m".repeat(257),
        }),
        ErrorCode::InvalidArgument,
    );
    expect_event(&mut bob, GroupEventKind::GroupCreated);
    for c in [&mut dave, &mut erin] {
        group_ok(c, "club", join.clone());
        assert!(matches!(alice.pushed(), Body::SocialEvent(_)));
    }
    let review = |user: &str| {
        Op::ReviewJoin(ReviewJoin {
            user_id: user.into(),
            approve: true,
        })
    };
    group_ok(&mut alice, "club", review("dave"));
    group_ok(&mut alice, "club", invite(&["carol"]));
    group_err(&mut alice, "club", review("erin"), ErrorCode::LimitExceeded);
    let pending = group_ok(
        &mut alice,
        "club",
        Op::ListJoinRequests(ListJoinRequests {}),
    );
    assert_eq!(
        pending
            .join_requests
            .iter()
            .map(|r| r.user_id.as_str())
            .collect::<Vec<_>>(),
        ["erin"]
    );
}

/// Custom profile fields over the wire: set, merged, removed by an empty value, read back by
/// every member and carried by the change event; the limits are refused with nothing stored.
#[test]
fn custom_profile_fields_are_merged_read_back_and_bounded() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice");
    let mut bob = login(&gw, "bob");
    create(&mut alice, "g", &["bob"], JoinPolicy::Free);
    expect_event(&mut bob, GroupEventKind::GroupCreated);
    let update = |custom: &[(&str, &str)]| {
        Op::Update(UpdateGroup {
            profile: Some(Box::new(GroupProfile {
                custom: custom
                    .iter()
                    .map(|&(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..GroupProfile::default()
            })),
        })
    };
    let custom = |c: &mut Conn| {
        let p = info(c, "g").profile.expect("profile");
        let mut fields: Vec<(String, String)> = p.custom.into_iter().collect();
        fields.sort();
        fields
    };
    let pairs = |v: &[(&str, &str)]| {
        v.iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };
    group_ok(
        &mut alice,
        "g",
        update(&[("topic", "rust"), ("level", "1")]),
    );
    let (_, e) = expect_event(&mut bob, GroupEventKind::GroupProfileChanged);
    assert_eq!(
        e.profile.unwrap().custom.get("topic").map(String::as_str),
        Some("rust")
    );
    // Merged: a new key added, one replaced, one removed by its empty value.
    group_ok(
        &mut alice,
        "g",
        update(&[("level", "2"), ("lang", "en"), ("topic", "")]),
    );
    expect_event(&mut bob, GroupEventKind::GroupProfileChanged);
    assert_eq!(custom(&mut bob), pairs(&[("lang", "en"), ("level", "2")]));
    // The profile's name and policy were left alone.
    assert_eq!(
        info(&mut bob, "g").profile.unwrap().name.as_deref(),
        Some("g name")
    );

    let latest = info(&mut alice, "g").latest_seq;
    let many: Vec<(String, String)> = (0..21).map(|i| (format!("k{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let long_key = "k".repeat(65);
    let long_value = "v".repeat(1025);
    for bad in [
        update(&many),
        update(&[("", "v")]),
        update(&[(&long_key, "v")]),
        update(&[("k", &long_value)]),
        // 2 stored plus 19 new: over 20 once merged.
        update(&many[..19]),
        Op::Update(UpdateGroup {
            profile: Some(Box::new(GroupProfile {
                join_policy: Some(99),
                ..GroupProfile::default()
            })),
        }),
    ] {
        group_err(&mut alice, "g", bad, ErrorCode::InvalidArgument);
    }
    // At the limit exactly: accepted.
    group_ok(&mut alice, "g", update(&many[..18]));
    expect_event(&mut bob, GroupEventKind::GroupProfileChanged);
    assert_eq!(custom(&mut alice).len(), 20);
    assert_eq!(info(&mut alice, "g").latest_seq, latest + 1);
    bob.nothing_pending();
}

/// A timed mute ends by itself: refused before its end (the event says when), accepted after,
/// with no unmute event.
#[test]
fn a_timed_mute_ends_by_itself() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice");
    let mut bob = login(&gw, "bob");
    create(&mut alice, "g", &["bob"], JoinPolicy::Free);
    expect_event(&mut bob, GroupEventKind::GroupCreated);
    group_ok(&mut alice, "g", mute("bob", 1500));
    let (_, e) = expect_event(&mut bob, GroupEventKind::GroupMuted);
    send_group_err(&mut bob, "g", "early", ErrorCode::Muted);
    // Waits out the mute on the clock the server also reads (same machine).
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    while now() <= e.muted_until_ms {
        std::thread::sleep(std::time::Duration::from_millis(
            e.muted_until_ms + 1 - now().min(e.muted_until_ms),
        ));
    }
    let rid = send_group(&mut bob, "g", "late", "free again");
    let ack = tern_tests::expect_ack(&mut bob, rid);
    assert!(ack.server_time_ms > e.muted_until_ms);
    assert_eq!(ack.seq, 3, "created, muted, this message: no unmute event");
    let d = expect_deliver(&mut alice);
    assert_eq!((d.seq, text(&d)), (3, "free again"));
}

/// A member who synced, went offline and comes back with the version of that sync gets only
/// what followed, events and messages, in order, after the cursor its device acknowledged.
#[test]
fn a_member_back_from_offline_syncs_from_its_version() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice");
    let conv = create(&mut alice, "team", &["bob"], JoinPolicy::Free).conversation_id;
    send_group_acked(&mut alice, "team", "1", "one");

    // Bob's phone syncs, acknowledges what it got and goes away.
    let (mut bob, (_, msgs, _)) = gw.login_synced(Via::Tcp, "bob", "phone", 0);
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
    bob.send_body(Body::Ack(tern_protocol::Ack {
        conversation_id: conv,
        seq: 2,
    }));
    // A sync after the Ack stores the cursor first; its version is where bob stands.
    let rid = bob.send_body(Body::Sync(SyncRequest::default()));
    let (_, _, version) = collect_sync(&mut bob, rid);
    drop(bob);

    // Meanwhile: carol joins, a message, a profile change, carol is kicked, a message.
    group_ok(&mut alice, "team", invite(&["carol"]));
    send_group_acked(&mut alice, "team", "2", "two");
    group_ok(&mut alice, "team", notice("welcome"));
    group_ok(&mut alice, "team", kick(&["carol"]));
    send_group_acked(&mut alice, "team", "3", "three");

    let (mut bob, (convs, msgs, later)) = gw.login_synced(Via::Tcp, "bob", "phone", version);
    assert_eq!(convs.len(), 1);
    assert_eq!(
        (
            convs[0].conversation_id,
            convs[0].latest_seq,
            convs[0].delivered_seq,
            convs[0].left
        ),
        (conv, 7, 2, false)
    );
    assert_eq!(
        msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [3, 4, 5, 6, 7]
    );
    let kinds: Vec<Option<i32>> = msgs
        .iter()
        .map(|m| (m.content_type == ContentType::System as u32).then(|| event(m).kind))
        .collect();
    assert_eq!(
        kinds,
        [
            Some(GroupEventKind::GroupInvited as i32),
            None,
            Some(GroupEventKind::GroupProfileChanged as i32),
            Some(GroupEventKind::GroupKicked as i32),
            None,
        ]
    );
    assert_eq!((text(&msgs[1]), text(&msgs[4])), ("two", "three"));
    assert_eq!(event(&msgs[3]).user_ids, users(&["carol"]));
    assert!(later > version);
    // Live from here on.
    send_group_acked(&mut alice, "team", "4", "four");
    assert_eq!(expect_deliver(&mut bob).seq, 8);
}

#[test]
fn non_members_see_only_the_public_face_of_groups_they_may_ask_to_join() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice");
    let mut outsider = login(&gw, "outsider");
    let profile = GroupProfile {
        name: Some("open name".into()),
        notice: Some("members only".into()),
        introduction: Some("we talk".into()),
        avatar_url: Some("https://example.com/a.png".into()),
        join_policy: Some(JoinPolicy::Approval.into()),
        custom: [("k".to_string(), "v".to_string())].into(),
    };
    group_ok(
        &mut alice,
        "open",
        Op::Create(CreateGroup {
            profile: Some(Box::new(profile.clone())),
            members: vec![],
        }),
    );
    create(&mut alice, "closed", &[], JoinPolicy::InviteOnly);
    assert_eq!(send_group_acked(&mut alice, "open", "a1", "hi"), 2);
    group_ok(&mut alice, "open", Op::MuteAll(MuteAll { muted: true }));
    let full = info(&mut alice, "open");
    assert_eq!(
        (full.profile.as_ref(), full.latest_seq, full.muted_all),
        (Some(&profile), 3, true)
    );
    assert_eq!(
        info(&mut outsider, "open"),
        GroupInfo {
            profile: Some(GroupProfile {
                name: profile.name,
                introduction: profile.introduction,
                avatar_url: profile.avatar_url,
                join_policy: profile.join_policy,
                ..GroupProfile::default()
            }),
            latest_seq: 0,
            muted_all: false,
            ..full
        }
    );
    group_err(
        &mut outsider,
        "closed",
        Op::Get(GetGroup {}),
        ErrorCode::NotMember,
    );
    group_err(
        &mut outsider,
        "open",
        Op::ListMembers(ListMembers::default()),
        ErrorCode::NotMember,
    );
    outsider.nothing_pending();
}

/// The seqs of a history page of `conv` read by `c` (newest first), and its `has_more`.
fn history_seqs(c: &mut Conn, conv: u64) -> (Vec<u64>, bool) {
    history_page(c, conv, 0)
}

/// [`history_seqs`] with a page of at most `limit` messages (0: the server's default).
fn history_page(c: &mut Conn, conv: u64, limit: u32) -> (Vec<u64>, bool) {
    let rid = c.send_body(Body::History(HistoryRequest {
        conversation_id: conv,
        limit,
        ..HistoryRequest::default()
    }));
    match c.recv_frame() {
        Frame {
            request_id,
            body: Some(Body::HistoryPage(p)),
        } if request_id == rid => (p.messages.iter().map(|m| m.seq).collect(), p.has_more),
        other => panic!("expected HistoryPage for {rid}, got {other:?}"),
    }
}

/// A new member's sync, unread count and history start at the event that added them, and a
/// member added again at the return; with `new_members_see_history = true` the whole log is
/// theirs. Members from the creation read it all either way.
#[test]
fn a_new_member_reads_the_group_from_the_event_that_added_them() {
    for see_history in [false, true] {
        let setting = format!("new_members_see_history={see_history}");
        let gw = Gateway::start(&["--cores", "2", "--set", &setting]);
        let mut alice = login(&gw, "alice");
        let conv = create(&mut alice, "team", &["bob"], JoinPolicy::Free).conversation_id;
        send_group_acked(&mut alice, "team", "1", "one");
        send_group_acked(&mut alice, "team", "2", "two");
        let invited = group_ok(&mut alice, "team", invite(&["carol"])).event_seq;
        assert_eq!(invited, 4);
        send_group_acked(&mut alice, "team", "3", "three");

        // Carol was offline when she was added.
        let (mut carol, (convs, msgs, _)) = gw.login_synced(Via::Tcp, "carol", "phone", 0);
        let first = if see_history { 1 } else { invited };
        let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (first..=5).collect::<Vec<_>>(), "{setting}");
        assert_eq!(
            (
                convs[0].latest_seq,
                convs[0].delivered_seq,
                convs[0].read_seq,
                convs[0].unread
            ),
            (5, first - 1, invited, 1),
            "{setting}"
        );
        assert_eq!(event(&msgs[0]).kind, {
            if see_history {
                GroupEventKind::GroupCreated as i32
            } else {
                GroupEventKind::GroupInvited as i32
            }
        });
        let all_after = |from: u64, to: u64| (from..=to).rev().collect::<Vec<_>>();
        assert_eq!(history_seqs(&mut carol, conv), (all_after(first, 5), false));
        // A page that ends at the event that added her has nothing more.
        assert_eq!(history_page(&mut carol, conv, 2), (vec![5, 4], see_history));
        // Her read position starts at that event: she has not read what came before it.
        let rid = alice.send_body(Body::GetReadCounts(tern_protocol::GetReadCounts {
            conversation_id: conv,
            seqs: vec![2, 5],
        }));
        match alice.answer(rid) {
            Body::ReadCounts(r) => {
                assert_eq!((r.counts, r.members), (vec![u32::from(see_history), 0], 3));
            }
            other => panic!("expected ReadCounts, got {other:?}"),
        }
        drop(carol);

        // Kicked, then added again: from the return on.
        group_ok(&mut alice, "team", kick(&["carol"]));
        send_group_acked(&mut alice, "team", "4", "four");
        let back = group_ok(&mut alice, "team", invite(&["carol"])).event_seq;
        assert_eq!(back, 8);
        send_group_acked(&mut alice, "team", "5", "five");
        let first = if see_history { 1 } else { back };
        let (mut tablet, (_, msgs, _)) = gw.login_synced(Via::Tcp, "carol", "tablet", 0);
        let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (first..=9).collect::<Vec<_>>(), "{setting}");
        assert_eq!(
            history_seqs(&mut tablet, conv),
            (all_after(first, 9), false)
        );

        // Bob was there from the start.
        let (mut bob, (_, msgs, _)) = gw.login_synced(Via::Tcp, "bob", "phone", 0);
        assert_eq!(msgs.len(), 9);
        assert_eq!(history_seqs(&mut bob, conv), (all_after(1, 9), false));
    }
}
