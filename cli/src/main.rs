//! `tern-chat`: a command-line tern client. Output is one JSON object per line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use tern_client::{Client, ClientConfig, ClientError, Trust};

#[derive(Debug, Parser)]
#[command(name = "tern-chat", version, about = "Command-line client for tern")]
struct Cli {
    /// Server address, host:port.
    #[arg(
        long,
        global = true,
        env = "TERN_SERVER",
        default_value = "localhost:4433"
    )]
    server: String,
    /// Token (JWT) from your app backend or `tern-server token`.
    #[arg(long, global = true, env = "TERN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate to trust (PEM); `system` trusts the operating system's roots.
    #[arg(long, global = true, env = "TERN_CA", default_value = "./certs/ca.pem")]
    ca: String,
    /// TLS server name, if it differs from the host in --server.
    #[arg(long, global = true)]
    server_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect, authenticate and print the session.
    Whoami,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tern-chat: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.downcast_ref::<ClientError>().and_then(ClientError::code);
            let line = json!({
                "type": "error",
                "code": code.map(|c| c.as_str_name()),
                "message": format!("{e:#}"),
            });
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}

fn client_config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let token = cli
        .token
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no token: set TERN_TOKEN or pass --token"))?;
    let trust = if cli.ca == "system" {
        Trust::SystemRoots
    } else {
        Trust::CaFile(PathBuf::from(&cli.ca))
    };
    let mut config = ClientConfig::new(cli.server.clone(), token, trust);
    config.server_name = cli.server_name.clone();
    Ok(config)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = client_config(&cli)?;
    match cli.command {
        Command::Whoami => {
            let (client, _events) = Client::connect(config).await?;
            let session = client.session();
            println!(
                "{}",
                json!({
                    "user": session.user,
                    "device": session.device,
                    "server_time_ms": session.server_time_ms,
                    "session_id": session.session_id,
                })
            );
            client.close().await;
            Ok(())
        }
    }
}
