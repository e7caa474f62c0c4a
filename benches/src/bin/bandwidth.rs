//! Deterministic bandwidth report: `cargo run --release -p quicktick-benches --bin bandwidth -- --json`.
//!
//! Scenarios (each at an ack delay of 2 ticks, and a 100 ms-RTT variant): `cubes` (Fiedler's scene:
//! 901 entities, 10 % moving, one client that sees all), `arena` (64 players + 1000 NPCs, default
//! interest radius), `burst` (1000 entities spawned in one tick with 32 clients connected).
//! "raw" is the same fields a client needs (f32 position, velocity, orientation, id, kind) for the
//! same entities, full state every snapshot, encoded with plain bincode; ratio = raw / ours.

use std::sync::Arc;
use std::time::Duration;

use glam::Vec2;
use quicktick_benches::cubes::{Cubes, CUBES_WORLD};
use quicktick_benches::pipeline::{raw_bytes, Pipe};
use quicktick_server::ServerConfig;
use quicktick_shared::client::ClientSession;
use quicktick_shared::delta::{Codec, SnapshotEncoder, MAX_BASELINE_AGE};
use quicktick_shared::entity::EntityId;
use quicktick_shared::input::InputCmd;
use quicktick_shared::link::{LinkConfig, LinkSim};
use quicktick_shared::map::Map;
use quicktick_shared::session::ServerSession;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{InputDatagram, Welcome};
use serde::Serialize;

const HZ: u32 = 60;
const MTU: usize = 1162;

#[derive(Debug, Serialize, Default)]
struct Scenario {
    name: String,
    entities: usize,
    moving_fraction: f64,
    clients: usize,
    tick_hz: u32,
    ack_delay_ticks: u32,
    bytes_per_snapshot_mean: f64,
    kbps_per_client: f64,
    bytes_per_changed_entity: f64,
    /// `None` when under 1 % of the entities in view were unchanged (the figure is meaningless then).
    bits_per_unchanged_entity: Option<f64>,
    raw_kbps_per_client: f64,
    ratio: f64,
    max_datagram_bytes: usize,
    unchanged_per_snapshot: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    converge_ticks: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_exceeded: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_bytes_per_s: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ReportOut {
    scenarios: Vec<Scenario>,
}

fn kbps(bytes_per_snapshot: f64) -> f64 {
    bytes_per_snapshot * f64::from(HZ) * 8.0 / 1000.0
}

/// Fiedler's cubes: one client that sees everything, through the real session and codec.
fn cubes(one_way: u32) -> Scenario {
    let codec = Codec::new(CUBES_WORLD, CUBES_WORLD, HZ);
    let mut scene = Cubes::new(901, 0.10, HZ, 7);
    let welcome = Welcome {
        player_id: 1,
        tick_rate: HZ as u16,
        map_id: "cubes".into(),
        map_width: CUBES_WORLD,
        map_height: CUBES_WORLD,
        avatar: EntityId {
            index: 0,
            generation: 1,
        },
        server_tick: Tick(0),
        input_redundancy: 4,
        players: vec![],
        chat_seq: 0,
        walls: vec![],
        lag_comp_ms: 200,
        resume_token: vec![0; 16],
        grace_ms: 30_000,
    };
    let period = Duration::from_secs_f64(1.0 / f64::from(HZ));
    let mut server = ServerSession::new(1, welcome.avatar, Tick(1), 64);
    let mut client = ClientSession::new(welcome, Duration::ZERO);
    let link = LinkConfig {
        latency: period * one_way,
        ..LinkConfig::default()
    };
    let (mut down, mut up) = (LinkSim::new(link, 1), LinkSim::new(link, 2));
    let mut enc = SnapshotEncoder::new();
    let (mut bytes, mut raw, mut snaps, mut changed, mut unchanged) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut body_bits, mut index_bits, mut max_dg) = (0u64, 0u64, 0usize);
    let mut now = Duration::ZERO;
    let warmup = 120;
    for t in 0..(warmup + 1200) {
        now += period;
        for b in up.poll(now) {
            if let Ok(d) = InputDatagram::decode(&b) {
                server.handle_input(&d, b.len());
            }
        }
        let snap = Arc::new(scene.step());
        let mut out = Vec::new();
        let Ok(stats) =
            server.encode_snapshot(&snap, &mut enc, &codec, MTU, MAX_BASELINE_AGE, &mut out)
        else {
            continue;
        };
        for d in out {
            max_dg = max_dg.max(d.len());
            down.send(now, d);
        }
        if t >= warmup && !stats.keyframe {
            snaps += 1;
            bytes += stats.bytes as u64;
            raw += raw_bytes(&snap) as u64;
            changed += stats.changed as u64;
            unchanged += (snap.entities.len() - stats.changed) as u64;
            body_bits += stats.body_bits as u64;
            index_bits += stats.index_bits as u64;
        }
        for b in down.poll(now) {
            let _ = client.handle_datagram(&b, now);
        }
        if let Ok(b) = client.build_input(now, period * (2 * one_way), InputCmd::idle(Tick(0))) {
            up.send(now, b);
        }
    }
    let mean = bytes as f64 / snaps.max(1) as f64;
    let raw_mean = raw as f64 / snaps.max(1) as f64;
    Scenario {
        name: "cubes".into(),
        entities: 901,
        moving_fraction: changed as f64 / (changed + unchanged).max(1) as f64,
        clients: 1,
        tick_hz: HZ,
        ack_delay_ticks: 2 * one_way,
        bytes_per_snapshot_mean: mean,
        kbps_per_client: kbps(mean),
        bytes_per_changed_entity: body_bits as f64 / 8.0 / changed.max(1) as f64,
        bits_per_unchanged_entity: (unchanged * 100 >= changed + unchanged)
            .then(|| index_bits.saturating_sub(changed) as f64 / unchanged.max(1) as f64),
        raw_kbps_per_client: kbps(raw_mean),
        ratio: raw_mean / mean.max(1e-9),
        max_datagram_bytes: max_dg,
        unchanged_per_snapshot: unchanged as f64 / snaps.max(1) as f64,
        ..Scenario::default()
    }
}

