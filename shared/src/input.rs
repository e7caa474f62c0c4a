//! Player input commands, their validation, the client's redundancy window and the server's per-player
//! input buffer (each tick's input applied exactly once; late, missing and duplicate inputs counted).

use crate::tick::Tick;

/// Button bit: fire the weapon this tick.
pub const BUTTON_FIRE: u8 = 1;
/// Every button bit this protocol version defines.
pub const BUTTONS_KNOWN: u8 = BUTTON_FIRE;
/// How far ahead of the server's next tick an input may be stamped (about 2 s at 60 Hz).
pub const MAX_INPUT_LEAD: u32 = 128;
/// After this many consecutive missing ticks the repeated input decays to "stand still".
pub const MAX_REPEAT_TICKS: u32 = 8;

/// The input of one player for one tick.
#[derive(Debug, Clone, Copy, PartialEq, bincode::Encode, bincode::Decode)]
pub struct InputCmd {
    /// The server tick this input is for.
    pub tick: Tick,
    /// Desired movement, x (the vector's length must be ≤ 1).
    pub move_x: f32,
    /// Desired movement, y.
    pub move_y: f32,
    /// Aim angle in radians, in `[-2π, 2π]`.
    pub aim: f32,
    /// Button bits ([`BUTTON_FIRE`]).
    pub buttons: u8,
    /// The tick the client was *showing* when it made this input (its interpolation time), used by
    /// lag compensation to judge shots against what the player saw.
    pub view_tick: Tick,
    /// Fraction of a tick past `view_tick`, in 1/256ths.
    pub view_frac: u8,
}

/// Why an input command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// NaN or infinite value.
    #[error("non-finite input value")]
    NonFinite,
    /// Movement longer than 1 or aim outside ±2π.
    #[error("input value out of range")]
    OutOfRange,
    /// A button bit this version does not define.
    #[error("unknown button bits")]
    UnknownButtons,
}

impl InputCmd {
    /// A neutral input (no movement, no buttons) for `tick`.
    #[must_use]
    pub fn idle(tick: Tick) -> Self {
        Self {
            tick,
            move_x: 0.0,
            move_y: 0.0,
            aim: 0.0,
            buttons: 0,
            view_tick: tick,
            view_frac: 0,
        }
    }

    /// Checks every field; the server calls this before an input reaches the simulation.
    pub fn validate(&self) -> Result<(), InputError> {
        if !(self.move_x.is_finite() && self.move_y.is_finite() && self.aim.is_finite()) {
            return Err(InputError::NonFinite);
        }
        let len2 = self.move_x * self.move_x + self.move_y * self.move_y;
        if len2 > 1.0 + 1e-3 || self.aim.abs() > std::f32::consts::TAU + 1e-3 {
            return Err(InputError::OutOfRange);
        }
        if self.buttons & !BUTTONS_KNOWN != 0 {
            return Err(InputError::UnknownButtons);
        }
        Ok(())
    }

    /// True when fire is held.
    #[must_use]
    pub fn fire(&self) -> bool {
        self.buttons & BUTTON_FIRE != 0
    }
}

/// Where the input applied at a tick came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputSource {
    /// The client's own input for that tick, received in time.
    Received,
    /// None arrived: the last received movement repeated (buttons released).
    Repeated,
    /// None arrived for more than [`MAX_REPEAT_TICKS`]: stand still.
    Idle,
}

/// Per-player counters kept by [`InputBuffer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputCounters {
    /// Inputs applied at their own tick.
    pub applied: u64,
    /// Ticks simulated without this player's input (a substitute was used).
    pub missing: u64,
    /// Inputs that arrived after their tick was simulated with a substitute.
    pub late: u64,
    /// Copies of inputs already buffered or applied (redundancy, duplicated datagrams).
    pub duplicates: u64,
    /// Inputs stamped too far in the future.
    pub too_far_ahead: u64,
}

const RING: usize = MAX_INPUT_LEAD as usize;

/// The server's input buffer for one player: a fixed ring of future ticks, so memory stays bounded
/// whatever ticks a client stamps.
#[derive(Debug, Clone)]
pub struct InputBuffer {
    /// `slots[t % RING]` holds the input stamped `t`, if buffered.
    slots: Vec<Option<InputCmd>>,
    /// The next tick the server will take (every earlier tick has been taken).
    next: Tick,
    /// Bit `i` set: tick `next - 1 - i` was applied from a received input or already counted late.
    settled: u64,
    /// The last input actually received, used by the missing-input policy.
    last: Option<InputCmd>,
    /// Consecutive ticks taken without a received input.
    missing_run: u32,
    /// Counters.
    pub counters: InputCounters,
}

