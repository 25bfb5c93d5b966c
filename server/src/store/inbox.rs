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

/// The key and value of a chunk; `None` for no entries.
pub(super) fn chunk_record(user: &str, entries: Vec<pb::InboxEntry>) -> Option<(Vec<u8>, Vec<u8>)> {
    let last = entries.last()?.inbox_seq;
    Some((seq_key(user, last), InboxChunk { entries }.encode_to_vec()))
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
            body: None,
        }
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
            let entries = chunk.into_iter().map(entry).collect();
            let (key, value) = chunk_record("alice", entries).ok_or("empty chunk")?;
            inbox.insert(key, value)?;
        }
        let (key, value) = chunk_record("alice0", vec![entry(1)]).ok_or("empty chunk")?;
        inbox.insert(key, value)?;
        assert_eq!(chunk_record("bob", Vec::new()), None);

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
