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
//! A retry reads at most [`RETRY_LOOKBACK`] entries, and each user's retries share a budget
//! of entries read ([`ScanBudgets`]), so a client naming old sequences on every send cannot
//! make the writer scan for it at everyone else's expense.
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

use super::handle::SendOutcome;
use super::keys::{self, seq_key};
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

/// Inbox entries one user's retries may read: a burst, then a steady rate. After a
/// reconnect a client retries the sends it had in flight, each reading at most the entries
/// since its first attempt (a few hundred for a burst of pipelined sends), far within the
/// burst. A client that names old sequences on every send runs out; its retries then look
/// back only as far as its budget allows, which shrinks its own duplicate detection and
/// cannot take the writer from everyone else.
const SCAN_BURST: f64 = 1_048_576.0;
const SCAN_PER_SEC: f64 = 16_384.0;

/// Per-user budgets of inbox entries read by retries.
#[derive(Default)]
pub(super) struct ScanBudgets {
    users: HashMap<Arc<str>, Budget>,
}

struct Budget {
    entries: f64,
    at: Instant,
}

impl ScanBudgets {
    /// `user`'s budget, refilled up to `now`.
    fn refilled(&mut self, user: &Arc<str>, now: Instant) -> &mut Budget {
        let budget = self.users.entry(user.clone()).or_insert(Budget {
            entries: SCAN_BURST,
            at: now,
        });
        let secs = now.saturating_duration_since(budget.at).as_secs_f64();
        budget.entries = (budget.entries + secs * SCAN_PER_SEC).min(SCAN_BURST);
        budget.at = now;
        budget
    }

    /// Forgets budgets that have refilled (they equal a fresh one), once there are more than
    /// `limit`.
    pub fn trim(&mut self, limit: usize, now: Instant) {
        if self.users.len() <= limit {
            return;
        }
        self.users.retain(|_, b| {
            b.entries + now.saturating_duration_since(b.at).as_secs_f64() * SCAN_PER_SEC
                < SCAN_BURST
        });
    }
}

/// The original of a retry: the sender's inbox entry after `after` (and within the last
/// [`RETRY_LOOKBACK`] up to `head`, and the sender's scan budget) that holds this
/// `client_message_id`. Reads forward from `after` and stops at the match: the original of
/// a retry is usually among the first entries after the sequence the retry names.
pub(super) fn find_retried(
    ks_inbox: &Keyspace,
    ks_log: &Keyspace,
    budgets: &mut ScanBudgets,
    sender: &Arc<str>,
    client_message_id: &str,
    after: u64,
    head: u64,
) -> Result<Option<SendOutcome>, StoreError> {
    let budget = budgets.refilled(sender, Instant::now());
    // Whole entries only: a budget below one reads nothing.
    let lookback = RETRY_LOOKBACK.min(budget.entries as u64);
    let after = after.max(head.saturating_sub(lookback));
    let mut read = 0u64;
    let found = scan(ks_inbox, sender, client_message_id, after, head, &mut read);
    budget.entries -= read as f64;
    match found? {
        Some((conversation, seq, inbox_seq)) => {
            original(ks_log, &conversation, seq, inbox_seq).map(Some)
        }
        None => Ok(None),
    }
}

