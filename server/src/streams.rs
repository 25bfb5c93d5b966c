//! Streams a client opens after the control stream: conversation and request streams.

use std::sync::Arc;

use tern_protocol::ErrorCode;
use tern_protocol::pb::{ClientFrame, client_frame};
use tracing::debug;

use crate::ServerState;
use crate::framed::{FrameReader, error_frame, varint, write_frame};
use crate::registry::Session;

/// Accepts the session's streams until the connection closes, each served in its own task so
/// one stalled conversation never delays another.
pub async fn accept_streams(state: Arc<ServerState>, session: Arc<Session>) {
    while let Ok((send, recv)) = session.conn.accept_bi().await {
        tokio::spawn(serve_stream(state.clone(), session.clone(), send, recv));
    }
}

async fn serve_stream(
    state: Arc<ServerState>,
    _session: Arc<Session>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let max = state.config.max_frame_bytes as usize;
    let mut reader = FrameReader::new(recv, max);
    let code = match reader.next::<ClientFrame>().await {
        Ok(Some(ClientFrame {
            body: Some(client_frame::Body::OpenConversation(_) | client_frame::Body::Request(_)),
        })) => ErrorCode::InvalidArgument,
        Ok(_) => ErrorCode::ProtocolViolation,
        Err(e) => e.code(),
    };
    debug!(%code, "refusing stream");
    let _ = write_frame(
        &mut send,
        &error_frame(code, "stream kind not supported"),
        max,
    )
    .await;
    let _ = send.finish();
    reader.stop(code);
    let _ = varint(code);
}
