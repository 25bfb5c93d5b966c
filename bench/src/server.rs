//! The server a scenario drives: tern or the baseline forwarder, in this process (on its own
//! thread and current-thread runtime, like the binary), as a child process, or external.

use std::io::BufRead as _;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tern_server::auth::Authenticator;
use tokio::sync::oneshot;

/// Where the server runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// A child process if its binary is found next to tern-bench, else in-process.
    #[default]
    Auto,
    /// In this process, on its own thread (no RSS figures: they would include the clients).
    InProcess,
    /// A child process: the real binary, measured alone.
    Child,
}

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tern,
    /// The `relay-baseline` forwarder (run as `tern-bench forwarder` when a child).
    Forwarder,
}

/// How to find or start servers; from the command line.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub placement: Placement,
    /// The tern-server binary; by default next to this executable.
    pub server_bin: Option<PathBuf>,
    /// Drive this server instead of starting one.
    pub target: Option<String>,
    pub ca: Option<PathBuf>,
    pub jwt_secret: Option<String>,
}

/// A running (or external) server.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub placement: &'static str,
    pub kind: Kind,
    auth: Authenticator,
    running: Running,
    _dir: Option<tempfile::TempDir>,
}

enum Running {
    Thread {
        stop: Option<oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    },
    Child(Child),
    External,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Running::Thread { .. } => "Thread",
            Running::Child(_) => "Child",
            Running::External => "External",
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.running {
            Running::Thread { stop, thread } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
            Running::Child(child) => stop_child(child),
            Running::External => {}
        }
    }
}

impl Server {
    /// Starts `kind` as `options` say (or connects to the external target, for tern).
    pub fn start(kind: Kind, options: &ServerOptions) -> anyhow::Result<Self> {
        if kind == Kind::Tern
            && let Some(target) = &options.target
        {
            return external(target, options);
        }
        let dir = tempfile::tempdir()?;
        let secret = random_secret();
        let bin = match kind {
            Kind::Tern => options
                .server_bin
                .clone()
                .unwrap_or(sibling("tern-server")?),
            Kind::Forwarder => std::env::current_exe()?,
        };
        let child = match options.placement {
            Placement::InProcess => false,
            Placement::Child => true,
            Placement::Auto => bin.exists() && !running_as_test(),
        };
        let certs = dir.path().join("certs");
        if kind == Kind::Forwarder {
            tern_certs::load_or_generate(&certs)?;
        }
        let (addr, running) = if child {
            let addr = free_udp_addr()?;
            let child = spawn_child(kind, &bin, addr, dir.path(), &secret)?;
            (addr, Running::Child(child))
        } else {
            spawn_thread(kind, dir.path(), &secret)?
        };
        let ca_pem = std::fs::read_to_string(certs.join("ca.pem")).context("reading ca.pem")?;
        Ok(Self {
            addr,
            ca_pem,
            placement: if child { "child" } else { "in-process" },
            kind,
            auth: Authenticator::new(secret.as_bytes()),
            running,
            _dir: Some(dir),
        })
    }

    /// A token for `user` on `device`. The forwarder takes the token as the user id.
    pub fn token(&self, user: &str, device: &str) -> anyhow::Result<String> {
        if self.kind == Kind::Forwarder {
            return Ok(user.to_owned());
        }
        Ok(self
            .auth
            .mint(user, device, Duration::from_secs(24 * 3600))?)
    }

    /// The server's process id, when it runs alone in a child process.
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Child(child) => Some(child.id()),
            _ => None,
        }
    }

    /// Resident memory of the server process (KB), if it runs alone.
    pub fn rss_kb(&self) -> Option<u64> {
        crate::procfs::rss_kb(self.pid()?)
    }

    /// Open file descriptors of the server process, if it runs alone.
    pub fn open_fds(&self) -> Option<u64> {
        crate::procfs::open_fds(self.pid()?)
    }
}

/// SIGTERM (the server closes its sessions and exits), then SIGKILL after a grace period.
fn stop_child(child: &mut Child) {
    let terminated = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .is_ok_and(|s| s.success());
    if terminated {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Tests run in-process: the binary next to a test executable may be stale or absent.
fn running_as_test() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.ends_with("deps")))
        .unwrap_or(false)
}

/// `name` next to the running executable (for tests and benches, next to their `deps/`
/// folder): where cargo puts the workspace's binaries.
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    // Test and bench executables live one level down, in deps/.
    let dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    Ok(dir.join(name))
}

fn random_secret() -> String {
    use rand::RngCore as _;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// An unused loopback UDP port (bound and released; the child binds it right after).
fn free_udp_addr() -> anyhow::Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?)
}

