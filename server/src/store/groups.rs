//! Writer operations on groups and receipts.

use std::collections::BTreeSet;
use std::sync::Arc;

use fjall::OwnedWriteBatch as WriteBatch;
use rand::RngCore;
use tern_protocol::ids::validate_id;
use tern_protocol::pb::{
    self, ConversationEventKind as EventKind, ConversationKind, MemberRole, ReceiptKind,
};

use super::StoreError;
use super::handle::GroupOp;
use super::keys::{mark_key, pair_key};
use super::writer::{Conv, U64Table, Writer};
use crate::auth::unix_now_ms;

/// Most entries one ack or read mark scans for receipts; older ones get no receipt.
const RECEIPT_SCAN_LIMIT: u64 = 10_000;
/// Longest group name, bytes.
const MAX_GROUP_NAME: usize = 256;

impl Writer {
    pub(super) fn group_op(
        &mut self,
        actor: &Arc<str>,
        op: GroupOp,
        batch: &mut WriteBatch,
    ) -> Result<pb::Conversation, StoreError> {
        match op {
            GroupOp::Create { name, members } => self.create_group(actor, name, members, batch),
            GroupOp::Add {
                conversation,
                users,
            } => {
                let users = validated(users)?;
                let max_members = self.limits.max_group_members;
                let conv = self.group_for(&conversation, actor, MemberRole::Admin)?;
                let new: Vec<Arc<str>> = users
                    .into_iter()
                    .filter(|u| !conv.members.contains_key(u))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if conv.members.len() + new.len() > max_members {
                    return Err(StoreError::LimitExceeded(format!(
                        "a group has at most {max_members} members"
                    )));
                }
                self.additions
                    .take_n(actor, new.len(), std::time::Instant::now())?;
                let conv = self.group_for(&conversation, actor, MemberRole::Admin)?;
                for user in &new {
                    conv.members.insert(user.clone(), MemberRole::Member);
                }
                let id = conv.id.clone();
                self.contacts_changed(&id);
                for user in &new {
                    batch.insert(
                        &self.ks.members,
                        pair_key(&id, user),
                        vec![MemberRole::Member as u8],
                    );
                    batch.insert(&self.ks.user_convs, pair_key(user, &id), Vec::new());
                    self.announce(&id, EventKind::MemberAdded, actor, user, &[])?;
                }
                self.snapshot(&id)
            }
            GroupOp::Remove { conversation, user } => {
                let conv = self.group_for(&conversation, actor, MemberRole::Admin)?;
                let actor_role = conv
                    .members
                    .get(actor)
                    .copied()
                    .unwrap_or(MemberRole::Member);
                let Some(&role) = conv.members.get(user.as_str()) else {
                    return Err(StoreError::NotFound(format!("{user} is not a member")));
                };
                if role == MemberRole::Owner
                    || (role == MemberRole::Admin && actor_role != MemberRole::Owner)
                {
                    return Err(StoreError::Forbidden(format!(
                        "{actor} may not remove {user}"
                    )));
                }
                let id = conv.id.clone();
                self.drop_member(&id, actor, &user, EventKind::MemberRemoved, batch)
            }
            GroupOp::Leave { conversation } => {
                let conv = self.group_for(&conversation, actor, MemberRole::Member)?;
                if conv.members.get(actor) == Some(&MemberRole::Owner) {
                    return Err(StoreError::Forbidden(
                        "the owner cannot leave: dissolve the group or hand ownership over first"
                            .into(),
                    ));
                }
                let id = conv.id.clone();
                self.drop_member(&id, actor, actor, EventKind::MemberLeft, batch)
            }
            GroupOp::Dissolve { conversation } => {
                let conv = self.group_for(&conversation, actor, MemberRole::Owner)?;
                conv.dissolved = true;
                let id = conv.id.clone();
                let meta = conv.meta();
                batch.insert(&self.ks.meta, id.as_bytes(), meta);
                self.announce(&id, EventKind::Dissolved, actor, "", &[])?;
                self.snapshot(&id)
            }
            GroupOp::SetRole {
                conversation,
                user,
                role,
            } => {
                let conv = self.group_for(&conversation, actor, MemberRole::Owner)?;
                if !conv.members.contains_key(user.as_str()) {
                    return Err(StoreError::NotFound(format!("{user} is not a member")));
                }
                if user.as_str() == &**actor {
                    return Err(StoreError::InvalidArgument(
                        "the owner's role changes by handing ownership over".into(),
                    ));
                }
                let user: Arc<str> = Arc::from(user.as_str());
                let mut changes = vec![(user.clone(), role)];
                match role {
                    MemberRole::Member | MemberRole::Admin => {}
                    // Handing ownership over: the old owner becomes an admin.
                    MemberRole::Owner => changes.push((actor.clone(), MemberRole::Admin)),
                    MemberRole::Unspecified => {
                        return Err(StoreError::InvalidArgument("role is required".into()));
                    }
                }
                for (who, role) in &changes {
                    conv.members.insert(who.clone(), *role);
                }
                let id = conv.id.clone();
                for (who, role) in &changes {
                    batch.insert(&self.ks.members, pair_key(&id, who), vec![*role as u8]);
                }
                self.announce(&id, EventKind::RoleChanged, actor, &user, &[])?;
                self.snapshot(&id)
            }
        }
    }