fn summarize(name: &str, pipe: &Pipe, from_tick: usize, entities: usize, one_way: u32) -> Scenario {
    let c = pipe.core.counters;
    let clients = pipe.clients.len();
    let window = |v: &Vec<usize>| v.iter().skip(from_tick).sum::<usize>();
    let bytes: usize = pipe.clients.iter().map(|c| window(&c.bytes_per_tick)).sum();
    let raw: usize = pipe.clients.iter().map(|c| window(&c.raw_per_tick)).sum();
    let snaps = pipe
        .clients
        .iter()
        .map(|c| c.bytes_per_tick.len().saturating_sub(from_tick))
        .sum::<usize>();
    let mean = bytes as f64 / snaps.max(1) as f64;
    let raw_mean = raw as f64 / snaps.max(1) as f64;
    let unchanged = c.view_entities.saturating_sub(c.entries);
    Scenario {
        name: name.into(),
        entities,
        moving_fraction: c.entries as f64 / c.view_entities.max(1) as f64,
        clients,
        tick_hz: HZ,
        ack_delay_ticks: 2 * one_way,
        bytes_per_snapshot_mean: mean,
        kbps_per_client: kbps(mean),
        bytes_per_changed_entity: c.body_bits as f64 / 8.0 / c.entries.max(1) as f64,
        bits_per_unchanged_entity: (unchanged * 100 >= c.view_entities)
            .then(|| c.index_bits.saturating_sub(c.entries) as f64 / unchanged.max(1) as f64),
        raw_kbps_per_client: kbps(raw_mean),
        ratio: raw_mean / mean.max(1e-9),
        max_datagram_bytes: c.max_datagram_bytes as usize,
        unchanged_per_snapshot: unchanged as f64
            / c.keyframes.saturating_add(c.deltas).max(1) as f64,
        ..Scenario::default()
    }
}

fn arena_map() -> Map {
    Map::from_toml(quicktick_server::config::BUILTIN_MAP).unwrap_or_else(|_| Map::open(128.0, 80.0))
}

