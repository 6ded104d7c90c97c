//! `peer-tokio-tungstenite-broadcast`: a broadcast (fan-out) server on `tokio-tungstenite` 0.30.
//!
//! The plain fan-out protocol of `gale-loadgen fanout --protocol plain`: connections to `/sub`
//! receive every message that any connection to `/pub` sends. Built the usual tokio way: one
//! `tokio::sync::broadcast` channel holds each published message once (`Arc`-shared bytes, so
//! the message is framed per subscriber by tungstenite but never copied before), and every
//! subscriber has a task that receives from the channel and writes to its socket. A subscriber
//! that falls more than 4096 messages behind skips the ones it missed (the channel's lag), as
//! tokio's own examples do.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use gale_peers::{Args, MAX_MESSAGE};
use tokio::net::TcpStream;
use tokio::sync::broadcast::{self, Sender, error::RecvError};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn main() -> std::io::Result<()> {
    let (tx, _) = broadcast::channel::<Message>(4096);
    gale_peers::serve_tokio("tokio-tungstenite-broadcast", Args::parse(), move |stream| {
        handle(stream, tx.clone())
    })
}

// The handshake callback's error type (an HTTP response) is tungstenite's, not ours.
#[allow(clippy::result_large_err)]
async fn handle(stream: TcpStream, tx: Sender<Message>) {
    let config =
        WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
    let mut path = String::new();
    let callback = |req: &Request, resp: Response| {
        path = req.uri().path().to_string();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await else {
        return;
    };
    let (mut write, mut read) = ws.split();
    if path == "/pub" {
        while let Some(Ok(msg)) = read.next().await {
            if msg.is_text() || msg.is_binary() {
                // No subscribers is not an error for a broadcast.
                let _ = tx.send(msg);
            }
        }
        return;
    }
    let mut rx = tx.subscribe();
    // Read (and answer control frames) while forwarding, so a closing client is noticed.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
    loop {
        match rx.recv().await {
            Ok(msg) => {
                if write.send(msg).await.is_err() {
                    break;
                }
            }
            Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => break,
        }
    }
    reader.abort();
    let _ = write.send(Message::Close(None)).await;
}
