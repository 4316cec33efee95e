//! Constructors and small conveniences on the generated types.

use crate::v1::{
    Ack, ConversationSettings, Deliver, DeviceSettings, Error, ErrorCode, Frame, GetReadCounts,
    GroupRequest, GroupResponse, Hello, HelloOk, HistoryPage, HistoryRequest, Kick, KickReason,
    MarkRead, Ping, Pong, Presence, PresenceSubscribed, PushAck, PushNotice, ReadCounts,
    ReadReceipt, ReadState, Recall, RecallOk, Refresh, RefreshOk, RoomRequest, RoomResponse, Send,
    SendAck, SetConversation, SetDevice, SocialEvent, SocialRequest, SocialResponse,
    SubscribePresence, SyncConversations, SyncDone, SyncMessages, SyncNeeded, SyncRequest, Target,
    TargetKind, Typing, frame::Body,
};

impl Frame {
    /// A frame with the given request id and body.
    pub fn new(request_id: u64, body: impl Into<Body>) -> Self {
        Self {
            request_id,
            body: Some(body.into()),
        }
    }

    /// An `Error` frame answering `request_id` (0 if it answers no particular request).
    pub fn error(
        request_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
        fatal: bool,
    ) -> Self {
        Self::new(
            request_id,
            Error {
                code: code.into(),
                message: message.into(),
                fatal,
            },
        )
    }

    /// A `Kick` frame (server-initiated, request id 0).
    pub fn kick(reason: KickReason, message: impl Into<String>) -> Self {
        Self::new(
            0,
            Kick {
                reason: reason.into(),
                message: message.into(),
            },
        )
    }

    /// The name of the body's message type, for logs and metrics (`"none"` if absent).
    pub fn body_name(&self) -> &'static str {
        self.body.as_ref().map_or("none", Body::name)
    }
}

impl Target {
    /// A 1:1 conversation with user `id`.
    pub fn user(id: impl Into<String>) -> Self {
        Self::new(TargetKind::User, id)
    }

    /// The group `id`.
    pub fn group(id: impl Into<String>) -> Self {
        Self::new(TargetKind::Group, id)
    }

    /// A target of the given kind.
    pub fn new(kind: TargetKind, id: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            id: id.into(),
        }
    }
}

macro_rules! bodies {
    ($($variant:ident($ty:ident) = $name:literal,)*) => {
        $(
            impl From<$ty> for Body {
                fn from(message: $ty) -> Self {
                    Body::$variant(message)
                }
            }
        )*

        impl Body {
            /// The message type's name as written in tern.proto, e.g. `"Send"`.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Body::$variant(_) => $name,)*
                }
            }
        }
    };
}

bodies! {
    Hello(Hello) = "Hello",
    HelloOk(HelloOk) = "HelloOk",
    Error(Error) = "Error",
    Ping(Ping) = "Ping",
    Pong(Pong) = "Pong",
    Kick(Kick) = "Kick",
    Refresh(Refresh) = "Refresh",
    RefreshOk(RefreshOk) = "RefreshOk",
    Send(Send) = "Send",
    SendAck(SendAck) = "SendAck",
    Deliver(Deliver) = "Deliver",
    Ack(Ack) = "Ack",
    Sync(SyncRequest) = "SyncRequest",
    SyncConversations(SyncConversations) = "SyncConversations",
    SyncMessages(SyncMessages) = "SyncMessages",
    SyncDone(SyncDone) = "SyncDone",
    SyncNeeded(SyncNeeded) = "SyncNeeded",
    History(HistoryRequest) = "HistoryRequest",
    HistoryPage(HistoryPage) = "HistoryPage",
    Group(GroupRequest) = "GroupRequest",
    GroupResponse(GroupResponse) = "GroupResponse",
    Room(RoomRequest) = "RoomRequest",
    RoomResponse(RoomResponse) = "RoomResponse",
    MarkRead(MarkRead) = "MarkRead",
    ReadState(ReadState) = "ReadState",
    ReadReceipt(ReadReceipt) = "ReadReceipt",
    GetReadCounts(GetReadCounts) = "GetReadCounts",
    ReadCounts(ReadCounts) = "ReadCounts",
    Typing(Typing) = "Typing",
    SubscribePresence(SubscribePresence) = "SubscribePresence",
    PresenceSubscribed(PresenceSubscribed) = "PresenceSubscribed",
    Presence(Presence) = "Presence",
    SetConversation(SetConversation) = "SetConversation",
    ConversationSettings(ConversationSettings) = "ConversationSettings",
    Recall(Recall) = "Recall",
    RecallOk(RecallOk) = "RecallOk",
    Social(SocialRequest) = "SocialRequest",
    SocialResponse(SocialResponse) = "SocialResponse",
    SocialEvent(SocialEvent) = "SocialEvent",
    SetDevice(SetDevice) = "SetDevice",
    DeviceSettings(DeviceSettings) = "DeviceSettings",
    PushNotice(PushNotice) = "PushNotice",
    PushAck(PushAck) = "PushAck",
}
