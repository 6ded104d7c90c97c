//! The connection to Redis: how it is made, and how its errors are told apart.

use std::time::Duration;

use super::super::protocol::CommandError;

/// How long a Redis command may take before the broker counts Redis as unreachable.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection for commands, whose every command times out after [`COMMAND_TIMEOUT`].
pub(super) fn command_connection(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let cmd = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
    cmd.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    cmd.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(cmd)
}

/// An error Redis answered, as one line: its code and what it said.
pub(super) fn server_reason(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// Whether Redis refused for a while rather than for good (loading its data, busy with a
/// script, a replica or a primary without its replicas, out of memory): worth a retry, so 503.
pub(super) fn is_transient(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "READONLY" | "MASTERDOWN" | "OOM" | "NOREPLICAS" | "TRYAGAIN")
    )
}

/// Whether the connection to Redis is gone (and must be made again), as opposed to Redis
/// answering one command with an error.
pub(super) fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// The answer to a request that failed on a Redis error: 503 when Redis is unreachable or
/// refuses for a while, else 500 with what Redis said.
pub(super) fn redis_failed(e: &redis::RedisError) -> CommandError {
    if connection_lost(e) || is_transient(e) {
        unavailable(&server_reason(e))
    } else {
        CommandError::new(500, format!("Redis refused: {}", server_reason(e)))
    }
}

/// A request refused because Redis could not be used.
pub(super) fn unavailable(why: &str) -> CommandError {
    CommandError::new(503, format!("the broker is unavailable: {why}"))
}
