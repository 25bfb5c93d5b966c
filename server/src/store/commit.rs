//! The second stage of the writer: fsync, then publish, deliver and answer.
//!
//! The writer thread applies a group of commands and commits it (journal and memtables), then
//! hands it here and starts on the next group at once. This thread fsyncs: one fsync covers
//! every group committed since the last one. Only then are the groups' new heads published,
//! their entries delivered and their commands answered, in commit order. Applying the next
//! group thus overlaps the fsync of the previous ones instead of waiting for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use fjall::{Database, PersistMode};
use tracing::error;

use super::Published;
use super::writer::{DeferredReply, Durability};
use crate::delivery::{Delivery, NewEntry};

/// Committed groups waiting for their fsync, at most; the writer waits when this is full.
const PENDING_GROUPS: usize = 16;

/// A group the writer has committed, not yet known durable.
#[derive(Default)]
pub(super) struct Committed {
    /// Conversations' last sequences at the end of the group.
    pub convs: Vec<(Arc<str>, u64)>,
    /// Each user's new inbox entries, in order; the last one is the user's new head.
    pub appended: Vec<(Arc<str>, Vec<NewEntry>)>,
    pub replies: Vec<DeferredReply>,
    /// Anything was written: a group of no-ops (repeated acks, refused sends) needs no fsync.
    pub wrote: bool,
}

/// What the writer sends: a committed group, or the failure of its commit.
pub(super) type Handoff = Result<Committed, (String, Vec<DeferredReply>)>;

pub(super) struct Syncer {
    pub db: Database,
    pub published: Arc<Published>,
    pub delivery: Arc<dyn Delivery>,
    pub durability: Durability,
    /// Set on the first failed commit or fsync; the writer then refuses every command.
    pub failed: Arc<AtomicBool>,
}

pub(super) fn channel() -> (SyncSender<Handoff>, Receiver<Handoff>) {
    std::sync::mpsc::sync_channel(PENDING_GROUPS)
}

impl Syncer {
    pub fn run(self, rx: Receiver<Handoff>) {
        let mut groups = Vec::new();
        while let Ok(first) = rx.recv() {
            groups.push(first);
            groups.extend(rx.try_iter());
            let wrote = groups
                .iter()
                .any(|g| matches!(g, Ok(committed) if committed.wrote));
            let result = if self.failed.load(Ordering::SeqCst) {
                Err("storage failed earlier".to_owned())
            } else {
                match self.durability {
                    Durability::Sync if wrote => self
                        .db
                        .persist(PersistMode::SyncAll)
                        .map_err(|e| e.to_string()),
                    _ => Ok(()),
                }
            };
            for group in groups.drain(..) {
                match (group, &result) {
                    (Ok(committed), Ok(())) => self.finish(committed),
                    (Ok(committed), Err(reason)) => fail(committed.replies, reason),
                    (Err((reason, replies)), _) => fail(replies, &reason),
                }
            }
            if let Err(reason) = result
                && !self.failed.swap(true, Ordering::SeqCst)
            {
                // What reached the disk is unknown (a commit may have landed without its
                // fsync), so nothing read back could be trusted as durable. Refuse every
                // write from now on; the operator restarts the server, and recovery from the
                // journal decides what survived.
                error!(error = %reason, "storage fsync failed; refusing all further writes");
            }
        }
    }

    /// The group is durable: publish its heads, hand its entries to delivery, answer it.
    fn finish(&self, committed: Committed) {
        for (conv, last_seq) in committed.convs {
            self.published.conv.insert(conv, last_seq);
        }
        for (user, entries) in &committed.appended {
            if let Some(last) = entries.last() {
                self.published.inbox.insert(user.clone(), last.inbox_seq);
                self.delivery.inbox_appended(user, entries);
            }
        }
        for reply in committed.replies {
            reply(None);
        }
    }
}

fn fail(replies: Vec<DeferredReply>, reason: &str) {
    for reply in replies {
        reply(Some(reason));
    }
}
