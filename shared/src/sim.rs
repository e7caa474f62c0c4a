//! The deterministic arena simulation, shared so that clients can predict with the server's own code.
//!
//! Players accelerate toward their input direction, feel friction, collide with walls and the map
//! bounds, and fire a hitscan weapon. NPCs wander. At the end of every step all state is snapped to the
//! quantization grids of [`crate::quant`], so the snapshot is the exact state. Same map, seed and
//! inputs give the same states, bit for bit.

use glam::Vec2;

use crate::delta::Codec;
use crate::entity::{EntityId, EntityKind, EntityState};
use crate::input::InputCmd;
use crate::map::Map;
use crate::quant::{dequantize_yaw, quantize_vel, quantize_yaw, snap_pos, snap_vel, PosQuant};
use crate::snapshot::Snapshot;
use crate::tick::Tick;

/// Radius of every entity's collision circle, units.
pub const ENTITY_RADIUS: f32 = 0.5;
/// Player acceleration at full input, units/s².
pub const PLAYER_ACCEL: f32 = 60.0;
/// Player top speed, units/s.
pub const PLAYER_MAX_SPEED: f32 = 8.0;
/// Friction: fraction of velocity lost per second (applied as `v *= 1 - FRICTION·dt`).
pub const FRICTION: f32 = 8.0;
/// Below this speed with no input an entity stops, units/s.
pub const STOP_SPEED: f32 = 0.25;
/// NPC walking speed, units/s.
pub const NPC_SPEED: f32 = 3.0;
/// Weapon range, units.
pub const WEAPON_RANGE: f32 = 40.0;
/// Damage per hit.
pub const WEAPON_DAMAGE: u8 = 25;
/// Seconds between shots.
pub const FIRE_INTERVAL_S: f32 = 0.25;
/// Full health.
pub const MAX_HEALTH: u8 = 100;

/// A simulated entity (full precision between steps, snapped at the end of each).
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// Identity.
    pub id: EntityId,
    /// Player or NPC.
    pub kind: EntityKind,
    /// Position, units.
    pub pos: Vec2,
    /// Velocity, units/s.
    pub vel: Vec2,
    /// Orientation, quantized.
    pub yaw: u16,
    /// Health.
    pub health: u8,
    /// Ticks until the weapon may fire again.
    pub cooldown: u16,
}

impl Entity {
    /// The quantized replicated state.
    #[must_use]
    pub fn state(&self, q: &PosQuant) -> EntityState {
        let (qx, qy) = q.quantize(self.pos);
        EntityState {
            id: self.id,
            kind: self.kind,
            qx,
            qy,
            qvx: quantize_vel(self.vel.x),
            qvy: quantize_vel(self.vel.y),
            yaw: self.yaw,
            health: self.health,
        }
    }
}

/// Lag-compensation hook: given the shooter and its input, the target positions it saw (or `None`
/// to judge the shot at the present).
pub type Rewind<'a> = dyn FnMut(EntityId, &InputCmd) -> Option<Vec<(EntityId, Vec2)>> + 'a;

/// Settings of a world.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimConfig {
    /// Ticks per second.
    pub tick_rate: u32,
    /// Number of NPCs kept alive.
    pub npc_count: usize,
    /// Seed of the world's random stream (NPC wandering and spawns).
    pub seed: u64,
}

/// Something that happened during a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimEvent {
    /// An entity fired; `hit` is the entity struck, if any.
    Shot {
        /// Who fired.
        shooter: EntityId,
        /// What the shot struck.
        hit: Option<EntityId>,
        /// True when the shot was judged against rewound (lag-compensated) target positions.
        compensated: bool,
    },
    /// An NPC was destroyed (its slot is freed, and a new NPC spawned).
    Destroyed(EntityId),
}

/// SplitMix64: a small, fast, well-distributed generator; deterministic across platforms.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[derive(Debug, Clone)]
struct Slot {
    generation: u16,
    entity: Option<Entity>,
}

/// The authoritative world.
#[derive(Debug, Clone)]
pub struct World {
    /// The arena.
    map: Map,
    /// Position quantizer derived from the map.
    quant: PosQuant,
    /// Settings.
    cfg: SimConfig,
    /// Seconds per tick.
    dt: f32,
    /// Tick of the current state (the last step's result).
    tick: Tick,
    /// Entity slots; index = entity index.
    slots: Vec<Slot>,
    /// Free slot indices, reused last-freed first.
    free: Vec<u16>,
    /// Random stream.
    rng: Rng,
    /// Players spawned so far (rotates spawn points).
    spawned_players: usize,
}

