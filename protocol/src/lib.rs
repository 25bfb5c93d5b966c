//! The tern wire protocol: protobuf messages, stream framing, datagrams, error codes and ALPN.
//!
//! This crate does no I/O. The server and client read bytes from QUIC streams into a buffer and
//! hand the buffer to [`frame::decode_frame`], which checks the length prefix against a hard cap
//! before anything is allocated for the frame body.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod codes;
pub mod frame;
pub mod ids;

/// Generated protobuf types (package `tern.v1`).
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));
}

pub use codes::ErrorCode;
pub use frame::{FrameError, decode_datagram, decode_frame, encode_datagram, encode_frame};

/// The only ALPN protocol identifier a tern server accepts.
pub const ALPN: &[u8] = b"tern/1";

/// The protocol version sent in `Hello.protocol_version`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default hard cap on one stream frame, in bytes (length prefix excluded).
///
/// The default maximum message is 64 KiB of text and payload; 128 KiB leaves room for the
/// envelope and for a server configured with larger messages, while bounding what one frame
/// can make a peer buffer.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 128 * 1024;

/// Hard cap on one datagram. QUIC datagrams never exceed the path MTU (at most ~1,452 bytes on
/// Ethernet), so anything larger was not produced by a tern peer.
pub const MAX_DATAGRAM_BYTES: usize = 1200;
