//! Async Rust client for tern.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tern_client::ClientError> {
//! use tern_client::{Client, ClientConfig, Trust};
//! let config = ClientConfig::new("localhost:4433", "TOKEN", Trust::CaFile("certs/ca.pem".into()));
//! let (client, mut events) = Client::connect(config).await?;
//! println!("signed in as {}", client.session().user);
//! while let Some(event) = events.recv().await {
//!     println!("{event:?}");
//! }
//! # Ok(()) }
//! ```
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod error;
mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_protocol::pb::{self, ClientFrame, ServerFrame, client_frame, server_frame};
use tern_protocol::{ErrorCode, PROTOCOL_VERSION};
use tokio::sync::{Mutex, mpsc, oneshot};

pub use error::ClientError;
pub use tern_protocol;
use transport::FrameReader;
pub use transport::{TransportSettings, Trust};

/// Capacity of the event channel; when the app does not drain it, the client stops reading
/// pushes (back-pressure to the server) rather than buffering without bound.
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
    /// Highest inbox sequence this device has processed.
    pub last_inbox_seq: u64,
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
            last_inbox_seq: 0,
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
    /// The session ended; `code` is the server's reason when it gave one.
    Disconnected {
        code: Option<ErrorCode>,
        reason: String,
    },
}

/// A connected, authenticated client.
#[derive(Debug)]
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    session: Session,
    control: Mutex<quinn::SendStream>,
    pending_pings: Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<pb::Pong>>>>,
    next_nonce: AtomicU64,
    max_frame: usize,
}

impl Client {
    /// Connects, authenticates, and starts delivering events.
    pub async fn connect(
        config: ClientConfig,
    ) -> Result<(Self, mpsc::Receiver<Event>), ClientError> {
        let timeout = config.transport.connect_timeout;
        tokio::time::timeout(timeout, Self::connect_inner(config))
            .await
            .map_err(|_| ClientError::Timeout)?
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
                last_inbox_seq: config.last_inbox_seq,
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
            Ok(other) => {
                // The server may close right after its error; prefer its close code.
                if let Some(reason) = conn.close_reason() {
                    return Err(reason.into());
                }
                return Err(ClientError::Unexpected(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
            Err(e) => {
                if let Some(reason) = conn.close_reason() {
                    return Err(reason.into());
                }
                return Err(e);
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
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let client = Self {
            endpoint,
            conn: conn.clone(),
            session,
            control: Mutex::new(send),
            pending_pings: Arc::default(),
            next_nonce: AtomicU64::new(1),
            max_frame,
        };
        tokio::spawn(control_reader(
            reader,
            conn,
            client.pending_pings.clone(),
            events_tx,
        ));
        Ok((client, events_rx))
    }

    /// A bare authenticated-less QUIC connection with tern's TLS and transport settings.
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

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The underlying QUIC connection (for diagnostics and tests).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Round trip on the reliable control stream.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let nonce = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending_pings).insert(nonce, tx);
        let start = Instant::now();
        let frame = ClientFrame {
            body: Some(client_frame::Body::Ping(pb::Ping {
                nonce,
                sent_at_us: 0,
            })),
        };
        self.write_control(&frame).await?;
        match rx.await {
            Ok(_) => Ok(start.elapsed()),
            Err(_) => Err(self
                .conn
                .close_reason()
                .map_or(ClientError::Closed, ClientError::from)),
        }
    }

    /// Writes raw bytes on the control stream. For protocol conformance tests only.
    #[doc(hidden)]
    pub async fn write_control_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.control.lock().await.write_all(bytes).await?;
        Ok(())
    }

    async fn write_control(&self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = tern_protocol::frame::frame_bytes(frame, self.max_frame)?;
        self.control.lock().await.write_chunk(bytes).await?;
        Ok(())
    }

    /// Waits until the connection is closed, returning why.
    pub async fn closed(&self) -> ClientError {
        self.conn.closed().await.into()
    }

    /// Closes the session gracefully.
    pub async fn close(self) {
        self.conn
            .close(quinn::VarInt::from_u32(ErrorCode::Ok.as_u32()), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the control stream: pongs, server errors, and the end of the session.
async fn control_reader(
    mut reader: FrameReader,
    conn: quinn::Connection,
    pending_pings: Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<pb::Pong>>>>,
    events: mpsc::Sender<Event>,
) {
    let mut last_error: Option<pb::Error> = None;
    loop {
        match reader.next::<ServerFrame>().await {
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Pong(pong)),
            })) => {
                if let Some(tx) = lock(&pending_pings).remove(&pong.nonce) {
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
    let reason = conn.closed().await;
    lock(&pending_pings).clear();
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
    let _ = events.send(event).await;
}
