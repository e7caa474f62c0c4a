//! What a bot does each step, as a pure seeded state machine: wander in a random direction (a new one
//! every 1–3 s, or sooner when its avatar stays still while it wants to move), turn its aim slowly,
//! fire about every 2 s. Also the tiny seeded RNG the swarm uses for jitter.

use std::time::Duration;

/// A new wander direction is picked after this long at the earliest…
pub const TURN_MIN: Duration = Duration::from_secs(1);
/// …and at the latest.
pub const TURN_MAX: Duration = Duration::from_secs(3);
/// An avatar whose velocity stays ~0 this long while the bot wants to move is stuck (a wall).
pub const STUCK_AFTER: Duration = Duration::from_millis(500);
/// Aim rotation speed, radians per second.
pub const AIM_SPEED: f32 = 0.6;
/// Mean interval between shots.
pub const FIRE_EVERY: Duration = Duration::from_secs(2);
/// How long fire is held for one shot.
pub const FIRE_HOLD: Duration = Duration::from_millis(100);

/// SplitMix64: small, fast, good enough for bot jitter (not for anything secret).
#[derive(Debug, Clone)]
pub struct Rng {
    /// State.
    state: u64,
}

impl Rng {
    /// A generator from `seed`.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// `base` scaled by a uniform factor in `[1 - jitter, 1 + jitter)`.
    pub fn jittered(&mut self, base: Duration, jitter: f64) -> Duration {
        base.mul_f64(self.range(1.0 - jitter, 1.0 + jitter).max(0.0))
    }
}

/// One step's input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BotInput {
    /// Movement x (unit vector with `move_y`).
    pub move_x: f32,
    /// Movement y.
    pub move_y: f32,
    /// Aim, radians in `[-π, π]`.
    pub aim: f32,
    /// Fire held.
    pub fire: bool,
}

/// The wandering behaviour of one bot.
#[derive(Debug, Clone)]
pub struct Wander {
    /// Randomness.
    rng: Rng,
    /// Current heading, radians.
    heading: f32,
    /// When to pick a new heading.
    next_turn: Duration,
    /// Since when the avatar has been still while moving is wanted.
    still_since: Option<Duration>,
    /// Current aim, radians.
    aim: f32,
    /// Aim direction of rotation (+1 or -1).
    aim_dir: f32,
    /// When to fire next.
    next_fire: Duration,
    /// Fire is held until then.
    fire_until: Duration,
    /// Time of the previous step.
    last: Option<Duration>,
    /// Headings picked so far (for tests and diagnostics).
    turns: u64,
}

impl Wander {
    /// A behaviour seeded with `seed`; the first step picks a heading.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let aim = rng.range(-std::f64::consts::PI, std::f64::consts::PI) as f32;
        let aim_dir = if rng.unit() < 0.5 { -1.0 } else { 1.0 };
        let next_fire = Duration::from_secs_f64(rng.range(0.0, FIRE_EVERY.as_secs_f64()));
        Self {
            rng,
            heading: 0.0,
            next_turn: Duration::ZERO,
            still_since: None,
            aim,
            aim_dir,
            next_fire,
            fire_until: Duration::ZERO,
            last: None,
            turns: 0,
        }
    }

    /// Headings picked so far.
    #[must_use]
    pub fn turns(&self) -> u64 {
        self.turns
    }

    fn turn(&mut self, now: Duration) {
        self.heading = self.rng.range(0.0, std::f64::consts::TAU) as f32;
        let secs = self
            .rng
            .range(TURN_MIN.as_secs_f64(), TURN_MAX.as_secs_f64());
        self.next_turn = now + Duration::from_secs_f64(secs);
        self.still_since = None;
        self.turns += 1;
    }

    /// The input at `now` (monotonic), given the avatar's quantized velocity in the newest snapshot
    /// (`None` when unknown: no snapshot, or the avatar is not in it).
    pub fn step(&mut self, now: Duration, velocity: Option<(i32, i32)>) -> BotInput {
        let dt = self.last.map_or(Duration::ZERO, |l| now.saturating_sub(l));
        self.last = Some(now);

        if now >= self.next_turn {
            self.turn(now);
        }
        match velocity {
            Some((vx, vy)) if vx.unsigned_abs() + vy.unsigned_abs() <= 1 => {
                let since = *self.still_since.get_or_insert(now);
                if now.saturating_sub(since) >= STUCK_AFTER {
                    self.turn(now);
                }
            }
            Some(_) => self.still_since = None,
            None => {}
        }

        let tau = std::f32::consts::TAU;
        let mut aim = (self.aim + self.aim_dir * AIM_SPEED * dt.as_secs_f32()).rem_euclid(tau);
        if aim > std::f32::consts::PI {
            aim -= tau;
        }
        self.aim = aim;

        if now >= self.next_fire {
            self.fire_until = now + FIRE_HOLD;
            self.next_fire = now + self.rng.jittered(FIRE_EVERY, 0.25);
        }
        BotInput {
            move_x: self.heading.cos(),
            move_y: self.heading.sin(),
            aim: self.aim,
            fire: now < self.fire_until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn rng_is_deterministic_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let x = a.range(2.0, 3.0);
            assert_eq!(x, b.range(2.0, 3.0));
            assert!((2.0..3.0).contains(&x));
            let d = a.jittered(Duration::from_secs(3), 0.3);
            b.jittered(Duration::from_secs(3), 0.3);
            assert!(d >= ms(2100) && d <= ms(3900));
        }
    }

    #[test]
    fn wanders_turns_and_fires() {
        let mut w = Wander::new(42);
        let mut fired = 0;
        let mut prev_fire = false;
        let mut prev_aim = None;
        for step in 0..=100u64 {
            // 10 s at 10 Hz, the avatar moving freely.
            let i = w.step(ms(step * 100), Some((50, 0)));
            let len = (i.move_x * i.move_x + i.move_y * i.move_y).sqrt();
            assert!((len - 1.0).abs() < 1e-4);
            assert!(i.aim.abs() <= std::f32::consts::PI + 1e-6);
            if i.fire && !prev_fire {
                fired += 1;
            }
            prev_fire = i.fire;
            if let Some(p) = prev_aim {
                let d: f32 = i.aim - p;
                let d = d.abs().min(std::f32::consts::TAU - d.abs());
                assert!((d - AIM_SPEED * 0.1).abs() < 1e-3, "aim turns slowly: {d}");
            }
            prev_aim = Some(i.aim);
        }
        // One heading per 1–3 s over 10 s (plus the first).
        assert!((4..=11).contains(&w.turns()), "turns {}", w.turns());
        assert!((4..=7).contains(&fired), "fired {fired}");
    }

    #[test]
    fn a_stuck_avatar_makes_it_turn() {
        let mut w = Wander::new(1);
        let first = w.step(ms(0), None);
        assert_eq!(w.turns(), 1);
        // Velocity ~0 for longer than STUCK_AFTER, well before the 1 s turn.
        let mut t = 0;
        while w.turns() == 1 {
            t += 50;
            w.step(ms(t), Some((0, 1)));
            assert!(t <= STUCK_AFTER.as_millis() as u64 + 100);
        }
        assert!(t >= STUCK_AFTER.as_millis() as u64);
        let after = w.step(ms(t + 50), Some((40, 40)));
        assert!(first.move_x != after.move_x || first.move_y != after.move_y);
        // Unknown velocity never counts as stuck.
        let turns = w.turns();
        for k in 1..=5 {
            w.step(ms(t + 50 + k * 100), None);
        }
        assert_eq!(w.turns(), turns);
    }
}
