//! Fuzz target `message_roundtrip`: messages built by `arbitrary`, fragmented, masked and
//! decoded in arbitrary read sizes, must come back unchanged; see `checks::roundtrip`.
//!
//! Regression files of this target hold a plan in the byte format of `checks::roundtrip`,
//! not the raw input `arbitrary` read (the regression test does not depend on `arbitrary`).
//! To turn a crash into a regression file, replay it with `GALE_FUZZ_SAVE_PLAN=<file>`:
//! `cargo +nightly fuzz run message_roundtrip <crash>` then writes its plan there.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::LazyLock;

/// The checks shared with the regression test; each target uses only its own.
#[allow(dead_code)]
#[path = "../checks/mod.rs"]
mod checks;

use checks::roundtrip::{Control, Cut, Data, Message, Plan};

/// Where to write each plan before checking it, read once rather than on every run.
static SAVE_PLAN: LazyLock<Option<PathBuf>> =
    LazyLock::new(|| std::env::var_os("GALE_FUZZ_SAVE_PLAN").map(PathBuf::from));

/// The messages to send, masking keys used in turn, and read sizes used in turn.
#[derive(Arbitrary, Debug)]
struct Input {
    keys: Vec<[u8; 4]>,
    reads: Vec<u16>,
    messages: Vec<ArbMessage>,
}

/// A message; a data message's payload is `chunk` followed by `repeat` more copies, so that
/// a small input can describe a message over 64 KiB.
#[derive(Arbitrary, Debug)]
enum ArbMessage {
    /// A text message.
    Text { chunk: String, repeat: u8, cuts: Vec<ArbCut> },
    /// A binary message.
    Binary { chunk: Vec<u8>, repeat: u8, cuts: Vec<ArbCut> },
    /// A ping on its own.
    Ping(Vec<u8>),
    /// A pong on its own.
    Pong(Vec<u8>),
}

/// The length of a non-final fragment and the control message that follows it, if any.
#[derive(Arbitrary, Debug)]
struct ArbCut {
    len: u16,
    control: Option<ArbControl>,
}

/// A ping or pong sent between two fragments.
#[derive(Arbitrary, Debug)]
enum ArbControl {
    /// A ping.
    Ping(Vec<u8>),
    /// A pong.
    Pong(Vec<u8>),
}

impl Input {
    /// The plan the checks run; its constructors bring every value into range.
    fn into_plan(self) -> Plan {
        let reads = self.reads.into_iter().map(|r| usize::from(r) + 1).collect();
        let messages = self.messages.into_iter().map(ArbMessage::into_message).collect();
        Plan::new(self.keys, reads, messages)
    }
}

impl ArbMessage {
    /// The checks' message, brought into range by its constructors.
    fn into_message(self) -> Message {
        let cuts = |cuts: Vec<ArbCut>| cuts.into_iter().map(ArbCut::into_cut).collect();
        match self {
            ArbMessage::Text { chunk, repeat, cuts: c } => {
                Message::Data(Data::new(true, chunk.into_bytes(), repeat.into(), cuts(c)))
            }
            ArbMessage::Binary { chunk, repeat, cuts: c } => {
                Message::Data(Data::new(false, chunk, repeat.into(), cuts(c)))
            }
            ArbMessage::Ping(p) => Message::Control(Control::new(false, p)),
            ArbMessage::Pong(p) => Message::Control(Control::new(true, p)),
        }
    }
}

impl ArbCut {
    /// The checks' cut.
    fn into_cut(self) -> Cut {
        let control = self.control.map(|c| match c {
            ArbControl::Ping(p) => Control::new(false, p),
            ArbControl::Pong(p) => Control::new(true, p),
        });
        Cut::new(self.len.into(), control)
    }
}

fuzz_target!(|input: Input| {
    let plan = input.into_plan();
    if let Some(path) = SAVE_PLAN.as_ref() {
        std::fs::write(path, plan.to_bytes()).expect("write the plan");
    }
    checks::roundtrip::check(&plan);
});
