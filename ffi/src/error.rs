//! The one error type at the boundary.

use tern_client::ClientError;
use tern_client::tern_protocol::ErrorCode;

/// The protocol's error codes (PROTOCOL.md, "Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, uniffi::Enum)]
#[non_exhaustive]
pub enum TernErrorCode {
    Ok,
    Internal,
    ProtocolViolation,
    FrameTooLarge,
    FrameTruncated,
    Unauthenticated,
    TokenInvalid,
    TokenExpired,
    AuthTimeout,
    SessionReplaced,
    ServerShutdown,
    UnsupportedVersion,
    NotFound,
    Forbidden,
    MessageTooLarge,
    RateLimited,
    InvalidArgument,
    LimitExceeded,
    IdleTimeout,
}

impl From<ErrorCode> for TernErrorCode {
    fn from(code: ErrorCode) -> Self {
        match code {
            ErrorCode::Ok => Self::Ok,
            ErrorCode::Internal => Self::Internal,
            ErrorCode::ProtocolViolation => Self::ProtocolViolation,
            ErrorCode::FrameTooLarge => Self::FrameTooLarge,
            ErrorCode::FrameTruncated => Self::FrameTruncated,
            ErrorCode::Unauthenticated => Self::Unauthenticated,
            ErrorCode::TokenInvalid => Self::TokenInvalid,
            ErrorCode::TokenExpired => Self::TokenExpired,
            ErrorCode::AuthTimeout => Self::AuthTimeout,
            ErrorCode::SessionReplaced => Self::SessionReplaced,
            ErrorCode::ServerShutdown => Self::ServerShutdown,
            ErrorCode::UnsupportedVersion => Self::UnsupportedVersion,
            ErrorCode::NotFound => Self::NotFound,
            ErrorCode::Forbidden => Self::Forbidden,
            ErrorCode::MessageTooLarge => Self::MessageTooLarge,
            ErrorCode::RateLimited => Self::RateLimited,
            ErrorCode::InvalidArgument => Self::InvalidArgument,
            ErrorCode::LimitExceeded => Self::LimitExceeded,
            ErrorCode::IdleTimeout => Self::IdleTimeout,
        }
    }
}

/// Everything a call can fail with. (`TernException` in Kotlin, `TernError` in Swift.)
#[derive(Debug, Clone, thiserror::Error, uniffi::Error)]
#[non_exhaustive]
pub enum TernError {
    /// The server refused: a bad or expired token, a forbidden conversation, a limit...
    #[error("server error {code:?}: {detail}")]
    Server { code: TernErrorCode, detail: String },
    /// The configuration is unusable (bad address, bad CA certificate...).
    #[error("configuration: {detail}")]
    Config { detail: String },
    /// No connection: it could not be made, or it was lost and not restored in time. Safe to
    /// retry; sends carry an id that makes a retry store nothing twice.
    #[error("connection: {detail}")]
    Connection { detail: String },
    /// The call did not complete in time.
    #[error("timed out")]
    Timeout,
    /// The client was disconnected (by `disconnect`, or finally by the server).
    #[error("client closed")]
    Closed,
    /// The server sent something this client cannot understand (a version mismatch?).
    #[error("protocol: {detail}")]
    Protocol { detail: String },
    /// A failure inside the bindings themselves.
    #[error("internal: {detail}")]
    Internal { detail: String },
}

impl From<ClientError> for TernError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server { code, message, .. } => Self::Server {
                code: code.into(),
                detail: message,
            },
            ClientError::Config(detail) => Self::Config { detail },
            ClientError::ConnectionLost(_)
            | ClientError::Connect(_)
            | ClientError::Disconnected => Self::Connection {
                detail: e.to_string(),
            },
            ClientError::Timeout => Self::Timeout,
            ClientError::Closed => Self::Closed,
            ClientError::Frame(_) | ClientError::Encode(_) | ClientError::Unexpected(_) => {
                Self::Protocol {
                    detail: e.to_string(),
                }
            }
            // ClientError is non_exhaustive: a variant added later surfaces as internal.
            other => Self::Internal {
                detail: other.to_string(),
            },
        }
    }
}
