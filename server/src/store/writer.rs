//! The single storage writer: sequences, atomic batches and group commit.
//!
//! Sessions send [`Command`]s over a bounded channel. The writer takes one, then everything
//! else already queued (up to [`MAX_GROUP`]), applies them all to one fjall batch and commits
//! it. The group then goes to the fsync stage ([`super::commit`]), which fsyncs once (with
//! [`super::Durability::Sync`]) for every group committed meanwhile, publishes the new durable heads,
//! tells delivery, and only then answers the group's commands. One fsync thus covers many
//! messages, so the disk's fsync rate does not cap throughput, and the writer applies the next
//! group while the previous one is being synced.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;

use fjall::{Database, OwnedWriteBatch as WriteBatch};
use prost::Message as _;
use tern_protocol::pb::{self, ConversationKind, MemberRole};
use tokio::sync::mpsc;
use tracing::error;

use super::acks::Remembered;
use super::dedup;
use super::handle::{Command, Reply, SendOutcome, WriterHandle};
use super::inbox::{ChunkBuf, Stored};
use super::keys::{self, prefix};
use super::log::LogChunkBuf;
use super::rate::TokenBuckets;
use super::{Keyspaces, Published, StoreError, StoreLimits};
use crate::delivery::{Delivery, NewEntry};
use crate::{FastMap, FastSet};

use super::commit;

/// Most commands applied in one batch and one fsync.
const MAX_GROUP: usize = 1024;
/// Queue depth in front of the writer; senders wait (asynchronously) when it is full.
const QUEUE_DEPTH: usize = 8192;

pub(super) fn spawn(
    db: Database,
    ks: Keyspaces,
    published: Arc<Published>,
    limits: StoreLimits,
    delivery: Arc<dyn Delivery>,
) -> Result<WriterHandle, StoreError> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let (handoff, committed) = commit::channel();
    let failed = Arc::new(AtomicBool::new(false));
    let syncer = commit::Syncer {
        db: db.clone(),
        durability: limits.durability,
        failed: failed.clone(),
        finisher: commit::Finisher::new(published.clone(), delivery),
    };
    let starts = TokenBuckets::new(
        "conversation starts",
        limits.conversation_starts_per_minute,
        limits.conversation_starts_burst,
    );
    let additions = TokenBuckets::new(
        "member additions",
        limits.member_additions_per_minute,
        limits.member_additions_burst,
    );
    let sends = TokenBuckets::new(
        "messages",
        limits.messages_per_minute,
        limits.messages_burst,
    );
    let writer = Writer {
        db,
        ks,
        published,
        limits,
        convs: FastMap::default(),
        inbox_heads: FastMap::default(),
        remembered: Remembered::default(),
        u64_cache: U64Cache::default(),
        retries: dedup::RecentRetries::default(),
        scan_budgets: dedup::ScanBudgets::default(),
        starts,
        additions,
        sends,
        group: Group::default(),
        failed,
        handoff,
    };
    let io = |e| StoreError::Storage(fjall::Error::Io(e));
    let batch = writer.limits.batch_scheduling;
    std::thread::Builder::new()
        .name("tern-store-sync".into())
        .spawn(move || {
            if batch {
                super::sched::run_as_batch("tern-store-sync");
            }
            syncer.run(committed);
        })
        .map_err(io)?;
    std::thread::Builder::new()
        .name("tern-store-writer".into())
        .spawn(move || {
            if batch {
                super::sched::run_as_batch("tern-store-writer");
            }
            writer.run(rx);
        })
        .map_err(io)?;
    Ok(WriterHandle { tx })
}

/// A conversation as the writer caches it.
#[derive(Debug, Clone)]
pub(super) struct Conv {
    pub id: Arc<str>,
    pub kind: ConversationKind,
    pub name: String,
    pub created_at_ms: u64,
    pub dissolved: bool,
    pub last_seq: u64,
    pub members: FastMap<Arc<str>, MemberRole>,
}

impl Conv {
    pub fn to_pb(&self) -> pb::Conversation {
        let members = self
            .members
            .iter()
            .map(|(user, role)| pb::Member {
                user_id: user.to_string(),
                role: *role as i32,
            })
            .collect();
        let mut conv = pb::Conversation {
            conversation_id: self.id.to_string(),
            kind: self.kind as i32,
            name: self.name.clone(),
            members,
            last_seq: self.last_seq,
            created_at_ms: self.created_at_ms,
            dissolved: self.dissolved,
            member_count: 0,
            members_truncated: false,
        };
        super::cap_members(&mut conv);
        conv
    }

