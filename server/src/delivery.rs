//! Delivery to connected devices.
//!
//! The store tells a [`Delivery`] that a user's inbox grew ("inbox of alice now ends at 42").
//! That one call is the whole interface between storage and delivery: a cross-node router
//! implements it by publishing the same fact to the node holding alice's sessions.
//!
//! [`LocalDelivery`] records the new head in each of the user's sessions. Each session's pusher
//! then reads the new entries from the inbox (the truth) and hands each to the writer task of
//! its conversation's push stream. Nothing here ever waits on a device: heads are a `watch`,
//! and when a conversation's queue is full that conversation is held back (its later entries
//! are not queued) until its stream drains; then its entries are re-read from the inbox, so
//! each conversation stays in order and no other conversation waits.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_protocol::pb::{self, ServerFrame, server_frame};
use tokio::sync::{mpsc, watch};
use tracing::debug;

use crate::ServerState;
use crate::framed::write_frame;
use crate::registry::{Registry, Session};

/// Entries queued per conversation push stream before that conversation starts dropping.
const CONVERSATION_QUEUE: usize = 128;
/// A push stream with nothing to send for this long is finished; the next entry opens another.
const PUSH_STREAM_IDLE: Duration = Duration::from_secs(30);
/// Inbox entries the pusher reads at a time.
const READ_BATCH: usize = 256;
/// Most entries a push stream writes at once.
const PUSH_BATCH: usize = 64;

/// Where the store reports inbox growth.
pub trait Delivery: Send + Sync + 'static {
    /// `user`'s inbox now durably ends at `inbox_head`. Must not block.
    fn inbox_advanced(&self, user: &str, inbox_head: u64);
}

/// Delivery to the sessions connected to this node.
#[derive(Debug)]
pub struct LocalDelivery {
    registry: Arc<Registry>,
}

impl LocalDelivery {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self { registry }
    }
}

impl Delivery for LocalDelivery {
    fn inbox_advanced(&self, user: &str, inbox_head: u64) {
        for session in self.registry.sessions_of(user) {
            session.push.advance(inbox_head);
        }
    }
}

/// A session's push position.
#[derive(Debug)]
pub struct PushState {
    /// Highest durable inbox sequence of the user.
    head: watch::Sender<u64>,
    /// Where live pushing starts: set when the device's first sync completes.
    live_from: watch::Sender<Option<u64>>,
}

impl PushState {
    pub fn new(head: u64) -> Self {
        Self {
            head: watch::Sender::new(head),
            live_from: watch::Sender::new(None),
        }
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    pub fn advance(&self, head: u64) {
        self.head.send_if_modified(|h| {
            let grew = head > *h;
            if grew {
                *h = head;
            }
            grew
        });
    }

    /// Starts live pushing after `inbox_seq`, unless already live. Returns whether it started.
    pub fn go_live(&self, inbox_seq: u64) -> bool {
        self.live_from.send_if_modified(|from| {
            if from.is_none() {
                *from = Some(inbox_seq);
                true
            } else {
                false
            }
        })
    }
}

/// Pushes a session's new inbox entries until the connection closes.
pub async fn push_loop(state: Arc<ServerState>, session: Arc<Session>) {
    let mut live = session.push.live_from.subscribe();
    let mut pushed = loop {
        if let Some(from) = *live.borrow_and_update() {
            break from;
        }
        if live.changed().await.is_err() {
            return;
        }
    };
    debug!(from = pushed, "session live");
    let mut heads = session.push.head.subscribe();
    let (drained_tx, mut drained_rx) = mpsc::unbounded_channel();
    let mut pusher = Pusher {
        state: state.clone(),
        session: session.clone(),
        queues: HashMap::new(),
        lagging: HashMap::new(),
        drained_tx,
    };
    loop {
        let head = *heads.borrow_and_update();
        while pushed < head {
            let Some((entries, scanned)) = pusher.read(pushed) else {
                break;
            };
            for entry in entries {
                pusher.route(entry);
            }
            pushed = scanned;
        }
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { return },
            Some((conversation, unwritten)) = drained_rx.recv() => pusher.drained(&conversation, unwritten, pushed),
            _ = session.conn.closed() => return,
        }
    }
}

