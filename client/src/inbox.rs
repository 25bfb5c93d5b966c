//! The device's view of its inbox: which sequences it has, and where the first gap is.
//!
//! Entries arrive from several push streams (one per conversation) and from sync pages, so
//! they interleave out of inbox order. The tracker keeps the contiguous cursor (everything at or
//! below it received), the received sequences above it, and since when a gap has been open.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct InboxTracker {
    cursor: u64,
    /// Entries reported as events that the app has not taken from the channel yet: they are
    /// not acknowledged, so a crash of the app cannot lose them.
    unconsumed: BTreeSet<u64>,
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
            unconsumed: BTreeSet::new(),
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

    /// Moves the cursor to the server's inbox head after a "too long" sync answer: forward
    /// past entries the server will not send, or back when the server has fewer entries than
    /// this device saw (its store was restored, or lost its unsynced tail), since its sequence
    /// goes on from its head and the new entries there must not pass for ones already seen.
    pub(crate) fn reset_to(&mut self, seq: u64) {
        if seq < self.cursor {
            self.cursor = seq;
            self.above.clear();
            self.gap_since = None;
            self.unconsumed.retain(|&held| held <= seq);
            self.acked = self.acked.min(seq);
        } else if seq > self.cursor {
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
        match self.unconsumed.first() {
            Some(first) => self.cursor.min(first - 1),
            None => self.cursor,
        }
    }

    /// `seq` is about to be reported as an event.
    pub(crate) fn hold(&mut self, seq: u64) {
        self.unconsumed.insert(seq);
    }

    /// The app took the event of `seq`.
    pub(crate) fn consumed(&mut self, seq: u64) {
        self.unconsumed.remove(&seq);
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
    fn a_head_below_the_cursor_rewinds_it_so_new_entries_there_are_new() {
        let mut t = InboxTracker::new(0);
        for seq in [1, 2, 3, 5] {
            assert!(t.accept(seq));
            t.hold(seq);
        }
        t.consumed(1);
        t.consumed(2);
        assert_eq!(t.take_ack(), Some(2));
        // The server's store went back to 1: its next entries are 2, 3, ... again.
        t.reset_to(1);
        assert_eq!(t.cursor(), 1);
        assert!(t.stale_gap(Duration::ZERO).is_none());
        assert!(t.accept(2));
        assert!(t.accept(3));
        assert!(t.accept(4));
        assert!(t.accept(5));
        assert_eq!(t.cursor(), 5);
        // Entries of the old sequence the app had not taken hold nothing back.
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
