//! `peer-tokio-tungstenite`: an echo server on `tokio-tungstenite` 0.30 (tungstenite 0.30).
//!
//! Built as its `echo-server` example builds one: `accept_async` (here `accept_async_with_config`,
//! to set the 16 MiB limits) on each accepted `TcpStream`, then the stream is split and
//! `read.try_filter(text or binary).forward(write)`. `forward` feeds each message into the sink
//! and flushes only when no further message is ready, so pipelined messages leave in batches.
//! Pings are answered and closes acknowledged by tungstenite itself. The runtime is tokio
//! multi-thread with `--threads` workers.

use clap::Parser;
use futures_util::{StreamExt, TryStreamExt, future};
use gale_peers::{Args, MAX_MESSAGE};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn main() -> std::io::Result<()> {
    gale_peers::serve_tokio("tokio-tungstenite", Args::parse(), echo)
}

async fn echo(stream: TcpStream) {
    let config =
        WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (write, read) = ws.split();
    // A protocol error or a reset ends the connection; there is nothing else to do with it.
    let _ = read.try_filter(|msg| future::ready(msg.is_text() || msg.is_binary())).forward(write).await;
}
