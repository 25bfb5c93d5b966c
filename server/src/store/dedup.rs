//! Recognising a repeated `client_message_id`, in the two scopes a send may ask for.
//!
//! - `ID_SCOPE_ANY_TIME` (the protocol's default: an app's own ids, which may come again after
//!   a restart): a durable index, `sender ‖ 0 ‖ client_message_id` in the `idempotency`
//!   keyspace, written with the message and read on every such send.
//! - `ID_SCOPE_RETRIES` (ids the client library makes for each send): no index. The id is kept
//!   in the sender's own inbox entry for the message, and only a retry, which names an inbox
//!   sequence stored before its first attempt, is looked up, among the sender's entries after
//!   it. Profiling `tern-bench direct` showed the index was half of the writer's cost: a
//!   random-key memtable insert and a point lookup for every message. Retries are rare, and
//!   usually find the original among the last few entries.
//!
//! One race is left for the scan: the first attempt can reach the writer *after* its retry,
//! when it was still in flight on the old connection (a phone's packets delayed on Wi-Fi while
//! it retries over cellular). The retry finds nothing and is stored; [`RecentRetries`] then
//! remembers its id, and a first attempt with the same id is answered as its duplicate. The
//! old connection's packets cannot arrive once the server has dropped it, an idle timeout
//! later, so retries are remembered for twice the longest idle timeout.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fjall::Keyspace;
use prost::Message as _;
use tern_protocol::pb;

use super::keys::{self, seq_key};
use super::writer::SendOutcome;
use super::{StoreError, inbox};

/// Most of the sender's inbox entries a retry looks through. A retry comes seconds after its
/// first attempt, when the original is among the last few entries; the cap bounds what one
/// send can cost the writer.
pub const RETRY_LOOKBACK: u64 = 4096;
/// How long a stored retry's id is remembered against a late first attempt: twice the
/// largest idle timeout a deployment would set (120 s), after which the old connection is gone.
const RETRY_MEMORY: Duration = Duration::from_secs(240);
/// Most retry ids remembered; beyond it the oldest go first (a flood of retries costs the
/// flooding sender its own duplicate detection, not memory).
const RETRY_MEMORY_ENTRIES: usize = 65_536;

type SenderId = (Arc<str>, String);

/// Retries stored as new, for [`RETRY_MEMORY`].
#[derive(Default)]
pub(super) struct RecentRetries {
    outcomes: HashMap<SenderId, SendOutcome>,
    order: VecDeque<(Instant, SenderId)>,
}

impl RecentRetries {
    pub fn get(&self, sender: &Arc<str>, client_message_id: &str) -> Option<SendOutcome> {
        if self.outcomes.is_empty() {
            return None;
        }
        self.outcomes
            .get(&(sender.clone(), client_message_id.to_owned()))
            .cloned()
    }

    pub fn insert(&mut self, sender: Arc<str>, client_message_id: String, outcome: SendOutcome) {
        let now = Instant::now();
        while let Some((at, _)) = self.order.front()
            && (now.duration_since(*at) > RETRY_MEMORY || self.order.len() >= RETRY_MEMORY_ENTRIES)
        {
            if let Some((_, key)) = self.order.pop_front() {
                self.outcomes.remove(&key);
            }
        }
        let key = (sender, client_message_id);
        self.order.push_back((now, key.clone()));
        self.outcomes.insert(key, outcome);
    }
}

/// The original of a retry: the sender's inbox entry after `after` (and within the last
/// [`RETRY_LOOKBACK`] up to `head`) that holds this `client_message_id`.
pub(super) fn find_retried(
    ks_inbox: &Keyspace,
    ks_log: &Keyspace,
    sender: &str,
    client_message_id: &str,
    after: u64,
    head: u64,
) -> Result<Option<SendOutcome>, StoreError> {
    let after = after.max(head.saturating_sub(RETRY_LOOKBACK));
    let entries = inbox::read(ks_inbox, sender, after, head, RETRY_LOOKBACK as usize)?;
    for entry in entries.iter().rev() {
        if let Some(pb::inbox_entry::Body::Message(m)) = &entry.body
            && m.sender == sender
            && m.client_message_id == client_message_id
        {
            return original(ks_log, &m.conversation_id, m.seq, entry.inbox_seq).map(Some);
        }
    }
    Ok(None)
}

/// The original of an `ID_SCOPE_ANY_TIME` send, from the durable index.
pub(super) fn find_indexed(
    ks_idem: &Keyspace,
    ks_log: &Keyspace,
    sender: &str,
    client_message_id: &str,
) -> Result<Option<SendOutcome>, StoreError> {
    let Some(value) = ks_idem.get(keys::pair_key(sender, client_message_id))? else {
        return Ok(None);
    };
    if value.len() < 16 {
        return Err(StoreError::CorruptRecord("short idempotency record"));
    }
    let seq = keys::u64_value(&value[..8]);
    let sender_inbox_seq = keys::u64_value(&value[8..16]);
    let conv = String::from_utf8_lossy(&value[16..]);
    original(ks_log, &conv, seq, sender_inbox_seq).map(Some)
}

/// The index record of an `ID_SCOPE_ANY_TIME` send: seq ‖ sender's inbox_seq ‖ conversation.
pub(super) fn index_record(seq: u64, sender_inbox_seq: u64, conversation: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(16 + conversation.len());
    value.extend_from_slice(&seq.to_be_bytes());
    value.extend_from_slice(&sender_inbox_seq.to_be_bytes());
    value.extend_from_slice(conversation.as_bytes());
    value
}

/// The stored message as a duplicate's answer (ids only: acks need no body).
fn original(
    ks_log: &Keyspace,
    conversation: &str,
    seq: u64,
    sender_inbox_seq: u64,
) -> Result<SendOutcome, StoreError> {
    let stored = ks_log
        .get(seq_key(conversation, seq))?
        .ok_or_else(|| StoreError::NotFound(format!("message {conversation}/{seq}")))?;
    let stored = pb::Message::decode(&*stored)?;
    Ok(SendOutcome {
        message: pb::Message {
            text: String::new(),
            payload: Vec::new(),
            ..stored
        },
        duplicate: true,
        sender_inbox_seq,
    })
}
