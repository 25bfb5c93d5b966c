//! Presence, typing and heartbeats over QUIC datagrams: best effort, never stored.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tern_protocol::pb::{self, PresenceStatus, datagram};
use tokio::sync::oneshot;

use crate::link::Link;
use crate::{Client, ClientError, Event, Inner, lock};

/// How long a typing indicator lasts unless renewed.
const TYPING_MS: u32 = 5_000;

/// Counters of the client's transport activity.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub datagrams_sent: AtomicU64,
    pub datagrams_received: AtomicU64,
    pub datagrams_dropped: AtomicU64,
    pub reconnects: AtomicU64,
    pub zero_rtt_accepted: AtomicU64,
}

/// A snapshot of [`Client::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ClientStats {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    /// Datagrams not sent because they exceed the path's current maximum (or the connection
    /// refused them), or received but malformed.
    pub datagrams_dropped: u64,
    /// Connections re-established after a loss.
    pub reconnects: u64,
    /// Reconnections whose 0-RTT data (Hello and sync) the server accepted.
    pub zero_rtt_accepted: u64,
}

impl Client {
    /// Publishes this device's presence (online or away) to the users who share a
    /// conversation with it.
    pub async fn set_presence(&self, status: PresenceStatus) -> Result<(), ClientError> {
        let presence = pb::Presence {
            user_id: String::new(),
            status: status as i32,
            last_seen_ms: 0,
        };
        self.inner.send_datagram(&pb::Datagram {
            body: Some(datagram::Body::Presence(presence)),
        })
    }

    /// Shows "typing…" to the other members of a conversation for a few seconds.
    pub async fn typing(&self, conversation_id: &str) -> Result<(), ClientError> {
        let typing = pb::Typing {
            conversation_id: conversation_id.to_owned(),
            user_id: String::new(),
            expires_in_ms: TYPING_MS,
        };
        self.inner.send_datagram(&pb::Datagram {
            body: Some(datagram::Body::Typing(typing)),
        })
    }

    /// A heartbeat datagram and its reply: the round-trip time, or a timeout (datagrams may be
    /// lost).
    pub async fn heartbeat(&self, timeout: Duration) -> Result<Duration, ClientError> {
        let nonce = self.inner.next_nonce.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending_heartbeats).insert(nonce, tx);
        let start = Instant::now();
        let sent = self.inner.heartbeat(nonce);
        let result = match sent {
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(_)) => Ok(start.elapsed()),
                _ => Err(ClientError::Timeout),
            },
            Err(e) => Err(e),
        };
        lock(&self.inner.pending_heartbeats).remove(&nonce);
        result
    }

    pub fn stats(&self) -> ClientStats {
        let c = &self.inner.stats;
        ClientStats {
            datagrams_sent: c.datagrams_sent.load(Ordering::Relaxed),
            datagrams_received: c.datagrams_received.load(Ordering::Relaxed),
            datagrams_dropped: c.datagrams_dropped.load(Ordering::Relaxed),
            reconnects: c.reconnects.load(Ordering::Relaxed),
            zero_rtt_accepted: c.zero_rtt_accepted.load(Ordering::Relaxed),
        }
    }
}

impl Inner {
    pub(crate) fn send_datagram(&self, datagram: &pb::Datagram) -> Result<(), ClientError> {
        let link = self.current()?;
        let bytes = tern_protocol::encode_datagram(datagram)?;
        if link
            .conn
            .max_datagram_size()
            .is_none_or(|max| bytes.len() > max)
        {
            self.stats.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
            return Err(ClientError::Unexpected(
                "datagram exceeds the path's maximum size".into(),
            ));
        }
        match link.conn.send_datagram(bytes) {
            Ok(()) => {
                self.stats.datagrams_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.stats.datagrams_dropped.fetch_add(1, Ordering::Relaxed);
                Err(ClientError::Unexpected(format!("datagram: {e}")))
            }
        }
    }

    fn heartbeat(&self, nonce: u64) -> Result<(), ClientError> {
        let rtt_us = self.current()?.conn.rtt().as_micros() as u64;
        let sent_at_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let heartbeat = pb::Heartbeat {
            nonce,
            sent_at_us,
            rtt_us,
            reply: false,
        };
        self.send_datagram(&pb::Datagram {
            body: Some(datagram::Body::Heartbeat(heartbeat)),
        })
    }
}

/// Reads the link's datagrams into events.
pub(crate) async fn read_datagrams(link: Arc<Link>, inner: Arc<Inner>) {
    while let Ok(bytes) = link.conn.read_datagram().await {
        inner
            .stats
            .datagrams_received
            .fetch_add(1, Ordering::Relaxed);
        let Ok(datagram) = tern_protocol::decode_datagram(&bytes) else {
            inner
                .stats
                .datagrams_dropped
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match datagram.body {
            Some(datagram::Body::Presence(p)) => inner.emit(Event::Presence(p)).await,
            Some(datagram::Body::Typing(t)) => inner.emit(Event::Typing(t)).await,
            Some(datagram::Body::Heartbeat(h)) if h.reply => {
                if let Some(tx) = lock(&inner.pending_heartbeats).remove(&h.nonce) {
                    let _ = tx.send(h);
                }
            }
            _ => {}
        }
    }
}

/// Sends a heartbeat every interval while in the foreground.
pub(crate) async fn heartbeats(_link: Arc<Link>, inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.config.transport.heartbeat_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        if !inner.background.load(Ordering::Relaxed) {
            let nonce = inner.next_nonce.fetch_add(1, Ordering::Relaxed);
            let _ = inner.heartbeat(nonce);
        }
    }
}
