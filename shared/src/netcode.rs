//! Client-side netcode, sans-IO: prediction and reconciliation of the client's own avatar with the
//! shared simulation step, interpolation of everything else from a jitter-adaptive snapshot buffer
//! with bounded extrapolation, and the adaptive input lead. [`crate::client::ClientSession`] owns one
//! of each and feeds them; time is passed in.

use std::collections::VecDeque;
use std::time::Duration;

use glam::Vec2;

use crate::assembler::BaselineRing;
use crate::entity::{EntityId, EntityKind, EntityState};
use crate::input::InputCmd;
use crate::map::Map;
use crate::quant::{dequantize_vel, dequantize_yaw, POS_QUANTUM};
use crate::sim::{step_player, Entity};
use crate::snapshot::Snapshot;
use crate::tick::Tick;

/// Predicted ticks remembered for error measurement and replay.
const PREDICTION_WINDOW: usize = 256;
/// A correction larger than this snaps instead of being smoothed, units.
const MAX_SMOOTHED: f32 = 2.0;
/// Fraction of the visual correction offset kept per tick.
const SMOOTHING: f32 = 0.8;

/// Converts replicated state into a simulation entity (exact: the state is on the grid).
#[must_use]
pub fn entity_from_state(s: &EntityState) -> Entity {
    Entity {
        id: s.id,
        kind: s.kind,
        pos: Vec2::new(s.qx as f32 * POS_QUANTUM, s.qy as f32 * POS_QUANTUM),
        vel: Vec2::new(dequantize_vel(s.qvx), dequantize_vel(s.qvy)),
        yaw: s.yaw,
        health: s.health,
        cooldown: 0,
    }
}

/// Prediction and reconciliation of the client's own avatar.
#[derive(Debug, Clone)]
pub struct Predictor {
    /// The map (walls and bounds) the avatar collides with.
    map: Map,
    /// Seconds per tick.
    dt: f32,
    /// The avatar predicted.
    avatar: EntityId,
    /// Predicted avatar after the input of the given tick.
    current: Option<(Tick, Entity)>,
    /// Inputs not yet covered by a snapshot, oldest first.
    unacked: VecDeque<InputCmd>,
    /// Predicted position after each recent input tick.
    history: VecDeque<(Tick, Vec2)>,
    /// Visual offset that smooths corrections away.
    offset: Vec2,
    /// Prediction errors (units), one per snapshot that had a prediction for its tick; drained by
    /// the shell.
    pub errors: Vec<f32>,
    /// Snapshots whose authoritative avatar differed from the prediction.
    pub corrections: u64,
}

impl Predictor {
    /// A predictor for `avatar` on `map` at `tick_rate`.
    #[must_use]
    pub fn new(map: Map, tick_rate: u32, avatar: EntityId) -> Self {
        Self {
            map,
            dt: 1.0 / tick_rate.max(1) as f32,
            avatar,
            current: None,
            unacked: VecDeque::new(),
            history: VecDeque::new(),
            offset: Vec2::ZERO,
            errors: Vec::new(),
            corrections: 0,
        }
    }

    fn remember(&mut self, tick: Tick, pos: Vec2) {
        if let Some(h) = self.history.iter_mut().rev().find(|h| h.0 == tick) {
            h.1 = pos;
            return;
        }
        if self.history.len() >= PREDICTION_WINDOW {
            self.history.pop_front();
        }
        self.history.push_back((tick, pos));
    }

    /// A newly stamped input (ticks strictly increasing): predict its effect.
    pub fn on_input(&mut self, cmd: InputCmd) {
        if self.unacked.len() >= PREDICTION_WINDOW {
            self.unacked.pop_front();
        }
        self.unacked.push_back(cmd);
        self.offset *= SMOOTHING;
        if let Some((t, e)) = &mut self.current {
            if cmd.tick.is_after(*t) {
                step_player(e, &cmd, &self.map, self.dt);
                *t = cmd.tick;
                let p = e.pos;
                self.remember(cmd.tick, p);
            }
        }
    }

