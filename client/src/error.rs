//! Client errors.

use tern_protocol::ErrorCode;
use tern_protocol::frame::{EncodeError, FrameError};

/// Everything a client call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration is unusable (bad address, unreadable CA file...).
    #[error("configuration: {0}")]
    Config(String),
    /// The server refused the request or closed the session, with a protocol error code.
    /// With `RATE_LIMITED`, `retry_after_ms` is how long the server asks to wait (else 0).
    #[error("server error {code}: {message}")]
    Server {
        code: ErrorCode,
        message: String,
        retry_after_ms: u64,
    },
    /// The connection closed, for a reason that is not a tern error code.
    #[error("connection lost: {0}")]
    ConnectionLost(quinn::ConnectionError),
    /// The QUIC handshake could not start.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The server sent bytes that are not valid frames.
    #[error("bad frame from server: {0}")]
    Frame(#[from] FrameError),
    /// A frame could not be encoded (for example: a message over the frame cap).
    #[error("encode: {0}")]
    Encode(#[from] EncodeError),
    /// The server answered with a frame that makes no sense here.
    #[error("unexpected reply from server: {0}")]
    Unexpected(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
    /// Not connected right now (the client is reconnecting), and it did not reconnect in time.
    #[error("not connected")]
    Disconnected,
    /// The operation did not complete in time.
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    /// The protocol error code, when the server gave one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying on a new connection can succeed: the connection was lost, not refused.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::ConnectionLost(_) | ClientError::Disconnected | ClientError::Timeout => {
                true
            }
            ClientError::Server { code, .. } => matches!(
                code,
                ErrorCode::ServerShutdown
                    | ErrorCode::Internal
                    | ErrorCode::IdleTimeout
                    | ErrorCode::Ok
            ),
            _ => false,
        }
    }

    /// Maps a connection error, surfacing a tern close code as [`ClientError::Server`].
    pub fn from_connection(e: quinn::ConnectionError) -> Self {
        match &e {
            quinn::ConnectionError::ApplicationClosed(close) => {
                let code = u32::try_from(close.error_code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32)
                    .unwrap_or(ErrorCode::Internal);
                ClientError::Server {
                    code,
                    message: String::from_utf8_lossy(&close.reason).into_owned(),
                    retry_after_ms: 0,
                }
            }
            _ => ClientError::ConnectionLost(e),
        }
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        Self::from_connection(e)
    }
}

impl From<quinn::ReadError> for ClientError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(e) => e.into(),
            quinn::ReadError::Reset(code) => ClientError::Server {
                code: u32::try_from(code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32)
                    .unwrap_or(ErrorCode::Internal),
                message: "stream reset by server".into(),
                retry_after_ms: 0,
            },
            other => ClientError::Unexpected(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for ClientError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(e) => e.into(),
            quinn::WriteError::Stopped(code) => ClientError::Server {
                code: u32::try_from(code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32)
                    .unwrap_or(ErrorCode::Internal),
                message: "stream stopped by server".into(),
                retry_after_ms: 0,
            },
            other => ClientError::Unexpected(other.to_string()),
        }
    }
}

impl From<tern_protocol::pb::Error> for ClientError {
    fn from(e: tern_protocol::pb::Error) -> Self {
        ClientError::Server {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }
}
