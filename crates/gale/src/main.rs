//! The `gale` command: `gale serve` (the push gateway, the default) and `gale echo` (the
//! standard testee for conformance suites and benchmarks).

mod echo;
mod logging;
mod serve;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Gale: a WebSocket server on per-core event loops.
#[derive(Parser)]
#[command(
    name = "gale",
    version,
    about,
    long_about = None,
    after_help = "Without a command, `gale` runs `gale serve` on its default configuration \
                  (the gateway on 127.0.0.1:9001); options of `serve` need the command: \
                  `gale serve --config FILE`."
)]
struct Cli {
    /// What to run; `serve` when left out.
    #[command(subcommand)]
    command: Option<Command>,
    /// Log lines as text (coloured only on a terminal) or as JSON objects, one per line.
    /// `RUST_LOG` filters them (default: info).
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text, value_name = "FORMAT")]
    log_format: logging::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// The push gateway: topics over WebSocket, an HTTP publish API, and a demo page (the
    /// default command).
    Serve(serve::ServeArgs),
    /// Echo every text and binary message, on any path.
    Echo(echo::EchoArgs),
}

/// "1 thread", "4 threads": how the start-up lines count event loops.
fn threads_phrase(n: usize) -> String {
    if n == 1 { "1 thread".into() } else { format!("{n} threads") }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
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
