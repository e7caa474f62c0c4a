//! The whole server core against client sessions, in memory and deterministic: seeded links with
//! loss, jitter (reordering) and duplication; interest management; the bandwidth budget; split
//! snapshots at the QUIC datagram floor. No sockets, no clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use glam::Vec2;
use quicktick_server::core::{CoreEvent, CoreOutput, LinkState, ServerCore};
use quicktick_server::ServerConfig;
use quicktick_shared::client::ClientSession;
use quicktick_shared::input::InputCmd;
use quicktick_shared::link::{LinkConfig, LinkSim};
use quicktick_shared::map::Map;
use quicktick_shared::quant::POS_QUANTUM;
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{InputDatagram, ServerMsg, PROTOCOL_VERSION};

struct Client {
    conn: u64,
    session: ClientSession,
    down: LinkSim,
    up: LinkSim,
    /// Snapshot bytes sent to this client per tick.
    bytes: Vec<usize>,
    /// Complete snapshots that matched the server's view exactly.
    verified: u64,
}

struct Harness {
    core: ServerCore,
    clients: Vec<Client>,
    world: HashMap<u32, Arc<Snapshot>>,
    now: Duration,
    period: Duration,
    mtu: usize,
}

impl Harness {
    fn new(cfg: ServerConfig, map: Map, mtu: usize) -> Self {
        let period = Duration::from_secs_f64(1.0 / f64::from(cfg.tick_rate));
        Self {
            core: ServerCore::new(cfg, map),
            clients: Vec::new(),
            world: HashMap::new(),
            now: Duration::ZERO,
            period,
            mtu,
        }
    }

    fn join(&mut self, n: usize, link: LinkConfig) {
        for _ in 0..n {
            let conn = self.clients.len() as u64 + 1;
            let mut out = Vec::new();
            self.core.handle(
                CoreEvent::Hello {
                    conn,
                    version: PROTOCOL_VERSION,
                    name: format!("c{conn}"),
                },
                &mut out,
            );
            let welcome = out
                .iter()
                .find_map(|o| match o {
                    CoreOutput::Frame(c, ServerMsg::Welcome(w)) if *c == conn => Some(w.clone()),
                    _ => None,
                })
                .expect("welcome");
            self.clients.push(Client {
                conn,
                session: ClientSession::new(welcome, self.now),
                down: LinkSim::new(link, conn * 7919),
                up: LinkSim::new(link, conn * 104_729),
                bytes: Vec::new(),
                verified: 0,
            });
        }
    }

    fn heal(&mut self) {
        for c in &mut self.clients {
            c.down.config.loss = 0.0;
            c.down.config.duplicate = 0.0;
            c.up.config.loss = 0.0;
            c.up.config.duplicate = 0.0;
        }
    }

    fn tick(&mut self) {
        self.now += self.period;
        let now = self.now;
        for c in &mut self.clients {
            for bytes in c.up.poll(now) {
                let datagram = InputDatagram::decode(&bytes).unwrap();
                self.core.handle(
                    CoreEvent::Input {
                        conn: c.conn,
                        datagram,
                        bytes: bytes.len(),
                    },
                    &mut Vec::new(),
                );
            }
            let link = LinkState {
                max_datagram: Some(self.mtu),
                congestion_bytes_per_s: None,
            };
            self.core.set_link(c.conn, link);
        }
        let mut out = Vec::new();
        self.core.tick(&mut out);
        let snap = self.core.current_snapshot().clone();
        self.world.insert(snap.tick.0, snap);
        let mut sent: HashMap<u64, usize> = HashMap::new();
        for o in out {
            if let CoreOutput::Datagram(conn, d) = o {
                assert!(
                    d.len() <= self.mtu,
                    "datagram of {} B over the {} B limit",
                    d.len(),
                    self.mtu
                );
                *sent.entry(conn).or_default() += d.len();
                let c = self.clients.iter_mut().find(|c| c.conn == conn).unwrap();
                c.down.send(now, d);
            }
        }
        let rtt = Duration::from_millis(80);
        for (i, c) in self.clients.iter_mut().enumerate() {
            c.bytes.push(sent.get(&c.conn).copied().unwrap_or(0));
            for bytes in c.down.poll(now) {
                if let Some(got) = c.session.handle_datagram(&bytes, now).unwrap() {
                    let want = self.core.sent_view(c.conn, got.tick).expect("view kept");
                    assert_eq!(
                        *want, *got,
                        "client {i} holds a different view than the server sent"
                    );
                    c.verified += 1;
                }
            }
            let a = (now.as_secs_f32() * 0.7 + i as f32).sin() * std::f32::consts::PI;
            let cmd = InputCmd {
                tick: Tick(0),
                move_x: a.cos(),
                move_y: a.sin(),
                aim: a,
                buttons: 0,
                view_tick: Tick(0),
                view_frac: 0,
            };
            let bytes = c.session.build_input(now, rtt, cmd).unwrap();
            c.up.send(now, bytes);
        }
    }

