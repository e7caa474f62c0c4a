//! Per-client replication: from the world snapshot, the client's acked view (baseline), its interest
//! set and its byte budget, build the view it will hold at this tick and the datagrams that take it
//! there. Changes compete by a priority accumulator (own avatar first, then spawns/despawns, then by
//! distance and time waiting), so over budget far entities update less often but are never starved.

use std::sync::Arc;

use quicktick_shared::delta::{
    body_bits, diff_sorted, Change, Codec, EncodeError, EncodeStats, SnapshotEncoder, GAP_MAX_BITS,
    HEADER_MAX_BITS,
};
use quicktick_shared::entity::{EntityId, EntityState};
use quicktick_shared::quant::POS_QUANTUM;
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;

use crate::interest::{dist2, Grid, InterestConfig};

/// Per-client replication state (kept between ticks).
#[derive(Debug, Default, Clone)]
pub struct Replicator {
    /// Priority accumulated by entities whose change is waiting, by slot index (grown on demand).
    acc: Vec<f32>,
    /// Byte budget tokens available (a bucket refilled every tick).
    tokens: f64,
    /// Changes deferred by the budget so far.
    pub deferred: u64,
    /// This tick's wanted set (positions in the world snapshot, sorted), from [`Replicator::select`].
    wanted: Vec<u32>,
}

/// Inputs of one replication step that do not belong to the client.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The world at this tick.
    pub world: &'a Snapshot,
    /// The grid built from `world`.
    pub grid: &'a Grid,
    /// Codec parameters.
    pub codec: &'a Codec,
    /// Interest settings.
    pub interest: InterestConfig,
}

/// Per-client limits of one replication step.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest datagram allowed now.
    pub max_datagram: usize,
    /// Bytes added to the budget this tick (config budget ∧ congestion allowance, per tick).
    pub refill: f64,
    /// Most bytes the budget may hold (burst).
    pub capacity: f64,
}

/// Priority of a change that must go out now (the client's own avatar).
const MUST: f32 = f32::INFINITY;

/// Scratch space reused across clients within a tick.
#[derive(Debug, Default)]
pub struct Scratch {
    near: Vec<u32>,
    picks: Vec<(f32, usize, u16)>,
}

impl Replicator {
    /// Builds this client's view at `frame.world.tick` and encodes the datagrams that take the
    /// client from `baseline` to it. Returns the view (to be recorded as sent) and the encode stats.
    /// [`Replicator::select`] then [`Replicator::replicate`] (the core calls the halves separately
    /// so that interest and encode are timed as two phases).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        frame: &Frame<'_>,
        avatar: EntityId,
        baseline: Option<&Snapshot>,
        input_ack: Option<Tick>,
        limits: Limits,
        scratch: &mut Scratch,
        encoder: &mut SnapshotEncoder,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(Arc<Snapshot>, EncodeStats), EncodeError> {
        self.select(frame, avatar, baseline, scratch);
        self.replicate(
            frame, avatar, baseline, input_ack, limits, scratch, encoder, out,
        )
    }

    /// Interest: the entities this client should hold at this tick (near its avatar, with
    /// hysteresis for those it holds in `baseline`), kept for [`Replicator::replicate`].
    pub fn select(
        &mut self,
        frame: &Frame<'_>,
        avatar: EntityId,
        baseline: Option<&Snapshot>,
        scratch: &mut Scratch,
    ) {
        let world = frame.world;
        let me = world.get(avatar.index).filter(|e| e.id == avatar).copied();
        let (cx, cy) = me.map_or((0, 0), |e| (e.qx, e.qy));
        let r = (frame.interest.radius / POS_QUANTUM) as u64;
        let r_out = ((frame.interest.radius + frame.interest.hysteresis) / POS_QUANTUM) as u64;
        scratch.near.clear();
        self.wanted.clear();
        if me.is_some() {
            frame.grid.query(cx, cy, r_out as u32, &mut scratch.near);
        }
        for &pos in &scratch.near {
            let Some(e) = world.entities.get(pos as usize) else {
                continue;
            };
            let d2 = dist2(e, cx, cy);
            let held = || {
                baseline
                    .and_then(|b| b.get(e.id.index))
                    .is_some_and(|b| b.id == e.id)
            };
            if e.id == avatar || d2 <= r * r || (d2 <= r_out * r_out && held()) {
                self.wanted.push(pos);
            }
        }
        self.wanted.sort_unstable();
    }