/// The (conversation, seq, inbox_seq) of `sender`'s own entry in `(after, head]` with this
/// client message id; counts the entries it reads in `read`.
fn scan(
    ks_inbox: &Keyspace,
    sender: &str,
    client_message_id: &str,
    after: u64,
    head: u64,
    read: &mut u64,
) -> Result<Option<(String, u64, u64)>, StoreError> {
    if head <= after {
        return Ok(None);
    }
    let range = seq_key(sender, after.saturating_add(1))..=seq_key(sender, u64::MAX);
    for guard in ks_inbox.range(range) {
        let chunk = inbox::InboxChunk::decode(&*guard.value()?)?;
        for entry in chunk.entries {
            if entry.inbox_seq <= after {
                continue;
            }
            if entry.inbox_seq > head {
                return Ok(None);
            }
            *read += 1;
            if let Some(pb::inbox_entry::Body::Message(m)) = entry.body
                && m.sender == sender
                && m.client_message_id == client_message_id
            {
                return Ok(Some((m.conversation_id, m.seq, entry.inbox_seq)));
            }
            if entry.inbox_seq == head {
                return Ok(None);
            }
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
    let stored = super::log::get(ks_log, conversation, seq)?
        .ok_or_else(|| StoreError::NotFound(format!("message {conversation}/{seq}")))?;
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

#[cfg(test)]
mod tests {
    use fjall::{Database, KeyspaceCreateOptions};

    use super::*;

    /// alice's inbox: entries 1..=n, each her own message `m<seq>` in one conversation,
    /// two per chunk; and the log.
    fn alice_inbox(db: &Database, n: u64) -> Result<(Keyspace, Keyspace), StoreError> {
        let inbox_ks = db.keyspace("inbox", KeyspaceCreateOptions::default)?;
        let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
        let mut chunk = inbox::ChunkBuf::default();
        let mut in_chunk = 0;
        for seq in 1..=n {
            let message = pb::Message {
                conversation_id: "d:alice:bob".into(),
                seq,
                sender: "alice".into(),
                client_message_id: format!("m{seq}"),
                ..Default::default()
            };
            let encoded = message.encode_to_vec();
            log.insert(seq_key("d:alice:bob", seq), encoded.clone())?;
            chunk.push(seq, inbox::Stored::Reference(&encoded));
            in_chunk += 1;
            if in_chunk == 2 || seq == n {
                let (key, value) = std::mem::take(&mut chunk)
                    .into_record("alice")
                    .ok_or(StoreError::Failed)?;
                inbox_ks.insert(key, value)?;
                in_chunk = 0;
            }
        }
        Ok((inbox_ks, log))
    }

    #[test]
    fn retries_find_their_original_after_the_named_sequence_within_the_budget()
    -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Storage(fjall::Error::Io(e)))?;
        let db = Database::builder(dir.path()).open()?;
        let (inbox_ks, log) = alice_inbox(&db, 9)?;
        let alice: Arc<str> = Arc::from("alice");
        let mut budgets = ScanBudgets::default();
        let find = |id: &str, after: u64, budgets: &mut ScanBudgets| {
            find_retried(&inbox_ks, &log, budgets, &alice, id, after, 9)
                .map(|found| found.map(|o| (o.message.seq, o.sender_inbox_seq, o.duplicate)))
        };
        assert_eq!(find("m5", 0, &mut budgets)?, Some((5, 5, true)));
        assert_eq!(find("m5", 4, &mut budgets)?, Some((5, 5, true)));
        assert_eq!(
            find("m5", 5, &mut budgets)?,
            None,
            "only after the named sequence"
        );
        assert_eq!(find("m9", 8, &mut budgets)?, Some((9, 9, true)));
        assert_eq!(find("nope", 0, &mut budgets)?, None);
        // Budgets set below are stamped in the future, so that the scan's own refill adds
        // nothing: at 16,384 entries a second, a slow machine refills several meanwhile.
        let set_budget = |budgets: &mut ScanBudgets, entries: f64| {
            budgets.users.insert(
                alice.clone(),
                Budget {
                    entries,
                    at: Instant::now() + Duration::from_secs(3600),
                },
            );
        };
        // The scan stops at the match: finding m5 from 0 read 5 entries.
        set_budget(&mut budgets, 1000.0);
        find("m5", 0, &mut budgets)?;
        let after = budgets.users[&alice].entries;
        assert_eq!(after, 995.0, "1000 -> {after}");
        // An exhausted budget looks back only as far as it has entries for.
        set_budget(&mut budgets, 2.0);
        assert_eq!(find("m5", 0, &mut budgets)?, None, "m5 is 4 entries back");
        set_budget(&mut budgets, 2.0);
        assert_eq!(find("m8", 0, &mut budgets)?, Some((8, 8, true)));
        // Others keep theirs, and budgets come back with time.
        let mut budget = Budget {
            entries: 0.0,
            at: Instant::now(),
        };
        budget.at -= Duration::from_secs(1);
        budgets.users.insert(alice.clone(), budget);
        assert!(budgets.refilled(&alice, Instant::now()).entries >= SCAN_PER_SEC);
        Ok(())
    }

    /// A retry queued right behind its first attempt usually lands in the same group, before
    /// the first attempt is on disk: it must still be found (among the group's own entries).
    #[tokio::test]
    async fn retries_queued_behind_their_first_attempt_are_duplicates() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let limits = super::super::StoreLimits::unthrottled(super::super::Durability::Buffered);
        let store = super::super::testing::open(&dir, limits)?;
        let writer = store.writer();
        let (alice, phone): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("phone"));
        let send = |id: String, retry_after_inbox_seq: Option<u64>| {
            let msg = pb::SendMessage {
                client_message_id: id,
                id_scope: pb::IdScope::Retries as i32,
                retry_after_inbox_seq,
                text: "hi".into(),
                ..Default::default()
            };
            writer.send_pipelined(
                alice.clone(),
                phone.clone(),
                crate::store::Target::Direct("bob".into()),
                msg,
            )
        };
        // alice's inbox holds only her own sends, so her cursor is the last one's sequence.
        let mut cursor = 0;
        const ROUNDS: u64 = 300;
        for round in 0..ROUNDS {
            let id = format!("id{round}");
            let first = send(id.clone(), None).await?;
            let retry = send(id, Some(cursor)).await?;
            let (first, retry) = (first.await??, retry.await??);
            assert!(!first.duplicate, "round {round}");
            assert!(retry.duplicate, "round {round}: the retry was stored again");
            assert_eq!(retry.message.seq, first.message.seq);
            assert_eq!(retry.sender_inbox_seq, first.sender_inbox_seq);
            cursor = first.sender_inbox_seq;
        }
        assert_eq!(cursor, ROUNDS, "one inbox entry per round");
        Ok(())
    }

    #[test]
    fn retries_stored_as_new_are_remembered_for_a_while() {
        let alice: Arc<str> = Arc::from("alice");
        let mut recent = RecentRetries::default();
        assert!(recent.get(&alice, "r").is_none());
        let outcome = SendOutcome {
            message: pb::Message {
                seq: 7,
                ..Default::default()
            },
            duplicate: true,
            sender_inbox_seq: 3,
        };
        recent.insert(alice.clone(), "r".into(), outcome);
        assert_eq!(recent.get(&alice, "r").map(|o| o.message.seq), Some(7));
        assert!(recent.get(&Arc::from("bob"), "r").is_none());
    }
}