impl World {
    /// A world at `start_tick` with `cfg.npc_count` NPCs placed from the seed.
    #[must_use]
    pub fn new(map: Map, cfg: SimConfig, start_tick: Tick) -> Self {
        let quant = PosQuant::new(map.width, map.height);
        let mut w = Self {
            map,
            quant,
            cfg,
            dt: 1.0 / cfg.tick_rate.max(1) as f32,
            tick: start_tick,
            slots: Vec::new(),
            free: Vec::new(),
            rng: Rng::new(cfg.seed),
            spawned_players: 0,
        };
        for _ in 0..cfg.npc_count {
            w.spawn_npc();
        }
        w
    }

    /// The map.
    #[must_use]
    pub fn map(&self) -> &Map {
        &self.map
    }

    /// The position quantizer.
    #[must_use]
    pub fn quant(&self) -> &PosQuant {
        &self.quant
    }

    /// The snapshot codec parameters for this world (map grid, tick rate).
    #[must_use]
    pub fn codec(&self) -> Codec {
        Codec {
            quant: self.quant,
            tick_rate: self.cfg.tick_rate.max(1),
        }
    }

    /// Tick of the current state.
    #[must_use]
    pub fn tick(&self) -> Tick {
        self.tick
    }

    /// Number of live entities.
    #[must_use]
    pub fn entity_count(&self) -> usize {
        self.slots.iter().filter(|s| s.entity.is_some()).count()
    }

    /// The live entity with this exact id.
    #[must_use]
    pub fn entity(&self, id: EntityId) -> Option<&Entity> {
        self.slots
            .get(usize::from(id.index))
            .and_then(|s| s.entity.as_ref())
            .filter(|e| e.id == id)
    }