    /// What `conv_meta` stores: no members, no last_seq (those have their own keys).
    pub fn meta(&self) -> Vec<u8> {
        pb::Conversation {
            conversation_id: self.id.to_string(),
            kind: self.kind as i32,
            name: self.name.clone(),
            members: Vec::new(),
            last_seq: 0,
            created_at_ms: self.created_at_ms,
            dissolved: self.dissolved,
            member_count: 0,
            members_truncated: false,
        }
        .encode_to_vec()
    }
}

/// Answers a command once its group's commit is known: `None` on success, else the failure.
pub(super) type DeferredReply = Box<dyn FnOnce(Option<&str>) + Send>;

/// What one group of commands has done so far, before its commit.
#[derive(Default)]
pub(super) struct Group {
    /// Entries appended to each user's inbox, in order, for delivery after the commit.
    pub appended: FastMap<Arc<str>, Vec<NewEntry>>,
    pub touched_convs: FastSet<Arc<str>>,
    /// Sender → client message id → outcome of this group's `ID_SCOPE_ANY_TIME` sends, for
    /// repeats within the group (the index on disk does not have them yet). Retry-scoped
    /// sends are found among the sender's `appended` entries instead, and only by retries.
    pub idem: FastMap<Arc<str>, HashMap<String, SendOutcome>>,
    /// Each user's inbox entries of this group, as stored: one record per user at the end
    /// ([`super::inbox`]).
    pub chunks: FastMap<Arc<str>, ChunkBuf>,
    /// Each conversation's messages of this group, as stored: one record per conversation
    /// at the end ([`super::log`]).
    pub log_chunks: FastMap<Arc<str>, LogChunkBuf>,
    pub replies: Vec<DeferredReply>,
    /// Users whose contacts may have changed in this group ([`super::contacts`]).
    pub contacts_changed: Vec<Arc<str>>,
}

impl Group {
    /// Empties the group but keeps its tables' capacity: a busy writer then allocates
    /// nothing per group for them (fresh tables each time showed up as page faults).
    fn clear(&mut self) {
        self.appended.clear();
        self.touched_convs.clear();
        self.idem.clear();
        self.chunks.clear();
        self.log_chunks.clear();
        self.replies.clear();
        self.contacts_changed.clear();
    }
}

/// The keyspaces of u64 values the writer reads back before it writes them.
#[derive(Debug, Clone, Copy)]
pub(super) enum U64Table {
    /// Each device's inbox cursor (`cursors`).
    Cursors,
    /// Each member's delivered and read marks per conversation (`receipt_marks`).
    Marks,
}

impl U64Table {
    /// Where the table's values are stored.
    fn keyspace(self, ks: &Keyspaces) -> &fjall::Keyspace {
        match self {
            Self::Cursors => &ks.cursors,
            Self::Marks => &ks.marks,
        }
    }
}

/// The writer's copy of the u64 values it has read or written. Every ack reads a cursor and
/// a mark before it writes them, and reading them back from fjall's memtable (a skip-list
/// search each) was 15% of the writer's time with 1,000 clients. The writer is their only
/// writer, so its copy stays true; a value it wrote is committed (or the store has failed)
/// before anything reads it from disk again. Emptied between groups when it outgrows
/// `StoreLimits::cache_entries` ([`super::cache`]).
#[derive(Default)]
pub(super) struct U64Cache {
    pub cursors: FastMap<Vec<u8>, u64>,
    pub marks: FastMap<Vec<u8>, u64>,
}

impl U64Cache {
    fn table(&mut self, table: U64Table) -> &mut FastMap<Vec<u8>, u64> {
        match table {
            U64Table::Cursors => &mut self.cursors,
            U64Table::Marks => &mut self.marks,
        }
    }
}

