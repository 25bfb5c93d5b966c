//! JSON shapes printed by `tern-chat`: one object per line, events tagged with `type`.

use std::io::Write;

use serde_json::{Value, json};
use tern_client::tern_protocol::pb;
use tern_client::{ConnectionState, Event, SentMessage};

/// Writes one line and flushes, so that a reader on a pipe sees it at once.
pub fn emit(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")?;
    out.flush()?;
    Ok(())
}

/// `message`; `inbox_seq` is absent for history, which is not read from the inbox.
pub fn message(message: &pb::Message, inbox_seq: Option<u64>) -> Value {
    let mut value = json!({
        "type": "message",
        "message_id": message.message_id,
        "conversation_id": message.conversation_id,
        "seq": message.seq,
        "sender": message.sender,
        "sender_device": message.sender_device,
        "client_message_id": message.client_message_id,
        "sent_at_ms": message.sent_at_ms,
        "text": message.text,
    });
    if let (Some(seq), Value::Object(map)) = (inbox_seq, &mut value) {
        map.insert("inbox_seq".to_owned(), seq.into());
    }
    value
}

pub fn receipt(receipt: &pb::Receipt, inbox_seq: u64) -> Value {
    json!({
        "type": "receipt",
        "conversation_id": receipt.conversation_id,
        "user": receipt.user_id,
        "kind": lower(receipt.kind().as_str_name()),
        "up_to_seq": receipt.up_to_seq,
        "at_ms": receipt.at_ms,
        "inbox_seq": inbox_seq,
    })
}

pub fn conversation_event(event: &pb::ConversationEvent, inbox_seq: u64) -> Value {
    json!({
        "type": "conversation",
        "conversation_id": event.conversation_id,
        "kind": lower(event.kind().as_str_name()),
        "actor": event.actor,
        "subject": event.subject,
        "at_ms": event.at_ms,
        "inbox_seq": inbox_seq,
    })
}

pub fn sync_too_long(inbox_head: u64, heads: &[pb::ConversationHead]) -> Value {
    let heads: Vec<Value> = heads
        .iter()
        .map(|head| {
            json!({
                "conversation": head.conversation.as_ref().map(conversation),
                "read_seq": head.read_seq,
            })
        })
        .collect();
    json!({"type": "sync_too_long", "inbox_head": inbox_head, "heads": heads})
}

/// An inbox entry in the same shape as the matching live event; `None` for an empty body.
pub fn entry(entry: &pb::InboxEntry) -> Option<Value> {
    let seq = entry.inbox_seq;
    Some(match entry.body.as_ref()? {
        pb::inbox_entry::Body::Message(m) => message(m, Some(seq)),
        pb::inbox_entry::Body::Receipt(r) => receipt(r, seq),
        pb::inbox_entry::Body::Event(e) => conversation_event(e, seq),
    })
}

/// `None` for event kinds this tool does not know yet (`Event` is non-exhaustive).
pub fn event(event: &Event) -> Option<Value> {
    Some(match event {
        Event::Message {
            message: m,
            inbox_seq,
        } => message(m, Some(*inbox_seq)),
        Event::Receipt {
            receipt: r,
            inbox_seq,
        } => receipt(r, *inbox_seq),
        Event::Conversation {
            event: e,
            inbox_seq,
        } => conversation_event(e, *inbox_seq),
        Event::SyncTooLong { inbox_head, heads } => sync_too_long(*inbox_head, heads),
        Event::Presence(p) => json!({
            "type": "presence",
            "user": p.user_id,
            "status": lower(p.status().as_str_name()),
            "last_seen_ms": p.last_seen_ms,
        }),
        Event::Typing(t) => json!({
            "type": "typing",
            "conversation_id": t.conversation_id,
            "user": t.user_id,
            "expires_in_ms": t.expires_in_ms,
        }),
        Event::Connection(ConnectionState::Disconnected { code, reason }) => json!({
            "type": "disconnected",
            "code": code.map(|c| c.as_str_name()),
            "reason": reason,
        }),
        Event::Connection(ConnectionState::Reconnecting {
            attempt,
            delay,
            code,
            reason,
        }) => json!({
            "type": "connection",
            "state": "reconnecting",
            "attempt": attempt,
            "delay_ms": delay.as_millis() as u64,
            "code": code.map(|c| c.as_str_name()),
            "reason": reason,
        }),
        Event::Connection(ConnectionState::Connected) => {
            json!({"type": "connection", "state": "connected"})
        }
        _ => return None,
    })
}

pub fn sent(sent: &SentMessage) -> Value {
    json!({
        "message_id": sent.message_id,
        "conversation_id": sent.conversation_id,
        "seq": sent.seq,
        "inbox_seq": sent.inbox_seq,
        "client_message_id": sent.client_message_id,
        "duplicate": sent.duplicate,
        "sent_at_ms": sent.sent_at_ms,
    })
}

pub fn conversation(conv: &pb::Conversation) -> Value {
    let members: Vec<Value> = conv
        .members
        .iter()
        .map(|m| json!({"user": m.user_id, "role": lower(m.role().as_str_name())}))
        .collect();
    json!({
        "conversation_id": conv.conversation_id,
        "kind": lower(conv.kind().as_str_name()),
        "name": conv.name,
        "members": members,
        "last_seq": conv.last_seq,
        "created_at_ms": conv.created_at_ms,
        "dissolved": conv.dissolved,
    })
}

/// Proto enum names are SCREAMING_CASE; the CLI prints them lowercase ("member_added").
fn lower(name: &str) -> String {
    name.to_ascii_lowercase()
}
