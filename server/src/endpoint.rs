//! TLS, QUIC transport settings and the UDP socket.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::config::Config;

/// File, inside the data directory, holding the stateless-reset key.
pub const RESET_KEY_FILE: &str = "reset.key";

/// Why the endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    #[error("{path}: {source}")]
    ReadPem {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no private key found")]
    NoKey { path: std::path::PathBuf },
    #[error("{path}: no certificate found")]
    NoCert { path: std::path::PathBuf },
    #[error("development certificates: {0}")]
    DevCerts(#[from] tern_certs::CertError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Loads the configured certificate, or generates development certificates on first start.
pub fn load_certificates(
    config: &Config,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), EndpointError> {
    let (cert, key) = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => {
            let (paths, generated) = tern_certs::load_or_generate(&config.certs_dir)?;
            if generated {
                info!(ca = %paths.ca.display(), "generated development certificates");
            }
            (paths.cert, paths.key)
        }
    };
    let certs = read_pem(&cert, |r| {
        rustls_pemfile::certs(r).collect::<Result<Vec<_>, _>>()
    })?;
    if certs.is_empty() {
        return Err(EndpointError::NoCert { path: cert });
    }
    let key =
        read_pem(&key, rustls_pemfile::private_key)?.ok_or(EndpointError::NoKey { path: key })?;
    Ok((certs, key))
}

fn read_pem<T>(
    path: &Path,
    parse: impl FnOnce(&mut dyn std::io::BufRead) -> std::io::Result<T>,
) -> Result<T, EndpointError> {
    let err = |source| EndpointError::ReadPem {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(err)?;
    parse(&mut std::io::BufReader::new(file)).map_err(err)
}

/// The QUIC server configuration: TLS 1.3 only, ALPN `tern/1` only.
pub fn server_config(
    config: &Config,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, EndpointError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // A client offering any other protocol (or none) fails the handshake with
    // no_application_protocol, before any tern code runs.
    tls.alpn_protocols = vec![tern_protocol::ALPN.to_vec()];
    // Session tickets let a reconnecting phone resume without a full handshake, and send its
    // (idempotent) Hello and sync request as 0-RTT data. QUIC requires exactly u32::MAX here.
    // rustls allows early data only with stateful resumption, so the server keeps sessions in
    // memory: per process (a restarted server, or another node, makes clients do a full
    // handshake). 20,000 entries of a few hundred bytes each cover this node's connections.
    tls.send_tls13_tickets = config.session_tickets;
    tls.session_storage = rustls::server::ServerSessionMemoryCache::new(20_000);
    tls.max_early_data_size = u32::MAX;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(config)?));
    // Migration stays on: a phone moving from Wi-Fi to cellular keeps its connection.
    server.migration(true);
    Ok(server)
}

/// Transport settings for many mostly idle mobile connections.
fn transport_config(config: &Config) -> Result<TransportConfig, EndpointError> {
    let mut transport = TransportConfig::default();
    let idle = IdleTimeout::try_from(config.idle_timeout())
        .map_err(|e| EndpointError::Quic(e.to_string()))?;
    transport.max_idle_timeout(Some(idle));
    // Clients open the control stream, conversation streams and short request streams. A
    // connection starts with a few and is granted more as it opens them (`StreamCredit`).
    transport.max_concurrent_bidi_streams(VarInt::from_u32(
        crate::streams::INITIAL_BIDI_STREAMS.min(config.max_client_bidi_streams),
    ));
    // Clients never open unidirectional streams; the server opens push streams.
    transport.max_concurrent_uni_streams(VarInt::from_u32(0));
    // The server does not keep connections alive: the phone decides when its radio wakes.
    transport.keep_alive_interval(None);
    // See `Config::segmentation_offload`: memory per idle connection over batching.
    transport.enable_segmentation_offload(config.segmentation_offload);
    // See `Config::mtu_discovery`: memory per idle connection over fewer packets for bulk.
    if !config.mtu_discovery {
        transport.mtu_discovery_config(None);
    }
    Ok(transport)
}

/// Binds the UDP socket with raised buffers; dual-stack when the address is `[::]`.
pub fn bind_socket(addr: SocketAddr, buffer_bytes: usize) -> Result<UdpSocket, EndpointError> {
    let err = |source| EndpointError::Socket { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped peers too; some systems default to v6-only.
        socket.set_only_v6(false).map_err(err)?;
    }
    if let Err(e) = socket.set_recv_buffer_size(buffer_bytes) {
        warn!(error = %e, "could not raise the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer_bytes) {
        warn!(error = %e, "could not raise the UDP send buffer");
    }
    socket.bind(&addr.into()).map_err(err)?;
    let recv = socket.recv_buffer_size().unwrap_or(0);
    let send = socket.send_buffer_size().unwrap_or(0);
    // Linux reports twice the requested size (bookkeeping overhead) up to net.core.rmem_max.
    if recv < buffer_bytes {
        warn!(
            requested = buffer_bytes,
            granted = recv,
            "UDP receive buffer capped by the kernel (net.core.rmem_max)"
        );
    }
    info!(recv_buffer = recv, send_buffer = send, "UDP socket buffers");
    Ok(socket.into())
}

/// Binds a quinn server endpoint for `config`. Must run inside a tokio runtime.
pub fn bind(config: &Config) -> Result<quinn::Endpoint, EndpointError> {
    let (certs, key) = load_certificates(config)?;
    let server = server_config(config, certs, key)?;
    let socket = bind_socket(config.listen, config.udp_buffer_bytes)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| EndpointError::Quic("no async runtime found".into()))?;
    // The stateless-reset key persists across restarts (RFC 9000, 10.3): a restarted server
    // can then reset the connections of the process before it, and phones reconnect at once
    // instead of waiting out their idle timeout.
    let reset_key =
        crate::auth::load_or_create_secret(&config.data_dir, RESET_KEY_FILE).map_err(|source| {
            EndpointError::ReadPem {
                path: config.data_dir.join(RESET_KEY_FILE),
                source,
            }
        })?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key.as_bytes());
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    // Connection IDs carry a check derived from a key; with quinn's per-process random key a
    // restarted server drops the old connections' packets as invalid instead of resetting
    // them. Derive it from the persistent reset key.
    let cid_key = u64::from_str_radix(reset_key.get(..16).unwrap_or("0"), 16).unwrap_or(0);
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime).map_err(|source| {
        EndpointError::Socket {
            addr: config.listen,
            source,
        }
    })
}
