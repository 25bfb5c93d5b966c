//! Delivery to connected devices.
//!
//! After each commit the store hands a [`Delivery`] the entries it appended to a user's inbox
//! ("alice's inbox grew by 41 and 42, and here they are"). That one call is the whole
//! interface between storage and delivery: a cross-node router implements it by publishing the
//! same entries to the node holding alice's sessions.
//!
//! [`LocalDelivery`] hands the entries to each of the user's sessions. Each session's pusher
//! routes them to the writer task of their conversation's push stream; it reads the inbox (the
//! truth) only for what it was not handed: entries from before it went live, or more than a
//! session may hold. Nothing here ever waits on a device: when a conversation's queue is full
//! that conversation is held back (its later entries are not queued) until its stream drains;
//! then its entries are re-read from the inbox, so each conversation stays in order and no
//! other conversation waits.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tern_protocol::pb::{self, ServerFrame, server_frame};
use tokio::sync::{Notify, mpsc};
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
/// Entries handed to a session and not yet taken by its pusher, at most. Beyond this (a
/// session not live yet, or a burst) they are dropped, and the pusher reads them from the
/// inbox instead: memory per session stays bounded whatever the traffic.
const HANDED_MAX: usize = 1024;

/// An inbox entry as a device receives it: a message is resolved from its reference.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub inbox_seq: u64,
    /// Shared by every recipient of the same message, receipt or event.
    pub body: Arc<pb::inbox_entry::Body>,
}

impl NewEntry {
    fn from_stored(entry: pb::InboxEntry) -> Option<Self> {
        Some(Self {
            inbox_seq: entry.inbox_seq,
            body: Arc::new(entry.body?),
        })
    }
}

/// Where the store reports inbox growth.
pub trait Delivery: Send + Sync + 'static {
    /// `user`'s inbox durably grew by `entries`: consecutive, in order, the last one at the
    /// new head. Must not block.
    fn inbox_appended(&self, user: &str, entries: &[NewEntry]);
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
    fn inbox_appended(&self, user: &str, entries: &[NewEntry]) {
        for session in self.registry.sessions_of(user) {
            session.push.append(entries);
        }
    }
}

/// A session's push position, and what was handed to its pusher. One lock and one `Notify`
/// (no channel): an idle session allocates nothing here.
#[derive(Debug)]
pub struct PushState {
    inner: Mutex<PushInner>,
    /// Wakes the pusher. `notify_one` keeps a permit when it is busy, so no wake-up is lost.
    wake: Notify,
}

#[derive(Debug, Default)]
struct PushInner {
    /// Highest durable inbox sequence of the user.
    head: u64,
    /// Where live pushing starts: set when the device's first sync completes.
    live_from: Option<u64>,
    /// Entries not yet taken by the pusher, in inbox order, at most [`HANDED_MAX`].
    handed: VecDeque<NewEntry>,
    /// Push streams that drained after holding their conversation back, or ended with
    /// entries unwritten (the first such inbox sequence).
    drained: Vec<(String, Option<u64>)>,
}

