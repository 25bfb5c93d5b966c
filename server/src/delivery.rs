//! Delivery to connected devices.
//!
//! The store tells a [`Delivery`] that a user's inbox grew ("inbox of alice now ends at 42").
//! That one call is the whole interface between storage and delivery: a cross-node router
//! implements it by publishing the same fact to the node holding alice's sessions.
//!
//! [`LocalDelivery`] records the new head in each of the user's sessions. Each session's pusher
//! then reads the new entries from the inbox (the truth) and hands each to the writer task of
//! its conversation's push stream. Nothing here ever waits on a device: heads are a `watch`,
//! and a conversation queue that is full drops its entry, which the device recovers by sync.

use std::collections::HashMap;
use std::sync::Arc;
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
    let mut heads = session.push.head.subscribe();
    let mut conversations: HashMap<String, mpsc::Sender<Arc<pb::InboxEntry>>> = HashMap::new();
    loop {
        let head = *heads.borrow_and_update();
        while pushed < head {
            let entries = match state.store.read_inbox(&session.user, pushed, READ_BATCH) {
                Ok(entries) if !entries.is_empty() => entries,
                Ok(_) => break,
                Err(e) => {
                    debug!(error = %e, "push read failed; the device recovers by sync");
                    break;
                }
            };
            for entry in entries {
                pushed = entry.inbox_seq;
                if is_own_send(&entry, &session) {
                    // The sending device learnt this entry's inbox sequence from its SendAck.
                    continue;
                }
                route(&state, &session, &mut conversations, Arc::new(entry));
            }
        }
        tokio::select! {
            changed = heads.changed() => if changed.is_err() { return },
            _ = session.conn.closed() => return,
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

/// Queues `entry` on its conversation's push stream, opening one if needed. Never waits.
fn route(
    state: &Arc<ServerState>,
    session: &Arc<Session>,
    conversations: &mut HashMap<String, mpsc::Sender<Arc<pb::InboxEntry>>>,
    entry: Arc<pb::InboxEntry>,
) {
    let conv = conversation_of(&entry).to_owned();
    let mut entry = entry;
    for _ in 0..2 {
        let tx = conversations.entry(conv.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(CONVERSATION_QUEUE);
            tokio::spawn(push_stream(
                state.clone(),
                session.clone(),
                conv.clone(),
                rx,
            ));
            tx
        });
        match tx.try_send(entry) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                debug!(conversation = %conv, "push queue full; the device will sync the gap");
                return;
            }
            Err(mpsc::error::TrySendError::Closed(back)) => {
                // The stream went idle and closed; open a new one.
                conversations.remove(&conv);
                entry = back;
            }
        }
    }
}

/// Writes one conversation's entries, in order, on its own unidirectional stream.
async fn push_stream(
    state: Arc<ServerState>,
    session: Arc<Session>,
    conversation: String,
    mut rx: mpsc::Receiver<Arc<pb::InboxEntry>>,
) {
    let max = state.config.max_frame_bytes as usize;
    let Ok(mut send) = session.conn.open_uni().await else {
        return;
    };
    let header = ServerFrame {
        body: Some(server_frame::Body::PushHeader(pb::PushStreamHeader {
            conversation_id: conversation,
        })),
    };
    if write_frame(&mut send, &header, max).await.is_err() {
        return;
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
        let frame = ServerFrame {
            body: Some(server_frame::Body::Entry((*entry).clone())),
        };
        if write_frame(&mut send, &frame, max).await.is_err() {
            return;
        }
    }
    let _ = send.finish();
}