    fn alloc(&mut self, kind: EntityKind, pos: Vec2, vel: Vec2, yaw: u16) -> Option<EntityId> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u16::try_from(self.slots.len()).ok()?;
                self.slots.push(Slot {
                    generation: 0,
                    entity: None,
                });
                i
            }
        };
        let slot = self.slots.get_mut(usize::from(index))?;
        slot.generation = slot.generation.wrapping_add(1);
        let id = EntityId {
            index,
            generation: slot.generation,
        };
        slot.entity = Some(Entity {
            id,
            kind,
            pos: snap_pos(pos),
            vel: snap_vel(vel),
            yaw,
            health: MAX_HEALTH,
            cooldown: 0,
        });
        Some(id)
    }

    fn random_free_point(&mut self) -> Vec2 {
        let (w, h) = (self.map.width, self.map.height);
        for _ in 0..32 {
            let p = Vec2::new(
                ENTITY_RADIUS + self.rng.unit() * (w - 2.0 * ENTITY_RADIUS),
                ENTITY_RADIUS + self.rng.unit() * (h - 2.0 * ENTITY_RADIUS),
            );
            if !self
                .map
                .walls
                .iter()
                .any(|wl| circle_box_overlap(p, wl.min, wl.max))
            {
                return p;
            }
        }
        self.map
            .spawns
            .first()
            .copied()
            .unwrap_or(Vec2::new(w / 2.0, h / 2.0))
    }

    /// Spawns `n` NPCs at random free points (a burst); returns how many were placed.
    pub fn spawn_npcs(&mut self, n: usize) -> usize {
        (0..n).filter_map(|_| self.spawn_npc()).count()
    }

    fn spawn_npc(&mut self) -> Option<EntityId> {
        let p = self.random_free_point();
        let heading = self.rng.unit() * std::f32::consts::TAU;
        let yaw = quantize_yaw(heading);
        let dir = Vec2::from_angle(dequantize_yaw(yaw));
        self.alloc(EntityKind::Npc, p, dir * NPC_SPEED, yaw)
    }

    /// Spawns a player avatar at the next spawn point. `None` only when all 65536 slots are used.
    pub fn spawn_player(&mut self) -> Option<EntityId> {
        let n = self.map.spawns.len().max(1);
        let p = self
            .map
            .spawns
            .get(self.spawned_players % n)
            .copied()
            .unwrap_or(Vec2::ZERO);
        self.spawned_players += 1;
        self.alloc(EntityKind::Player, p, Vec2::ZERO, 0)
    }

    /// Takes a live entity out of the world but keeps its slot reserved (not reused) so the same
    /// entity can come back with [`World::restore`]; returns its state.
    pub fn park(&mut self, id: EntityId) -> Option<Entity> {
        let slot = self.slots.get_mut(usize::from(id.index))?;
        if slot.entity.as_ref().is_none_or(|e| e.id != id) {
            return None;
        }
        slot.entity.take()
    }

    /// Puts a parked entity back into its slot; false if the slot is taken or was reused.
    pub fn restore(&mut self, e: Entity) -> bool {
        match self.slots.get_mut(usize::from(e.id.index)) {
            Some(slot) if slot.entity.is_none() && slot.generation == e.id.generation => {
                slot.entity = Some(e);
                true
            }
            _ => false,
        }
    }

    /// Frees the slot of a parked entity for reuse (its session ended for good).
    pub fn release(&mut self, id: EntityId) {
        if let Some(slot) = self.slots.get(usize::from(id.index)) {
            if slot.entity.is_none() && slot.generation == id.generation {
                self.free.push(id.index);
            }
        }
    }

    /// Removes an entity; false if it was not alive.
    pub fn despawn(&mut self, id: EntityId) -> bool {
        match self.slots.get_mut(usize::from(id.index)) {
            Some(slot) if slot.entity.as_ref().is_some_and(|e| e.id == id) => {
                slot.entity = None;
                self.free.push(id.index);
                true
            }
            _ => false,
        }
    }

    /// Advances one tick. `inputs` gives each player avatar's input for the new tick (avatars without
    /// one stand still). Returns what happened.
    pub fn step(&mut self, inputs: &[(EntityId, InputCmd)], events: &mut Vec<SimEvent>) {
        self.step_with(inputs, &mut |_, _| None, events);
    }

    /// [`World::step`] with lag compensation: for each shot, `rewind(shooter, input)` may return the
    /// positions of the potential targets as the shooter saw them; the shot is then judged against
    /// those (walls from the map) instead of the present positions.
    pub fn step_with(
        &mut self,
        inputs: &[(EntityId, InputCmd)],
        rewind: &mut Rewind<'_>,
        events: &mut Vec<SimEvent>,
    ) {
        self.tick = self.tick.next();
        let dt = self.dt;
        let fire_ticks = (FIRE_INTERVAL_S * self.cfg.tick_rate as f32).ceil() as u16;
        let mut shots: Vec<(EntityId, Vec2, Vec2, InputCmd)> = Vec::new();
        for (id, cmd) in inputs {
            let Some(e) = self
                .slots
                .get_mut(usize::from(id.index))
                .and_then(|s| s.entity.as_mut())
                .filter(|e| e.id == *id && e.kind == EntityKind::Player)
            else {
                continue;
            };
            step_player(e, cmd, &self.map, dt);
            if cmd.fire() && e.cooldown == 0 {
                e.cooldown = fire_ticks;
                shots.push((e.id, e.pos, Vec2::from_angle(dequantize_yaw(e.yaw)), *cmd));
            }
        }
        for i in 0..self.slots.len() {
            let turn = self.rng.unit() < 0.02;
            let heading = self.rng.unit() * std::f32::consts::TAU;
            let Some(e) = self.slots.get_mut(i).and_then(|s| s.entity.as_mut()) else {
                continue;
            };
            e.cooldown = e.cooldown.saturating_sub(1);
            if e.kind == EntityKind::Npc {
                step_npc(e, turn.then_some(heading), &self.map, dt);
            }
        }
        for (shooter, origin, dir, cmd) in shots {
            let (hit, compensated) = match rewind(shooter, &cmd) {
                Some(targets) => (self.hitscan_at(shooter, origin, dir, &targets), true),
                None => (self.hitscan(shooter, origin, dir), false),
            };
            let hit = hit.filter(|h| self.entity(*h).is_some());
            events.push(SimEvent::Shot {
                shooter,
                hit,
                compensated,
            });
            if let Some(target) = hit {
                self.damage(target, events);
            }
        }
    }

    fn damage(&mut self, target: EntityId, events: &mut Vec<SimEvent>) {
        let spawn = self.map.spawns.first().copied().unwrap_or(Vec2::ZERO);
        let Some(e) = self
            .slots
            .get_mut(usize::from(target.index))
            .and_then(|s| s.entity.as_mut())
        else {
            return;
        };
        e.health = e.health.saturating_sub(WEAPON_DAMAGE);
        if e.health > 0 {
            return;
        }
        match e.kind {
            EntityKind::Player => {
                e.health = MAX_HEALTH;
                e.pos = spawn;
                e.vel = Vec2::ZERO;
            }
            EntityKind::Npc => {
                self.despawn(target);
                events.push(SimEvent::Destroyed(target));
                self.spawn_npc();
            }
        }
    }

    /// The nearest entity (other than `shooter`) the ray hits before any wall, within range.
    fn hitscan(&self, shooter: EntityId, origin: Vec2, dir: Vec2) -> Option<EntityId> {
        let mut best = WEAPON_RANGE;
        for w in &self.map.walls {
            if let Some(t) = ray_box(origin, dir, w.min, w.max) {
                best = best.min(t);
            }
        }
        let mut hit = None;
        for e in self.slots.iter().filter_map(|s| s.entity.as_ref()) {
            if e.id == shooter {
                continue;
            }
            if let Some(t) = ray_circle(origin, dir, e.pos, ENTITY_RADIUS) {
                if t < best {
                    best = t;
                    hit = Some(e.id);
                }
            }
        }
        hit
    }

    /// Like `hitscan`, against given target positions (a rewound view).
    fn hitscan_at(
        &self,
        shooter: EntityId,
        origin: Vec2,
        dir: Vec2,
        targets: &[(EntityId, Vec2)],
    ) -> Option<EntityId> {
        let mut best = WEAPON_RANGE;
        for w in &self.map.walls {
            if let Some(t) = ray_box(origin, dir, w.min, w.max) {
                best = best.min(t);
            }
        }
        let mut hit = None;
        for (id, pos) in targets {
            if *id == shooter {
                continue;
            }
            if let Some(t) = ray_circle(origin, dir, *pos, ENTITY_RADIUS) {
                if t < best {
                    best = t;
                    hit = Some(*id);
                }
            }
        }
        hit
    }

    /// The quantized snapshot of the current state.
    #[must_use]
    pub fn snapshot(&self) -> Snapshot {
        let q = self.quant;
        Snapshot {
            tick: self.tick,
            entities: self
                .slots
                .iter()
                .filter_map(|s| s.entity.as_ref())
                .map(|e| e.state(&q))
                .collect(),
        }
    }
}

