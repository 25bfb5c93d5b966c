//! `direct` and `relay-baseline`: pairs of users in 1:1 conversations, both ways, flat out or
//! at a rate, with durable acks. The same driver runs against tern and against the forwarder,
//! so the ratio compares servers and nothing else.

use serde_json::json;

use super::pairs::{self, PairsRun};
use crate::cli::{Common, DirectArgs};
use crate::output::{Outcome, Plot};
use crate::procfs::CpuFigures;
use crate::server::{Kind, Server};
use crate::traffic::Plan;

const DEFAULT_CLIENTS: usize = 100;
const DEFAULT_SECS: f64 = 10.0;

/// Connects `clients` users in pairs and runs the plan against a fresh `kind` server.
pub async fn run_pairs(common: &Common, args: &DirectArgs, kind: Kind) -> anyhow::Result<PairsRun> {
    let server = Server::start(kind, &common.server_options())?;
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
    let run = run_pairs(common, args, Kind::Forwarder).await?;
    Ok(describe(&run, "relay-baseline", common, args))
}

pub async fn run(common: &Common, args: &DirectArgs) -> anyhow::Result<Outcome> {
    if common.no_baseline {
        let direct = run_pairs(common, args, Kind::Tern).await?;
        return Ok(describe(&direct, "direct", common, args));
    }
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        // ABBA: baseline first in rounds 0, 3, 4, 7, …; tern first in the others.
        let baseline_first = matches!(round % 4, 0 | 3);
        let (base, tern) = if baseline_first {
            let base = run_pairs(common, args, Kind::Forwarder).await?;
            (base, run_pairs(common, args, Kind::Tern).await?)
        } else {
            let tern = run_pairs(common, args, Kind::Tern).await?;
            (run_pairs(common, args, Kind::Forwarder).await?, tern)
        };
        rounds.push((base, tern));
    }
    Ok(with_baseline(rounds, common, args))
}

/// The round with the median ratio, described in full, plus every round's figures. Lost,
/// duplicated and out-of-order counts are summed over all rounds, so none hides in another.
fn with_baseline(
    mut rounds: Vec<(PairsRun, PairsRun)>,
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
    if args.rounds > 1 {
        let json = &mut outcome.json;
        for (key, total) in totals {
            json.insert(key.into(), json!(total));
        }
        json.insert("rounds".into(), json!(args.rounds));
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
        series.push(("relay-baseline".into(), base.summary.latency.clone()));
    }
    outcome
}
