//! A deterministic in-memory pipeline for size reports: the real server core and real client
//! sessions joined by fixed-latency links (so acks reach the server a known number of ticks after
//! each snapshot), with the raw-state cost of every view measured alongside.

use std::time::Duration;

use quicktick_server::core::{CoreEvent, CoreOutput, LinkState, ServerCore};
use quicktick_server::ServerConfig;
use quicktick_shared::client::ClientSession;
use quicktick_shared::input::InputCmd;
use quicktick_shared::link::{LinkConfig, LinkSim};
use quicktick_shared::map::Map;
use quicktick_shared::quant::{dequantize_vel, dequantize_yaw, POS_QUANTUM};
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{InputDatagram, ServerMsg, PROTOCOL_VERSION};

/// The naive baseline: the fields a client needs, as plain f32s, encoded with bincode.
#[derive(Debug, bincode::Encode)]
pub struct RawEntity {
    /// Entity index.
    pub id: u32,
    /// Kind.
    pub kind: u8,
    /// Position.
    pub pos: [f32; 2],
    /// Velocity.
    pub vel: [f32; 2],
    /// Orientation, radians.
    pub orientation: f32,
}

/// Bytes of the raw full-state encoding of a snapshot (bincode standard config).
#[must_use]
pub fn raw_bytes(s: &Snapshot) -> usize {
    let v: Vec<RawEntity> = s
        .entities
        .iter()
        .map(|e| RawEntity {
            id: u32::from(e.id.index),
            kind: e.kind as u8,
            pos: [e.qx as f32 * POS_QUANTUM, e.qy as f32 * POS_QUANTUM],
            vel: [dequantize_vel(e.qvx), dequantize_vel(e.qvy)],
            orientation: dequantize_yaw(e.yaw),
        })
        .collect();
    bincode::encode_to_vec(&v, bincode::config::standard()).map_or(0, |b| b.len() + 4)
    // + tick
}

/// One client of the pipeline.
#[derive(Debug)]
pub struct PipeClient {
    /// Connection id in the core.
    pub conn: u64,
    /// The real client session.
    pub session: ClientSession,
    down: LinkSim,
    up: LinkSim,
    /// Snapshot bytes sent to this client, per tick.
    pub bytes_per_tick: Vec<usize>,
    /// Raw full-state bytes of the view sent, per tick.
    pub raw_per_tick: Vec<usize>,
}

/// The pipeline.
#[derive(Debug)]
pub struct Pipe {
    /// The real server core.
    pub core: ServerCore,
    /// Its clients.
    pub clients: Vec<PipeClient>,
    /// Recent world snapshots, newest last.
    pub world: std::collections::VecDeque<std::sync::Arc<Snapshot>>,
    now: Duration,
    period: Duration,
    mtu: usize,
}

impl Pipe {
    /// A pipeline around a fresh core.
    #[must_use]
    pub fn new(cfg: ServerConfig, map: Map, mtu: usize) -> Self {
        let period = Duration::from_secs_f64(1.0 / f64::from(cfg.tick_rate));
        Self {
            core: ServerCore::new(cfg, map),
            clients: Vec::new(),
            world: std::collections::VecDeque::new(),
            now: Duration::ZERO,
            period,
            mtu,
        }
    }

    /// Joins `n` clients whose links take `one_way_ticks` ticks each way.
    pub fn join(&mut self, n: usize, one_way_ticks: u32) {
        let link = LinkConfig {
            latency: self.period * one_way_ticks,
            ..LinkConfig::default()
        };
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
            let welcome = out.iter().find_map(|o| match o {
                CoreOutput::Frame(c, ServerMsg::Welcome(w)) if *c == conn => Some(w.clone()),
                _ => None,
            });
            let Some(welcome) = welcome else { continue };
            self.clients.push(PipeClient {
                conn,
                session: ClientSession::new(welcome, self.now),
                down: LinkSim::new(link, conn),
                up: LinkSim::new(link, conn + 1000),
                bytes_per_tick: Vec::new(),
                raw_per_tick: Vec::new(),
            });
        }
    }

    /// The world snapshot of `tick`, if recent.
    #[must_use]
    pub fn world_at(&self, tick: Tick) -> Option<&Snapshot> {
        self.world
            .iter()
            .rev()
            .find(|s| s.tick == tick)
            .map(|s| s.as_ref())
    }

    /// One server tick with deliveries both ways; clients wander.
    pub fn tick(&mut self) {
        self.now += self.period;
        let now = self.now;
        for c in &mut self.clients {
            for bytes in c.up.poll(now) {
                if let Ok(datagram) = InputDatagram::decode(&bytes) {
                    self.core.handle(
                        CoreEvent::Input {
                            conn: c.conn,
                            datagram,
                            bytes: bytes.len(),
                        },
                        &mut Vec::new(),
                    );
                }
            }
            self.core.set_link(
                c.conn,
                LinkState {
                    max_datagram: Some(self.mtu),
                    congestion_bytes_per_s: None,
                },
            );
        }
        let mut out = Vec::new();
        self.core.tick(&mut out);
        let tick = self.core.world().tick();
        if self.world.len() >= 64 {
            self.world.pop_front();
        }
        self.world.push_back(self.core.current_snapshot().clone());
        for c in &mut self.clients {
            let mut sent = 0;
            for o in &out {
                if let CoreOutput::Datagram(conn, d) = o {
                    if *conn == c.conn {
                        sent += d.len();
                        c.down.send(now, d.clone());
                    }
                }
            }
            c.bytes_per_tick.push(sent);
            c.raw_per_tick.push(
                self.core
                    .sent_view(c.conn, tick)
                    .map_or(0, |v| raw_bytes(&v)),
            );
        }
        let rtt = self.period * 4;
        for (i, c) in self.clients.iter_mut().enumerate() {
            for bytes in c.down.poll(now) {
                let _ = c.session.handle_datagram(&bytes, now);
            }
            let a = (now.as_secs_f32() * 0.5 + i as f32 * 1.7).sin() * std::f32::consts::PI;
            let cmd = InputCmd {
                tick: Tick(0),
                move_x: a.cos() * 0.8,
                move_y: a.sin() * 0.8,
                aim: a,
                buttons: 0,
                view_tick: Tick(0),
                view_frac: 0,
            };
            if let Ok(bytes) = c.session.build_input(now, rtt, cmd) {
                c.up.send(now, bytes);
            }
        }
    }
}
