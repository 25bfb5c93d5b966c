//! Device acknowledgements: the delivery cursor, and DELIVERED receipts to the senders.
//!
//! A receipt needs, for the entries an ack newly covers, each conversation's highest message
//! seq and who sent those messages. Reading that back from the inbox cost a range scan and a
//! decode per entry on the writer thread (a tenth of its time under 1:1 load). The writer
//! appended those entries itself, so it remembers them per user ([`Unreceipted`]) until a
//! device's ack covers them, and reads the inbox only for what it does not remember: entries
//! from before this process loaded the user, or dropped because nobody acknowledged them.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use fjall::OwnedWriteBatch as WriteBatch;
use tern_protocol::pb::{self, ReceiptKind};

use super::StoreError;
use super::keys::{mark_key, pair_key};
use super::writer::{U64Table, Writer};

/// Most entries one ack reads back from the inbox for receipts; older ones get no receipt.
const RECEIPT_SCAN_LIMIT: u64 = 10_000;
/// Most received messages remembered per user. A user whose devices do not acknowledge
/// (offline, or a stalled app) would otherwise grow this without end; past the cap the user's
/// list is dropped and the next ack reads the inbox instead.
const MAX_REMEMBERED: usize = 512;
/// Most received messages remembered over all users (about 48 bytes each: 12 MiB). Users who
/// never acknowledge (gone for good) would otherwise hold up to [`MAX_REMEMBERED`] each, without
/// end as users come and go; past this every list is dropped and rebuilt from the next acks.
const MAX_REMEMBERED_TOTAL: usize = 262_144;

/// Every loaded user's [`Unreceipted`], within [`MAX_REMEMBERED_TOTAL`] entries.
#[derive(Debug, Default)]
pub(super) struct Remembered {
    users: crate::FastMap<Arc<str>, Unreceipted>,
    /// Entries held over all users.
    total: usize,
}

impl Remembered {
    /// `user` was loaded with inbox head `head`: what comes after it will be remembered.
    pub fn load(&mut self, user: &Arc<str>, head: u64) {
        if let Some(old) = self.users.insert(user.clone(), Unreceipted::after(head)) {
            self.total = self.total.saturating_sub(old.received.len());
        }
    }

    /// `user` left the writer's cache: what it remembered is read from the inbox instead.
    pub fn unload(&mut self, user: &str) {
        if let Some(old) = self.users.remove(user) {
            self.total = self.total.saturating_sub(old.received.len());
        }
    }

    /// `user` received message `seq` of `conversation` from `sender` at `inbox_seq`; it is
    /// remembered until a device of `user` acknowledges it.
    pub fn push(
        &mut self,
        user: &Arc<str>,
        inbox_seq: u64,
        conversation: &Arc<str>,
        seq: u64,
        sender: &Arc<str>,
    ) {
        if self.total >= MAX_REMEMBERED_TOTAL {
            // Dropping everything at once costs one pass per MAX_REMEMBERED_TOTAL pushes, and
            // frees what users who never come back hold; active users remember again after
            // their next ack.
            for unreceipted in self.users.values_mut() {
                unreceipted.forget();
            }
            self.total = 0;
        }
        if let Some(unreceipted) = self.users.get_mut(user) {
            let before = unreceipted.received.len();
            unreceipted.push(inbox_seq, conversation, seq, sender);
            self.total = self.total.saturating_sub(before) + unreceipted.received.len();
        }
    }

    fn take(
        &mut self,
        user: &Arc<str>,
        after: u64,
        up_to: u64,
        head: u64,
        covered: &mut Covered,
    ) -> Option<(u64, u64)> {
        let Some(unreceipted) = self.users.get_mut(user) else {
            return Some((after, up_to));
        };
        let before = unreceipted.received.len();
        let unknown = unreceipted.take(after, up_to, head, covered);
        self.total = self.total.saturating_sub(before) + unreceipted.received.len();
        unknown
    }
}

/// The messages a user received from others that no device of theirs has acknowledged yet.
#[derive(Debug)]
pub(super) struct Unreceipted {
    /// Every such message with `inbox_seq >= from` is in `received` (`u64::MAX`: none are
    /// remembered until the next ack).
    from: u64,
    received: VecDeque<Received>,
    /// The highest sequence any device of the user acknowledged in this process.
    acked: u64,
}

#[derive(Debug)]
struct Received {
    inbox_seq: u64,
    conversation: Arc<str>,
    seq: u64,
    sender: Arc<str>,
}

/// Per conversation: the highest message seq newly received, and who sent those messages.
type Covered = BTreeMap<Arc<str>, (u64, BTreeSet<Arc<str>>)>;

impl Unreceipted {
    /// Nothing remembered yet; what comes after `head` will be.
    pub fn after(head: u64) -> Self {
        Self {
            from: head.saturating_add(1),
            received: VecDeque::new(),
            acked: 0,
        }
    }

