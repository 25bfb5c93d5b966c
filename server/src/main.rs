//! `tern-server`: runs the server, or mints development tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tern_server::Config;
use tern_server::auth::Authenticator;
use tracing::error;

/// jemalloc instead of glibc malloc: profiling `tern-bench direct` showed about 29% of the
/// server's CPU in glibc's allocator (`_int_malloc`, `malloc_consolidate`, `free`), most of it
/// on the storage writer thread, which builds every batch from many small allocations.
/// jemalloc was as fast as mimalloc in `direct`, and kept about 2 KB less per idle connection.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Threads of tokio's blocking pool (presence contacts read on a cache miss); see `Run`.
const BLOCKING_THREADS: usize = 4;

#[derive(Debug, Parser)]
#[command(
    name = "tern-server",
    version,
    about = "tern: realtime messaging server on QUIC"
)]
struct Cli {
    /// TOML configuration file; flags override it.
    #[arg(long, global = true, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// UDP address to listen on [default: [::]:4433, dual-stack].
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Data directory (JWT secret, inbox) [default: ./data].
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Certificate chain (PEM); without it, development certificates are generated.
    #[arg(long, global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// Where development certificates are generated [default: ./certs].
    #[arg(long, global = true)]
    certs_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Run,
    /// Print a token signed with this server's secret (development and tests).
    Token {
        /// User id (the `sub` claim).
        #[arg(long)]
        user: String,
        /// Device id.
        #[arg(long, default_value = tern_server::auth::DEFAULT_DEVICE)]
        device: String,
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and CI output stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("tern-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(dir) = cli.data_dir {
        config.data_dir = dir;
    }
    if let Some(dir) = cli.certs_dir {
        config.certs_dir = dir;
    }
    if cli.cert.is_some() {
        config.cert = cli.cert;
        config.key = cli.key;
    }
    match cli.command.unwrap_or(Command::Run) {
        Command::Token { user, device, ttl } => {
            // Only the secret: the store stays closed, so this works while a server runs.
            config.validate()?;
            let secret = config
                .jwt_secret
                .clone()
                .or_else(|| std::env::var("TERN_JWT_SECRET").ok());
            let auth = Authenticator::load_or_generate(secret.as_deref(), &config.data_dir)?;
            println!("{}", auth.mint(&user, &device, ttl)?);
            Ok(())
        }
        Command::Run => {
            let mut builder = if config.worker_threads <= 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(config.worker_threads);
                builder
            };
            // The blocking pool only reads a user's contacts from fjall when the presence
            // cache misses; tokio's default of 512 threads would let a reconnect storm (every
            // device missing at once) start hundreds of threads on a 2-core node.
            let runtime = builder
                .max_blocking_threads(BLOCKING_THREADS)
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let (endpoint, state) = tern_server::start(config)?;
                tern_server::run(endpoint, state, shutdown_signal()).await;
                Ok(())
            })
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
