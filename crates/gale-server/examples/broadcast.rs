//! A broadcast server on Gale's pub/sub: connections to `/sub` subscribe to one topic, and
//! every message a connection to `/pub` sends is published to it. This is the plain fan-out
//! protocol of `gale-loadgen fanout --protocol plain`, so it runs side by side with the peers
//! in `benches/peers` (same command line: `--port P --threads N`, and `--backend
//! epoll|uring|auto`, and `--uring-send-zc BYTES` to make io_uring's sends from that size up
//! zero-copy; one `broadcast listening on ws://…` line once it accepts connections).
//!
//! ```text
//! cargo run --release -p gale-server --example broadcast -- --port 9001
//! ```

use std::io::Write;

use gale_server::{Accept, App, Behavior, Message, Reject, UpgradeRequest, WebSocket, WsHandler};

const TOPIC: &str = "all";

/// `/sub`: subscribe on open; messages from subscribers are ignored.
struct Subscriber;

impl WsHandler for Subscriber {
    type Data = ();

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        Ok(Accept::new(()))
    }

    fn open(&self, ws: &mut WebSocket<'_, ()>) {
        ws.subscribe(TOPIC);
    }

    fn message(&self, _ws: &mut WebSocket<'_, ()>, _msg: Message<'_>) {}
}

/// `/pub`: every message is published to all subscribers.
struct Publisher;

impl WsHandler for Publisher {
    type Data = ();

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        Ok(Accept::new(()))
    }

    fn message(&self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        ws.publish(TOPIC, msg, false);
    }
}

fn main() -> std::io::Result<()> {
    let mut port = 0u16;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut backend = gale_server::Backend::Auto;
    let mut send_zc = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad value for {arg}"));
        match arg.as_str() {
            "--port" => port = value.parse().map_err(|_| bad())?,
            "--threads" => threads = value.parse().map_err(|_| bad())?,
            "--backend" => backend = value.parse().map_err(|_| bad())?,
            "--uring-send-zc" => send_zc = value.parse().map_err(|_| bad())?,
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("unknown option {arg}"),
                ));
            }
        }
    }
    // Compression off and a 1 MiB backlog per subscriber, like the peers.
    let behavior = Behavior { max_payload: 16 << 20, ..Behavior::default() };
    let server = App::new()
        .threads(threads)
        .backend(backend)
        .uring_send_zc(send_zc)
        .ws("/sub", behavior.clone(), Subscriber)
        .ws("/pub", behavior, Publisher)
        .listen(("127.0.0.1", port))?;
    let addr = server.local_addr();
    let running = server.spawn()?;
    let mut out = std::io::stdout();
    writeln!(out, "broadcast listening on ws://{addr}")?;
    out.flush()?;
    running.join()
}
