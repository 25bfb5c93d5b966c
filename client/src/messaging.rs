//! Messages, sync, receipts, history and groups.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_protocol::ErrorCode;
use tern_protocol::pb::{
    self, ClientFrame, ServerFrame, client_frame, request, response, server_frame,
};
use tokio::sync::oneshot;

use crate::link::{Link, open_sync};
use crate::transport::FrameReader;
use crate::{Client, ClientError, Event, Inner, lock};

/// Attempts of one send across reconnects; the client message id makes a retry safe.
const SEND_ATTEMPTS: usize = 5;

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SendTarget {
    /// An existing conversation (direct or group).
    Conversation(String),
    /// The direct conversation with this user, created on first send.
    User(String),
}

/// A stored message, as the server acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentMessage {
    pub message_id: String,
    pub conversation_id: String,
    /// Conversation sequence.
    pub seq: u64,
    /// The sender's own inbox sequence for it.
    pub inbox_seq: u64,
    pub sent_at_ms: u64,
    pub client_message_id: String,
    /// The server already had this client message id: nothing new was stored.
    pub duplicate: bool,
}

/// What a sync returned.
#[derive(Debug, Clone, Default)]
pub struct SyncResult {
    /// Every entry after the requested sequence, in inbox order.
    pub entries: Vec<pb::InboxEntry>,
    /// The server's inbox head when the sync ended.
    pub inbox_head: u64,
    /// Set when the device was too far behind; `entries` is then empty.
    pub too_long: Option<pb::SyncTooLong>,
}

/// Marks a client message id as being sent by this device until dropped (also when the
/// app drops the send's future).
struct Sending<'a> {
    inner: &'a Inner,
    id: String,
}

impl<'a> Sending<'a> {
    fn new(inner: &'a Inner, id: &str) -> Self {
        lock(&inner.sending).insert(id.to_owned());
        Self {
            inner,
            id: id.to_owned(),
        }
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        lock(&self.inner.sending).remove(&self.id);
    }
}

/// The sends of one conversation that have not finished, in the order the app made them:
/// ticket → the connection (`stable_id`) it was last written on. A send is written only
/// after every earlier unfinished one was written on the same connection, so sends retried
/// after a lost connection reach the server in their original order (the server stores a
/// stream's sends in stream order, and what the old connection stored is a prefix of them,
/// answered as duplicates).
#[derive(Default)]
pub(crate) struct SendOrder {
    next: u64,
    outstanding: BTreeMap<u64, Option<usize>>,
    turn: Arc<tokio::sync::Notify>,
}

/// A send's place in its conversation's [`SendOrder`], given up when the send finishes
/// (also when the app drops its future).
struct Ticket<'a> {
    inner: &'a Inner,
    key: String,
    n: u64,
    turn: Arc<tokio::sync::Notify>,
}

impl<'a> Ticket<'a> {
    fn new(inner: &'a Inner, key: String) -> Self {
        let mut orders = lock(&inner.send_order);
        let order = orders.entry(key.clone()).or_default();
        let n = order.next;
        order.next += 1;
        order.outstanding.insert(n, None);
        let turn = order.turn.clone();
        drop(orders);
        Self {
            inner,
            key,
            n,
            turn,
        }
    }

    /// Whether every earlier unfinished send was written on connection `conn`.
    fn is_turn(&self, conn: usize) -> bool {
        lock(&self.inner.send_order)
            .get(&self.key)
            .is_none_or(|o| o.outstanding.range(..self.n).all(|(_, w)| *w == Some(conn)))
    }

    /// Waits for this send's turn on `link`; fails if the link is lost meanwhile (an earlier
    /// send then goes to the next link, and so must this one).
    async fn wait_turn(&self, link: &Link) -> Result<(), ClientError> {
        let conn = link.conn.stable_id();
        loop {
            let notified = self.turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_turn(conn) {
                return Ok(());
            }
            tokio::select! {
                () = notified => {}
                _ = link.conn.closed() => return Err(link.lost()),
            }
        }
    }

