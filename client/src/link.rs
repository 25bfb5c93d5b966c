//! One connection ("link") to the server, and the supervisor that replaces it when it is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tern_protocol::pb::{self, ClientFrame, ServerFrame, client_frame, request, server_frame};
use tern_protocol::{ErrorCode, PROTOCOL_VERSION};
use tracing::debug;

use crate::messaging::{self, ConversationStream};
use crate::transport::{self, FrameReader};
use crate::{ClientConfig, ClientError, ConnectionState, Event, Inner, LinkState, Session, lock};

/// How often received entries are acknowledged (cumulatively) and gaps checked.
const ACK_INTERVAL: Duration = Duration::from_millis(100);
/// How long a gap in the inbox may stay open before the client syncs to fill it.
const GAP_PATIENCE: Duration = Duration::from_millis(800);

/// An authenticated connection.
pub(crate) struct Link {
    pub conn: quinn::Connection,
    pub session: Session,
    /// Largest frame either side may send on this connection, from `Welcome`.
    pub max_frame: usize,
    pub control: tokio::sync::Mutex<quinn::SendStream>,
    pub conversations: tokio::sync::Mutex<HashMap<String, Arc<ConversationStream>>>,
}

impl Link {
    pub(crate) async fn write_control(
        &self,
        frame: &ClientFrame,
        max: usize,
    ) -> Result<(), ClientError> {
        let bytes = tern_protocol::frame::frame_bytes(frame, max)?;
        self.control.lock().await.write_chunk(bytes).await?;
        Ok(())
    }

    pub(crate) fn lost(&self) -> ClientError {
        self.conn
            .close_reason()
            .map_or(ClientError::Closed, ClientError::from)
    }

    pub(crate) fn close(&self, code: ErrorCode, reason: &str) {
        self.conn
            .close(quinn::VarInt::from_u32(code.as_u32()), reason.as_bytes());
    }
}

/// A new link, with what it needs to start serving.
pub(crate) struct Established {
    pub link: Arc<Link>,
    pub control: FrameReader,
    /// The sync request sent as 0-RTT data, if any: its response stream.
    pub early_sync: Option<FrameReader>,
    pub zero_rtt: Option<quinn::ZeroRttAccepted>,
}

/// Connects, authenticates, and (when the TLS session can be resumed) sends Hello and the
/// sync request from `since` as 0-RTT data: both are idempotent, so a replay does no harm.
pub(crate) async fn establish(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
    since: u64,
) -> Result<Established, ClientError> {
    let max = tern_protocol::DEFAULT_MAX_FRAME_BYTES;
    let (addr, name) = transport::resolve(&config.server, config.server_name.as_deref()).await?;
    let connecting = endpoint.connect(addr, &name)?;
    let (conn, zero_rtt) = match connecting.into_0rtt() {
        Ok((conn, accepted)) => (conn, Some(accepted)),
        Err(connecting) => {
            debug!("no resumable TLS session: full handshake");
            (connecting.await?, None)
        }
    };
    let (mut send, recv) = conn.open_bi().await?;
    let hello = ClientFrame {
        body: Some(client_frame::Body::Hello(pb::Hello {
            protocol_version: PROTOCOL_VERSION,
            token: config.token.clone(),
            client_agent: config.client_agent.clone(),
            last_inbox_seq: since,
            background: config.background,
        })),
    };
    send.write_chunk(tern_protocol::frame::frame_bytes(&hello, max)?)
        .await?;
    let mut early_sync = if zero_rtt.is_some() && config.auto_sync {
        open_sync(&conn, since, max).await.ok()
    } else {
        None
    };
    let mut control = FrameReader::new(recv, max);
    let welcome = match control.next::<ServerFrame>().await {
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
                Ok(frame) => ClientError::Unexpected(format!("expected Welcome, got {frame:?}")),
            });
        }
    };
    let max_frame = negotiated_max_frame(welcome.limits.as_ref());
    control.set_max(max_frame);
    if let Some(reader) = early_sync.as_mut() {
        reader.set_max(max_frame);
    }
    let session = Session {
        user: welcome.user_id,
        device: welcome.device_id,
        session_id: welcome.session_id,
        server_time_ms: welcome.server_time_ms,
        inbox_head: welcome.inbox_head,
        delivered_cursor: welcome.delivered_cursor,
        limits: welcome.limits.unwrap_or_default(),
    };
    let link = Arc::new(Link {
        conn,
        session,
        max_frame,
        control: tokio::sync::Mutex::new(send),
        conversations: tokio::sync::Mutex::default(),
    });
    Ok(Established {
        link,
        control,
        early_sync,
        zero_rtt,
    })
}

