//! Sessions survive drops, over real QUIC on 127.0.0.1 with the link conditioner: a 5 s blackout
//! (every bot resumes from its baseline, no keyframe, no chat lost or doubled, presence agrees), a
//! chat line written just before a drop (delivered once), a client that vanishes (gone from presence
//! and the world within the idle timeout, its session dropped after the grace window), and a server
//! restart under 100 bots (all back, attempts spread out). Every test is bounded and ends by itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{start, test_config, TestServer};
use quicktick_bot::conditioner::{conditioned_endpoint_with_handle, Impairment};
use quicktick_bot::swarm::{run, SwarmConfig};
use quicktick_bot::{Client, ClientOptions};
use quicktick_server::config::ServerConfig;
use quicktick_shared::link::LinkConfig;
use quicktick_shared::reconnect::ConnectionState;

async fn bounded<F: Future>(limit: Duration, test: F) -> F::Output {
    tokio::time::timeout(limit, test)
        .await
        .expect("the test ran past its time limit")
}

async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bind() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn clean_link() -> Impairment {
    Impairment::symmetric(
        LinkConfig {
            loss: 0.0,
            duplicate: 0.0,
            latency: Duration::from_millis(2),
            jitter: Duration::ZERO,
        },
        7,
    )
}

fn swarm_args(server: &TestServer, extra: &[&str]) -> SwarmConfig {
    let addr = server.addr.to_string();
    let cert = server.cert_path.display().to_string();
    let mut args = vec![
        "quicktick-bot",
        "--server",
        &addr,
        "--cert",
        &cert,
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    SwarmConfig::parse_from(args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5s_blackout_every_bot_resumes_from_its_baseline_and_no_chat_is_lost() {
    bounded(Duration::from_secs(60), async {
        let server = start(test_config());
        let cfg = swarm_args(
            &server,
            &[
                "--bots",
                "8",
                "--bots-per-endpoint",
                "4",
                "--duration",
                "14",
                "--chat-every-secs",
                "1",
                "--blackout-at",
                "3",
                "--blackout-secs",
                "5",
            ],
        );
        let report = run(cfg, std::future::pending()).await.unwrap();
        let stats = server.server.stats().snapshot();
        eprintln!(
            "blackout report: resumes {} resume_keyframes {} reconnect_attempts {} peak/s {} \
             chat sent {} lost {} dup {} replayed {} resent {} presence_mismatches {} \
             keyframes {} server resumes {} replaced {}",
            report.resumes,
            report.resume_keyframes,
            report.reconnect_attempts,
            report.peak_attempts_per_s,
            report.chat_sent,
            report.chat_lost,
            report.chat_duplicates,
            report.chat_replayed,
            report.chat_resent,
            report.presence_mismatches,
            report.keyframes_received,
            stats.resumes,
            stats.replaced,
        );
        eprintln!("{}", serde_json::to_string(&report).unwrap());
        assert_eq!(report.bots_connected, 8);
        assert_eq!(
            report.bots_connected_at_end, 8,
            "{:?}",
            report.close_reasons
        );
        assert_eq!(report.resumes, 8, "every bot resumed once");
        assert_eq!(report.rejoins, 0, "nobody had to join afresh");
        assert_eq!(
            report.resume_keyframes, 0,
            "deltas continued from the held baselines"
        );
        assert_eq!(report.missing_baseline, 0, "every delta found its baseline");
        assert!(report.reconnect_attempts >= 8);
        assert!(report.chat_sent >= 50, "bots chatted: {}", report.chat_sent);
        assert_eq!(report.chat_lost, 0);
        assert_eq!(report.chat_missing, 0);
        assert_eq!(report.chat_duplicates, 0);
        assert_eq!(report.chat_out_of_order, 0);
        assert_eq!(report.presence_mismatches, 0);
        assert_eq!(report.decode_errors, 0);
        assert_eq!(stats.resumes, 8);
        assert_eq!(stats.resume_keyframes, 0);
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sent_just_before_a_drop_is_delivered_exactly_once() {
    bounded(Duration::from_secs(40), async {
        let server = start(test_config());
        let (ep_a, link_a) =
            conditioned_endpoint_with_handle(bind(), &server.trust, clean_link()).unwrap();
        let (ep_b, _) =
            conditioned_endpoint_with_handle(bind(), &server.trust, clean_link()).unwrap();
        let opts = ClientOptions {
            dead_after: Duration::from_millis(1500),
            ..ClientOptions::default()
        };
        let a = Client::connect_with(&ep_a, server.addr, "localhost", "alice", opts.clone())
            .await
            .unwrap();
        let b = Client::connect_with(&ep_b, server.addr, "localhost", "bob", opts)
            .await
            .unwrap();
        let mut events = a.subscribe();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The line goes onto the wire, and the wire goes dark before it lands.
        link_a.blackout(true);
        let id = a.chat("said just before the tunnel").unwrap();
        let also = a.chat("said inside the tunnel").unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            !matches!(a.state(), ConnectionState::Connected),
            "alice noticed the silence: {:?}",
            a.state_log()
        );
        let queued = a.chat("said while reconnecting").unwrap();
        link_a.blackout(false);
        eventually("alice resumed", Duration::from_secs(20), || {
            a.stats().resumes == 1 && a.is_connected()
        })
        .await;
        eventually("bob has all three", Duration::from_secs(5), || {
            let r = b.chat_receipts();
            [id, also, queued].iter().all(|i| r.has(a.player_id(), *i))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let sb = b.stats();
        assert_eq!(sb.chat_received_others, 3, "each line once");
        assert_eq!(sb.chat_duplicates, 0);
        assert_eq!(a.chat_pending(), 0, "every line confirmed");
        assert_eq!(a.stats().chat_duplicates, 0, "no echo twice either");
        assert_eq!(a.stats().resume_keyframes, 0);
        // The state events tell the story: degraded, reconnecting, resumed.
        let mut seen = Vec::new();
        while let Ok(s) = events.try_recv() {
            seen.push(s);
        }
        assert!(seen.contains(&ConnectionState::Degraded), "{seen:?}");
        assert!(
            seen.iter()
                .any(|s| matches!(s, ConnectionState::Reconnecting { .. })),
            "{seen:?}"
        );
        assert!(seen.contains(&ConnectionState::Resumed), "{seen:?}");
        // Presence counts agree: the server and both clients see the same two players.
        assert_eq!(b.roster().len(), 2);
        assert_eq!(a.roster().len(), 2);
        let s = server.server.stats().snapshot();
        assert_eq!((s.players, s.players_parked), (2, 0));
        let ids: Vec<u32> = server
            .server
            .published()
            .roster
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, a.roster().iter().map(|p| p.id).collect::<Vec<_>>());
        assert_eq!(ids, b.roster().iter().map(|p| p.id).collect::<Vec<_>>());
        a.close().await;
        b.close().await;
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_leaves_presence_and_world_within_the_idle_timeout() {
    bounded(Duration::from_secs(40), async {
        let server = start(ServerConfig {
            idle_timeout_ms: 2000,
            keep_alive_ms: 500,
            resume_grace_ms: 3000,
            ..test_config()
        });
        let (ep_a, link_a) =
            conditioned_endpoint_with_handle(bind(), &server.trust, clean_link()).unwrap();
        let (ep_b, _) =
            conditioned_endpoint_with_handle(bind(), &server.trust, clean_link()).unwrap();
        let gone_opts = ClientOptions {
            reconnect: None,
            ..ClientOptions::default()
        };
        let a = Client::connect_with(&ep_a, server.addr, "localhost", "ghost", gone_opts)
            .await
            .unwrap();
        let b = Client::connect(&ep_b, server.addr, "localhost", "watcher")
            .await
            .unwrap();
        let avatar = a.welcome().avatar;
        eventually("both present", Duration::from_secs(5), || {
            b.roster().len() == 2
        })
        .await;
        let stats = server.server.stats().clone();
        let in_world = |server: &TestServer| {
            server
                .server
                .published()
                .recent
                .lock()
                .unwrap()
                .back()
                .is_some_and(|s| s.get(avatar.index).is_some_and(|e| e.id == avatar))
        };
        assert!(in_world(&server));
        // The client vanishes: not a packet more, no close.
        link_a.blackout(true);
        let t = Instant::now();
        eventually(
            "watcher sees the ghost leave",
            Duration::from_secs(6),
            || b.roster().len() == 1,
        )
        .await;
        let left_after = t.elapsed();
        assert!(!in_world(&server), "its avatar left the world");
        assert_eq!(
            stats.snapshot().players_parked,
            1,
            "its session waits for a resume"
        );
        eprintln!("vanished client left presence after {left_after:?} (idle timeout 2 s)");
        assert!(left_after < Duration::from_millis(2000 + 1500));
        eventually("grace window passes", Duration::from_secs(6), || {
            stats.snapshot().players_parked == 0
        })
        .await;
        assert_eq!(stats.snapshot().sessions_expired, 1);
        assert_eq!(stats.snapshot().players, 1);
        drop(a);
        b.close().await;
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_under_100_bots_brings_them_all_back_spread_out() {
    bounded(Duration::from_secs(120), async {
        let cfg = ServerConfig {
            npc_count: 20,
            tick_rate: 30,
            max_players: 128,
            // 100 handshakes at once in a debug build on a small machine.
            handshake_timeout_ms: 15_000,
            // Every bot comes from 127.0.0.1.
            max_connections_per_ip: 0,
            max_pending_per_ip: 0,
            ..test_config()
        };
        let first = start(cfg.clone());
        let addr = first.addr;
        let args = swarm_args(
            &first,
            &[
                "--bots",
                "100",
                "--duration",
                "30",
                "--chat-every-secs",
                "0",
                "--rejoin-after-drain",
            ],
        );
        let swarm = tokio::spawn(run(args, std::future::pending()));
        let t = Instant::now();
        while first.server.stats().snapshot().players < 100 {
            if swarm.is_finished() {
                panic!("swarm ended early: {:?}", swarm.await);
            }
            assert!(
                t.elapsed() < Duration::from_secs(40),
                "only {} bots joined",
                first.server.stats().snapshot().players
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("100 bots joined in {:?}", t.elapsed());
        let restart_at = Instant::now();
        let dir = first.cert_dir.clone();
        first.server.shutdown().await;
        // The old endpoint releases its UDP port once its last connection task is done.
        let mut tries = 0;
        while std::net::UdpSocket::bind(addr).is_err() {
            tries += 1;
            assert!(tries < 100, "port {addr} still taken");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let second = common::start_at(cfg, addr, &dir);
        let report = swarm.await.unwrap().unwrap();
        let back = second.server.stats().snapshot();
        eprintln!(
            "restart: {} bots back (server saw {} joins) by {:?} after the restart, rejoins {}, \
             reconnect attempts {}, peak attempts/s {}, peak first attempts/s {}",
            report.bots_connected_at_end,
            back.connections_accepted,
            restart_at.elapsed(),
            report.rejoins,
            report.reconnect_attempts,
            report.peak_attempts_per_s,
            report.peak_first_attempts_per_s
        );
        assert_eq!(
            report.bots_connected_at_end, 100,
            "{:?}",
            report.close_reasons
        );
        assert_eq!(
            report.rejoins, 100,
            "the new server had no sessions: all joined afresh"
        );
        assert_eq!(report.resumes, 0);
        // The restart spread (5 s) and full jitter spread the herd: each bot makes a resume and a
        // hello attempt (plus retries while the old server is still closing), ≥ 200 attempts in all,
        // which without the spread would land within a fraction of a second.
        assert!(report.reconnect_attempts >= 200);
        // Each bot's first attempt is drawn from the 5 s restart spread: about 20 per second.
        assert!(
            report.peak_first_attempts_per_s <= 50,
            "peak {} first attempts in one second of 100 bots",
            report.peak_first_attempts_per_s
        );
        assert!(
            report.peak_attempts_per_s < 2 * 100,
            "never every bot's resume and hello in the same second: peak {}",
            report.peak_attempts_per_s
        );
        assert_eq!(report.presence_mismatches, 0);
        second.server.shutdown().await;
    })
    .await;
}
