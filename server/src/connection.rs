//! One client connection: handshake, authentication on the control stream, then its streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use tern_protocol::pb::{
    self, ClientFrame, PresenceStatus, ServerFrame, client_frame, server_frame,
};
use tern_protocol::{ErrorCode, PROTOCOL_VERSION};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::ServerState;
use crate::auth::{AuthError, unix_now_ms};
use crate::delivery::PushState;
use crate::framed::{
    FrameReader, ReadFrameError, WriteFrameError, error_frame, varint, write_frame,
};
use crate::registry::Session;

/// How long to wait for the peer to receive a final error frame before closing.
const ERROR_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a session ended (or never began). Each maps to a close code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("no valid Hello within the auth timeout")]
    AuthTimeout,
    #[error("first frame was not Hello")]
    NotHello,
    #[error("unsupported protocol version {0}")]
    Version(u32),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("unexpected frame on the control stream")]
    UnexpectedFrame,
    #[error("control stream: {0}")]
    Read(#[from] ReadFrameError),
    #[error("control stream: {0}")]
    Write(#[from] WriteFrameError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl SessionError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::AuthTimeout => ErrorCode::AuthTimeout,
            SessionError::NotHello => ErrorCode::Unauthenticated,
            SessionError::Version(_) => ErrorCode::UnsupportedVersion,
            SessionError::Auth(e) => e.code(),
            SessionError::UnexpectedFrame => ErrorCode::ProtocolViolation,
            SessionError::Read(e) => e.code(),
            SessionError::Write(_) | SessionError::Connection(_) => ErrorCode::Ok,
            SessionError::Store(e) => e.code(),
        }
    }
}

