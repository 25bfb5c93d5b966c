//! `tern-chat`: a command-line tern client. Output is one JSON object per line.

mod interactive;
mod json;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tern_client::tern_protocol::pb::PresenceStatus;
use tern_client::{Client, ClientConfig, ClientError, ConnectionState, Event, SendTarget, Trust};
use tokio::time::Instant;

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
    /// Interactive chat (no subcommand): the user to chat with.
    #[arg(long, conflicts_with = "conversation")]
    to: Option<String>,
    /// Interactive chat (no subcommand): the conversation to chat in.
    #[arg(long)]
    conversation: Option<String>,
    /// Without a subcommand: interactive chat with --to or --conversation.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect, authenticate and print the session.
    Whoami,
    /// Send one message and print the server's acknowledgement.
    Send {
        #[command(flatten)]
        target: Target,
        /// Client message id, to make retries safe (random by default).
        #[arg(long)]
        id: Option<String>,
        text: String,
    },
    /// Print events as they arrive: first what was missed since the last run, then live.
    Listen {
        /// Stop after this many messages, receipts and conversation events.
        #[arg(long)]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_parser = parse_secs)]
        timeout: Option<Duration>,
    },
    /// Print inbox entries after a sequence, then acknowledge them.
    Sync {
        /// Inbox sequence to start after (default: this device's saved cursor).
        #[arg(long)]
        since: Option<u64>,
    },
    /// Mark a conversation read up to a sequence (the senders get read receipts).
    Read { conversation_id: String, seq: u64 },
    /// Create and manage groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Publish this device's presence to everyone who shares a conversation with you.
    Presence {
        #[arg(value_parser = ["online", "away"])]
        status: String,
    },
    /// Show "typing…" in a conversation for a few seconds.
    Typing { conversation_id: String },
    /// Print a page of a conversation's messages, newest first.
    History {
        conversation_id: String,
        /// Only messages before this sequence (0: from the newest).
        #[arg(long, default_value_t = 0)]
        before: u64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct Target {
    /// The user to send to (their direct conversation is created on first send).
    #[arg(long)]
    to: Option<String>,
    /// The conversation to send to.
    #[arg(long)]
    conversation: Option<String>,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group; you are its owner.
    Create {
        name: String,
        /// Other members, comma-separated.
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
    },
    /// Add members to a group.
    Add {
        conversation_id: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove a member from a group.
    Remove {
        conversation_id: String,
        user: String,
    },
    /// Leave a group.
    Leave { conversation_id: String },
    /// Dissolve a group (owner only).
    Dissolve { conversation_id: String },
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{e}"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: log files and CI output stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let result = runtime.block_on(run(cli));
    // A pending stdin read (interactive mode) cannot be cancelled; don't wait for it.
    runtime.shutdown_background();
    match result {
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

/// Connects without the automatic sync: one-shot commands must not receive (and so
/// acknowledge) inbox entries they never print.
async fn connect_quiet(mut config: ClientConfig) -> anyhow::Result<Client> {
    config.auto_sync = false;
    let (client, _events) = Client::connect(config).await?;
    Ok(client)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command.as_ref() else {
        let target = match (&cli.to, &cli.conversation) {
            (Some(user), _) => SendTarget::User(user.clone()),
            (None, Some(id)) => SendTarget::Conversation(id.clone()),
            (None, None) => anyhow::bail!(
                "no subcommand: pass --to USER or --conversation ID for an interactive chat \
                 (see --help for the subcommands)"
            ),
        };
        return interactive::run(client_config(&cli)?, target).await;
    };
    if cli.to.is_some() || cli.conversation.is_some() {
        anyhow::bail!(
            "--to/--conversation before the subcommand are for interactive chat only; \
             put them after the subcommand"
        );
    }
    let config = client_config(&cli)?;
    match command {
        Command::Whoami => {
            let client = connect_quiet(config).await?;
            let session = client.session();
            json::emit(&json!({
                "user": session.user,
                "device": session.device,
                "server_time_ms": session.server_time_ms,
                "session_id": session.session_id,
            }))?;
            client.close().await;
        }
        Command::Presence { status } => {
            let client = connect_quiet(config).await?;
            let status = if status == "away" {
                PresenceStatus::Away
            } else {
                PresenceStatus::Online
            };
            client.set_presence(status).await?;
            json::emit(&json!({"presence": status.as_str_name().to_ascii_lowercase()}))?;
            client.close().await;
        }
        Command::Typing { conversation_id } => {
            let client = connect_quiet(config).await?;
            client.typing(conversation_id).await?;
            json::emit(&json!({"typing": conversation_id}))?;
            client.close().await;
        }
        Command::Send { target, id, text } => {
            let target = match (&target.to, &target.conversation) {
                (Some(user), _) => SendTarget::User(user.clone()),
                (None, Some(id)) => SendTarget::Conversation(id.clone()),
                // clap's required group makes this unreachable; keep a real error anyway.
                (None, None) => anyhow::bail!("pass --to USER or --conversation ID"),
            };
            let client = connect_quiet(config).await?;
            let sent = client.send(target, text, id.clone()).await?;
            json::emit(&json::sent(&sent))?;
            client.close().await;
        }
        Command::Listen { count, timeout } => listen(config, *count, *timeout).await?,
        Command::Sync { since } => {
            let client = connect_quiet(config).await?;
            let since = since.unwrap_or(client.session().delivered_cursor);
            let result = client.sync(since).await?;
            for entry in &result.entries {
                if let Some(line) = json::entry(entry) {
                    json::emit(&line)?;
                }
            }
            if let Some(too_long) = &result.too_long {
                json::emit(&json::sync_too_long(too_long.inbox_head, &too_long.heads))?;
            }
            close_acked(client, result.entries.last().map(|e| e.inbox_seq)).await?;
        }
        Command::Read {
            conversation_id,
            seq,
        } => {
            let client = connect_quiet(config).await?;
            client.mark_read(conversation_id, *seq).await?;
            json::emit(&json!({"conversation_id": conversation_id, "read_up_to": seq}))?;
            client.close().await;
        }
        Command::Group(group) => {
            let client = connect_quiet(config).await?;
            let conv = match group {
                GroupCommand::Create { name, members } => {
                    client.create_group(name, members).await?
                }
                GroupCommand::Add {
                    conversation_id,
                    users,
                } => client.add_members(conversation_id, users).await?,
                GroupCommand::Remove {
                    conversation_id,
                    user,
                } => client.remove_member(conversation_id, user).await?,
                GroupCommand::Leave { conversation_id } => {
                    client.leave_group(conversation_id).await?
                }
                GroupCommand::Dissolve { conversation_id } => {
                    client.dissolve_group(conversation_id).await?
                }
            };
            json::emit(&json::conversation(&conv))?;
            client.close().await;
        }
        Command::History {
            conversation_id,
            before,
            limit,
        } => {
            let client = connect_quiet(config).await?;
            let page = client.history(conversation_id, *before, *limit).await?;
            for message in &page.messages {
                json::emit(&json::message(message, None))?;
            }
            client.close().await;
        }
    }
    Ok(())
}

/// Prints events until `count` messages/receipts/conversation events, the timeout, or the end
/// of the session (an error, so the exit status is 1).
async fn listen(
    config: ClientConfig,
    count: Option<u64>,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    let (client, mut events) = Client::connect(config).await?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut counted = 0u64;
    let result = loop {
        if count.is_some_and(|n| counted >= n) {
            break Ok(());
        }
        let event = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(event) => event,
                Err(_) => break Ok(()),
            },
            None => events.recv().await,
        };
        // The client keeps the sender while it lives; treat a closed channel as a disconnect.
        let Some(event) = event else {
            break Err(anyhow::Error::new(ClientError::Closed));
        };
        if let Some(line) = json::event(&event) {
            json::emit(&line)?;
        }
        match event {
            Event::Message { .. } | Event::Receipt { .. } | Event::Conversation { .. } => {
                counted += 1;
            }
            Event::Connection(ConnectionState::Disconnected { code, reason }) => {
                break Err(match code {
                    Some(code) => anyhow::Error::new(ClientError::Server {
                        code,
                        message: reason,
                        retry_after_ms: 0,
                    }),
                    None => anyhow::anyhow!("disconnected: {reason}"),
                });
            }
            _ => {}
        }
    };
    if result.is_err() {
        client.close().await;
        return result;
    }
    // What the client received, as its own periodic acks report it (printed or still queued).
    let cursor = client.inbox_cursor();
    let up_to = (cursor > client.session().delivered_cursor).then_some(cursor);
    close_acked(client, up_to).await
}

/// Acknowledges up to `up_to` and closes. `Client::close` closes right after writing its ack,
/// which can drop it in flight; the server handles the control stream in order, so a ping's
/// answer proves it took the ack.
async fn close_acked(client: Client, up_to: Option<u64>) -> anyhow::Result<()> {
    if let Some(up_to) = up_to {
        client.ack(up_to).await?;
        client.ping().await?;
    }
    client.close().await;
    Ok(())
}
