//! Property test: random messages, encoded as random fragmentations with control frames
//! between fragments, fed in random read sizes, come back identical.

mod common;

use common::{Owned, feed};
use gale_frame::{Decoder, DecoderConfig, FrameSpec, OpCode, append_frame};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        4 => any::<String>().prop_map(Msg::Text),
        1 => "[a-zé你🎉]{0,3000}".prop_map(Msg::Text),
        4 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Msg::Binary),
        1 => (0usize..70_000, any::<u8>()).prop_map(|(n, b)| Msg::Binary(vec![b; n])),
        1 => proptest::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
    ]
}

/// Encode `msgs`, splitting each data message at `cuts` (fractions) into fragments and putting
/// a ping between fragments when `interleave` says so.
fn encode(msgs: &[Msg], cuts: &[u16], keys: &[[u8; 4]], masked: bool, interleave: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut k = 0;
    let mut key = || {
        k += 1;
        masked.then(|| keys[k % keys.len()])
    };
    for (i, m) in msgs.iter().enumerate() {
        let (op, payload) = match m {
            Msg::Text(t) => (OpCode::Text, t.as_bytes()),
            Msg::Binary(b) => (OpCode::Binary, &b[..]),
            Msg::Ping(p) => {
                append_frame(&mut out, FrameSpec { mask: key(), ..FrameSpec::server(OpCode::Ping) }, p);
                continue;
            }
        };
        // Split points from the cut fractions.
        let n_frags = (cuts[i % cuts.len()] % 4) as usize + 1;
        let mut points: Vec<usize> = (1..n_frags)
            .map(|j| payload.len() * cuts[(i + j) % cuts.len()] as usize / u16::MAX as usize)
            .collect();
        points.push(0);
        points.push(payload.len());
        points.sort_unstable();
        for (f, w) in points.windows(2).enumerate() {
            let spec = FrameSpec {
                opcode: if f == 0 { op } else { OpCode::Continuation },
                fin: f + 2 == points.len(),
                compressed: false,
                mask: key(),
            };
            append_frame(&mut out, spec, &payload[w[0]..w[1]]);
            if interleave && !spec.fin {
                append_frame(
                    &mut out,
                    FrameSpec { mask: key(), ..FrameSpec::server(OpCode::Pong) },
                    b"between",
                );
            }
        }
    }
    out
}

fn expected(msgs: &[Msg], interleave: bool, cuts: &[u16]) -> Vec<Owned> {
    let mut want = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        match m {
            Msg::Text(t) => {
                let frags = (cuts[i % cuts.len()] % 4) as usize + 1;
                if interleave {
                    want.extend(std::iter::repeat_n(Owned::Pong(b"between".to_vec()), frags - 1));
                }
                want.push(Owned::Text(t.clone()));
            }
            Msg::Binary(b) => {
                let frags = (cuts[i % cuts.len()] % 4) as usize + 1;
                if interleave {
                    want.extend(std::iter::repeat_n(Owned::Pong(b"between".to_vec()), frags - 1));
                }
                want.push(Owned::Binary(b.clone()));
            }
            Msg::Ping(p) => want.push(Owned::Ping(p.clone())),
        }
    }
    want
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn messages_survive_any_fragmentation_and_read_sizes(
        msgs in proptest::collection::vec(arb_msg(), 1..12),
        cuts in proptest::collection::vec(any::<u16>(), 1..8),
        keys in proptest::collection::vec(any::<[u8; 4]>(), 1..5),
        reads in proptest::collection::vec(1usize..5000, 1..6),
        masked in any::<bool>(),
        interleave in any::<bool>(),
    ) {
        let wire = encode(&msgs, &cuts, &keys, masked, interleave);
        let config = if masked { DecoderConfig::server(1 << 20) } else { DecoderConfig::client(1 << 20) };
        let mut dec = Decoder::new(config);
        let (got, err) = feed(&mut dec, &wire, &reads);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, expected(&msgs, interleave, &cuts));
        dec.release();
        prop_assert!(!dec.is_mid_message());
        prop_assert_eq!(dec.heap_bytes(), 0);
    }
}