    /// Builds this client's view from the set chosen by [`Replicator::select`] (same `frame` and
    /// `baseline`) and encodes the datagrams that take the client from `baseline` to it. Returns
    /// the view (to be recorded as sent) and the encode stats.
    #[allow(clippy::too_many_arguments)]
    pub fn replicate(
        &mut self,
        frame: &Frame<'_>,
        avatar: EntityId,
        baseline: Option<&Snapshot>,
        input_ack: Option<Tick>,
        limits: Limits,
        scratch: &mut Scratch,
        encoder: &mut SnapshotEncoder,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(Arc<Snapshot>, EncodeStats), EncodeError> {
        let world = frame.world;
        let tick = world.tick;
        let me = world.get(avatar.index).filter(|e| e.id == avatar).copied();
        let (cx, cy) = me.map_or((0, 0), |e| (e.qx, e.qy));

        // 2. Changes from the baseline to the wanted set, merged by index.
        let base: &[EntityState] = baseline.map_or(&[], |b| b.entities.as_slice());
        let mut changes: Vec<Change<'_>> = Vec::new();
        let wanted_set = std::mem::take(&mut self.wanted);
        let wanted = wanted_set
            .iter()
            .filter_map(|p| world.entities.get(*p as usize));
        diff_sorted(base, wanted, &mut changes);
        self.wanted = wanted_set; // keep the allocation for the next tick

        // 3. The budget decides which changes go now.
        self.tokens =
            (self.tokens + limits.refill).min(limits.capacity.max(limits.max_datagram as f64));
        let age = baseline.map_or(0, |b| tick.diff(b.tick).max(0) as u32);
        let per_part = (HEADER_MAX_BITS + 8).div_ceil(8);
        let budget_bytes = self.tokens.max(0.0) as usize;
        let cost = |c: &Change<'_>| GAP_MAX_BITS + body_bits(frame.codec, age, c);
        let total_bits: usize = changes.iter().map(cost).sum();
        let parts_needed =
            total_bits / (limits.max_datagram.saturating_sub(per_part).max(1) * 8) + 1;
        let chosen: Vec<Change<'_>> = if total_bits / 8 + parts_needed * per_part <= budget_bytes {
            for c in &changes {
                self.reset(c.index());
            }
            changes
        } else {
            scratch.picks.clear();
            for (i, c) in changes.iter().enumerate() {
                let idx = c.index();
                let p = match c {
                    _ if idx == avatar.index => MUST,
                    Change::Spawn(_) | Change::Despawn(_) => self.bump(idx, 4.0),
                    Change::Update { new, .. } => {
                        let d = (dist2(new, cx, cy) as f32).sqrt() * POS_QUANTUM;
                        self.bump(idx, 1.0 / (1.0 + d / frame.interest.radius.max(1.0)))
                    }
                };
                scratch.picks.push((p, i, idx));
            }
            scratch.picks.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
            let mut used_bits = 0usize;
            let mut keep = vec![false; changes.len()];
            let parts = budget_bytes / limits.max_datagram.max(1) + 1;
            let budget_bits = budget_bytes.saturating_sub(parts * per_part) * 8;
            for &(p, i, idx) in &scratch.picks {
                let Some(c) = changes.get(i) else { continue };
                let bits = cost(c);
                if p == MUST || used_bits + bits <= budget_bits {
                    used_bits += bits;
                    if let Some(k) = keep.get_mut(i) {
                        *k = true;
                    }
                    self.reset(idx);
                } else {
                    self.deferred += 1;
                }
            }
            changes
                .into_iter()
                .zip(keep)
                .filter_map(|(c, k)| k.then_some(c))
                .collect()
        };

        // 4. The view the client will hold: the baseline with the chosen changes applied.
        let mut view = Vec::with_capacity(base.len() + chosen.len());
        let mut bi = 0usize;
        for c in &chosen {
            let idx = c.index();
            while let Some(b) = base.get(bi).filter(|b| b.id.index < idx) {
                view.push(*b);
                bi += 1;
            }
            if base.get(bi).is_some_and(|b| b.id.index == idx) {
                bi += 1;
            }
            match c {
                Change::Spawn(n) | Change::Update { new: n, .. } => view.push(**n),
                Change::Despawn(_) => {}
            }
        }
        view.extend_from_slice(base.get(bi..).unwrap_or(&[]));

        // 5. Encode.
        let stats = encoder.encode_changes(
            frame.codec,
            tick,
            baseline.map(|b| b.tick),
            &chosen,
            input_ack,
            limits.max_datagram,
            out,
        )?;
        self.tokens -= stats.bytes as f64;
        Ok((
            Arc::new(Snapshot {
                tick,
                entities: view,
            }),
            stats,
        ))
    }

