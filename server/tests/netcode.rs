//! Client netcode against the real server core, in memory and deterministic: prediction converges
//! under loss and reconciles exactly; lag compensation judges a shot against what the shooter saw
//! inside the window and against the present beyond it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::memory::{open_map, Harness};
use quicktick_server::core::{CoreEvent, CoreOutput, ServerCore};
use quicktick_server::ServerConfig;
use quicktick_shared::entity::EntityId;
use quicktick_shared::input::{InputCmd, BUTTON_FIRE};
use quicktick_shared::link::LinkConfig;
use quicktick_shared::quant::POS_QUANTUM;
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{InputDatagram, ServerMsg, PROTOCOL_VERSION};

#[test]
fn prediction_converges_under_loss_and_is_exact_on_a_clean_link() {
    let cfg = ServerConfig {
        npc_count: 100,
        ..ServerConfig::default()
    };
    let mut h = Harness::new(cfg, open_map(100.0, 100.0), 1162);
    let lossy = LinkConfig {
        loss: 0.10,
        duplicate: 0.05,
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(30),
    };
    h.join(4, lossy);
    for _ in 0..600 {
        h.tick();
    }
    let mut lossy_errors = Vec::new();
    for c in &mut h.clients {
        lossy_errors.append(&mut c.session.predictor_mut().errors);
    }
    h.heal();
    for _ in 0..60 {
        h.tick();
    }
    for c in &mut h.clients {
        let errs: Vec<f32> = c.session.predictor_mut().errors.drain(..).collect();
        let tail = &errs[errs.len().saturating_sub(30)..];
        assert!(
            tail.len() >= 20,
            "too few predictions measured: {}",
            tail.len()
        );
        assert!(
            tail.iter().all(|e| *e == 0.0),
            "prediction not exact on a clean link: {tail:?}"
        );
    }
    lossy_errors.sort_by(f32::total_cmp);
    let p95 = lossy_errors[lossy_errors.len() * 95 / 100];
    assert!(lossy_errors.len() > 1000);
    assert!(
        p95 <= POS_QUANTUM,
        "p95 prediction error {p95} under 10 % loss"
    );
    assert!(
        lossy_errors.iter().all(|e| e.is_finite() && *e < 10.0),
        "bounded"
    );
}

struct Duel {
    core: ServerCore,
    history: Vec<Arc<Snapshot>>,
    shooter: EntityId,
    target: EntityId,
}

impl Duel {
    fn new() -> Self {
        let cfg = ServerConfig {
            npc_count: 0,
            ..ServerConfig::default()
        };
        let mut core = ServerCore::new(cfg, open_map(64.0, 64.0));
        let mut out = Vec::new();
        let mut avatars = Vec::new();
        for conn in 1..=2u64 {
            core.handle(
                CoreEvent::Hello {
                    conn,
                    version: PROTOCOL_VERSION,
                    name: format!("p{conn}"),
                    token: None,
                    now_unix: 0,
                },
                &mut out,
            );
            core.set_max_datagram(conn, Some(1162));
        }
        for o in &out {
            if let CoreOutput::Frame(_, ServerMsg::Welcome(w)) = o {
                avatars.push(w.avatar);
            }
        }
        Self {
            core,
            history: Vec::new(),
            shooter: avatars[0],
            target: avatars[1],
        }
    }

    /// One tick: the target runs along +y; the shooter stands and maybe fires. Returns shot results.
    fn tick(&mut self, fire: Option<(f32, Tick)>) -> Vec<(Option<EntityId>, bool)> {
        let t = self.core.world().tick().next();
        let run = InputCmd {
            move_y: 1.0,
            ..InputCmd::idle(t)
        };
        let shot = match fire {
            Some((aim, view)) => InputCmd {
                aim,
                buttons: BUTTON_FIRE,
                view_tick: view,
                ..InputCmd::idle(t)
            },
            None => InputCmd::idle(t),
        };
        let mut out = Vec::new();
        for (conn, cmd) in [(1u64, shot), (2, run)] {
            let datagram = InputDatagram {
                snapshot_ack: None,
                inputs: vec![cmd],
            };
            self.core.handle(
                CoreEvent::Input {
                    conn,
                    datagram,
                    bytes: 30,
                },
                &mut out,
            );
        }
        self.core.tick(&mut out);
        self.history.push(self.core.current_snapshot().clone());
        out.iter()
            .filter_map(|o| match o {
                CoreOutput::Frame(
                    1,
                    ServerMsg::ShotResult {
                        hit, compensated, ..
                    },
                ) => Some((*hit, *compensated)),
                _ => None,
            })
            .collect()
    }

    /// The aim from the shooter (now) to where the target was at `tick`.
    fn aim_at_target_as_of(&self, tick: Tick) -> f32 {
        let then = self.history.iter().find(|s| s.tick == tick).unwrap();
        let now = self.history.last().unwrap();
        let me = now.get(self.shooter.index).unwrap();
        let them = then.get(self.target.index).unwrap();
        let (dx, dy) = (them.qx as f32 - me.qx as f32, them.qy as f32 - me.qy as f32);
        dy.atan2(dx)
    }
}

#[test]
fn lag_compensation_hits_what_the_shooter_saw_inside_the_window_only() {
    let mut d = Duel::new();
    for _ in 0..30 {
        d.tick(None);
    }
    // 10 ticks ≈ 167 ms back, inside the 200 ms window: the target has moved ≈1.2 units since (more
    // than its 0.5 radius), so only a rewound judgement hits.
    let now = d.core.world().tick();
    let view = now.sub(9); // the tick being simulated is now+1: 10 ticks after the view
    let aim = d.aim_at_target_as_of(view);
    let r = d.tick(Some((aim, view)));
    assert_eq!(
        r,
        vec![(Some(d.target), true)],
        "a shot at what the shooter saw hits"
    );

    for _ in 0..20 {
        d.tick(None); // weapon cooldown
    }
    // The same shot judged at the present misses: proof the rewind is what made it hit.
    let now = d.core.world().tick();
    let aim = d.aim_at_target_as_of(now.sub(9));
    let r = d.tick(Some((aim, now)));
    assert_eq!(
        r,
        vec![(None, true)],
        "aimed where the target was 167 ms ago, seen now: miss"
    );

    for _ in 0..20 {
        d.tick(None);
    }
    // 18 ticks = 300 ms back, beyond the window: refused (judged at the present), a miss.
    let now = d.core.world().tick();
    let view = now.sub(17);
    let aim = d.aim_at_target_as_of(view);
    let r = d.tick(Some((aim, view)));
    assert_eq!(
        r,
        vec![(None, false)],
        "beyond the window the rewind is refused"
    );
    assert_eq!(d.core.counters.shots, 3);
    assert_eq!(d.core.counters.hits, 1);
}
