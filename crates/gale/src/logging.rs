//! Where and how `gale` logs: to stderr, filtered by `RUST_LOG` (default `info`), as text
//! (coloured only when stderr is a terminal) or as one JSON object per line.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// `--log-format` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured on a terminal, plain otherwise.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message` and the event's
    /// fields), for log shippers.
    Json,
}

/// Install the global subscriber that writes logs to stderr in `format`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(colour_stderr()).init(),
        // Fields at the top level, next to `message`: what shippers index without a mapping.
        LogFormat::Json => logs.json().flatten_event(true).with_ansi(false).init(),
    }
}

/// Colour codes only for a person reading a terminal: a file, a pipe, journald or a
/// container's log driver would store them as noise. `NO_COLOR` (non-empty) turns them off
/// there too.
fn colour_stderr() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    std::io::stderr().is_terminal() && !no_color
}
