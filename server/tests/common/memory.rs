//! In-memory harness: the real server core and real client sessions over seeded impaired links.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

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

pub struct Client {
    pub conn: u64,
    pub session: ClientSession,
    pub down: LinkSim,
    pub up: LinkSim,
    /// Snapshot bytes sent to this client per tick.
    pub bytes: Vec<usize>,
    /// Complete snapshots that matched the server's view exactly.
    pub verified: u64,
}

pub struct Harness {
    pub core: ServerCore,
    pub clients: Vec<Client>,
    pub world: HashMap<u32, Arc<Snapshot>>,
    pub now: Duration,
    pub period: Duration,
    pub mtu: usize,
}

impl Harness {
    pub fn new(cfg: ServerConfig, map: Map, mtu: usize) -> Self {
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

    pub fn join(&mut self, n: usize, link: LinkConfig) {
        for _ in 0..n {
            let conn = self.clients.len() as u64 + 1;
            let mut out = Vec::new();
            self.core.handle(
                CoreEvent::Hello {
                    conn,
                    version: PROTOCOL_VERSION,
                    name: format!("c{conn}"),
                    token: None,
                    now_unix: 0,
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

    pub fn heal(&mut self) {
        for c in &mut self.clients {
            c.down.config.loss = 0.0;
            c.down.config.duplicate = 0.0;
            c.up.config.loss = 0.0;
            c.up.config.duplicate = 0.0;
        }
    }

    pub fn tick(&mut self) {
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
    pub fn assert_converged(&self, radius: f32, hysteresis: f32) {
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

/// An open map with two spawn points.
pub fn open_map(w: f32, h: f32) -> Map {
    Map {
        spawns: vec![Vec2::new(w * 0.3, h * 0.5), Vec2::new(w * 0.7, h * 0.5)],
        ..Map::open(w, h)
    }
}