/// The most frames of a session may hold: the server's cap from `Welcome` (a server that
/// states none uses the protocol default), but never more than [`MAX_ACCEPTED_FRAME_BYTES`],
/// so a misconfigured server cannot make the client buffer without bound.
fn negotiated_max_frame(limits: Option<&pb::ServerLimits>) -> usize {
    match limits.map(|l| l.max_frame_bytes as usize) {
        None | Some(0) => tern_protocol::DEFAULT_MAX_FRAME_BYTES,
        Some(max) => max.clamp(MIN_ACCEPTED_FRAME_BYTES, MAX_ACCEPTED_FRAME_BYTES),
    }
}

/// Largest frame cap a server may set for this client: 16 MiB.
const MAX_ACCEPTED_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Smallest: below this not even a sync page of small messages fits.
const MIN_ACCEPTED_FRAME_BYTES: usize = 4 * 1024;

/// Opens a request stream with a sync request from `since`.
pub(crate) async fn open_sync(
    conn: &quinn::Connection,
    since: u64,
    max: usize,
) -> Result<FrameReader, ClientError> {
    let (mut send, recv) = conn.open_bi().await?;
    let req = pb::Request {
        body: Some(request::Body::Sync(pb::SyncRequest {
            since_inbox_seq: since,
            page_size: 0,
        })),
    };
    let frame = ClientFrame {
        body: Some(client_frame::Body::Request(req)),
    };
    send.write_chunk(tern_protocol::frame::frame_bytes(&frame, max)?)
        .await?;
    let _ = send.finish();
    Ok(FrameReader::new(recv, max))
}

/// Whether reconnecting can help after the session ended with `error`.
fn fatal(error: &ClientError) -> bool {
    match error {
        ClientError::Server { code, .. } => matches!(
            code,
            ErrorCode::Unauthenticated
                | ErrorCode::TokenInvalid
                | ErrorCode::TokenExpired
                | ErrorCode::SessionReplaced
                | ErrorCode::UnsupportedVersion
                | ErrorCode::ProtocolViolation
                | ErrorCode::FrameTooLarge
                | ErrorCode::FrameTruncated
        ),
        ClientError::Config(_) | ClientError::Closed => true,
        _ => false,
    }
}

/// Serves links one after another until the session ends for good.
pub(crate) async fn supervise(inner: Arc<Inner>, first: Established) {
    let mut next = first;
    loop {
        let reason = serve(&inner, next).await;
        let code = reason.code();
        if fatal(&reason) || !inner.config.auto_reconnect {
            finish(&inner, reason).await;
            return;
        }
        inner.link.send_replace(LinkState::Down);
        let mut attempt = 0u32;
        next = loop {
            attempt += 1;
            let delay = backoff(&inner, attempt);
            let state = ConnectionState::Reconnecting {
                attempt,
                delay,
                code,
                reason: reason.to_string(),
            };
            inner.emit(Event::Connection(state)).await;
            tokio::time::sleep(delay).await;
            let since = lock(&inner.inbox).cursor();
            let attempt_result = tokio::time::timeout(
                inner.config.transport.connect_timeout,
                establish(&inner.endpoint, &inner.config, since),
            )
            .await;
            match attempt_result {
                Ok(Ok(established)) => {
                    inner.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    break established;
                }
                Ok(Err(e)) if fatal(&e) => {
                    finish(&inner, e).await;
                    return;
                }
                Ok(Err(e)) => debug!(error = %e, attempt, "reconnect failed"),
                Err(_) => debug!(attempt, "reconnect timed out"),
            }
        };
    }
}

async fn finish(inner: &Inner, reason: ClientError) {
    let state = ConnectionState::Disconnected {
        code: reason.code(),
        reason: reason.to_string(),
    };
    inner.link.send_replace(LinkState::Closed(reason));
    inner.emit(Event::Connection(state)).await;
}

/// Full jitter: uniform in [0, min(max, base × 2^(attempt-1))].
fn backoff(inner: &Inner, attempt: u32) -> Duration {
    let settings = &inner.config.transport;
    let ceiling = settings
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(settings.backoff_max);
    ceiling.mul_f64(rand::rng().random::<f64>())
}

