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
//!
//! The client keeps its session alive by itself: when the network changes, the app calls
//! [`Client::network_changed`] and the connection migrates; when the connection is lost, the
//! client reconnects with backoff, resumes TLS, and syncs from its cursor, reporting each step
//! as [`Event::Connection`].
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod datagrams;
mod error;
mod inbox;
mod link;
mod messaging;
mod transport;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_protocol::ErrorCode;
use tern_protocol::pb::{self, ClientFrame, client_frame};
use tokio::sync::{mpsc, oneshot, watch};

pub use datagrams::ClientStats;
pub use error::ClientError;
pub use messaging::{SendTarget, SentMessage, SyncResult};
pub use tern_protocol;
pub use transport::{TransportSettings, Trust};

/// The quinn client configuration (TLS trust, ALPN, transport settings) a [`Client`] uses,
/// for callers that bring their own endpoint ([`Client::connect_on`]).
#[doc(hidden)]
pub fn quinn_client_config(
    trust: &Trust,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, ClientError> {
    transport::client_config(trust, settings)
}

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
    /// Reconnect by itself when the connection is lost (not after an auth failure, a
    /// replaced session or [`Client::close`]).
    pub auto_reconnect: bool,
    /// Start in the background (no presence or typing datagrams, no heartbeats).
    pub background: bool,
    pub transport: TransportSettings,
    /// Benchmark only: send every conversation on one QUIC stream, as a TCP-style client
    /// would, so `tern-bench hol` can measure what stream-per-conversation saves. Needs a
    /// server that accepts `OpenConversation.multiplexed`. Never set this in an app.
    #[doc(hidden)]
    pub single_stream_for_bench: bool,
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
            auto_reconnect: true,
            background: false,
            transport: TransportSettings::default(),
            single_stream_for_bench: false,
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

/// The connection's state, as the app shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    Connecting,
    Connected,
    /// The connection was lost; the next attempt starts after `delay`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        code: Option<ErrorCode>,
        reason: String,
    },
    /// Final: the client will not reconnect.
    Disconnected {
        code: Option<ErrorCode>,
        reason: String,
    },
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
    /// The device was too far behind, or ahead of the server (whose store was restored or
    /// lost entries this device had seen): resynchronise from these heads (and page history
    /// as needed), whose conversations may then hold fewer or other messages than shown.
    /// Events continue after `inbox_head`.
    SyncTooLong {
        inbox_head: u64,
        heads: Vec<pb::ConversationHead>,
    },
    /// A contact's presence (from the snapshot after connecting, or a live datagram).
    Presence(pb::Presence),
    /// Someone is typing in a conversation; the indicator ends after `expires_in_ms` unless
    /// renewed.
    Typing(pb::Typing),
    /// Connecting, connected, reconnecting, disconnected.
    Connection(ConnectionState),
}

impl Event {
    /// The final disconnection, if this is it.
    pub fn disconnected(&self) -> Option<(Option<ErrorCode>, &str)> {
        match self {
            Event::Connection(ConnectionState::Disconnected { code, reason }) => {
                Some((*code, reason))
            }
            _ => None,
        }
    }
}

impl Event {
    /// The inbox sequence of a message, receipt or conversation event.
    pub fn inbox_seq(&self) -> Option<u64> {
        match self {
            Event::Message { inbox_seq, .. }
            | Event::Receipt { inbox_seq, .. }
            | Event::Conversation { inbox_seq, .. } => Some(*inbox_seq),
            _ => None,
        }
    }
}

/// The client's events. Taking an event from here is what marks it processed: the client
/// acknowledges to the server (which then sends delivered receipts) only what the app took,
/// so events still waiting here when the app dies are delivered again on the next start.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
    inbox: Arc<Mutex<inbox::InboxTracker>>,
}

impl Events {
    /// The next event; `None` once the client is gone.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        self.taken(&event);
        Some(event)
    }

    /// The next event if one is waiting.
    pub fn try_recv(&mut self) -> Result<Event, mpsc::error::TryRecvError> {
        let event = self.rx.try_recv()?;
        self.taken(&event);
        Ok(event)
    }

    /// Blocking [`Events::recv`], for a thread outside any async runtime (the FFI's listener
    /// thread). Panics if called from within an async runtime.
    pub fn blocking_recv(&mut self) -> Option<Event> {
        let event = self.rx.blocking_recv()?;
        self.taken(&event);
        Some(event)
    }

    fn taken(&self, event: &Event) {
        if let Some(seq) = event.inbox_seq() {
            lock(&self.inbox).consumed(seq);
        }
    }
}

