use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

use crate::v1::{frame::Body, *};
use crate::{Codec, CodecError, MAX_FRAME_DEFAULT, decode_frame};

fn deliver(seq: u64) -> Deliver {
    Deliver {
        conversation_id: 42,
        seq,
        sender: "alice".into(),
        target: Some(Target::user("bob")),
        server_time_ms: 1_700_000_000_000 + seq,
        client_msg_id: format!("m{seq}"),
        content_type: ContentType::Text as u32,
        custom_type: String::new(),
        payload: Bytes::from(format!("hello {seq}")),
        recalled: seq == 9,
    }
}

/// Fails to compile when a body variant is added, so `every_body` must be updated with it.
fn variant_index(body: &Body) -> usize {
    match body {
        Body::Hello(_) => 0,
        Body::HelloOk(_) => 1,
        Body::Error(_) => 2,
        Body::Ping(_) => 3,
        Body::Pong(_) => 4,
        Body::Kick(_) => 5,
        Body::Send(_) => 6,
        Body::SendAck(_) => 7,
        Body::Deliver(_) => 8,
        Body::Ack(_) => 9,
        Body::Sync(_) => 10,
        Body::SyncConversations(_) => 11,
        Body::SyncMessages(_) => 12,
        Body::SyncDone(_) => 13,
        Body::SyncNeeded(_) => 14,
        Body::History(_) => 15,
        Body::HistoryPage(_) => 16,
        Body::Group(_) => 17,
        Body::GroupResponse(_) => 18,
        Body::Room(_) => 19,
        Body::RoomResponse(_) => 20,
        Body::MarkRead(_) => 21,
        Body::ReadState(_) => 22,
        Body::ReadReceipt(_) => 23,
        Body::GetReadCounts(_) => 24,
        Body::ReadCounts(_) => 25,
        Body::Typing(_) => 26,
        Body::SubscribePresence(_) => 27,
        Body::PresenceSubscribed(_) => 28,
        Body::Presence(_) => 29,
        Body::SetConversation(_) => 30,
        Body::ConversationSettings(_) => 31,
        Body::Recall(_) => 32,
        Body::RecallOk(_) => 33,
        Body::Social(_) => 34,
        Body::SocialResponse(_) => 35,
        Body::SocialEvent(_) => 36,
        Body::SetDevice(_) => 37,
        Body::DeviceSettings(_) => 38,
        Body::PushNotice(_) => 39,
        Body::PushAck(_) => 40,
        Body::Refresh(_) => 41,
        Body::RefreshOk(_) => 42,
    }
}
const VARIANTS: usize = 43;

fn profile() -> GroupProfile {
    GroupProfile {
        name: Some("Hikers".into()),
        notice: Some("Saturday 8am".into()),
        introduction: Some("".into()),
        avatar_url: None,
        join_policy: Some(JoinPolicy::Approval.into()),
        custom: [("tier".to_string(), "gold".to_string())].into(),
    }
}

