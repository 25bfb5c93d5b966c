//! Every scenario, in-process with tiny counts: it runs against tern and against the relay
//! baseline, nothing is lost or duplicated by either, and the ratios are reported. No timing
//! assertions: CI machines vary too much.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser as _;
use tern_bench::Cli;
use tern_bench::output::Plot;

async fn run(args: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    run_with_plots(args).await.json
}

/// [`run`], keeping the plots.
async fn run_with_plots(args: &[&str]) -> tern_bench::output::Outcome {
    let mut argv = vec!["tern-bench"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--server", "in-process", "--json"]);
    let cli = Cli::try_parse_from(&argv).unwrap();
    let outcome = tern_bench::run(&cli.common, &cli.scenario).await.unwrap();
    let json = &outcome.json;
    assert_eq!(json["lost"], 0, "{args:?}: {json:?}");
    assert_eq!(json["duplicated"], 0, "{args:?}: {json:?}");
    assert!(
        json["delivered"].as_u64().unwrap() > 0,
        "{args:?}: {json:?}"
    );
    assert_baseline(json);
    outcome
}

/// A JSON array of numbers, as numbers.
fn numbers(value: &serde_json::Value) -> Vec<f64> {
    let array = value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"));
    array.iter().map(|x| x.as_f64().unwrap()).collect()
}

/// `direct` with two tiny clients, 0.5 s runs and `rounds` rounds, plus `extra` options.
async fn direct_in_rounds(
    rounds: &str,
    extra: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    let mut args = vec![
        "direct",
        "--duration",
        "0.5",
        "--clients",
        "2",
        "--rounds",
        rounds,
    ];
    args.extend_from_slice(extra);
    run(&args).await
}

/// The same-run baseline ran cleanly and the ratios to it are there.
fn assert_baseline(json: &serde_json::Map<String, serde_json::Value>) {
    assert_eq!(json["baseline_lost"], 0, "{json:?}");
    assert_eq!(json["baseline_duplicated"], 0, "{json:?}");
    for key in [
        "ratio_to_baseline",
        "p50_ratio_to_baseline",
        "p99_ratio_to_baseline",
    ] {
        assert!(json[key].as_f64().unwrap() > 0.0, "{key}: {json:?}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn direct_with_its_baseline() {
    let json = run(&[
        "direct",
        "--duration",
        "1",
        "--clients",
        "4",
        "--threads",
        "2",
    ])
    .await;
    assert!(json["baseline_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(json["client_threads"], 2);
    // The machine's CPU per message, from /proc; the server's own share needs a server in a
    // process of its own, which this in-process run does not have.
    for prefix in ["", "baseline_"] {
        let cpu = json[format!("{prefix}machine_cpu_us_per_msg").as_str()].as_f64();
        assert!(cpu.is_some_and(|us| us > 0.0), "{json:?}");
        let idle = json[format!("{prefix}machine_idle_pct").as_str()].as_f64();
        assert!(idle.is_some_and(|p| (0.0..=100.0).contains(&p)), "{json:?}");
        assert!(json[format!("{prefix}server_cpu_us_per_msg").as_str()].is_null());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn direct_in_rounds_reports_the_median_round_and_every_round() {
    let json = direct_in_rounds("3", &[]).await;
    assert_eq!(json["rounds"], 3);
    let ratios = numbers(&json["round_ratios"]);
    assert_eq!(ratios.len(), 3);
    assert_eq!(json["round_msgs_per_s"].as_array().unwrap().len(), 3);
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(
        json["ratio_to_baseline"].as_f64().unwrap(),
        sorted[1],
        "{json:?}"
    );
    assert_eq!(json["baseline"], "relay-baseline");
    // Three rounds are too few for a 95% interval of their median.
    assert!(json["ratio_ci95"].is_null(), "{json:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn direct_against_another_server_build() {
    // The workspace build (scripts/test.sh builds it before the tests) puts tern-server next
    // to the test's deps/ folder. Both sides run it here: an A/B test of a build with itself.
    let bin = tern_bench::server::sibling("tern-server").unwrap();
    assert!(
        bin.exists(),
        "{bin:?} is missing: build it first (cargo build -p tern-server)"
    );
    let bin = bin.to_str().unwrap();
    let json = direct_in_rounds("6", &["--baseline-server-bin", bin]).await;
    assert_eq!(json["baseline"], format!("tern-server {bin}"), "{json:?}");
    assert_eq!(json["server"], "child", "{json:?}");
    // The baseline ran as a process of its own, not as the in-process relay.
    assert!(
        json["baseline_server_cpu_us_per_msg"].as_f64().is_some(),
        "{json:?}"
    );
    // Six rounds: the 95% interval of the median is their min..max.
    let ratios = numbers(&json["round_ratios"]);
    assert_eq!(ratios.len(), 6);
    let ci = numbers(&json["ratio_ci95"]);
    let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(ci, vec![min, max], "{json:?}");
    let median = json["ratio_to_baseline"].as_f64().unwrap();
    assert!(ci[0] <= median && median <= ci[1], "{json:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn another_server_build_needs_the_baseline_runs() {
    for extra in [&["direct", "--no-baseline"][..], &["relay-baseline"][..]] {
        let mut argv = vec!["tern-bench"];
        argv.extend_from_slice(extra);
        argv.extend_from_slice(&["--baseline-server-bin", "/nonexistent/tern-server"]);
        let cli = Cli::try_parse_from(&argv).unwrap();
        let err = tern_bench::run(&cli.common, &cli.scenario)
            .await
            .expect_err("refused before any server starts");
        assert!(
            err.to_string().contains("--baseline-server-bin"),
            "{extra:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_rate_is_shared_between_the_client_threads() {
    let json = run(&[
        "direct",
        "--duration",
        "1",
        "--clients",
        "4",
        "--threads",
        "2",
        "--rate",
        "200",
    ])
    .await;
    assert_eq!(json["client_threads"], 2);
    // 200 a second over all threads: each thread offers half, so about 200 in the second.
    // Each thread offering the whole rate would send about 400.
    let sent = json["sent"].as_u64().unwrap();
    assert!((1..=300).contains(&sent), "{json:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn no_baseline_skips_it() {
    let argv = [
        "tern-bench",
        "direct",
        "--duration",
        "1",
        "--clients",
        "2",
        "--no-baseline",
        "--server",
        "in-process",
    ];
    let cli = Cli::try_parse_from(argv).unwrap();
    let outcome = tern_bench::run(&cli.common, &cli.scenario).await.unwrap();
    assert_eq!(outcome.json["lost"], 0);
    assert!(!outcome.json.contains_key("ratio_to_baseline"));
}

#[tokio::test(flavor = "current_thread")]
async fn group_fan_out() {
    let json = run(&["group", "--sizes", "2,5", "--messages", "5", "--rate", "50"]).await;
    assert_eq!(json["groups"][1]["complete"], 5);
    assert!(
        json["last_member_p99_ratio_to_baseline_5"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[tokio::test(flavor = "current_thread")]
async fn connections_and_storm() {
    // More offline users than one sender may start conversations with at once (200), so
    // the fill needs several senders.
    let outcome = run_with_plots(&["connections", "--clients", "320", "--settle", "0"]).await;
    // One chart for connecting and one for the storm, each tern's and the relay's.
    let charts: Vec<Vec<&str>> = outcome
        .plots
        .iter()
        .map(|plot| match plot {
            Plot::Latency { series, .. } => series.iter().map(|(name, _)| name.as_str()).collect(),
            Plot::Over { .. } => panic!("not a latency chart"),
        })
        .collect();
    assert_eq!(charts.len(), 2, "{charts:?}");
    assert!(charts[0][0].contains("connecting") && charts[0][1] == "relay-baseline: connecting");
    assert!(charts[1][0].contains("storm") && charts[1][1] == "relay-baseline: storm");
    let json = outcome.json;
    assert_eq!(json["send_errors"], 0, "{json:?}");
    assert_eq!(json["delivered"], 320);
    assert!(json["handshakes_ratio_to_baseline"].as_f64().unwrap() > 0.0);
    assert!(json["baseline_storm_secs"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "current_thread")]
async fn offline_sync() {
    let json = run(&["offline-sync", "--backlog", "300", "--runs", "1"]).await;
    assert_eq!(json["delivered"], 300);
    assert!(json["sync_ms_ratio_to_baseline"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "current_thread")]
async fn hol_both_modes() {
    let json = run(&[
        "hol",
        "--duration",
        "1",
        "--loss",
        "0",
        "--delay-ms",
        "1",
        "--bulk-size",
        "4096",
    ])
    .await;
    assert!(json["p99_ms_single_stream"].as_f64().unwrap() > 0.0);
    assert!(json["bulk_ratio_to_baseline"].as_f64().unwrap() > 0.0);
}

#[tokio::test(flavor = "current_thread")]
async fn migration() {
    let json = run(&[
        "migration",
        "--duration",
        "1",
        "--clients",
        "4",
        "--migrate-every-ms",
        "200",
    ])
    .await;
    assert!(json["migrations"].as_u64().unwrap() > 0);
    // The same traffic and rebinds against the relay baseline, for the ratios.
    assert!(json["baseline_migrations"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "current_thread")]
async fn soak_and_report() {
    let argv = [
        "tern-bench",
        "soak",
        "--duration",
        "1",
        "--clients",
        "4",
        "--server",
        "in-process",
    ];
    let cli = Cli::try_parse_from(argv).unwrap();
    let outcome = tern_bench::run(&cli.common, &cli.scenario).await.unwrap();
    assert_eq!(outcome.json["lost"], 0);
    assert_eq!(outcome.json["duplicated"], 0);
    assert_baseline(&outcome.json);
    let dir = tempfile::tempdir().unwrap();
    let path = tern_bench::report::write(dir.path(), &outcome).unwrap();
    let html = std::fs::read_to_string(path).unwrap();
    assert!(html.contains("<svg") && html.contains("<polyline"));
}