    fn written_on(&self, conn: usize) {
        if let Some(order) = lock(&self.inner.send_order).get_mut(&self.key) {
            order.outstanding.insert(self.n, Some(conn));
        }
        self.turn.notify_waiters();
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut orders = lock(&self.inner.send_order);
        if let Some(order) = orders.get_mut(&self.key) {
            order.outstanding.remove(&self.n);
            if order.outstanding.is_empty() {
                orders.remove(&self.key);
            }
        }
        drop(orders);
        self.turn.notify_waiters();
    }
}

type AckSlot = oneshot::Sender<Result<pb::SendAck, ClientError>>;

/// One open conversation stream: writes are serialized, answers come back in order.
pub(crate) struct ConversationStream {
    /// `None` once the idle reaper finished the stream; senders then open a new one.
    send: tokio::sync::Mutex<Option<quinn::SendStream>>,
    pending: Arc<Mutex<VecDeque<AckSlot>>>,
    last_used: Mutex<Instant>,
}

impl Client {
    /// Sends `text`. `client_message_id` makes a resend safe at any later time (after the app
    /// restarted, say): a repeat returns the original ids and stores nothing new. Without one,
    /// the client makes an id for this send, and its own retries are recognised.
    pub async fn send(
        &self,
        target: SendTarget,
        text: &str,
        client_message_id: Option<String>,
    ) -> Result<SentMessage, ClientError> {
        let client_message_id = client_message_id.unwrap_or_default();
        self.send_message(
            target,
            pb::SendMessage {
                client_message_id,
                text: text.to_owned(),
                ..Default::default()
            },
        )
        .await
    }

    /// Sends a message with optional opaque payload. If the connection is lost before the
    /// acknowledgement, the send is retried on the next connection with the same client
    /// message id, so it is stored exactly once.
    ///
    /// An id the app sets is recognised whenever it comes again (`ID_SCOPE_ANY_TIME`, the
    /// server indexes it). Without one, the client makes an id for this send that only its
    /// own retries repeat (`ID_SCOPE_RETRIES`): each retry names the inbox cursor from before
    /// the first attempt, and the server looks for the original only after it, which spares
    /// every other send the index.
    pub async fn send_message(
        &self,
        target: SendTarget,
        mut msg: pb::SendMessage,
    ) -> Result<SentMessage, ClientError> {
        let stored_before = lock(&self.inner.inbox).cursor();
        if msg.client_message_id.is_empty() {
            msg.client_message_id = random_id();
            msg.set_id_scope(pb::IdScope::Retries);
        }
        if self.inner.config.single_stream_for_bench {
            // One stream for every conversation: each send names its target.
            match &target {
                SendTarget::Conversation(id) => msg.conversation_id.clone_from(id),
                SendTarget::User(peer) => msg.direct_peer.clone_from(peer),
            }
        }
        let client_message_id = msg.client_message_id.clone();
        let _sending = Sending::new(&self.inner, &client_message_id);
        let ticket = Ticket::new(&self.inner, stream_key(&self.inner, &target));
        let mut result = Err(ClientError::Disconnected);
        for attempt in 0..SEND_ATTEMPTS {
            if attempt > 0 && msg.id_scope() == pb::IdScope::Retries {
                msg.retry_after_inbox_seq = Some(stored_before);
            }
            let link = match self.inner.wait_link().await {
                Ok(link) => link,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            result = self.send_on(&link, &target, msg.clone(), &ticket).await;
            match &result {
                Err(e)
                    if e.is_transient()
                        || matches!(e, ClientError::Closed | ClientError::Unexpected(_)) =>
                {
                    // Wait for this link to be replaced, then retry.
                    if link.conn.close_reason().is_none() {
                        break;
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), self.inner.wait_link()).await;
                }
                _ => break,
            }
        }
        let ack = result?;
        Ok(ack)
    }

