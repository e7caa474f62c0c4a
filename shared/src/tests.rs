//! In-memory end-to-end tests of the core: the server-side pipeline (world → history → per-client
//! delta encode) and client sessions joined by a seeded link that loses, delays, reorders and
//! duplicates datagrams. No sockets, no clock: time is the tick counter.

use std::sync::Arc;
use std::time::Duration;

use glam::Vec2;

use crate::client::ClientSession;
use crate::delta::{decode_part, SnapshotEncoder, MAX_BASELINE_AGE};
use crate::entity::EntityId;
use crate::input::InputCmd;
use crate::map::Map;
use crate::session::ServerSession;
use crate::sim::{Rng, SimConfig, SimEvent, World};
use crate::snapshot::{Snapshot, SnapshotHistory};
use crate::tick::Tick;
use crate::wire::{InputDatagram, Welcome};

/// A one-way impaired link: each datagram is lost, duplicated and delayed by a seeded draw.
struct Link {
    rng: Rng,
    loss: f32,
    dup: f32,
    max_delay: u64,
    /// (deliver at step, sequence for stable ordering, bytes)
    queue: Vec<(u64, u64, Vec<u8>)>,
    seq: u64,
}

impl Link {
    fn new(seed: u64, loss: f32, dup: f32, max_delay: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            loss,
            dup,
            max_delay,
            queue: Vec::new(),
            seq: 0,
        }
    }

    fn send(&mut self, now: u64, bytes: Vec<u8>) {
        if self.rng.unit() < self.loss {
            return;
        }
        let copies = if self.rng.unit() < self.dup { 2 } else { 1 };
        for _ in 0..copies {
            let delay = 1 + (self.rng.next_u64() % self.max_delay.max(1));
            self.seq += 1;
            self.queue.push((now + delay, self.seq, bytes.clone()));
        }
    }

    fn deliver(&mut self, now: u64) -> Vec<Vec<u8>> {
        let mut due: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let mut keep = Vec::new();
        for item in self.queue.drain(..) {
            if item.0 <= now {
                due.push(item);
            } else {
                keep.push(item);
            }
        }
        self.queue = keep;
        // Reorder within the delivery step too.
        due.sort_by_key(|d| (d.0, d.1 % 7, d.1));
        due.into_iter().map(|d| d.2).collect()
    }
}

struct Harness {
    world: World,
    history: SnapshotHistory,
    encoder: SnapshotEncoder,
    clients: Vec<(ServerSession, ClientSession, Link, Link)>,
    mtu: usize,
    step: u64,
    /// Every complete snapshot any client assembled was equal to the server's: checked each step.
    verified: u64,
}

const RATE: u32 = 60;

impl Harness {
    fn new(
        clients: usize,
        npcs: usize,
        start: Tick,
        mtu: usize,
        loss: f32,
        dup: f32,
        max_delay: u64,
    ) -> Self {
        let map = Map {
            walls: vec![],
            spawns: vec![Vec2::new(10.0, 10.0)],
            ..Map::open(200.0, 120.0)
        };
        let mut world = World::new(
            map,
            SimConfig {
                tick_rate: RATE,
                npc_count: npcs,
                seed: 99,
            },
            start,
        );
        let mut cs = Vec::new();
        for i in 0..clients {
            let avatar = world.spawn_player().unwrap_or(EntityId {
                index: 0,
                generation: 0,
            });
            let welcome = Welcome {
                player_id: i as u32 + 1,
                tick_rate: RATE as u16,
                map_id: "open".into(),
                map_width: 200.0,
                map_height: 120.0,
                avatar,
                server_tick: world.tick(),
                input_redundancy: 4,
                players: vec![],
                chat_seq: 0,
                walls: vec![],
                lag_comp_ms: 200,
                resume_token: vec![0; 16],
                grace_ms: 30_000,
            };
            let server = ServerSession::new(i as u32 + 1, avatar, world.tick().next(), 64);
            let client = ClientSession::new(welcome, Duration::ZERO);
            let seed = 1000 + i as u64;
            cs.push((
                server,
                client,
                Link::new(seed, loss, dup, max_delay),
                Link::new(seed * 31, loss, dup, max_delay),
            ));
        }
        let mut history = SnapshotHistory::new(64);
        history.push(Arc::new(world.snapshot()));
        Self {
            world,
            history,
            encoder: SnapshotEncoder::new(),
            clients: cs,
            mtu,
            step: 0,
            verified: 0,
        }
    }

