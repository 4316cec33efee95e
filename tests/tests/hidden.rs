//! Hidden group members end to end: a real two-core gateway, real sockets and real HTTP. The
//! admin API adds and removes them; they receive everything live and through sync, may send, and
//! no member (themselves included) sees them in a member list, a member count, a read count or
//! an event.

use prost::Message;
use serde_json::{Value, json};
use tern_protocol::v1::frame::Body;
use tern_protocol::v1::group_request::Op;
use tern_protocol::v1::{
    CreateGroup, GetGroup, InviteMembers, JoinGroup, KickMembers, LeaveGroup, ListMembers,
    MuteMember, SetRole, TransferOwner,
};
use tern_protocol::{
    ContentType, Deliver, ErrorCode, Frame, GROUP_EVENT_TYPE, GetReadCounts, GroupEvent,
    GroupEventKind, GroupInfo, GroupProfile, GroupRequest, GroupResponse, GroupRole,
    HistoryRequest, JoinPolicy, MarkRead, ReadCounts, ReadState, Target,
};
use tern_tests::{
    Conn, Gateway, NO_RATE_LIMITS, Via, expect_deliver, send_group, send_group_acked, text,
};

fn login(gw: &Gateway, user: &str, device: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), device).0
}

fn group_ok(c: &mut Conn, group: &str, op: Op) -> GroupResponse {
    let rid = c.send_body(Body::Group(GroupRequest {
        group_id: group.into(),
        op: Some(op),
    }));
    match c.recv_frame() {
        Frame {
            request_id,
            body: Some(Body::GroupResponse(r)),
        } if request_id == rid => r,
        other => panic!("expected GroupResponse for {rid}, got {other:?}"),
    }
}

fn group_err(c: &mut Conn, group: &str, op: Op, code: ErrorCode) {
    let rid = c.send_body(Body::Group(GroupRequest {
        group_id: group.into(),
        op: Some(op),
    }));
    assert_eq!(c.expect_error(code), (rid, false));
}

fn create(c: &mut Conn, group: &str, members: &[&str]) -> GroupResponse {
    group_ok(
        c,
        group,
        Op::Create(CreateGroup {
            profile: Some(Box::new(GroupProfile {
                join_policy: Some(JoinPolicy::Free.into()),
                ..GroupProfile::default()
            })),
            members: users(members),
        }),
    )
}

fn users(list: &[&str]) -> Vec<String> {
    list.iter().map(|u| u.to_string()).collect()
}

fn event(d: &Deliver) -> GroupEvent {
    assert_eq!(d.content_type, ContentType::System as u32, "{d:?}");
    assert_eq!(d.custom_type, GROUP_EVENT_TYPE);
    GroupEvent::decode(d.payload.clone()).expect("group event payload")
}

/// The event of a hidden member's change, exactly: sent by the system user, naming nobody.
fn assert_hidden_event(d: &Deliver, conv: u64, seq: u64) {
    assert_eq!(
        (d.conversation_id, d.seq, d.sender.as_str()),
        (conv, seq, "administrator"),
        "{d:?}"
    );
    assert_eq!(
        event(d),
        GroupEvent {
            kind: GroupEventKind::GroupHiddenMembersChanged.into(),
            actor: "administrator".into(),
            ..GroupEvent::default()
        }
    );
}

fn info(c: &mut Conn, group: &str) -> GroupInfo {
    *group_ok(c, group, Op::Get(GetGroup {})).info.expect("info")
}

/// Every member listed to `c`, as (name, role), one page of 100.
fn members(c: &mut Conn, group: &str) -> Vec<(String, GroupRole)> {
    let page = group_ok(
        c,
        group,
        Op::ListMembers(ListMembers {
            page_token: 0,
            limit: 100,
        }),
    )
    .members
    .expect("page");
    assert_eq!(page.next_page_token, 0);
    page.members
        .into_iter()
        .map(|m| (m.user_id, GroupRole::try_from(m.role).unwrap()))
        .collect()
}

fn listed(list: &[(&str, GroupRole)]) -> Vec<(String, GroupRole)> {
    list.iter().map(|(u, r)| (u.to_string(), *r)).collect()
}

