//! In-process test server on 127.0.0.1:0 with its own data directory and certificates.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tern_client::{Client, ClientConfig, Event, Trust};
use tern_server::{Config, ServerState};
use tokio::sync::oneshot;

pub struct TestServer {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub state: Arc<ServerState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        // Logs only with RUST_LOG set, e.g. RUST_LOG=tern_server=debug.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            certs_dir: dir.path().join("certs"),
            ..Config::default()
        };
        tweak(&mut config);
        let (endpoint, state) = tern_server::start(config).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let ca_pem = std::fs::read_to_string(dir.path().join("certs/ca.pem")).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tern_server::run(endpoint, state.clone(), async {
            let _ = rx.await;
        }));
        Self {
            addr,
            ca_pem,
            state,
            shutdown: Some(tx),
            task: Some(task),
            dir,
        }
    }

    pub fn token(&self, user: &str, device: &str) -> String {
        self.state
            .auth
            .mint(user, device, Duration::from_secs(3600))
            .unwrap()
    }

    pub fn config(&self, token: &str) -> ClientConfig {
        let mut config = ClientConfig::new(
            format!("127.0.0.1:{}", self.addr.port()),
            token,
            Trust::CaPem(self.ca_pem.clone()),
        );
        config.server_name = Some("localhost".into());
        config
    }

    pub async fn connect(&self, user: &str, device: &str) -> (Client, tern_client::Events) {
        Client::connect(self.config(&self.token(user, device)))
            .await
            .unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// Waits for the next event, failing the test after `secs`.
pub async fn next_event(events: &mut tern_client::Events, secs: u64) -> Event {
    tokio::time::timeout(Duration::from_secs(secs), events.recv())
        .await
        .expect("timed out waiting for an event")
        .expect("event channel closed")
}

/// The next "reconnecting" or "disconnected" state, skipping other events.
pub async fn next_loss(
    events: &mut tern_client::Events,
    secs: u64,
) -> tern_client::ConnectionState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("timed out waiting for a connection state")
            .expect("event channel closed");
        if let Event::Connection(
            state @ (tern_client::ConnectionState::Reconnecting { .. }
            | tern_client::ConnectionState::Disconnected { .. }),
        ) = event
        {
            return state;
        }
    }
}

/// Waits for the next event `pick` accepts, skipping others, failing after `secs`.
/// `n` sends to `peer` with texts "0", "1", ..., each its own task, all in flight at once and
/// made in order (a test runtime has one thread, so tasks first run in spawn order).
pub fn spawn_sends(
    client: &Arc<Client>,
    peer: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<tern_client::SentMessage, tern_client::ClientError>>> {
    (0..n)
        .map(|i| {
            let client = client.clone();
            let peer = peer.to_owned();
            tokio::spawn(async move {
                client
                    .send(tern_client::SendTarget::User(peer), &i.to_string(), None)
                    .await
            })
        })
        .collect()
}

pub async fn wait_for<T>(
    events: &mut tern_client::Events,
    secs: u64,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("timed out waiting for an event")
            .expect("event channel closed");
        if let Some(value) = pick(event) {
            return value;
        }
    }
}
