//! The tern server: authenticated QUIC sessions, conversations on their own streams, and a
//! durable inbox per user.
//!
//! [`run`] takes an already-bound endpoint and a shutdown future, so tests run the server
//! in-process on port 0 (see `tests/`), and the binary runs it on the configured address.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod config;
pub mod connection;
pub mod datagrams;
pub mod delivery;
pub mod endpoint;
pub mod framed;
pub mod registry;
pub mod store;
pub mod streams;

/// Hash maps on the per-message path, keyed by user and conversation ids: foldhash (randomly
/// seeded, the hasher `hashbrown` uses by default) instead of the standard SipHash, which was
/// a few percent of the storage writer's profile for its dozen lookups per message.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
pub(crate) type FastDashMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tern_protocol::ErrorCode;
use tracing::{info, warn};

pub use config::Config;

/// Largest sync page the server sends, in inbox entries.
pub const MAX_SYNC_PAGE: u32 = 500;

/// How long shutdown waits for connections to acknowledge the close.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

/// Everything sessions share.
#[derive(Debug)]
pub struct ServerState {
    pub config: Config,
    pub auth: auth::Authenticator,
    pub registry: Arc<registry::Registry>,
    pub store: Arc<store::Store>,
    pub presence: datagrams::PresenceBook,
    pub contacts: datagrams::ContactsCache,
    pub datagram_stats: datagrams::DatagramStats,
    pub(crate) next_session_id: AtomicU64,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("JWT secret: {0}")]
    Secret(#[from] auth::SecretError),
    #[error(transparent)]
    Endpoint(#[from] endpoint::EndpointError),
    #[error("store: {0}")]
    Store(#[from] store::StoreError),
}

impl ServerState {
    /// Validates `config` and loads (or creates) what the server keeps in its data directory.
    pub fn open(config: Config) -> Result<Arc<Self>, StartError> {
        config.validate()?;
        let secret = config
            .jwt_secret
            .clone()
            .or_else(|| std::env::var("TERN_JWT_SECRET").ok());
        let auth = auth::Authenticator::load_or_generate(secret.as_deref(), &config.data_dir)?;
        let registry = Arc::new(registry::Registry::default());
        let limits = store::StoreLimits::from_config(&config);
        let delivery = Arc::new(delivery::LocalDelivery::new(registry.clone()));
        let store = store::Store::open(&config.data_dir.join("store"), limits, delivery)?;
        Ok(Arc::new(Self {
            config,
            auth,
            registry,
            store,
            presence: datagrams::PresenceBook::default(),
            contacts: datagrams::ContactsCache::default(),
            datagram_stats: datagrams::DatagramStats::default(),
            next_session_id: AtomicU64::new(1),
        }))
    }
}

/// Opens the state and binds the endpoint for `config`. Must run inside a tokio runtime.
pub fn start(config: Config) -> Result<(quinn::Endpoint, Arc<ServerState>), StartError> {
    let state = ServerState::open(config)?;
    let endpoint = endpoint::bind(&state.config)?;
    Ok((endpoint, state))
}

/// Serves `endpoint` until `shutdown` completes, then closes every connection with
/// `SERVER_SHUTDOWN` and waits briefly for them to drain.
pub async fn run(
    endpoint: quinn::Endpoint,
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()>,
) {
    match endpoint.local_addr() {
        Ok(addr) => info!(%addr, "tern server listening"),
        Err(e) => warn!(error = %e, "endpoint has no local address"),
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(connection::serve(state.clone(), incoming));
                }
                None => break,
            },
        }
    }
    info!(sessions = state.registry.len(), "shutting down");
    endpoint.close(
        framed::varint(ErrorCode::ServerShutdown),
        b"server shutdown",
    );
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, endpoint.wait_idle()).await;
}
