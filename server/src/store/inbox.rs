//! How inboxes are stored: one record (a chunk) per user per committed group.
//!
//! A group of commands often appends several entries to one user's inbox (a busy 1:1 pair
//! gets a handful per group; receipts add more). Writing them as one record, keyed by the
//! chunk's last `inbox_seq`, costs one memtable insert instead of one per entry: the memtable
//! skiplist insert was the largest single cost of the writer. Keying by the *last* sequence
//! keeps the head of an inbox the last key under the user's prefix, and makes the chunk that
//! holds sequence `s` the first key at or after `user ‖ 0 ‖ s`, so every read is a forward
//! range scan.
//!
//! A chunk is written in one batch with everything else of its group, so it is durable (and
//! published) as a whole: a user's published head is always the key of a durable chunk.

use fjall::Keyspace;
use prost::Message as _;
use tern_protocol::pb;

use super::StoreError;
use super::keys::seq_key;

/// The stored value of an inbox key: consecutive entries of one user, in order.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct InboxChunk {
    #[prost(message, repeated, tag = "1")]
    pub entries: Vec<pb::InboxEntry>,
}

/// One user's new entries of a group, encoded as they are appended: the value of the chunk
/// to store, byte for byte what encoding an [`InboxChunk`] of them makes. A message's
/// reference is encoded once per send and copied into each member's chunk, instead of one
/// owned reference per member (three allocations each) encoded again at the end of the group.
#[derive(Debug, Default)]
pub(super) struct ChunkBuf {
    /// The `inbox_seq` of the last entry: the chunk's key.
    last: u64,
    bytes: Vec<u8>,
}