impl PushState {
    pub fn new(head: u64) -> Self {
        Self {
            inner: Mutex::new(PushInner {
                head,
                ..PushInner::default()
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PushInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// Records new durable entries for the pusher.
    pub fn append(&self, entries: &[NewEntry]) {
        {
            let mut inner = self.lock();
            let fresh: &[NewEntry] = match entries.iter().position(|e| e.inbox_seq > inner.head) {
                Some(first) => &entries[first..],
                None => return,
            };
            if let Some(last) = fresh.last() {
                inner.head = last.inbox_seq;
            }
            if inner.handed.len() + fresh.len() > HANDED_MAX {
                // The pusher finds the gap and reads it from the inbox.
                inner.handed.clear();
            }
            if fresh.len() <= HANDED_MAX {
                inner.handed.extend(fresh.iter().cloned());
            }
        }
        self.wake.notify_one();
    }

    /// Starts live pushing after `inbox_seq`, unless already live. Returns whether it started.
    pub fn go_live(&self, inbox_seq: u64) -> bool {
        let started = {
            let mut inner = self.lock();
            let started = inner.live_from.is_none();
            if started {
                inner.live_from = Some(inbox_seq);
            }
            started
        };
        if started {
            self.wake.notify_one();
        }
        started
    }

    fn report_drained(&self, conversation: String, unwritten: Option<u64>) {
        self.lock().drained.push((conversation, unwritten));
        self.wake.notify_one();
    }
}

/// Pushes a session's new inbox entries until the connection closes.
pub async fn push_loop(state: Arc<ServerState>, session: Arc<Session>) {
    let push = &session.push;
    // One wait for the close, not a new one (a waiter registered under the connection's lock)
    // on every round.
    let conn = session.conn.clone();
    let closed = conn.closed();
    tokio::pin!(closed);
    let mut pushed = loop {
        if let Some(from) = push.lock().live_from {
            break from;
        }
        tokio::select! {
            () = push.wake.notified() => {}
            _ = &mut closed => return,
        }
    };
    debug!(from = pushed, "session live");
    let mut pusher = Pusher {
        state: state.clone(),
        session: session.clone(),
        queues: HashMap::new(),
        lagging: HashMap::new(),
    };
    loop {
        let (head, handed, drained) = {
            let mut inner = push.lock();
            (
                inner.head,
                std::mem::take(&mut inner.handed),
                std::mem::take(&mut inner.drained),
            )
        };
        for entry in handed {
            if entry.inbox_seq > pushed + 1 {
                // Entries this session was not handed: read them from the inbox.
                pusher.catch_up(&mut pushed, entry.inbox_seq - 1);
            }
            if entry.inbox_seq == pushed + 1 {
                pushed = entry.inbox_seq;
                pusher.route(entry);
            }
        }
        pusher.catch_up(&mut pushed, head);
        for (conversation, unwritten) in drained {
            pusher.drained(&conversation, unwritten, pushed);
        }
        tokio::select! {
            () = push.wake.notified() => {}
            _ = &mut closed => return,
        }
    }
}

struct ConversationQueue {
    tx: mpsc::Sender<NewEntry>,
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
}

impl Pusher {
    /// The next entries after `after` for this device (its own sends left out) and the last
    /// inbox sequence read; `None` when there is nothing new.
    fn read(&self, after: u64) -> Option<(Vec<NewEntry>, u64)> {
        match self.state.store.read_inbox_for(
            &self.session.user,
            Some(&self.session.device),
            after,
            READ_BATCH,
        ) {
            Ok((entries, scanned)) if scanned > after => Some((
                entries
                    .into_iter()
                    .filter_map(NewEntry::from_stored)
                    .collect(),
                scanned,
            )),
            Ok(_) => None,
            Err(e) => {
                debug!(error = %e, "push read failed; the device recovers by sync");
                None
            }
        }
    }

    /// Routes the entries after `pushed` up to at least `upto`, read from the inbox.
    fn catch_up(&mut self, pushed: &mut u64, upto: u64) {
        while *pushed < upto {
            let Some((entries, scanned)) = self.read(*pushed) else {
                break;
            };
            for entry in entries {
                self.route(entry);
            }
            *pushed = scanned;
        }
    }

    /// Queues `entry` on its conversation's push stream, opening one if needed. Never waits.
    fn route(&mut self, entry: NewEntry) {
        if is_own_send(&entry, &self.session) {
            // The sending device learnt this entry's inbox sequence from its SendAck.
            return;
        }
        let conversation = conversation_of(&entry).to_owned();
        if self.lagging.contains_key(&conversation) {
            return;
        }
        let mut entry = entry;
        for _ in 0..2 {
            let queue = self.queues.entry(conversation.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(CONVERSATION_QUEUE);
                let overflowed = Arc::new(AtomicBool::new(false));
                let task = PushStream {
                    state: self.state.clone(),
                    session: self.session.clone(),
                    conversation: conversation.clone(),
                    overflowed: overflowed.clone(),
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
                        self.session.push.report_drained(conversation, None);
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

    /// A conversation's stream drained, or ended with `unwritten` entries: queue its entries
    /// again from where it fell behind, up to `pushed` (later ones come through the main loop).
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

fn is_own_send(entry: &NewEntry, session: &Session) -> bool {
    matches!(&*entry.body, pb::inbox_entry::Body::Message(m)
        if *m.sender == *session.user && *m.sender_device == *session.device)
}

fn conversation_of(entry: &NewEntry) -> &str {
    match &*entry.body {
        pb::inbox_entry::Body::Message(m) => &m.conversation_id,
        pb::inbox_entry::Body::Receipt(r) => &r.conversation_id,
        pb::inbox_entry::Body::Event(e) => &e.conversation_id,
    }
}

/// Writes one conversation's entries, in order, on its own unidirectional stream.
struct PushStream {
    state: Arc<ServerState>,
    session: Arc<Session>,
    conversation: String,
    overflowed: Arc<AtomicBool>,
}

impl PushStream {
    /// Writes entries until idle or failure. However it ends, the pusher hears of it: a
    /// stream that failed with entries still queued gets them re-sent from the inbox, and a
    /// held-back conversation is never left waiting for a drain that cannot come.
    async fn run(self, mut rx: mpsc::Receiver<NewEntry>) {
        let unwritten = self.write_entries(&mut rx).await;
        let unwritten = unwritten.or_else(|| rx.try_recv().ok().map(|e| e.inbox_seq));
        if unwritten.is_some() || self.overflowed.swap(false, Ordering::SeqCst) {
            self.session
                .push
                .report_drained(self.conversation.clone(), unwritten);
        }
    }

    /// Returns the inbox sequence of the first entry it could not write, if it failed.
    async fn write_entries(&self, rx: &mut mpsc::Receiver<NewEntry>) -> Option<u64> {
        let max = self.state.config.max_frame_bytes as usize;
        let first = |rx: &mut mpsc::Receiver<NewEntry>| rx.try_recv().ok().map(|e| e.inbox_seq);
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
                if tern_protocol::frame::encode_entry_frame(
                    entry.inbox_seq,
                    &entry.body,
                    max,
                    &mut bytes,
                )
                .is_err()
                {
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
                self.session
                    .push
                    .report_drained(self.conversation.clone(), None);
            }
        }
        let _ = send.finish();
        None
    }
}