pub(super) struct Writer {
    pub db: Database,
    pub ks: Keyspaces,
    pub published: Arc<Published>,
    pub limits: StoreLimits,
    pub convs: FastMap<Arc<str>, Conv>,
    pub inbox_heads: FastMap<Arc<str>, u64>,
    /// Per user, the received messages no device has acknowledged yet ([`super::acks`]).
    pub remembered: Remembered,
    /// Device cursors and receipt marks as last written or read ([`U64Table`]).
    pub u64_cache: U64Cache,
    /// Retries stored as new, against a late first attempt ([`dedup`]).
    pub retries: dedup::RecentRetries,
    /// Inbox entries each user's retries may still read ([`dedup`]).
    pub scan_budgets: dedup::ScanBudgets,
    /// Per user, how many conversations they may start now ([`super::rate`]).
    pub starts: TokenBuckets,
    /// Per user, how many members they may add to groups now ([`super::rate`]).
    pub additions: TokenBuckets,
    /// Per user, how many messages they may send now ([`super::rate`]).
    pub sends: TokenBuckets,
    pub group: Group,
    /// A commit or fsync failed: every later command is refused.
    pub failed: Arc<AtomicBool>,
    /// Committed groups go to the fsync stage ([`commit`]).
    pub handoff: SyncSender<commit::Handoff>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = self.db.batch();
            self.apply(first, &mut batch);
            let mut commands = 1;
            for _ in 1..MAX_GROUP {
                match rx.try_recv() {
                    Ok(command) => {
                        self.apply(command, &mut batch);
                        commands += 1;
                    }
                    Err(_) => break,
                }
            }
            self.published
                .groups
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.published
                .commands
                .fetch_add(commands, std::sync::atomic::Ordering::Relaxed);
            for (user, chunk) in self.group.chunks.drain() {
                if let Some((key, value)) = chunk.into_record(&user) {
                    batch.insert(&self.ks.inbox, key, value);
                }
            }
            for (conv, mut chunk) in self.group.log_chunks.drain() {
                if let Some((key, value)) = chunk.take_record(&conv) {
                    batch.insert(&self.ks.log, key, value);
                }
            }
            let wrote = !batch.is_empty();
            let group = &mut self.group;
            let committed = batch.commit();
            if committed.is_ok() {
                // Readers of memberships see the change from now on.
                for user in group.contacts_changed.drain(..) {
                    self.published.contacts.bump(&user);
                }
            }
            let handoff = match committed {
                Ok(()) => Ok(commit::Committed {
                    convs: group
                        .touched_convs
                        .drain()
                        .filter_map(|id| {
                            let last_seq = self.convs.get(&id)?.last_seq;
                            Some((id, last_seq))
                        })
                        .collect(),
                    appended: group.appended.drain().collect(),
                    replies: std::mem::take(&mut group.replies),
                    wrote,
                }),
                Err(e) => {
                    error!(error = %e, "storage commit failed; refusing all further writes");
                    self.failed.store(true, Ordering::SeqCst);
                    Err((e.to_string(), std::mem::take(&mut group.replies)))
                }
            };
            group.clear();
            if self.handoff.send(handoff).is_err() {
                break;
            }
            self.trim_caches();
        }
    }

    fn apply(&mut self, command: Command, batch: &mut WriteBatch) {
        if self.failed.load(Ordering::Relaxed) {
            command.refuse();
            return;
        }
        match command {
            Command::Send {
                sender,
                device,
                target,
                msg,
                reply,
            } => {
                let result = self.send(&sender, &device, target, msg, batch);
                self.defer(reply, result);
            }
            Command::Group { actor, op, reply } => {
                let result = self.group_op(&actor, op, batch);
                self.defer(reply, result);
            }
            Command::MarkRead {
                user,
                conversation,
                up_to,
                reply,
            } => {
                let result = self.mark_read(&user, &conversation, up_to, batch);
                self.defer(reply, result);
            }
            Command::Ack {
                user,
                device,
                up_to,
            } => {
                if let Err(e) = self.ack(&user, &device, up_to, batch) {
                    error!(error = %e, %user, "recording an ack failed");
                }
            }
        }
    }

    /// Answers after the commit: failures now are sent at once (they wrote nothing); successes
    /// wait for the commit's outcome.
    fn defer<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T, StoreError>) {
        match result {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(value) => self.group.replies.push(Box::new(move |failure| {
                let _ = reply.send(match failure {
                    None => Ok(value),
                    Some(reason) => Err(StoreError::Storage(fjall::Error::Io(
                        std::io::Error::other(reason.to_owned()),
                    ))),
                });
            })),
        }
    }

    /// The conversation, loaded into the cache on first use.
    pub(super) fn conv(&mut self, id: &str) -> Result<Option<&mut Conv>, StoreError> {
        if !self.convs.contains_key(id) {
            let Some(meta) = self.ks.meta.get(id)? else {
                return Ok(None);
            };
            let meta = pb::Conversation::decode(&*meta)?;
            let mut members = FastMap::default();
            for guard in self.ks.members.prefix(prefix(id)) {
                let (key, value) = guard.into_inner()?;
                if let Some(user) = keys::second_of(&key, id) {
                    let role = value
                        .first()
                        .and_then(|r| MemberRole::try_from(i32::from(*r)).ok());
                    members.insert(Arc::from(user), role.unwrap_or(MemberRole::Member));
                }
            }
            let last_seq = match self.ks.log.prefix(prefix(id)).next_back() {
                Some(guard) => keys::seq_of(&guard.key()?).unwrap_or(0),
                None => 0,
            };
            let id: Arc<str> = Arc::from(id);
            // Whatever is on disk for this conversation is durable: a group that touched it
            // (and may still be waiting for its fsync) would have loaded it into this cache,
            // which never forgets. So the loaded head can be published at once; readers rely
            // on a head being published before any newer entry is committed.
            self.published.conv.insert(id.clone(), last_seq);
            let conv = Conv {
                id: id.clone(),
                kind: ConversationKind::try_from(meta.kind).unwrap_or(ConversationKind::Group),
                name: meta.name,
                created_at_ms: meta.created_at_ms,
                dissolved: meta.dissolved,
                last_seq,
                members,
            };
            self.convs.insert(id, conv);
        }
        Ok(self.convs.get_mut(id))
    }

    pub(super) fn inbox_head(&mut self, user: &Arc<str>) -> Result<u64, StoreError> {
        if let Some(&head) = self.inbox_heads.get(user) {
            return Ok(head);
        }
        let head = match self.ks.inbox.prefix(prefix(user)).next_back() {
            Some(guard) => keys::seq_of(&guard.key()?).unwrap_or(0),
            None => 0,
        };
        // Published before anything newer is committed; see `conv`.
        self.published.inbox.insert(user.clone(), head);
        self.inbox_heads.insert(user.clone(), head);
        self.remembered.load(user, head);
        Ok(head)
    }

    /// Appends `body` to `user`'s inbox; returns its inbox sequence.
    pub(super) fn append_inbox(
        &mut self,
        user: &Arc<str>,
        body: &Arc<pb::inbox_entry::Body>,
    ) -> Result<u64, StoreError> {
        self.append_entry(user, Stored::Body(body), body.clone())
    }

    /// Appends `stored` to `user`'s inbox (its chunk is written when the group ends), and
    /// hands `delivered` (the same entry as devices see it: a message resolved from its
    /// reference) to delivery after the commit.
    pub(super) fn append_entry(
        &mut self,
        user: &Arc<str>,
        stored: Stored<'_>,
        delivered: Arc<pb::inbox_entry::Body>,
    ) -> Result<u64, StoreError> {
        let seq = self.inbox_head(user)? + 1;
        self.group
            .chunks
            .entry(user.clone())
            .or_default()
            .push(seq, stored);
        self.inbox_heads.insert(user.clone(), seq);
        self.group
            .appended
            .entry(user.clone())
            .or_default()
            .push(NewEntry {
                inbox_seq: seq,
                body: delivered,
            });
        Ok(seq)
    }

    /// A cursor or receipt mark, seeing every earlier write of this writer (committed or
    /// in this group): from the cache, else from disk.
    pub(super) fn get_u64(&mut self, table: U64Table, key: &[u8]) -> Result<u64, StoreError> {
        let cache = self.u64_cache.table(table);
        if let Some(&value) = cache.get(key) {
            return Ok(value);
        }
        let value = table
            .keyspace(&self.ks)
            .get(key)?
            .map_or(0, |v| keys::u64_value(&v));
        cache.insert(key.to_vec(), value);
        Ok(value)
    }

    pub(super) fn put_u64(
        &mut self,
        table: U64Table,
        key: Vec<u8>,
        value: u64,
        batch: &mut WriteBatch,
    ) {
        batch.insert(
            table.keyspace(&self.ks),
            key.clone(),
            value.to_be_bytes().to_vec(),
        );
        self.u64_cache.table(table).insert(key, value);
    }

    /// Every member of `id` may have gained or lost contacts: their counters move once the
    /// group commits ([`super::contacts`]). Called after members join, before they leave.
    pub(super) fn contacts_changed(&mut self, id: &str) {
        if let Some(conv) = self.convs.get(id) {
            self.group
                .contacts_changed
                .extend(conv.members.keys().cloned());
        }
    }
}
