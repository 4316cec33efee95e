//! Writes the seed corpus of the `frame_decoder` fuzz target.
//!
//! `cargo run -p tern-protocol --example fuzz_seeds -- fuzz/seeds/frame_decoder`
//!
//! Each seed is the fuzz input layout: one byte `n`, `n` chunk sizes, then a stream of frames.

use std::{env, fs, io, path::PathBuf};

use bytes::{BufMut, Bytes, BytesMut};
use tern_protocol::v1::{
    AddFriend, CreateGroup, EnterRoom, group_request, room_request, social_request,
};
use tern_protocol::{
    Ack, Codec, ContentType, Deliver, ErrorCode, Frame, GroupProfile, GroupRequest, Hello, HelloOk,
    JoinPolicy, KickReason, MarkRead, Ping, Platform, Recall, RoomRequest, Send, SendAck,
    SocialRequest, SyncDone, SyncMessages, SyncRequest, Target,
};

fn main() -> io::Result<()> {
    let dir = PathBuf::from(
        env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/seeds/frame_decoder".into()),
    );
    fs::create_dir_all(&dir)?;
    let deliver = Deliver {
        conversation_id: 42,
        seq: 7,
        sender: "alice".into(),
        target: Some(Target::user("bob")),
        server_time_ms: 1_700_000_000_000,
        client_msg_id: "m7".into(),
        content_type: ContentType::Text as u32,
        custom_type: String::new(),
        payload: Bytes::from_static(b"hello bob"),
        recalled: false,
    };
    let seeds: Vec<(&str, Vec<Frame>, &[u8])> = vec![
        (
            "login",
            vec![
                Frame::new(
                    1,
                    Hello {
                        protocol_version: tern_protocol::PROTOCOL_VERSION,
                        token: "eyJ2IjoxfQ.c2ln".into(),
                        device_id: "phone-1".into(),
                        platform: Platform::Ios.into(),
                        client_version: "tern-rs/0.1".into(),
                        sync_version: 3,
                        sync_on_login: true,
                        resume_session_id: 0,
                        sync_max_messages_per_conversation: 0,
                    },
                ),
                Frame::new(
                    1,
                    HelloOk {
                        user_id: "alice".into(),
                        device_id: "phone-1".into(),
                        session_id: 9,
                        server_time_ms: 1_700_000_000_000,
                        user_version: 4,
                        max_frame_bytes: 1_048_576,
                        max_payload_bytes: 65_536,
                        heartbeat_interval_ms: 30_000,
                        token_expires_at: 1_700_086_400,
                    },
                ),
            ],
            &[],
        ),
        (
            "send",
            vec![
                Frame::new(
                    2,
                    Send {
                        client_msg_id: "m7".into(),
                        target: Some(Target::user("bob")),
                        content_type: ContentType::Text as u32,
                        custom_type: String::new(),
                        payload: Bytes::from_static(b"hello bob"),
                        priority: false,
                    },
                ),
                Frame::new(
                    2,
                    SendAck {
                        client_msg_id: "m7".into(),
                        conversation_id: 42,
                        seq: 7,
                        server_time_ms: 1_700_000_000_000,
                        duplicate: false,
                    },
                ),
            ],
            &[1, 3, 7],
        ),
        (
            "deliver-ack",
            vec![
                Frame::new(0, deliver.clone()),
                Frame::new(
                    3,
                    Ack {
                        conversation_id: 42,
                        seq: 7,
                    },
                ),
            ],
            &[5],
        ),
        (
            "sync",
            vec![
                Frame::new(
                    4,
                    SyncRequest {
                        since_version: 0,
                        page_size: 100,
                        max_messages_per_conversation: 0,
                    },
                ),
                Frame::new(
                    4,
                    SyncMessages {
                        conversation_id: 42,
                        messages: vec![deliver.clone(), deliver],
                    },
                ),
                Frame::new(4, SyncDone { user_version: 5 }),
            ],
            &[],
        ),
        (
            "control",
            vec![
                Frame::new(5, Ping { client_time_ms: 1 }),
                Frame::error(5, ErrorCode::RateLimited, "slow down", false),
                Frame::kick(KickReason::Replaced, "logged in elsewhere"),
            ],
            &[2, 2, 2, 2],
        ),
        (
            "social",
            vec![
                Frame::new(
                    6,
                    GroupRequest {
                        group_id: "g1".into(),
                        op: Some(group_request::Op::Create(CreateGroup {
                            profile: Some(Box::new(GroupProfile {
                                name: Some("club".into()),
                                join_policy: Some(JoinPolicy::Approval.into()),
                                ..GroupProfile::default()
                            })),
                            members: vec!["bob".into()],
                        })),
                    },
                ),
                Frame::new(
                    7,
                    RoomRequest {
                        room_id: "live".into(),
                        op: Some(room_request::Op::Enter(EnterRoom::default())),
                    },
                ),
                Frame::new(
                    8,
                    MarkRead {
                        conversation_id: 42,
                        seq: 7,
                    },
                ),
                Frame::new(
                    9,
                    SocialRequest {
                        op: Some(social_request::Op::AddFriend(AddFriend {
                            user_id: "bob".into(),
                            message: "hi".into(),
                        })),
                    },
                ),
                Frame::new(
                    10,
                    Recall {
                        conversation_id: 42,
                        seq: 7,
                    },
                ),
            ],
            &[3],
        ),
    ];
    let mut codec = Codec::default();
    for (name, frames, splits) in seeds {
        let mut buf = BytesMut::new();
        buf.put_u8(splits.len() as u8);
        buf.put_slice(splits);
        for frame in &frames {
            codec.encode(frame, &mut buf).map_err(io::Error::other)?;
        }
        fs::write(dir.join(format!("seed-{name}")), &buf)?;
    }
    Ok(())
}
