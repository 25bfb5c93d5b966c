//! Storing a message: sequence, log entry, every member's inbox reference, and recognising
//! repeats of a client id ([`super::dedup`]).

use std::sync::Arc;

use fjall::OwnedWriteBatch as WriteBatch;
use prost::Message as _;
use tern_protocol::pb::{self, ConversationKind, IdScope, MemberRole};

use super::StoreError;
use super::dedup;
use super::handle::{SendOutcome, Target};
use super::inbox::Stored;
use super::keys::pair_key;
use super::log;
use super::writer::{Conv, Writer};

/// The answer to a repeat of the send that had `outcome`.
fn duplicate_of(outcome: &SendOutcome) -> SendOutcome {
    SendOutcome {
        duplicate: true,
        ..outcome.clone()
    }
}

impl Writer {
    pub(super) fn send(
        &mut self,
        sender: &Arc<str>,
        device: &Arc<str>,
        target: Target,
        msg: pb::SendMessage,
        batch: &mut WriteBatch,
    ) -> Result<SendOutcome, StoreError> {
        let size = msg.text.len() + msg.payload.len();
        if size > self.limits.max_message_bytes {
            return Err(StoreError::MessageTooLarge {
                size,
                max: self.limits.max_message_bytes,
            });
        }
        if msg.client_message_id.len() > 128 {
            return Err(StoreError::InvalidArgument(
                "client_message_id is longer than 128 bytes".into(),
            ));
        }
        if let Some(outcome) = self.find_original(sender, &msg)? {
            return Ok(outcome);
        }
        self.sends.take(sender, std::time::Instant::now())?;
        let stored = self.store_new(sender, device, target, msg, batch);
        if stored.is_err() {
            // Refused for another reason: it stored nothing, so it costs nothing.
            self.sends.give_back(sender, 1);
        }
        stored
    }

    /// Stores a send that is not a repeat: its conversation (started if direct and new), its
    /// sequence, log entry and inbox references.
    fn store_new(
        &mut self,
        sender: &Arc<str>,
        device: &Arc<str>,
        target: Target,
        msg: pb::SendMessage,
        batch: &mut WriteBatch,
    ) -> Result<SendOutcome, StoreError> {
        let scope = msg.id_scope();
        let conv_id = match &target {
            Target::Conversation(id) => id.clone(),
            Target::Direct(peer) => {
                tern_protocol::ids::validate_id(peer)
                    .map_err(|e| StoreError::InvalidArgument(format!("peer: {e}")))?;
                if **peer == **sender {
                    return Err(StoreError::InvalidArgument(
                        "a direct conversation needs another user".into(),
                    ));
                }
                let id = tern_protocol::ids::direct_conversation_id(sender, peer);
                if self.conv(&id)?.is_none() {
                    self.starts.take(sender, std::time::Instant::now())?;
                    self.create_direct(&id, sender, peer, batch);
                }
                id
            }
        };
        let conv = self
            .conv(&conv_id)?
            .ok_or_else(|| StoreError::NotFound(format!("conversation {conv_id}")))?;
        if conv.dissolved {
            return Err(StoreError::Forbidden(format!(
                "conversation {conv_id} was dissolved"
            )));
        }
        if !conv.members.contains_key(sender) {
            return Err(StoreError::Forbidden(format!(
                "{sender} is not a member of {conv_id}"
            )));
        }
        let members: Vec<Arc<str>> = conv.members.keys().cloned().collect();
        // Load everything that can fail before changing anything: a failed send must leave
        // no partial write (and no sequence gap) behind.
        for member in &members {
            self.inbox_head(member)?;
        }
        let conv = self
            .convs
            .get_mut(conv_id.as_str())
            .ok_or_else(|| StoreError::NotFound(format!("conversation {conv_id}")))?;
        conv.last_seq += 1;
        let seq = conv.last_seq;
        let conv_arc = conv.id.clone();
        self.group.touched_convs.insert(conv_arc.clone());

        let message_id = tern_protocol::ids::message_id(&conv_id, seq);
        let sent_at_ms = crate::auth::unix_now_ms();
        // The ack path needs ids, not the body: queued acks must not hold 64 KiB each.
        let header = pb::Message {
            message_id: message_id.clone(),
            conversation_id: conv_id.clone(),
            seq,
            sent_at_ms,
            ..Default::default()
        };
        // Inboxes hold a reference (conversation, seq, sender); readers resolve it from the
        // log. The sender's own entry also keeps the client id: retries are looked up there.
        // Each is encoded once, whatever the number of members.
        let client_message_id = msg.client_message_id;
        let mut reference = pb::Message {
            conversation_id: conv_id.clone(),
            seq,
            sender: sender.to_string(),
            sender_device: device.to_string(),
            ..Default::default()
        };
        let others_reference = reference.encode_to_vec();
        reference.client_message_id.clone_from(&client_message_id);
        let own_reference = reference.encode_to_vec();
        let message = pb::Message {
            message_id,
            text: msg.text,
            payload: msg.payload,
            sent_at_ms,
            ..reference
        };
        let chunk = self.group.log_chunks.entry(conv_arc.clone()).or_default();
        chunk.push(&message);
        if chunk.len() >= log::CHUNK_BYTES
            && let Some((key, value)) = chunk.take_record(&conv_id)
        {
            batch.insert(&self.ks.log, key, value);
        }
        // Delivery gets the message itself, shared by every member: pushers need not read
        // back what was just written.
        let delivered = Arc::new(pb::inbox_entry::Body::Message(message));
        let mut sender_inbox_seq = 0;
        for member in &members {
            let stored = if member == sender {
                Stored::Reference(&own_reference)
            } else {
                Stored::Reference(&others_reference)
            };
            let inbox_seq = self.append_entry(member, stored, delivered.clone())?;
            if member == sender {
                sender_inbox_seq = inbox_seq;
            } else {
                self.remembered
                    .push(member, inbox_seq, &conv_arc, seq, sender);
            }
        }
        let outcome = SendOutcome {
            message: header,
            duplicate: false,
            sender_inbox_seq,
        };
        let id = &client_message_id;
        if !id.is_empty() {
            match (scope, msg.retry_after_inbox_seq) {
                (IdScope::AnyTime, _) => {
                    batch.insert(
                        &self.ks.idem,
                        pair_key(sender, id),
                        dedup::index_record(seq, sender_inbox_seq, &conv_id),
                    );
                    self.group
                        .idem
                        .entry(sender.clone())
                        .or_default()
                        .insert(id.clone(), outcome.clone());
                }
                (IdScope::Retries, Some(_)) => {
                    self.retries
                        .insert(sender.clone(), id.clone(), duplicate_of(&outcome));
                }
                (IdScope::Retries, None) => {}
            }
        }
        Ok(outcome)
    }