    /// Asserts each client's newest snapshot is exactly the world within its interest radius.
    fn assert_converged(&self, radius: f32, hysteresis: f32) {
        for (i, c) in self.clients.iter().enumerate() {
            let got = c.session.latest().expect("a snapshot");
            let world = &self.world[&got.tick.0];
            let me = *got
                .get(c.session.welcome().avatar.index)
                .expect("own avatar");
            let d = |e: &quicktick_shared::entity::EntityState| {
                Vec2::new(e.qx as f32 - me.qx as f32, e.qy as f32 - me.qy as f32).length()
                    * POS_QUANTUM
            };
            for e in &got.entities {
                assert_eq!(
                    world.get(e.id.index),
                    Some(e),
                    "client {i}: stale or wrong entity"
                );
                assert!(d(e) <= radius + hysteresis + 0.05);
            }
            for e in world.entities.iter().filter(|e| d(e) < radius - 0.05) {
                assert!(
                    got.get(e.id.index).is_some(),
                    "client {i}: missing entity within the radius"
                );
            }
        }
    }
}

fn open_map(w: f32, h: f32) -> Map {
    Map {
        spawns: vec![Vec2::new(w * 0.3, h * 0.5), Vec2::new(w * 0.7, h * 0.5)],
        ..Map::open(w, h)
    }
}

#[test]
fn converges_exactly_under_loss_reordering_and_duplication() {
    let cfg = ServerConfig {
        npc_count: 400,
        start_tick: u32::MAX - 100,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(cfg.clone(), open_map(160.0, 100.0), 1162);
    let link = LinkConfig {
        loss: 0.10,
        duplicate: 0.05,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(30),
    };
    h.join(6, link);
    for _ in 0..600 {
        h.tick();
    }
    h.heal();
    for _ in 0..30 {
        h.tick();
    }
    h.assert_converged(cfg.interest_radius, cfg.interest_hysteresis);
    for c in &h.clients {
        let k = c.session.counters;
        assert!(c.verified > 300, "verified {}", c.verified);
        assert!(k.deltas > 20 * k.keyframes.max(1), "{k:?}");
        assert!(
            k.missing_baseline + k.stale_parts > 0,
            "the link really was impaired: {k:?}"
        );
    }
    assert!(h.core.world().tick().0 < 1000, "crossed the tick wrap");
}

#[test]
fn burst_of_1000_spawns_with_32_clients_fits_budget_and_converges() {
    let cfg = ServerConfig {
        npc_count: 0,
        max_players: 32,
        ..ServerConfig::default()
    };
    let budget_per_tick = cfg.snapshot_budget_bytes_per_s as f64 / f64::from(cfg.tick_rate);
    let mut h = Harness::new(cfg.clone(), open_map(64.0, 64.0), 1162);
    let clean = LinkConfig {
        latency: Duration::from_millis(16),
        ..LinkConfig::default()
    };
    h.join(32, clean);
    for _ in 0..30 {
        h.tick();
    }
    assert_eq!(h.core.world_mut().spawn_npcs(1000), 1000);
    let burst_tick = h.clients[0].bytes.len();
    let mut converged_after = None;
    for t in 0..240 {
        h.tick();
        let done = h.clients.iter().all(|c| {
            c.session.latest().is_some_and(|s| {
                let me = s.get(c.session.welcome().avatar.index).copied();
                me.is_some_and(|me| {
                    let w = &h.world[&s.tick.0];
                    let near = |e: &&quicktick_shared::entity::EntityState| {
                        Vec2::new(e.qx as f32 - me.qx as f32, e.qy as f32 - me.qy as f32).length()
                            * POS_QUANTUM
                            < cfg.interest_radius - 0.05
                    };
                    w.entities
                        .iter()
                        .filter(near)
                        .all(|e| s.get(e.id.index) == Some(e))
                })
            })
        });
        if done {
            converged_after = Some(t + 1);
            break;
        }
    }
    let ticks = converged_after.expect("clients never converged after the burst");
    assert!(ticks <= 120, "took {ticks} ticks");
    // No client ever exceeded its budget: over every window of 60 ticks, bytes ≤ rate·60 + burst.
    for c in &h.clients {
        let window = 60;
        for w in c.bytes[burst_tick.saturating_sub(5)..].windows(window) {
            let sum: usize = w.iter().sum();
            assert!(
                (sum as f64) <= budget_per_tick * window as f64 + 2.0 * budget_per_tick + 1162.0,
                "window of {sum} B"
            );
        }
    }
}

#[test]
fn the_1200_byte_floor_with_a_crowd() {
    // Every datagram ≤ 1162 B (QUIC's max_datagram_size at the 1200-byte path MTU), with keyframes of
    // hundreds of entities split into parts; checked inside `tick` for every datagram.
    let cfg = ServerConfig {
        npc_count: 1500,
        snapshot_budget_bytes_per_s: 4 << 20,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(cfg, open_map(64.0, 64.0), 1162);
    h.join(
        4,
        LinkConfig {
            latency: Duration::from_millis(5),
            ..LinkConfig::default()
        },
    );
    for _ in 0..60 {
        h.tick();
    }
    assert!(h.clients.iter().all(|c| c.verified > 30));
}
