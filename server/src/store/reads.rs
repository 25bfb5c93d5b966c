//! Reads: inbox pages, history, conversations, cursors. Never past the durable heads.

use prost::Message as _;
use tern_protocol::pb::{self, MemberRole, ReceiptKind};

use super::keys::{self, mark_key, pair_key, prefix};
use super::{Store, StoreError};

impl Store {
    /// The durable head of `user`'s inbox.
    pub fn inbox_head(&self, user: &str) -> Result<u64, StoreError> {
        let on_disk = match self.ks.inbox.prefix(prefix(user)).next_back() {
            Some(guard) => keys::seq_of(&guard.key()?).unwrap_or(0),
            None => 0,
        };
        // Read the published head after the disk: the writer publishes a user's head before it
        // commits anything newer, so an entry seen on disk but not yet durable is clamped away.
        Ok(self
            .published
            .inbox
            .get(user)
            .map_or(on_disk, |h| on_disk.min(*h)))
    }

    /// Up to `limit` inbox entries of `user` after `after`, with messages resolved.
    pub fn read_inbox(
        &self,
        user: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<pb::InboxEntry>, StoreError> {
        Ok(self.read_inbox_for(user, None, after, limit)?.0)
    }

    /// Like [`Store::read_inbox`], but leaves out the messages `device` of `user` sent
    /// itself, before resolving them from the log: the pusher never sends a device its own
    /// messages, and in 1:1 traffic they are half of every inbox. Also returns the last
    /// (durable) inbox sequence scanned, so the caller can move past entries left out.
    pub fn read_inbox_for(
        &self,
        user: &str,
        skip_own: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<pb::InboxEntry>, u64), StoreError> {
        // Never past the published head: anything newer may not be durable yet. A user the
        // writer has not loaded has nothing newer than what is on disk.
        let durable = self.published.inbox.get(user).map_or(u64::MAX, |h| *h);
        let mut entries = super::inbox::read(&self.ks.inbox, user, after, durable, limit)?;
        let scanned = entries.last().map_or(after, |e| e.inbox_seq);
        if let Some(device) = skip_own {
            entries.retain(|e| {
                !matches!(&e.body, Some(pb::inbox_entry::Body::Message(m))
                    if m.sender == user && m.sender_device == device)
            });
        }
        let mut resolver = super::log::Resolver::new(&self.ks.log);
        for entry in &mut entries {
            if let Some(pb::inbox_entry::Body::Message(reference)) = &entry.body {
                let message = resolver
                    .get(&reference.conversation_id, reference.seq)?
                    .ok_or_else(|| {
                        StoreError::NotFound(format!(
                            "message {}/{}",
                            reference.conversation_id, reference.seq
                        ))
                    })?;
                entry.body = Some(pb::inbox_entry::Body::Message(message));
            }
        }
        Ok((entries, scanned))
    }

    /// One stored message.
    pub fn message(&self, conversation: &str, seq: u64) -> Result<pb::Message, StoreError> {
        super::log::get(&self.ks.log, conversation, seq)?
            .ok_or_else(|| StoreError::NotFound(format!("message {conversation}/{seq}")))
    }

    /// The durable last sequence of a conversation.
    pub fn conversation_head(&self, conversation: &str) -> Result<u64, StoreError> {
        let on_disk = match self.ks.log.prefix(prefix(conversation)).next_back() {
            Some(guard) => keys::seq_of(&guard.key()?).unwrap_or(0),
            None => 0,
        };
        Ok(self
            .published
            .conv
            .get(conversation)
            .map_or(on_disk, |h| on_disk.min(*h)))
    }

    /// `user`'s role in `conversation`, if a member.
    pub fn role(&self, conversation: &str, user: &str) -> Result<Option<MemberRole>, StoreError> {
        Ok(self.ks.members.get(pair_key(conversation, user))?.map(|v| {
            v.first()
                .and_then(|r| MemberRole::try_from(i32::from(*r)).ok())
                .unwrap_or(MemberRole::Member)
        }))
    }

    /// Fails unless `user` may read `conversation`.
    pub fn check_member(&self, conversation: &str, user: &str) -> Result<(), StoreError> {
        if self.ks.meta.get(conversation)?.is_none() {
            return Err(StoreError::NotFound(format!("conversation {conversation}")));
        }
        match self.role(conversation, user)? {
            Some(_) => Ok(()),
            None => Err(StoreError::Forbidden(format!(
                "{user} is not a member of {conversation}"
            ))),
        }
    }

    /// A conversation with its members and durable last sequence.
    pub fn conversation(&self, id: &str) -> Result<pb::Conversation, StoreError> {
        let meta = self
            .ks
            .meta
            .get(id)?
            .ok_or_else(|| StoreError::NotFound(format!("conversation {id}")))?;
        let mut conv = pb::Conversation::decode(&*meta)?;
        conv.members = self.members(id)?;
        super::cap_members(&mut conv);
        conv.last_seq = self.conversation_head(id)?;
        Ok(conv)
    }

    /// Whether a conversation was dissolved (`None`: there is no such conversation), without
    /// reading its members.
    pub fn is_dissolved(&self, id: &str) -> Result<Option<bool>, StoreError> {
        match self.ks.meta.get(id)? {
            Some(meta) => Ok(Some(pb::Conversation::decode(&*meta)?.dissolved)),
            None => Ok(None),
        }
    }

    /// Every member of a conversation (for fan-out; responses list at most 1,000).
    pub fn members(&self, id: &str) -> Result<Vec<pb::Member>, StoreError> {
        self.members_at_most(id, usize::MAX)
    }

    /// The first `limit` members of a conversation, in id order: enough to tell whether it
    /// is larger than `limit - 1` without reading all of a large group.
    pub fn members_at_most(&self, id: &str, limit: usize) -> Result<Vec<pb::Member>, StoreError> {
        let mut members = Vec::new();
        for guard in self.ks.members.prefix(prefix(id)).take(limit) {
            let (key, value) = guard.into_inner()?;
            if let Some(user) = keys::second_of(&key, id) {
                members.push(pb::Member {
                    user_id: user.to_owned(),
                    role: i32::from(value.first().copied().unwrap_or(1)),
                });
            }
        }
        Ok(members)
    }

    /// The conversations `user` is a member of.
    pub fn conversations_of(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for guard in self.ks.user_convs.prefix(prefix(user)) {
            let key = guard.key()?;
            if let Some(id) = keys::second_of(&key, user) {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    /// Heads of every conversation of `user`, for a device too far behind to sync entry by entry.
    pub fn heads_of(&self, user: &str) -> Result<Vec<pb::ConversationHead>, StoreError> {
        self.conversations_of(user)?
            .into_iter()
            .map(|id| {
                let read_seq = self.mark(&id, user, ReceiptKind::Read)?;
                Ok(pb::ConversationHead {
                    conversation: Some(self.conversation(&id)?),
                    read_seq,
                })
            })
            .collect()
    }

    /// Messages of `conversation` with seq < `before` (0: from the newest), newest first.
    pub fn history(
        &self,
        conversation: &str,
        before: u64,
        limit: usize,
    ) -> Result<(Vec<pb::Message>, bool), StoreError> {
        let head = self.conversation_head(conversation)?;
        let end = if before == 0 {
            head
        } else {
            before.saturating_sub(1).min(head)
        };
        let messages = super::log::read_back(&self.ks.log, conversation, end, limit)?;
        let has_more = messages.last().is_some_and(|m| m.seq > 1);
        Ok((messages, has_more))
    }

    /// A device's stored delivery cursor.
    pub fn cursor(&self, user: &str, device: &str) -> Result<u64, StoreError> {
        Ok(self
            .ks
            .cursors
            .get(pair_key(user, device))?
            .map_or(0, |v| keys::u64_value(&v)))
    }

    /// A receipt high-water mark of `user` in `conversation`.
    pub fn mark(
        &self,
        conversation: &str,
        user: &str,
        kind: ReceiptKind,
    ) -> Result<u64, StoreError> {
        Ok(self
            .ks
            .marks
            .get(mark_key(conversation, user, kind as u8))?
            .map_or(0, |v| keys::u64_value(&v)))
    }
}
