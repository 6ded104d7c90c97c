//! `gale-loadgen`: a load generator for WebSocket servers.

#[macro_use]
mod report;

mod cli;
mod common;
mod compare;
mod conn;
mod deflate;
mod engine;
mod payload;
mod plot;
mod procstat;
mod run;
mod scenario;
mod search;
mod servers;
mod target;
mod tls;

use std::process::ExitCode;

use clap::Parser;

/// How a run ended, for the exit status.
enum Outcome {
    /// Ran to the end.
    Done,
    /// Cut short by Ctrl-C (exit status 130, like a shell).
    Interrupted,
}

fn outcome(interrupted: bool) -> Outcome {
    if interrupted { Outcome::Interrupted } else { Outcome::Done }
}

/// The outcome of a rate search: it fails if no rate passed.
fn searched(r: Option<search::SearchReport>) -> Result<Outcome, String> {
    let r = r.ok_or("no --p99-target")?;
    match r.failure() {
        Some(what) => Err(what),
        None => Ok(outcome(r.interrupted)),
    }
}

/// Run a command; an error is the one line that says what failed.
fn run(command: &cli::Command) -> Result<Outcome, String> {
    match command {
        cli::Command::Echo(a) if a.search.p99_target.is_some() => searched(search::echo(a, true)?),
        cli::Command::Fanout(a) if a.search.p99_target.is_some() => searched(search::fanout(a, true)?),
        cli::Command::Echo(a) => {
            let r = scenario::echo::run(a, true)?;
            match scenario::echo::failure(&r) {
                Some(what) => Err(what),
                None => Ok(outcome(r.interrupted)),
            }
        }
        cli::Command::Connect(a) => {
            scenario::connect::run(a, a.worker.is_none()).map(|r| outcome(r.interrupted))
        }
        cli::Command::Fanout(a) => {
            let r = scenario::fanout::run(a, true)?;
            match scenario::fanout::failure(&r) {
                Some(what) => Err(what),
                None => Ok(outcome(r.interrupted)),
            }
        }
        cli::Command::Storm(a) => scenario::storm::run(a).map(outcome),
        cli::Command::Compare(a) => {
            let r = compare::run(a)?;
            for line in compare::markdown(&r).lines() {
                say!("{line}");
            }
            compare::write_outputs(&r, &a.json, &a.md, &a.plot)?;
            if let Some(what) = compare::failures(&r) {
                return Err(what);
            }
            Ok(outcome(run::interrupt_flag().is_ok_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))))
        }
    }
}

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    if cli.command.json_path().is_some_and(|p| p.as_os_str() == "-") {
        report::summary_to_stderr();
    }
    match run(&cli.command) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Interrupted) => ExitCode::from(130),
        Err(e) => {
            eprintln!("gale-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