/// One tick of player movement: the function a predicting client runs for its own avatar.
pub fn step_player(e: &mut Entity, cmd: &InputCmd, map: &Map, dt: f32) {
    let wish = Vec2::new(cmd.move_x, cmd.move_y);
    let wish = if wish.is_finite() {
        wish.clamp_length_max(1.0)
    } else {
        Vec2::ZERO
    };
    let mut v = e.vel + wish * PLAYER_ACCEL * dt;
    v *= (1.0 - FRICTION * dt).max(0.0);
    v = v.clamp_length_max(PLAYER_MAX_SPEED);
    if wish == Vec2::ZERO && v.length() < STOP_SPEED {
        v = Vec2::ZERO;
    }
    e.vel = v;
    e.pos += v * dt;
    collide(e, map);
    e.yaw = quantize_yaw(cmd.aim);
    e.pos = snap_pos(e.pos);
    e.vel = snap_vel(e.vel);
}

fn step_npc(e: &mut Entity, new_heading: Option<f32>, map: &Map, dt: f32) {
    if let Some(h) = new_heading {
        e.yaw = quantize_yaw(h);
        e.vel = Vec2::from_angle(dequantize_yaw(e.yaw)) * NPC_SPEED;
    }
    e.pos += e.vel * dt;
    if collide(e, map) {
        // Turn around (with the new heading snapped, so the state stays on the grid).
        let back = -e.vel;
        e.yaw = quantize_yaw(back.y.atan2(back.x));
        e.vel = Vec2::from_angle(dequantize_yaw(e.yaw)) * NPC_SPEED;
    }
    e.pos = snap_pos(e.pos);
    e.vel = snap_vel(e.vel);
}