struct ConversationQueue {
    tx: mpsc::Sender<Arc<pb::InboxEntry>>,
    /// Set when an entry did not fit; the stream task reports when it has drained.
    overflowed: Arc<AtomicBool>,
}

/// Routes a session's entries to per-conversation push streams.
struct Pusher {
    state: Arc<ServerState>,
    session: Arc<Session>,
    queues: HashMap<String, ConversationQueue>,
    /// Conversations whose queue was full: the first inbox sequence not queued. Their later
    /// entries are not queued either (order), until the stream drains and `resume` re-reads.
    lagging: HashMap<String, u64>,
    drained_tx: mpsc::UnboundedSender<(String, Option<u64>)>,
}

impl Pusher {
    /// The next entries after `after` for this device (its own sends left out) and the last
    /// inbox sequence read; `None` when there is nothing new.
    fn read(&self, after: u64) -> Option<(Vec<pb::InboxEntry>, u64)> {
        match self.state.store.read_inbox_for(
            &self.session.user,
            Some(&self.session.device),
            after,
            READ_BATCH,
        ) {
            Ok((entries, scanned)) if scanned > after => Some((entries, scanned)),
            Ok(_) => None,
            Err(e) => {
                debug!(error = %e, "push read failed; the device recovers by sync");
                None
            }
        }
    }

    /// Queues `entry` on its conversation's push stream, opening one if needed. Never waits.
    fn route(&mut self, entry: pb::InboxEntry) {
        if is_own_send(&entry, &self.session) {
            // The sending device learnt this entry's inbox sequence from its SendAck.
            return;
        }
        let conversation = conversation_of(&entry).to_owned();
        if self.lagging.contains_key(&conversation) {
            return;
        }
        let mut entry = Arc::new(entry);
        for _ in 0..2 {
            let queue = self.queues.entry(conversation.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(CONVERSATION_QUEUE);
                let overflowed = Arc::new(AtomicBool::new(false));
                let task = PushStream {
                    state: self.state.clone(),
                    session: self.session.clone(),
                    conversation: conversation.clone(),
                    overflowed: overflowed.clone(),
                    drained_tx: self.drained_tx.clone(),
                };
                tokio::spawn(task.run(rx));
                ConversationQueue { tx, overflowed }
            });
            match queue.tx.try_send(entry) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(missed)) => {
                    debug!(%conversation, "push queue full; holding the conversation back");
                    self.lagging.insert(conversation.clone(), missed.inbox_seq);
                    queue.overflowed.store(true, Ordering::SeqCst);
                    // The stream may have drained before the flag was set; then report it here.
                    if queue.tx.capacity() == CONVERSATION_QUEUE
                        && queue.overflowed.swap(false, Ordering::SeqCst)
                    {
                        let _ = self.drained_tx.send((conversation, None));
                    }
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    // The stream went idle and closed; open a new one.
                    self.queues.remove(&conversation);
                    entry = back;
                }
            }
        }
    }

    /// A lagging conversation's stream drained: queue its entries again from where it fell
    /// behind, up to `pushed` (later entries come through the main loop).
    /// A conversation's stream drained, or ended with `unwritten` entries: continue it.
    fn drained(&mut self, conversation: &str, unwritten: Option<u64>, pushed: u64) {
        if let Some(from) = unwritten {
            if self.session.conn.close_reason().is_some() {
                return;
            }
            // The stream is gone: the next entry opens a new one, starting from the first
            // entry the old one did not write.
            self.queues.remove(conversation);
            let lagging = self.lagging.entry(conversation.to_owned()).or_insert(from);
            *lagging = (*lagging).min(from);
        }
        self.resume(conversation, pushed);
    }

    fn resume(&mut self, conversation: &str, pushed: u64) {
        let Some(from) = self.lagging.remove(conversation) else {
            return;
        };
        let mut after = from.saturating_sub(1);
        while after < pushed {
            let Some((entries, scanned)) = self.read(after) else {
                return;
            };
            for entry in entries {
                if entry.inbox_seq > pushed {
                    return;
                }
                if conversation_of(&entry) == conversation {
                    self.route(entry);
                    if self.lagging.contains_key(conversation) {
                        return;
                    }
                }
            }
            after = scanned;
        }
    }
}