    async fn send_on(
        &self,
        link: &Arc<Link>,
        target: &SendTarget,
        msg: pb::SendMessage,
        ticket: &Ticket<'_>,
    ) -> Result<SentMessage, ClientError> {
        let client_message_id = msg.client_message_id.clone();
        let bytes = tern_protocol::frame::frame_bytes(
            &ClientFrame {
                body: Some(client_frame::Body::Send(msg)),
            },
            link.max_frame,
        )?;
        let rx = loop {
            let stream = conversation_stream(&self.inner, link, target).await?;
            // Not holding the stream's lock while waiting: the earlier sends need it.
            ticket.wait_turn(link).await?;
            let mut guard = stream.send.lock().await;
            // Reaped between lookup and lock: the map no longer holds it, so this opens anew.
            let Some(send) = guard.as_mut() else { continue };
            *lock(&stream.last_used) = Instant::now();
            let (tx, rx) = oneshot::channel();
            lock(&stream.pending).push_back(tx);
            if let Err(e) = send.write_chunk(bytes.clone()).await {
                drop(guard);
                link.conversations
                    .lock()
                    .await
                    .remove(&stream_key(&self.inner, target));
                return Err(e.into());
            }
            ticket.written_on(link.conn.stable_id());
            break rx;
        };
        let ack = rx.await.map_err(|_| link.lost())??;
        // Answers are paired with sends by position; a mismatch means a lost or extra
        // answer, and the ids would belong to another message.
        if ack.client_message_id != client_message_id {
            link.close(
                ErrorCode::ProtocolViolation,
                "send answers out of step with sends",
            );
            return Err(ClientError::Unexpected(format!(
                "answer for {} while waiting for {client_message_id}",
                ack.client_message_id
            )));
        }
        // The server does not push our own message back to this device.
        self.inner
            .record_own_ack(link.conn.stable_id(), ack.inbox_seq);
        Ok(SentMessage {
            message_id: ack.message_id,
            conversation_id: ack.conversation_id,
            seq: ack.seq,
            inbox_seq: ack.inbox_seq,
            sent_at_ms: ack.sent_at_ms,
            client_message_id,
            duplicate: ack.duplicate,
        })
    }

    /// Every inbox entry after `since`, in pages, as one result. Entries are also marked as
    /// received; call [`Client::ack`] to advance the server's cursor for this device.
    pub async fn sync(&self, since: u64) -> Result<SyncResult, ClientError> {
        let link = self.inner.wait_link().await?;
        self.inner.sync_on(&link, since, false).await
    }

    /// Acknowledges everything up to `inbox_seq` (cumulative).
    pub async fn ack(&self, inbox_seq: u64) -> Result<(), ClientError> {
        let link = self.inner.wait_link().await?;
        let frame = ClientFrame {
            body: Some(client_frame::Body::AckInbox(pb::AckInbox {
                up_to_inbox_seq: inbox_seq,
            })),
        };
        link.write_control(&frame, link.max_frame).await
    }

    /// Messages of a conversation before `before_seq` (0: the newest), newest first.
    pub async fn history(
        &self,
        conversation_id: &str,
        before_seq: u64,
        limit: u32,
    ) -> Result<pb::HistoryPage, ClientError> {
        let req = request::Body::History(pb::HistoryRequest {
            conversation_id: conversation_id.to_owned(),
            before_seq,
            limit,
        });
        match self.inner.request(req).await? {
            response::Body::HistoryPage(page) => Ok(page),
            other => Err(unexpected(other)),
        }
    }

    /// Marks `conversation_id` read up to `up_to_seq`; the senders get read receipts.
    pub async fn mark_read(
        &self,
        conversation_id: &str,
        up_to_seq: u64,
    ) -> Result<(), ClientError> {
        let req = request::Body::MarkRead(pb::MarkRead {
            conversation_id: conversation_id.to_owned(),
            up_to_seq,
        });
        self.inner.request(req).await.map(drop)
    }