impl InputBuffer {
    /// A buffer whose first tick to take is `next`.
    #[must_use]
    pub fn new(next: Tick) -> Self {
        Self {
            slots: vec![None; RING],
            next,
            settled: 0,
            last: None,
            missing_run: 0,
            counters: InputCounters::default(),
        }
    }

    /// The next tick [`InputBuffer::take`] will be called for.
    #[must_use]
    pub fn next_tick(&self) -> Tick {
        self.next
    }

    /// Buffers a validated input; redundant copies and stale ticks are counted and ignored.
    pub fn insert(&mut self, cmd: InputCmd) {
        let d = cmd.tick.diff(self.next);
        if d < 0 {
            let back = (!d) as u32; // = -d - 1, without overflow at i32::MIN
            if back < 64 && self.settled & (1u64 << back) == 0 {
                self.settled |= 1u64 << back;
                self.counters.late += 1;
            } else {
                self.counters.duplicates += 1;
            }
            return;
        }
        if d as u32 >= MAX_INPUT_LEAD {
            self.counters.too_far_ahead += 1;
            return;
        }
        let slot = cmd.tick.0 as usize % RING;
        match self.slots.get_mut(slot) {
            Some(Some(held)) if held.tick == cmd.tick => self.counters.duplicates += 1,
            Some(s) => *s = Some(cmd),
            None => {}
        }
    }

    /// Takes the input for tick `next` and advances. Exactly one input is returned per tick.
    pub fn take(&mut self) -> (InputCmd, InputSource) {
        let tick = self.next;
        let slot = tick.0 as usize % RING;
        let got = self
            .slots
            .get_mut(slot)
            .and_then(Option::take)
            .filter(|c| c.tick == tick);
        self.next = tick.next();
        self.settled <<= 1;
        match got {
            Some(cmd) => {
                self.settled |= 1;
                self.last = Some(cmd);
                self.missing_run = 0;
                self.counters.applied += 1;
                (cmd, InputSource::Received)
            }
            None => {
                self.counters.missing += 1;
                self.missing_run += 1;
                match self.last {
                    Some(l) if self.missing_run <= MAX_REPEAT_TICKS => (
                        InputCmd {
                            tick,
                            buttons: 0,
                            ..l
                        },
                        InputSource::Repeated,
                    ),
                    _ => (
                        InputCmd {
                            aim: self.last.map_or(0.0, |l| l.aim),
                            ..InputCmd::idle(tick)
                        },
                        InputSource::Idle,
                    ),
                }
            }
        }
    }

    /// The newest tick applied from a received input, if any.
    #[must_use]
    pub fn newest_received(&self) -> Option<Tick> {
        self.last.map(|l| l.tick)
    }
}

/// The client's window of its most recent inputs, resent in every input datagram.
#[derive(Debug, Clone)]
pub struct InputHistory {
    /// Newest last, at most `redundancy` entries.
    cmds: std::collections::VecDeque<InputCmd>,
    /// How many recent inputs each datagram repeats.
    redundancy: usize,
}

impl InputHistory {
    /// A window of `redundancy` inputs (at least 1).
    #[must_use]
    pub fn new(redundancy: usize) -> Self {
        let redundancy = redundancy.max(1);
        Self {
            cmds: std::collections::VecDeque::with_capacity(redundancy),
            redundancy,
        }
    }

    /// The newest stamped tick.
    #[must_use]
    pub fn newest_tick(&self) -> Option<Tick> {
        self.cmds.back().map(|c| c.tick)
    }

    /// Records the input for a tick later than every recorded one (others are ignored).
    pub fn push(&mut self, cmd: InputCmd) -> bool {
        if self.newest_tick().is_some_and(|t| !cmd.tick.is_after(t)) {
            return false;
        }
        if self.cmds.len() >= self.redundancy {
            self.cmds.pop_front();
        }
        self.cmds.push_back(cmd);
        true
    }