/// Serves one incoming connection until it closes.
pub async fn serve(state: Arc<ServerState>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    // This task lives as long as the connection, and its size is that of its largest state;
    // the states an idle session never returns to (handshake, authentication, greeting,
    // closing with an error) are boxed so that they do not count (3.4 KB → about 1 KB).
    let conn = match Box::pin(incoming.into_future()).await {
        Ok(conn) => conn,
        Err(e) => {
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let span = info_span!("conn", id = conn.stable_id(), %remote);
    async move {
        match Box::pin(authenticate(&state, &conn)).await {
            Ok((session, control)) => run_session(state, session, control).await,
            Err((error, send)) => {
                info!(error = %error, code = %error.code(), "refused");
                Box::pin(close_with_error(&conn, send, &error, &state)).await;
            }
        }
    }
    .instrument(span)
    .await;
}

type Control = (quinn::SendStream, FrameReader);

/// Reads Hello from the first stream and verifies its token, within the auth timeout.
async fn authenticate(
    state: &ServerState,
    conn: &quinn::Connection,
) -> Result<(Arc<Session>, Control), (SessionError, Option<quinn::SendStream>)> {
    let max = state.config.max_frame_bytes as usize;
    // One deadline for the stream and its Hello together.
    let deadline = tokio::time::Instant::now() + state.config.auth_timeout();
    let (send, recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Err(_) => return Err((SessionError::AuthTimeout, None)),
        Ok(Err(e)) => return Err((e.into(), None)),
        Ok(Ok(streams)) => streams,
    };
    let mut reader = FrameReader::new(recv, max);
    let hello = match tokio::time::timeout_at(deadline, reader.next::<ClientFrame>()).await {
        Err(_) => Err(SessionError::AuthTimeout),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(Some(ClientFrame {
            body: Some(client_frame::Body::Hello(hello)),
        }))) => Ok(hello),
        Ok(Ok(_)) => Err(SessionError::NotHello),
    };
    let hello = match hello {
        Ok(hello) => hello,
        Err(e) => return Err((e, Some(send))),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err((SessionError::Version(hello.protocol_version), Some(send)));
    }
    let identity = match state.auth.verify(&hello.token) {
        Ok(identity) => identity,
        Err(e) => return Err((e.into(), Some(send))),
    };
    let inbox_head = match state.store.inbox_head(&identity.user) {
        Ok(head) => head,
        Err(e) => return Err((SessionError::Store(e), Some(send))),
    };
    let session = Arc::new(Session {
        id: state.next_session_id.fetch_add(1, Ordering::Relaxed),
        user: identity.user.into(),
        device: identity.device.into(),
        conn: conn.clone(),
        push: PushState::new(inbox_head),
        presence: AtomicI32::new(if hello.background {
            PresenceStatus::Away
        } else {
            PresenceStatus::Online
        } as i32),
        background: AtomicBool::new(hello.background),
    });
    Ok((session, (send, reader)))
}

/// Sends a final `Error` frame (when a stream exists), waits briefly for the peer to get it,
/// then closes the connection with the error's code.
async fn close_with_error(
    conn: &quinn::Connection,
    send: Option<quinn::SendStream>,
    error: &SessionError,
    state: &ServerState,
) {
    let code = error.code();
    if let Some(mut send) = send {
        let frame = error_frame(code, error.to_string());
        if write_frame(&mut send, &frame, state.config.max_frame_bytes as usize)
            .await
            .is_ok()
            && send.finish().is_ok()
        {
            // Closing at once would discard the frame in flight; the close code alone still
            // tells the client why if this times out.
            let _ = tokio::time::timeout(ERROR_FLUSH_TIMEOUT, send.stopped()).await;
        }
    }
    conn.close(varint(code), error.to_string().as_bytes());
}

/// Runs an authenticated session: registers it, answers Hello, then serves its streams.
async fn run_session(state: Arc<ServerState>, session: Arc<Session>, control: Control) {
    let (mut send, mut reader) = control;
    if let Some(old) = state.registry.register(session.clone()) {
        info!(old = old.id, "replacing the device's previous session");
        old.conn.close(
            varint(ErrorCode::SessionReplaced),
            b"replaced by a newer connection",
        );
    }
    info!(user = %session.user, device = %session.device, session = session.id, "authenticated");

    let result = match Box::pin(greet(&state, &session, &mut send)).await {
        Ok(()) => {
            let datagrams = tokio::spawn(crate::datagrams::datagram_loop(
                state.clone(),
                session.clone(),
            ));
            let streams = tokio::spawn(crate::streams::accept_streams(
                state.clone(),
                session.clone(),
            ));
            let pusher = tokio::spawn(crate::delivery::push_loop(state.clone(), session.clone()));
            let result = control_loop(&state, &session, &mut send, &mut reader).await;
            streams.abort();
            pusher.abort();
            datagrams.abort();
            result
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => debug!("control stream finished"),
        Err(SessionError::Connection(e)) => debug!(reason = %e, "connection closed"),
        Err(error) => {
            warn!(error = %error, code = %error.code(), "closing session");
            Box::pin(close_with_error(&session.conn, Some(send), &error, &state)).await;
        }
    }
    state
        .registry
        .unregister(&session.user, &session.device, session.id);
    crate::datagrams::refresh_presence(&state, &session.user).await;
    session.conn.close(varint(ErrorCode::Ok), b"");
}

/// Answers Hello with Welcome, then sends the presence snapshot.
async fn greet(
    state: &ServerState,
    session: &Session,
    send: &mut quinn::SendStream,
) -> Result<(), WriteFrameError> {
    let max = state.config.max_frame_bytes as usize;
    let welcome = ServerFrame {
        body: Some(server_frame::Body::Welcome(pb::Welcome {
            user_id: session.user.to_string(),
            device_id: session.device.to_string(),
            server_time_ms: unix_now_ms(),
            session_id: session.id.to_string(),
            inbox_head: session.push_head(),
            delivered_cursor: state
                .store
                .cursor(&session.user, &session.device)
                .unwrap_or(0),
            limits: Some(pb::ServerLimits {
                max_frame_bytes: state.config.max_frame_bytes,
                max_message_bytes: state.config.max_message_bytes,
                max_group_members: state.config.max_group_members,
                max_sync_page: crate::MAX_SYNC_PAGE,
            }),
        })),
    };
    write_frame(send, &welcome, max).await?;
    // Contacts learn that this user is online; this user learns who is.
    crate::datagrams::refresh_presence(state, &session.user).await;
    let snapshot = ServerFrame {
        body: Some(server_frame::Body::PresenceSnapshot(
            crate::datagrams::snapshot(state, &session.user).await,
        )),
    };
    let _ = write_frame(send, &snapshot, max).await;
    Ok(())
}

/// Serves frames on the control stream until the peer finishes it or breaks the protocol.
async fn control_loop(
    state: &ServerState,
    session: &Session,
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
) -> Result<(), SessionError> {
    let max = state.config.max_frame_bytes as usize;
    // Only acknowledgements that move the cursor reach the (shared) storage writer.
    let mut acked = 0;
    loop {
        let frame = tokio::select! {
            frame = reader.next::<ClientFrame>() => frame,
            closed = session.conn.closed() => return Err(closed.into()),
        };
        let frame = match frame {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(ReadFrameError::Stream(_)) => return Err(session.conn.closed().await.into()),
            Err(e) => return Err(e.into()),
        };
        match frame.body {
            Some(client_frame::Body::Ping(ping)) => {
                let pong = ServerFrame {
                    body: Some(server_frame::Body::Pong(pb::Pong {
                        nonce: ping.nonce,
                        sent_at_us: ping.sent_at_us,
                        server_time_ms: unix_now_ms(),
                    })),
                };
                write_frame(send, &pong, max).await?;
            }
            Some(client_frame::Body::ClientState(client))
                if client.background == session.is_background() => {}
            Some(client_frame::Body::ClientState(client)) => {
                session
                    .background
                    .store(client.background, Ordering::Relaxed);
                let status = if client.background {
                    PresenceStatus::Away
                } else {
                    PresenceStatus::Online
                };
                session.set_presence(status);
                crate::datagrams::refresh_presence(state, &session.user).await;
            }
            Some(client_frame::Body::AckInbox(ack)) if ack.up_to_inbox_seq <= acked => {}
            Some(client_frame::Body::AckInbox(ack)) => {
                acked = ack.up_to_inbox_seq;
                state
                    .store
                    .writer()
                    .ack(
                        session.user.clone(),
                        session.device.clone(),
                        ack.up_to_inbox_seq,
                    )
                    .await?;
            }
            _ => return Err(SessionError::UnexpectedFrame),
        }
    }
}