/// One frame of every body type, every field set to a non-default value.
fn every_body() -> Vec<Frame> {
    let bodies: Vec<Body> = vec![
        Hello {
            protocol_version: crate::PROTOCOL_VERSION,
            token: "eyJ2IjoxfQ.c2ln".into(),
            device_id: "phone-1".into(),
            platform: Platform::Android.into(),
            client_version: "tern-rs/0.1".into(),
            sync_version: 17,
            sync_on_login: true,
            resume_session_id: 99,
            sync_max_messages_per_conversation: 20,
        }
        .into(),
        HelloOk {
            user_id: "alice".into(),
            device_id: "phone-1".into(),
            session_id: 1234,
            server_time_ms: 1_700_000_000_000,
            user_version: 18,
            max_frame_bytes: 1_048_576,
            max_payload_bytes: 65_536,
            heartbeat_interval_ms: 30_000,
            token_expires_at: 1_700_086_400,
        }
        .into(),
        Error {
            code: ErrorCode::RateLimited.into(),
            message: "slow down".into(),
            fatal: false,
        }
        .into(),
        Ping { client_time_ms: 5 }.into(),
        Pong {
            client_time_ms: 5,
            server_time_ms: 6,
        }
        .into(),
        Kick {
            reason: KickReason::Replaced.into(),
            message: "logged in elsewhere".into(),
        }
        .into(),
        Send {
            client_msg_id: "c-1".into(),
            target: Some(Target::group("g1")),
            content_type: ContentType::Custom as u32,
            custom_type: "poll".into(),
            payload: Bytes::from_static(b"\x00\x01\xffpayload"),
            priority: true,
        }
        .into(),
        SendAck {
            client_msg_id: "c-1".into(),
            conversation_id: 42,
            seq: 7,
            server_time_ms: 1_700_000_000_001,
            duplicate: true,
        }
        .into(),
        deliver(7).into(),
        Ack {
            conversation_id: 42,
            seq: 7,
        }
        .into(),
        SyncRequest {
            since_version: 3,
            page_size: 100,
            max_messages_per_conversation: 20,
        }
        .into(),
        SyncConversations {
            conversations: vec![
                ConversationState {
                    conversation_id: 42,
                    target: Some(Target::user("bob")),
                    latest_seq: 9,
                    read_seq: 5,
                    delivered_seq: 7,
                    version: 18,
                    left: false,
                    peer_read_seq: 6,
                    skipped_to_seq: 1,
                    unread: 4,
                    settings: Some(ConversationSettings {
                        conversation_id: 42,
                        pinned: true,
                        hidden: false,
                        muted: true,
                        cleared_seq: 2,
                    }),
                },
                ConversationState {
                    conversation_id: 43,
                    target: Some(Target::new(TargetKind::Room, "lobby")),
                    latest_seq: 1,
                    read_seq: 0,
                    delivered_seq: 0,
                    version: 12,
                    left: true,
                    settings: None,
                    peer_read_seq: 0,
                    skipped_to_seq: 0,
                    unread: 1,
                },
            ],
        }
        .into(),
        SyncMessages {
            conversation_id: 42,
            messages: vec![deliver(8), deliver(9)],
        }
        .into(),
        SyncDone { user_version: 18 }.into(),
        SyncNeeded { user_version: 19 }.into(),
        HistoryRequest {
            conversation_id: 42,
            target: Some(Target::user("bob")),
            before_seq: 9,
            limit: 50,
        }
        .into(),
        HistoryPage {
            conversation_id: 42,
            messages: vec![deliver(8), deliver(7)],
            has_more: true,
        }
        .into(),
        GroupRequest {
            group_id: "g1".into(),
            op: Some(group_request::Op::Create(CreateGroup {
                profile: Some(Box::new(profile())),
                members: vec!["bob".into(), "carol".into()],
            })),
        }
        .into(),
        GroupResponse {
            group_id: "g1".into(),
            conversation_id: 1 << 63 | 5,
            event_seq: 3,
            info: Some(Box::new(GroupInfo {
                group_id: "g1".into(),
                conversation_id: 1 << 63 | 5,
                owner: "alice".into(),
                profile: Some(profile()),
                muted_all: true,
                member_count: 3,
                max_members: 100_000,
                created_at_ms: 1_700_000_000_000,
                latest_seq: 3,
            })),
            members: Some(MemberPage {
                members: vec![GroupMember {
                    user_id: "bob".into(),
                    role: GroupRole::RoleAdmin.into(),
                    muted_until_ms: 1_700_000_060_000,
                    joined_at_ms: 1_700_000_000_000,
                }],
                next_page_token: 9,
            }),
            join_requests: vec![JoinRequest {
                user_id: "dave".into(),
                message: "let me in".into(),
                requested_at_ms: 1_700_000_000_500,
            }],
            pending: true,
        }
        .into(),
        RoomRequest {
            room_id: "live-1".into(),
            op: Some(room_request::Op::Enter(EnterRoom { recent: 20 })),
        }
        .into(),
        RoomResponse {
            room_id: "live-1".into(),
            conversation_id: 1 << 62 | 77,
            recent: vec![deliver(3), deliver(4)],
        }
        .into(),
        MarkRead {
            conversation_id: 42,
            seq: 7,
        }
        .into(),
        ReadState {
            conversation_id: 42,
            read_seq: 7,
        }
        .into(),
        ReadReceipt {
            conversation_id: 42,
            reader: "bob".into(),
            read_seq: 7,
        }
        .into(),
        GetReadCounts {
            conversation_id: 1 << 63 | 5,
            seqs: vec![3, 4],
        }
        .into(),
        ReadCounts {
            conversation_id: 1 << 63 | 5,
            counts: vec![2, 0],
            members: 3,
        }
        .into(),
        Typing {
            target: Some(Target::user("bob")),
            typing: true,
            from: "alice".into(),
        }
        .into(),
        SubscribePresence {
            user_ids: vec!["bob".into()],
            unsubscribe: true,
        }
        .into(),
        PresenceSubscribed { following: 1 }.into(),
        SetConversation {
            conversation_id: 42,
            pinned: Some(true),
            hidden: Some(false),
            muted: None,
            clear_upto_seq: 5,
        }
        .into(),
        ConversationSettings {
            conversation_id: 42,
            pinned: true,
            hidden: false,
            muted: true,
            cleared_seq: 5,
        }
        .into(),
        Recall {
            conversation_id: 42,
            seq: 7,
        }
        .into(),
        RecallOk {
            conversation_id: 42,
            seq: 7,
            event_seq: 10,
        }
        .into(),
        SocialRequest {
            op: Some(social_request::Op::AddFriend(AddFriend {
                user_id: "bob".into(),
                message: "hi, it's alice".into(),
            })),
        }
        .into(),
        SocialResponse {
            users: vec![ListedUser {
                user_id: "bob".into(),
                message: "hi".into(),
            }],
            next_page_token: 3,
            profiles: vec![UserProfile {
                user_id: "bob".into(),
                nickname: "Bob".into(),
                avatar_url: "https://example.com/b.png".into(),
                custom: [("city".to_string(), "Oslo".to_string())].into(),
            }],
            friends: true,
        }
        .into(),
        SocialEvent {
            kind: SocialEventKind::FriendRequest.into(),
            user_id: "alice".into(),
            message: "hi".into(),
            group_id: "g1".into(),
        }
        .into(),
        Presence {
            user_id: "bob".into(),
            online: true,
            devices: 2,
        }
        .into(),
        SetDevice {
            push_provider: Some("apns".into()),
            push_token: Some("ab12".into()),
            alias: Some("alice-phone".into()),
            dnd: Some(DoNotDisturb {
                enabled: true,
                start_minute: 22 * 60,
                end_minute: 7 * 60,
                utc_offset_minutes: -300,
            }),
        }
        .into(),
        DeviceSettings {
            device_id: "phone".into(),
            push_provider: "apns".into(),
            has_push_token: true,
            alias: "alice-phone".into(),
            dnd: None,
            tags: vec!["vip".into()],
            platform: Platform::Ios.into(),
        }
        .into(),
        PushNotice {
            push_id: 7,
            title: "Sale".into(),
            content_type: ContentType::Text as u32,
            custom_type: String::new(),
            payload: Bytes::from_static(b"50% off"),
            sent_at_ms: 1_700_000_000_000,
            expires_at_ms: 1_700_086_400_000,
        }
        .into(),
        PushAck { push_id: 7 }.into(),
        Refresh {
            token: "eyJ2IjoxfQ.c2ln".into(),
        }
        .into(),
        RefreshOk {
            token_expires_at: 1_700_086_400,
        }
        .into(),
    ];
    let frames: Vec<Frame> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| Frame::new(i as u64 + 1, body))
        .collect();
    let mut seen = [false; VARIANTS];
    for frame in &frames {
        seen[variant_index(frame.body.as_ref().unwrap())] = true;
    }
    assert!(seen.iter().all(|&s| s), "every body variant has a sample");
    frames
}

