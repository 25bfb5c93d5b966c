use bytes::BytesMut;
use proptest::prelude::*;

use super::*;
use crate::DEFAULT_MAX_FRAME_BYTES as MAX;
use crate::pb::{ClientFrame, Datagram, ServerFrame, client_frame, server_frame};

/// Encodes `frames` back to back, then decodes them from chunks of `chunk` bytes, the way a
/// stream reader sees them.
fn round_trip<M>(frames: &[M], chunk: usize) -> Vec<M>
where
    M: prost::Message + Default + PartialEq + std::fmt::Debug,
{
    let mut wire = BytesMut::new();
    for frame in frames {
        encode_frame(frame, usize::MAX, &mut wire).expect("encode");
    }
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in wire.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(frame) = decode_frame::<M>(&mut buf, usize::MAX).expect("decode") {
            out.push(frame);
        }
    }
    finish(&buf).expect("no trailing bytes");
    out
}

proptest! {
    #[test]
    fn client_frames_round_trip(frames in prop::collection::vec(any::<ClientFrame>(), 1..4), chunk in 1usize..64) {
        prop_assert_eq!(round_trip(&frames, chunk), frames);
    }

    #[test]
    fn server_frames_round_trip(frames in prop::collection::vec(any::<ServerFrame>(), 1..4), chunk in 1usize..64) {
        prop_assert_eq!(round_trip(&frames, chunk), frames);
    }

    #[test]
    fn entry_frames_encode_like_owned_ones(entry in any::<crate::pb::InboxEntry>()) {
        let owned = ServerFrame { body: Some(server_frame::Body::Entry(entry.clone())) };
        let mut expected = BytesMut::new();
        encode_frame(&owned, MAX, &mut expected).expect("encode");
        let mut got = BytesMut::new();
        // A push always has a body; an entry without one is not written this way.
        if let Some(body) = &entry.body {
            encode_entry_frame(entry.inbox_seq, body, MAX, &mut got).expect("encode");
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn datagrams_round_trip(datagram in any::<Datagram>()) {
        let mut wire = BytesMut::new();
        prost::Message::encode_raw(&datagram, &mut wire);
        prop_assert_eq!(Datagram::decode(&wire[..]).expect("decode"), datagram);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), max in 0usize..1024) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Any outcome is fine except a panic; an error or `None` must leave the loop.
        while let Ok(Some(_)) = decode_frame::<ClientFrame>(&mut buf, max) {}
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode_frame::<ServerFrame>(&mut buf, max) {}
        let _ = decode_datagram(&bytes);
    }
}

#[test]
fn every_frame_type_is_covered_by_the_generators() {
    // The round-trip properties above only prove something if the generators reach every
    // `oneof` arm; sample until each has been seen.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut client_seen = std::collections::HashSet::new();
    let mut server_seen = std::collections::HashSet::new();
    for _ in 0..5_000 {
        let c = any::<ClientFrame>()
            .new_tree(&mut runner)
            .expect("tree")
            .current();
        if let Some(body) = &c.body {
            client_seen.insert(std::mem::discriminant(body));
        }
        let s = any::<ServerFrame>()
            .new_tree(&mut runner)
            .expect("tree")
            .current();
        if let Some(body) = &s.body {
            server_seen.insert(std::mem::discriminant(body));
        }
    }
    assert_eq!(client_seen.len(), 7, "ClientFrame arms");
    assert_eq!(server_seen.len(), 8, "ServerFrame arms");
}

#[test]
fn oversized_length_is_refused_before_the_body_arrives() {
    let mut buf = BytesMut::new();
    put_varint(MAX as u64 + 1, &mut buf);
    // Only the prefix has arrived: the frame is already refused.
    let err = decode_frame::<ClientFrame>(&mut buf, MAX).expect_err("too large");
    assert!(matches!(err, FrameError::TooLarge { .. }));
    assert_eq!(err.code(), crate::ErrorCode::FrameTooLarge);
    // The decoder did not reserve room for the announced body.
    assert!(buf.capacity() < 64);
}

#[test]
fn huge_length_is_refused_from_a_partial_prefix() {
    // 0xff 0xff 0xff: the varint is incomplete but already above any sane maximum.
    let mut buf = BytesMut::from(&[0xff, 0xff, 0xff][..]);
    let err = decode_frame::<ClientFrame>(&mut buf, MAX).expect_err("too large");
    assert!(matches!(err, FrameError::TooLarge { .. }));
}

#[test]
fn overlong_varint_is_a_bad_prefix() {
    let mut buf = BytesMut::from(&[0x80u8; 11][..]);
    let err = decode_frame::<ClientFrame>(&mut buf, usize::MAX).expect_err("bad prefix");
    assert!(matches!(err, FrameError::BadLengthPrefix));
    assert_eq!(err.code(), crate::ErrorCode::ProtocolViolation);
}

#[test]
fn truncated_frame_is_reported_at_end_of_stream() {
    let frame = ClientFrame {
        body: Some(client_frame::Body::Hello(crate::pb::Hello {
            token: "t".repeat(50),
            ..Default::default()
        })),
    };
    let wire = frame_bytes(&frame, MAX).expect("encode");
    let mut buf = BytesMut::from(&wire[..wire.len() - 3]);
    assert!(
        decode_frame::<ClientFrame>(&mut buf, MAX)
            .expect("partial")
            .is_none()
    );
    let err = finish(&buf).expect_err("truncated");
    assert!(matches!(err, FrameError::Truncated { .. }));
    assert_eq!(err.code(), crate::ErrorCode::FrameTruncated);
}

#[test]
fn malformed_body_is_typed() {
    // Length 3, then field 1 (Hello) as a length-delimited field claiming 100 bytes.
    let mut buf = BytesMut::from(&[0x03, 0x0a, 0x64, 0x00][..]);
    let err = decode_frame::<ClientFrame>(&mut buf, MAX).expect_err("malformed");
    assert!(matches!(err, FrameError::Malformed(_)));
    assert_eq!(err.code(), crate::ErrorCode::ProtocolViolation);
}

#[test]
fn encode_refuses_frames_over_the_cap() {
    let frame = ServerFrame {
        body: Some(server_frame::Body::Error(crate::pb::Error {
            message: "x".repeat(100),
            ..Default::default()
        })),
    };
    assert!(matches!(
        frame_bytes(&frame, 10),
        Err(EncodeError::TooLarge { .. })
    ));
}

#[test]
fn entry_frames_are_capped() {
    let body = crate::pb::inbox_entry::Body::Message(crate::pb::Message {
        text: "x".repeat(100),
        ..Default::default()
    });
    let mut buf = BytesMut::new();
    assert!(matches!(
        encode_entry_frame(7, &body, 10, &mut buf),
        Err(EncodeError::TooLarge { .. })
    ));
    assert!(buf.is_empty());
}

#[test]
fn datagrams_are_capped() {
    let big = vec![0u8; crate::MAX_DATAGRAM_BYTES + 1];
    assert!(matches!(
        decode_datagram(&big),
        Err(FrameError::TooLarge { .. })
    ));
    let typing = Datagram {
        body: Some(crate::pb::datagram::Body::Typing(crate::pb::Typing {
            conversation_id: "x".repeat(2000),
            ..Default::default()
        })),
    };
    assert!(encode_datagram(&typing).is_err());
}
