//! Stream framing (varint length prefix + protobuf) and datagram encoding.
//!
//! Decoding is incremental: callers append received bytes to a `BytesMut` and call
//! [`decode_frame`] until it returns `Ok(None)` (more bytes needed). The length prefix is checked
//! against the caller's cap as soon as enough of it has arrived to exceed the cap, so a peer
//! announcing a huge frame is refused before its body is buffered or allocated.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

use crate::ErrorCode;

/// Longest valid varint for a u64.
const MAX_VARINT_BYTES: usize = 10;

/// Why a frame or datagram could not be decoded.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces more than the receiver accepts.
    #[error("frame of at least {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: u64, max: usize },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    /// The length prefix is not a valid varint.
    #[error("invalid varint length prefix")]
    BadLengthPrefix,
    /// The frame body is not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

impl FrameError {
    /// The application error code a receiver closes with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::Truncated { .. } => ErrorCode::FrameTruncated,
            FrameError::BadLengthPrefix | FrameError::Malformed(_) => ErrorCode::ProtocolViolation,
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded message exceeds the cap the peer enforces.
    #[error("encoded frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
}

/// Appends `msg` to `dst` as one length-delimited frame.
pub fn encode_frame<M: Message>(
    msg: &M,
    max: usize,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(EncodeError::TooLarge { len, max });
    }
    dst.reserve(len + prost::length_delimiter_len(len));
    // Cannot fail: capacity was reserved above.
    prost::encoding::encode_varint(len as u64, dst);
    msg.encode_raw(dst);
    Ok(())
}

/// Appends the frame of `ServerFrame { entry: InboxEntry { inbox_seq, body } }` to `dst`,
/// byte for byte what [`encode_frame`] makes of it, but encoding `body` where it is. A pushed
/// message's body is shared by every recipient; copying it into an owned `InboxEntry` for each
/// push cost an allocation per field on the server's runtime thread.
pub fn encode_entry_frame(
    inbox_seq: u64,
    body: &crate::pb::inbox_entry::Body,
    max: usize,
    dst: &mut BytesMut,
) -> Result<(), EncodeError> {
    use prost::encoding::{WireType, encode_key, encoded_len_varint, key_len, uint64};
    /// `ServerFrame.entry` and `InboxEntry.inbox_seq` in tern.proto.
    const ENTRY_TAG: u32 = 5;
    const INBOX_SEQ_TAG: u32 = 1;
    // proto3 leaves a zero scalar out, as the generated code does.
    let seq_len = if inbox_seq == 0 {
        0
    } else {
        uint64::encoded_len(INBOX_SEQ_TAG, &inbox_seq)
    };
    let entry_len = seq_len + body.encoded_len();
    let len = key_len(ENTRY_TAG) + encoded_len_varint(entry_len as u64) + entry_len;
    if len > max {
        return Err(EncodeError::TooLarge { len, max });
    }
    dst.reserve(len + prost::length_delimiter_len(len));
    prost::encoding::encode_varint(len as u64, dst);
    encode_key(ENTRY_TAG, WireType::LengthDelimited, dst);
    prost::encoding::encode_varint(entry_len as u64, dst);
    if inbox_seq != 0 {
        uint64::encode(INBOX_SEQ_TAG, &inbox_seq, dst);
    }
    body.encode(dst);
    Ok(())
}

/// Convenience: one frame as a fresh buffer.
pub fn frame_bytes<M: Message>(msg: &M, max: usize) -> Result<bytes::Bytes, EncodeError> {
    let mut buf = BytesMut::new();
    encode_frame(msg, max, &mut buf)?;
    Ok(buf.freeze())
}

/// Reads the length prefix at the start of `buf`.
///
/// Returns `Ok(None)` if more bytes are needed, else `(prefix_len, body_len)`.
fn peek_length(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_VARINT_BYTES).enumerate() {
        let part = u64::from(byte & 0x7f);
        let shift = 7 * i as u32;
        if shift == 63 && part > 1 {
            return Err(FrameError::BadLengthPrefix);
        }
        value |= part << shift;
        // Refuse as early as possible: later bytes can only make the value larger.
        if value > max as u64 {
            return Err(FrameError::TooLarge { len: value, max });
        }
        if byte & 0x80 == 0 {
            // `value <= max`, so it fits in usize.
            return Ok(Some((i + 1, value as usize)));
        }
    }
    if buf.len() >= MAX_VARINT_BYTES {
        return Err(FrameError::BadLengthPrefix);
    }
    Ok(None)
}

/// Decodes one frame from the front of `buf`, consuming it.
///
/// `Ok(None)` means the frame is incomplete: append more bytes and call again. On error the
/// stream is unusable (framing is lost) and should be closed with [`FrameError::code`].
pub fn decode_frame<M: Message + Default>(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<M>, FrameError> {
    let Some((prefix, len)) = peek_length(buf, max)? else {
        return Ok(None);
    };
    if buf.len() < prefix + len {
        // Make room for the rest of this frame once, now that its size is known and allowed.
        buf.reserve(prefix + len - buf.len());
        return Ok(None);
    }
    buf.advance(prefix);
    let body = buf.split_to(len);
    Ok(Some(M::decode(body.freeze())?))
}

/// Checks what remains when the peer finished the stream: any bytes left are a cut frame.
pub fn finish(buf: &BytesMut) -> Result<(), FrameError> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(FrameError::Truncated {
            buffered: buf.len(),
        })
    }
}

/// Encodes one datagram: exactly one message, no length prefix.
pub fn encode_datagram(msg: &crate::pb::Datagram) -> Result<bytes::Bytes, EncodeError> {
    let len = msg.encoded_len();
    if len > crate::MAX_DATAGRAM_BYTES {
        return Err(EncodeError::TooLarge {
            len,
            max: crate::MAX_DATAGRAM_BYTES,
        });
    }
    let mut buf = BytesMut::with_capacity(len);
    msg.encode_raw(&mut buf);
    Ok(buf.freeze())
}

/// Decodes one datagram.
pub fn decode_datagram(bytes: &[u8]) -> Result<crate::pb::Datagram, FrameError> {
    if bytes.len() > crate::MAX_DATAGRAM_BYTES {
        return Err(FrameError::TooLarge {
            len: bytes.len() as u64,
            max: crate::MAX_DATAGRAM_BYTES,
        });
    }
    Ok(crate::pb::Datagram::decode(bytes)?)
}

/// Writes `value` as a varint; exposed for tests and tools that build raw frames.
pub fn put_varint(value: u64, dst: &mut impl BufMut) {
    prost::encoding::encode_varint(value, dst);
}

#[cfg(test)]
mod tests;