fn encode_all(frames: &[Frame]) -> BytesMut {
    let mut codec = Codec::default();
    let mut buf = BytesMut::new();
    for frame in frames {
        codec.encode(frame, &mut buf).unwrap();
    }
    buf
}

#[test]
fn every_message_round_trips() {
    let mut codec = Codec::default();
    for frame in every_body() {
        let mut buf = BytesMut::new();
        codec.encode(&frame, &mut buf).unwrap();
        assert_eq!(buf.len(), 4 + frame.encoded_len());
        let decoded = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(decoded, frame, "{}", frame.body_name());
        assert!(buf.is_empty());
        assert_eq!(codec.decode(&mut buf), Ok(None));
    }
}

#[test]
fn byte_at_a_time_yields_exactly_the_frames() {
    let frames = every_body();
    let wire = encode_all(&frames);
    let mut codec = Codec::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for &byte in wire.iter() {
        buf.put_u8(byte);
        while let Some(frame) = codec.decode(&mut buf).unwrap() {
            out.push(frame);
        }
    }
    assert_eq!(out, frames);
    assert!(buf.is_empty());
}

#[test]
fn several_frames_in_one_buffer_and_leftover_stays() {
    let frames = every_body();
    let mut buf = encode_all(&frames[..3]);
    let third = Codec::default().encode_to_bytes(&frames[3]).unwrap();
    let partial = &third[..third.len() - 1];
    buf.extend_from_slice(partial);

    let mut codec = Codec::default();
    for expected in &frames[..3] {
        assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(expected));
    }
    assert_eq!(codec.decode(&mut buf), Ok(None));
    assert_eq!(&buf[..], partial);
}

