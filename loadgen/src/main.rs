//! `gale-loadgen`: a load generator for WebSocket servers.

mod cli;
mod cmd_connect;
mod cmd_echo;
mod cmd_fanout;
mod common;
mod compare;
mod conn;
mod engine;
mod payload;
mod plot;
mod procstat;
mod report;
mod rng;
mod run;
mod scenario;
mod servers;
mod target;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match &cli.command {
        cli::Command::Echo(a) => cmd_echo::run(a, true).and_then(|r| {
            if r.mismatches > 0 {
                Err(format!("{} echoes did not match what was sent", r.mismatches))
            } else {
                Ok(())
            }
        }),
        cli::Command::Connect(a) => cmd_connect::run(a, a.worker.is_none()).map(|_| ()),
        cli::Command::Fanout(a) => cmd_fanout::run(a, true).and_then(|r| {
            if r.lost + r.duplicated > 0 {
                Err(format!("{} deliveries lost, {} duplicated", r.lost, r.duplicated))
            } else {
                Ok(())
            }
        }),
        cli::Command::Compare(a) => compare::run(a).and_then(|r| {
            print!("{}", compare::markdown(&r));
            compare::write_outputs(&r, &a.json, &a.md, &a.plot)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gale-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
