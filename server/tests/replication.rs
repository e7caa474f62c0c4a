//! The whole server core against client sessions, in memory and deterministic: seeded links with
//! loss, jitter (reordering) and duplication; interest management; the bandwidth budget; split
//! snapshots at the QUIC datagram floor. No sockets, no clock.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::memory::{open_map, Harness};
use glam::Vec2;
use quicktick_server::ServerConfig;
use quicktick_shared::link::LinkConfig;
use quicktick_shared::quant::POS_QUANTUM;

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
