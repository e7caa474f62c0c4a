//! The client side of a session, sans-IO: reassembles and applies snapshot parts against the baselines
//! it holds, tracks what to acknowledge, estimates the server tick and stamps inputs. The client
//! library in `bot-client` drives it from its sockets; tests drive it from memory.

use std::sync::Arc;
use std::time::Duration;

use crate::assembler::{Assembled, BaselineRing, SnapshotAssembler};
use crate::delta::{apply_part, decode_part, ApplyError, Codec, DecodeError};
use crate::input::{InputCmd, InputHistory};
use crate::map::{Map, Wall};
use crate::netcode::{InterpView, Interpolator, LeadControl, Predictor};
use crate::snapshot::Snapshot;
use crate::tick::Tick;
use crate::wire::{InputDatagram, Resumed, Welcome, WireError};

/// Complete snapshots kept as possible baselines (the server's history is at most 255 ticks).
pub const BASELINE_RING: usize = 256;

/// Counters of a client session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCounters {
    /// Complete snapshots assembled.
    pub snapshots: u64,
    /// Of which keyframes.
    pub keyframes: u64,
    /// Of which deltas.
    pub deltas: u64,
    /// Bytes of all complete snapshots (sum of their parts).
    pub snapshot_bytes: u64,
    /// Largest complete snapshot, bytes.
    pub snapshot_bytes_max: u64,
    /// Snapshot datagrams received.
    pub parts: u64,
    /// Datagrams that failed to decode or apply.
    pub decode_errors: u64,
    /// Parts whose baseline is not held (discarded, not acked).
    pub missing_baseline: u64,
    /// Parts for ticks not newer than the newest complete snapshot.
    pub stale_parts: u64,
    /// Parts received twice.
    pub duplicate_parts: u64,
    /// Input datagrams built.
    pub input_datagrams: u64,
    /// Distinct input ticks stamped.
    pub inputs: u64,
    /// Sessions continued on a new connection.
    pub resumes: u64,
    /// Keyframes received as the first snapshot after a resume.
    pub resume_keyframes: u64,
}

/// Why a datagram from the server was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// Malformed snapshot part.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A part that cannot be applied to its baseline.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// An input datagram could not be encoded.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Server-tick estimator from snapshot arrivals. Keeps the estimate at the least-delayed arrivals
/// (fast to move later, slow to move earlier), so jitter does not drag it back.
#[derive(Debug, Clone)]
pub struct TickClock {
    /// Ticks per second.
    rate: f64,
    /// The tick all estimates are relative to.
    anchor: Tick,
    /// Estimated `server_tick - anchor - now·rate`, ticks.
    offset: f64,
}

impl TickClock {
    /// A clock that saw tick `tick` at time `now`.
    #[must_use]
    pub fn new(rate: u32, tick: Tick, now: Duration) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            anchor: tick,
            offset: -now.as_secs_f64() * rate,
        }
    }

    /// Takes in an observation: the server's tick `tick` was seen at `now`.
    pub fn observe(&mut self, tick: Tick, now: Duration) {
        let sample = f64::from(tick.diff(self.anchor)) - now.as_secs_f64() * self.rate;
        let err = sample - self.offset;
        if err.abs() > self.rate {
            self.offset = sample; // more than a second off: resynchronise
        } else if err > 0.0 {
            self.offset += err * 0.25;
        } else {
            self.offset += err * 0.01;
        }
    }

    /// The tick estimates are relative to.
    #[must_use]
    pub fn anchor(&self) -> Tick {
        self.anchor
    }

    /// Estimated server tick at `now` plus `lead` ticks, as a fractional tick count since the anchor.
    #[must_use]
    pub fn estimate(&self, now: Duration, lead: f64) -> f64 {
        now.as_secs_f64() * self.rate + self.offset + lead
    }

    /// The tick to stamp an input with at `now`: far enough ahead to arrive before the server needs
    /// it, given the round trip `rtt` and a safety `margin` in ticks.
    #[must_use]
    pub fn input_tick(&self, now: Duration, rtt: Duration, margin: f64) -> Tick {
        let ahead =
            (self.estimate(now, rtt.as_secs_f64() * self.rate + margin) - SEND_SLACK).ceil();
        self.anchor.add(ahead as i64 as u32)
    }

    /// How long until the input for `tick` is due: the moment the lead-adjusted clock reaches
    /// `tick - SEND_SLACK`. A shell that sends each input then (instead of on a free-running timer)
    /// has it arrive `margin` ticks before the server needs it, and no earlier — so no extra tick of
    /// input latency.
    #[must_use]
    pub fn until_due(&self, now: Duration, rtt: Duration, margin: f64, tick: Tick) -> Duration {
        let lead = self.estimate(now, rtt.as_secs_f64() * self.rate + margin);
        let ticks = f64::from(tick.diff(self.anchor)) - SEND_SLACK - lead;
        Duration::try_from_secs_f64(ticks / self.rate).unwrap_or(Duration::ZERO)
    }
}