/// Runs one link until its connection closes; returns why it closed.
async fn serve(inner: &Arc<Inner>, established: Established) -> ClientError {
    let Established {
        link,
        control,
        early_sync,
        zero_rtt,
    } = established;
    *lock(&inner.last_link) = Some(link.clone());
    if inner.config.auto_sync {
        *lock(&inner.own_acks_before_sync) = Some(Vec::new());
    }
    inner.link.send_replace(LinkState::Up(link.clone()));
    inner
        .emit(Event::Connection(ConnectionState::Connected))
        .await;
    if let Some(zero_rtt) = zero_rtt {
        let inner = inner.clone();
        tokio::spawn(async move {
            if zero_rtt.await {
                inner
                    .stats
                    .zero_rtt_accepted
                    .fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // Held from before the push readers start until the first sync has reported its
    // entries, so no push of this link can be reported ahead of them.
    let gate = inner.sync_gate.clone().write_owned().await;
    // A JoinSet aborts its tasks when dropped: also when this future is dropped because the
    // app closed or dropped the client, so no task outlives the client holding its state.
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(control_reader(control, link.clone(), inner.clone()));
    tasks.spawn(messaging::accept_pushes(link.clone(), inner.clone()));
    tasks.spawn(messaging::reap_idle_streams(
        link.clone(),
        inner.config.transport.conversation_idle,
    ));
    tasks.spawn(crate::datagrams::read_datagrams(
        link.clone(),
        inner.clone(),
    ));
    tasks.spawn(crate::datagrams::heartbeats(link.clone(), inner.clone()));
    if inner.config.auto_sync {
        tasks.spawn(keep_in_sync(link.clone(), inner.clone(), early_sync, gate));
    } else {
        drop(gate);
    }
    let reason = ClientError::from(link.conn.closed().await);
    tasks.abort_all();
    lock(&inner.pending_pings).clear();
    reason
}

/// Reads the control stream: pongs, the presence snapshot, server errors.
async fn control_reader(mut reader: FrameReader, link: Arc<Link>, inner: Arc<Inner>) {
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
                body: Some(server_frame::Body::PresenceSnapshot(snapshot)),
            })) => {
                for presence in snapshot.contacts {
                    inner.emit(Event::Presence(presence)).await;
                }
            }
            Ok(Some(ServerFrame {
                body: Some(server_frame::Body::Error(e)),
            })) => {
                debug!(code = e.code, message = %e.message, "server error on the control stream");
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let _ = link.conn.closed().await;
}

/// Closes a link that stopped working, unless it is closing anyway: a failure is often the
/// first sign of the server's own close, whose reason (e.g. SERVER_SHUTDOWN) should win.
async fn give_up(link: &Link, why: &str) {
    if tokio::time::timeout(Duration::from_secs(1), link.conn.closed())
        .await
        .is_err()
    {
        link.close(ErrorCode::Internal, why);
    }
}

/// Syncs from the cursor (using the 0-RTT sync if one was sent), then keeps acknowledging
/// what arrives and fills gaps that stay open.
async fn keep_in_sync(
    link: Arc<Link>,
    inner: Arc<Inner>,
    early_sync: Option<FrameReader>,
    gate: tokio::sync::OwnedRwLockWriteGuard<()>,
) {
    let first = match early_sync {
        Some(reader) => inner.read_sync_gated(reader, true).await,
        None => Err(ClientError::Disconnected),
    };
    let first = match first {
        Ok(result) => Ok(result),
        Err(e) => {
            if !matches!(e, ClientError::Disconnected) {
                debug!(error = %e, "0-RTT sync failed; syncing again");
            }
            let cursor = lock(&inner.inbox).cursor();
            match open_sync(&link.conn, cursor, link.max_frame).await {
                Ok(reader) => inner.read_sync_gated(reader, true).await,
                Err(e) => Err(e),
            }
        }
    };
    inner.first_sync_ended();
    drop(gate);
    if first.is_err() {
        // A link that cannot sync is of no use: let the supervisor make a new one.
        give_up(&link, "sync failed").await;
        return;
    }
    let mut tick = tokio::time::interval(ACK_INTERVAL);
    loop {
        tick.tick().await;
        let gap = lock(&inner.inbox).stale_gap(GAP_PATIENCE);
        let healthy = inner.flush_ack(&link).await.is_ok()
            && match gap {
                Some(cursor) => inner.fill_gap(&link, cursor).await.is_ok(),
                None => true,
            };
        if !healthy {
            give_up(&link, "acknowledging or filling a gap failed").await;
            return;
        }
    }
}