    fn bump(&mut self, idx: u16, w: f32) -> f32 {
        let i = usize::from(idx);
        if self.acc.len() <= i {
            self.acc.resize(i + 1, 0.0);
        }
        match self.acc.get_mut(i) {
            Some(a) => {
                *a += w;
                *a
            }
            None => w,
        }
    }

    fn reset(&mut self, idx: u16) {
        if let Some(a) = self.acc.get_mut(usize::from(idx)) {
            *a = 0.0;
        }
    }

    /// Budget tokens currently available, bytes (negative after a forced send).
    #[must_use]
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicktick_shared::delta::{decode_part, EntityOp};
    use quicktick_shared::entity::{EntityKind, EntityState};

    const R: f32 = 32.0;
    const H: f32 = 4.0;

    fn ent(index: u16, kind: EntityKind, x: f32, y: f32) -> EntityState {
        EntityState {
            id: EntityId {
                index,
                generation: 1,
            },
            kind,
            qx: (x / POS_QUANTUM) as u32,
            qy: (y / POS_QUANTUM) as u32,
            qvx: 0,
            qvy: 0,
            yaw: 0,
            health: 100,
        }
    }

    struct Rig {
        codec: Codec,
        grid: Grid,
        rep: Replicator,
        scratch: Scratch,
        enc: SnapshotEncoder,
        view: Option<Arc<Snapshot>>,
    }

    impl Rig {
        fn new() -> Self {
            Self {
                codec: Codec::new(200.0, 200.0, 60),
                grid: Grid::default(),
                rep: Replicator::default(),
                scratch: Scratch::default(),
                enc: SnapshotEncoder::new(),
                view: None,
            }
        }

        /// One step for the client whose avatar is entity 0; returns the decoded ops sent.
        fn step(&mut self, tick: u32, entities: Vec<EntityState>, refill: f64) -> Vec<EntityOp> {
            let world = Snapshot {
                tick: Tick(tick),
                entities,
            };
            self.grid.rebuild(
                &world,
                (R / POS_QUANTUM) as u32,
                self.codec.quant.max_qx,
                self.codec.quant.max_qy,
            );
            let frame = Frame {
                world: &world,
                grid: &self.grid,
                codec: &self.codec,
                interest: InterestConfig {
                    radius: R,
                    hysteresis: H,
                },
            };
            let limits = Limits {
                max_datagram: 1162,
                refill,
                capacity: 2.0 * refill,
            };
            let mut out = Vec::new();
            let avatar = EntityId {
                index: 0,
                generation: 1,
            };
            let (view, _) = self
                .rep
                .step(
                    &frame,
                    avatar,
                    self.view.as_deref(),
                    None,
                    limits,
                    &mut self.scratch,
                    &mut self.enc,
                    &mut out,
                )
                .unwrap();
            self.view = Some(view);
            out.iter()
                .flat_map(|d| decode_part(d, &self.codec).unwrap().ops)
                .collect()
        }

