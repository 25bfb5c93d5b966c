//! Durable storage in fjall: conversation logs, per-user inboxes, membership, idempotency,
//! cursors and receipt marks. See ARCHITECTURE.md, "Storage layout".
//!
//! All writes go through one writer thread (`store/writer.rs`), which assigns sequences,
//! commits many operations per fsync (group commit) and only then answers. Readers read fjall
//! directly but never past the heads the writer has published as durable, so a device can
//! never see an entry that a crash could take back.

mod acks;
mod cache;
mod commit;
mod contacts;
mod dedup;
mod groups;
mod handle;
mod inbox;
mod keys;
mod log;
mod rate;
mod reads;
mod sched;
mod send;
mod writer;

/// For the store's own tests: a store on a temporary directory, with no devices to deliver to.
#[cfg(test)]
mod testing {
    use std::sync::Arc;

    /// Delivers to nobody: these tests drive the writer alone.
    struct Nobody;

    impl crate::delivery::Delivery for Nobody {
        fn inbox_appended(&self, _: &str, _: &[crate::delivery::NewEntry]) {}
    }

    /// A store in `dir` with `limits`.
    pub fn open(
        dir: &tempfile::TempDir,
        limits: super::StoreLimits,
    ) -> Result<Arc<super::Store>, super::StoreError> {
        super::Store::open(dir.path(), limits, Arc::new(Nobody))
    }
}

use std::path::Path;
use std::sync::Arc;

use fjall::{Keyspace, KeyspaceCreateOptions};
use tern_protocol::ErrorCode;
use tern_protocol::pb;

pub use handle::{Durability, GroupOp, SendOutcome, Target, WriterHandle};

/// Why a storage operation failed. Each maps to one protocol error code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("message of {size} bytes exceeds the maximum of {max}")]
    MessageTooLarge { size: usize, max: usize },
    #[error("limit exceeded: {0}")]
    LimitExceeded(String),
    #[error("too many {what}; retry in {retry_after_ms} ms")]
    RateLimited {
        what: &'static str,
        retry_after_ms: u64,
    },
    #[error("storage: {0}")]
    Storage(#[from] fjall::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(#[from] prost::DecodeError),
    #[error("stored record is corrupt: {0}")]
    CorruptRecord(&'static str),
    #[error("storage failed earlier; the server refuses writes until it is restarted")]
    Failed,
    #[error("storage writer has stopped")]
    WriterGone,
}

impl StoreError {
    /// With `RATE_LIMITED`: how long to wait before retrying, else 0.
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            StoreError::RateLimited { retry_after_ms, .. } => *retry_after_ms,
            _ => 0,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            StoreError::NotFound(_) => ErrorCode::NotFound,
            StoreError::Forbidden(_) => ErrorCode::Forbidden,
            StoreError::InvalidArgument(_) => ErrorCode::InvalidArgument,
            StoreError::MessageTooLarge { .. } => ErrorCode::MessageTooLarge,
            StoreError::LimitExceeded(_) => ErrorCode::LimitExceeded,
            StoreError::RateLimited { .. } => ErrorCode::RateLimited,
            StoreError::Storage(_)
            | StoreError::Corrupt(_)
            | StoreError::CorruptRecord(_)
            | StoreError::Failed
            | StoreError::WriterGone => ErrorCode::Internal,
        }
    }
}

/// The keyspaces; see ARCHITECTURE.md for keys and values.
#[derive(Clone)]
pub(crate) struct Keyspaces {
    /// conversation → `pb::Conversation` without members or last_seq.
    pub meta: Keyspace,
    /// conversation 0x00 user → role (one byte).
    pub members: Keyspace,
    /// user 0x00 conversation → empty: the conversations of a user.
    pub user_convs: Keyspace,
    /// conversation 0x00 last seq → [`log::LogChunk`] (after a zero byte): one group's messages
    /// of the conversation; a record without the zero byte is one `pb::Message`.
    pub log: Keyspace,
    /// user 0x00 last inbox_seq → [`inbox::InboxChunk`]: one group's entries for the user
    /// (messages by reference).
    pub inbox: Keyspace,
    /// sender 0x00 client_message_id → seq ‖ sender's inbox_seq (8 bytes each) ‖ conversation,
    /// for `ID_SCOPE_ANY_TIME` sends ([`dedup`]).
    pub idem: Keyspace,
    /// user 0x00 device → delivered inbox cursor (u64).
    pub cursors: Keyspace,
    /// conversation 0x00 user 0x00 kind → receipt high-water mark (u64).
    pub marks: Keyspace,
}

/// Durable heads, published by the writer after each fsync. Readers clamp to them.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub inbox: crate::FastDashMap<Arc<str>, u64>,
    pub conv: crate::FastDashMap<Arc<str>, u64>,
    /// Groups committed (one fsync covers one or more with `Durability::Sync`) and commands
    /// in them.
    pub groups: std::sync::atomic::AtomicU64,
    pub commands: std::sync::atomic::AtomicU64,
    /// Users and conversations dropped from the writer's caches ([`cache`]).
    pub evicted: std::sync::atomic::AtomicU64,
    /// When each user's contacts last changed ([`contacts`]).
    pub contacts: contacts::ContactEpochs,
}

