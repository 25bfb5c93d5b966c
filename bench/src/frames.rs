//! Raw tern/1 frames over quinn streams, for the forwarder and the lean idle clients.

use bytes::{Bytes, BytesMut};
use tern_protocol::pb::{ClientFrame, ServerFrame, client_frame, server_frame};

/// The frame cap both sides use by default.
pub const MAX_FRAME: usize = tern_protocol::DEFAULT_MAX_FRAME_BYTES;

/// Reads frames from a stream.
#[derive(Debug)]
pub struct Reader {
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl Reader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
        }
    }

    /// The next frame; `None` at the end of the stream or on any error.
    pub async fn next<M: prost::Message + Default>(&mut self) -> Option<M> {
        loop {
            match tern_protocol::frame::decode_frame::<M>(&mut self.buf, MAX_FRAME) {
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => {}
                Err(_) => return None,
            }
            let chunk = self.recv.read_chunk(16 * 1024, true).await.ok()??;
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }

    /// The next client frame's body.
    pub async fn client(&mut self) -> Option<client_frame::Body> {
        self.next::<ClientFrame>().await?.body
    }

    /// The next server frame's body.
    pub async fn server(&mut self) -> Option<server_frame::Body> {
        self.next::<ServerFrame>().await?.body
    }
}

/// A server frame's bytes.
pub fn server_bytes(body: server_frame::Body) -> anyhow::Result<Bytes> {
    let frame = ServerFrame { body: Some(body) };
    Ok(tern_protocol::frame::frame_bytes(&frame, MAX_FRAME)?)
}

/// A client frame's bytes.
pub fn client_bytes(body: client_frame::Body) -> anyhow::Result<Bytes> {
    let frame = ClientFrame { body: Some(body) };
    Ok(tern_protocol::frame::frame_bytes(&frame, MAX_FRAME)?)
}