fn external(target: &str, options: &ServerOptions) -> anyhow::Result<Server> {
    let addr = target
        .to_socket_addrs()?
        .next()
        .with_context(|| format!("{target}: no address"))?;
    let ca = options.ca.as_ref().context("--target needs --ca")?;
    let secret = options
        .jwt_secret
        .clone()
        .or_else(|| std::env::var("TERN_JWT_SECRET").ok())
        .context("--target needs --jwt-secret (or TERN_JWT_SECRET) to mint tokens")?;
    Ok(Server {
        addr,
        ca_pem: std::fs::read_to_string(ca).with_context(|| ca.display().to_string())?,
        placement: "external",
        kind: Kind::Tern,
        auth: Authenticator::new(secret.as_bytes()),
        running: Running::External,
        _dir: None,
    })
}

/// Messages per minute each user may send in a server the bench starts: the per-user limit
/// still runs on every send, but a load generator's few users send far more than people do
/// (`direct` alone, hundreds a second each), so its default would be the first thing measured.
const BENCH_MESSAGES_PER_MINUTE: u32 = 60_000_000;

fn tern_config(dir: &Path, listen: SocketAddr, secret: &str) -> tern_server::Config {
    tern_server::Config {
        listen,
        data_dir: dir.join("data"),
        certs_dir: dir.join("certs"),
        jwt_secret: Some(secret.to_owned()),
        messages_per_minute: BENCH_MESSAGES_PER_MINUTE,
        ..tern_server::Config::default()
    }
}

type Ready = std::sync::mpsc::Sender<anyhow::Result<SocketAddr>>;

fn spawn_thread(kind: Kind, dir: &Path, secret: &str) -> anyhow::Result<(SocketAddr, Running)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let config = tern_config(dir, listen, secret);
    let thread = std::thread::Builder::new()
        .name("bench-server".into())
        .spawn(move || serve_on_thread(kind, config, ready_tx, stop_rx))?;
    let addr = ready_rx
        .recv_timeout(Duration::from_secs(30))
        .context("server did not start")??;
    Ok((
        addr,
        Running::Thread {
            stop: Some(stop_tx),
            thread: Some(thread),
        },
    ))
}

fn serve_on_thread(
    kind: Kind,
    config: tern_server::Config,
    ready: Ready,
    stop: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return;
        }
    };
    let shutdown = async {
        let _ = stop.await;
    };
    runtime.block_on(async move {
        match kind {
            Kind::Tern => match tern_server::start(config) {
                Ok((endpoint, state)) => {
                    let _ = ready.send(endpoint.local_addr().map_err(Into::into));
                    tern_server::run(endpoint, state, shutdown).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e.into()));
                }
            },
            Kind::Forwarder => match crate::forwarder::bind(config.listen, &config.certs_dir) {
                Ok(endpoint) => {
                    let _ = ready.send(endpoint.local_addr().map_err(Into::into));
                    crate::forwarder::run(endpoint, shutdown).await;
                }
                Err(e) => {
                    let _ = ready.send(Err(e));
                }
            },
        }
    });
}

fn spawn_child(
    kind: Kind,
    bin: &Path,
    addr: SocketAddr,
    dir: &Path,
    secret: &str,
) -> anyhow::Result<Child> {
    let mut command = Command::new(bin);
    match kind {
        Kind::Tern => {
            let config = dir.join("tern.toml");
            std::fs::write(
                &config,
                format!("messages_per_minute = {BENCH_MESSAGES_PER_MINUTE}\n"),
            )?;
            command
                .arg("--config")
                .arg(config)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--data-dir")
                .arg(dir.join("data"))
                .arg("--certs-dir")
                .arg(dir.join("certs"))
                .env("TERN_JWT_SECRET", secret);
        }
        Kind::Forwarder => {
            command
                .arg("forwarder")
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--certs-dir")
                .arg(dir.join("certs"));
        }
    }
    let mut child = command
        .env("RUST_LOG", "warn,tern_server=info,tern_bench=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().context("child stderr")?;
    // Drain the child's log for its whole life (a full pipe would block it); the first
    // "listening" line says it is ready.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let tail = Arc::new(Mutex::new(Vec::<String>::new()));
    let tail_writer = tail.clone();
    std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if std::env::var_os("TERN_BENCH_SERVER_LOG").is_some() {
                eprintln!("[server] {line}");
            }
            if line.contains("listening")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
            let mut tail = tail_writer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            let tail = tail
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .join("\n");
            bail!("{} exited with {status}:\n{tail}", bin.display());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(anyhow!("{} did not start within 30 s", bin.display()));
        }
    }
}