/// How far before its due time (in ticks) an input is stamped and sent.
pub const SEND_SLACK: f64 = 0.1;

fn map_of(welcome: &Welcome) -> Map {
    Map {
        id: welcome.map_id.clone(),
        width: welcome.map_width,
        height: welcome.map_height,
        walls: welcome
            .walls
            .iter()
            .map(|w| Wall {
                min: glam::Vec2::new(w[0], w[1]),
                max: glam::Vec2::new(w[2], w[3]),
            })
            .collect(),
        spawns: Vec::new(),
    }
}

/// The client session.
#[derive(Debug)]
pub struct ClientSession {
    /// What the server told us on joining.
    welcome: Welcome,
    /// Snapshot codec parameters (map grid, tick rate).
    codec: Codec,
    /// Complete snapshots (possible baselines).
    baselines: BaselineRing,
    /// Incomplete split snapshots.
    assembler: SnapshotAssembler,
    /// Recent inputs for redundancy.
    history: InputHistory,
    /// Server tick estimate.
    clock: TickClock,
    /// Fixed lead margin in ticks, overriding the adaptive one (tests).
    margin_override: Option<f64>,
    /// Adaptive input lead.
    lead: LeadControl,
    /// Own-avatar prediction and reconciliation.
    predictor: Predictor,
    /// Remote-entity interpolation.
    interp: Interpolator,
    /// When each recent input tick was first sent, for input-to-snapshot latency.
    send_times: std::collections::VecDeque<(Tick, Duration)>,
    /// Input-to-snapshot latencies measured since the shell last drained them.
    pub latency_samples: Vec<Duration>,
    /// Newest input tick the server reports having applied.
    input_ack: Option<Tick>,
    /// Set by a resume until the next complete snapshot (counts resume keyframes).
    first_after_resume: bool,
    /// Counters.
    pub counters: ClientCounters,
}

impl ClientSession {
    /// A session after `welcome` arrived at `now`.
    #[must_use]
    pub fn new(welcome: Welcome, now: Duration) -> Self {
        let codec = Codec::new(
            welcome.map_width,
            welcome.map_height,
            u32::from(welcome.tick_rate),
        );
        // The welcome is sent while the server simulates `server_tick + 1` (joins are handled at the start
        // of a tick), so that is the tick "now"; the first input that can still be applied is the next.
        let clock = TickClock::new(
            u32::from(welcome.tick_rate),
            welcome.server_tick.next(),
            now,
        );
        let history = InputHistory::new(usize::from(welcome.input_redundancy));
        let predictor = Predictor::new(
            map_of(&welcome),
            u32::from(welcome.tick_rate),
            welcome.avatar,
        );
        let interp = Interpolator::new(u32::from(welcome.tick_rate));
        Self {
            welcome,
            codec,
            baselines: BaselineRing::new(BASELINE_RING),
            assembler: SnapshotAssembler::new(),
            history,
            clock,
            margin_override: None,
            lead: LeadControl::default(),
            predictor,
            interp,
            send_times: std::collections::VecDeque::new(),
            latency_samples: Vec::new(),
            input_ack: None,
            first_after_resume: false,
            counters: ClientCounters::default(),
        }
    }

