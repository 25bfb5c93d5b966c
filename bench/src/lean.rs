//! Lean idle clients for `connections`: raw quinn and tern/1 frames, no client library tasks,
//! so ten thousand sessions cost the bench little and the server sees what a real idle phone
//! does (handshake, Hello, one sync, then silence and keep-alives).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use quinn::crypto::rustls::QuicClientConfig;
use tern_client::TransportSettings;
use tern_protocol::pb::{self, client_frame, request, response, server_frame};

use crate::frames::{Reader, client_bytes};

/// A client configuration like tern-client's (TLS 1.3, ALPN tern/1, the same transport
/// settings) but with a session cache large enough for `sessions` connections, so that every
/// reconnecting client can resume TLS as a phone with its own ticket would.
pub fn client_config(ca_pem: &str, sessions: usize) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tern_protocol::ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::in_memory_sessions(sessions.max(256));
    let quic = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    // The settings tern-client uses (client/src/transport.rs), with its defaults.
    let settings = TransportSettings::default();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(settings.keep_alive));
    transport.max_idle_timeout(Some(settings.idle_timeout.try_into()?));
    transport.max_concurrent_uni_streams(256u32.into());
    transport.max_concurrent_bidi_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// An authenticated, synced, idle session.
#[derive(Debug)]
pub struct Session {
    pub conn: quinn::Connection,
    /// Kept open: dropping either half would tell the server to stop using the stream.
    _control: (quinn::SendStream, Reader),
    /// The messages the first sync returned.
    pub synced: Vec<pb::Message>,
}

/// Connects, authenticates and syncs from `since`, within `timeout`.
pub async fn open(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
    since: u64,
    timeout: Duration,
) -> anyhow::Result<Session> {
    tokio::time::timeout(timeout, open_inner(endpoint, addr, token, since))
        .await
        .context("timed out")?
}

async fn open_inner(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &str,
    since: u64,
) -> anyhow::Result<Session> {
    let conn = endpoint.connect(addr, crate::clients::SERVER_NAME)?.await?;
    let (mut send, recv) = conn.open_bi().await?;
    let hello = client_frame::Body::Hello(pb::Hello {
        protocol_version: tern_protocol::PROTOCOL_VERSION,
        token: token.to_owned(),
        client_agent: "tern-bench/lean".into(),
        last_inbox_seq: since,
        background: true,
    });
    send.write_chunk(client_bytes(hello)?).await?;
    let mut control = Reader::new(recv);
    match control.server().await {
        Some(server_frame::Body::Welcome(_)) => {}
        other => bail!(
            "expected Welcome, got {other:?} (connection: {:?})",
            conn.close_reason()
        ),
    }
    let (mut req_send, req_recv) = conn.open_bi().await?;
    let sync = client_frame::Body::Request(pb::Request {
        body: Some(request::Body::Sync(pb::SyncRequest {
            since_inbox_seq: since,
            page_size: 0,
        })),
    });
    req_send.write_chunk(client_bytes(sync)?).await?;
    let _ = req_send.finish();
    let mut pages = Reader::new(req_recv);
    let mut synced = Vec::new();
    loop {
        match pages.server().await {
            Some(server_frame::Body::Response(pb::Response {
                body: Some(response::Body::SyncPage(page)),
            })) => {
                synced.extend(page.entries.into_iter().filter_map(|e| match e.body {
                    Some(pb::inbox_entry::Body::Message(m)) => Some(m),
                    _ => None,
                }));
                if page.complete {
                    break;
                }
            }
            other => bail!("expected a sync page, got {other:?}"),
        }
    }
    Ok(Session {
        conn,
        _control: (send, control),
        synced,
    })
}
