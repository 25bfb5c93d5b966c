//! Command line: `tern-bench SCENARIO [--duration SECS] [--clients N] [options] [--json]`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::server::{Placement, ServerOptions};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "tern-bench",
    about = "tern load harness: starts the server it needs (or drives --target) and prints one \
             JSON object as its last line"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options every scenario takes.
#[derive(Debug, Clone, Default, Args)]
pub struct Common {
    /// Seconds of traffic (per phase); each scenario has its own default.
    #[arg(long, global = true)]
    pub duration: Option<f64>,
    /// Client connections; each scenario has its own default.
    #[arg(long, global = true)]
    pub clients: Option<usize>,
    /// Print only the JSON object (on one line) to stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Write an HTML report with latency plots into this directory.
    #[arg(long, global = true)]
    pub report: Option<PathBuf>,
    /// Drive this external tern server (HOST:PORT) instead of starting one.
    #[arg(long, global = true)]
    pub target: Option<String>,
    /// CA certificate (PEM) of the --target server.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// JWT secret of the --target server, to mint tokens.
    #[arg(long, global = true, env = "TERN_BENCH_JWT_SECRET")]
    pub jwt_secret: Option<String>,
    /// Where started servers run.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub server: Placement,
    /// The tern-server binary [default: next to tern-bench].
    #[arg(long, global = true)]
    pub server_bin: Option<PathBuf>,
    /// Skip the relay-baseline run that each scenario makes first (no `baseline_*` figures
    /// and no ratios).
    #[arg(long, global = true)]
    pub no_baseline: bool,
}

impl Common {
    pub fn server_options(&self) -> ServerOptions {
        ServerOptions {
            placement: self.server,
            server_bin: self.server_bin.clone(),
            target: self.target.clone(),
            ca: self.ca.clone(),
            jwt_secret: self.jwt_secret.clone(),
        }
    }

    pub fn duration_or(&self, secs: f64) -> std::time::Duration {
        crate::probe::secs(self.duration.unwrap_or(secs))
    }

    pub fn clients_or(&self, n: usize) -> usize {
        self.clients.unwrap_or(n)
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// The ceiling: a minimal QUIC forwarder (no auth, no storage), driven like `direct`.
    RelayBaseline(DirectArgs),
    /// Users in 1:1 conversations with durable acks; runs `relay-baseline` first for the ratio.
    Direct(DirectArgs),
    /// Fan-out to groups; latency to the last member.
    Group(GroupArgs),
    /// Many idle connections: handshakes/s, server RSS per connection, then a reconnect storm.
    Connections(ConnectionsArgs),
    /// Time for a device to sync a backlog.
    OfflineSync(OfflineSyncArgs),
    /// Head-of-line blocking through a lossy relay: streams vs one stream.
    Hol(HolArgs),
    /// Clients change networks (rebind) while traffic flows.
    Migration(MigrationArgs),
    /// Steady mixed load; server RSS and open file descriptors over time.
    Soak(SoakArgs),
    /// Internal: run the relay-baseline forwarder (as a child process).
    #[command(hide = true)]
    Forwarder(ForwarderArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::RelayBaseline(_) => "relay-baseline",
            Scenario::Direct(_) => "direct",
            Scenario::Group(_) => "group",
            Scenario::Connections(_) => "connections",
            Scenario::OfflineSync(_) => "offline-sync",
            Scenario::Hol(_) => "hol",
            Scenario::Migration(_) => "migration",
            Scenario::Soak(_) => "soak",
            Scenario::Forwarder(_) => "forwarder",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct DirectArgs {
    /// Messages per second over all clients; flat out when absent.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Sends in flight per client.
    #[arg(long, default_value_t = 4)]
    pub in_flight: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Send with the bench's own client message ids, which the server indexes (as it does an
    /// app's own ids); by default the client library makes the ids, as for most sends.
    #[arg(long)]
    pub app_ids: bool,
    /// `direct` only: run the relay-baseline and tern this many times each, alternating (ABBA
    /// order, so a machine that drifts faster or slower favours neither), and report the
    /// round with the median ratio. On a shared machine one pair of runs can be off by a third.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub rounds: u32,
    /// Client threads, each a current-thread runtime driving its share of the pairs; by
    /// default one per core. 1 is how the bench drove every client before session 13.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
    /// `direct` only: the baseline is this tern-server binary instead of the relay, so the
    /// rounds compare two server builds (an A/B test of a change) under the same load and
    /// ordering, and every `baseline_*` figure and ratio is that build's. Both run as child
    /// processes. To compare settings rather than builds, point it at a wrapper script that
    /// sets an environment variable or appends to the config file the bench passes with
    /// `--config`.
    #[arg(long, value_name = "PATH")]
    pub baseline_server_bin: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct GroupArgs {
    /// Group sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub sizes: Vec<usize>,
    /// Messages sent to each group.
    #[arg(long, default_value_t = 100)]
    pub messages: u64,
    /// Messages per second to each group.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectionsArgs {
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Connections per client UDP socket.
    #[arg(long, default_value_t = 250)]
    pub per_endpoint: usize,
    /// Seconds to hold the idle connections before measuring RSS.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
    /// Measure the relay-baseline forwarder alone, without tern: what quinn with tern's
    /// transport settings costs, to tell it apart from tern's own state.
    #[arg(long)]
    pub forwarder: bool,
}

#[derive(Debug, Clone, Args)]
pub struct OfflineSyncArgs {
    /// Messages waiting for the device.
    #[arg(long, default_value_t = 10_000)]
    pub backlog: u64,
    /// Fresh devices that each sync the whole backlog (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct HolArgs {
    /// Loss probability in each direction.
    #[arg(long, default_value_t = 0.02)]
    pub loss: f64,
    /// One-way delay in each direction, milliseconds.
    #[arg(long, default_value_t = 25)]
    pub delay_ms: u64,
    /// Bytes of each message in conversation A (default: the server's maximum message).
    #[arg(long, default_value_t = 65_536)]
    pub bulk_size: usize,
    /// Conversation A's sends in flight.
    #[arg(long, default_value_t = 4)]
    pub bulk_in_flight: usize,
    /// Milliseconds between the small messages of conversation B.
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// Bytes of each small message.
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Seed of the relay's loss decisions (the same for both modes).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Send A and B to the same device (by default B goes to a third user).
    #[arg(long)]
    pub same_recipient: bool,
}

#[derive(Debug, Clone, Args)]
pub struct MigrationArgs {
    /// Messages per second over all clients.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Each client changes network this often, milliseconds (staggered across clients).
    #[arg(long, default_value_t = 1000)]
    pub migrate_every_ms: u64,
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// 1:1 messages per second over all clients.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Messages per second to a group of every client.
    #[arg(long, default_value_t = 2.0)]
    pub group_rate: f64,
    /// Milliseconds between RSS and file-descriptor samples.
    #[arg(long, default_value_t = 1000)]
    pub sample_ms: u64,
    #[arg(long, default_value_t = 100)]
    pub size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ForwarderArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub certs_dir: PathBuf,
}