/// Whether the client currently has a connection.
#[derive(Clone)]
pub(crate) enum LinkState {
    Down,
    Up(Arc<link::Link>),
    /// Final: closed by the app, or a failure reconnecting cannot fix.
    Closed(ClientError),
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    pub endpoint: quinn::Endpoint,
    /// The endpoint was given by the caller and carries other clients' connections too.
    pub shared_endpoint: bool,
    pub events: mpsc::Sender<Event>,
    pub link: watch::Sender<LinkState>,
    /// The latest link, also while down (for diagnostics).
    pub last_link: Mutex<Option<Arc<link::Link>>>,
    pub inbox: Arc<Mutex<inbox::InboxTracker>>,
    pub paused: Mutex<HashSet<String>>,
    pub unpaused: tokio::sync::Notify,
    pub pending_pings: Mutex<HashMap<u64, oneshot::Sender<pb::Pong>>>,
    pub pending_heartbeats: Mutex<HashMap<u64, oneshot::Sender<pb::Heartbeat>>>,
    pub next_nonce: AtomicU64,
    /// Held for writing while a sync reports entries, so pushes (which the server may send
    /// as soon as its last page is out) are reported after the synced entries, not among
    /// them: each conversation's events stay in order.
    pub sync_gate: Arc<tokio::sync::RwLock<()>>,
    /// Inbox sequences of this device's own sends acknowledged while a link's first sync
    /// runs (`Some` until it ends), with the connection (`stable_id`) that acknowledged each.
    /// They are recorded at once too; if that sync rewinds the cursor (a restored store),
    /// those of its own connection are in the new numbering and are recorded again.
    pub own_acks_before_sync: Mutex<Option<Vec<(usize, u64)>>>,
    pub user: String,
    pub device: String,
    /// Client message ids this device is sending now: their messages reach the app through
    /// the send's result, never also as events (whichever of SendAck, push or sync comes first).
    pub sending: Mutex<HashSet<String>>,
    /// Per conversation stream key, the order of its unfinished sends.
    pub send_order: Mutex<HashMap<String, messaging::SendOrder>>,
    pub background: AtomicBool,
    pub stats: datagrams::Counters,
}