    /// `user` got message `seq` of `conversation` from `sender` at `inbox_seq`.
    pub fn push(&mut self, inbox_seq: u64, conversation: &Arc<str>, seq: u64, sender: &Arc<str>) {
        if self.from == u64::MAX {
            return;
        }
        if self.received.len() >= MAX_REMEMBERED {
            self.forget();
            return;
        }
        self.received.push_back(Received {
            inbox_seq,
            conversation: conversation.clone(),
            seq,
            sender: sender.clone(),
        });
    }

    fn forget(&mut self) {
        self.from = u64::MAX;
        self.received = VecDeque::new();
    }

    /// Takes what an ack of `(after, up_to]` covers into `covered`, with `head` the user's
    /// inbox head; returns the part of that range it does not know about (to read from the
    /// inbox), if any.
    fn take(
        &mut self,
        after: u64,
        up_to: u64,
        head: u64,
        covered: &mut Covered,
    ) -> Option<(u64, u64)> {
        while let Some(first) = self.received.front() {
            if first.inbox_seq > up_to {
                break;
            }
            if let Some(r) = self.received.pop_front()
                && r.inbox_seq > after
            {
                add(covered, r.conversation, r.seq, r.sender);
            }
        }
        if self.received.is_empty() && self.received.capacity() > 64 {
            self.received = VecDeque::new();
        }
        // Below `acked` another device's ack has sent the receipts already.
        let start = after.max(self.acked);
        let end = up_to.min(self.from.saturating_sub(1));
        self.acked = self.acked.max(up_to);
        if self.from == u64::MAX {
            // Remember again from here on; what came meanwhile is read when acknowledged.
            self.from = head.saturating_add(1);
        } else if self.from <= up_to {
            // What is remembered is complete above `up_to`.
            self.from = up_to + 1;
        }
        (start < end).then_some((start, end))
    }
}

fn add(covered: &mut Covered, conversation: Arc<str>, seq: u64, sender: Arc<str>) {
    let slot = covered.entry(conversation).or_default();
    slot.0 = slot.0.max(seq);
    slot.1.insert(sender);
}

