//! Shared set-up for quicktick's criterion benches and size reports: a server core with `clients`
//! joined players that ack every snapshot two ticks late (as a client on a short link would), so the
//! measured tick includes inputs, simulation, snapshot and per-client delta encoding.
//!
//! - [`cubes`]: Fiedler's cube scene (N entities, a fraction moving).
//! - [`pipeline`]: the real core and client sessions over fixed-latency links, for size reports.

pub mod cubes;
pub mod pipeline;

use quicktick_server::core::{CoreEvent, CoreOutput, ServerCore};
use quicktick_server::ServerConfig;
use quicktick_shared::input::InputCmd;
use quicktick_shared::map::Map;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{InputDatagram, PROTOCOL_VERSION};

/// The default arena map.
#[must_use]
pub fn arena() -> Map {
    Map::from_toml(quicktick_server::config::BUILTIN_MAP).unwrap_or_else(|_| Map::open(128.0, 80.0))
}

/// A server core with `clients` players and `npcs` NPCs, warmed up so every client is on deltas.
#[must_use]
pub fn loaded_core(clients: usize, npcs: usize) -> (ServerCore, Vec<u64>) {
    let cfg = ServerConfig {
        npc_count: npcs,
        max_players: clients.max(1),
        ..ServerConfig::default()
    };
    let mut core = ServerCore::new(cfg, arena());
    let mut out = Vec::new();
    let conns: Vec<u64> = (1..=clients as u64).collect();
    for &c in &conns {
        core.handle(
            CoreEvent::Hello {
                conn: c,
                version: PROTOCOL_VERSION,
                name: format!("p{c}"),
                token: None,
                now_unix: 0,
            },
            &mut out,
        );
        core.set_max_datagram(c, Some(1162));
    }
    for _ in 0..10 {
        step(&mut core, &conns, &mut out);
    }
    (core, conns)
}

/// One tick as the tick thread runs it: each client's input datagram (acking two ticks back), then
/// the core tick. Returns the number of snapshot bytes produced.
pub fn step(core: &mut ServerCore, conns: &[u64], out: &mut Vec<CoreOutput>) -> usize {
    let t = core.world().tick();
    for (i, &c) in conns.iter().enumerate() {
        let a = (t.0 as f32 * 0.05 + i as f32).sin();
        let inputs = (0..4u32)
            .map(|k| InputCmd {
                tick: t.add(1).sub(3 - k),
                move_x: a.cos() * 0.9,
                move_y: a.sin() * 0.9,
                aim: a,
                buttons: 0,
                view_tick: t.add(1).sub(3 - k),
                view_frac: 0,
            })
            .collect();
        let datagram = InputDatagram {
            snapshot_ack: Some(Tick(t.0.wrapping_sub(1))),
            inputs,
        };
        core.handle(
            CoreEvent::Input {
                conn: c,
                datagram,
                bytes: 60,
            },
            out,
        );
    }
    out.clear();
    core.tick(out);
    out.iter()
        .map(|o| match o {
            CoreOutput::Datagram(_, d) => d.len(),
            _ => 0,
        })
        .sum()
}
