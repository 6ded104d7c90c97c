//! `peer-fastwebsockets`: an echo server on `fastwebsockets` 0.10 (features `upgrade`, `simd`).
//!
//! Built as its `echo_server` example builds one: hyper 1 serves HTTP/1.1 on each accepted
//! connection, `upgrade::upgrade` answers the handshake, and the upgraded socket is echoed in its
//! own task (under `tokio::task::unconstrained`, as in the example) through a `FragmentCollector`,
//! so fragmented messages come back whole, one frame per message. `write_frame` writes each frame
//! at once (vectored). `auto_pong` and `auto_close` are set (they are the defaults). `simd` makes it
//! validate text with simdutf8; masking is its own word-at-a-time loop. The runtime is tokio
//! multi-thread with `--threads` workers.

use clap::Parser;
use fastwebsockets::upgrade::{self, UpgradeFut};
use fastwebsockets::{FragmentCollector, OpCode, WebSocketError};
use gale_peers::{Args, MAX_MESSAGE};
use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

fn main() -> std::io::Result<()> {
    gale_peers::serve_tokio("fastwebsockets", Args::parse(), |stream| async move {
        let io = TokioIo::new(stream);
        // A failed handshake or a reset ends the connection.
        let _ = http1::Builder::new().serve_connection(io, service_fn(upgrade_request)).with_upgrades().await;
    })
}

async fn upgrade_request(mut request: Request<Incoming>) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(tokio::task::unconstrained(async move {
        // A protocol error or a reset ends the connection; there is nothing else to do with it.
        let _ = echo(upgraded).await;
    }));
    Ok(response)
}

async fn echo(upgraded: UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = upgraded.await?;
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    // Its check is `len >= max`, so allow one more byte to accept exactly 16 MiB like the others.
    ws.set_max_message_size(MAX_MESSAGE + 1);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
}
