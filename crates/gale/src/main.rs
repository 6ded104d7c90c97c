//! The `gale` command: `gale serve` (the push gateway, the default) and `gale echo` (the
//! standard testee for conformance suites and benchmarks).

mod echo;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Gale: a WebSocket server on per-core event loops.
#[derive(Parser)]
#[command(name = "gale", version, about, long_about = None)]
struct Cli {
    /// What to run; `serve` when left out.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The push gateway: topics over WebSocket, an HTTP publish API, and a demo page.
    Serve(serve::ServeArgs),
    /// Echo every text and binary message, on any path.
    Echo(echo::EchoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command.unwrap_or_else(|| Command::Serve(serve::ServeArgs::default())) {
        Command::Serve(args) => serve::run(args),
        Command::Echo(args) => echo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gale: {e}");
            ExitCode::FAILURE
        }
    }
}