        fn holds(&self, index: u16) -> bool {
            self.view.as_ref().is_some_and(|v| v.get(index).is_some())
        }
    }

    fn me() -> EntityState {
        ent(0, EntityKind::Player, 100.0, 100.0)
    }

    #[test]
    fn interest_hysteresis_and_reentry_as_full_state() {
        let mut r = Rig::new();
        let ops = r.step(
            1,
            vec![
                me(),
                ent(5, EntityKind::Npc, 110.0, 100.0),
                ent(6, EntityKind::Npc, 150.0, 100.0),
            ],
            1e6,
        );
        assert!(ops.iter().all(|o| matches!(o, EntityOp::Spawn(_))));
        assert!(r.holds(5) && !r.holds(6), "inside the radius only");
        // 34 units away: inside radius + hysteresis, so a held entity stays …
        r.step(
            2,
            vec![
                me(),
                ent(5, EntityKind::Npc, 134.0, 100.0),
                ent(6, EntityKind::Npc, 134.0, 100.0),
            ],
            1e6,
        );
        assert!(r.holds(5), "held entity kept by hysteresis");
        assert!(!r.holds(6), "a new entity needs to be inside the radius");
        // … and leaves beyond it, as a despawn.
        let ops = r.step(3, vec![me(), ent(5, EntityKind::Npc, 140.0, 100.0)], 1e6);
        assert_eq!(ops, vec![EntityOp::Despawn(5)]);
        // Re-entry arrives as full state.
        let ops = r.step(4, vec![me(), ent(5, EntityKind::Npc, 120.0, 100.0)], 1e6);
        assert_eq!(
            ops,
            vec![EntityOp::Spawn(ent(5, EntityKind::Npc, 120.0, 100.0))]
        );
    }

    #[test]
    fn despawn_goes_only_to_clients_that_knew_the_entity() {
        let mut near = Rig::new();
        let mut far = Rig::new();
        let npc = ent(7, EntityKind::Npc, 105.0, 100.0);
        near.step(1, vec![me(), npc], 1e6);
        far.step(1, vec![ent(0, EntityKind::Player, 10.0, 10.0), npc], 1e6);
        assert!(near.holds(7) && !far.holds(7));
        assert_eq!(near.step(2, vec![me()], 1e6), vec![EntityOp::Despawn(7)]);
        assert!(far
            .step(2, vec![ent(0, EntityKind::Player, 10.0, 10.0)], 1e6)
            .is_empty());
    }

    #[test]
    fn over_budget_own_avatar_first_and_nobody_starves() {
        let mut r = Rig::new();
        let mut world: Vec<EntityState> = vec![me()];
        world.extend((1..=300u16).map(|i| {
            ent(
                i,
                EntityKind::Npc,
                100.0 + f32::from(i % 20),
                100.0 + f32::from(i / 20),
            )
        }));
        // ~300 spawns of ~9 B each need ~2.7 kB; give 600 B per tick.
        let mut last_seen = vec![0u32; 301];
        for t in 1..=40u32 {
            for e in world.iter_mut() {
                e.qx += 1; // everything moves every tick
            }
            let ops = r.step(t, world.clone(), 600.0);
            assert!(
                ops.iter().any(|o| o.index() == 0),
                "own avatar in every snapshot"
            );
            for o in &ops {
                last_seen[usize::from(o.index())] = t;
            }
            assert!(r.rep.tokens() > -1200.0);
        }
        assert!(r.rep.deferred > 0, "the budget really limited");
        let stalest = last_seen.iter().skip(1).map(|t| 40 - t).max().unwrap();
        assert!(stalest <= 12, "an entity waited {stalest} ticks");
    }
}
