//! The device's view of its inbox: which sequences it has, and where the first gap is.
//!
//! Entries arrive from several push streams (one per conversation) and from sync pages, so
//! they interleave out of inbox order. The tracker keeps the contiguous cursor (everything at or
//! below it received), the received sequences above it, and since when a gap has been open.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct InboxTracker {
    cursor: u64,
    /// Entries reported as events that the app has not taken from the channel yet: they are
    /// not acknowledged, so a crash of the app cannot lose them. Counted: after a rewind
    /// ([`InboxTracker::rewind_to`]) an old event and a new one can share a sequence.
    unconsumed: BTreeMap<u64, u32>,
    above: BTreeSet<u64>,
    gap_since: Option<Instant>,
    acked: u64,
}

impl InboxTracker {
    pub(crate) fn new(cursor: u64) -> Self {
        Self {
            cursor,
            above: BTreeSet::new(),
            gap_since: None,
            acked: cursor,
            unconsumed: BTreeMap::new(),
        }
    }

    /// Records `seq`; true if it is new (not a duplicate).
    pub(crate) fn accept(&mut self, seq: u64) -> bool {
        if seq <= self.cursor || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.cursor + 1)) {
            self.cursor += 1;
        }
        if self.above.is_empty() {
            self.gap_since = None;
        } else if self.gap_since.is_none() {
            self.gap_since = Some(Instant::now());
        }
        true
    }

    /// Moves the cursor back to the server's inbox head, after a "too long" answer that says
    /// the device is ahead of it: the store lost entries this device saw (it was restored),
    /// numbers new ones from its head again, and those must not pass for ones already seen.
    /// Events of the old numbering the app has not taken yet stay held until it takes them.
    pub(crate) fn rewind_to(&mut self, seq: u64) {
        if seq < self.cursor {
            self.cursor = seq;
            self.above.clear();
            self.gap_since = None;
            self.acked = self.acked.min(seq);
        }
    }

    /// Jumps the cursor forward (after a "too long" sync answer).
    pub(crate) fn reset_to(&mut self, seq: u64) {
        if seq > self.cursor {
            self.cursor = seq;
            self.above = self.above.split_off(&(seq + 1));
            while self.above.remove(&(self.cursor + 1)) {
                self.cursor += 1;
            }
            if self.above.is_empty() {
                self.gap_since = None;
            }
        }
    }

    /// Everything at or below this was received (not necessarily taken by the app).
    pub(crate) fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Everything at or below this was received and taken by the app: what is acknowledged,
    /// and where a restarted app resumes.
    pub(crate) fn processed(&self) -> u64 {
        match self.unconsumed.first_key_value() {
            Some((first, _)) => self.cursor.min(first - 1),
            None => self.cursor,
        }
    }

    /// `seq` is about to be reported as an event.
    pub(crate) fn hold(&mut self, seq: u64) {
        *self.unconsumed.entry(seq).or_default() += 1;
    }

    /// The app took the event of `seq`.
    pub(crate) fn consumed(&mut self, seq: u64) {
        if let Some(count) = self.unconsumed.get_mut(&seq) {
            *count -= 1;
            if *count == 0 {
                self.unconsumed.remove(&seq);
            }
        }
    }

    /// The event of `seq` was held but never reached the app: the task reporting it was
    /// cancelled (a link's tasks are aborted when its connection drops) while the app's channel
    /// was full. Releases the hold and makes `seq` not received, so that the next sync, which
    /// starts at the cursor, fetches it again; entries above it stay received and are not
    /// reported twice. Without this the hold stayed for the client's life, and nothing past
    /// it was ever acknowledged.
    pub(crate) fn forget(&mut self, seq: u64) {
        self.consumed(seq);
        if seq > self.cursor {
            self.above.remove(&seq);
        } else if seq > 0 {
            self.above.extend(seq + 1..=self.cursor);
            self.cursor = seq - 1;
        }
        if self.above.is_empty() {
            self.gap_since = None;
        } else if self.gap_since.is_none() {
            self.gap_since = Some(Instant::now());
        }
    }

    /// The cursor, if a gap has been open for longer than `patience`.
    pub(crate) fn stale_gap(&self, patience: Duration) -> Option<u64> {
        self.gap_since
            .filter(|since| since.elapsed() >= patience)
            .map(|_| self.cursor)
    }

    /// An acknowledgement up to `up_to` did not go out: send it again later.
    pub(crate) fn unack(&mut self, up_to: u64) {
        self.acked = self.acked.min(up_to.saturating_sub(1));
    }

    /// The cursor, if it moved since the last acknowledgement.
    pub(crate) fn take_ack(&mut self) -> Option<u64> {
        let processed = self.processed();
        (processed > self.acked).then(|| {
            self.acked = processed;
            processed
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_event_is_fetched_again_and_nothing_above_it_twice() {
        let mut t = InboxTracker::new(0);
        for seq in 1..=5 {
            assert!(t.accept(seq));
            t.hold(seq);
        }
        t.consumed(1);
        t.consumed(2);
        // 3 never reached the app; 4 and 5 did.
        t.forget(3);
        t.consumed(4);
        t.consumed(5);
        assert_eq!(t.cursor(), 2, "the next sync starts before 3");
        assert_eq!(t.take_ack(), Some(2));
        assert!(t.stale_gap(Duration::ZERO).is_some(), "a gap is open at 3");
        assert!(t.accept(3), "3 is new again");
        assert!(
            !t.accept(4) && !t.accept(5),
            "4 and 5 are not reported twice"
        );
        assert_eq!(t.cursor(), 5);
        t.hold(3);
        assert_eq!(t.take_ack(), None, "3 is held until the app takes it");
        t.consumed(3);
        assert_eq!(t.take_ack(), Some(5));
        // Forgetting an entry above a gap takes only that entry back.
        assert!(t.accept(7));
        t.hold(7);
        t.forget(7);
        assert!(t.accept(7));
        assert!(t.accept(6));
        assert_eq!(t.cursor(), 7);
    }

    #[test]
    fn a_rewind_makes_new_entries_at_old_numbers_new_and_holds_old_events() {
        let mut t = InboxTracker::new(0);
        for seq in [1, 2, 3, 5] {
            assert!(t.accept(seq));
            t.hold(seq);
        }
        t.consumed(1);
        t.consumed(2);
        assert_eq!(t.take_ack(), Some(2));
        // A forward-only reset does not move back.
        t.reset_to(1);
        assert_eq!(t.cursor(), 3);
        // The server's store went back to 1: its next entries are 2, 3, ... again.
        t.rewind_to(1);
        assert_eq!(t.cursor(), 1);
        assert!(t.stale_gap(Duration::ZERO).is_none());
        for seq in 2..=5 {
            assert!(t.accept(seq));
            t.hold(seq);
        }
        assert_eq!(t.cursor(), 5);
        // The old events 3 and 5 are still in the app's channel, ahead of the new ones.
        assert_eq!(t.processed(), 1);
        assert_eq!(t.take_ack(), None);
        for seq in [3, 5] {
            t.consumed(seq);
        }
        // Taking old 3 did not release new 3: the app has not seen it yet.
        assert_eq!(t.processed(), 1);
        for seq in 2..=5 {
            t.consumed(seq);
        }
        assert_eq!(t.processed(), 5);
        assert_eq!(t.take_ack(), Some(5));
    }

    #[test]
    fn out_of_order_entries_advance_the_cursor_once_contiguous() {
        let mut t = InboxTracker::new(10);
        assert!(!t.accept(9));
        assert!(t.accept(12));
        assert_eq!(t.cursor(), 10);
        assert!(t.stale_gap(Duration::ZERO).is_some());
        assert!(!t.accept(12));
        assert!(t.accept(11));
        assert_eq!(t.cursor(), 12);
        assert!(t.stale_gap(Duration::ZERO).is_none());
        assert_eq!(t.take_ack(), Some(12));
        assert_eq!(t.take_ack(), None);
    }

    #[test]
    fn events_the_app_has_not_taken_are_not_acknowledged() {
        let mut t = InboxTracker::new(0);
        for seq in 1..=3 {
            t.accept(seq);
            t.hold(seq);
        }
        assert_eq!(t.take_ack(), None);
        t.consumed(1);
        t.consumed(3);
        assert_eq!(t.take_ack(), Some(1));
        t.consumed(2);
        assert_eq!(t.take_ack(), Some(3));
    }

    #[test]
    fn reset_skips_forward() {
        let mut t = InboxTracker::new(0);
        t.accept(5);
        t.reset_to(4);
        assert_eq!(t.cursor(), 5);
    }
}