    /// A complete snapshot arrived: measure the prediction error at its tick, then reset to the
    /// authoritative state and replay the inputs after it. Returns the error, if one was measured.
    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Option<f32> {
        let s = snap
            .get(self.avatar.index)
            .filter(|s| s.id == self.avatar)?;
        let auth = entity_from_state(s);
        let err = self
            .history
            .iter()
            .rev()
            .find(|h| h.0 == snap.tick)
            .map(|h| h.1.distance(auth.pos));
        let old_display = self.display_pos();
        while self
            .unacked
            .front()
            .is_some_and(|c| !c.tick.is_after(snap.tick))
        {
            self.unacked.pop_front();
        }
        let mut e = auth;
        let mut t = snap.tick;
        let replay: Vec<InputCmd> = self.unacked.iter().copied().collect();
        for c in &replay {
            step_player(&mut e, c, &self.map, self.dt);
            t = c.tick;
            self.remember(t, e.pos);
        }
        let new_pos = e.pos;
        self.current = Some((t, e));
        if let Some(err) = err {
            self.errors.push(err);
            if err > 0.0 {
                self.corrections += 1;
                let jump = old_display.map_or(Vec2::ZERO, |d| d - new_pos);
                self.offset = if jump.length() <= MAX_SMOOTHED {
                    jump
                } else {
                    Vec2::ZERO
                };
            }
        }
        err
    }

    /// The predicted avatar (simulation state) and the input tick it reflects.
    #[must_use]
    pub fn predicted(&self) -> Option<(Tick, &Entity)> {
        self.current.as_ref().map(|(t, e)| (*t, e))
    }

    /// Where to draw the avatar: the prediction plus the decaying correction offset.
    #[must_use]
    pub fn display_pos(&self) -> Option<Vec2> {
        self.current.as_ref().map(|(_, e)| e.pos + self.offset)
    }
}

/// One entity of an interpolated view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViewEntity {
    /// Identity.
    pub id: EntityId,
    /// Kind.
    pub kind: EntityKind,
    /// Interpolated (or extrapolated) position, units.
    pub pos: Vec2,
    /// Orientation, radians (of the earlier snapshot).
    pub yaw: f32,
    /// Health.
    pub health: u8,
}

/// What the client shows at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct InterpView {
    /// The snapshot tick the view is at or after.
    pub tick: Tick,
    /// Fraction of a tick past `tick`, 0..1.
    pub frac: f32,
    /// Entities.
    pub entities: Vec<ViewEntity>,
    /// True when no later snapshot was there and positions were extrapolated (an underrun).
    pub extrapolated: bool,
}

/// Jitter-adaptive interpolation of remote entities.
#[derive(Debug, Clone)]
pub struct Interpolator {
    /// Ticks per second.
    rate: f64,
    /// Arrival jitter estimate (RFC 3550 style), ticks.
    jitter: f64,
    /// Largest recent gap between consecutive snapshot ticks (decays), ticks.
    gap: f64,
    /// The last snapshot's tick and arrival time.
    last: Option<(Tick, Duration)>,
    /// Current interpolation delay behind the newest-snapshot clock, ticks.
    delay: f64,
    /// Frames sampled.
    pub frames: u64,
    /// Frames that had to extrapolate (no later snapshot yet).
    pub underruns: u64,
}

/// Extrapolation is bounded to this many ticks past the newest snapshot.
pub const MAX_EXTRAPOLATION_TICKS: f64 = 6.0;

impl Interpolator {
    /// An interpolator at `tick_rate`.
    #[must_use]
    pub fn new(tick_rate: u32) -> Self {
        Self {
            rate: f64::from(tick_rate.max(1)),
            jitter: 0.0,
            gap: 1.0,
            last: None,
            delay: 2.0,
            frames: 0,
            underruns: 0,
        }
    }