fn assert_error(got: &(u16, Value), status: u16, code: ErrorCode) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["error"]["code"], json!(code as i32), "{got:?}");
    assert_eq!(got.1["error"]["name"], json!(code.as_str_name()), "{got:?}");
}

fn ok(got: (u16, Value)) -> Value {
    assert_eq!(got.0, 200, "{got:?}");
    got.1
}

fn add_hidden(gw: &Gateway, group: &str, user: &str) -> (u16, Value) {
    gw.api_call(
        "POST",
        &format!("/v1/groups/{group}/hidden-members"),
        Some(&json!({ "user": user })),
    )
}

fn remove_hidden(gw: &Gateway, group: &str, user: &str) -> (u16, Value) {
    gw.api_call(
        "DELETE",
        &format!("/v1/groups/{group}/hidden-members/{user}"),
        None,
    )
}

/// The hidden members the API lists.
fn hidden_list(gw: &Gateway, group: &str) -> Vec<String> {
    let got = ok(gw.api_call("GET", &format!("/v1/groups/{group}/hidden-members"), None));
    assert_eq!(got["group_id"], json!(group));
    got["hidden_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m["joined_at_ms"].as_u64().unwrap() > 0, "{m}");
            m["user"].as_str().unwrap().to_string()
        })
        .collect()
}

fn history_seqs(c: &mut Conn, group: &str) -> Vec<u64> {
    let rid = c.send_body(Body::History(HistoryRequest {
        target: Some(Target::group(group)),
        ..HistoryRequest::default()
    }));
    match c.answer(rid) {
        Body::HistoryPage(p) => {
            assert!(!p.has_more);
            p.messages.iter().map(|m| m.seq).collect()
        }
        other => panic!("expected HistoryPage, got {other:?}"),
    }
}

/// A fresh device of `user` that syncs from zero at login: (conversation states, messages).
fn fresh_sync(
    gw: &Gateway,
    user: &str,
    device: &str,
) -> (Vec<tern_protocol::ConversationState>, Vec<Deliver>) {
    let (_, (convs, msgs, _)) = gw.login_synced(Via::Tcp, user, device, 0);
    (convs, msgs)
}

