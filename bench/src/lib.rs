//! tern-bench: the load harness (scenarios, servers to drive, reports) as a library, so the
//! smoke test can run scenarios in-process. The binary is `src/main.rs`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cli;
pub mod clients;
pub mod forwarder;
pub mod frames;
pub mod lean;
pub mod output;
pub mod probe;
pub mod procfs;
pub mod report;
pub mod scenarios;
pub mod server;
pub mod stats;
pub mod traffic;

pub use cli::{Cli, Common, Scenario};
pub use output::Outcome;

/// Runs one scenario to completion.
pub async fn run(common: &Common, scenario: &Scenario) -> anyhow::Result<Outcome> {
    use scenarios::*;
    match scenario {
        Scenario::RelayBaseline(args) => direct::run_baseline(common, args).await,
        Scenario::Direct(args) => direct::run(common, args).await,
        Scenario::Group(args) => group::run(common, args).await,
        Scenario::Connections(args) => connections::run(common, args).await,
        Scenario::OfflineSync(args) => offline_sync::run(common, args).await,
        Scenario::Hol(args) => hol::run(common, args).await,
        Scenario::Migration(args) => migration::run(common, args).await,
        Scenario::Soak(args) => soak::run(common, args).await,
        Scenario::Forwarder(_) => anyhow::bail!("the forwarder is not a scenario"),
    }
}
