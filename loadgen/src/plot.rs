//! SVG plots of a comparison (plotters): throughput bars per server for every case, server CPU
//! per message, and latency percentile curves per case.

use std::path::Path;

use plotters::prelude::*;

use crate::compare::{CaseSummaries, CompareReport, LatencyMedians};

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Write `throughput.svg`, `cpu.svg` (echo, fanout), `sustainable.svg` (`--p99-target`) and
/// `latency-N.svg` into `dir`.
pub fn write_plots(r: &CompareReport, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let unit = match r.scenario.as_str() {
        "connect" => "connections/s",
        "fanout" => "deliveries/s",
        _ => "messages/s",
    };
    bars(r, &dir.join("throughput.svg"), unit, |s| Some(s.rate)).map_err(|e| format!("plot: {e}"))?;
    if let Some(ms) = r.p99_target_ms {
        let unit = if r.scenario == "fanout" { "publishes/s" } else { "messages/s" };
        let what = format!("sustainable {unit} at p99 ≤ {ms} ms");
        bars(r, &dir.join("sustainable.svg"), &what, |s| s.sustainable_rate)
            .map_err(|e| format!("plot: {e}"))?;
    }
    if r.scenario != "connect" {
        let what = if r.scenario == "fanout" { "deliveries" } else { "messages" };
        bars(r, &dir.join("cpu.svg"), &format!("server CPU ms per 1,000 {what}"), |s| s.cpu_ms_per_1k)
            .map_err(|e| format!("plot: {e}"))?;
    }
    for (i, _) in r.cases.iter().enumerate() {
        latency(r, i, &dir.join(format!("latency-{}.svg", i + 1))).map_err(|e| format!("plot: {e}"))?;
    }
    Ok(())
}

fn short(case: &crate::compare::Case, scenario: &str) -> String {
    if scenario == "connect" {
        format!("{} conns", case.connections)
    } else if scenario == "fanout" {
        format!("{} subs {}/s", case.connections, case.rate)
    } else {
        format!("{}c {}B p{}", case.connections, case.size, case.pipeline)
    }
}

/// Axis labels that fit and read at a glance: 100000 -> "100k", 1234567 -> "1.23M",
/// 1500 -> "1.5k", 0.25 -> "0.25" (at most three significant digits, no trailing zeros).
fn short_number(v: f64) -> String {
    let (scaled, suffix) = match v.abs() {
        a if a >= 999_500.0 => (v / 1e6, "M"),
        a if a >= 999.5 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let decimals = match scaled.abs() {
        a if a >= 99.95 => 0,
        a if a >= 9.995 => 1,
        _ => 2,
    };
    let text = format!("{scaled:.decimals$}");
    let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    format!("{text}{suffix}")
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars: one group per case, one bar per server.
fn bars(
    r: &CompareReport,
    path: &Path,
    what: &str,
    value: impl Fn(&crate::compare::Summary) -> Option<f64>,
) -> PlotResult {
    let n_cases = r.cases.len().max(1);
    let n_servers = r.servers.len().max(1);
    let max =
        r.cases.iter().flat_map(|c| c.summaries.iter().filter_map(&value)).fold(0.0f64, f64::max).max(1e-9);
    let width = (220 * n_cases as u32).clamp(640, 2400);
    let root = SVGBackend::new(path, (width, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{} — median of {} rounds", what, r.rounds), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..n_cases as f64, 0f64..max * 1.15)?;
    let labels: Vec<String> = r.cases.iter().map(|c| short(&c.case, &r.scenario)).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n_cases * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| short_number(*v))
        .y_desc(what)
        .draw()?;
    let bar = 0.8 / n_servers as f64;
    for (j, server) in r.servers.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let rects: Vec<Rectangle<(f64, f64)>> = r
            .cases
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let v = value(c.summaries.get(j)?)?;
                let x0 = i as f64 + 0.1 + j as f64 * bar;
                Some(Rectangle::new([(x0, 0.0), (x0 + bar * 0.9, v)], color.filled()))
            })
            .collect();
        chart
            .draw_series(rects)?
            .label(server.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).draw()?;
    root.present()?;
    Ok(())
}

/// Latency percentiles of one case: one line per server, log scale.
fn latency(r: &CompareReport, index: usize, path: &Path) -> PlotResult {
    let CaseSummaries { case, summaries: sums } = &r.cases[index];
    let names = LatencyMedians::NAMES;
    let max = sums.iter().flat_map(|s| s.latency_us.values()).max().unwrap_or(1).max(10) as f64;
    let root = SVGBackend::new(path, (720, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let title =
        format!("{} — round-trip latency (µs, median of {} rounds)", case.title(&r.scenario), r.rounds);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(-0.2f64..4.2f64, (1f64..max * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            names
                .get(x.round() as usize)
                .filter(|_| (x - x.round()).abs() < 0.01)
                .map_or(String::new(), |s| s.to_string())
        })
        .y_label_formatter(&|v| short_number(*v))
        .y_desc("latency µs")
        .draw()?;
    for (j, s) in sums.iter().enumerate() {
        if s.rounds == 0 {
            continue;
        }
        let color = COLORS[j % COLORS.len()];
        let points: Vec<(f64, f64)> =
            s.latency_us.values().iter().enumerate().map(|(i, v)| (i as f64, (*v).max(1) as f64)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(s.server.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.9)).draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::short_number;

    #[test]
    fn axis_numbers_are_short() {
        let cases = [
            (100_000.0, "100k"),
            (1_200_000.0, "1.2M"),
            (1_234_567.0, "1.23M"),
            (1_500.0, "1.5k"),
            (20_000.0, "20k"),
            (999_999.0, "1M"),
            (250.0, "250"),
            (12.5, "12.5"),
            (1.0, "1"),
            (0.25, "0.25"),
            (0.0, "0"),
        ];
        for (v, text) in cases {
            assert_eq!(short_number(v), text, "{v}");
        }
    }
}