impl Writer {
    /// A device processed its inbox up to `up_to`: store its cursor, and send DELIVERED
    /// receipts to the senders of the messages it newly received.
    pub(super) fn ack(
        &mut self,
        user: &Arc<str>,
        device: &str,
        up_to: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), StoreError> {
        let cursor_key = pair_key(user, device);
        let old = self.get_u64(U64Table::Cursors, &cursor_key)?;
        let head = self.inbox_head(user)?;
        let up_to = up_to.min(head);
        if up_to <= old {
            return Ok(());
        }
        self.put_u64(U64Table::Cursors, cursor_key, up_to, batch);

        let mut covered = Covered::new();
        let unknown = self.remembered.take(user, old, up_to, head, &mut covered);
        if let Some((after, end)) = unknown {
            let after = after.max(end.saturating_sub(RECEIPT_SCAN_LIMIT));
            let limit = usize::try_from(end - after).unwrap_or(usize::MAX);
            for entry in super::inbox::read(&self.ks.inbox, user, after, end, limit)? {
                if let Some(pb::inbox_entry::Body::Message(m)) = entry.body
                    && m.sender != **user
                {
                    add(
                        &mut covered,
                        Arc::from(m.conversation_id),
                        m.seq,
                        Arc::from(m.sender),
                    );
                }
            }
        }
        for (conv, (max_seq, senders)) in covered {
            let key = mark_key(&conv, user, ReceiptKind::Delivered as u8);
            if max_seq <= self.get_u64(U64Table::Marks, &key)? {
                continue;
            }
            // Former members hear nothing more from the group, receipts included.
            let senders: Vec<Arc<str>> = match self.conv(&conv)? {
                Some(c) => senders
                    .into_iter()
                    .filter(|s| c.members.contains_key(s))
                    .collect(),
                None => Vec::new(),
            };
            self.put_u64(U64Table::Marks, key, max_seq, batch);
            let receipt = super::groups::receipt(&conv, user, ReceiptKind::Delivered, max_seq);
            for sender in &senders {
                self.append_inbox(sender, &receipt)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(covered: &Covered) -> Vec<(String, u64, Vec<String>)> {
        covered
            .iter()
            .map(|(c, (seq, senders))| {
                (
                    c.to_string(),
                    *seq,
                    senders.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn remembers_until_acknowledged_and_reads_only_what_it_does_not_know() {
        let (c, d): (Arc<str>, Arc<str>) = (Arc::from("c"), Arc::from("d"));
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        // Loaded with a head of 10: 11 onwards will be remembered.
        let mut u = Unreceipted::after(10);
        u.push(11, &c, 5, &a);
        u.push(13, &d, 2, &b);
        u.push(14, &c, 6, &a);

        // A device at 7 acknowledges up to 13: 8..=10 must be read, 11 and 13 are known.
        let mut covered = Covered::new();
        assert_eq!(u.take(7, 13, 14, &mut covered), Some((7, 10)));
        assert_eq!(
            seen(&covered),
            vec![
                ("c".into(), 5, vec!["a".into()]),
                ("d".into(), 2, vec!["b".into()])
            ]
        );
        // Another device, at 0, acknowledges up to 14: what the first device covered already
        // has its receipts; 14 is known. Nothing below 14 is read again.
        let mut covered = Covered::new();
        assert_eq!(u.take(0, 14, 14, &mut covered), None);
        assert_eq!(seen(&covered), vec![("c".into(), 6, vec!["a".into()])]);
    }

    #[test]
    fn past_the_cap_it_forgets_and_the_next_ack_reads() {
        let c: Arc<str> = Arc::from("c");
        let a: Arc<str> = Arc::from("a");
        let mut u = Unreceipted::after(0);
        let n = u64::try_from(MAX_REMEMBERED).unwrap_or(u64::MAX) + 10;
        for seq in 1..=n {
            u.push(seq, &c, seq, &a);
        }
        let mut covered = Covered::new();
        // The device acknowledges up to n - 5 while the head is n + 2: all of it is read.
        assert_eq!(u.take(0, n - 5, n + 2, &mut covered), Some((0, n - 5)));
        assert!(covered.is_empty());
        // It remembers again after the head it was told, n + 2; the rest is read.
        u.push(n + 3, &c, n + 3, &a);
        let mut covered = Covered::new();
        assert_eq!(
            u.take(n - 5, n + 3, n + 3, &mut covered),
            Some((n - 5, n + 2))
        );
        assert_eq!(seen(&covered), vec![("c".into(), n + 3, vec!["a".into()])]);
    }

    #[test]
    fn past_the_total_budget_every_list_is_dropped_and_rebuilt() {
        let c: Arc<str> = Arc::from("c");
        let a: Arc<str> = Arc::from("a");
        let users: Vec<Arc<str>> = (0..600).map(|i| Arc::from(format!("u{i}"))).collect();
        let mut remembered = Remembered::default();
        for user in &users {
            remembered.load(user, 0);
        }
        let per_user = MAX_REMEMBERED_TOTAL / users.len() + 1;
        for seq in 1..=per_user as u64 {
            for user in &users {
                remembered.push(user, seq, &c, seq, &a);
            }
        }
        assert!(remembered.total <= MAX_REMEMBERED_TOTAL);
        let held: usize = remembered.users.values().map(|u| u.received.len()).sum();
        assert_eq!(held, remembered.total);
        // The first user's list went in the drop: its ack reads the inbox, then it remembers
        // again after the head.
        let last = per_user as u64;
        let mut covered = Covered::new();
        assert_eq!(
            remembered.take(&users[0], 0, last, last, &mut covered),
            Some((0, last))
        );
        remembered.push(&users[0], last + 1, &c, last + 1, &a);
        let mut covered = Covered::new();
        assert_eq!(
            remembered.take(&users[0], last, last + 1, last + 1, &mut covered),
            None
        );
        assert_eq!(
            seen(&covered),
            vec![("c".into(), last + 1, vec!["a".into()])]
        );
    }

    /// The writer's copy of cursors and marks ([`super::super::writer::U64Cache`]) must agree
    /// with disk: a stale ack never moves a cursor or a mark back, also after the copy was
    /// emptied (a cache of one entry empties it after nearly every group).
    #[tokio::test]
    async fn cursors_and_marks_only_move_forward_through_the_writers_cache() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let limits = super::super::StoreLimits {
            cache_entries: 1,
            ..super::super::StoreLimits::unthrottled(super::super::Durability::Buffered)
        };
        let store = super::super::testing::open(&dir, limits)?;
        let writer = store.writer();
        let user = |name: &str| -> Arc<str> { Arc::from(name) };
        let send = |from: &str, to: &str| {
            writer.send(
                user(from),
                user("phone"),
                crate::store::Target::Direct(to.into()),
                pb::SendMessage {
                    text: "hi".into(),
                    ..Default::default()
                },
            )
        };
        for _ in 0..4 {
            send("alice", "bob").await?;
        }
        let conv = tern_protocol::ids::direct_conversation_id("alice", "bob");
        let delivered =
            |store: &super::super::Store| store.mark(&conv, "bob", ReceiptKind::Delivered);
        // Acks have no answer: a send behind them returns once they are applied.
        let ack = |who: &str, device: &str, up_to: u64| writer.ack(user(who), user(device), up_to);
        ack("bob", "phone", 2).await?;
        send("carol", "dave").await?;
        assert_eq!(store.cursor("bob", "phone")?, 2);
        assert_eq!(delivered(&store)?, 2);
        // Lower, with the value in the copy; then other devices' acks push it out of the
        // copy, and a lower one again must be read from disk.
        ack("bob", "phone", 1).await?;
        ack("dave", "phone", 1).await?;
        ack("bob", "tablet", 1).await?;
        send("carol", "dave").await?;
        ack("bob", "phone", 1).await?;
        send("carol", "dave").await?;
        assert_eq!(store.cursor("bob", "phone")?, 2);
        assert_eq!(store.cursor("bob", "tablet")?, 1);
        assert_eq!(delivered(&store)?, 2, "the tablet's ack covers nothing new");
        // Forward again, past the head: clamped to it.
        ack("bob", "phone", 9).await?;
        send("carol", "dave").await?;
        assert_eq!(store.cursor("bob", "phone")?, 4);
        assert_eq!(delivered(&store)?, 4);
        Ok(())
    }
}
