//! Rate search (`--p99-target`): the highest sustained rate whose p99 latency stays under a
//! target, found the way wrk2 and tcpkali users find it by hand. Short open-loop steps at
//! rising rates: double from the start rate until a step fails, then bisect between the
//! highest passing and the lowest failing rate until they are within `--precision`. A step
//! fails if its p99 is over the target, if the rate achieved falls short of the rate asked by
//! more than `--rate-tolerance`, or if anything was lost (the scenario's own checks).
//!
//! [`search`] holds the strategy and takes the measurement as a function, so that it is tested
//! without a server; [`echo`] and [`fanout`] measure a step with the scenarios' own runs.

use serde::Serialize;

use crate::cli::{EchoArgs, FanoutArgs, SearchArgs};
use crate::report::{EchoReport, FanoutReport, Latency, group};

/// Echo's start rate when neither `--start-rate` nor `--rate` gives one, messages/s.
pub const ECHO_START_RATE: f64 = 1000.0;

/// The bounds and judgement of a search, checked.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Limits {
    /// A step passes if its p99 is at most this, milliseconds.
    pub p99_target_ms: f64,
    /// The first rate tried.
    pub start_rate: f64,
    /// No rate above this is tried.
    pub max_rate: f64,
    /// No more steps than this.
    pub max_steps: usize,
    /// Bisection ends when (lowest failing − highest passing) ÷ highest passing is at most this
    /// (a fraction: 0.05 = 5 %).
    pub precision: f64,
    /// A step fails if its achieved rate is below the asked rate by more than this fraction.
    pub rate_tolerance: f64,
    /// Seconds measured per step (after the scenario's warm-up).
    pub step_duration_s: f64,
}

impl Limits {
    /// The limits `--p99-target` and its companions ask for, with `start_rate` when
    /// `--start-rate` is not given; `None` without `--p99-target`. Errors name the option.
    pub fn of(a: &SearchArgs, start_rate: f64) -> Result<Option<Limits>, String> {
        let Some(target) = a.p99_target else { return Ok(None) };
        if !(target > 0.0 && target.is_finite()) {
            return Err(format!("--p99-target must be a positive number of milliseconds, not {target}"));
        }
        let start = a.start_rate.unwrap_or(start_rate);
        if !(start > 0.0 && start.is_finite()) {
            return Err(format!("--start-rate must be a positive rate per second, not {start}"));
        }
        if !(a.max_rate >= start && a.max_rate.is_finite()) {
            return Err(format!("--max-rate {} is below the start rate {start}", a.max_rate));
        }
        if a.max_steps == 0 {
            return Err("--max-steps must be at least 1".into());
        }
        if !(a.precision > 0.0 && a.precision < 100.0) {
            return Err(format!(
                "--precision must be a percentage above 0 and below 100, not {}",
                a.precision
            ));
        }
        if !(a.rate_tolerance >= 0.0 && a.rate_tolerance < 100.0) {
            return Err(format!(
                "--rate-tolerance must be a percentage from 0 to below 100, not {}",
                a.rate_tolerance
            ));
        }
        if !(a.step_duration > 0.0 && a.step_duration.is_finite()) {
            return Err(format!(
                "--step-duration must be a positive number of seconds, not {}",
                a.step_duration
            ));
        }
        Ok(Some(Limits {
            p99_target_ms: target,
            start_rate: start,
            max_rate: a.max_rate,
            max_steps: a.max_steps,
            precision: a.precision / 100.0,
            rate_tolerance: a.rate_tolerance / 100.0,
            step_duration_s: a.step_duration,
        }))
    }
}

/// What one step measured, before it is judged; in the JSON report, a step's figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Measured {
    /// The rate the load generator kept, in the unit of the asked rate.
    pub achieved: f64,
    /// Messages (echo) or deliveries (fanout) per second.
    pub throughput: f64,
    /// Latency of the step, microseconds.
    #[serde(rename = "latency_us")]
    pub latency: Latency,
    /// What the scenario's own checks found wrong (lost or wrong messages, lost connections):
    /// the step's `why` once judged.
    #[serde(skip)]
    pub problem: Option<String>,
    /// Server CPU ms per 1,000 messages or deliveries, with a server PID.
    pub cpu_ms_per_1k: Option<f64>,
    /// Server RSS at the end, bytes, with a server PID.
    pub rss_bytes: Option<u64>,
    /// Load-generator CPU use (1.0 = every client thread busy).
    pub loadgen_utilisation: f64,
    /// Ctrl-C cut the step short: it is not judged and the search stops.
    #[serde(skip)]
    pub interrupted: bool,
}

