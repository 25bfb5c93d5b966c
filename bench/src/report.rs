//! `--report DIR`: one self-contained HTML page with SVG charts, and the run's JSON.
//!
//! Latency is drawn as a percentile curve (the usual HdrHistogram plot): the x axis is
//! logarithmic in 1/(1 − q), so the tail from p90 to p99.99 gets as much room as the body.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use hdrhistogram::Histogram;

use crate::output::{Outcome, Plot};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 360.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_BOTTOM: f64 = 40.0;
const MARGIN_TOP: f64 = 30.0;
const MARGIN_RIGHT: f64 = 20.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
/// Decades of 1/(1 − q) on the x axis: up to p99.99.
const DECADES: f64 = 4.0;

/// Writes `DIR/report.html` and `DIR/result.json`; returns the HTML path.
pub fn write(dir: &Path, outcome: &Outcome) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let scenario = outcome
        .json
        .get("scenario")
        .and_then(|s| s.as_str())
        .unwrap_or("run");
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tern-bench {scenario}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}\
         svg{{border:1px solid #ddd;margin:1em 0}}</style></head><body><h1>tern-bench {scenario}</h1>"
    );
    for plot in &outcome.plots {
        html.push_str(&svg(plot));
    }
    html.push_str("<h2>Result</h2><table>");
    for (key, value) in &outcome.json {
        let _ = write!(
            html,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(key),
            escape(&value.to_string())
        );
    }
    html.push_str("</table></body></html>\n");
    let path = dir.join("report.html");
    std::fs::write(&path, html)?;
    std::fs::write(
        dir.join("result.json"),
        serde_json::to_string_pretty(&outcome.json)?,
    )?;
    Ok(path)
}

/// One chart as an inline SVG element.
pub fn svg(plot: &Plot) -> String {
    let (title, x_label, y_label, series) = match plot {
        Plot::Latency { title, series } => {
            let lines = series
                .iter()
                .map(|(name, hist)| (name.clone(), percentile_curve(hist)))
                .collect::<Vec<_>>();
            (title.as_str(), "percentile", "latency (ms)", lines)
        }
        Plot::Over {
            title,
            unit,
            series,
        } => (title.as_str(), "seconds", unit.as_str(), series.clone()),
    };
    let is_latency = matches!(plot, Plot::Latency { .. });
    let points = series.iter().flat_map(|(_, p)| p.iter());
    let x_max = points
        .clone()
        .map(|p| p.0)
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let y_max = nice(points.map(|p| p.1).fold(0.0_f64, f64::max));
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let x_max = if is_latency { DECADES } else { x_max };
    let sx = |x: f64| MARGIN_LEFT + x / x_max * plot_w;
    let sy = |y: f64| MARGIN_TOP + plot_h - y / y_max * plot_h;
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-size=\"12\"><text x=\"{}\" y=\"18\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        MARGIN_LEFT,
        escape(title)
    );
    // Axes, grid and tick labels.
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        let _ = write!(
            out,
            "<line x1=\"{MARGIN_LEFT}\" x2=\"{0}\" y1=\"{1:.1}\" y2=\"{1:.1}\" stroke=\"#eee\"/>\
             <text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>",
            WIDTH - MARGIN_RIGHT,
            sy(y),
            MARGIN_LEFT - 6.0,
            sy(y) + 4.0,
            label(y)
        );
    }
    let ticks: Vec<(f64, String)> = if is_latency {
        ["p0", "p90", "p99", "p99.9", "p99.99"]
            .iter()
            .enumerate()
            .map(|(i, l)| (i as f64, (*l).to_owned()))
            .collect()
    } else {
        (0..=4)
            .map(|i| {
                let x = x_max * f64::from(i) / 4.0;
                (x, label(x))
            })
            .collect()
    };
    for (x, text) in ticks {
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            sx(x),
            HEIGHT - MARGIN_BOTTOM + 16.0,
            text
        );
    }
    let _ = write!(
        out,
        "<rect x=\"{MARGIN_LEFT}\" y=\"{MARGIN_TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" \
         fill=\"none\" stroke=\"#888\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{x_label}</text>\
         <text x=\"14\" y=\"{:.1}\" transform=\"rotate(-90 14 {:.1})\" text-anchor=\"middle\">{}</text>",
        MARGIN_LEFT + plot_w / 2.0,
        HEIGHT - 6.0,
        MARGIN_TOP + plot_h / 2.0,
        MARGIN_TOP + plot_h / 2.0,
        escape(y_label)
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\
             <rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            path.join(" "),
            MARGIN_LEFT + 10.0,
            MARGIN_TOP + 8.0 + 16.0 * i as f64,
            MARGIN_LEFT + 24.0,
            MARGIN_TOP + 17.0 + 16.0 * i as f64,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// (log10(1/(1 − q)), latency ms) from p0 to p99.99.
fn percentile_curve(hist: &Histogram<u64>) -> Vec<(f64, f64)> {
    if hist.is_empty() {
        return Vec::new();
    }
    (0..=200)
        .map(|i| {
            let x = DECADES * f64::from(i) / 200.0;
            let q = 1.0 - 10f64.powf(-x);
            (x, hist.value_at_quantile(q) as f64 / 1000.0)
        })
        .collect()
}

/// A round axis maximum at or above `max`.
fn nice(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * magnitude)
}

fn label(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
