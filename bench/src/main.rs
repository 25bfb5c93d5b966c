//! `tern-bench`: see `bench/README.md`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use tern_bench::{Cli, Scenario};

/// The allocator tern-server uses, so that the forwarder (this binary) and tern compare on
/// equal terms, and the clients cost the same in both runs.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tern_bench=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match real_main(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: &Cli) -> anyhow::Result<()> {
    // Current-thread, like the server's default: it drove quinn 1.5–3× faster than a
    // multi-thread runtime on 2 cores (shared/BASELINES.md), and both sides of every
    // comparison run the same flavour. The pairs of `direct` and `relay-baseline` run on
    // client threads of their own, each also a current-thread runtime (scenarios/pairs.rs).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if let Scenario::Forwarder(args) = &cli.scenario {
        return runtime.block_on(async {
            let endpoint = tern_bench::forwarder::bind(args.listen, &args.certs_dir)?;
            tracing::info!(addr = %endpoint.local_addr()?, "forwarder listening");
            tern_bench::forwarder::run(endpoint, std::future::pending()).await;
            Ok(())
        });
    }
    let outcome = runtime.block_on(tern_bench::run(&cli.common, &cli.scenario))?;
    if let Some(dir) = &cli.common.report {
        let path = tern_bench::report::write(dir, &outcome).context("writing the report")?;
        eprintln!("report: {}", path.display());
    }
    if !cli.common.json {
        for (key, value) in &outcome.json {
            eprintln!("{key:>28}  {value}");
        }
    }
    // The last line of stdout is always the JSON object.
    println!("{}", serde_json::Value::Object(outcome.json));
    Ok(())
}