    /// The inputs to send, oldest first.
    #[must_use]
    pub fn window(&self) -> Vec<InputCmd> {
        self.cmds.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(t: u32, x: f32) -> InputCmd {
        InputCmd {
            move_x: x,
            ..InputCmd::idle(Tick(t))
        }
    }

    #[test]
    fn validation() {
        assert!(cmd(1, 0.5).validate().is_ok());
        assert_eq!(cmd(1, f32::NAN).validate(), Err(InputError::NonFinite));
        assert_eq!(cmd(1, f32::INFINITY).validate(), Err(InputError::NonFinite));
        assert_eq!(cmd(1, 1.5).validate(), Err(InputError::OutOfRange));
        assert_eq!(
            InputCmd {
                aim: 100.0,
                ..cmd(1, 0.0)
            }
            .validate(),
            Err(InputError::OutOfRange)
        );
        assert_eq!(
            InputCmd {
                buttons: 0x80,
                ..cmd(1, 0.0)
            }
            .validate(),
            Err(InputError::UnknownButtons)
        );
    }

    #[test]
    fn redundant_duplicated_and_reordered_inputs_apply_once() {
        let start = u32::MAX - 2; // crosses the wrap
        let mut b = InputBuffer::new(Tick(start));
        // Datagrams carry 3 inputs each, delivered out of order and twice.
        let dgs: Vec<Vec<InputCmd>> = (0..6u32)
            .map(|k| {
                (0..3u32)
                    .filter(|i| *i <= k)
                    .map(|i| cmd(start.wrapping_add(k - i), (k - i) as f32 / 10.0))
                    .collect()
            })
            .collect();
        for d in dgs.iter().rev().chain(dgs.iter()) {
            for c in d {
                b.insert(*c);
            }
        }
        for k in 0..6u32 {
            let (c, src) = b.take();
            assert_eq!(src, InputSource::Received);
            assert_eq!(c.tick, Tick(start.wrapping_add(k)));
            assert_eq!(c.move_x, k as f32 / 10.0);
        }
        assert_eq!(b.counters.applied, 6);
        assert_eq!(b.counters.missing, 0);
        // Everything resent after being applied is a duplicate, never late and never applied again.
        for d in &dgs {
            for c in d {
                b.insert(*c);
            }
        }
        assert_eq!(b.counters.late, 0);
        let (_, src) = b.take();
        assert_eq!(src, InputSource::Repeated);
    }

    #[test]
    fn missing_policy_repeats_then_idles_and_counts_late() {
        let mut b = InputBuffer::new(Tick(10));
        b.insert(InputCmd {
            buttons: BUTTON_FIRE,
            ..cmd(10, 1.0)
        });
        assert_eq!(b.take().1, InputSource::Received);
        for _ in 0..MAX_REPEAT_TICKS {
            let (c, src) = b.take();
            assert_eq!(src, InputSource::Repeated);
            assert_eq!(c.move_x, 1.0);
            assert!(!c.fire(), "fire is never repeated");
        }
        let (c, src) = b.take();
        assert_eq!((src, c.move_x), (InputSource::Idle, 0.0));
        assert_eq!(b.counters.missing, u64::from(MAX_REPEAT_TICKS) + 1);
        b.insert(cmd(12, 0.0));
        b.insert(cmd(12, 0.0));
        assert_eq!(b.counters.late, 1);
        assert_eq!(b.counters.duplicates, 1);
    }

    #[test]
    fn far_future_inputs_are_refused_and_memory_is_fixed() {
        let mut b = InputBuffer::new(Tick(0));
        for t in 0..10_000u32 {
            b.insert(cmd(t.wrapping_mul(7919), 0.0));
        }
        assert!(b.counters.too_far_ahead > 9_000);
        // Exactly half the tick space away: the wrapping difference is i32::MIN (no overflow).
        let next = b.next_tick();
        b.insert(cmd(next.0.wrapping_add(1 << 31), 0.0));
        b.insert(cmd(next.0.wrapping_add((1 << 31) + 1), 0.0));
        assert_eq!(b.slots.len(), RING);
    }

    #[test]
    fn history_keeps_the_newest_window() {
        let mut h = InputHistory::new(3);
        for t in 0..5 {
            assert!(h.push(cmd(t, 0.0)));
        }
        assert!(!h.push(cmd(2, 0.0)));
        let w: Vec<u32> = h.window().iter().map(|c| c.tick.0).collect();
        assert_eq!(w, vec![2, 3, 4]);
    }
}