    fn now(&self) -> Duration {
        Duration::from_secs_f64(self.step as f64 / f64::from(RATE))
    }

    /// One server tick: apply inputs, step, snapshot, send to each client; then deliver both ways.
    fn tick(&mut self, inputs_fn: &mut dyn FnMut(u64, usize) -> InputCmd) {
        self.step += 1;
        let now = self.now();
        let step = self.step;
        // Uplink delivery, then the tick uses what arrived.
        for (server, _, _, up) in &mut self.clients {
            for bytes in up.deliver(step) {
                if let Ok(d) = InputDatagram::decode(&bytes) {
                    server.handle_input(&d, bytes.len());
                }
            }
        }
        let inputs: Vec<(EntityId, InputCmd)> = self
            .clients
            .iter_mut()
            .map(|(s, _, _, _)| (s.avatar, s.inputs.take().0))
            .collect();
        let mut events: Vec<SimEvent> = Vec::new();
        self.world.step(&inputs, &mut events);
        let snap = Arc::new(self.world.snapshot());
        self.history.push(snap.clone());
        let codec = self.world.codec();
        for (server, _, down, _) in &mut self.clients {
            let mut out = Vec::new();
            let stats = server.encode_snapshot(
                &snap,
                &mut self.encoder,
                &codec,
                self.mtu,
                MAX_BASELINE_AGE,
                &mut out,
            );
            assert!(stats.is_ok(), "{stats:?}");
            for d in out {
                assert!(d.len() <= self.mtu, "datagram {} > {}", d.len(), self.mtu);
                down.send(step, d);
            }
        }
        for (i, (_, client, down, up)) in self.clients.iter_mut().enumerate() {
            for bytes in down.deliver(step) {
                match client.handle_datagram(&bytes, now) {
                    Ok(Some(got)) => {
                        let want = self.history.get(got.tick);
                        assert_eq!(
                            want.map(|w| w.as_ref()),
                            Some(got.as_ref()),
                            "client {i} diverged at {}",
                            got.tick
                        );
                        self.verified += 1;
                    }
                    Ok(None) => {}
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
            let cmd = inputs_fn(step, i);
            // The round trip the shell would measure (the link's worst case both ways).
            let rtt =
                Duration::from_secs_f64((down.max_delay + up.max_delay) as f64 / f64::from(RATE));
            if let Ok(bytes) = client.build_input(now, rtt, cmd) {
                up.send(step, bytes);
            }
        }
    }

    fn heal(&mut self) {
        for (_, _, down, up) in &mut self.clients {
            down.loss = 0.0;
            down.dup = 0.0;
            up.loss = 0.0;
            up.dup = 0.0;
        }
    }

    fn server_snapshot(&self) -> &Snapshot {
        self.history
            .get(self.world.tick())
            .map_or_else(|| panic!("no current snapshot"), |s| s.as_ref())
    }
}

fn wander(step: u64, i: usize) -> InputCmd {
    let a = (step as f32 * 0.013 + i as f32).sin() * std::f32::consts::PI;
    InputCmd {
        tick: Tick(0),
        move_x: a.cos() * 0.9,
        move_y: a.sin() * 0.9,
        aim: a,
        buttons: u8::from(step.is_multiple_of(20)),
        ..InputCmd::idle(Tick(0))
    }
}

#[test]
fn converges_exactly_under_loss_reordering_and_duplication() {
    // Start near the u32 wrap so the whole pipeline crosses it.
    let mut h = Harness::new(4, 300, Tick(u32::MAX - 200), 1162, 0.10, 0.05, 4);
    for _ in 0..600 {
        h.tick(&mut wander);
    }
    h.heal();
    for _ in 0..20 {
        h.tick(&mut wander);
    }
    let server = h.server_snapshot().clone();
    for (s, c, _, _) in &h.clients {
        let got = c.latest().map(|s| s.as_ref());
        // After the link heals, the newest snapshot is at most the delivery delay behind.
        let got = got.unwrap_or_else(|| panic!("client has nothing"));
        assert!(
            server.tick.diff(got.tick) <= 4,
            "client lags {} ticks",
            server.tick.diff(got.tick)
        );
        assert_eq!(h.history.get(got.tick).map(|x| x.as_ref()), Some(got));
        let cc = c.counters;
        assert!(
            cc.deltas > cc.keyframes * 10,
            "deltas {} keyframes {}",
            cc.deltas,
            cc.keyframes
        );
        assert!(
            cc.missing_baseline > 0 || cc.stale_parts > 0,
            "the link really was impaired"
        );
        assert_eq!(cc.decode_errors, 0);
        // Inputs flowed: most ticks applied the client's own input despite the loss.
        let ic = s.inputs.counters;
        assert!(ic.applied > 500, "{ic:?} {cc:?}");
        assert!(
            ic.duplicates > 0,
            "redundant copies were dropped as duplicates"
        );
    }
    assert!(h.verified > 1500, "verified {}", h.verified);
    assert!(h.world.tick().0 < 1000, "the tick counter wrapped");
}

#[test]
fn split_snapshots_fit_the_mtu_floor_and_reassemble() {
    // 3000 entities force multi-part keyframes at the QUIC datagram floor.
    let mut h = Harness::new(2, 3000, Tick(5), 1162, 0.0, 0.0, 1);
    for _ in 0..30 {
        h.tick(&mut wander);
    }
    for (s, c, _, _) in &h.clients {
        assert!(
            s.counters.snapshot_parts > s.counters.keyframes_sent + s.counters.deltas_sent,
            "snapshots were split"
        );
        assert_eq!(c.latest().map(|x| x.tick), Some(h.world.tick().sub(1)));
    }
}

#[test]
fn split_snapshots_survive_loss_of_parts() {
    let mut h = Harness::new(2, 2500, Tick(0), 1200, 0.1, 0.1, 3);
    for _ in 0..300 {
        h.tick(&mut wander);
    }
    h.heal();
    for _ in 0..20 {
        h.tick(&mut wander);
    }
    for (_, c, _, _) in &h.clients {
        let got = c.latest().unwrap_or_else(|| panic!("nothing assembled"));
        assert!(h.world.tick().diff(got.tick) <= 3);
    }
}

#[test]
fn hostile_snapshot_bytes_never_panic() {
    let mut h = Harness::new(1, 50, Tick(0), 1162, 0.0, 0.0, 1);
    h.tick(&mut wander);
    let snap = h.server_snapshot().clone();
    let mut enc = SnapshotEncoder::new();
    let mut out = Vec::new();
    let codec = h.world.codec();
    assert!(enc
        .encode(&codec, &snap, None, None, 1162, &mut out)
        .is_ok());
    let good = out.first().cloned().unwrap_or_default();
    let mut rng = Rng::new(5);
    let mut client = ClientSession::new(h.clients[0].1.welcome().clone(), Duration::ZERO);
    for n in 0..good.len() {
        let _ = decode_part(good.get(..n).unwrap_or_default(), &codec);
    }
    for _ in 0..20_000 {
        let mut b = good.clone();
        let flips = 1 + rng.next_u64() % 8;
        for _ in 0..flips {
            let i = (rng.next_u64() as usize) % b.len();
            if let Some(x) = b.get_mut(i) {
                *x ^= 1 << (rng.next_u64() % 8);
            }
        }
        let _ = client.handle_datagram(&b, Duration::ZERO);
        let len = (rng.next_u64() % 1500) as usize;
        let junk: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let _ = client.handle_datagram(&junk, Duration::ZERO);
    }
}

#[test]
fn old_baselines_use_the_extended_age_and_stay_exact() {
    use crate::delta::apply_part;
    use crate::entity::{EntityKind, EntityState};
    let e = |index: u16, qx: u32, qvx: i32| EntityState {
        id: EntityId {
            index,
            generation: 1,
        },
        kind: EntityKind::Player,
        qx,
        qy: 640,
        qvx,
        qvy: 0,
        yaw: 3,
        health: 100,
    };
    let codec = crate::delta::Codec::new(100.0, 100.0, 60);
    for age in [1u32, 254, 255, 256, 600, 65535] {
        let base = Snapshot {
            tick: Tick(u32::MAX - 10),
            entities: vec![e(0, 100, 64), e(1, 2000, -30), e(2, 50, 0)],
        };
        let new = Snapshot {
            tick: base.tick.add(age),
            entities: vec![e(0, 3000, 64), e(1, 1990, 0), e(3, 70, 0)],
        };
        let mut out = Vec::new();
        let stats = SnapshotEncoder::new().encode(&codec, &new, Some(&base), None, 1162, &mut out);
        assert!(stats.is_ok(), "age {age}: {stats:?}");
        let bytes = out.first().map_or(&[][..], |v| v.as_slice());
        let part = decode_part(bytes, &codec).unwrap_or_else(|e| panic!("age {age}: {e}"));
        assert_eq!(part.header.baseline, Some(base.tick), "age {age}");
        let applied = apply_part(Some(&base), &part, &codec).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(applied, new.entities, "age {age}");
    }
    // 255 followed by a 16-bit age below 255 is not canonical: refused.
    let mut w = crate::bits::BitWriter::with_capacity(16);
    w.write(1000, 32);
    w.write(255, 8);
    w.write(7, 16);
    let mut bytes = vec![crate::delta::DATAGRAM_SNAPSHOT];
    bytes.extend_from_slice(&w.finish());
    assert!(decode_part(&bytes, &codec).is_err());
}

#[test]
fn despawn_and_respawn_in_one_tick_is_exact() {
    use crate::delta::apply_part;
    use crate::entity::{EntityKind, EntityState};
    let e = |index: u16, generation: u16, qx: u32| EntityState {
        id: EntityId { index, generation },
        kind: EntityKind::Npc,
        qx,
        qy: 10,
        qvx: 0,
        qvy: 0,
        yaw: 0,
        health: 100,
    };
    let codec = crate::delta::Codec::new(100.0, 100.0, 60);
    let base = Snapshot {
        tick: Tick(65535),
        entities: vec![e(0, 1, 5), e(1, 1, 6), e(7, 3, 7)],
    };
    let new = Snapshot {
        tick: Tick(65536),
        entities: vec![e(0, 1, 5), e(1, 2, 6), e(9, 1, 100)],
    };
    let mut out = Vec::new();
    let stats = SnapshotEncoder::new().encode(&codec, &new, Some(&base), None, 1162, &mut out);
    assert_eq!(stats.map(|s| s.changed), Ok(3)); // slot 1 replaced, 7 despawned, 9 spawned
    let part = decode_part(out.first().map_or(&[][..], |v| v.as_slice()), &codec)
        .unwrap_or_else(|e| panic!("{e}"));
    let applied = apply_part(Some(&base), &part, &codec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(applied, new.entities);
    // The same part applied to a baseline the receiver does not hold is refused.
    let other = Snapshot {
        tick: Tick(65534),
        ..base
    };
    assert!(apply_part(Some(&other), &part, &codec).is_err());
}

#[test]
fn unchanged_world_costs_header_only() {
    use crate::entity::{EntityKind, EntityState};
    let codec = crate::delta::Codec::new(100.0, 100.0, 60);
    let entities: Vec<EntityState> = (0..1000u16)
        .map(|i| EntityState {
            id: EntityId {
                index: i,
                generation: 1,
            },
            kind: EntityKind::Npc,
            qx: 1,
            qy: 2,
            qvx: 0,
            qvy: 0,
            yaw: 0,
            health: 1,
        })
        .collect();
    let a = Snapshot {
        tick: Tick(1),
        entities: entities.clone(),
    };
    let b = Snapshot {
        tick: Tick(2),
        entities,
    };
    let mut out = Vec::new();
    let stats = SnapshotEncoder::new().encode(&codec, &b, Some(&a), None, 1162, &mut out);
    assert_eq!(stats.map(|s| (s.parts, s.bytes <= 17)), Ok((1, true)));
}
