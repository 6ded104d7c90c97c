//! The `gale` command: `gale echo` (the standard testee for conformance suites and
//! benchmarks).

mod echo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Gale: a WebSocket server on per-core event loops.
#[derive(Parser)]
#[command(name = "gale", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    let result = match cli.command {
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
