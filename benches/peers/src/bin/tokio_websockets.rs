//! `peer-tokio-websockets`: an echo server on `tokio-websockets` 0.13 (features `server`,
//! `sha1_smol`).
//!
//! Built as its README and `echo_server` example build one: `ServerBuilder::accept` on each
//! accepted `TcpStream` (under `tokio::task::unconstrained`, as in the example; outgoing frame size
//! unlimited so a message goes back as one frame), then `next()` / `send()` for every text or
//! binary message. `send` flushes after each message. Pings are answered and closes acknowledged by
//! the library. Masking is SIMD (AVX-512/AVX2/SSE2, chosen at run time) and UTF-8 validation uses
//! simdutf8, with no feature needed on x86_64. The runtime is tokio multi-thread with `--threads`
//! workers.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use gale_peers::{Args, MAX_MESSAGE};
use tokio::net::TcpStream;
use tokio_websockets::{Config, Error, Limits, ServerBuilder};

fn main() -> std::io::Result<()> {
    gale_peers::serve_tokio("tokio-websockets", Args::parse(), |stream| {
        tokio::task::unconstrained(async move {
            // A protocol error or a reset ends the connection; there is nothing else to do with it.
            let _ = echo(stream).await;
        })
    })
}

async fn echo(stream: TcpStream) -> Result<(), Error> {
    let (_request, mut ws) = ServerBuilder::new()
        .config(Config::default().frame_size(usize::MAX))
        .limits(Limits::default().max_payload_len(Some(MAX_MESSAGE)))
        .accept(stream)
        .await?;
    while let Some(msg) = ws.next().await {
        let msg = msg?;
        if msg.is_text() || msg.is_binary() {
            ws.send(msg).await?;
        }
    }
    Ok(())
}