    pub async fn create_group(
        &self,
        name: &str,
        members: &[String],
    ) -> Result<pb::Conversation, ClientError> {
        self.conversation_call(request::Body::CreateGroup(pb::CreateGroup {
            name: name.to_owned(),
            members: members.to_vec(),
        }))
        .await
    }

    pub async fn add_members(
        &self,
        conversation_id: &str,
        users: &[String],
    ) -> Result<pb::Conversation, ClientError> {
        self.conversation_call(request::Body::AddMembers(pb::AddMembers {
            conversation_id: conversation_id.to_owned(),
            user_ids: users.to_vec(),
        }))
        .await
    }

    pub async fn remove_member(
        &self,
        conversation_id: &str,
        user: &str,
    ) -> Result<pb::Conversation, ClientError> {
        self.conversation_call(request::Body::RemoveMember(pb::RemoveMember {
            conversation_id: conversation_id.to_owned(),
            user_id: user.to_owned(),
        }))
        .await
    }

    pub async fn leave_group(
        &self,
        conversation_id: &str,
    ) -> Result<pb::Conversation, ClientError> {
        self.conversation_call(request::Body::LeaveGroup(pb::LeaveGroup {
            conversation_id: conversation_id.to_owned(),
        }))
        .await
    }

    pub async fn dissolve_group(
        &self,
        conversation_id: &str,
    ) -> Result<pb::Conversation, ClientError> {
        self.conversation_call(request::Body::DissolveGroup(pb::DissolveGroup {
            conversation_id: conversation_id.to_owned(),
        }))
        .await
    }

    pub async fn set_role(
        &self,
        conversation_id: &str,
        user: &str,
        role: pb::MemberRole,
    ) -> Result<pb::Conversation, ClientError> {
        self.conversation_call(request::Body::SetRole(pb::SetRole {
            conversation_id: conversation_id.to_owned(),
            user_id: user.to_owned(),
            role: role as i32,
        }))
        .await
    }

    pub async fn conversation(
        &self,
        conversation_id: &str,
    ) -> Result<pb::Conversation, ClientError> {
        self.conversation_call(request::Body::GetConversation(pb::GetConversation {
            conversation_id: conversation_id.to_owned(),
        }))
        .await
    }

    pub async fn conversations(&self) -> Result<Vec<pb::Conversation>, ClientError> {
        match self
            .inner
            .request(request::Body::ListConversations(pb::ListConversations {}))
            .await?
        {
            response::Body::ConversationList(list) => Ok(list.conversations),
            other => Err(unexpected(other)),
        }
    }

    async fn conversation_call(&self, req: request::Body) -> Result<pb::Conversation, ClientError> {
        match self.inner.request(req).await? {
            response::Body::Conversation(conv) => Ok(conv),
            other => Err(unexpected(other)),
        }
    }
}

/// The conversation's stream on `link`, opened if needed.
async fn conversation_stream(
    inner: &Arc<Inner>,
    link: &Arc<Link>,
    target: &SendTarget,
) -> Result<Arc<ConversationStream>, ClientError> {
    let key = stream_key(inner, target);
    if let Some(stream) = link.conversations.lock().await.get(&key) {
        return Ok(stream.clone());
    }
    // Not holding the map lock here: opening may wait for stream credit, which the idle
    // reaper (which needs the map) frees.
    let (mut send, recv) = link.conn.open_bi().await?;
    let open = match target {
        _ if inner.config.single_stream_for_bench => pb::OpenConversation {
            multiplexed: true,
            ..Default::default()
        },
        SendTarget::Conversation(id) => pb::OpenConversation {
            conversation_id: id.clone(),
            ..Default::default()
        },
        SendTarget::User(peer) => pb::OpenConversation {
            direct_peer: peer.clone(),
            ..Default::default()
        },
    };
    let frame = ClientFrame {
        body: Some(client_frame::Body::OpenConversation(open)),
    };
    send.write_chunk(tern_protocol::frame::frame_bytes(&frame, link.max_frame)?)
        .await?;
    let pending: Arc<Mutex<VecDeque<AckSlot>>> = Arc::default();
    let stream = Arc::new(ConversationStream {
        send: tokio::sync::Mutex::new(Some(send)),
        pending: pending.clone(),
        last_used: Mutex::new(Instant::now()),
    });
    let mut streams = link.conversations.lock().await;
    if let Some(existing) = streams.get(&key) {
        // Another send opened one meanwhile: use it, so the conversation keeps one stream.
        if let Some(mut ours) = stream.send.lock().await.take() {
            let _ = ours.finish();
        }
        return Ok(existing.clone());
    }
    streams.insert(key.clone(), stream.clone());
    drop(streams);
    tokio::spawn(read_acks(
        FrameReader::new(recv, link.max_frame),
        pending,
        link.clone(),
        key,
    ));
    Ok(stream)
}

