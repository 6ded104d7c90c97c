//! A small fast PRNG (wyrand) for masking keys and payload bytes. Not cryptographic: masks only
//! need to be unpredictable enough that servers cannot skip unmasking.

/// wyrand: one multiply per 64 bits.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from the clock and `salt` (e.g. a thread index).
    pub fn seeded(salt: u64) -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(t ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// A generator with a given seed (reproducible sequences).
    pub fn from_seed(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0).wrapping_mul(u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db));
        ((t >> 64) as u64) ^ (t as u64)
    }

    /// A fresh masking key.
    #[inline]
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}
