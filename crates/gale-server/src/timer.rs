//! A coarse hashed timer wheel, one per event loop.
//!
//! Connections do not own timers. Each has at most one live entry in the wheel: the tick at
//! which it must next be looked at. Activity (a frame received) only updates a timestamp in
//! the connection, in O(1) and without touching the wheel; when the entry fires, the
//! connection recomputes its real deadline and is either acted on (ping, close) or put back
//! further along. A connection that is busy is thus looked at about once per timeout period,
//! whatever its traffic.

use std::time::{Duration, Instant};

/// Length of one tick. Timeouts are rounded up to whole ticks.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// Slots in the wheel; a deadline further than this many ticks away is parked in the last
/// slot and re-inserted when it fires.
const SLOTS: u32 = 256;

/// Whole ticks in `d`, rounded up, at least 1.
pub(crate) fn ticks(d: Duration) -> u32 {
    let t = d.as_nanos().div_ceil(TICK.as_nanos());
    t.clamp(1, u32::MAX as u128 / 2) as u32
}

/// The wheel: slot `t % SLOTS` holds the keys due at tick `t`.
pub(crate) struct TimerWheel {
    slots: Vec<Vec<u32>>,
    start: Instant,
    /// The last tick whose slot was processed.
    now: u32,
    len: usize,
}

impl TimerWheel {
    pub(crate) fn new() -> Self {
        TimerWheel { slots: (0..SLOTS).map(|_| Vec::new()).collect(), start: Instant::now(), now: 1, len: 0 }
    }

    /// The current tick (starts at 1, so 0 can mean "no timer").
    #[inline]
    pub(crate) fn now(&self) -> u32 {
        self.now
    }

    /// The tick that `Instant::now()` falls in.
    fn tick_of(&self, at: Instant) -> u32 {
        (at.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos()) as u32 + 1
    }

    /// Put `key` in the wheel to fire at tick `at` (at least the next tick). Returns the tick of
    /// the slot it went into, which the caller records to recognise its live entry.
    pub(crate) fn schedule(&mut self, key: u32, at: u32) -> u32 {
        let at = at.clamp(self.now + 1, self.now + SLOTS - 1);
        self.slots[(at % SLOTS) as usize].push(key);
        self.len += 1;
        at
    }

    /// Advance to the present and append every `(key, tick)` that came due to `due`.
    pub(crate) fn advance(&mut self, due: &mut Vec<(u32, u32)>) {
        let target = self.tick_of(Instant::now());
        while self.now < target {
            self.now += 1;
            let slot = &mut self.slots[(self.now % SLOTS) as usize];
            self.len -= slot.len();
            let tick = self.now;
            due.extend(slot.drain(..).map(|k| (k, tick)));
        }
    }

    /// How long the loop may sleep before the next tick with entries could be due.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let next = self.start + TICK * self.now;
        Some(next.saturating_duration_since(Instant::now()) + Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_up() {
        assert_eq!(ticks(Duration::ZERO), 1);
        assert_eq!(ticks(Duration::from_millis(250)), 1);
        assert_eq!(ticks(Duration::from_millis(251)), 2);
        assert_eq!(ticks(Duration::from_secs(10)), 40);
    }

    #[test]
    fn entries_fire_at_their_tick_and_far_ones_are_parked() {
        let mut w = TimerWheel::new();
        // Pretend time has moved on without sleeping: shift the start back.
        let at = w.schedule(7, 3);
        assert_eq!(at, 3);
        let far = w.schedule(8, 10_000);
        assert_eq!(far, 1 + SLOTS - 1);
        w.start -= TICK * 5;
        let mut due = Vec::new();
        w.advance(&mut due);
        assert_eq!(due, vec![(7, 3)]);
        assert!(w.timeout().is_some());
        w.start -= TICK * SLOTS;
        due.clear();
        w.advance(&mut due);
        assert_eq!(due, vec![(8, far)]);
        assert_eq!(w.timeout(), None);
    }
}
