//! Records and enums the bindings expose, converted from the client's protobuf types.

use tern_client::tern_protocol::pb;
use tern_client::{ConnectionState as ClientConnectionState, SentMessage as ClientSentMessage};

use crate::TernErrorCode;

/// How to reach and authenticate with a server.
#[derive(Debug, Clone, uniffi::Record)]
pub struct TernConfig {
    /// `host:port`, e.g. `chat.example.com:4433`.
    pub server: String,
    /// JWT issued by the app's backend.
    pub token: String,
    /// PEM certificate(s) of the CA to trust; `None` trusts the system's roots.
    #[uniffi(default = None)]
    pub ca_pem: Option<String>,
    /// TLS name to verify; by default the host part of `server`.
    #[uniffi(default = None)]
    pub server_name: Option<String>,
    /// The inbox sequence this device has processed (saved from `inbox_cursor`); `None` resumes
    /// from what the server stored for this device.
    #[uniffi(default = None)]
    pub resume_from: Option<u64>,
    /// Start in the background (no presence or typing, no heartbeats).
    #[uniffi(default = false)]
    pub background: bool,
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ChatMessage {
    /// `conversation_id/seq`, unique.
    pub message_id: String,
    pub conversation_id: String,
    /// Position in the conversation: the order every member sees.
    pub seq: u64,
    pub sender: String,
    pub sender_device: String,
    pub client_message_id: String,
    /// Server clock when stored, Unix milliseconds.
    pub sent_at_ms: u64,
    pub text: String,
    pub payload: Vec<u8>,
}

impl From<pb::Message> for ChatMessage {
    fn from(m: pb::Message) -> Self {
        Self {
            message_id: m.message_id,
            conversation_id: m.conversation_id,
            seq: m.seq,
            sender: m.sender,
            sender_device: m.sender_device,
            client_message_id: m.client_message_id,
            sent_at_ms: m.sent_at_ms,
            text: m.text,
            payload: m.payload,
        }
    }
}

/// A message as the server acknowledged it: stored durably.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SentMessage {
    pub message_id: String,
    pub conversation_id: String,
    pub seq: u64,
    /// The sender's own inbox sequence for it.
    pub inbox_seq: u64,
    pub sent_at_ms: u64,
    pub client_message_id: String,
    /// The server already had this client message id: nothing new was stored.
    pub duplicate: bool,
}

