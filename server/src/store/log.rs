//! How conversation logs are stored: one record (a chunk) per conversation per committed group.
//!
//! The log was one record per message, and its memtable insert (a skiplist search that misses
//! the cache at every level) was the largest single cost per message in the writer. A busy
//! conversation gets several messages in one group, so they are now written as one record,
//! keyed like an inbox chunk ([`super::inbox`]) by the *last* sequence it holds: the head of a
//! conversation is still the last key under its prefix, and the chunk holding `seq` is the
//! first key at or after `conversation ‖ 0 ‖ seq`.
//!
//! A chunk's value is a zero byte, then a [`LogChunk`]. Stores written before chunks hold one
//! `pb::Message` per record, which never starts with a zero byte (a protobuf field number is
//! never 0), so both are read: an old record is a chunk of one.

use std::sync::Arc;

use fjall::Keyspace;
use prost::Message as _;
use tern_protocol::pb;

use super::StoreError;
use super::keys::seq_key;

/// The first byte of a chunk record.
const CHUNK_MARK: u8 = 0;
/// `LogChunk.messages`.
const MESSAGES_TAG: u32 = 1;
/// A chunk is closed once it holds this many bytes, so a point read decodes little more than
/// the message it wants (a large message is a chunk of its own) and no record grows with the
/// group. Small messages still share a chunk by the hundred.
pub(super) const CHUNK_BYTES: usize = 32 * 1024;
/// What a new chunk reserves: a busy conversation's messages of one group, so that it is not
/// grown (reallocated and copied) message by message.
const CHUNK_START: usize = 2048;
/// Chunks a [`Resolver`] keeps decoded: a page of inbox references mostly walks a few
/// conversations in order.
const RESOLVER_CHUNKS: usize = 8;

/// A chunk record after its mark: consecutive messages of one conversation, in order.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct LogChunk {
    #[prost(message, repeated, tag = "1")]
    pub messages: Vec<pb::Message>,
}

/// One conversation's new messages of a group, encoded as they are stored.
#[derive(Debug, Default)]
pub(super) struct LogChunkBuf {
    /// The seq of the last message: the chunk's key.
    last: u64,
    bytes: Vec<u8>,
}