    /// Continues after `resumed` arrived at `now` on a new connection: the held snapshots stay (the
    /// server deltas against one of them), the tick clock restarts from the resume as from a welcome,
    /// and per-connection state (incomplete parts, input window, latency probes, prediction) starts
    /// over.
    pub fn resume(&mut self, resumed: &Resumed, now: Duration) {
        let rate = u32::from(self.welcome.tick_rate);
        self.clock = TickClock::new(rate, resumed.server_tick.next(), now);
        self.assembler = SnapshotAssembler::new();
        self.history = InputHistory::new(usize::from(self.welcome.input_redundancy));
        self.send_times.clear();
        self.input_ack = None;
        self.welcome.avatar = resumed.avatar;
        self.welcome.players.clone_from(&resumed.players);
        self.predictor = Predictor::new(map_of(&self.welcome), rate, resumed.avatar);
        self.counters.resumes += 1;
        self.first_after_resume = true;
    }

    /// The welcome this session started from.
    #[must_use]
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The newest complete snapshot.
    #[must_use]
    pub fn latest(&self) -> Option<&Arc<Snapshot>> {
        self.baselines.newest()
    }

    /// The tick to acknowledge: the newest complete snapshot held.
    #[must_use]
    pub fn snapshot_ack(&self) -> Option<Tick> {
        self.baselines.newest().map(|s| s.tick)
    }

    /// Newest input tick the server has applied for us, from the latest snapshot header.
    #[must_use]
    pub fn input_ack(&self) -> Option<Tick> {
        self.input_ack
    }

    /// Fixes the lead margin in ticks added on top of the round trip (default: adaptive).
    pub fn set_margin(&mut self, ticks: f64) {
        self.margin_override = Some(ticks.clamp(0.0, 64.0));
    }

    /// The lead margin in use, ticks.
    #[must_use]
    pub fn margin(&self) -> f64 {
        self.margin_override
            .unwrap_or_else(|| self.lead.margin(self.interp.jitter()))
    }

    /// Whether the shell should send each input datagram twice (the server reported late inputs).
    #[must_use]
    pub fn duplicate_inputs(&self) -> bool {
        self.lead.duplicate()
    }

    /// The server's once-a-second input report (cumulative late count) adapts the lead.
    pub fn on_input_stats(&mut self, late: u64) {
        self.lead.on_late_report(late);
    }

    /// Own-avatar prediction.
    #[must_use]
    pub fn predictor(&self) -> &Predictor {
        &self.predictor
    }

    /// Own-avatar prediction, mutably (to drain its error samples).
    pub fn predictor_mut(&mut self) -> &mut Predictor {
        &mut self.predictor
    }

    /// Remote-entity interpolation state.
    #[must_use]
    pub fn interpolator(&self) -> &Interpolator {
        &self.interp
    }

    /// The render time at `now`: the interpolation delay behind the estimated server tick, as a
    /// tick and a fraction in 1/256ths (what inputs carry for lag compensation).
    #[must_use]
    pub fn view_time(&self, now: Duration) -> (Tick, u8) {
        let t = self.clock.estimate(now, 0.0) - self.interp.delay();
        let base = t.floor();
        let frac = ((t - base) * 256.0).clamp(0.0, 255.0) as u8;
        (self.clock.anchor().add(base as i64 as u32), frac)
    }

    /// What to show at `now`: remote entities interpolated from the snapshot buffer (bounded
    /// extrapolation when it runs dry, counted as an underrun).
    pub fn interpolate(&mut self, now: Duration) -> Option<InterpView> {
        let t = self.clock.estimate(now, 0.0);
        self.interp.sample(self.clock.anchor(), t, &self.baselines)
    }