/// A tern client: one device's session, kept alive across network changes and reconnects.
pub struct Client {
    inner: Arc<Inner>,
    supervisor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("user", &self.inner.user)
            .field("device", &self.inner.device)
            .finish_non_exhaustive()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.supervisor.abort();
        if let LinkState::Up(link) = &*self.inner.link.borrow() {
            link.close(ErrorCode::Ok, "client dropped");
        }
        self.inner
            .link
            .send_replace(LinkState::Closed(ClientError::Closed));
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Client {
    /// Connects and authenticates; then (with `auto_sync`) syncs and delivers events, and
    /// (with `auto_reconnect`) keeps the session alive. The first connection's failure is
    /// returned here; later ones are reported as [`Event::Connection`].
    pub async fn connect(config: ClientConfig) -> Result<(Self, Events), ClientError> {
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
        let endpoint = transport::endpoint(addr, &config.trust, &config.transport)?;
        let conn = endpoint.connect(addr, &name)?.await?;
        Ok((endpoint, conn))
    }

    /// Like [`Client::connect`], but on `endpoint`, which many clients may share (a load
    /// generator runs thousands of sessions over a few UDP sockets). The endpoint needs a
    /// default client configuration, e.g. from [`quinn_client_config`].
    /// [`Client::network_changed`] on such a client rebinds the shared socket, moving every
    /// connection on it.
    #[doc(hidden)]
    pub async fn connect_on(
        endpoint: quinn::Endpoint,
        config: ClientConfig,
    ) -> Result<(Self, Events), ClientError> {
        let timeout = config.transport.connect_timeout;
        tokio::time::timeout(timeout, Self::connect_with(config, Some(endpoint)))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn connect_inner(config: ClientConfig) -> Result<(Self, Events), ClientError> {
        Self::connect_with(config, None).await
    }

    async fn connect_with(
        config: ClientConfig,
        shared: Option<quinn::Endpoint>,
    ) -> Result<(Self, Events), ClientError> {
        let shared_endpoint = shared.is_some();
        let endpoint = match shared {
            Some(endpoint) => endpoint,
            None => {
                let (addr, _) =
                    transport::resolve(&config.server, config.server_name.as_deref()).await?;
                transport::endpoint(addr, &config.trust, &config.transport)?
            }
        };
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let _ = events_tx.try_send(Event::Connection(ConnectionState::Connecting));
        let first = link::establish(&endpoint, &config, config.resume_from.unwrap_or(0)).await?;
        let start = config
            .resume_from
            .unwrap_or(first.link.session.delivered_cursor);
        let inner = Arc::new(Inner {
            endpoint,
            shared_endpoint,
            events: events_tx,
            link: watch::Sender::new(LinkState::Down),
            last_link: Mutex::new(None),
            inbox: Arc::new(Mutex::new(inbox::InboxTracker::new(start))),
            paused: Mutex::default(),
            unpaused: tokio::sync::Notify::new(),
            pending_pings: Mutex::default(),
            pending_heartbeats: Mutex::default(),
            next_nonce: AtomicU64::new(1),
            sync_gate: Arc::new(tokio::sync::RwLock::new(())),
            own_acks_before_sync: Mutex::default(),
            user: first.link.session.user.clone(),
            device: first.link.session.device.clone(),
            sending: Mutex::default(),
            send_order: Mutex::default(),
            background: AtomicBool::new(config.background),
            stats: datagrams::Counters::default(),
            config,
        });
        let supervisor = tokio::spawn(link::supervise(inner.clone(), first));
        // Wait until the first link is published, so calls right after connect find it.
        let mut state = inner.link.subscribe();
        let _ = state.wait_for(|s| !matches!(s, LinkState::Down)).await;
        let events = Events {
            rx: events_rx,
            inbox: inner.inbox.clone(),
        };
        Ok((Self { inner, supervisor }, events))
    }

    /// The current (or last) session.
    pub fn session(&self) -> Session {
        lock(&self.inner.last_link)
            .as_ref()
            .map(|l| l.session.clone())
            .unwrap_or_else(|| Session {
                user: self.inner.user.clone(),
                device: self.inner.device.clone(),
                session_id: String::new(),
                server_time_ms: 0,
                inbox_head: 0,
                delivered_cursor: 0,
                limits: pb::ServerLimits::default(),
            })
    }

    /// The current (or last) QUIC connection, for diagnostics and tests.
    pub fn connection(&self) -> Option<quinn::Connection> {
        lock(&self.inner.last_link).as_ref().map(|l| l.conn.clone())
    }

    /// The highest inbox sequence up to which the app has taken every event (from
    /// [`Events`]). Persist it and pass it back as `resume_from` to resume exactly there.
    /// It can move back: after [`Event::SyncTooLong`] for a server whose store was restored,
    /// so persist the latest value, not the highest seen.
    pub fn inbox_cursor(&self) -> u64 {
        lock(&self.inner.inbox).processed()
    }

    /// Round trip on the reliable control stream.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let link = self.inner.current()?;
        let nonce = self.inner.next_nonce.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.inner.pending_pings).insert(nonce, tx);
        let start = Instant::now();
        let frame = ClientFrame {
            body: Some(client_frame::Body::Ping(pb::Ping {
                nonce,
                sent_at_us: 0,
            })),
        };
        link.write_control(&frame, link.max_frame).await?;
        match tokio::time::timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(_)) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(link.lost()),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Writes raw bytes on the control stream. For protocol conformance tests only.
    #[doc(hidden)]
    pub async fn write_control_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        let link = self.inner.current()?;
        link.control.lock().await.write_all(bytes).await?;
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
        match self.inner.current() {
            Ok(link) => link.conversations.lock().await.len(),
            Err(_) => 0,
        }
    }

    /// The OS reported a network change (Wi-Fi to cellular, a new address): move the
    /// connection to a fresh UDP socket. QUIC migrates the live connection to the new path
    /// without a new handshake; nothing in flight is lost.
    pub fn network_changed(&self) -> Result<(), ClientError> {
        let remote = self.connection().map(|c| c.remote_address());
        let local = match remote {
            Some(remote) => transport::local_bind_addr(remote),
            None => self
                .inner
                .endpoint
                .local_addr()
                .map_err(|e| ClientError::Config(e.to_string()))?,
        };
        let socket = std::net::UdpSocket::bind(local)
            .map_err(|e| ClientError::Config(format!("bind UDP socket: {e}")))?;
        self.inner
            .endpoint
            .rebind(socket)
            .map_err(|e| ClientError::Config(format!("rebind: {e}")))?;
        Ok(())
    }

    /// Foreground or background (like XMPP's client state indication). In the background the
    /// server stops sending this device presence and typing datagrams, the device shows as
    /// away, and the client stops its heartbeats; messages and receipts still arrive.
    pub async fn set_background(&self, background: bool) -> Result<(), ClientError> {
        self.inner.background.store(background, Ordering::Relaxed);
        let link = self.inner.current()?;
        let frame = ClientFrame {
            body: Some(client_frame::Body::ClientState(pb::ClientState {
                background,
            })),
        };
        link.write_control(&frame, link.max_frame).await
    }

    /// Waits until the client is finally disconnected, returning why.
    pub async fn closed(&self) -> ClientError {
        let mut state = self.inner.link.subscribe();
        match state.wait_for(|s| matches!(s, LinkState::Closed(_))).await {
            Ok(s) => match &*s {
                LinkState::Closed(e) => e.clone(),
                _ => ClientError::Closed,
            },
            Err(_) => ClientError::Closed,
        }
    }

    /// Acknowledges what was received, then closes the session gracefully.
    pub async fn close(self) {
        self.disconnect().await;
    }

    /// [`Client::close`] for a client that is shared (the FFI holds it in an `Arc`): every
    /// later call fails with [`ClientError::Closed`].
    pub async fn disconnect(&self) {
        self.supervisor.abort();
        let _ = self
            .inner
            .events
            .try_send(Event::Connection(ConnectionState::Disconnected {
                code: Some(ErrorCode::Ok),
                reason: "closed by the app".into(),
            }));
        if let Ok(link) = self.inner.current() {
            // A ping after the ack: the server reads the control stream in order, so its pong
            // proves the ack arrived before the connection is closed (closing discards data in
            // flight).
            if self.inner.flush_ack(&link).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), self.ping()).await;
            }
            link.close(ErrorCode::Ok, "bye");
        }
        self.inner
            .link
            .send_replace(LinkState::Closed(ClientError::Closed));
        if !self.inner.shared_endpoint {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        }
    }
}

