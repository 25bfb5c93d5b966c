//! Connecting many tern clients: a few UDP sockets (quinn endpoints) carry many connections,
//! so thousands of sessions fit in one process.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tern_client::{Client, ClientConfig, Events, TransportSettings, Trust};
use tokio::sync::Semaphore;

use crate::server::Server;

/// Handshakes in flight at once while connecting a pool. The server's 4 MiB socket buffer
/// absorbs this many without drops (shared/BASELINES.md: drops start near 100 with 208 KiB).
pub const CONNECT_CONCURRENCY: usize = 128;

/// Socket buffers of the client endpoints, as on the server: many connections share them.
const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// The TLS name of the development certificates.
pub const SERVER_NAME: &str = "localhost";

/// A client endpoint (one UDP socket) with tern's client configuration.
pub fn endpoint(server: &Server, settings: &TransportSettings) -> anyhow::Result<quinn::Endpoint> {
    let local = match server.addr {
        SocketAddr::V4(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)),
    };
    let socket = tern_server::endpoint::bind_socket(local, UDP_BUFFER_BYTES)?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    let mut endpoint =
        quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)?;
    let trust = Trust::CaPem(server.ca_pem.clone());
    endpoint.set_default_client_config(tern_client::quinn_client_config(&trust, settings)?);
    Ok(endpoint)
}

/// The client configuration of `user` on `device`.
pub fn config(server: &Server, user: &str, device: &str) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::new(
        server.addr.to_string(),
        server.token(user, device)?,
        Trust::CaPem(server.ca_pem.clone()),
    );
    config.server_name = Some(SERVER_NAME.into());
    Ok(config)
}

/// How a pool connects.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    /// Clients per shared endpoint; 0 gives each client its own (needed to migrate one
    /// client alone: rebinding moves every connection of an endpoint).
    pub per_endpoint: usize,
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self { per_endpoint: 500 }
    }
}

/// Connects one client per `users[i]` (device "bench"), `tweak` adjusting each configuration.
/// Returns them in the order of `users`.
pub async fn connect_all(
    server: &Server,
    users: &[String],
    options: PoolOptions,
    tweak: impl Fn(&mut ClientConfig),
) -> anyhow::Result<Vec<(Arc<Client>, Events)>> {
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut endpoints = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, user) in users.iter().enumerate() {
        let mut config = config(server, user, "bench")?;
        tweak(&mut config);
        let shared = if options.per_endpoint == 0 {
            None
        } else {
            if i % options.per_endpoint == 0 {
                endpoints.push(endpoint(server, &config.transport)?);
            }
            endpoints.last().cloned()
        };
        let gate = gate.clone();
        let user = user.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let connected = match shared {
                Some(endpoint) => Client::connect_on(endpoint, config).await,
                None => Client::connect(config).await,
            };
            (i, connected.with_context(|| format!("connecting {user}")))
        });
    }
    let mut out: Vec<Option<(Arc<Client>, Events)>> = (0..users.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        let (i, connected) = joined?;
        let (client, events) = connected?;
        out[i] = Some((Arc::new(client), events));
    }
    out.into_iter()
        .map(|c| c.context("a client did not connect"))
        .collect()
}
