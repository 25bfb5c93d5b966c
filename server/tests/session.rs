//! Authentication, session lifecycle and hostile input on the control stream, over real QUIC.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{TestServer, next_loss};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tern_client::{Client, ClientError, ConnectionState};
use tern_protocol::ErrorCode;
use tern_protocol::pb::{self, ClientFrame, client_frame};

fn server_code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// The close code of a connection the server closed.
async fn close_code(conn: &quinn::Connection) -> ErrorCode {
    let reason = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("server did not close");
    match reason {
        quinn::ConnectionError::ApplicationClosed(close) => {
            ErrorCode::from_u32(close.error_code.into_inner() as u32).expect("known code")
        }
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test]
async fn valid_token_authenticates() {
    let server = TestServer::start().await;
    let (client, _events) = server.connect("alice", "phone").await;
    assert_eq!(client.session().user, "alice");
    assert_eq!(client.session().device, "phone");
    assert!(client.session().server_time_ms > 1_700_000_000_000);
    assert!(client.ping().await.is_ok());
    assert_eq!(server.state.registry.sessions_of("alice").len(), 1);
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn expired_token_is_refused_with_its_code() {
    let server = TestServer::start().await;
    let secret = std::fs::read_to_string(server.dir.path().join("data/jwt.secret")).unwrap();
    let claims = tern_server::auth::Claims {
        sub: "alice".into(),
        device: Some("phone".into()),
        exp: tern_server::auth::unix_now() - 3600,
        iat: None,
    };
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap();
    assert_eq!(
        server_code(Client::connect(server.config(&token)).await),
        ErrorCode::TokenExpired
    );
    server.stop().await;
}

#[tokio::test]
async fn token_from_another_secret_is_refused() {
    let server = TestServer::start().await;
    let other = tern_server::auth::Authenticator::new(&[42u8; 32]);
    let token = other
        .mint("alice", "phone", Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        server_code(Client::connect(server.config(&token)).await),
        ErrorCode::TokenInvalid
    );
    server.stop().await;
}

#[tokio::test]
async fn missing_token_is_refused() {
    let server = TestServer::start().await;
    assert_eq!(
        server_code(Client::connect(server.config("")).await),
        ErrorCode::Unauthenticated
    );
    server.stop().await;
}

#[tokio::test]
async fn refusal_also_arrives_as_an_error_frame_and_close_code() {
    let server = TestServer::start().await;
    let (_endpoint, conn) = Client::connect_raw(&server.config("")).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = ClientFrame {
        body: Some(client_frame::Body::Hello(pb::Hello {
            protocol_version: 1,
            token: "garbage".into(),
            ..Default::default()
        })),
    };
    send.write_all(&tern_protocol::frame::frame_bytes(&hello, 1 << 16).unwrap())
        .await
        .unwrap();
    let bytes = recv.read_to_end(1 << 16).await.unwrap();
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let frame: pb::ServerFrame = tern_protocol::decode_frame(&mut buf, 1 << 16)
        .unwrap()
        .unwrap();
    match frame.body {
        Some(pb::server_frame::Body::Error(e)) => {
            assert_eq!(e.code, ErrorCode::TokenInvalid as i32)
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert_eq!(close_code(&conn).await, ErrorCode::TokenInvalid);
    server.stop().await;
}

#[tokio::test]
async fn silent_connection_is_closed_after_the_auth_timeout() {
    let server = TestServer::start_with(|c| c.auth_timeout_secs = 1).await;
    let (_endpoint, conn) = Client::connect_raw(&server.config("")).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(close_code(&conn).await, ErrorCode::AuthTimeout);
    assert!(started.elapsed() < Duration::from_secs(5));
    server.stop().await;
}

#[tokio::test]
async fn first_frame_other_than_hello_is_unauthenticated() {
    let server = TestServer::start().await;
    let (_endpoint, conn) = Client::connect_raw(&server.config("")).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let ping = ClientFrame {
        body: Some(client_frame::Body::Ping(pb::Ping::default())),
    };
    send.write_all(&tern_protocol::frame::frame_bytes(&ping, 1 << 16).unwrap())
        .await
        .unwrap();
    assert_eq!(close_code(&conn).await, ErrorCode::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let server = TestServer::start().await;
    let (_endpoint, conn) = Client::connect_raw(&server.config("")).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let hello = ClientFrame {
        body: Some(client_frame::Body::Hello(pb::Hello {
            protocol_version: 99,
            token: server.token("alice", "phone"),
            ..Default::default()
        })),
    };
    send.write_all(&tern_protocol::frame::frame_bytes(&hello, 1 << 16).unwrap())
        .await
        .unwrap();
    assert_eq!(close_code(&conn).await, ErrorCode::UnsupportedVersion);
    server.stop().await;
}

/// Sends `bytes` as the first thing on a fresh connection's control stream and returns the
/// close code, checking that a bystander session keeps working throughout.
async fn hostile_bytes_before_auth(bytes: &[u8]) -> ErrorCode {
    let server = TestServer::start().await;
    let (bystander, _events) = server.connect("bob", "laptop").await;
    let (_endpoint, conn) = Client::connect_raw(&server.config("")).await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    let code = close_code(&conn).await;
    bystander
        .ping()
        .await
        .expect("other clients are unaffected");
    bystander.close().await;
    server.stop().await;
    code
}

#[tokio::test]
async fn malformed_frame_closes_with_protocol_violation() {
    // Length 3, then a length-delimited field claiming 100 bytes.
    assert_eq!(
        hostile_bytes_before_auth(&[0x03, 0x0a, 0x64, 0x00]).await,
        ErrorCode::ProtocolViolation
    );
}

#[tokio::test]
async fn oversized_length_prefix_closes_with_frame_too_large() {
    let mut prefix = Vec::new();
    tern_protocol::frame::put_varint(u64::from(u32::MAX), &mut prefix);
    assert_eq!(
        hostile_bytes_before_auth(&prefix).await,
        ErrorCode::FrameTooLarge
    );
}

#[tokio::test]
async fn truncated_frame_closes_with_frame_truncated() {
    assert_eq!(
        hostile_bytes_before_auth(&[0x10, 0x0a, 0x02]).await,
        ErrorCode::FrameTruncated
    );
}

#[tokio::test]
async fn random_bytes_close_only_that_connection() {
    // Deterministic "random" bytes: a xorshift stream, so a failure reproduces.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..8 {
        let bytes: Vec<u8> = (0..256)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let code = hostile_bytes_before_auth(&bytes).await;
        assert!(
            matches!(
                code,
                ErrorCode::ProtocolViolation
                    | ErrorCode::FrameTooLarge
                    | ErrorCode::FrameTruncated
                    | ErrorCode::Unauthenticated
            ),
            "unexpected close code {code}"
        );
    }
}

#[tokio::test]
async fn garbage_after_auth_closes_that_session_only() {
    let server = TestServer::start().await;
    let (bystander, _b) = server.connect("bob", "laptop").await;
    let (client, mut events) = server.connect("alice", "phone").await;
    let mut prefix = Vec::new();
    tern_protocol::frame::put_varint(10 << 20, &mut prefix);
    client.write_control_raw(&prefix).await.unwrap();
    match next_loss(&mut events, 10).await {
        ConnectionState::Disconnected { code, .. } => {
            assert_eq!(code, Some(ErrorCode::FrameTooLarge))
        }
        other => panic!("unexpected state {other:?}"),
    }
    bystander.ping().await.expect("bystander still served");
    // The broken session is gone from the registry.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.state.registry.sessions_of("alice").is_empty());
    server.stop().await;
}

#[tokio::test]
async fn second_connection_of_a_device_replaces_the_first() {
    let server = TestServer::start().await;
    let (first, mut first_events) = server.connect("alice", "phone").await;
    let (second, _events) = server.connect("alice", "phone").await;
    // Final: the replaced device does not fight back by reconnecting.
    match next_loss(&mut first_events, 10).await {
        ConnectionState::Disconnected { code, .. } => {
            assert_eq!(code, Some(ErrorCode::SessionReplaced))
        }
        other => panic!("unexpected state {other:?}"),
    }
    assert!(first.ping().await.is_err());
    second.ping().await.unwrap();
    let sessions = server.state.registry.sessions_of("alice");
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].id.to_string(), second.session().session_id);
    // Another device of the same user coexists.
    let (_tablet, _t) = server.connect("alice", "tablet").await;
    assert_eq!(server.state.registry.sessions_of("alice").len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn other_alpn_is_refused() {
    let server = TestServer::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut server.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    for alpn in [Some(b"h3".to_vec()), None] {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        tls.alpn_protocols = alpn.into_iter().collect();
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let result = endpoint.connect(server.addr, "localhost").unwrap().await;
        assert!(result.is_err(), "handshake without ALPN tern/1 must fail");
    }
    server.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_server_shutdown() {
    let server = TestServer::start().await;
    let (_client, mut events) = server.connect("alice", "phone").await;
    server.stop().await;
    // Not final: a server that shuts down comes back, so the client reconnects.
    match next_loss(&mut events, 10).await {
        ConnectionState::Reconnecting { code, .. } => {
            assert_eq!(code, Some(ErrorCode::ServerShutdown))
        }
        other => panic!("unexpected state {other:?}"),
    }
}