/// Pushes the entity out of walls and bounds; returns true if anything was touched.
fn collide(e: &mut Entity, map: &Map) -> bool {
    let r = ENTITY_RADIUS;
    let mut touched = false;
    for w in &map.walls {
        let closest = e.pos.clamp(w.min, w.max);
        let d = e.pos - closest;
        let dist2 = d.length_squared();
        if dist2 >= r * r {
            continue;
        }
        touched = true;
        let normal = if dist2 > 1e-12 {
            let dist = dist2.sqrt();
            let n = d / dist;
            e.pos += n * (r - dist);
            n
        } else {
            // Centre inside the box: leave along the axis of least penetration.
            let exits = [
                (
                    e.pos.x - w.min.x,
                    Vec2::NEG_X,
                    Vec2::new(w.min.x - r, e.pos.y),
                ),
                (w.max.x - e.pos.x, Vec2::X, Vec2::new(w.max.x + r, e.pos.y)),
                (
                    e.pos.y - w.min.y,
                    Vec2::NEG_Y,
                    Vec2::new(e.pos.x, w.min.y - r),
                ),
                (w.max.y - e.pos.y, Vec2::Y, Vec2::new(e.pos.x, w.max.y + r)),
            ];
            let mut best = exits[0];
            for x in exits {
                if x.0 < best.0 {
                    best = x;
                }
            }
            e.pos = best.2;
            best.1
        };
        let into = e.vel.dot(normal);
        if into < 0.0 {
            e.vel -= normal * into;
        }
    }
    let lo = Vec2::splat(r);
    let hi = Vec2::new(map.width - r, map.height - r);
    let clamped = e.pos.clamp(lo, hi);
    if clamped != e.pos {
        touched = true;
        if clamped.x != e.pos.x {
            e.vel.x = 0.0;
        }
        if clamped.y != e.pos.y {
            e.vel.y = 0.0;
        }
        e.pos = clamped;
    }
    touched
}

fn circle_box_overlap(p: Vec2, min: Vec2, max: Vec2) -> bool {
    (p - p.clamp(min, max)).length_squared() < ENTITY_RADIUS * ENTITY_RADIUS
}

/// Distance along a unit ray to a circle, if it is hit ahead of the origin.
fn ray_circle(origin: Vec2, dir: Vec2, centre: Vec2, r: f32) -> Option<f32> {
    let m = origin - centre;
    let b = m.dot(dir);
    let c = m.length_squared() - r * r;
    if c > 0.0 && b > 0.0 {
        return None;
    }
    let disc = b * b - c;
    if disc < 0.0 {
        return None;
    }
    Some((-b - disc.sqrt()).max(0.0))
}