#[test]
fn oversize_prefix_rejected_without_growing_buffer() {
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u32(u32::MAX);
    buf.put_slice(b"abcd");
    let cap = buf.capacity();
    let mut codec = Codec::default();
    assert_eq!(
        codec.decode(&mut buf),
        Err(CodecError::FrameTooLarge {
            len: u32::MAX as usize,
            max: MAX_FRAME_DEFAULT
        })
    );
    assert_eq!(buf.capacity(), cap);
    assert!(buf.capacity() < 64);
    assert_eq!(buf.len(), 8, "the buffer is left untouched");

    // One byte over a configured limit is rejected; exactly the limit is accepted.
    let mut codec = Codec::new(100);
    let mut buf = BytesMut::new();
    buf.put_u32(101);
    assert!(matches!(
        codec.decode(&mut buf),
        Err(CodecError::FrameTooLarge { len: 101, max: 100 })
    ));
    assert!(
        buf.capacity() <= 8,
        "nothing reserved for the rejected frame"
    );
    let mut buf = BytesMut::new();
    buf.put_u32(100);
    assert_eq!(codec.decode(&mut buf), Ok(None));
}

#[test]
fn incomplete_frame_reserves_only_what_it_needs() {
    let mut buf = BytesMut::with_capacity(4);
    buf.put_u32(1000);
    assert_eq!(Codec::default().decode(&mut buf), Ok(None));
    assert!(buf.capacity() >= 1004, "room for the rest of the frame");
    assert!(buf.capacity() <= 2 * 1004, "not much more than that");
    assert_eq!(buf.len(), 4);
}

#[test]
fn truncated_input_returns_none_and_keeps_bytes() {
    let frame = every_body().remove(0);
    let wire = Codec::default().encode_to_bytes(&frame).unwrap();
    let mut codec = Codec::default();
    for cut in 0..wire.len() {
        let mut buf = BytesMut::from(&wire[..cut]);
        assert_eq!(codec.decode(&mut buf), Ok(None), "cut at {cut}");
        assert_eq!(&buf[..], &wire[..cut]);
    }
}

#[test]
fn zero_length_frame_is_rejected_and_skipped() {
    let next = Frame::new(3, Ping { client_time_ms: 1 });
    let mut buf = BytesMut::from(&[0u8, 0, 0, 0][..]);
    Codec::default().encode(&next, &mut buf).unwrap();
    let mut codec = Codec::default();
    let err = codec.decode(&mut buf).unwrap_err();
    assert_eq!(err, CodecError::EmptyFrame);
    assert_eq!(err.code(), ErrorCode::BadFrame);
    assert!(err.is_fatal());
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(next));
}