fn arena(one_way: u32) -> Scenario {
    let cfg = ServerConfig {
        npc_count: 1000,
        max_players: 64,
        ..ServerConfig::default()
    };
    let mut pipe = Pipe::new(cfg, arena_map(), MTU);
    pipe.join(64, one_way);
    for _ in 0..(120 + 600) {
        pipe.tick();
    }
    summarize("arena", &pipe, 120, 1064, one_way)
}

fn burst(one_way: u32) -> Scenario {
    let cfg = ServerConfig {
        npc_count: 0,
        max_players: 32,
        ..ServerConfig::default()
    };
    let budget = cfg.snapshot_budget_bytes_per_s;
    let radius = cfg.interest_radius;
    let map = Map {
        spawns: vec![Vec2::new(32.0, 32.0)],
        ..Map::open(64.0, 64.0)
    };
    let mut pipe = Pipe::new(cfg, map, MTU);
    pipe.join(32, one_way);
    for _ in 0..60 {
        pipe.tick();
    }
    let placed = pipe.core.world_mut().spawn_npcs(1000);
    let since = pipe.core.world().tick().next();
    let start = pipe.clients.first().map_or(0, |c| c.bytes_per_tick.len());
    let mut converge = None;
    for t in 1..=600u32 {
        pipe.tick();
        if converge.is_none() && converged(&pipe, radius, since) {
            converge = Some(t);
        }
    }
    let per_tick = budget as f64 / f64::from(HZ);
    let exceeded = pipe.clients.iter().any(|c| {
        c.bytes_per_tick.windows(HZ as usize).any(|w| {
            w.iter().sum::<usize>() as f64 > per_tick * f64::from(HZ) + 2.0 * per_tick + MTU as f64
        })
    });
    let mut s = summarize("burst", &pipe, start, placed + 32, one_way);
    s.converge_ticks = converge;
    s.budget_exceeded = Some(exceeded);
    s.budget_bytes_per_s = Some(budget);
    s
}

/// Every client's newest view holds every entity within its interest radius, exactly as the world
/// had it at that tick, and is at most a few ticks old.
fn converged(pipe: &Pipe, radius: f32, since: Tick) -> bool {
    let now = pipe.core.world().tick();
    pipe.clients.iter().all(|c| {
        let Some(s) = c.session.latest() else {
            return false;
        };
        let Some(world) = pipe.world_at(s.tick) else {
            return false;
        };
        let Some(me) = world.get(c.session.welcome().avatar.index) else {
            return false;
        };
        let r_q = radius / quicktick_shared::quant::POS_QUANTUM - 1.0;
        now.diff(s.tick) <= 8
            && !since.is_after(s.tick)
            && world.entities.iter().all(|e| {
                let d = Vec2::new(e.qx as f32 - me.qx as f32, e.qy as f32 - me.qy as f32).length();
                d >= r_q || s.get(e.id.index) == Some(e)
            })
    })
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let mut scenarios = Vec::new();
    for one_way in [1u32, 3] {
        scenarios.push(cubes(one_way));
        scenarios.push(arena(one_way));
        scenarios.push(burst(one_way));
    }
    if json {
        match serde_json::to_string_pretty(&ReportOut { scenarios }) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("bandwidth: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    println!(
        "{:<7} {:>5} {:>4} {:>5} {:>8} {:>9} {:>9} {:>8} {:>10} {:>6} {:>6}",
        "name",
        "ents",
        "cli",
        "ack",
        "B/snap",
        "kbps",
        "B/chg",
        "b/unch",
        "raw kbps",
        "ratio",
        "conv"
    );
    for s in &scenarios {
        println!(
            "{:<7} {:>5} {:>4} {:>5} {:>8.1} {:>9.1} {:>9.2} {:>8} {:>10.1} {:>6.1} {:>6}",
            s.name,
            s.entities,
            s.clients,
            s.ack_delay_ticks,
            s.bytes_per_snapshot_mean,
            s.kbps_per_client,
            s.bytes_per_changed_entity,
            s.bits_per_unchanged_entity
                .map_or("n/a".into(), |b| format!("{b:.3}")),
            s.raw_kbps_per_client,
            s.ratio,
            s.converge_ticks.map_or("-".into(), |t| t.to_string())
        );
    }
}