    /// Handles one snapshot datagram received at `now`. Returns the snapshot it completed, if any.
    pub fn handle_datagram(
        &mut self,
        bytes: &[u8],
        now: Duration,
    ) -> Result<Option<Arc<Snapshot>>, ClientError> {
        self.counters.parts += 1;
        let part = match decode_part(bytes, &self.codec) {
            Ok(p) => p,
            Err(e) => {
                self.counters.decode_errors += 1;
                return Err(e.into());
            }
        };
        let h = part.header;
        if self
            .baselines
            .newest()
            .is_some_and(|n| !h.tick.is_after(n.tick))
        {
            self.counters.stale_parts += 1;
            return Ok(None);
        }
        let baseline = match h.baseline {
            None => None,
            Some(t) => match self.baselines.get(t) {
                Some(b) => Some(b.clone()),
                None => {
                    self.counters.missing_baseline += 1;
                    return Ok(None);
                }
            },
        };
        let entities = match apply_part(baseline.as_deref(), &part, &self.codec) {
            Ok(e) => e,
            Err(e) => {
                self.counters.decode_errors += 1;
                return Err(e.into());
            }
        };
        match self.assembler.insert(
            h.tick,
            h.baseline,
            h.range_start,
            h.range_end,
            entities,
            bytes.len(),
        ) {
            Assembled::Complete(snap, size) => {
                let snap = Arc::new(snap);
                self.baselines.push(snap.clone());
                self.assembler.discard_through(h.tick);
                self.clock.observe(h.tick, now);
                self.interp.on_snapshot(h.tick, now);
                self.predictor.on_snapshot(&snap);
                if let Some(a) = h.input_ack {
                    if self.input_ack.is_none_or(|old| a.is_after(old)) {
                        self.input_ack = Some(a);
                        while let Some(&(t, sent)) = self.send_times.front() {
                            if t.is_after(a) {
                                break;
                            }
                            self.send_times.pop_front();
                            if self.latency_samples.len() < 4096 {
                                self.latency_samples.push(now.saturating_sub(sent));
                            }
                        }
                    }
                }
                let c = &mut self.counters;
                c.snapshots += 1;
                if std::mem::take(&mut self.first_after_resume) && h.baseline.is_none() {
                    c.resume_keyframes += 1;
                }
                if h.baseline.is_none() {
                    c.keyframes += 1;
                } else {
                    c.deltas += 1;
                }
                c.snapshot_bytes += size as u64;
                c.snapshot_bytes_max = c.snapshot_bytes_max.max(size as u64);
                Ok(Some(snap))
            }
            Assembled::Duplicate => {
                self.counters.duplicate_parts += 1;
                Ok(None)
            }
            Assembled::Incomplete | Assembled::Inconsistent => Ok(None),
        }
    }

    /// The tick an input made at `now` should be stamped with.
    #[must_use]
    pub fn input_tick(&self, now: Duration, rtt: Duration) -> Tick {
        self.clock.input_tick(now, rtt, self.margin())
    }

    /// How long the shell should wait before calling [`ClientSession::build_input`] again so the
    /// next input goes out just before it is due (never more than one tick of extra latency, and
    /// none when the shell follows this).
    #[must_use]
    pub fn next_input_wait(&self, now: Duration, rtt: Duration) -> Duration {
        let next = self
            .history
            .newest_tick()
            .map_or_else(|| self.input_tick(now, rtt), Tick::next);
        self.clock.until_due(now, rtt, self.margin(), next)
    }

    /// Records `input` (movement/aim/buttons; its tick is ignored) for every tick up to the one due at
    /// `now`, and returns the input datagram to send: the last few inputs plus the snapshot ack.
    pub fn build_input(
        &mut self,
        now: Duration,
        rtt: Duration,
        input: InputCmd,
    ) -> Result<Vec<u8>, ClientError> {
        let target = self.input_tick(now, rtt);
        let first = match self.history.newest_tick() {
            None => target,
            Some(n) if target.is_after(n) => {
                // Fill skipped ticks (a stalled client), but never more than the window holds.
                let gap = target.diff(n) as u32;
                n.add(1 + gap.saturating_sub(u32::from(self.welcome.input_redundancy.max(1))))
            }
            Some(_) => target.add(1), // the estimate moved back: nothing new to stamp
        };
        let (view_tick, view_frac) = self.view_time(now);
        let mut t = first;
        while !t.is_after(target) {
            let cmd = InputCmd {
                tick: t,
                view_tick,
                view_frac,
                ..input
            };
            if self.history.push(cmd) {
                self.counters.inputs += 1;
                self.predictor.on_input(cmd);
                if self.send_times.len() >= 256 {
                    self.send_times.pop_front();
                }
                self.send_times.push_back((t, now));
            }
            t = t.next();
        }
        self.counters.input_datagrams += 1;
        let d = InputDatagram {
            snapshot_ack: self.snapshot_ack(),
            inputs: self.history.window(),
        };
        Ok(d.encode()?)
    }
}