impl Inner {
    /// The link if connected now.
    pub(crate) fn current(&self) -> Result<Arc<link::Link>, ClientError> {
        match &*self.link.borrow() {
            LinkState::Up(link) => Ok(link.clone()),
            LinkState::Down => Err(ClientError::Disconnected),
            LinkState::Closed(e) => Err(e.clone()),
        }
    }

    /// The link, waiting up to `reconnect_wait` while the client reconnects.
    pub(crate) async fn wait_link(&self) -> Result<Arc<link::Link>, ClientError> {
        let mut state = self.link.subscribe();
        let wait = self.config.transport.reconnect_wait;
        let found =
            tokio::time::timeout(wait, state.wait_for(|s| !matches!(s, LinkState::Down))).await;
        match found {
            Ok(Ok(s)) => match &*s {
                LinkState::Up(link) => Ok(link.clone()),
                LinkState::Closed(e) => Err(e.clone()),
                LinkState::Down => Err(ClientError::Disconnected),
            },
            Ok(Err(_)) => Err(ClientError::Closed),
            Err(_) => Err(ClientError::Disconnected),
        }
    }

    /// Sends the cumulative acknowledgement if the cursor moved.
    pub(crate) async fn flush_ack(&self, link: &link::Link) -> Result<(), ClientError> {
        let up_to = lock(&self.inbox).take_ack();
        if let Some(up_to) = up_to {
            let frame = ClientFrame {
                body: Some(client_frame::Body::AckInbox(pb::AckInbox {
                    up_to_inbox_seq: up_to,
                })),
            };
            if let Err(e) = link.write_control(&frame, link.max_frame).await {
                // Not acknowledged after all: try again on the next link.
                lock(&self.inbox).unack(up_to);
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) async fn emit(&self, event: Event) {
        let _ = self.events.send(event).await;
    }
}
