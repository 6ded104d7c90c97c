//! Replays the saved inputs of the `command` fuzz target (`fuzz/regressions/command/`) and
//! hand-made inputs through the same checks the target runs: on stable Rust, without a
//! fuzzer, in every `cargo test`.

/// The gateway's client protocol, compiled in as the fuzz target compiles it.
#[allow(dead_code)]
#[path = "../src/serve/protocol.rs"]
mod protocol;

#[path = "../fuzz/checks/mod.rs"]
mod checks;

use checks::command::{Verdict, check};
use std::path::Path;

#[test]
fn saved_command_inputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/command");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).into_iter().flatten().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files {
        eprintln!("replaying {}", path.display());
        check(&std::fs::read(&path).unwrap());
    }
}

fn command(op: &str, topic_ok: Option<bool>) -> Verdict {
    Verdict::Command { op: op.into(), topic_ok }
}

#[test]
fn commands_of_every_kind() {
    let cases: [(&[u8], Verdict); 8] = [
        (br#"{"id":1,"op":"ping"}"#, command("ping", None)),
        (br#"{"id":"a\"b","op":"subscribe","topic":"chat:lobby","since":{"epoch":"x","seq":18446744073709551615}}"#, command("subscribe", Some(true))),
        (br#"{"op":"publish","topic":"a b","data":{"k":[1,2,"\u00e9"]}}"#, command("publish", Some(false))),
        (br#"{"id":[1,{"x":null}],"op":"unsubscribe","topic":""}"#, command("unsubscribe", Some(false))),
        (br#"{"op":"ping","extra":1}"#, Verdict::Refused),
        (br#"{"op":"ping","id":1,"id":2}"#, Verdict::Refused),
        (b"{\"op\":\"\xff\"}", Verdict::NotText),
        (b"", Verdict::Refused),
    ];
    for (kind, (message, want)) in cases.into_iter().enumerate() {
        let mut data = vec![kind as u8];
        data.extend_from_slice(message);
        assert_eq!(check(&data), want, "{}", String::from_utf8_lossy(message));
    }
}