/// One step of a search, judged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    /// The rate asked for.
    pub rate: f64,
    /// What it measured (the rate kept, throughput, latency, server and load-generator cost).
    #[serde(flatten)]
    pub measured: Measured,
    /// Whether the step passed.
    pub pass: bool,
    /// Why it failed.
    pub why: Option<String>,
}

/// Why a search ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The highest passing and lowest failing rates are within the precision.
    Bracketed,
    /// The maximum rate passed.
    MaxRate,
    /// The step budget ran out.
    MaxSteps,
    /// The start rate failed.
    LowestFailed,
    /// Ctrl-C.
    Interrupted,
}

impl Stop {
    /// In words, for the summary.
    fn words(self, l: &Limits) -> String {
        match self {
            Stop::Bracketed => format!("bracketed within {} %", l.precision * 100.0),
            Stop::MaxRate => format!("reached --max-rate {}", group(l.max_rate)),
            Stop::MaxSteps => format!("reached --max-steps {}", l.max_steps),
            Stop::LowestFailed => "the start rate failed".into(),
            Stop::Interrupted => "interrupted".into(),
        }
    }
}

/// The outcome of a search.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    /// Every step, in the order run.
    pub steps: Vec<Step>,
    /// The highest passing rate (`null`: none passed).
    pub sustainable_rate: Option<f64>,
    /// The step at that rate.
    pub best: Option<Step>,
    /// The lowest failing rate above it (`null`: none failed above it).
    pub lowest_failing_rate: Option<f64>,
    /// Why the search ended.
    pub stopped: Stop,
}

/// Judge a step: `None` if it passed, else why it failed.
pub fn judge(l: &Limits, rate: f64, m: &Measured) -> Option<String> {
    let mut why = Vec::new();
    let target_us = l.p99_target_ms * 1000.0;
    if m.latency.count == 0 {
        why.push("nothing measured".to_string());
    } else if m.latency.p99 as f64 > target_us {
        why.push(format!("p99 {} µs > {} µs", group(m.latency.p99 as f64), group(target_us)));
    }
    if m.achieved < rate * (1.0 - l.rate_tolerance) {
        why.push(format!(
            "rate not kept: {} achieved, {:.0} % short",
            group(m.achieved),
            (1.0 - m.achieved / rate) * 100.0
        ));
    }
    if let Some(p) = &m.problem {
        why.push(p.clone());
    }
    (!why.is_empty()).then(|| why.join("; "))
}

/// Run a search: `measure` runs one step at the rate given; `on_step` sees each step once
/// judged (1-based number). An error from `measure` (the server cannot be reached) ends it.
pub fn search(
    l: &Limits,
    mut measure: impl FnMut(f64) -> Result<Measured, String>,
    mut on_step: impl FnMut(usize, &Step),
) -> Result<Outcome, String> {
    let mut steps: Vec<Step> = Vec::new();
    // Indices into `steps`: the highest passing step, the lowest failing rate above it.
    let mut best: Option<usize> = None;
    let mut failing: Option<f64> = None;
    let mut rate = l.start_rate;
    let stopped = loop {
        if steps.len() >= l.max_steps {
            break Stop::MaxSteps;
        }
        let m = measure(rate)?;
        if m.interrupted {
            break Stop::Interrupted;
        }
        let why = judge(l, rate, &m);
        let step = Step { rate, measured: m, pass: why.is_none(), why };
        on_step(steps.len() + 1, &step);
        if step.pass {
            best = Some(steps.len());
        } else {
            failing = Some(failing.map_or(rate, |f: f64| f.min(rate)));
        }
        steps.push(step);
        let Some(b) = best else { break Stop::LowestFailed };
        let low = steps[b].rate;
        rate = match failing {
            // Still bracketing: double, up to the bound.
            None if low >= l.max_rate => break Stop::MaxRate,
            None => (low * 2.0).min(l.max_rate),
            Some(high) => {
                if (high - low) / low <= l.precision {
                    break Stop::Bracketed;
                }
                // Whole rates, unless the bracket is too narrow for them.
                let mid = (low + high) / 2.0;
                let rounded = mid.round();
                if rounded > low && rounded < high { rounded } else { mid }
            }
        };
    };
    let best = best.map(|i| steps[i].clone());
    Ok(Outcome {
        sustainable_rate: best.as_ref().map(|s| s.rate),
        lowest_failing_rate: failing,
        best,
        steps,
        stopped,
    })
}