#[test]
fn garbage_body_is_a_decode_error() {
    for garbage in [
        &[0xffu8, 0xff, 0xff][..],
        &[0x00, 0x01],
        &[0x0a, 0x05, 0x01],
    ] {
        let mut buf = BytesMut::new();
        buf.put_u32(garbage.len() as u32);
        buf.put_slice(garbage);
        buf.put_slice(b"rest");
        let err = Codec::default().decode(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{garbage:?}: {err:?}");
        assert_eq!(err.code(), ErrorCode::BadFrame);
        assert_eq!(&buf[..], b"rest", "the bad frame is consumed");
    }
}

#[test]
fn frame_without_body_is_missing_body() {
    let raw = Frame {
        request_id: 5,
        body: None,
    }
    .encode_to_vec();
    assert_eq!(raw, [0x08, 0x05]);
    let mut buf = BytesMut::new();
    buf.put_u32(raw.len() as u32);
    buf.put_slice(&raw);
    let err = Codec::default().decode(&mut buf).unwrap_err();
    assert_eq!(err, CodecError::MissingBody { request_id: 5 });
    assert!(buf.is_empty());
}

#[test]
fn unknown_body_field_maps_to_unknown_message() {
    // request_id = 9, then field 99 (a body type from a newer revision), length-delimited,
    // holding a message with field 1 = 1. Tag 99 << 3 | 2 = 794 = varint 0x9a 0x06.
    let raw = [0x08, 0x09, 0x9a, 0x06, 0x02, 0x08, 0x01];
    let mut buf = BytesMut::new();
    buf.put_u32(raw.len() as u32);
    buf.put_slice(&raw);
    let err = Codec::default().decode(&mut buf).unwrap_err();
    assert_eq!(err, CodecError::MissingBody { request_id: 9 });
    assert_eq!(err.code(), ErrorCode::UnknownMessage);
    assert!(!err.is_fatal(), "the session survives an unknown message");
    assert_eq!(
        err.to_frame(),
        Frame::error(9, ErrorCode::UnknownMessage, err.to_string(), false)
    );
}

#[test]
fn decoded_payload_points_into_read_buffer() {
    let payload = Bytes::from(vec![0xab; 200]);
    let frames = [
        Frame::new(
            1,
            Send {
                client_msg_id: "c".into(),
                target: Some(Target::user("bob")),
                content_type: 1,
                custom_type: String::new(),
                payload: payload.clone(),
                priority: false,
            },
        ),
        Frame::new(
            2,
            SyncMessages {
                conversation_id: 1,
                messages: vec![Deliver {
                    payload: payload.clone(),
                    ..deliver(1)
                }],
            },
        ),
    ];
    let mut buf = encode_all(&frames);
    let range = buf.as_ptr_range();
    let in_read_buffer = |bytes: &Bytes| {
        assert_eq!(bytes, &payload);
        range.contains(&bytes.as_ptr()) && range.contains(&bytes[bytes.len() - 1..].as_ptr())
    };
    let mut codec = Codec::default();

    let Some(Body::Send(send)) = codec.decode(&mut buf).unwrap().unwrap().body else {
        panic!("expected Send");
    };
    assert!(in_read_buffer(&send.payload), "Send.payload was copied");

    let Some(Body::SyncMessages(page)) = codec.decode(&mut buf).unwrap().unwrap().body else {
        panic!("expected SyncMessages");
    };
    assert!(
        in_read_buffer(&page.messages[0].payload),
        "nested Deliver.payload was copied"
    );
}

#[test]
fn decode_raw_then_decode_frame() {
    let frames = every_body();
    let mut buf = encode_all(&frames[..2]);
    let mut codec = Codec::default();
    let raw = codec.decode_raw(&mut buf).unwrap().unwrap();
    assert_eq!(raw.len(), frames[0].encoded_len());
    assert_eq!(decode_frame(raw).unwrap(), frames[0]);
    assert_eq!(codec.decode(&mut buf).unwrap().as_ref(), Some(&frames[1]));
}

#[test]
fn encode_over_limit_fails_and_leaves_buffer() {
    let frame = Frame::new(
        1,
        Send {
            payload: Bytes::from(vec![0; 100]),
            ..Send::default()
        },
    );
    let mut codec = Codec::new(50);
    let mut buf = BytesMut::from(&b"keep"[..]);
    let err = codec.encode(&frame, &mut buf).unwrap_err();
    assert!(matches!(err, CodecError::FrameTooLarge { max: 50, .. }));
    assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    assert_eq!(&buf[..], b"keep");
}

#[test]
fn error_codes() {
    assert_eq!(ErrorCode::FrameTooLarge.name(), "FRAME_TOO_LARGE");
    assert_eq!(ErrorCode::FrameTooLarge.number(), 1002);
    assert_eq!(ErrorCode::try_from(4002), Ok(ErrorCode::Blocked));
    assert!(ErrorCode::TokenExpired.is_fatal());
    assert!(!ErrorCode::RateLimited.is_fatal());
    let frame = Frame::error(4, ErrorCode::NotFound, "no such user", false);
    let Some(Body::Error(e)) = &frame.body else {
        panic!()
    };
    assert_eq!(e.code(), ErrorCode::NotFound);
    assert_eq!(frame.body_name(), "Error");
}

/// The hex example in docs/PROTOCOL.md is produced by this code.
#[test]
fn protocol_md_example_is_current() {
    let frame = Frame::new(
        7,
        Send {
            client_msg_id: "m1".into(),
            target: Some(Target::user("bob")),
            content_type: ContentType::Text as u32,
            custom_type: String::new(),
            payload: Bytes::from_static(b"hi"),
            priority: false,
        },
    );
    let wire = Codec::default().encode_to_bytes(&frame).unwrap();
    let hex: Vec<String> = wire.iter().map(|b| format!("{b:02x}")).collect();
    let hex = hex.join(" ");
    let doc = include_str!("../../docs/PROTOCOL.md");
    assert!(doc.contains(&hex), "docs/PROTOCOL.md should show: {hex}");
}
