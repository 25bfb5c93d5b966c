//! Async Rust client for tern.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, Event, SendTarget, Trust};
//! let config = ClientConfig::new("localhost:4433", "TOKEN", Trust::CaFile("certs/ca.pem".into()));
//! let (client, mut events) = Client::connect(config).await?;
//! client.send(SendTarget::User("bob".into()), "hello", None).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message { message, .. } = event {
//!         println!("{}: {}", message.sender, message.text);
//!     }
//! }
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod error;
mod inbox;
mod messaging;
mod transport;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_protocol::pb::{self, ClientFrame, ServerFrame, client_frame, server_frame};
use tern_protocol::{ErrorCode, PROTOCOL_VERSION};
use tokio::sync::{mpsc, oneshot};

pub use error::ClientError;
pub use messaging::{SendTarget, SentMessage, SyncResult};
pub use tern_protocol;
use transport::FrameReader;
pub use transport::{TransportSettings, Trust};

/// Capacity of the event channel. When the app does not drain it, the client stops reading
/// pushes (flow control back to the server) rather than buffering without bound.
const EVENT_CAPACITY: usize = 1024;

/// How to reach and authenticate with a server.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port`.
    pub server: String,
    /// TLS name to verify; by default the host part of `server`.
    pub server_name: Option<String>,
    pub trust: Trust,
    /// JWT issued by the app backend (or `tern-server token`).
    pub token: String,
    /// Sent in Hello, for server logs.
    pub client_agent: String,
    /// Inbox sequence this device has processed; `None` uses the cursor the server stored
    /// from this device's acknowledgements.
    pub resume_from: Option<u64>,
    /// Sync from `resume_from` on connect and then receive live pushes as events. Off for
    /// tools that call [`Client::sync`] themselves.
    pub auto_sync: bool,
    pub transport: TransportSettings,
}

impl ClientConfig {
    pub fn new(server: impl Into<String>, token: impl Into<String>, trust: Trust) -> Self {
        Self {
            server: server.into(),
            server_name: None,
            trust,
            token: token.into(),
            client_agent: format!("tern-client/{}", env!("CARGO_PKG_VERSION")),
            resume_from: None,
            auto_sync: true,
            transport: TransportSettings::default(),
        }
    }
}

/// The authenticated session, as the server's Welcome described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub device: String,
    pub session_id: String,
    /// Server wall clock at authentication, Unix milliseconds.
    pub server_time_ms: u64,
    pub inbox_head: u64,
    pub delivered_cursor: u64,
    pub limits: pb::ServerLimits,
}

/// What the client reports to the app.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// A message (from sync or pushed live). Never reported twice.
    Message {
        message: pb::Message,
        inbox_seq: u64,
    },
    /// A delivered or read receipt.
    Receipt {
        receipt: pb::Receipt,
        inbox_seq: u64,
    },
    /// A group change (created, member added or removed, dissolved...).
    Conversation {
        event: pb::ConversationEvent,
        inbox_seq: u64,
    },
    /// The device was too far behind: resynchronise from these heads (and page history as
    /// needed). Events continue after `inbox_head`.
    SyncTooLong {
        inbox_head: u64,
        heads: Vec<pb::ConversationHead>,
    },
    /// The session ended; `code` is the server's reason when it gave one.
    Disconnected {
        code: Option<ErrorCode>,
        reason: String,
    },
}

pub(crate) struct Inner {
    pub conn: quinn::Connection,
    pub max_frame: usize,
    pub events: mpsc::Sender<Event>,
    pub inbox: Mutex<inbox::InboxTracker>,
    pub control: tokio::sync::Mutex<quinn::SendStream>,
    pub conversations: tokio::sync::Mutex<HashMap<String, Arc<messaging::ConversationStream>>>,
    pub paused: Mutex<HashSet<String>>,
    pub unpaused: tokio::sync::Notify,
    pub pending_pings: Mutex<HashMap<u64, oneshot::Sender<pb::Pong>>>,
    /// Held for writing while a sync reports entries, so pushes (which the server may send
    /// as soon as its last page is out) are reported after the synced entries, not among
    /// them: each conversation's events stay in order.
    pub sync_gate: tokio::sync::RwLock<()>,
    pub user: String,
    pub device: String,
    /// Client message ids this device is sending now: their messages reach the app through
    /// the send's result, never also as events (whichever of SendAck, push or sync comes first).
    pub sending: Mutex<HashSet<String>>,
}