    fn create_group(
        &mut self,
        owner: &Arc<str>,
        name: String,
        members: Vec<String>,
        batch: &mut WriteBatch,
    ) -> Result<pb::Conversation, StoreError> {
        if name.len() > MAX_GROUP_NAME {
            return Err(StoreError::InvalidArgument(format!(
                "group name is longer than {MAX_GROUP_NAME} bytes"
            )));
        }
        let mut all: BTreeSet<Arc<str>> = validated(members)?.into_iter().collect();
        all.insert(owner.clone());
        if all.len() > self.limits.max_group_members {
            return Err(StoreError::LimitExceeded(format!(
                "a group has at most {} members",
                self.limits.max_group_members
            )));
        }
        let now = std::time::Instant::now();
        self.starts.take(owner, now)?;
        if let Err(e) = self.additions.take_n(owner, all.len() - 1, now) {
            self.starts.give_back(owner, 1);
            return Err(e);
        }
        let mut raw = [0u8; 8];
        rand::rng().fill_bytes(&mut raw);
        let id: Arc<str> = Arc::from(format!(
            "g:{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let members: crate::FastMap<Arc<str>, MemberRole> = all
            .into_iter()
            .map(|u| {
                let role = if u == *owner {
                    MemberRole::Owner
                } else {
                    MemberRole::Member
                };
                (u, role)
            })
            .collect();
        let conv = Conv {
            id: id.clone(),
            kind: ConversationKind::Group,
            name,
            created_at_ms: unix_now_ms(),
            dissolved: false,
            last_seq: 0,
            members,
        };
        batch.insert(&self.ks.meta, id.as_bytes(), conv.meta());
        for (user, role) in &conv.members {
            batch.insert(&self.ks.members, pair_key(&id, user), vec![*role as u8]);
            batch.insert(&self.ks.user_convs, pair_key(user, &id), Vec::new());
        }
        self.published.conv.insert(id.clone(), 0);
        self.group.touched_convs.insert(id.clone());
        self.convs.insert(id.clone(), conv);
        self.contacts_changed(&id);
        self.announce(&id, EventKind::Created, owner, "", &[])?;
        self.snapshot(&id)
    }

    /// The group `id`, if `actor` holds at least `needed` in it and it is not dissolved.
    fn group_for(
        &mut self,
        id: &str,
        actor: &Arc<str>,
        needed: MemberRole,
    ) -> Result<&mut Conv, StoreError> {
        let conv = self
            .conv(id)?
            .ok_or_else(|| StoreError::NotFound(format!("conversation {id}")))?;
        if conv.kind != ConversationKind::Group {
            return Err(StoreError::InvalidArgument(format!("{id} is not a group")));
        }
        let role = conv
            .members
            .get(actor)
            .copied()
            .ok_or_else(|| StoreError::Forbidden(format!("{actor} is not a member of {id}")))?;
        if conv.dissolved {
            return Err(StoreError::Forbidden(format!("{id} was dissolved")));
        }
        if rank(role) < rank(needed) {
            return Err(StoreError::Forbidden(format!(
                "{actor} is not allowed to do this in {id}"
            )));
        }
        Ok(conv)
    }

    fn drop_member(
        &mut self,
        id: &Arc<str>,
        actor: &Arc<str>,
        user: &str,
        kind: EventKind,
        batch: &mut WriteBatch,
    ) -> Result<pb::Conversation, StoreError> {
        // The leaving member hears of it too, then nothing more.
        let leaving: Arc<str> = Arc::from(user);
        self.announce(id, kind, actor, user, std::slice::from_ref(&leaving))?;
        self.contacts_changed(id);
        if let Some(conv) = self.convs.get_mut(id) {
            conv.members.remove(user);
        }
        batch.remove(&self.ks.members, pair_key(id, user));
        batch.remove(&self.ks.user_convs, pair_key(user, id));
        self.snapshot(id)
    }

    /// Appends a conversation event to every member's inbox (and to `extra` users).
    fn announce(
        &mut self,
        id: &Arc<str>,
        kind: EventKind,
        actor: &str,
        subject: &str,
        extra: &[Arc<str>],
    ) -> Result<(), StoreError> {
        let mut audience: BTreeSet<Arc<str>> = self
            .convs
            .get(id)
            .map(|c| c.members.keys().cloned().collect())
            .unwrap_or_default();
        audience.extend(extra.iter().cloned());
        let event = Arc::new(pb::inbox_entry::Body::Event(pb::ConversationEvent {
            conversation_id: id.to_string(),
            kind: kind as i32,
            actor: actor.to_owned(),
            subject: subject.to_owned(),
            at_ms: unix_now_ms(),
        }));
        for user in &audience {
            self.append_inbox(user, &event)?;
        }
        Ok(())
    }

    fn snapshot(&self, id: &str) -> Result<pb::Conversation, StoreError> {
        self.convs
            .get(id)
            .map(Conv::to_pb)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// "`user` has read `conversation` up to `up_to`": a READ receipt to the senders of the
    /// newly read messages and to the reader's other devices.
    pub(super) fn mark_read(
        &mut self,
        user: &Arc<str>,
        conversation: &str,
        up_to: u64,
        batch: &mut WriteBatch,
    ) -> Result<u64, StoreError> {
        let conv = self
            .conv(conversation)?
            .ok_or_else(|| StoreError::NotFound(format!("conversation {conversation}")))?;
        if !conv.members.contains_key(user) {
            return Err(StoreError::Forbidden(format!(
                "{user} is not a member of {conversation}"
            )));
        }
        let up_to = up_to.min(conv.last_seq);
        let id = conv.id.clone();
        let key = mark_key(&id, user, ReceiptKind::Read as u8);
        let old = self.get_u64(U64Table::Marks, &key)?;
        if up_to <= old {
            return Ok(old);
        }
        let from = (old + 1).max(up_to.saturating_sub(RECEIPT_SCAN_LIMIT) + 1);
        let mut senders: BTreeSet<Arc<str>> = BTreeSet::new();
        super::log::read(&self.ks.log, &id, from, up_to, |message| {
            if message.sender != **user {
                senders.insert(Arc::from(message.sender));
            }
        })?;
        senders.insert(user.clone());
        // Former members hear nothing more from the group, receipts included.
        if let Some(conv) = self.convs.get(&id) {
            senders.retain(|s| conv.members.contains_key(s));
        }
        self.put_u64(U64Table::Marks, key, up_to, batch);
        let receipt = receipt(&id, user, ReceiptKind::Read, up_to);
        for sender in &senders {
            self.append_inbox(sender, &receipt)?;
        }
        Ok(up_to)
    }
}

pub(super) fn receipt(
    conversation: &str,
    user: &str,
    kind: ReceiptKind,
    up_to: u64,
) -> Arc<pb::inbox_entry::Body> {
    Arc::new(pb::inbox_entry::Body::Receipt(pb::Receipt {
        conversation_id: conversation.to_owned(),
        user_id: user.to_owned(),
        kind: kind as i32,
        up_to_seq: up_to,
        at_ms: unix_now_ms(),
    }))
}

fn rank(role: MemberRole) -> u8 {
    match role {
        MemberRole::Unspecified | MemberRole::Member => 0,
        MemberRole::Admin => 1,
        MemberRole::Owner => 2,
    }
}

fn validated(users: Vec<String>) -> Result<Vec<Arc<str>>, StoreError> {
    users
        .into_iter()
        .map(|u| {
            validate_id(&u).map_err(|e| StoreError::InvalidArgument(format!("user {u:?}: {e}")))?;
            Ok(Arc::from(u))
        })
        .collect()
}