impl From<ClientSentMessage> for SentMessage {
    fn from(s: ClientSentMessage) -> Self {
        Self {
            message_id: s.message_id,
            conversation_id: s.conversation_id,
            seq: s.seq,
            inbox_seq: s.inbox_seq,
            sent_at_ms: s.sent_at_ms,
            client_message_id: s.client_message_id,
            duplicate: s.duplicate,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[non_exhaustive]
pub enum ReceiptKind {
    Delivered,
    Read,
}

/// "`user_id` has received (or read) `conversation_id` up to `up_to_seq`".
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Receipt {
    pub conversation_id: String,
    pub user_id: String,
    pub kind: ReceiptKind,
    pub up_to_seq: u64,
    pub at_ms: u64,
}

impl From<pb::Receipt> for Receipt {
    fn from(r: pb::Receipt) -> Self {
        let kind = match r.kind() {
            pb::ReceiptKind::Read => ReceiptKind::Read,
            _ => ReceiptKind::Delivered,
        };
        Self {
            conversation_id: r.conversation_id,
            user_id: r.user_id,
            kind,
            up_to_seq: r.up_to_seq,
            at_ms: r.at_ms,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[non_exhaustive]
pub enum ConversationEventKind {
    Created,
    MemberAdded,
    MemberRemoved,
    MemberLeft,
    Dissolved,
    RoleChanged,
    /// A kind this client version does not know.
    Other,
}

/// A group change.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct ConversationEvent {
    pub conversation_id: String,
    pub kind: ConversationEventKind,
    /// Who did it.
    pub actor: String,
    /// Whom it concerns (the added or removed user), or empty.
    pub subject: String,
    pub at_ms: u64,
}

impl From<pb::ConversationEvent> for ConversationEvent {
    fn from(e: pb::ConversationEvent) -> Self {
        use pb::ConversationEventKind as K;
        let kind = match e.kind() {
            K::Created => ConversationEventKind::Created,
            K::MemberAdded => ConversationEventKind::MemberAdded,
            K::MemberRemoved => ConversationEventKind::MemberRemoved,
            K::MemberLeft => ConversationEventKind::MemberLeft,
            K::Dissolved => ConversationEventKind::Dissolved,
            K::RoleChanged => ConversationEventKind::RoleChanged,
            K::Unspecified => ConversationEventKind::Other,
        };
        Self {
            conversation_id: e.conversation_id,
            kind,
            actor: e.actor,
            subject: e.subject,
            at_ms: e.at_ms,
        }
    }
}

/// One entry of this user's inbox, as a sync returns it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
#[non_exhaustive]
pub enum InboxItem {
    Message {
        message: ChatMessage,
        inbox_seq: u64,
    },
    Receipt {
        receipt: Receipt,
        inbox_seq: u64,
    },
    ConversationEvent {
        event: ConversationEvent,
        inbox_seq: u64,
    },
}

impl InboxItem {
    pub(crate) fn from_entry(entry: pb::InboxEntry) -> Option<Self> {
        use pb::inbox_entry::Body;
        let inbox_seq = entry.inbox_seq;
        Some(match entry.body? {
            Body::Message(m) => Self::Message {
                message: m.into(),
                inbox_seq,
            },
            Body::Receipt(r) => Self::Receipt {
                receipt: r.into(),
                inbox_seq,
            },
            Body::Event(e) => Self::ConversationEvent {
                event: e.into(),
                inbox_seq,
            },
        })
    }
}

/// What a sync returned.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SyncResult {
    /// Every entry after the requested sequence, in inbox order.
    pub entries: Vec<InboxItem>,
    /// The server's inbox head when the sync ended.
    pub inbox_head: u64,
    /// The device was too far behind: `entries` is empty; page `history` instead.
    pub too_long: bool,
}

/// A page of a conversation's messages, newest first.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct HistoryPage {
    pub messages: Vec<ChatMessage>,
    pub has_more: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[non_exhaustive]
pub enum PresenceStatus {
    Online,
    Away,
    Offline,
}

impl From<PresenceStatus> for pb::PresenceStatus {
    fn from(s: PresenceStatus) -> Self {
        match s {
            PresenceStatus::Online => pb::PresenceStatus::Online,
            PresenceStatus::Away => pb::PresenceStatus::Away,
            PresenceStatus::Offline => pb::PresenceStatus::Offline,
        }
    }
}

/// A contact's presence.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Presence {
    pub user_id: String,
    pub status: PresenceStatus,
    pub last_seen_ms: u64,
}

impl From<pb::Presence> for Presence {
    fn from(p: pb::Presence) -> Self {
        let status = match p.status() {
            pb::PresenceStatus::Online => PresenceStatus::Online,
            pb::PresenceStatus::Away => PresenceStatus::Away,
            _ => PresenceStatus::Offline,
        };
        Self {
            user_id: p.user_id,
            status,
            last_seen_ms: p.last_seen_ms,
        }
    }
}

/// Someone is typing; the indicator ends after `expires_in_ms` unless renewed.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Typing {
    pub conversation_id: String,
    pub user_id: String,
    pub expires_in_ms: u32,
}

impl From<pb::Typing> for Typing {
    fn from(t: pb::Typing) -> Self {
        Self {
            conversation_id: t.conversation_id,
            user_id: t.user_id,
            expires_in_ms: t.expires_in_ms,
        }
    }
}

/// The connection's state, as the app shows it.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
#[non_exhaustive]
pub enum ConnectionState {
    Connecting,
    Connected,
    /// The connection was lost; the next attempt starts after `delay_ms`.
    Reconnecting {
        attempt: u32,
        delay_ms: u64,
        code: Option<TernErrorCode>,
        reason: String,
    },
    /// Final: the client will not reconnect (bad token, replaced session, disconnected).
    Disconnected {
        code: Option<TernErrorCode>,
        reason: String,
    },
}

impl From<ClientConnectionState> for ConnectionState {
    fn from(s: ClientConnectionState) -> Self {
        match s {
            ClientConnectionState::Connecting => Self::Connecting,
            ClientConnectionState::Connected => Self::Connected,
            ClientConnectionState::Reconnecting {
                attempt,
                delay,
                code,
                reason,
            } => Self::Reconnecting {
                attempt,
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                code: code.map(Into::into),
                reason,
            },
            ClientConnectionState::Disconnected { code, reason } => Self::Disconnected {
                code: code.map(Into::into),
                reason,
            },
            // Non-exhaustive upstream: a state added later reads as connecting.
            _ => Self::Connecting,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[non_exhaustive]
pub enum ConversationKind {
    Direct,
    Group,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
#[non_exhaustive]
pub enum MemberRole {
    Member,
    Admin,
    Owner,
}

impl From<MemberRole> for pb::MemberRole {
    fn from(r: MemberRole) -> Self {
        match r {
            MemberRole::Member => pb::MemberRole::Member,
            MemberRole::Admin => pb::MemberRole::Admin,
            MemberRole::Owner => pb::MemberRole::Owner,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Member {
    pub user_id: String,
    pub role: MemberRole,
}

/// A direct conversation or a group.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct Conversation {
    pub conversation_id: String,
    pub kind: ConversationKind,
    pub name: String,
    /// At most 1,000 members, sorted by id; see `members_truncated`.
    pub members: Vec<Member>,
    /// Highest conversation sequence stored.
    pub last_seq: u64,
    pub created_at_ms: u64,
    pub dissolved: bool,
    pub member_count: u32,
    pub members_truncated: bool,
}

impl From<pb::Conversation> for Conversation {
    fn from(c: pb::Conversation) -> Self {
        let kind = match c.kind() {
            pb::ConversationKind::Group => ConversationKind::Group,
            _ => ConversationKind::Direct,
        };
        let members = c
            .members
            .into_iter()
            .map(|m| Member {
                role: match m.role() {
                    pb::MemberRole::Owner => MemberRole::Owner,
                    pb::MemberRole::Admin => MemberRole::Admin,
                    _ => MemberRole::Member,
                },
                user_id: m.user_id,
            })
            .collect();
        Self {
            conversation_id: c.conversation_id,
            kind,
            name: c.name,
            members,
            last_seq: c.last_seq,
            created_at_ms: c.created_at_ms,
            dissolved: c.dissolved,
            member_count: c.member_count,
            members_truncated: c.members_truncated,
        }
    }
}

/// The authenticated session.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct SessionInfo {
    pub user: String,
    pub device: String,
    pub session_id: String,
    pub server_time_ms: u64,
}