/// What an inbox entry holds, as appended.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stored<'a> {
    /// A message reference, already encoded (a `pb::Message`).
    Reference(&'a [u8]),
    /// A receipt or an event.
    Body(&'a pb::inbox_entry::Body),
}

/// What a new chunk reserves: about ten message references.
const CHUNK_START: usize = 512;
/// `InboxChunk.entries`, `InboxEntry.inbox_seq` and `InboxEntry.message`.
const ENTRIES_TAG: u32 = 1;
const INBOX_SEQ_TAG: u32 = 1;
const MESSAGE_TAG: u32 = 2;

impl ChunkBuf {
    /// Appends the entry `inbox_seq` holding `stored`.
    pub fn push(&mut self, inbox_seq: u64, stored: Stored<'_>) {
        use prost::encoding::uint64;
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let seq_len = if inbox_seq == 0 {
            0
        } else {
            uint64::encoded_len(INBOX_SEQ_TAG, &inbox_seq)
        };
        let body_len = match stored {
            Stored::Reference(bytes) => {
                key_len(MESSAGE_TAG) + encoded_len_varint(bytes.len() as u64) + bytes.len()
            }
            Stored::Body(body) => body.encoded_len(),
        };
        let entry_len = seq_len + body_len;
        let out = &mut self.bytes;
        let needed = key_len(ENTRIES_TAG) + encoded_len_varint(entry_len as u64) + entry_len;
        // A new chunk makes room for a group's worth of references at once, rather than being
        // reallocated and copied entry by entry.
        out.reserve(if out.is_empty() {
            needed.max(CHUNK_START)
        } else {
            needed
        });
        encode_key(ENTRIES_TAG, WireType::LengthDelimited, out);
        encode_varint(entry_len as u64, out);
        if inbox_seq != 0 {
            uint64::encode(INBOX_SEQ_TAG, &inbox_seq, out);
        }
        match stored {
            Stored::Reference(bytes) => {
                encode_key(MESSAGE_TAG, WireType::LengthDelimited, out);
                encode_varint(bytes.len() as u64, out);
                out.extend_from_slice(bytes);
            }
            Stored::Body(body) => body.encode(out),
        }
        self.last = inbox_seq;
    }

    /// The chunk's key and value under `user`; `None` for no entries.
    pub fn into_record(self, user: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        (!self.bytes.is_empty()).then(|| (seq_key(user, self.last), self.bytes))
    }
}

/// Up to `limit` entries of `user`'s inbox with `after < inbox_seq <= up_to`, in order, as
/// stored (messages by reference).
pub(super) fn read(
    inbox: &Keyspace,
    user: &str,
    after: u64,
    up_to: u64,
    limit: usize,
) -> Result<Vec<pb::InboxEntry>, StoreError> {
    let mut entries = Vec::new();
    if up_to <= after || limit == 0 {
        return Ok(entries);
    }
    let range = seq_key(user, after.saturating_add(1))..=seq_key(user, u64::MAX);
    for guard in inbox.range(range) {
        let chunk = InboxChunk::decode(&*guard.value()?)?;
        let mut last = after;
        for entry in chunk.entries {
            last = entry.inbox_seq;
            if entry.inbox_seq <= after {
                continue;
            }
            if entry.inbox_seq > up_to {
                break;
            }
            entries.push(entry);
            if entries.len() == limit {
                return Ok(entries);
            }
        }
        if last >= up_to {
            break;
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjall::{Database, KeyspaceCreateOptions};

    fn entry(seq: u64) -> pb::InboxEntry {
        pb::InboxEntry {
            inbox_seq: seq,
            body: Some(pb::inbox_entry::Body::Receipt(pb::Receipt {
                up_to_seq: seq,
                ..Default::default()
            })),
        }
    }

    /// The record of `entries` as the writer builds it.
    fn chunk_record(user: &str, entries: &[pb::InboxEntry]) -> Option<(Vec<u8>, Vec<u8>)> {
        let mut chunk = ChunkBuf::default();
        for e in entries {
            if let Some(body) = &e.body {
                chunk.push(e.inbox_seq, Stored::Body(body));
            }
        }
        chunk.into_record(user)
    }

    #[test]
    fn chunks_encode_like_the_entries_they_hold() -> Result<(), Box<dyn std::error::Error>> {
        let reference = pb::Message {
            conversation_id: "d:alice:bob".into(),
            seq: 300,
            sender: "alice".into(),
            sender_device: "phone".into(),
            client_message_id: "c1".into(),
            ..Default::default()
        };
        let receipt = pb::inbox_entry::Body::Receipt(pb::Receipt {
            conversation_id: "d:alice:bob".into(),
            user_id: "bob".into(),
            up_to_seq: 300,
            ..Default::default()
        });
        let entries = vec![
            pb::InboxEntry {
                inbox_seq: 41,
                body: Some(pb::inbox_entry::Body::Message(reference.clone())),
            },
            pb::InboxEntry {
                inbox_seq: 42,
                body: Some(receipt.clone()),
            },
            pb::InboxEntry {
                inbox_seq: 200_000,
                body: Some(pb::inbox_entry::Body::Message(reference.clone())),
            },
        ];
        let encoded = reference.encode_to_vec();
        let mut chunk = ChunkBuf::default();
        chunk.push(41, Stored::Reference(&encoded));
        chunk.push(42, Stored::Body(&receipt));
        chunk.push(200_000, Stored::Reference(&encoded));
        let (key, value) = chunk.into_record("alice").ok_or("empty chunk")?;
        assert_eq!(key, seq_key("alice", 200_000));
        let expected = InboxChunk { entries };
        assert_eq!(value, expected.encode_to_vec());
        assert_eq!(InboxChunk::decode(&*value)?, expected);
        assert_eq!(ChunkBuf::default().into_record("bob"), None);
        Ok(())
    }

    fn seqs(entries: &[pb::InboxEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.inbox_seq).collect()
    }

    #[test]
    fn reads_cross_chunks_and_stop_at_the_bounds() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let db = Database::builder(dir.path()).open()?;
        let inbox = db.keyspace("inbox", KeyspaceCreateOptions::default)?;
        // Chunks 1..=3, 4, 5..=9 for alice; one for "alice0", which sorts right after her.
        for chunk in [vec![1, 2, 3], vec![4], vec![5, 6, 7, 8, 9]] {
            let entries: Vec<_> = chunk.into_iter().map(entry).collect();
            let (key, value) = chunk_record("alice", &entries).ok_or("empty chunk")?;
            inbox.insert(key, value)?;
        }
        let (key, value) = chunk_record("alice0", &[entry(1)]).ok_or("empty chunk")?;
        inbox.insert(key, value)?;

        assert_eq!(
            seqs(&read(&inbox, "alice", 0, u64::MAX, 100)?),
            (1..=9).collect::<Vec<_>>()
        );
        assert_eq!(seqs(&read(&inbox, "alice", 2, 6, 100)?), vec![3, 4, 5, 6]);
        assert_eq!(seqs(&read(&inbox, "alice", 3, 4, 100)?), vec![4]);
        assert_eq!(seqs(&read(&inbox, "alice", 1, u64::MAX, 3)?), vec![2, 3, 4]);
        assert_eq!(
            seqs(&read(&inbox, "alice", 9, u64::MAX, 100)?),
            Vec::<u64>::new()
        );
        assert_eq!(seqs(&read(&inbox, "alice", 4, 4, 100)?), Vec::<u64>::new());
        assert_eq!(seqs(&read(&inbox, "alice0", 0, u64::MAX, 100)?), vec![1]);
        assert_eq!(
            seqs(&read(&inbox, "nobody", 0, u64::MAX, 100)?),
            Vec::<u64>::new()
        );
        Ok(())
    }
}