    /// A complete snapshot of `tick` arrived at `now`.
    pub fn on_snapshot(&mut self, tick: Tick, now: Duration) {
        if let Some((t, at)) = self.last {
            let ticks = f64::from(tick.diff(t));
            if ticks > 0.0 {
                let d = (now.as_secs_f64() - at.as_secs_f64()) * self.rate - ticks;
                self.jitter += (d.abs() - self.jitter) / 16.0;
                self.gap = (self.gap * 0.995).max(ticks).max(1.0);
            }
        }
        self.last = Some((tick, now));
    }

    /// The delay the buffer aims for: one tick of margin, the largest recent gap, three jitters.
    #[must_use]
    pub fn target_delay(&self) -> f64 {
        (1.0 + self.gap + 3.0 * self.jitter).clamp(2.0, 12.0)
    }

    /// Current delay, ticks.
    #[must_use]
    pub fn delay(&self) -> f64 {
        self.delay
    }

    /// Arrival jitter estimate, ticks.
    #[must_use]
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// Samples the view at render time `render` (fractional ticks since `anchor`), from `snaps`.
    pub fn sample(
        &mut self,
        anchor: Tick,
        render_since_anchor: f64,
        snaps: &BaselineRing,
    ) -> Option<InterpView> {
        let target = self.target_delay();
        // Grow quickly, shrink slowly (a time-stretch, not a jump).
        self.delay += if target > self.delay {
            (target - self.delay) * 0.2
        } else {
            (target - self.delay) * 0.01
        };
        let t = render_since_anchor - self.delay;
        let base = t.floor();
        let tick = anchor.add(base as i64 as u32);
        let frac = (t - base) as f32;
        let (a, b) = snaps.around(tick);
        let a = a?;
        self.frames += 1;
        match b {
            Some(b) => {
                let span = b.tick.diff(a.tick).max(1) as f32;
                let w = ((tick.diff(a.tick) as f32 + frac) / span).clamp(0.0, 1.0);
                Some(InterpView {
                    tick,
                    frac,
                    entities: lerp_entities(a, b, w),
                    extrapolated: false,
                })
            }
            None => {
                self.underruns += 1;
                let ahead = (f64::from(tick.diff(a.tick)) + f64::from(frac))
                    .clamp(0.0, MAX_EXTRAPOLATION_TICKS);
                let secs = (ahead / self.rate) as f32;
                let entities = a
                    .entities
                    .iter()
                    .map(|e| {
                        let v = Vec2::new(dequantize_vel(e.qvx), dequantize_vel(e.qvy));
                        ViewEntity {
                            pos: pos_of(e) + v * secs,
                            ..view_of(e)
                        }
                    })
                    .collect();
                Some(InterpView {
                    tick,
                    frac,
                    entities,
                    extrapolated: true,
                })
            }
        }
    }
}

fn pos_of(e: &EntityState) -> Vec2 {
    Vec2::new(e.qx as f32 * POS_QUANTUM, e.qy as f32 * POS_QUANTUM)
}

fn view_of(e: &EntityState) -> ViewEntity {
    ViewEntity {
        id: e.id,
        kind: e.kind,
        pos: pos_of(e),
        yaw: dequantize_yaw(e.yaw),
        health: e.health,
    }
}

fn lerp_entities(a: &Snapshot, b: &Snapshot, w: f32) -> Vec<ViewEntity> {
    a.entities
        .iter()
        .map(|e| match b.get(e.id.index).filter(|n| n.id == e.id) {
            Some(n) => ViewEntity {
                pos: pos_of(e).lerp(pos_of(n), w),
                ..view_of(e)
            },
            None => view_of(e),
        })
        .collect()
}