/// The report of a search run from `echo` or `fanout` (and in `compare` runs).
#[derive(Clone, Debug, Serialize)]
pub struct SearchReport {
    /// "echo" or "fanout".
    pub scenario: String,
    /// Always "rate_search": tells this report from a plain run's.
    pub mode: String,
    /// Server URL(s).
    pub url: String,
    /// Connections (echo) or subscribers (fanout) asked for.
    pub connections: usize,
    /// Message size, bytes.
    pub size: usize,
    /// The unit of the rates: "msg/s" (echo) or "publishes/s" (fanout).
    pub unit: String,
    /// The limits the search ran with.
    pub limits: Limits,
    /// Seconds of warm-up before each step's measurement.
    pub warmup_s: f64,
    /// The search.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Ctrl-C stopped the search.
    pub interrupted: bool,
}

impl SearchReport {
    /// The one line that fails the run, if the search found no passing rate.
    pub fn failure(&self) -> Option<String> {
        if self.outcome.best.is_some() || self.interrupted {
            return None;
        }
        let first = self.outcome.steps.first();
        Some(format!(
            "even the start rate fails: {} {} with p99 target {} ms: {}",
            group(self.limits.start_rate),
            self.unit,
            self.limits.p99_target_ms,
            first.and_then(|s| s.why.as_deref()).unwrap_or("no step ran")
        ))
    }
}

/// Print the heading of a search.
fn print_heading(what: &str, l: &Limits, unit: &str) {
    say!(
        "rate search: {what}, p99 ≤ {} ms, from {} {unit}, steps of {} s (at most {}, up to {} {unit})",
        l.p99_target_ms,
        group(l.start_rate),
        l.step_duration_s,
        l.max_steps,
        group(l.max_rate)
    );
}

/// Print a step as it ends.
fn print_step(n: usize, s: &Step, unit: &str) {
    let verdict = match &s.why {
        None => "pass".to_string(),
        Some(why) => format!("FAIL ({why})"),
    };
    say!(
        "  step {n}: {} {unit} asked, {} achieved, p50 {} µs, p99 {} µs: {verdict}",
        group(s.rate),
        group(s.measured.achieved),
        group(s.measured.latency.p50 as f64),
        group(s.measured.latency.p99 as f64)
    );
}

/// Print the result of a search.
pub fn print_result(r: &SearchReport) {
    let o = &r.outcome;
    let how = o.stopped.words(&r.limits);
    match &o.best {
        Some(b) => {
            let above =
                o.lowest_failing_rate.map_or(String::new(), |f| format!("; {} {} failed", group(f), r.unit));
            let through = if r.scenario == "fanout" { "deliveries/s" } else { "echoes/s" };
            say!(
                "  sustainable: {} {} (p50 {} µs, p99 {} µs, p99.9 {} µs, {} {through}) — {how}{above}",
                group(b.rate),
                r.unit,
                group(b.measured.latency.p50 as f64),
                group(b.measured.latency.p99 as f64),
                group(b.measured.latency.p999 as f64),
                group(b.measured.throughput)
            );
        }
        None => say!("  no rate passed — {how}"),
    }
    if r.interrupted {
        say!("  (interrupted: partial results)");
    }
}

/// Run a search, printing as it goes when `print`.
fn run_search(
    l: &Limits,
    print: bool,
    unit: &str,
    heading: String,
    measure: impl FnMut(f64) -> Result<Measured, String>,
) -> Result<Outcome, String> {
    if print {
        print_heading(&heading, l, unit);
    }
    search(l, measure, |n, s| {
        if print {
            print_step(n, s, unit);
        }
    })
}

