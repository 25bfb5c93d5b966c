//! Bounds the writer's caches of users and conversations.
//!
//! The writer caches the inbox head of every user and the state (metadata, members, last
//! seq) of every conversation it touches, and publishes their durable heads for readers.
//! Unbounded, a server would hold every user and conversation it ever saw, and a client
//! could grow that by messaging made-up users. When either cache holds more than
//! `StoreLimits::cache_entries`, the writer drops, between groups, every entry whose head is
//! already published as durable, from the cache and from the published heads; the next use
//! loads it from disk again. The cursors and receipt marks the writer keeps
//! ([`super::writer::U64Cache`]) are simply emptied past the same bound: between groups all
//! of them are committed, so disk has them.
//!
//! Why that is safe: a group still waiting for its fsync has moved the heads of what it
//! appended to past their published values, so an entry whose published head equals the
//! writer's has nothing in such a group, and all that disk holds of it is durable. (A group
//! change that appends nothing leaves a conversation's head as it was; its commit later
//! publishes that same head again, which changes nothing for readers.) The reload
//! publishes that head before anything newer commits, as the first load did ([`Writer::conv`]),
//! and a reader that finds no published head reads the disk, which then holds nothing that
//! is not durable.

use std::sync::atomic::Ordering::Relaxed;

use super::writer::Writer;

impl Writer {
    /// Drops what is durable from a cache that outgrew its bound. Called between groups.
    pub(super) fn trim_caches(&mut self) {
        let limit = self.limits.cache_entries;
        let now = std::time::Instant::now();
        self.starts.trim(limit, now);
        self.additions.trim(limit, now);
        self.sends.trim(limit, now);
        self.scan_budgets.trim(limit, now);
        // Everything cached is committed by now (or the store has failed): read back on use.
        for table in [&mut self.u64_cache.cursors, &mut self.u64_cache.marks] {
            if table.len() > limit {
                table.clear();
            }
        }
        if self.inbox_heads.len() > limit {
            let before = self.inbox_heads.len();
            let published = &self.published.inbox;
            let remembered = &mut self.remembered;
            self.inbox_heads.retain(|user, head| {
                let durable = published.remove_if(user, |_, p| *p == *head).is_some();
                if durable {
                    remembered.unload(user);
                }
                !durable
            });
            self.published
                .evicted
                .fetch_add((before - self.inbox_heads.len()) as u64, Relaxed);
        }
        if self.convs.len() > limit {
            let before = self.convs.len();
            let published = &self.published.conv;
            self.convs.retain(|id, conv| {
                published
                    .remove_if(id, |_, p| *p == conv.last_seq)
                    .is_none()
            });
            self.published
                .evicted
                .fetch_add((before - self.convs.len()) as u64, Relaxed);
        }
    }
}