/// The adaptive part of input timing. Inputs are stamped `rtt·rate + margin` ticks ahead, where the
/// margin covers the measured jitter. When the server reports late inputs, the first remedy is to send
/// every input datagram twice (a few ms apart: a lost datagram no longer makes its newest input late,
/// at no latency cost); if lateness persists, the margin grows by a quarter tick per report (at most 2
/// ticks), and it shrinks again by 0.05 tick per clean report.
#[derive(Debug, Clone, Default)]
pub struct LeadControl {
    /// Extra ticks added after late-input reports.
    boost: f64,
    /// Last late-input count the server reported.
    last_late: u64,
    /// Send each input datagram twice.
    duplicate: bool,
    /// Consecutive reports without new late inputs.
    clean_reports: u32,
}

/// The smallest margin, ticks (scheduling noise of both ends).
pub const MIN_MARGIN_TICKS: f64 = 0.35;
/// Clean reports after which duplicate sending stops.
const DUPLICATE_HOLD_REPORTS: u32 = 10;

impl LeadControl {
    /// The margin in ticks for an arrival jitter of `jitter_ticks`.
    #[must_use]
    pub fn margin(&self, jitter_ticks: f64) -> f64 {
        (MIN_MARGIN_TICKS + 3.0 * jitter_ticks + self.boost).min(16.0)
    }

    /// Whether each input datagram should be sent twice.
    #[must_use]
    pub fn duplicate(&self) -> bool {
        self.duplicate
    }

