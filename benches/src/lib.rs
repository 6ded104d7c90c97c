//! Shared pieces of the codec micro-benchmarks: sizes, realistic text payloads, masked client
//! frames, buffers at a known alignment, and the 32-bit-word masking loop that tungstenite
//! ships, used as a reference.

use gale_frame::{FrameSpec, OpCode, Utf8Stream, append_frame};

/// Masking key used throughout (the one from RFC 6455 section 5.7).
pub const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Mask with 32-bit words, as tungstenite's `apply_mask_fast32` does: bytes one at a time up
/// to the first 4-byte-aligned address, then each aligned `u32` XORed with the key rotated to
/// that phase, then the last bytes one at a time. Written from its description; `#[inline]`
/// like the original, so it is compiled with the caller's settings.
#[inline]
pub fn mask_u32_loop(buf: &mut [u8], key: [u8; 4]) {
    // SAFETY: every bit pattern is a valid `u32`, so viewing the aligned middle of a byte
    // slice as words is sound; `align_to_mut` guarantees the alignment.
    let (head, words, tail) = unsafe { buf.align_to_mut::<u32>() };
    for (i, b) in head.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
    // The words start `head.len()` bytes into the payload: rotate the key to that phase.
    let mut rotated = key;
    rotated.rotate_left(head.len() & 3);
    let k = u32::from_ne_bytes(rotated);
    for w in words.iter_mut() {
        *w ^= k;
    }
    for (i, b) in tail.iter_mut().enumerate() {
        *b ^= rotated[i & 3];
    }
}

/// [`mask_u32_loop`] with loop vectorization blocked (each word is stored with a volatile
/// write): the literal one-word-at-a-time loop, for comparison with what the compiler makes
/// of it.
pub fn mask_u32_scalar(buf: &mut [u8], key: [u8; 4]) {
    // SAFETY: as in `mask_u32_loop`.
    let (head, words, tail) = unsafe { buf.align_to_mut::<u32>() };
    for (i, b) in head.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
    let mut rotated = key;
    rotated.rotate_left(head.len() & 3);
    let k = u32::from_ne_bytes(rotated);
    for w in words.iter_mut() {
        // SAFETY: `w` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(w, *w ^ k) };
    }
    for (i, b) in tail.iter_mut().enumerate() {
        *b ^= rotated[i & 3];
    }
}

/// Validate `bytes` with [`Utf8Stream`], fed in pieces of at most `piece` bytes, the last
/// one through `finish`, as a decoder does with the reads of a text message.
pub fn stream_validate(bytes: &[u8], piece: usize) -> bool {
    let mut v = Utf8Stream::new();
    let mut rest = bytes;
    while rest.len() > piece {
        let (now, later) = rest.split_at(piece);
        if v.feed(now).is_err() {
            return false;
        }
        rest = later;
    }
    v.finish(rest).is_ok()
}

/// A buffer that starts `offset` bytes past a page (4 KiB) boundary, so that results do not
/// depend on where the allocator put it: how many cache lines and pages an unaligned buffer
/// straddles changes its cost.
pub struct Aligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    /// A copy of `fill`, starting `offset` bytes after a page boundary.
    pub fn new(fill: &[u8], offset: usize) -> Self {
        let mut storage = vec![0u8; fill.len() + offset + 4096];
        let start = storage.as_ptr().align_offset(4096) + offset;
        storage[start..start + fill.len()].copy_from_slice(fill);
        Aligned { storage, start, len: fill.len() }
    }

    /// The bytes.
    pub fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// Which text to generate.
#[derive(Clone, Copy, Debug)]
pub enum Text {
    /// English chat messages in JSON.
    Ascii,
    /// Chinese chat and danmaku messages in JSON: CJK sentences with ASCII keys, digits and
    /// punctuation, as a live-stream chat carries them.
    Cjk,
    /// Short messages made mostly of 4-byte emoji.
    Emoji,
}

impl Text {
    /// Label for benchmark ids.
    pub fn name(self) -> &'static str {
        match self {
            Text::Ascii => "ascii",
            Text::Cjk => "cjk_chat",
            Text::Emoji => "emoji",
        }
    }

    fn lines(self) -> &'static [&'static str] {
        match self {
            Text::Ascii => &[
                r#"{"type":"msg","room":"lobby","user":"alice42","text":"hello everyone, match starts at 8pm"}"#,
                r#"{"type":"msg","room":"lobby","user":"bob","text":"gg wp, that last round was close"}"#,
                r#"{"type":"presence","room":"lobby","user":"carol_dev","status":"online"}"#,
                r#"{"type":"msg","room":"trading","user":"dave","text":"BTC 67120.5 +1.2% vol 3.4k"}"#,
            ],
            Text::Cjk => &[
                r#"{"cmd":"DANMU_MSG","uid":10086,"uname":"小明同学","text":"前方高能！这个操作太秀了吧，主播加油！"}"#,
                r#"{"cmd":"DANMU_MSG","uid":20931,"uname":"夜猫子","text":"哈哈哈哈哈，笑死我了233333"}"#,
                r#"{"cmd":"SEND_GIFT","uid":77120,"uname":"路人甲","gift":"小心心","num":5,"text":"感谢主播带来的精彩直播"}"#,
                r#"{"cmd":"DANMU_MSG","uid":31415,"uname":"王大锤","text":"今天的比赛结果是3比2，太激动了，明天几点开播？"}"#,
                r#"{"type":"msg","room":"大厅","user":"李雷","text":"大家好，我是新来的，请多关照。"}"#,
            ],
            Text::Emoji => &[
                r#"{"text":"🎉🎉🎉🚀🚀🔥🔥🔥😂😂😂👍👍"}"#,
                r#"{"text":"😍🥰😘💕💖💗🌹🌹🌹"}"#,
                r#"{"text":"gg 🏆🥇🎮🕹️👾🤖💯💯"}"#,
                r#"{"text":"🐱🐶🐼🦊🐸🐵🙈🙉🙊🦄🌈"}"#,
            ],
        }
    }

    /// Messages of this kind, one per line, cut at a character boundary to at most `len`
    /// bytes (and at least `len - 3`).
    pub fn generate(self, len: usize) -> String {
        let mut s = String::with_capacity(len + 256);
        for line in self.lines().iter().cycle() {
            if s.len() >= len {
                break;
            }
            s.push_str(line);
            s.push('\n');
        }
        let mut cut = len;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s
    }
}

/// A whole client frame (masked with [`KEY`]) carrying `payload`.
pub fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::with_capacity(payload.len() + 14);
    append_frame(&mut wire, FrameSpec::client(opcode, KEY), payload);
    wire
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both reference loops equal `apply_mask`, from every address modulo 8.
    #[test]
    fn u32_loops_match_apply_mask() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        for start in 0..8 {
            for len in 0..200 {
                let mut want = data[..len].to_vec();
                gale_frame::apply_mask(&mut want, KEY, 0);
                for f in [mask_u32_loop, mask_u32_scalar] {
                    let mut buf = Aligned::new(&data[..len], start);
                    f(buf.bytes(), KEY);
                    assert_eq!(buf.bytes(), &want[..], "start {start} len {len}");
                }
            }
        }
    }

    #[test]
    fn texts_have_the_requested_size() {
        for text in [Text::Ascii, Text::Cjk, Text::Emoji] {
            for len in [64, 4096, 65536] {
                let s = text.generate(len);
                assert!(s.len() <= len && s.len() + 3 >= len, "{text:?} {len}: {}", s.len());
            }
        }
    }
}