/// Handle to the store, shared by every session.
pub struct Store {
    pub(crate) ks: Keyspaces,
    pub(crate) published: Arc<Published>,
    writer: handle::WriterHandle,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// Most members listed in a `Conversation` response; the rest are counted only.
pub const MAX_LISTED_MEMBERS: usize = 1000;

/// Lists at most [`MAX_LISTED_MEMBERS`] of `conv`'s members, in id order, and counts them all.
pub(crate) fn cap_members(conv: &mut pb::Conversation) {
    conv.members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    conv.member_count = u32::try_from(conv.members.len()).unwrap_or(u32::MAX);
    conv.members_truncated = conv.members.len() > MAX_LISTED_MEMBERS;
    conv.members.truncate(MAX_LISTED_MEMBERS);
}

/// Limits the store enforces.
#[derive(Debug, Clone)]
pub struct StoreLimits {
    pub max_message_bytes: usize,
    pub max_group_members: usize,
    pub durability: Durability,
    /// Users, and separately conversations, the writer keeps cached (`store/cache.rs`).
    pub cache_entries: usize,
    /// Conversations a user may start per minute, and at once (`store/rate.rs`); 0 per minute: no
    /// limit.
    pub conversation_starts_per_minute: u32,
    pub conversation_starts_burst: u32,
    /// Members a user may add to groups per minute (creating a group adds all but its
    /// owner), and at once; 0 per minute: no limit.
    pub member_additions_per_minute: u32,
    pub member_additions_burst: u32,
    /// Messages a user may send per minute, and at once (`store/rate.rs`); 0 per minute: no
    /// limit.
    pub messages_per_minute: u32,
    pub messages_burst: u32,
    /// Run the writer, the fsync stage and fjall's workers as `SCHED_BATCH` (`store/sched.rs`).
    pub batch_scheduling: bool,
}

impl StoreLimits {
    /// The limits `config` sets.
    pub fn from_config(config: &crate::Config) -> Self {
        Self {
            max_message_bytes: config.max_message_bytes as usize,
            max_group_members: config.max_group_members as usize,
            durability: config.durability,
            cache_entries: config.store_cache_entries,
            conversation_starts_per_minute: config.conversation_starts_per_minute,
            conversation_starts_burst: config.conversation_starts_burst,
            member_additions_per_minute: config.member_additions_per_minute,
            member_additions_burst: config.member_additions_burst,
            messages_per_minute: config.messages_per_minute,
            messages_burst: config.messages_burst,
            batch_scheduling: config.storage_batch_scheduling,
        }
    }

    /// For driving the store directly (benchmarks, examples, tests): the server's default
    /// limits at `durability`, without the per-user rate limits, which a load generator
    /// sending as a few users would hit first.
    pub fn unthrottled(durability: Durability) -> Self {
        Self {
            durability,
            conversation_starts_per_minute: 0,
            member_additions_per_minute: 0,
            messages_per_minute: 0,
            ..Self::from_config(&crate::Config::default())
        }
    }
}

impl Store {
    /// Opens (or creates) the store under `dir` and starts its writer thread.
    pub fn open(
        dir: &Path,
        limits: StoreLimits,
        delivery: Arc<dyn crate::delivery::Delivery>,
    ) -> Result<Arc<Self>, StoreError> {
        let db = sched::open_database(dir, limits.batch_scheduling)?;
        let open = |name: &str| db.keyspace(name, KeyspaceCreateOptions::default);
        let ks = Keyspaces {
            meta: open("conv_meta")?,
            members: open("members")?,
            user_convs: open("user_convs")?,
            log: open("conv_log")?,
            inbox: open("inbox")?,
            idem: open("idempotency")?,
            cursors: open("cursors")?,
            marks: open("receipt_marks")?,
        };
        let published = Arc::new(Published::default());
        let writer = writer::spawn(db.clone(), ks.clone(), published.clone(), limits, delivery)?;
        Ok(Arc::new(Self {
            ks,
            published,
            writer,
        }))
    }

    /// (groups committed, commands applied): with `Durability::Sync`, fsyncs and the writes
    /// they covered.
    pub fn write_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.published.groups.load(Relaxed),
            self.published.commands.load(Relaxed),
        )
    }

    /// Users and conversations dropped from the writer's caches so far (reloaded on use).
    pub fn cache_evictions(&self) -> u64 {
        self.published
            .evicted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A counter that moves whenever `user`'s contacts (those sharing a conversation with
    /// them) may have changed: read it before reading them, and what was read stays true
    /// while it does not move.
    pub fn contacts_epoch(&self, user: &str) -> u64 {
        self.published.contacts.get(user)
    }

    /// The writer, for operations that change state.
    pub fn writer(&self) -> &handle::WriterHandle {
        &self.writer
    }
}