    /// The server's cumulative late-input count (sent once a second).
    pub fn on_late_report(&mut self, late: u64) {
        if late > self.last_late {
            self.clean_reports = 0;
            if self.duplicate {
                self.boost = (self.boost + 0.25).min(2.0);
            } else {
                self.duplicate = true;
            }
        } else {
            self.clean_reports += 1;
            self.boost = (self.boost - 0.05).max(0.0);
            if self.clean_reports >= DUPLICATE_HOLD_REPORTS && self.boost == 0.0 {
                self.duplicate = false;
            }
        }
        self.last_late = late;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn snap(t: u32, x: u32) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            tick: Tick(t),
            entities: vec![EntityState {
                id: EntityId {
                    index: 3,
                    generation: 1,
                },
                kind: EntityKind::Npc,
                qx: x,
                qy: 0,
                qvx: 64, // 2 units/s
                qvy: 0,
                yaw: 0,
                health: 100,
            }],
        })
    }

    #[test]
    fn clean_stream_interpolates_about_two_ticks_back_and_a_stall_extrapolates_boundedly() {
        let rate = 60;
        let mut ring = BaselineRing::new(64);
        let mut it = Interpolator::new(rate);
        let period = 1.0 / 60.0;
        for t in 0..120u32 {
            let now = Duration::from_secs_f64(f64::from(t) * period);
            ring.push(snap(t, t * 2));
            it.on_snapshot(Tick(t), now);
            // Render at the newest tick's clock.
            let v = it.sample(Tick(0), f64::from(t), &ring);
            if t > 10 {
                let v = v.unwrap_or_else(|| panic!("no view at {t}"));
                assert!(!v.extrapolated);
                let x = v.entities[0].pos.x / POS_QUANTUM;
                assert!((x - (f32::from(t as u16) - it.delay() as f32) * 2.0).abs() < 0.01);
            }
        }
        assert!(
            (2.0..=3.0).contains(&it.delay()),
            "delay {} ticks on a clean link",
            it.delay()
        );
        assert_eq!(it.underruns, 0);
        // The stream stops: the view extrapolates, but never more than MAX_EXTRAPOLATION_TICKS.
        for k in 1..30u32 {
            let v = it
                .sample(Tick(0), f64::from(119 + k), &ring)
                .unwrap_or_else(|| panic!("no view"));
            let x = v.entities[0].pos.x / POS_QUANTUM;
            // 2 units/s for at most 6 ticks = 0.2 units = 12.8 quanta past the last snapshot.
            assert!(x <= 119.0 * 2.0 + 12.8 + 0.01, "extrapolated to {x}");
        }
        assert!(it.underruns > 20);
    }

    #[test]
    fn jitter_and_gaps_grow_the_delay() {
        let mut it = Interpolator::new(60);
        let mut ring = BaselineRing::new(64);
        let mut now = 0.0;
        for t in 0..300u32 {
            if t % 10 == 3 {
                continue; // a lost snapshot every 10
            }
            now = f64::from(t) / 60.0 + if t % 2 == 0 { 0.008 } else { 0.0 };
            ring.push(snap(t, t));
            it.on_snapshot(Tick(t), Duration::from_secs_f64(now));
            let _ = it.sample(Tick(0), now * 60.0, &ring);
        }
        assert!(it.delay() > 3.0, "delay {}", it.delay());
        assert!(now > 0.0);
    }

    #[test]
    fn lateness_first_duplicates_then_leads_then_relaxes() {
        let mut l = LeadControl::default();
        assert!(!l.duplicate());
        l.on_late_report(3);
        assert!(l.duplicate(), "first remedy: send twice");
        assert_eq!(l.margin(0.0), MIN_MARGIN_TICKS);
        for late in [5, 9, 12, 20, 30, 40, 50, 60, 70, 80] {
            l.on_late_report(late);
        }
        assert_eq!(
            l.margin(0.0),
            MIN_MARGIN_TICKS + 2.0,
            "lead growth is capped"
        );
        for _ in 0..60 {
            l.on_late_report(80);
        }
        assert_eq!(l.margin(0.0), MIN_MARGIN_TICKS);
        assert!(!l.duplicate());
    }

    #[test]
    fn prediction_replays_unacked_inputs_exactly() {
        let map = Map::open(50.0, 50.0);
        let avatar = EntityId {
            index: 0,
            generation: 1,
        };
        let mut p = Predictor::new(map.clone(), 60, avatar);
        let start = EntityState {
            id: avatar,
            kind: EntityKind::Player,
            qx: 640,
            qy: 640,
            qvx: 0,
            qvy: 0,
            yaw: 0,
            health: 100,
        };
        let s0 = Snapshot {
            tick: Tick(10),
            entities: vec![start],
        };
        assert_eq!(p.on_snapshot(&s0), None, "nothing predicted yet");
        let cmd = |t: u32| InputCmd {
            move_x: 1.0,
            ..InputCmd::idle(Tick(t))
        };
        for t in 11..=20 {
            p.on_input(cmd(t));
        }
        // The server's authoritative run of the same inputs: identical to the prediction.
        let mut e = entity_from_state(&start);
        for t in 11..=15 {
            step_player(&mut e, &cmd(t), &map, 1.0 / 60.0);
        }
        let auth = e.state(&crate::quant::PosQuant::new(50.0, 50.0));
        assert_eq!(
            p.on_snapshot(&Snapshot {
                tick: Tick(15),
                entities: vec![auth]
            }),
            Some(0.0)
        );
        for t in 16..=20 {
            step_player(&mut e, &cmd(t), &map, 1.0 / 60.0);
        }
        let (t, pred) = p.predicted().unwrap_or_else(|| panic!("no prediction"));
        assert_eq!(
            (t, pred.pos, pred.vel),
            (Tick(20), e.pos, e.vel),
            "replayed 16..=20 exactly"
        );
        // The server missed input 16 (it repeated 15's instead: same here) — now a real mismatch:
        // the server says the avatar was knocked back; the client reconciles and smooths.
        let knocked = EntityState { qx: 100, ..auth };
        let err = p
            .on_snapshot(&Snapshot {
                tick: Tick(16),
                entities: vec![knocked],
            })
            .unwrap_or(0.0);
        assert!(err > 1.0);
        assert_eq!(p.corrections, 1);
        let (t, _) = p.predicted().unwrap_or_else(|| panic!("no prediction"));
        assert_eq!(
            t,
            Tick(20),
            "inputs 17..=20 replayed on the corrected state"
        );
    }
}