#[test]
fn a_hidden_member_gets_everything_sends_and_is_listed_to_nobody() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let mut agent = login(&gw, "agent", "phone");
    let created = create(&mut alice, "support", &["bob"]);
    let conv = created.conversation_id;
    assert_eq!(
        event(&expect_deliver(&mut bob)).kind,
        GroupEventKind::GroupCreated as i32
    );

    // The API adds the agent: one event, which names nobody, to everyone, the agent included
    // (indexed before the event, like a joining member).
    let got = ok(add_hidden(&gw, "support", "agent"));
    assert_eq!(
        got,
        json!({"group_id": "support", "user": "agent", "added": true,
               "conversation_id": conv.to_string(), "event_seq": 2})
    );
    for c in [&mut alice, &mut bob, &mut agent] {
        let d = expect_deliver(c);
        assert_hidden_event(&d, conv, 2);
        assert!(!d.payload.windows(5).any(|w| w == b"agent"));
    }
    // Adding again changes nothing and appends nothing.
    assert_eq!(
        ok(add_hidden(&gw, "support", "agent")),
        json!({"group_id": "support", "user": "agent", "added": false,
               "conversation_id": conv.to_string(), "event_seq": 0})
    );
    assert_eq!(hidden_list(&gw, "support"), ["agent"]);

    // Nobody sees the agent in the member list or the count: not the members, not the agent,
    // not the admin's GroupRequest.
    let visible = listed(&[
        ("alice", GroupRole::RoleOwner),
        ("bob", GroupRole::RoleMember),
    ]);
    for c in [&mut alice, &mut bob, &mut agent] {
        assert_eq!(members(c, "support"), visible);
        let gi = info(c, "support");
        assert_eq!((gi.member_count, gi.latest_seq), (2, 2));
    }
    let got = ok(gw.api_call(
        "POST",
        "/v1/groups",
        Some(&json!({"groupId": "support", "listMembers": {}})),
    ));
    let names: Vec<&str> = got["groupResponse"]["members"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    let got = ok(gw.api_call(
        "POST",
        "/v1/groups",
        Some(&json!({"groupId": "support", "get": {}})),
    ));
    assert_eq!(got["groupResponse"]["info"]["memberCount"], json!(2));

    // A member's message reaches the agent live; the agent's reaches the members, as the agent.
    assert_eq!(
        send_group_acked(&mut bob, "support", "b1", "my ride is late"),
        3
    );
    for c in [&mut alice, &mut agent] {
        let d = expect_deliver(c);
        assert_eq!(
            (d.conversation_id, d.seq, d.sender.as_str(), text(&d)),
            (conv, 3, "bob", "my ride is late")
        );
        assert_eq!(d.target, Some(Target::group("support")));
    }
    assert_eq!(
        send_group_acked(&mut agent, "support", "a1", "the driver is 2 minutes away"),
        4
    );
    for c in [&mut alice, &mut bob] {
        let d = expect_deliver(c);
        assert_eq!(
            (d.seq, d.sender.as_str(), text(&d)),
            (4, "agent", "the driver is 2 minutes away")
        );
    }

    // The agent marks read; read counts neither count the agent as a member nor as a reader.
    let rid = agent.send_body(Body::MarkRead(MarkRead {
        conversation_id: conv,
        seq: 4,
    }));
    assert_eq!(
        agent.answer(rid),
        Body::ReadState(ReadState {
            conversation_id: conv,
            read_seq: 4
        })
    );
    let rid = alice.send_body(Body::MarkRead(MarkRead {
        conversation_id: conv,
        seq: 3,
    }));
    assert!(matches!(alice.answer(rid), Body::ReadState(_)));
    for c in [&mut bob, &mut agent] {
        let rid = c.send_body(Body::GetReadCounts(GetReadCounts {
            conversation_id: conv,
            seqs: vec![3, 4],
        }));
        assert_eq!(
            c.answer(rid),
            Body::ReadCounts(ReadCounts {
                conversation_id: conv,
                counts: vec![1, 0],
                members: 2,
            })
        );
    }

    // A fresh device of the agent syncs the whole log from zero: contiguous, in order, the
    // event that added the agent included.
    let (convs, msgs) = fresh_sync(&gw, "agent", "laptop");
    assert_eq!(convs.len(), 1);
    assert_eq!(
        (
            convs[0].conversation_id,
            convs[0].latest_seq,
            convs[0].left,
            convs[0].read_seq
        ),
        (conv, 4, false, 4)
    );
    assert_eq!(convs[0].target, Some(Target::group("support")));
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(event(&msgs[0]).kind, GroupEventKind::GroupCreated as i32);
    assert_hidden_event(&msgs[1], conv, 2);
    assert_eq!(
        (msgs[2].sender.as_str(), text(&msgs[2])),
        ("bob", "my ride is late")
    );
    assert_eq!(
        (msgs[3].sender.as_str(), text(&msgs[3])),
        ("agent", "the driver is 2 minutes away")
    );
    assert_eq!(history_seqs(&mut agent, "support"), [4, 3, 2, 1]);

    for c in [&mut alice, &mut bob, &mut agent] {
        c.nothing_pending();
    }
}

