//! End to end over real QUIC on 127.0.0.1: the real server in-process, 8 clients of the real client
//! library. Asserts connection, delta snapshots, exact world agreement with the server, chat delivered
//! once and in order to everyone, presence after a leave, and a clean shutdown with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use common::{start, test_config};
use quicktick_bot::{client_endpoint, Client};
use quicktick_server::ServerConfig;
use quicktick_shared::entity::{EntityKind, EntityState};
use quicktick_shared::quant::POS_QUANTUM;

fn dist(a: &EntityState, b: &EntityState) -> f32 {
    let dx = a.qx as f32 - b.qx as f32;
    let dy = a.qy as f32 - b.qy as f32;
    (dx * dx + dy * dy).sqrt()
}

const BOTS: usize = 8;

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bots_play_chat_and_leave() {
    // Start just below the u32 wrap so real traffic crosses it.
    let ts = start(ServerConfig {
        start_tick: u32::MAX - 60,
        ..test_config()
    });
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &ts.trust).unwrap();
    let mut clients = Vec::new();
    for i in 0..BOTS {
        clients.push(
            Client::connect(&ep, ts.addr, "localhost", &format!("bot{i}"))
                .await
                .unwrap(),
        );
    }
    for (i, c) in clients.iter().enumerate() {
        let a = i as f32 * 0.8;
        c.set_input(a.cos() * 0.8, a.sin() * 0.8, a, i % 2 == 0);
    }
    wait_until("full rosters", Duration::from_secs(5), || {
        clients.iter().all(|c| c.roster().len() == BOTS)
    })
    .await;

    // Chat: two lines from each bot.
    let mut sent: HashMap<u32, Vec<u32>> = HashMap::new();
    for round in 0..2 {
        for c in &clients {
            let id = c
                .chat(&format!("hello {round} from {}", c.player_id()))
                .unwrap();
            sent.entry(c.player_id()).or_default().push(id);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut views_with_others = 0;
    for c in &clients {
        let s = c.stats();
        assert!(c.is_connected());
        assert!(s.session.deltas > s.session.keyframes, "{:?}", s.session);
        assert!(s.session.snapshots > 60, "{:?}", s.session);
        assert_eq!(s.session.decode_errors, 0);
        assert_eq!(s.datagrams_too_large, 0);
        // Chat: every line of every bot (own echoes included), once, in server order.
        let log = c.chat_log();
        assert!(log.windows(2).all(|w| w[0].seq < w[1].seq), "out of order");
        let got: BTreeSet<(u32, u32)> = log.iter().map(|l| (l.from, l.client_msg_id)).collect();
        assert_eq!(got.len(), log.len(), "duplicates");
        let want: BTreeSet<(u32, u32)> = sent
            .iter()
            .flat_map(|(p, ids)| ids.iter().map(|i| (*p, *i)))
            .collect();
        assert_eq!(got, want);
        // The view equals the server's world at the same tick, bit for bit, for every entity in it,
        // and holds exactly what interest management promises: its own avatar, everything within
        // the radius, nothing beyond radius + hysteresis.
        let snap = c.latest_snapshot().unwrap();
        let world = ts
            .server
            .published()
            .snapshot_at(snap.tick)
            .expect("tick not published");
        let me = snap
            .get(c.welcome().avatar.index)
            .copied()
            .expect("own avatar in view");
        let (r, h) = (32.0f32 / POS_QUANTUM, 4.0f32 / POS_QUANTUM);
        for e in &snap.entities {
            assert_eq!(
                world.get(e.id.index),
                Some(e),
                "view differs from the world"
            );
            assert!(
                dist(e, &me) <= r + h + 1.0,
                "entity beyond radius + hysteresis"
            );
        }
        for e in world.entities.iter().filter(|e| dist(e, &me) < r - 1.0) {
            assert!(
                snap.get(e.id.index).is_some(),
                "entity within the radius missing from the view"
            );
        }
        for p in c.roster() {
            if let Some(a) = world.get(p.avatar.index).filter(|a| dist(a, &me) < r - 1.0) {
                assert_eq!(
                    snap.get(p.avatar.index),
                    Some(a),
                    "avatar of {} differs",
                    p.name
                );
            }
        }
        views_with_others += usize::from(
            snap.entities
                .iter()
                .filter(|e| e.kind == EntityKind::Player)
                .count()
                > 1,
        );
    }
    assert!(views_with_others > 0, "no bot ever saw another avatar");
    let tick = clients[0].latest_snapshot().unwrap().tick;
    assert!(tick.0 < 1000, "crossed the tick wrap (tick {tick})");

    // One bot leaves: presence and world drop it everywhere.
    let leaver = clients.pop().unwrap();
    let (gone_id, gone_avatar) = (leaver.player_id(), leaver.welcome().avatar);
    leaver.close().await;
    wait_until("presence after leave", Duration::from_secs(5), || {
        clients
            .iter()
            .all(|c| c.roster().len() == BOTS - 1 && !c.roster().iter().any(|p| p.id == gone_id))
    })
    .await;
    wait_until("avatar gone from snapshots", Duration::from_secs(2), || {
        clients.iter().all(|c| {
            c.latest_snapshot()
                .is_some_and(|s| s.get(gone_avatar.index).is_none_or(|e| e.id != gone_avatar))
        })
    })
    .await;
    assert_eq!(ts.server.published().roster.lock().unwrap().len(), BOTS - 1);

    let stats = ts.server.shutdown().await;
    assert_eq!(stats.datagrams_too_large, 0);
    assert_eq!(stats.bad_datagrams + stats.bad_frames, 0);
    for c in &clients {
        wait_until("close reason", Duration::from_secs(3), || {
            c.close_reason().is_some()
        })
        .await;
        let r = c.close_reason().unwrap();
        assert!(r.contains("server shutting down"), "{r}");
    }
}