/// What an echo step measured.
fn echo_measured(r: &EchoReport) -> Measured {
    let mut problems: Vec<String> = crate::scenario::echo::failure(r).into_iter().collect();
    if r.failed > 0 {
        problems.push(format!("{} connections failed to open", r.failed));
    }
    let lost: u64 = r.lost.values().sum();
    if lost > 0 {
        problems.push(format!("{lost} connections lost"));
    }
    Measured {
        achieved: r.messages_per_sec,
        throughput: r.messages_per_sec,
        latency: r.latency_us.clone(),
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
        cpu_ms_per_1k: r.server.as_ref().and_then(|s| s.cpu_ms_per_1k_msgs),
        rss_bytes: r.server.as_ref().map(|s| s.rss_bytes),
        loadgen_utilisation: r.loadgen.utilisation,
        interrupted: r.interrupted,
    }
}

/// What a fan-out step measured: the rate kept is publishes per second.
fn fanout_measured(r: &FanoutReport) -> Measured {
    let mut problems: Vec<String> = crate::scenario::fanout::failure(r).into_iter().collect();
    if r.failed > 0 {
        problems.push(format!("{} subscribers failed to connect", r.failed));
    }
    Measured {
        achieved: r.published as f64 / r.duration_s.max(1e-9),
        throughput: r.deliveries_per_sec,
        latency: r.latency_us.clone(),
        problem: (!problems.is_empty()).then(|| problems.join("; ")),
        cpu_ms_per_1k: r.server.as_ref().and_then(|s| s.cpu_ms_per_1k_msgs),
        rss_bytes: r.server.as_ref().map(|s| s.rss_bytes),
        loadgen_utilisation: r.loadgen.utilisation,
        interrupted: r.interrupted,
    }
}

/// Search echo's open-loop rate (`echo --p99-target`); `None` without `--p99-target`.
pub fn echo(args: &EchoArgs, print: bool) -> Result<Option<SearchReport>, String> {
    let start = args.rate.unwrap_or(ECHO_START_RATE);
    let Some(l) = Limits::of(&args.search, start)? else { return Ok(None) };
    let c = &args.common;
    let heading = format!("echo {} — {} connections, {} B", c.url_label(), c.connections, args.size);
    let outcome = run_search(&l, print, "msg/s", heading, |rate| {
        let mut step = args.clone();
        step.search.p99_target = None;
        step.rate = Some(rate);
        step.common.duration = l.step_duration_s;
        step.common.json = None;
        crate::scenario::echo::run(&step, false).map(|r| echo_measured(&r))
    })?;
    let report = SearchReport {
        scenario: "echo".into(),
        mode: "rate_search".into(),
        url: c.url_label(),
        connections: c.connections,
        size: args.size,
        unit: "msg/s".into(),
        warmup_s: args.warmup,
        interrupted: outcome.stopped == Stop::Interrupted,
        limits: l,
        outcome,
    };
    if print {
        print_result(&report);
    }
    crate::common::write_json(&c.json, &report)?;
    Ok(Some(report))
}

