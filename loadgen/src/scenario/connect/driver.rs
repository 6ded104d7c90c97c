//! The connect scenario's run phase: connections stay open and idle, optionally pinging.

use std::time::Duration;

use gale_frame::OpCode;

use crate::conn::{Failure, Io};
use crate::engine::{Cx, Driver};
use crate::payload::Kind;

/// Holds connections, pinging every `ping` if set.
pub struct Hold {
    /// Ping interval.
    pub ping: Option<Duration>,
    /// Pings sent.
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Messages the server sent unasked.
    pub messages: u64,
}

impl Driver for Hold {
    type State = ();

    fn on_start(&mut self, _io: &mut Io, _st: &mut (), _cx: &mut Cx) {}

    fn on_message(&mut self, _io: &mut Io, _st: &mut (), _kind: Kind, _payload: &[u8], _cx: &mut Cx) {
        self.messages += 1;
    }

    fn on_tick(&mut self, io: &mut Io, _st: &mut (), cx: &mut Cx) {
        io.frame(&mut cx.rng, OpCode::Ping, 0, |_| {});
        self.pings += 1;
    }

    fn tick(&self) -> Option<Duration> {
        self.ping
    }

    fn on_pong(&mut self, _st: &mut (), _cx: &mut Cx) {
        self.pongs += 1;
    }

    fn on_lost(&mut self, _st: &mut (), _why: &Failure, _cx: &mut Cx) {}
}