impl LogChunkBuf {
    /// Appends `message` (the next seq of the conversation).
    pub fn push(&mut self, message: &pb::Message) {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        let len = message.encoded_len();
        let out = &mut self.bytes;
        let mark = usize::from(out.is_empty());
        let needed = mark + key_len(MESSAGES_TAG) + encoded_len_varint(len as u64) + len;
        out.reserve(if mark == 1 {
            needed.max(CHUNK_START)
        } else {
            needed
        });
        if mark == 1 {
            out.push(CHUNK_MARK);
        }
        encode_key(MESSAGES_TAG, WireType::LengthDelimited, out);
        encode_varint(len as u64, out);
        message.encode_raw(out);
        self.last = message.seq;
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The chunk's key and value under `conversation`, leaving this empty; `None` if it is.
    pub fn take_record(&mut self, conversation: &str) -> Option<(Vec<u8>, Vec<u8>)> {
        if self.bytes.is_empty() {
            return None;
        }
        Some((
            seq_key(conversation, self.last),
            std::mem::take(&mut self.bytes),
        ))
    }
}

/// The messages of one stored record, chunk or (older stores) single message.
pub(super) fn decode(value: &[u8]) -> Result<Vec<pb::Message>, StoreError> {
    match value.split_first() {
        Some((&CHUNK_MARK, chunk)) => Ok(LogChunk::decode(chunk)?.messages),
        Some(_) => Ok(vec![pb::Message::decode(value)?]),
        None => Err(StoreError::CorruptRecord("empty log record")),
    }
}

/// The messages of the chunk holding `seq`, if any.
fn chunk_of(log: &Keyspace, conversation: &str, seq: u64) -> Result<Vec<pb::Message>, StoreError> {
    let range = seq_key(conversation, seq)..=seq_key(conversation, u64::MAX);
    match log.range(range).next() {
        Some(guard) => decode(&guard.value()?),
        None => Ok(Vec::new()),
    }
}

/// Message `seq` of `conversation`, if stored.
pub(super) fn get(
    log: &Keyspace,
    conversation: &str,
    seq: u64,
) -> Result<Option<pb::Message>, StoreError> {
    Ok(chunk_of(log, conversation, seq)?
        .into_iter()
        .find(|m| m.seq == seq))
}

/// Calls `each` with the messages `from ..= up_to` of `conversation`, in order.
pub(super) fn read(
    log: &Keyspace,
    conversation: &str,
    from: u64,
    up_to: u64,
    mut each: impl FnMut(pb::Message),
) -> Result<(), StoreError> {
    if up_to < from {
        return Ok(());
    }
    for guard in log.range(seq_key(conversation, from)..=seq_key(conversation, u64::MAX)) {
        let mut last = 0;
        for message in decode(&guard.value()?)? {
            last = message.seq;
            if (from..=up_to).contains(&message.seq) {
                each(message);
            }
        }
        if last >= up_to {
            break;
        }
    }
    Ok(())
}

/// Up to `limit` messages of `conversation` with seq ≤ `end`, newest first.
pub(super) fn read_back(
    log: &Keyspace,
    conversation: &str,
    end: u64,
    limit: usize,
) -> Result<Vec<pb::Message>, StoreError> {
    let mut messages = Vec::new();
    if end == 0 || limit == 0 {
        return Ok(messages);
    }
    // The chunk holding `end` is the first key at or after it; read back from there.
    let upper = match log
        .range(seq_key(conversation, end)..=seq_key(conversation, u64::MAX))
        .next()
    {
        Some(guard) => guard.key()?.to_vec(),
        None => seq_key(conversation, u64::MAX),
    };
    for guard in log.range(seq_key(conversation, 0)..=upper).rev() {
        for message in decode(&guard.value()?)?.into_iter().rev() {
            if message.seq <= end {
                messages.push(message);
                if messages.len() == limit {
                    return Ok(messages);
                }
            }
        }
    }
    Ok(messages)
}

/// Resolves many messages by reference, keeping the last few chunks decoded: the entries of
/// an inbox page mostly come from a few conversations in order, and each chunk holds many.
pub(super) struct Resolver<'a> {
    log: &'a Keyspace,
    /// (conversation, first seq, last seq, messages), most recently used last.
    chunks: Vec<(Arc<str>, u64, u64, Vec<pb::Message>)>,
}

impl<'a> Resolver<'a> {
    pub fn new(log: &'a Keyspace) -> Self {
        Self {
            log,
            chunks: Vec::new(),
        }
    }