    /// The original of a repeated client message id, as far back as the send's scope asks
    /// ([`dedup`]); this group's own sends are not on disk yet and are checked first.
    fn find_original(
        &mut self,
        sender: &Arc<str>,
        msg: &pb::SendMessage,
    ) -> Result<Option<SendOutcome>, StoreError> {
        let id = msg.client_message_id.as_str();
        if id.is_empty() {
            return Ok(None);
        }
        match (msg.id_scope(), msg.retry_after_inbox_seq) {
            (IdScope::AnyTime, _) => {
                if let Some(outcome) = self.group.idem.get(sender).and_then(|ids| ids.get(id)) {
                    return Ok(Some(duplicate_of(outcome)));
                }
                dedup::find_indexed(&self.ks.idem, &self.ks.log, sender, id)
            }
            (IdScope::Retries, Some(after)) => {
                if let Some(outcome) = self.find_in_group(sender, id) {
                    return Ok(Some(outcome));
                }
                let head = self.inbox_head(sender)?;
                match self.retries.get(sender, id) {
                    Some(outcome) => Ok(Some(outcome)),
                    None => dedup::find_retried(
                        &self.ks.inbox,
                        &self.ks.log,
                        &mut self.scan_budgets,
                        sender,
                        id,
                        after,
                        head,
                    ),
                }
            }
            (IdScope::Retries, None) => Ok(self.retries.get(sender, id)),
        }
    }

    /// A send of `sender` with client id `id` earlier in this group (not on disk yet), as its
    /// duplicate. Only retries look here, so the scan is rare.
    fn find_in_group(&self, sender: &Arc<str>, id: &str) -> Option<SendOutcome> {
        self.group.appended.get(sender)?.iter().find_map(|entry| {
            let pb::inbox_entry::Body::Message(m) = &*entry.body else {
                return None;
            };
            (m.client_message_id == id && *m.sender == **sender).then(|| SendOutcome {
                message: pb::Message {
                    text: String::new(),
                    payload: Vec::new(),
                    ..m.clone()
                },
                duplicate: true,
                sender_inbox_seq: entry.inbox_seq,
            })
        })
    }

    fn create_direct(&mut self, id: &str, a: &Arc<str>, b: &str, batch: &mut WriteBatch) {
        let b: Arc<str> = Arc::from(b);
        let id: Arc<str> = Arc::from(id);
        let conv = Conv {
            id: id.clone(),
            kind: ConversationKind::Direct,
            name: String::new(),
            created_at_ms: crate::auth::unix_now_ms(),
            dissolved: false,
            last_seq: 0,
            members: [
                (a.clone(), MemberRole::Member),
                (b.clone(), MemberRole::Member),
            ]
            .into_iter()
            .collect(),
        };
        batch.insert(&self.ks.meta, id.as_bytes(), conv.meta());
        for user in [a, &b] {
            batch.insert(
                &self.ks.members,
                pair_key(&id, user),
                vec![MemberRole::Member as u8],
            );
            batch.insert(&self.ks.user_convs, pair_key(user, &id), Vec::new());
        }
        self.published.conv.insert(id.clone(), 0);
        self.group.touched_convs.insert(id.clone());
        self.convs.insert(id.clone(), conv);
        self.contacts_changed(&id);
    }
}