fn is_own_send(entry: &pb::InboxEntry, session: &Session) -> bool {
    matches!(&entry.body, Some(pb::inbox_entry::Body::Message(m))
        if *m.sender == *session.user && *m.sender_device == *session.device)
}

fn conversation_of(entry: &pb::InboxEntry) -> &str {
    match &entry.body {
        Some(pb::inbox_entry::Body::Message(m)) => &m.conversation_id,
        Some(pb::inbox_entry::Body::Receipt(r)) => &r.conversation_id,
        Some(pb::inbox_entry::Body::Event(e)) => &e.conversation_id,
        None => "",
    }
}

/// Writes one conversation's entries, in order, on its own unidirectional stream.
struct PushStream {
    state: Arc<ServerState>,
    session: Arc<Session>,
    conversation: String,
    overflowed: Arc<AtomicBool>,
    drained_tx: mpsc::UnboundedSender<(String, Option<u64>)>,
}

impl PushStream {
    /// Writes entries until idle or failure. However it ends, the pusher hears of it: a
    /// stream that failed with entries still queued gets them re-sent from the inbox, and a
    /// held-back conversation is never left waiting for a drain that cannot come.
    async fn run(self, mut rx: mpsc::Receiver<Arc<pb::InboxEntry>>) {
        let unwritten = self.write_entries(&mut rx).await;
        let unwritten = unwritten.or_else(|| rx.try_recv().ok().map(|e| e.inbox_seq));
        if unwritten.is_some() || self.overflowed.swap(false, Ordering::SeqCst) {
            let _ = self.drained_tx.send((self.conversation.clone(), unwritten));
        }
    }

    /// Returns the inbox sequence of the first entry it could not write, if it failed.
    async fn write_entries(&self, rx: &mut mpsc::Receiver<Arc<pb::InboxEntry>>) -> Option<u64> {
        let max = self.state.config.max_frame_bytes as usize;
        let first =
            |rx: &mut mpsc::Receiver<Arc<pb::InboxEntry>>| rx.try_recv().ok().map(|e| e.inbox_seq);
        let Ok(mut send) = self.session.conn.open_uni().await else {
            return first(rx);
        };
        let header = ServerFrame {
            body: Some(server_frame::Body::PushHeader(pb::PushStreamHeader {
                conversation_id: self.conversation.clone(),
            })),
        };
        if write_frame(&mut send, &header, max).await.is_err() {
            return first(rx);
        }
        loop {
            let entry = match tokio::time::timeout(PUSH_STREAM_IDLE, rx.recv()).await {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(_) => {
                    // Idle: refuse new entries, but write what was queued meanwhile.
                    rx.close();
                    match rx.try_recv() {
                        Ok(entry) => entry,
                        Err(_) => break,
                    }
                }
            };
            // Everything already queued goes out in one write: one wake-up of the
            // connection instead of one per entry when a busy conversation has a backlog.
            let first_seq = entry.inbox_seq;
            let mut bytes = bytes::BytesMut::new();
            let mut next = Some(entry);
            let mut batched = 0;
            while let Some(entry) = next.take() {
                let frame = ServerFrame {
                    body: Some(server_frame::Body::Entry((*entry).clone())),
                };
                if tern_protocol::frame::encode_frame(&frame, max, &mut bytes).is_err() {
                    tracing::error!(seq = entry.inbox_seq, "inbox entry too large for a frame");
                    return Some(first_seq);
                }
                batched += 1;
                if batched < PUSH_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if send.write_chunk(bytes.freeze()).await.is_err() {
                return Some(first_seq);
            }
            if rx.is_empty() && self.overflowed.swap(false, Ordering::SeqCst) {
                let _ = self.drained_tx.send((self.conversation.clone(), None));
            }
        }
        let _ = send.finish();
        None
    }
}
