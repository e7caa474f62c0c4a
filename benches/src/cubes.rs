//! Fiedler's scene, deterministic: N cubes on a floor, a fixed fraction of them moving at any time
//! (smoothly varying velocity and spin, like pushed physics bodies), the rest at rest. Produces the
//! quantized snapshot of each tick.

use quicktick_shared::entity::{EntityId, EntityKind, EntityState};
use quicktick_shared::quant::{quantize_vel, POS_QUANTUM};
use quicktick_shared::sim::Rng;
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;

/// World size of the cube scene, units.
pub const CUBES_WORLD: f32 = 128.0;

#[derive(Debug, Clone)]
struct Cube {
    /// Position in quanta (exact grid, like the server's snapped state).
    qx: i64,
    qy: i64,
    /// Velocity, units/s.
    vx: f32,
    vy: f32,
    /// Yaw steps and spin in steps per tick.
    yaw: i32,
    spin: i32,
    /// Ticks left moving (0 = at rest).
    moving: u32,
}

/// The cube scene.
#[derive(Debug, Clone)]
pub struct Cubes {
    cubes: Vec<Cube>,
    rng: Rng,
    tick: Tick,
    rate: f32,
    moving_target: usize,
}

impl Cubes {
    /// `n` cubes at rest on a grid, of which `moving_fraction` will be moving at any time.
    #[must_use]
    pub fn new(n: usize, moving_fraction: f32, tick_rate: u32, seed: u64) -> Self {
        let side = (n as f32).sqrt().ceil() as usize;
        let spacing = CUBES_WORLD / (side as f32 + 1.0);
        let cubes = (0..n)
            .map(|i| Cube {
                qx: (((i % side) as f32 + 1.0) * spacing / POS_QUANTUM) as i64,
                qy: (((i / side) as f32 + 1.0) * spacing / POS_QUANTUM) as i64,
                vx: 0.0,
                vy: 0.0,
                yaw: 0,
                spin: 0,
                moving: 0,
            })
            .collect();
        Self {
            cubes,
            rng: Rng::new(seed),
            tick: Tick(0),
            rate: tick_rate as f32,
            moving_target: (n as f32 * moving_fraction).round() as usize,
        }
    }

    /// Advances one tick and returns the snapshot.
    pub fn step(&mut self) -> Snapshot {
        self.tick = self.tick.next();
        let moving = self.cubes.iter().filter(|c| c.moving > 0).count();
        for _ in moving..self.moving_target {
            let i = (self.rng.next_u64() % self.cubes.len() as u64) as usize;
            let (a, s, d) = (self.rng.unit(), self.rng.unit(), self.rng.unit());
            if let Some(c) = self.cubes.get_mut(i) {
                if c.moving == 0 {
                    let ang = a * std::f32::consts::TAU;
                    let speed = 1.0 + 4.0 * s;
                    (c.vx, c.vy) = (ang.cos() * speed, ang.sin() * speed);
                    c.spin = (d * 6.0) as i32 - 3;
                    c.moving = (self.rate * (1.0 + 2.0 * d)) as u32;
                }
            }
        }
        let max_q = (CUBES_WORLD / POS_QUANTUM) as i64;
        let dt = 1.0 / self.rate;
        for c in &mut self.cubes {
            if c.moving == 0 {
                continue;
            }
            // A random push each tick, friction, bounce off the walls.
            let (ax, ay) = ((self.rng.unit() - 0.5) * 6.0, (self.rng.unit() - 0.5) * 6.0);
            c.vx = (c.vx + ax * dt) * (1.0 - 0.5 * dt);
            c.vy = (c.vy + ay * dt) * (1.0 - 0.5 * dt);
            c.moving -= 1;
            if c.moving == 0 {
                (c.vx, c.vy, c.spin) = (0.0, 0.0, 0);
            }
            c.qx += ((c.vx * dt) / POS_QUANTUM).round() as i64;
            c.qy += ((c.vy * dt) / POS_QUANTUM).round() as i64;
            if c.qx < 32 || c.qx > max_q - 32 {
                c.vx = -c.vx;
            }
            if c.qy < 32 || c.qy > max_q - 32 {
                c.vy = -c.vy;
            }
            c.qx = c.qx.clamp(32, max_q - 32);
            c.qy = c.qy.clamp(32, max_q - 32);
            c.yaw = (c.yaw + c.spin).rem_euclid(256);
        }
        Snapshot {
            tick: self.tick,
            entities: self
                .cubes
                .iter()
                .enumerate()
                .map(|(i, c)| EntityState {
                    id: EntityId {
                        index: i as u16,
                        generation: 1,
                    },
                    kind: EntityKind::Npc,
                    qx: c.qx as u32,
                    qy: c.qy as u32,
                    qvx: quantize_vel(c.vx),
                    qvy: quantize_vel(c.vy),
                    yaw: c.yaw as u16,
                    health: 100,
                })
                .collect(),
        }
    }
}