/// Distance along a ray to an axis-aligned box (slab test), if hit ahead of the origin.
fn ray_box(origin: Vec2, dir: Vec2, min: Vec2, max: Vec2) -> Option<f32> {
    let inv = Vec2::ONE / dir;
    let t1 = (min - origin) * inv;
    let t2 = (max - origin) * inv;
    let tmin = t1.min(t2).max_element();
    let tmax = t1.max(t2).min_element();
    (tmax >= tmin.max(0.0)).then_some(tmin.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::map::Wall;

    fn arena() -> Map {
        Map {
            walls: vec![Wall {
                min: Vec2::new(20.0, 0.0),
                max: Vec2::new(22.0, 30.0),
            }],
            spawns: vec![Vec2::new(10.0, 10.0), Vec2::new(30.0, 10.0)],
            ..Map::open(50.0, 40.0)
        }
    }

    fn cfg() -> SimConfig {
        SimConfig {
            tick_rate: 60,
            npc_count: 50,
            seed: 7,
        }
    }

    fn run(ticks: u32) -> Vec<Snapshot> {
        let mut w = World::new(arena(), cfg(), Tick(u32::MAX - 5));
        let p = w.spawn_player().unwrap_or(EntityId {
            index: 0,
            generation: 0,
        });
        let mut ev = Vec::new();
        (0..ticks)
            .map(|t| {
                let cmd = InputCmd {
                    tick: w.tick().next(),
                    move_x: 1.0,
                    move_y: 0.0,
                    aim: t as f32 * 0.01,
                    buttons: 1,
                    view_tick: w.tick().next(),
                    view_frac: 0,
                };
                w.step(&[(p, cmd)], &mut ev);
                w.snapshot()
            })
            .collect()
    }

    #[test]
    fn deterministic_for_same_inputs_and_seed() {
        let a = run(300);
        assert_eq!(a, run(300));
        assert!(a.iter().all(Snapshot::is_well_formed));
    }

    #[test]
    fn player_accelerates_caps_and_stops_at_wall() {
        let map = arena();
        let mut w = World::new(
            map.clone(),
            SimConfig {
                npc_count: 0,
                ..cfg()
            },
            Tick(0),
        );
        let p = w.spawn_player().unwrap_or(EntityId {
            index: 0,
            generation: 0,
        });
        let mut ev = Vec::new();
        for _ in 0..240 {
            let cmd = InputCmd {
                move_x: 1.0,
                ..InputCmd::idle(w.tick().next())
            };
            w.step(&[(p, cmd)], &mut ev);
            let e = w
                .entity(p)
                .cloned()
                .unwrap_or_else(|| panic!("player gone"));
            assert!(e.vel.length() <= PLAYER_MAX_SPEED + 0.05);
            assert!(
                e.pos.x <= 20.0 - ENTITY_RADIUS + 1e-3,
                "went through the wall: {}",
                e.pos.x
            );
        }
        let e = w
            .entity(p)
            .cloned()
            .unwrap_or_else(|| panic!("player gone"));
        assert!(
            (e.pos.x - (20.0 - ENTITY_RADIUS)).abs() < 0.02,
            "rests against the wall at {}",
            e.pos.x
        );
        for _ in 0..60 {
            w.step(&[(p, InputCmd::idle(w.tick().next()))], &mut ev);
        }
        assert_eq!(w.entity(p).map(|e| e.vel), Some(Vec2::ZERO));
    }

    #[test]
    fn npcs_stay_inside_and_off_walls() {
        let mut w = World::new(arena(), cfg(), Tick(0));
        let mut ev = Vec::new();
        for _ in 0..600 {
            w.step(&[], &mut ev);
        }
        for s in w.slots.iter().filter_map(|s| s.entity.as_ref()) {
            assert!(s.pos.x >= ENTITY_RADIUS - 1e-3 && s.pos.x <= 50.0 - ENTITY_RADIUS + 1e-3);
            assert!(s.pos.y >= ENTITY_RADIUS - 1e-3 && s.pos.y <= 40.0 - ENTITY_RADIUS + 1e-3);
            let wall = arena().walls[0];
            let inside = s.pos.x > wall.min.x + 0.05
                && s.pos.x < wall.max.x - 0.05
                && s.pos.y < wall.max.y - 0.05;
            assert!(!inside, "npc inside wall at {:?}", s.pos);
        }
        assert_eq!(w.entity_count(), 50);
    }

    #[test]
    fn hitscan_hits_destroys_and_reuses_slot_with_new_generation() {
        let mut w = World::new(
            Map::open(50.0, 50.0),
            SimConfig {
                npc_count: 0,
                ..cfg()
            },
            Tick(0),
        );
        let p = w.spawn_player().unwrap_or(EntityId {
            index: 0,
            generation: 0,
        });
        let npc = w
            .alloc(EntityKind::Npc, Vec2::new(35.0, 25.0), Vec2::ZERO, 0)
            .unwrap_or(p);
        let mut ev = Vec::new();
        let mut destroyed = false;
        for _ in 0..200 {
            let cmd = InputCmd {
                buttons: 1,
                ..InputCmd::idle(w.tick().next())
            };
            // The npc stands still at first (zero velocity until it turns): aim straight at it.
            let aim = w.entity(npc).map_or(0.0, |n| {
                let d = n.pos - w.entity(p).map_or(Vec2::ZERO, |e| e.pos);
                d.y.atan2(d.x)
            });
            w.step(&[(p, InputCmd { aim, ..cmd })], &mut ev);
            if ev.contains(&SimEvent::Destroyed(npc)) {
                destroyed = true;
                break;
            }
        }
        assert!(destroyed, "events: {ev:?}");
        let hits = ev
            .iter()
            .filter(|e| matches!(e, SimEvent::Shot { hit: Some(_), .. }))
            .count();
        assert_eq!(hits, 4, "four hits of 25 destroy an npc");
        let snap = w.snapshot();
        let reborn = snap.get(npc.index).map(|e| e.id);
        assert_eq!(
            reborn.map(|id| id.generation),
            Some(npc.generation.wrapping_add(1))
        );
    }
}
