//! `direct` and `relay-baseline`: pairs of users in 1:1 conversations, both ways, flat out or
//! at a rate, with durable acks. The same driver runs against tern and against the forwarder,
//! so the ratio compares servers and nothing else.

use std::path::Path;

use serde_json::json;

use super::pairs::{self, PairsRun};
use crate::cli::{Common, DirectArgs};
use crate::output::{Outcome, Plot};
use crate::procfs::CpuFigures;
use crate::server::{Kind, Placement, Server};
use crate::traffic::Plan;

const DEFAULT_CLIENTS: usize = 100;
const DEFAULT_SECS: f64 = 10.0;

/// What the rounds of `direct` compare tern with.
#[derive(Debug, Clone, Copy)]
enum Baseline<'a> {
    /// The relay: the ceiling of the stack (`relay-baseline`).
    Relay,
    /// Another tern-server build (`--baseline-server-bin`).
    Build(&'a Path),
}

impl Baseline<'_> {
    fn label(self) -> String {
        match self {
            Baseline::Relay => "relay-baseline".to_owned(),
            Baseline::Build(bin) => format!("tern-server {}", bin.display()),
        }
    }
}

/// Connects `clients` users in pairs and runs the plan against a fresh `kind` server. With
/// `bin`, the server is that binary, in a child process.
async fn run_pairs(
    common: &Common,
    args: &DirectArgs,
    kind: Kind,
    bin: Option<&Path>,
) -> anyhow::Result<PairsRun> {
    let mut options = common.server_options();
    if let Some(bin) = bin {
        options.server_bin = Some(bin.to_owned());
        options.placement = Placement::Child;
    }
    let server = Server::start(kind, &options)?;
    let n = common.clients_or(DEFAULT_CLIENTS).max(2) & !1;
    let prefix = if kind == Kind::Tern { "d" } else { "b" };
    let users = super::users(prefix, n);
    let plan = Plan {
        rate: args.rate,
        app_ids: args.app_ids,
        ..Plan::flat_out(common.duration_or(DEFAULT_SECS), args.in_flight)
    };
    let threads = args
        .threads
        .map_or_else(pairs::default_threads, usize::from);
    pairs::run(server, &users, args.size, plan, threads).await
}

/// The run's CPU figures under `prefix`: null where /proc could not tell (not Linux, or the
/// server in-process for the server's own share).
fn add_cpu(json: &mut serde_json::Map<String, serde_json::Value>, prefix: &str, cpu: &CpuFigures) {
    // One decimal: the figures vary by more than that between runs.
    let value = |x: Option<f64>| json!(x.map(|x| (x * 10.0).round() / 10.0));
    json.insert(
        format!("{prefix}machine_cpu_us_per_msg"),
        value(cpu.machine_us_per_msg),
    );
    json.insert(
        format!("{prefix}machine_idle_pct"),
        value(cpu.machine_idle_pct),
    );
    json.insert(
        format!("{prefix}server_cpu_us_per_msg"),
        value(cpu.process_us_per_msg),
    );
}

fn describe(run: &PairsRun, scenario: &str, common: &Common, args: &DirectArgs) -> Outcome {
    let mut json = run.summary.json(scenario, run.rss_kb);
    json.insert("clients".into(), json!(common.clients_or(DEFAULT_CLIENTS)));
    json.insert("in_flight".into(), json!(args.in_flight));
    json.insert("size".into(), json!(args.size));
    json.insert("rate".into(), json!(args.rate));
    json.insert("app_ids".into(), json!(args.app_ids));
    json.insert("client_threads".into(), json!(run.threads));
    json.insert("send_errors".into(), json!(run.sent.errors));
    super::add_quantiles(&mut json, "ack", &run.sent.ack_latency);
    json.insert("server".into(), json!(run.placement));
    add_cpu(&mut json, "", &run.cpu);
    Outcome {
        json,
        plots: vec![Plot::Latency {
            title: format!("{scenario}: send → delivered"),
            series: vec![(scenario.to_owned(), run.summary.latency.clone())],
        }],
    }
}

pub async fn run_baseline(common: &Common, args: &DirectArgs) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        args.baseline_server_bin.is_none(),
        "--baseline-server-bin is for `direct`; relay-baseline is the relay alone"
    );
    let run = run_pairs(common, args, Kind::Forwarder, None).await?;
    Ok(describe(&run, "relay-baseline", common, args))
}

