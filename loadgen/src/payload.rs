//! Message payloads that carry their sequence number, so that every echo can be checked
//! byte for byte: a wrong, reordered or corrupted echo is counted as a failure.
//!
//! Text payloads are real UTF-8 with 1- to 4-byte characters, not only ASCII, so the server's
//! UTF-8 validation does real work.

use fastrand::Rng;

/// Text or binary messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// UTF-8 text.
    Text,
    /// Random bytes.
    Binary,
}

/// Characters of 1 to 4 bytes that text payloads are made of.
const TEXT: &str = "Gale ⚡ 風が吹く — ¡olá! 弹幕 🚀 Ωμέγα €12,5 ";

/// A payload template of a fixed size with room for a sequence number at the start.
#[derive(Clone, Debug)]
pub struct Payloads {
    template: Vec<u8>,
    /// Hex digits of the sequence number at the start of each payload.
    seq_digits: usize,
    kind: Kind,
}

impl Payloads {
    /// Payloads of exactly `size` bytes.
    pub fn new(kind: Kind, size: usize, rng: &mut Rng) -> Self {
        let seq_digits = size.min(16);
        let body = size - seq_digits;
        let mut template = vec![b'0'; seq_digits];
        match kind {
            Kind::Text => {
                let mut text = String::with_capacity(body + 4);
                while text.len() < body {
                    for c in TEXT.chars() {
                        if text.len() + c.len_utf8() > body {
                            break;
                        }
                        text.push(c);
                    }
                    if text.len() + 4 > body {
                        // Fill the last bytes with ASCII so the size is exact.
                        while text.len() < body {
                            text.push('.');
                        }
                    }
                }
                template.extend_from_slice(text.as_bytes());
            }
            Kind::Binary => template.extend((0..body).map(|_| rng.u8(..))),
        }
        Payloads { template, seq_digits, kind }
    }

    /// Payload size in bytes.
    pub fn size(&self) -> usize {
        self.template.len()
    }

    /// Text or binary.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Write the payload for `seq` into `out` (exactly `size()` bytes).
    #[inline]
    pub fn write(&self, seq: u64, out: &mut [u8]) {
        out.copy_from_slice(&self.template);
        write_hex(seq, &mut out[..self.seq_digits]);
    }

    /// Whether `got` is exactly the payload for `seq`.
    #[inline]
    pub fn verify(&self, seq: u64, got: &[u8]) -> bool {
        if got.len() != self.template.len() {
            return false;
        }
        let mut digits = [0u8; 16];
        write_hex(seq, &mut digits[..self.seq_digits]);
        got[..self.seq_digits] == digits[..self.seq_digits]
            && got[self.seq_digits..] == self.template[self.seq_digits..]
    }
}

/// Names, phrases and colours chat messages are drawn from.
const NAMES: [&str; 8] = ["小明", "阿花", "主播的猫", "吃瓜群众", "路人甲", "Kevin", "さくら", "弹幕君"];
const PHRASES: [&str; 12] = [
    "哈哈哈哈哈",
    "主播好厉害！",
    "666666",
    "前方高能预警",
    "这波操作可以",
    "awsl",
    "太好笑了吧",
    "下次一定",
    "打卡打卡",
    "学到了，谢谢分享",
    "这个BGM叫什么？",
    "已三连 👍",
];
const COLORS: [&str; 4] = ["#ffffff", "#ffcc00", "#ff6699", "#66ccff"];

/// The chat/danmaku message numbered `seq`: a JSON object with repeating keys and Chinese text,
/// 120 to 250 bytes, always the same for the same `seq` (so echoes can be checked).
pub fn chat_message(seq: u64) -> String {
    let mut r = Rng::with_seed(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5DEE_CE66);
    let mut pick = |n: usize| r.usize(..n);
    let uid = 10_000 + pick(90_000);
    let name = NAMES[pick(NAMES.len())];
    let level = 1 + pick(40);
    let color = COLORS[pick(COLORS.len())];
    let room = 1000 + pick(8);
    let phrases = 1 + pick(3);
    let mut text = String::new();
    for _ in 0..phrases {
        text.push_str(PHRASES[pick(PHRASES.len())]);
    }
    format!(
        r#"{{"type":"danmaku","room":"live-{room}","seq":{seq},"user":{{"id":{uid},"name":"{name}","level":{level}}},"color":"{color}","text":"{text}","ts":{}}}"#,
        1_732_500_000_000u64 + seq * 37
    )
}

/// The low `out.len()` hex digits of `v`, most significant first.
#[inline]
fn write_hex(mut v: u64, out: &mut [u8]) {
    for b in out.iter_mut().rev() {
        *b = b"0123456789abcdef"[(v & 15) as usize];
        v >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_payloads_are_valid_utf8_of_exact_size_with_multibyte_chars() {
        let mut rng = Rng::with_seed(1);
        for size in [0, 1, 5, 16, 17, 20, 21, 100, 1024, 65536] {
            let p = Payloads::new(Kind::Text, size, &mut rng);
            let mut buf = vec![0; size];
            p.write(0xabc, &mut buf);
            assert_eq!(buf.len(), size);
            let s = std::str::from_utf8(&buf).unwrap();
            if size >= 40 {
                assert!(s.chars().any(|c| c.len_utf8() > 1), "not only ASCII");
            }
            assert!(p.verify(0xabc, &buf));
            if size >= 2 {
                assert!(!p.verify(0xabd, &buf));
            }
        }
    }

    #[test]
    fn chat_messages_are_stable_json_of_realistic_size() {
        for seq in [0u64, 1, 2, 99, 123_456] {
            let m = chat_message(seq);
            assert_eq!(m, chat_message(seq));
            assert!((100..300).contains(&m.len()), "{} bytes: {m}", m.len());
            assert!(m.starts_with('{') && m.ends_with('}') && m.contains("\"text\":\""));
        }
        assert_ne!(chat_message(1), chat_message(2));
    }

    #[test]
    fn corruption_is_detected() {
        let mut rng = Rng::with_seed(2);
        let p = Payloads::new(Kind::Binary, 1024, &mut rng);
        let mut buf = vec![0; 1024];
        p.write(7, &mut buf);
        assert!(p.verify(7, &buf));
        buf[900] ^= 1;
        assert!(!p.verify(7, &buf));
        assert!(!p.verify(7, &buf[..1023]));
    }
}
