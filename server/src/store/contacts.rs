//! When a user's contacts (everyone sharing a conversation with them) may have changed.
//!
//! Contacts change only when memberships do, yet each presence change used to read all of a
//! user's conversations and their members from fjall, on the runtime thread. The writer now
//! bumps a change counter of every member of a conversation whose membership changed (a
//! direct conversation started, a group created, members added or removed), after the change
//! is committed; the presence fan-out keeps each user's contacts with the counter it read
//! before reading them, and reads again only once the counter moved. A change committed while
//! a reader was reading moves the counter after it, so the next reader sees it.
//!
//! Counters live in a fixed table, a user's slot chosen by a hash with a per-process random
//! key: memory stays the same however many users come and go, and users sharing a slot only
//! cost each other a needless re-read.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// Slots in the table (512 KiB). With 100,000 users each slot has about two, so a membership
/// change rarely makes anyone else re-read.
const SLOTS: usize = 1 << 16;

pub(crate) struct ContactEpochs {
    hasher: RandomState,
    slots: Box<[AtomicU64]>,
}

impl Default for ContactEpochs {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl std::fmt::Debug for ContactEpochs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContactEpochs").finish_non_exhaustive()
    }
}

impl ContactEpochs {
    fn slot(&self, user: &str) -> &AtomicU64 {
        let hash = self.hasher.hash_one(user) as usize;
        &self.slots[hash & (SLOTS - 1)]
    }

    /// The counter of `user`'s contacts; take it before reading them.
    pub fn get(&self, user: &str) -> u64 {
        self.slot(user).load(Ordering::Acquire)
    }

    /// `user`'s contacts may have changed (called after the change is committed).
    pub fn bump(&self, user: &str) {
        self.slot(user).fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bump_moves_that_users_counter() {
        let epochs = ContactEpochs::default();
        let before = (epochs.get("alice"), epochs.get("bob"));
        epochs.bump("alice");
        assert_eq!(epochs.get("alice"), before.0 + 1);
        // bob's counter moves only if he shares alice's slot (1 in 65,536).
        assert!(epochs.get("bob") == before.1 || epochs.get("bob") == before.1 + 1);
    }
}