/// A connected, authenticated client.
pub struct Client {
    endpoint: quinn::Endpoint,
    session: Session,
    inner: Arc<Inner>,
    next_nonce: AtomicU64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.inner.conn.close(
            quinn::VarInt::from_u32(ErrorCode::Ok.as_u32()),
            b"client dropped",
        );
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Client {
    /// Connects, authenticates, and (with `auto_sync`) starts delivering events.
    pub async fn connect(
        config: ClientConfig,
    ) -> Result<(Self, mpsc::Receiver<Event>), ClientError> {
        let timeout = config.transport.connect_timeout;
        tokio::time::timeout(timeout, Self::connect_inner(config))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// A QUIC connection with tern's TLS and transport settings and nothing sent on it.
    /// For protocol conformance tests, which need to send what a real client never would.
    #[doc(hidden)]
    pub async fn connect_raw(
        config: &ClientConfig,
    ) -> Result<(quinn::Endpoint, quinn::Connection), ClientError> {
        let (addr, name) =
            transport::resolve(&config.server, config.server_name.as_deref()).await?;
        let mut endpoint = quinn::Endpoint::client(transport::local_bind_addr(addr))
            .map_err(|e| ClientError::Config(format!("bind UDP socket: {e}")))?;
        endpoint
            .set_default_client_config(transport::client_config(&config.trust, &config.transport)?);
        let conn = endpoint.connect(addr, &name)?.await?;
        Ok((endpoint, conn))
    }

    async fn connect_inner(
        config: ClientConfig,
    ) -> Result<(Self, mpsc::Receiver<Event>), ClientError> {
        let (endpoint, conn) = Self::connect_raw(&config).await?;
        let max_frame = tern_protocol::DEFAULT_MAX_FRAME_BYTES;
        let (mut send, recv) = conn.open_bi().await?;
        let hello = ClientFrame {
            body: Some(client_frame::Body::Hello(pb::Hello {
                protocol_version: PROTOCOL_VERSION,
                token: config.token.clone(),
                client_agent: config.client_agent.clone(),
                last_inbox_seq: config.resume_from.unwrap_or(0),
                background: false,
            })),
        };
        send.write_chunk(tern_protocol::frame::frame_bytes(&hello, max_frame)?)
            .await?;
        let mut reader = FrameReader::new(recv, max_frame);
        let welcome = match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Welcome(w)),
            })) => w,
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Error(e)),
            })) => return Err(e.into()),
            other => {
                // The server may close right after its error; prefer its close code.
                if let Some(reason) = conn.close_reason() {
                    return Err(reason.into());
                }
                return Err(match other {
                    Err(e) => e,
                    Ok(frame) => {
                        ClientError::Unexpected(format!("expected Welcome, got {frame:?}"))
                    }
                });
            }
        };
        let session = Session {
            user: welcome.user_id,
            device: welcome.device_id,
            session_id: welcome.session_id,
            server_time_ms: welcome.server_time_ms,
            inbox_head: welcome.inbox_head,
            delivered_cursor: welcome.delivered_cursor,
            limits: welcome.limits.unwrap_or_default(),
        };
        let start = config.resume_from.unwrap_or(session.delivered_cursor);
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let inner = Arc::new(Inner {
            conn: conn.clone(),
            max_frame,
            events: events_tx,
            inbox: Mutex::new(inbox::InboxTracker::new(start)),
            control: tokio::sync::Mutex::new(send),
            conversations: tokio::sync::Mutex::default(),
            paused: Mutex::default(),
            unpaused: tokio::sync::Notify::new(),
            pending_pings: Mutex::default(),
            sync_gate: tokio::sync::RwLock::new(()),
            user: session.user.clone(),
            device: session.device.clone(),
            sending: Mutex::default(),
        });
        let mut tasks = vec![
            tokio::spawn(control_reader(reader, inner.clone())),
            tokio::spawn(messaging::accept_pushes(inner.clone())),
            tokio::spawn(messaging::reap_idle_streams(
                inner.clone(),
                config.transport.conversation_idle,
            )),
        ];
        if config.auto_sync {
            tasks.push(tokio::spawn(messaging::keep_in_sync(inner.clone(), start)));
        }
        let client = Self {
            endpoint,
            session,
            inner,
            next_nonce: AtomicU64::new(1),
            tasks,
        };
        Ok((client, events_rx))
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The underlying QUIC connection (for diagnostics and tests).
    pub fn connection(&self) -> &quinn::Connection {
        &self.inner.conn
    }

    /// The highest inbox sequence up to which this device has received everything. Persist
    /// it and pass it back as `resume_from` to resume exactly there.
    pub fn inbox_cursor(&self) -> u64 {
        lock(&self.inner.inbox).cursor()
    }

    /// Round trip on the reliable control stream.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending_pings).insert(nonce, tx);
        let start = Instant::now();
        let frame = ClientFrame {
            body: Some(client_frame::Body::Ping(pb::Ping {
                nonce,
                sent_at_us: 0,
            })),
        };
        self.inner.write_control(&frame).await?;
        match rx.await {
            Ok(_) => Ok(start.elapsed()),
            Err(_) => Err(self
                .inner
                .conn
                .close_reason()
                .map_or(ClientError::Closed, ClientError::from)),
        }
    }

    /// Writes raw bytes on the control stream. For protocol conformance tests only.
    #[doc(hidden)]
    pub async fn write_control_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.inner.control.lock().await.write_all(bytes).await?;
        Ok(())
    }

    /// Stops (or resumes) reading one conversation's push stream, so that its QUIC flow-control
    /// window fills up. For head-of-line blocking tests only.
    #[doc(hidden)]
    pub fn pause_conversation(&self, conversation_id: &str, paused: bool) {
        let mut set = lock(&self.inner.paused);
        if paused {
            set.insert(conversation_id.to_owned());
        } else {
            set.remove(conversation_id);
            self.inner.unpaused.notify_waiters();
        }
    }

    /// Conversation streams currently open (for diagnostics and tests).
    #[doc(hidden)]
    pub async fn open_conversation_streams(&self) -> usize {
        self.inner.conversations.lock().await.len()
    }

    /// Waits until the connection is closed, returning why.
    pub async fn closed(&self) -> ClientError {
        self.inner.conn.closed().await.into()
    }

    /// Acknowledges what was received, then closes the session gracefully.
    pub async fn close(self) {
        // A ping after the ack: the server reads the control stream in order, so its pong
        // proves the ack arrived before the connection is closed (closing discards data in
        // flight).
        if self.inner.flush_ack().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.ping()).await;
        }
        self.inner
            .conn
            .close(quinn::VarInt::from_u32(ErrorCode::Ok.as_u32()), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

impl Inner {
    pub(crate) async fn write_control(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = tern_protocol::frame::frame_bytes(frame, self.max_frame)?;
        self.control.lock().await.write_chunk(bytes).await?;
        Ok(())
    }

    /// Sends the cumulative acknowledgement if the cursor moved.
    pub(crate) async fn flush_ack(&self) -> Result<(), ClientError> {
        let up_to = lock(&self.inbox).take_ack();
        if let Some(up_to) = up_to {
            let frame = ClientFrame {
                body: Some(client_frame::Body::AckInbox(pb::AckInbox {
                    up_to_inbox_seq: up_to,
                })),
            };
            self.write_control(&frame).await?;
        }
        Ok(())
    }
}

/// Reads the control stream: pongs, server errors, and the end of the session.
async fn control_reader(mut reader: FrameReader, inner: Arc<Inner>) {
    let mut last_error: Option<pb::Error> = None;
    loop {
        match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Pong(pong)),
            })) => {
                if let Some(tx) = lock(&inner.pending_pings).remove(&pong.nonce) {
                    let _ = tx.send(pong);
                }
            }
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Error(e)),
            })) => last_error = Some(e),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let reason = inner.conn.closed().await;
    lock(&inner.pending_pings).clear();
    let event = match (last_error, ClientError::from(reason)) {
        (Some(e), _) => Event::Disconnected {
            code: ErrorCode::try_from(e.code).ok(),
            reason: e.message,
        },
        (None, ClientError::Server { code, message }) => Event::Disconnected {
            code: Some(code),
            reason: message,
        },
        (None, other) => Event::Disconnected {
            code: None,
            reason: other.to_string(),
        },
    };
    let _ = inner.events.send(event).await;
}