#[test]
fn clients_cannot_see_kick_promote_or_make_hidden_members() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let mut agent = login(&gw, "agent", "phone");
    let conv = create(&mut alice, "g", &["bob", "carol"]).conversation_id;
    expect_deliver(&mut bob);
    assert_eq!(ok(add_hidden(&gw, "g", "agent"))["event_seq"], json!(2));
    for c in [&mut alice, &mut bob, &mut agent] {
        assert_hidden_event(&expect_deliver(c), conv, 2);
    }

    // To every operation that names a member, the agent is not one: the owner's, and the
    // admin API's GroupRequest too.
    let kick = |list: &[&str]| {
        Op::Kick(KickMembers {
            user_ids: users(list),
            reason: String::new(),
        })
    };
    group_err(&mut alice, "g", kick(&["agent"]), ErrorCode::NotMember);
    for op in [
        Op::SetRole(SetRole {
            user_id: "agent".into(),
            role: GroupRole::RoleAdmin.into(),
        }),
        Op::Mute(MuteMember {
            user_id: "agent".into(),
            duration_ms: 60_000,
        }),
        Op::Transfer(TransferOwner {
            user_id: "agent".into(),
        }),
    ] {
        group_err(&mut alice, "g", op, ErrorCode::NotMember);
    }
    assert_error(
        &gw.api_call(
            "POST",
            "/v1/groups",
            Some(&json!({"groupId": "g", "kick": {"userIds": ["agent"]}})),
        ),
        403,
        ErrorCode::NotMember,
    );
    assert_error(
        &gw.api_call(
            "POST",
            "/v1/groups",
            Some(&json!({"groupId": "g", "setRole": {"userId": "agent", "role": "ROLE_ADMIN"}})),
        ),
        403,
        ErrorCode::NotMember,
    );
    // A kick naming the agent and a member removes the member only, and names only them.
    assert_eq!(
        group_ok(&mut alice, "g", kick(&["agent", "carol"])).event_seq,
        3
    );
    for c in [&mut bob, &mut agent] {
        let d = expect_deliver(c);
        let e = event(&d);
        assert_eq!(
            (d.seq, e.kind, e.user_ids),
            (3, GroupEventKind::GroupKicked as i32, users(&["carol"]))
        );
    }
    // Inviting the agent changes nothing: they are a member already, and stay hidden.
    let r = group_ok(
        &mut bob,
        "g",
        Op::Invite(InviteMembers {
            user_ids: users(&["agent"]),
        }),
    );
    assert_eq!(r.event_seq, 0);
    group_err(
        &mut agent,
        "g",
        Op::Join(JoinGroup::default()),
        ErrorCode::Conflict,
    );
    // The agent has no moderation rights.
    group_err(&mut agent, "g", kick(&["bob"]), ErrorCode::Forbidden);

    // No client request makes anyone hidden: the GroupRequest has no such field (the API's JSON
    // refuses it), and a user a client brings in is a visible member, named in the event.
    assert_error(
        &gw.api_call(
            "POST",
            "/v1/groups?as=alice",
            Some(&json!({"groupId": "g", "invite": {"userIds": ["dave"], "hidden": true}})),
        ),
        400,
        ErrorCode::InvalidArgument,
    );
    assert_eq!(
        group_ok(
            &mut bob,
            "g",
            Op::Invite(InviteMembers {
                user_ids: users(&["dave"]),
            }),
        )
        .event_seq,
        4
    );
    for c in [&mut alice, &mut agent] {
        let e = event(&expect_deliver(c));
        assert_eq!(
            (e.kind, e.user_ids),
            (GroupEventKind::GroupInvited as i32, users(&["dave"]))
        );
    }
    assert_eq!(
        members(&mut alice, "g"),
        listed(&[
            ("alice", GroupRole::RoleOwner),
            ("bob", GroupRole::RoleMember),
            ("dave", GroupRole::RoleMember),
        ])
    );
    assert_eq!(hidden_list(&gw, "g"), ["agent"]);
    // A visible member cannot be made hidden.
    assert_error(&add_hidden(&gw, "g", "dave"), 409, ErrorCode::Conflict);

    // The agent leaves: recorded without naming them, sent by the system user.
    let r = group_ok(&mut agent, "g", Op::Leave(LeaveGroup {}));
    assert_eq!(r.event_seq, 5);
    for c in [&mut alice, &mut bob] {
        assert_hidden_event(&expect_deliver(c), conv, 5);
    }
    assert_eq!(hidden_list(&gw, "g"), Vec::<String>::new());
    assert_eq!(info(&mut alice, "g").member_count, 3);
    for c in [&mut alice, &mut bob, &mut agent] {
        c.nothing_pending();
    }
}

