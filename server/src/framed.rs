//! Reading and writing protocol frames on quinn streams.

use bytes::BytesMut;
use tern_protocol::frame::{self, EncodeError, FrameError};
use tern_protocol::pb::{ServerFrame, server_frame};
use tern_protocol::{ErrorCode, pb};

/// Bytes requested from quinn per read; frames larger than this span several reads.
const READ_CHUNK: usize = 16 * 1024;

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadFrameError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream: {0}")]
    Stream(#[from] quinn::ReadError),
}

impl ReadFrameError {
    /// The code to close or reset with, if the peer is to blame.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReadFrameError::Frame(e) => e.code(),
            ReadFrameError::Stream(_) => ErrorCode::Ok,
        }
    }
}

/// The receiving half of a stream, with its frame buffer.
#[derive(Debug)]
pub struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    pub fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame, or `None` when the peer finished the stream cleanly.
    pub async fn next<M: prost::Message + Default>(&mut self) -> Result<Option<M>, ReadFrameError> {
        loop {
            if let Some(frame) = frame::decode_frame(&mut self.buf, self.max)? {
                return Ok(Some(frame));
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => {
                    frame::finish(&self.buf)?;
                    return Ok(None);
                }
            }
        }
    }

    /// Tells the peer to stop sending on this stream.
    pub fn stop(&mut self, code: ErrorCode) {
        let _ = self.recv.stop(quinn::VarInt::from_u32(code.as_u32()));
    }
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteFrameError {
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("stream: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// Writes one server frame.
pub async fn write_frame(
    send: &mut quinn::SendStream,
    frame: &ServerFrame,
    max: usize,
) -> Result<(), WriteFrameError> {
    let bytes = frame::frame_bytes(frame, max)?;
    send.write_chunk(bytes).await?;
    Ok(())
}

/// An `Error` frame.
pub fn error_frame(code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    error_frame_retry(code, message, 0)
}

/// An `Error` frame telling when to retry (`RATE_LIMITED`).
pub fn error_frame_retry(
    code: ErrorCode,
    message: impl Into<String>,
    retry_after_ms: u64,
) -> ServerFrame {
    ServerFrame {
        body: Some(server_frame::Body::Error(pb::Error {
            code: code as i32,
            message: message.into(),
            retry_after_ms,
        })),
    }
}

/// The QUIC code for `code`.
pub fn varint(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code.as_u32())
}