    /// Message `seq` of `conversation`, if stored.
    pub fn get(&mut self, conversation: &str, seq: u64) -> Result<Option<pb::Message>, StoreError> {
        let cached = self.chunks.iter().position(|(conv, first, last, _)| {
            **conv == *conversation && (*first..=*last).contains(&seq)
        });
        let index = match cached {
            Some(index) => index,
            None => {
                let messages = chunk_of(self.log, conversation, seq)?;
                let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
                    return Ok(None);
                };
                let (first, last) = (first.seq, last.seq);
                if self.chunks.len() == RESOLVER_CHUNKS {
                    self.chunks.remove(0);
                }
                self.chunks
                    .push((Arc::from(conversation), first, last, messages));
                self.chunks.len() - 1
            }
        };
        Ok(self.chunks[index].3.iter().find(|m| m.seq == seq).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fjall::{Database, KeyspaceCreateOptions};

    fn message(conversation: &str, seq: u64, text: &str) -> pb::Message {
        pb::Message {
            message_id: format!("{conversation}/{seq}"),
            conversation_id: conversation.into(),
            seq,
            sender: "alice".into(),
            text: text.into(),
            ..Default::default()
        }
    }

    /// Stores `seqs` of `conversation` as one chunk.
    fn store_chunk(log: &Keyspace, conversation: &str, seqs: &[u64]) -> Result<(), StoreError> {
        let mut chunk = LogChunkBuf::default();
        for &seq in seqs {
            chunk.push(&message(conversation, seq, "hi"));
        }
        let (key, value) = chunk
            .take_record(conversation)
            .ok_or(StoreError::CorruptRecord("empty chunk"))?;
        log.insert(key, value)?;
        Ok(())
    }

    fn seqs(messages: &[pb::Message]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn chunks_encode_like_the_messages_they_hold() -> Result<(), Box<dyn std::error::Error>> {
        let messages = vec![message("c", 7, "a"), message("c", 8, &"b".repeat(300))];
        let mut chunk = LogChunkBuf::default();
        for m in &messages {
            chunk.push(m);
        }
        let (key, value) = chunk.take_record("c").ok_or("empty chunk")?;
        assert_eq!(key, seq_key("c", 8));
        assert_eq!(value[0], CHUNK_MARK);
        assert_eq!(
            value[1..],
            LogChunk {
                messages: messages.clone()
            }
            .encode_to_vec()
        );
        assert_eq!(decode(&value)?, messages);
        // Emptied: the next group's chunk starts afresh.
        assert_eq!(chunk.len(), 0);
        assert_eq!(chunk.take_record("c"), None);
        // A record of an older store: one message, no mark.
        assert_eq!(
            decode(&messages[0].encode_to_vec())?,
            messages[..1].to_vec()
        );
        assert!(decode(&[]).is_err());
        Ok(())
    }

    #[test]
    fn reads_find_messages_across_chunks_and_old_records() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let db = Database::builder(dir.path()).open()?;
        let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
        // 1 and 2 as an older store wrote them, then chunks 3..=5, 6, 7..=9; and "c0", which
        // sorts right after "c".
        for seq in [1, 2] {
            log.insert(seq_key("c", seq), message("c", seq, "old").encode_to_vec())?;
        }
        store_chunk(&log, "c", &[3, 4, 5])?;
        store_chunk(&log, "c", &[6])?;
        store_chunk(&log, "c", &[7, 8, 9])?;
        store_chunk(&log, "c0", &[1])?;

        for seq in 1..=9 {
            assert_eq!(get(&log, "c", seq)?.map(|m| m.seq), Some(seq));
        }
        assert_eq!(get(&log, "c", 2)?.map(|m| m.text), Some("old".to_owned()));
        assert_eq!(get(&log, "c", 10)?, None);
        assert_eq!(get(&log, "c", 0)?, None);
        assert_eq!(get(&log, "nobody", 1)?, None);

        let mut read_seqs = Vec::new();
        read(&log, "c", 2, 7, |m| read_seqs.push(m.seq))?;
        assert_eq!(read_seqs, vec![2, 3, 4, 5, 6, 7]);
        read_seqs.clear();
        read(&log, "c", 4, 4, |m| read_seqs.push(m.seq))?;
        assert_eq!(read_seqs, vec![4]);
        read_seqs.clear();
        read(&log, "c", 8, 100, |m| read_seqs.push(m.seq))?;
        assert_eq!(read_seqs, vec![8, 9]);

        assert_eq!(
            seqs(&read_back(&log, "c", 9, 100)?),
            (1..=9).rev().collect::<Vec<_>>()
        );
        assert_eq!(seqs(&read_back(&log, "c", 4, 3)?), vec![4, 3, 2]);
        assert_eq!(seqs(&read_back(&log, "c", 50, 2)?), vec![9, 8]);
        assert_eq!(seqs(&read_back(&log, "c", 0, 5)?), Vec::<u64>::new());
        assert_eq!(seqs(&read_back(&log, "c0", 1, 5)?), vec![1]);

        let mut resolver = Resolver::new(&log);
        for seq in [3, 9, 1, 4, 5, 6, 8, 2] {
            assert_eq!(resolver.get("c", seq)?.map(|m| m.seq), Some(seq));
        }
        assert_eq!(
            resolver.get("c0", 1)?.map(|m| m.conversation_id),
            Some("c0".to_owned())
        );
        assert_eq!(resolver.get("c", 10)?, None);
        Ok(())
    }
}
