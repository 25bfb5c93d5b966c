//! The second stage of the writer: fsync, then publish, deliver and answer.
//!
//! The writer thread applies a group of commands and commits it (journal and memtables), then
//! hands it here and starts on the next group at once. This thread fsyncs: one fsync covers
//! every group committed since the last one. Only then are the groups' new heads published,
//! their entries delivered and their commands answered, in commit order. Applying the next
//! group thus overlaps the fsync of the previous ones instead of waiting for it.
//!
//! Publishing, delivering and answering run on the async runtime, one batch per fsync, handed
//! over by [`Finisher`]. Waking hundreds of stream tasks and pushers from this thread cost one
//! cross-thread wake each, and the runtime thread then ran each connection's driver as soon as
//! its first ack or push was written, one UDP packet apiece. Woken from a task on the runtime,
//! they all queue first and the drivers run after them, so each connection sends its acks and
//! pushes of the batch together.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use fjall::{Database, PersistMode};
use tokio::sync::mpsc;
use tracing::error;

use super::Published;
use super::handle::Durability;
use super::writer::DeferredReply;
use crate::delivery::{Delivery, NewEntry};

/// Committed groups waiting for their fsync, at most; the writer waits when this is full.
const PENDING_GROUPS: usize = 16;
/// Durable batches waiting for the runtime, at most; the fsync stage waits when this is full.
const PENDING_FINISHES: usize = 16;

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
    pub durability: Durability,
    /// Set on the first failed commit or fsync; the writer then refuses every command.
    pub failed: Arc<AtomicBool>,
    pub finisher: Finisher,
}

/// What became of one group after its fsync.
enum Outcome {
    Durable(Committed),
    Failed(Vec<DeferredReply>, String),
}

/// Runs the finishing steps of each fsync's groups: on the runtime the store was opened in,
/// or on the fsync thread itself when there is none (or it has shut down).
pub(super) struct Finisher {
    runtime: Option<mpsc::Sender<Vec<Outcome>>>,
    steps: Arc<Steps>,
}

/// What finishing needs.
struct Steps {
    published: Arc<Published>,
    delivery: Arc<dyn Delivery>,
}

impl Finisher {
    /// Spawns the finishing task on the current tokio runtime, if there is one.
    pub fn new(published: Arc<Published>, delivery: Arc<dyn Delivery>) -> Self {
        let steps = Arc::new(Steps {
            published,
            delivery,
        });
        let runtime = tokio::runtime::Handle::try_current().ok().map(|handle| {
            let (tx, mut rx) = mpsc::channel::<Vec<Outcome>>(PENDING_FINISHES);
            let steps = steps.clone();
            // One task, so batches finish in commit order on any runtime flavour.
            handle.spawn(async move {
                while let Some(batch) = rx.recv().await {
                    steps.finish(batch);
                }
            });
            tx
        });
        Self { runtime, steps }
    }

    fn finish(&self, batch: Vec<Outcome>) {
        let batch = match &self.runtime {
            Some(tx) => match tx.blocking_send(batch) {
                Ok(()) => return,
                Err(mpsc::error::SendError(batch)) => batch,
            },
            None => batch,
        };
        self.steps.finish(batch);
    }
}

impl Steps {
    fn finish(&self, batch: Vec<Outcome>) {
        for outcome in batch {
            match outcome {
                Outcome::Durable(committed) => self.durable(committed),
                Outcome::Failed(replies, reason) => fail(replies, &reason),
            }
        }
    }

    /// The group is durable: publish its heads, hand its entries to delivery, answer it.
    fn durable(&self, committed: Committed) {
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
            let batch = groups
                .drain(..)
                .map(|group| match (group, &result) {
                    (Ok(committed), Ok(())) => Outcome::Durable(committed),
                    (Ok(committed), Err(reason)) => {
                        Outcome::Failed(committed.replies, reason.clone())
                    }
                    (Err((reason, replies)), _) => Outcome::Failed(replies, reason),
                })
                .collect();
            self.finisher.finish(batch);
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
}

fn fail(replies: Vec<DeferredReply>, reason: &str) {
    for reply in replies {
        reply(Some(reason));
    }
}