impl Inner {
    /// One request on its own stream; the first response (or error).
    async fn request(&self, body: request::Body) -> Result<response::Body, ClientError> {
        let link = self.wait_link().await?;
        let (mut send, recv) = link.conn.open_bi().await?;
        let frame = ClientFrame {
            body: Some(client_frame::Body::Request(pb::Request {
                body: Some(body),
            })),
        };
        send.write_chunk(tern_protocol::frame::frame_bytes(&frame, link.max_frame)?)
            .await?;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, link.max_frame);
        response_of(reader.next::<ServerFrame>().await?)
    }

    /// Pages the inbox after `since` on `link`. With `emit`, new entries become events.
    pub(crate) async fn sync_on(
        &self,
        link: &Link,
        since: u64,
        emit: bool,
    ) -> Result<SyncResult, ClientError> {
        let reader = open_sync(&link.conn, since, link.max_frame).await?;
        self.read_sync(reader, emit).await
    }

    /// Syncs after `cursor` to fill a gap that stayed open, without the sync gate: pushes of
    /// every conversation go on meanwhile. Holding them back made one conversation's slow
    /// entries (the usual cause of a gap: small messages overtook large ones queued on
    /// another push stream) delay all the others, the head-of-line blocking streams exist to
    /// avoid. Each conversation's events stay in order without the gate: its push stream and
    /// the sync both deliver its entries in order, and an entry is reported on its first
    /// arrival only, so no entry can be reported before an earlier one of its conversation.
    pub(crate) async fn fill_gap(&self, link: &Link, cursor: u64) -> Result<(), ClientError> {
        let reader = open_sync(&link.conn, cursor, link.max_frame).await?;
        self.read_sync_gated(reader, true).await.map(drop)
    }

    /// Reads a sync's pages from its response stream.
    pub(crate) async fn read_sync(
        &self,
        reader: FrameReader,
        emit: bool,
    ) -> Result<SyncResult, ClientError> {
        let _gate = if emit {
            Some(self.sync_gate.write().await)
        } else {
            None
        };
        self.read_sync_gated(reader, emit).await
    }

    /// [`Inner::read_sync`] for a caller that holds the sync gate already.
    pub(crate) async fn read_sync_gated(
        &self,
        mut reader: FrameReader,
        emit: bool,
    ) -> Result<SyncResult, ClientError> {
        let mut result = SyncResult::default();
        loop {
            match response_of(reader.next::<ServerFrame>().await?)? {
                response::Body::SyncPage(page) => {
                    result.inbox_head = page.inbox_head;
                    for entry in page.entries {
                        self.receive(&entry, emit).await;
                        if !emit {
                            result.entries.push(entry);
                        }
                    }
                    if page.complete {
                        return Ok(result);
                    }
                }
                response::Body::SyncTooLong(too_long) => {
                    if too_long.device_ahead {
                        self.rewind_to(too_long.inbox_head);
                    } else {
                        lock(&self.inbox).reset_to(too_long.inbox_head);
                    }
                    result.inbox_head = too_long.inbox_head;
                    if emit {
                        let event = Event::SyncTooLong {
                            inbox_head: too_long.inbox_head,
                            heads: too_long.heads.clone(),
                        };
                        self.emit(event).await;
                    }
                    result.too_long = Some(too_long);
                    return Ok(result);
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Records the inbox sequence of this device's acknowledged send (acknowledged on the
    /// connection `conn_id`). A sync page with the entry then finds it received.
    pub(crate) fn record_own_ack(&self, conn_id: usize, inbox_seq: u64) {
        if let Some(acks) = lock(&self.own_acks_before_sync).as_mut() {
            acks.push((conn_id, inbox_seq));
        }
        lock(&self.inbox).accept(inbox_seq);
    }

    /// Moves the cursor back to a restored store's head, then records again this device's own
    /// sends that the current connection acknowledged during its first sync: they are in the
    /// store's new numbering, and may have been taken for old entries before the rewind.
    fn rewind_to(&self, inbox_head: u64) {
        let conn_id = self.current().ok().map(|link| link.conn.stable_id());
        let acks = lock(&self.own_acks_before_sync).clone().unwrap_or_default();
        let mut inbox = lock(&self.inbox);
        inbox.rewind_to(inbox_head);
        for (_, seq) in acks.iter().filter(|(id, _)| Some(*id) == conn_id) {
            inbox.accept(*seq);
        }
    }

    /// The link's first sync has ended: own acks are no longer kept for a rewind.
    pub(crate) fn first_sync_ended(&self) {
        *lock(&self.own_acks_before_sync) = None;
    }

    /// Records an entry; reports it as an event if it is new and `emit`. Returns whether new.
    pub(crate) async fn receive(&self, entry: &pb::InboxEntry, emit: bool) -> bool {
        let own_send_in_flight = matches!(&entry.body, Some(pb::inbox_entry::Body::Message(m))
            if m.sender == self.user
                && m.sender_device == self.device
                && lock(&self.sending).contains(&m.client_message_id));
        let event = if emit && !own_send_in_flight {
            event_of(entry)
        } else {
            None
        };
        // Accepted and held under one lock: the ack loop never sees it received but not held.
        let new = {
            let mut inbox = lock(&self.inbox);
            let new = inbox.accept(entry.inbox_seq);
            if new && event.is_some() {
                inbox.hold(entry.inbox_seq);
            }
            new
        };
        if new && let Some(event) = event {
            let unsent = UnsentEvent {
                inner: self,
                seq: entry.inbox_seq,
            };
            self.emit(event).await;
            std::mem::forget(unsent);
        }
        new
    }
}

/// An event held for the app but not yet in its channel. Dropped there (the receiving task
/// was cancelled while the channel was full), it makes the tracker forget the entry
/// ([`crate::inbox::InboxTracker::forget`]), so the next sync fetches it again.
struct UnsentEvent<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl Drop for UnsentEvent<'_> {
    fn drop(&mut self) {
        lock(&self.inner.inbox).forget(self.seq);
    }
}

fn event_of(entry: &pb::InboxEntry) -> Option<Event> {
    let inbox_seq = entry.inbox_seq;
    Some(match entry.body.clone()? {
        pb::inbox_entry::Body::Message(message) => Event::Message { message, inbox_seq },
        pb::inbox_entry::Body::Receipt(receipt) => Event::Receipt { receipt, inbox_seq },
        pb::inbox_entry::Body::Event(event) => Event::Conversation { event, inbox_seq },
    })
}

fn response_of(frame: Option<ServerFrame>) -> Result<response::Body, ClientError> {
    match frame.and_then(|f| f.body) {
        Some(server_frame::Body::Response(pb::Response { body: Some(body) })) => Ok(body),
        Some(server_frame::Body::Error(e)) => Err(e.into()),
        other => Err(ClientError::Unexpected(format!(
            "expected a response, got {other:?}"
        ))),
    }
}

fn unexpected(body: response::Body) -> ClientError {
    ClientError::Unexpected(format!("unexpected response {body:?}"))
}

/// The key of the stream that carries sends to `target`.
fn stream_key(inner: &Inner, target: &SendTarget) -> String {
    if inner.config.single_stream_for_bench {
        return "single".to_owned();
    }
    match target {
        SendTarget::Conversation(id) => format!("c:{id}"),
        SendTarget::User(peer) => format!("u:{peer}"),
    }
}

/// 96 random bits as 24 hex digits, formatted at once: a `format!` per byte (12 small
/// allocations) was 5% of the bench client's CPU once every send without an app id used it.
fn random_id() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}

/// Completes pending sends in order as their acks (or errors) arrive.
async fn read_acks(
    mut reader: FrameReader,
    pending: Arc<Mutex<VecDeque<AckSlot>>>,
    link: Arc<Link>,
    key: String,
) {
    loop {
        let result = match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::SendAck(ack)),
            })) => Ok(ack),
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Error(e)),
            })) => Err(ClientError::from(e)),
            Ok(_) => break,
            Err(e) => {
                let error = match link.conn.close_reason() {
                    Some(reason) => ClientError::from(reason),
                    None => e,
                };
                for slot in lock(&pending).drain(..) {
                    let _ = slot.send(Err(error.clone()));
                }
                break;
            }
        };
        let slot = lock(&pending).pop_front();
        if let Some(slot) = slot {
            let _ = slot.send(result);
        }
    }
    // Forget this stream, unless a newer stream for the conversation has replaced it.
    let mut streams = link.conversations.lock().await;
    if streams
        .get(&key)
        .is_some_and(|s| Arc::ptr_eq(&s.pending, &pending))
    {
        streams.remove(&key);
    }
    drop(streams);
    for slot in lock(&pending).drain(..) {
        let _ = slot.send(Err(link.lost()));
    }
}