pub async fn run(common: &Common, args: &DirectArgs) -> anyhow::Result<Outcome> {
    let baseline = match &args.baseline_server_bin {
        None => Baseline::Relay,
        Some(bin) => {
            anyhow::ensure!(
                !common.no_baseline && common.target.is_none(),
                "--baseline-server-bin compares two servers the bench starts: \
                 it takes neither --no-baseline nor --target"
            );
            Baseline::Build(bin)
        }
    };
    if common.no_baseline {
        let direct = run_pairs(common, args, Kind::Tern, None).await?;
        return Ok(describe(&direct, "direct", common, args));
    }
    // Against another build, both are child processes, so that neither shares a process
    // (and its allocator and runtime threads) with the bench's clients.
    let (tern_bin, base_kind, base_bin) = match baseline {
        Baseline::Relay => (None, Kind::Forwarder, None),
        Baseline::Build(bin) => {
            let this = match &common.server_bin {
                Some(path) => path.clone(),
                None => crate::server::sibling("tern-server")?,
            };
            (Some(this), Kind::Tern, Some(bin))
        }
    };
    let tern_bin = tern_bin.as_deref();
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        // ABBA: baseline first in rounds 0, 3, 4, 7, …; tern first in the others.
        let baseline_first = matches!(round % 4, 0 | 3);
        let (base, tern) = if baseline_first {
            let base = run_pairs(common, args, base_kind, base_bin).await?;
            (base, run_pairs(common, args, Kind::Tern, tern_bin).await?)
        } else {
            let tern = run_pairs(common, args, Kind::Tern, tern_bin).await?;
            (run_pairs(common, args, base_kind, base_bin).await?, tern)
        };
        rounds.push((base, tern));
    }
    Ok(with_baseline(rounds, baseline, common, args))
}

/// The round with the median ratio, described in full, plus every round's figures. Lost,
/// duplicated and out-of-order counts are summed over all rounds, so none hides in another.
fn with_baseline(
    mut rounds: Vec<(PairsRun, PairsRun)>,
    baseline: Baseline<'_>,
    common: &Common,
    args: &DirectArgs,
) -> Outcome {
    let ratio_of = |(base, tern): &(PairsRun, PairsRun)| {
        tern.summary.msgs_per_s / base.summary.msgs_per_s.max(f64::MIN_POSITIVE)
    };
    let figures: Vec<(f64, f64, f64)> = rounds
        .iter()
        .map(|r| (ratio_of(r), r.1.summary.msgs_per_s, r.0.summary.msgs_per_s))
        .collect();
    let sum = |f: fn(&(PairsRun, PairsRun)) -> u64| rounds.iter().map(f).sum::<u64>();
    let totals = [
        ("lost", sum(|r| r.1.summary.lost)),
        ("duplicated", sum(|r| r.1.summary.duplicated)),
        ("out_of_order", sum(|r| r.1.summary.out_of_order)),
        ("baseline_lost", sum(|r| r.0.summary.lost)),
        ("baseline_duplicated", sum(|r| r.0.summary.duplicated)),
    ];
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| figures[a].0.total_cmp(&figures[b].0));
    let median = order[(order.len() - 1) / 2];
    let (base, direct) = rounds.swap_remove(median);
    let mut outcome = describe(&direct, "direct", common, args);
    super::add_baseline(&mut outcome.json, &direct.summary, &base.summary);
    add_cpu(&mut outcome.json, "baseline_", &base.cpu);
    outcome
        .json
        .insert("baseline".into(), json!(baseline.label()));
    if args.rounds > 1 {
        let json = &mut outcome.json;
        for (key, total) in totals {
            json.insert(key.into(), json!(total));
        }
        json.insert("rounds".into(), json!(args.rounds));
        let sorted: Vec<f64> = order.iter().map(|&i| figures[i].0).collect();
        let interval = crate::stats::median_interval(&sorted, 0.95)
            .map(|ci| [ci.low, ci.high].map(crate::output::round));
        json.insert("ratio_ci95".into(), json!(interval));
        let column = |i: usize| -> Vec<f64> {
            figures
                .iter()
                .map(|f| crate::output::round([f.0, f.1, f.2][i]))
                .collect()
        };
        json.insert("round_ratios".into(), json!(column(0)));
        json.insert("round_msgs_per_s".into(), json!(column(1)));
        json.insert("round_baseline_msgs_per_s".into(), json!(column(2)));
    }
    if let Some(Plot::Latency { series, .. }) = outcome.plots.first_mut() {
        series.push((baseline.label(), base.summary.latency.clone()));
    }
    outcome
}