/// Search fan-out's publish rate (`fanout --p99-target`); `None` without `--p99-target`.
pub fn fanout(args: &FanoutArgs, print: bool) -> Result<Option<SearchReport>, String> {
    let Some(l) = Limits::of(&args.search, args.rate)? else { return Ok(None) };
    let c = &args.common;
    let heading = format!("fanout {} — {} subscribers, {} B", c.url_label(), c.connections, args.size);
    let outcome = run_search(&l, print, "publishes/s", heading, |rate| {
        let mut step = args.clone();
        step.search.p99_target = None;
        step.rate = rate;
        step.common.duration = l.step_duration_s;
        step.common.json = None;
        crate::scenario::fanout::run(&step, false).map(|r| fanout_measured(&r))
    })?;
    let report = SearchReport {
        scenario: "fanout".into(),
        mode: "rate_search".into(),
        url: c.url_label(),
        connections: c.connections,
        size: args.size,
        unit: "publishes/s".into(),
        warmup_s: args.warmup,
        interrupted: outcome.stopped == Stop::Interrupted,
        limits: l,
        outcome,
    };
    if print {
        print_result(&report);
    }
    crate::common::write_json(&c.json, &report)?;
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            p99_target_ms: 5.0,
            start_rate: 1000.0,
            max_rate: 1_000_000.0,
            max_steps: 30,
            precision: 0.05,
            rate_tolerance: 0.05,
            step_duration_s: 1.0,
        }
    }

    /// A server that keeps up with `capacity` per second at p99 1 ms, and past it falls
    /// behind: the rate it keeps stays at `capacity` and the p99 grows to 50 ms.
    fn server(capacity: f64) -> impl FnMut(f64) -> Result<Measured, String> {
        move |rate| {
            let over = rate > capacity;
            let latency = Latency {
                p50: 300,
                p99: if over { 50_000 } else { 1_000 },
                count: rate as u64,
                ..Latency::default()
            };
            Ok(Measured {
                achieved: rate.min(capacity),
                throughput: rate.min(capacity),
                latency,
                ..Default::default()
            })
        }
    }

    fn rates(o: &Outcome) -> Vec<f64> {
        o.steps.iter().map(|s| s.rate).collect()
    }

    #[test]
    fn doubles_until_a_step_fails_then_bisects_to_the_precision() {
        let o = search(&limits(), server(37_000.0), |_, _| {}).unwrap();
        assert_eq!(&rates(&o)[..7], [1000.0, 2000.0, 4000.0, 8000.0, 16_000.0, 32_000.0, 64_000.0]);
        assert!(o.steps[..6].iter().all(|s| s.pass) && !o.steps[6].pass);
        // Bisection between 32,000 and 64,000.
        assert_eq!(rates(&o)[7], 48_000.0);
        assert_eq!(o.stopped, Stop::Bracketed);
        let (best, fail) = (o.sustainable_rate.unwrap(), o.lowest_failing_rate.unwrap());
        assert!(best <= 37_000.0 && fail > 37_000.0, "{best} {fail}");
        assert!((fail - best) / best <= 0.05, "{best} {fail}");
        assert_eq!(o.best.as_ref().unwrap().rate, best);
        // Every step at or below the capacity passed, every one above failed.
        for s in &o.steps {
            assert_eq!(s.pass, s.rate <= 37_000.0, "{s:?}");
        }
        // Doubling 7 steps, then ≤ log2(32,000 / 1,600) + 1 bisection steps.
        assert!(o.steps.len() <= 7 + 6, "{:?}", rates(&o));
    }

    #[test]
    fn a_step_fails_on_p99_on_the_rate_not_kept_or_on_losses() {
        let l = limits();
        let ok = Latency { p50: 100, p99: 5000, count: 10, ..Latency::default() };
        let m = Measured { achieved: 960.0, latency: ok.clone(), ..Default::default() };
        assert_eq!(judge(&l, 1000.0, &m), None, "p99 at the target and 4 % short pass");
        let slow = Measured { latency: Latency { p99: 5001, ..ok.clone() }, ..m.clone() };
        assert_eq!(judge(&l, 1000.0, &slow).as_deref(), Some("p99 5,001 µs > 5,000 µs"));
        let short = Measured { achieved: 900.0, ..m.clone() };
        assert_eq!(judge(&l, 1000.0, &short).as_deref(), Some("rate not kept: 900 achieved, 10 % short"));
        let lossy = Measured { problem: Some("12 of 3000 deliveries lost".into()), ..m.clone() };
        assert_eq!(judge(&l, 1000.0, &lossy).as_deref(), Some("12 of 3000 deliveries lost"));
        let nothing = Measured { achieved: 0.0, latency: Latency::default(), ..m };
        assert_eq!(
            judge(&l, 1000.0, &nothing).as_deref(),
            Some("nothing measured; rate not kept: 0 achieved, 100 % short")
        );
    }

    #[test]
    fn a_server_that_cannot_keep_the_rate_fails_even_with_a_low_p99() {
        // Low latency but only 20,000/s kept: the rate check catches it.
        let mut measure = |rate: f64| {
            let latency = Latency { p50: 100, p99: 200, count: 1, ..Latency::default() };
            Ok(Measured { achieved: rate.min(20_000.0), latency, ..Default::default() })
        };
        let o = search(&limits(), &mut measure, |_, _| {}).unwrap();
        assert_eq!(o.stopped, Stop::Bracketed);
        let best = o.sustainable_rate.unwrap();
        assert!((20_000.0 * 0.95 / 1.05..=20_000.0 / 0.95).contains(&best), "{best}");
    }

    #[test]
    fn the_search_stops_at_the_max_rate() {
        let l = Limits { max_rate: 5000.0, ..limits() };
        let o = search(&l, server(1e9), |_, _| {}).unwrap();
        assert_eq!(rates(&o), [1000.0, 2000.0, 4000.0, 5000.0]);
        assert_eq!(
            (o.stopped, o.sustainable_rate, o.lowest_failing_rate),
            (Stop::MaxRate, Some(5000.0), None)
        );
    }

    #[test]
    fn the_search_stops_at_the_max_steps() {
        let l = Limits { max_steps: 4, ..limits() };
        let mut seen = Vec::new();
        let o = search(&l, server(2500.0), |n, s| seen.push((n, s.rate, s.pass))).unwrap();
        assert_eq!(seen, [(1, 1000.0, true), (2, 2000.0, true), (3, 4000.0, false), (4, 3000.0, false)]);
        assert_eq!(
            (o.stopped, o.sustainable_rate, o.lowest_failing_rate),
            (Stop::MaxSteps, Some(2000.0), Some(3000.0))
        );
    }

    #[test]
    fn a_failing_start_rate_ends_the_search_with_nothing() {
        let o = search(&limits(), server(500.0), |_, _| {}).unwrap();
        assert_eq!(rates(&o), [1000.0]);
        assert_eq!((o.stopped, o.best, o.sustainable_rate), (Stop::LowestFailed, None, None));
    }

    #[test]
    fn narrow_brackets_still_terminate() {
        // A capacity of 1.3/s from a start of 1/s: halves of whole numbers are not whole.
        let l = Limits { start_rate: 1.0, precision: 0.01, ..limits() };
        let o = search(&l, server(1.3), |_, _| {}).unwrap();
        assert_eq!(o.stopped, Stop::Bracketed);
        let (best, fail) = (o.sustainable_rate.unwrap(), o.lowest_failing_rate.unwrap());
        assert!(best <= 1.3 && fail > 1.3 && (fail - best) / best <= 0.01, "{best} {fail}");
    }

    #[test]
    fn an_interrupted_or_failed_measurement_ends_the_search() {
        let mut n = 0;
        let o = search(
            &limits(),
            |rate| {
                n += 1;
                let mut m = server(1e9)(rate)?;
                m.interrupted = n == 3;
                Ok(m)
            },
            |_, _| {},
        )
        .unwrap();
        assert_eq!((o.stopped, o.steps.len(), o.sustainable_rate), (Stop::Interrupted, 2, Some(2000.0)));
        let e = search(&limits(), |_| Err("cannot reach ws://x/".to_string()), |_, _| {});
        assert_eq!(e, Err("cannot reach ws://x/".to_string()));
    }

    #[test]
    fn bad_limits_are_named() {
        let good = SearchArgs {
            p99_target: Some(5.0),
            start_rate: None,
            max_rate: 1e6,
            max_steps: 10,
            precision: 5.0,
            rate_tolerance: 5.0,
            step_duration: 1.0,
        };
        assert_eq!(Limits::of(&good, 100.0).unwrap().unwrap().start_rate, 100.0);
        assert_eq!(Limits::of(&SearchArgs { p99_target: None, ..good.clone() }, 100.0), Ok(None));
        let cases = [
            (SearchArgs { p99_target: Some(0.0), ..good.clone() }, "--p99-target"),
            (SearchArgs { p99_target: Some(f64::NAN), ..good.clone() }, "--p99-target"),
            (SearchArgs { start_rate: Some(-1.0), ..good.clone() }, "--start-rate"),
            (SearchArgs { max_rate: 50.0, ..good.clone() }, "--max-rate"),
            (SearchArgs { max_steps: 0, ..good.clone() }, "--max-steps"),
            (SearchArgs { precision: 0.0, ..good.clone() }, "--precision"),
            (SearchArgs { rate_tolerance: 100.0, ..good.clone() }, "--rate-tolerance"),
            (SearchArgs { step_duration: 0.0, ..good.clone() }, "--step-duration"),
        ];
        for (args, named) in cases {
            let e = Limits::of(&args, 100.0).unwrap_err();
            assert!(e.starts_with(named), "{e}");
        }
    }
}
