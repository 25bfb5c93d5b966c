//! TLS trust, QUIC endpoint and framed streams.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use tern_protocol::frame;

use crate::ClientError;

/// Bytes requested from quinn per read.
const READ_CHUNK: usize = 16 * 1024;

/// Which certificate authorities the client trusts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Trust {
    /// A PEM file of CA certificates (for example the server's generated `certs/ca.pem`).
    CaFile(PathBuf),
    /// PEM text of CA certificates.
    CaPem(String),
    /// The operating system's roots, for servers with public certificates.
    SystemRoots,
}

/// QUIC settings of the client side of a mobile connection.
#[derive(Debug, Clone)]
pub struct TransportSettings {
    /// Keep-alive interval. 25 s stays under the shortest common UDP NAT binding lifetime
    /// (30 s on many carrier NATs), so an idle phone stays reachable.
    pub keep_alive: Duration,
    /// Idle timeout the client proposes; the smaller of the two sides' values applies.
    pub idle_timeout: Duration,
    /// How long to wait for the handshake and Welcome.
    pub connect_timeout: Duration,
    /// How long a call made while reconnecting waits for the connection to come back.
    pub reconnect_wait: Duration,
    /// First reconnect delay; each failed attempt doubles it up to `backoff_max`, and the
    /// actual delay is uniform in [0, that] ("full jitter"), so that a server restart does not
    /// bring every phone back in the same instant.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Heartbeat datagram interval in the foreground (none in the background). It carries the
    /// RTT and, at 25 s, also serves as the keep-alive: QUIC's own keep-alive then never fires
    /// in the foreground, so the radio wakes once per 25 s, not twice.
    pub heartbeat_interval: Duration,
    /// A conversation stream unused for this long is finished (the next send opens a new
    /// one). 30 s keeps a chat's stream open across a conversation's pauses while freeing
    /// the server's per-connection stream budget (64 by default) for other conversations.
    pub conversation_idle: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            reconnect_wait: Duration::from_secs(30),
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(25),
            conversation_idle: Duration::from_secs(30),
        }
    }
}

pub(crate) fn root_store(trust: &Trust) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = match trust {
        Trust::CaFile(path) => std::fs::read(path)
            .map_err(|e| ClientError::Config(format!("CA file {}: {e}", path.display())))?,
        Trust::CaPem(pem) => pem.as_bytes().to_vec(),
        Trust::SystemRoots => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            return Ok(roots);
        }
    };
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Config(format!("CA certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Config(
            "no CA certificate found in the given PEM".into(),
        ));
    }
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
    }
    Ok(roots)
}

pub(crate) fn client_config(
    trust: &Trust,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Config(e.to_string()))?
        .with_root_certificates(root_store(trust)?)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tern_protocol::ALPN.to_vec()];
    // Resumption tickets (kept in memory by rustls) allow 0-RTT on reconnect; the client only
    // sends its Hello and sync request early, both safe to replay.
    tls.enable_early_data = true;
    let quic = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = TransportConfig::default();
    transport.keep_alive_interval(Some(settings.keep_alive));
    transport.max_idle_timeout(Some(
        IdleTimeout::try_from(settings.idle_timeout)
            .map_err(|e| ClientError::Config(e.to_string()))?,
    ));
    // The server opens one push stream per active conversation.
    transport.max_concurrent_uni_streams(VarInt::from_u32(256));
    // The server never opens bidirectional streams.
    transport.max_concurrent_bidi_streams(VarInt::from_u32(0));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Resolves `host:port` and the TLS server name to verify.
pub(crate) async fn resolve(
    server: &str,
    server_name: Option<&str>,
) -> Result<(SocketAddr, String), ClientError> {
    let addr = tokio::net::lookup_host(server)
        .await
        .map_err(|e| ClientError::Config(format!("resolve {server}: {e}")))?
        .next()
        .ok_or_else(|| ClientError::Config(format!("{server}: no address")))?;
    let name = match server_name {
        Some(name) => name.to_owned(),
        None => {
            let host = server.rsplit_once(':').map_or(server, |(host, _)| host);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        }
    };
    Ok((addr, name))
}

/// A client endpoint for `remote`'s address family, with tern's client configuration.
pub(crate) fn endpoint(
    remote: SocketAddr,
    trust: &Trust,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, ClientError> {
    let mut endpoint = quinn::Endpoint::client(local_bind_addr(remote))
        .map_err(|e| ClientError::Config(format!("bind UDP socket: {e}")))?;
    endpoint.set_default_client_config(client_config(trust, settings)?);
    Ok(endpoint)
}

/// The unspecified local address of the remote's family.
pub(crate) fn local_bind_addr(remote: SocketAddr) -> SocketAddr {
    if remote.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    }
}

/// The receiving half of a stream, with its frame buffer.
#[derive(Debug)]
pub(crate) struct FrameReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max: usize,
}

impl FrameReader {
    /// The frame cap agreed in `Welcome` replaces the default one the reader started with.
    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub(crate) fn new(recv: quinn::RecvStream, max: usize) -> Self {
        Self {
            recv,
            buf: BytesMut::new(),
            max,
        }
    }

    /// The next frame, or `None` when the server finished the stream.
    pub(crate) async fn next<M: prost::Message + Default>(
        &mut self,
    ) -> Result<Option<M>, ClientError> {
        loop {
            if let Some(msg) = frame::decode_frame(&mut self.buf, self.max)? {
                return Ok(Some(msg));
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
}