/// Accepts the server's push streams, one task per conversation stream.
pub(crate) async fn accept_pushes(link: Arc<Link>, inner: Arc<Inner>) {
    while let Ok(recv) = link.conn.accept_uni().await {
        tokio::spawn(read_pushes(
            FrameReader::new(recv, link.max_frame),
            inner.clone(),
        ));
    }
}

async fn read_pushes(mut reader: FrameReader, inner: Arc<Inner>) {
    let conversation = match reader.next::<ServerFrame>().await {
        Ok(Some(ServerFrame {
            body: Some(server_frame::Body::PushHeader(h)),
        })) => h.conversation_id,
        _ => return,
    };
    loop {
        loop {
            let notified = inner.unpaused.notified();
            if !lock(&inner.paused).contains(&conversation) {
                break;
            }
            notified.await;
        }
        match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Entry(entry)),
            })) => {
                let _gate = inner.sync_gate.read().await;
                inner.receive(&entry, true).await;
            }
            _ => return,
        }
    }
}

/// Finishes conversation streams that have been idle for `idle`, so a client active in many
/// conversations over time stays within the server's stream limit.
pub(crate) async fn reap_idle_streams(link: Arc<Link>, idle: Duration) {
    let mut tick = tokio::time::interval((idle / 2).max(Duration::from_millis(10)));
    loop {
        tick.tick().await;
        let mut streams = link.conversations.lock().await;
        streams.retain(|_, stream| {
            let busy =
                !lock(&stream.pending).is_empty() || lock(&stream.last_used).elapsed() < idle;
            if busy {
                return true;
            }
            // A sender holding the lock is about to use it: keep it.
            let Ok(mut send) = stream.send.try_lock() else {
                return true;
            };
            if let Some(mut send) = send.take() {
                let _ = send.finish();
            }
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::random_id;

    #[test]
    fn random_ids_are_24_hex_digits_and_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| random_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 24, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
    }
}
