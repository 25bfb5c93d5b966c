//! The listener the app implements, and the thread that calls it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_client::{Event, Events};

use crate::types::{ConnectionState, ConversationEvent, Presence, Receipt, Typing};
use crate::{ChatMessage, TernError};

/// Receives a client's events. Implemented by the app (`TernListener` in Kotlin and Swift).
///
/// Calls come one at a time, in order, from one thread per client (never the network's
/// threads): a slow callback delays only later events of the same client. An event is
/// marked processed when its callback is called, so events not yet handed over when the app
/// dies are delivered again on the next start.
#[uniffi::export(with_foreign)]
pub trait TernListener: Send + Sync {
    /// A message, from sync or pushed live. Never reported twice; not reported for this
    /// device's own sends (their result says it all).
    fn on_message(&self, message: ChatMessage, inbox_seq: u64);
    /// A delivered or read receipt for messages this user sent.
    fn on_receipt(&self, receipt: Receipt, inbox_seq: u64);
    /// A group change: created, member added, removed or left, dissolved, role changed.
    fn on_conversation_event(&self, event: ConversationEvent, inbox_seq: u64);
    /// A contact's presence: from the snapshot after connecting, then live.
    fn on_presence(&self, presence: Presence);
    /// Someone is typing in a conversation.
    fn on_typing(&self, typing: Typing);
    /// Connecting, connected, reconnecting, disconnected (final, with the reason).
    fn on_connection_state(&self, state: ConnectionState);
    /// The device was too far behind to sync message by message, or ahead of a server whose
    /// store was restored from a backup: reload conversations (they may now hold fewer or
    /// other messages than shown) and page `history`. Events continue after `inbox_head`.
    fn on_sync_too_long(&self, inbox_head: u64);
}

/// Listener threads still running: each exits once its client is gone and all of the
/// client's tasks and its connection have ended, so this counts clients not yet freed.
static LIVE_LISTENER_THREADS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn live_listener_threads() -> usize {
    LIVE_LISTENER_THREADS.load(Ordering::SeqCst)
}

struct ThreadCount;

impl ThreadCount {
    fn new() -> Self {
        LIVE_LISTENER_THREADS.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for ThreadCount {
    fn drop(&mut self) {
        LIVE_LISTENER_THREADS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Starts the thread that hands `events` to `listener` until the client is gone.
pub(crate) fn spawn(mut events: Events, listener: Arc<dyn TernListener>) -> Result<(), TernError> {
    let count = ThreadCount::new();
    std::thread::Builder::new()
        .name("tern-listener".into())
        .spawn(move || {
            let _count = count;
            while let Some(event) = events.blocking_recv() {
                dispatch(listener.as_ref(), event);
            }
        })
        .map(drop)
        .map_err(|e| TernError::Internal {
            detail: format!("cannot start the listener thread: {e}"),
        })
}

fn dispatch(listener: &dyn TernListener, event: Event) {
    match event {
        Event::Message { message, inbox_seq } => listener.on_message(message.into(), inbox_seq),
        Event::Receipt { receipt, inbox_seq } => listener.on_receipt(receipt.into(), inbox_seq),
        Event::Conversation { event, inbox_seq } => {
            listener.on_conversation_event(event.into(), inbox_seq);
        }
        Event::SyncTooLong { inbox_head, .. } => listener.on_sync_too_long(inbox_head),
        Event::Presence(p) => listener.on_presence(p.into()),
        Event::Typing(t) => listener.on_typing(t.into()),
        Event::Connection(state) => listener.on_connection_state(state.into()),
        // Non-exhaustive upstream: an event added later is not shown until bound here.
        _ => {}
    }
}