#[test]
fn removal_through_the_api_ends_the_history_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start_in(&dir.path().join("data"), &["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let conv = create(&mut alice, "g", &["bob"]).conversation_id;
    ok(add_hidden(&gw, "g", "agent"));
    assert_hidden_event(&expect_deliver(&mut alice), conv, 2);
    assert_eq!(send_group_acked(&mut alice, "g", "a1", "before restart"), 3);
    drop(alice);

    // The hidden flag is stored with the member.
    gw.restart();
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let mut agent = login(&gw, "agent", "phone");
    assert_eq!(hidden_list(&gw, "g"), ["agent"]);
    assert_eq!(info(&mut agent, "g").member_count, 2);
    assert_eq!(
        members(&mut bob, "g"),
        listed(&[
            ("alice", GroupRole::RoleOwner),
            ("bob", GroupRole::RoleMember)
        ])
    );
    assert_eq!(send_group_acked(&mut bob, "g", "b1", "after restart"), 4);
    for c in [&mut alice, &mut agent] {
        assert_eq!(text(&expect_deliver(c)), "after restart");
    }

    // Removed: the agent gets the removal event and nothing after it.
    assert_eq!(
        ok(remove_hidden(&gw, "g", "agent")),
        json!({"group_id": "g", "user": "agent", "conversation_id": conv.to_string(),
               "event_seq": 5})
    );
    for c in [&mut alice, &mut bob, &mut agent] {
        assert_hidden_event(&expect_deliver(c), conv, 5);
    }
    assert_eq!(
        send_group_acked(&mut alice, "g", "a2", "after the agent"),
        6
    );
    assert_eq!(text(&expect_deliver(&mut bob)), "after the agent");
    let rid = send_group(&mut agent, "g", "x", "still here?");
    assert_eq!(agent.expect_error(ErrorCode::NotMember), (rid, false));
    // Not a member any more: the free group shows the agent its public face only.
    let seen = info(&mut agent, "g");
    assert_eq!((seen.member_count, seen.latest_seq), (2, 0));
    assert_eq!(history_seqs(&mut agent, "g"), [5, 4, 3, 2, 1]);
    let (convs, msgs) = fresh_sync(&gw, "agent", "laptop");
    assert_eq!(convs.len(), 1);
    assert_eq!((convs[0].left, convs[0].latest_seq), (true, 5));
    assert_eq!(
        msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_hidden_event(&msgs[4], conv, 5);
    agent.nothing_pending();

    // Not a hidden member any more; a visible member is not one either.
    assert_error(&remove_hidden(&gw, "g", "agent"), 403, ErrorCode::NotMember);
    assert_error(
        &remove_hidden(&gw, "g", "nobody"),
        403,
        ErrorCode::NotMember,
    );
    assert_error(&remove_hidden(&gw, "g", "bob"), 409, ErrorCode::Conflict);
    assert_eq!(hidden_list(&gw, "g"), Vec::<String>::new());
    // Added again, the agent is back on the live path.
    assert_eq!(ok(add_hidden(&gw, "g", "agent"))["event_seq"], json!(7));
    assert_hidden_event(&expect_deliver(&mut agent), conv, 7);
    for c in [&mut alice, &mut bob] {
        assert_hidden_event(&expect_deliver(c), conv, 7);
    }
    assert_eq!(send_group_acked(&mut bob, "g", "b2", "welcome back"), 8);
    assert_eq!(text(&expect_deliver(&mut agent)), "welcome back");
    assert_eq!(text(&expect_deliver(&mut alice)), "welcome back");
}

#[test]
fn hidden_members_have_their_own_limit_and_bad_input_gets_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("small.toml");
    std::fs::write(
        &cfg,
        format!("{NO_RATE_LIMITS}group_max_members = 2\ngroup_max_hidden_members = 2\n"),
    )
    .unwrap();
    let gw = Gateway::start_in(
        &dir.path().join("data"),
        &["--cores", "2", "--config", cfg.to_str().unwrap()],
    );
    let mut alice = login(&gw, "alice", "phone");
    let conv = create(&mut alice, "g", &["bob"]).conversation_id;
    // The group is full of visible members; hidden ones do not count against that limit ...
    assert_eq!(ok(add_hidden(&gw, "g", "a1"))["event_seq"], json!(2));
    assert_eq!(ok(add_hidden(&gw, "g", "a2"))["event_seq"], json!(3));
    for seq in [2, 3] {
        assert_hidden_event(&expect_deliver(&mut alice), conv, seq);
    }
    // ... but against their own.
    assert_error(&add_hidden(&gw, "g", "a3"), 422, ErrorCode::LimitExceeded);
    // And the visible limit is what members see: 2 of 2.
    let gi = info(&mut alice, "g");
    assert_eq!((gi.member_count, gi.max_members), (2, 2));
    group_err(
        &mut alice,
        "g",
        Op::Invite(InviteMembers {
            user_ids: users(&["carol"]),
        }),
        ErrorCode::LimitExceeded,
    );
    assert_eq!(hidden_list(&gw, "g"), ["a1", "a2"]);

    // The system user has owner rights everywhere already.
    assert_error(
        &add_hidden(&gw, "g", "administrator"),
        400,
        ErrorCode::InvalidArgument,
    );

    // Unknown and dissolved groups.
    assert_error(&add_hidden(&gw, "nope", "x"), 404, ErrorCode::NotFound);
    assert_error(&remove_hidden(&gw, "nope", "x"), 404, ErrorCode::NotFound);
    assert_error(
        &gw.api_call("GET", "/v1/groups/nope/hidden-members", None),
        404,
        ErrorCode::NotFound,
    );
    create(&mut alice, "gone", &[]);
    ok(gw.api_call(
        "POST",
        "/v1/groups",
        Some(&json!({"groupId": "gone", "dissolve": {}})),
    ));
    assert_eq!(
        event(&expect_deliver(&mut alice)).kind,
        GroupEventKind::GroupDissolved as i32
    );
    assert_error(&add_hidden(&gw, "gone", "x"), 404, ErrorCode::NotFound);
    assert_error(
        &gw.api_call("GET", "/v1/groups/gone/hidden-members", None),
        404,
        ErrorCode::NotFound,
    );

    // Bad ids and bodies.
    let long = "x".repeat(65);
    let path = "/v1/groups/g/hidden-members";
    for body in [json!({"user": ""}), json!({"user": long})] {
        assert_error(
            &gw.api_call("POST", path, Some(&body)),
            400,
            ErrorCode::InvalidArgument,
        );
    }
    assert_error(
        &gw.api_call("DELETE", &format!("{path}/{long}"), None),
        400,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &gw.api_call("DELETE", &format!("{path}/a%01b"), None),
        400,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &add_hidden(&gw, &long, "x"),
        400,
        ErrorCode::InvalidArgument,
    );
    for body in [
        json!({}),
        json!({"user": "x", "role": "admin"}),
        json!({"user": 7}),
    ] {
        assert_error(
            &gw.api_call("POST", path, Some(&body)),
            400,
            ErrorCode::InvalidArgument,
        );
    }
    let base = gw.api.clone().unwrap();
    let secret = format!("Bearer {}", gw.api_secret());
    for (body, content_type) in [
        ("{", "application/json"),
        ("", "application/json"),
        ("{\"user\":\"x\"}", "text/plain"),
    ] {
        let got = tern_tests::api_request(
            &format!("{base}{path}"),
            "POST",
            Some(body),
            Some(&secret),
            Some(content_type),
        );
        assert_error(&got, 400, ErrorCode::InvalidArgument);
    }
    // The endpoints act as the system user only: no `as`.
    assert_error(
        &gw.api_call(
            "POST",
            "/v1/groups/g/hidden-members?as=alice",
            Some(&json!({"user": "x"})),
        ),
        400,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &gw.api_call("PUT", path, Some(&json!({"user": "x"}))),
        405,
        ErrorCode::InvalidArgument,
    );

    // Without the admin secret nothing runs.
    for auth in [None, Some("Bearer wrong-secret")] {
        for (method, p, body) in [
            ("POST", path.to_string(), Some(json!({"user": "x"}))),
            ("GET", path.to_string(), None),
            ("DELETE", format!("{path}/a1"), None),
        ] {
            assert_error(
                &gw.api_call_with(method, &p, body.as_ref(), auth),
                401,
                ErrorCode::Unauthenticated,
            );
        }
    }
    // None of the refusals changed anything.
    assert_eq!(hidden_list(&gw, "g"), ["a1", "a2"]);
    assert_eq!(info(&mut alice, "g").latest_seq, 3);
    alice.nothing_pending();
}
