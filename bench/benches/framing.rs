//! Framing: encoding and decoding the frames that carry every message.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tern_protocol::pb::{self, ServerFrame, server_frame};
use tern_protocol::{DEFAULT_MAX_FRAME_BYTES, frame};

/// A pushed inbox entry carrying a message of `size` payload bytes.
fn entry(size: usize) -> ServerFrame {
    ServerFrame {
        body: Some(server_frame::Body::Entry(pb::InboxEntry {
            inbox_seq: 123_456,
            body: Some(pb::inbox_entry::Body::Message(pb::Message {
                message_id: "d:alice:bob/4242".into(),
                conversation_id: "d:alice:bob".into(),
                seq: 4242,
                sender: "alice".into(),
                sender_device: "phone".into(),
                client_message_id: "0123456789abcdef01234567".into(),
                sent_at_ms: 1_795_398_000_000,
                text: String::new(),
                payload: vec![b'x'; size],
            })),
        })),
    }
}

fn framing(c: &mut Criterion) {
    for size in [100, 4096, 65_536] {
        let msg = entry(size);
        let mut group = c.benchmark_group(format!("frame_{size}B"));
        group.throughput(Throughput::Elements(1));
        group.bench_function("encode", |b| {
            let mut buf = BytesMut::with_capacity(size + 256);
            b.iter(|| {
                buf.clear();
                frame::encode_frame(&msg, DEFAULT_MAX_FRAME_BYTES, &mut buf).unwrap();
            });
        });
        let bytes = frame::frame_bytes(&msg, DEFAULT_MAX_FRAME_BYTES).unwrap();
        group.bench_function("decode", |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(&bytes[..]);
                let decoded: ServerFrame = frame::decode_frame(&mut buf, DEFAULT_MAX_FRAME_BYTES)
                    .unwrap()
                    .unwrap();
                decoded
            });
        });
        group.finish();
    }
}

criterion_group!(benches, framing);
criterion_main!(benches);
