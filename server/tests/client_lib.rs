//! The client library and the bot swarm over real QUIC on loopback, against the real server in-process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::{start, test_config, TestServer};
use quicktick_bot::report::Report;
use quicktick_bot::swarm::{run, SwarmConfig};
use quicktick_bot::{client_endpoint, load_trust, Client, ClientOptions, ConnectError};
use quicktick_server::ServerConfig;
use quicktick_shared::wire::RefuseReason;

const TICK_RATE: u16 = 60;

/// Polls `cond` every 10 ms for up to 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qt-bot-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A client endpoint trusting `server`'s certificate, loaded from a PEM file like the binary does.
fn endpoint(server: &TestServer) -> quinn::Endpoint {
    let trust = load_trust(&server.cert_path).unwrap();
    assert_eq!(trust, server.trust);
    client_endpoint("127.0.0.1:0".parse().unwrap(), &trust).unwrap()
}

#[tokio::test]
async fn join_snapshots_inputs_chat_presence_and_close() {
    let server = start(test_config());
    let ep = endpoint(&server);
    let alice = Client::connect(&ep, server.addr, "localhost", "alice")
        .await
        .unwrap();
    let bob = Client::connect(&ep, server.addr, "localhost", "bob")
        .await
        .unwrap();
    assert_eq!(alice.welcome().tick_rate, TICK_RATE);
    assert_ne!(alice.player_id(), bob.player_id());
    assert_eq!(bob.roster().len(), 2);
    eventually("alice sees bob", || alice.roster().len() == 2).await;

    // Snapshots arrive, get acked, and deltas follow.
    eventually("deltas", || alice.stats().session.deltas > 5).await;
    let snap = alice.latest_snapshot().unwrap();
    assert!(snap.get(alice.welcome().avatar.index).is_some());
    alice.set_input(1.0, 0.0, 0.5, true);
    eventually("inputs", || alice.stats().input_datagrams_sent > 10).await;
    let st = server.server.stats().snapshot();
    assert!(
        st.input_datagrams > 0 && st.deltas > 0,
        "inputs arrived and acks turned keyframes into deltas"
    );
    assert_eq!(st.bad_datagrams, 0, "every input datagram is valid");

    // Chat: ids from 1, echoed to the sender, delivered to the other.
    assert_eq!(alice.chat("hello bob").unwrap(), 1);
    assert_eq!(alice.chat("second").unwrap(), 2);
    assert!(alice.chat("").is_err());
    assert!(alice.chat(&"x".repeat(300)).is_err());
    eventually("bob got both", || bob.chat_log().len() == 2).await;
    eventually("alice got echoes", || alice.chat_log().len() == 2).await;
    let log = bob.chat_log();
    assert_eq!(log[0].text, "hello bob");
    assert_eq!(log[0].from, alice.player_id());
    assert!(log[1].seq > log[0].seq);
    let rec = alice.chat_receipts();
    assert_eq!(rec.echoed.len(), 2);
    let s = bob.stats();
    assert_eq!(s.chat_received_others, 2);
    assert_eq!((s.chat_duplicates, s.chat_out_of_order), (0, 0));
    assert_eq!(alice.stats().chat_sent, 2);
    assert!(!alice.stats().rtt_us.is_empty());

    // Presence follows a quit.
    bob.close().await;
    assert!(!bob.is_connected());
    eventually("bob left", || alice.roster().len() == 1).await;

    // A server-side close is reported with its code and reason.
    server.server.shutdown().await;
    eventually("alice closed", || !alice.is_connected()).await;
    let reason = alice.close_reason().unwrap();
    assert!(reason.contains("server shutting down"), "{reason}");
    assert!(reason.contains("code 1"), "{reason}");
    // A shutdown may be a restart: the client keeps trying (with backoff) and queues chat meanwhile.
    eventually("reconnecting", || {
        matches!(
            alice.state(),
            quicktick_shared::reconnect::ConnectionState::Reconnecting { .. }
        )
    })
    .await;
    assert!(alice.chat("queued while away").is_ok());
    assert_eq!(alice.chat_pending(), 1);
    alice.close().await;
    assert!(alice.chat("too late").is_err(), "closed for good");
}

#[tokio::test]
async fn refusal_wrong_cert_and_timeout() {
    let server = start(ServerConfig {
        max_players: 1,
        ..test_config()
    });
    let ep = endpoint(&server);
    let _first = Client::connect(&ep, server.addr, "localhost", "first")
        .await
        .unwrap();
    match Client::connect(&ep, server.addr, "localhost", "second").await {
        Err(ConnectError::Refused { reason, detail }) => {
            assert_eq!(reason, RefuseReason::ServerFull);
            assert!(detail.contains("full"));
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A server whose certificate we do not trust.
    let other = start(test_config());
    let err = Client::connect(&ep, other.addr, "localhost", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Connection(_)), "{err}");

    // A peer that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let opts = ClientOptions {
        connect_timeout: Duration::from_millis(300),
        ..ClientOptions::default()
    };
    let err = Client::connect_with(&ep, silent.local_addr().unwrap(), "localhost", "x", opts)
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Timeout), "{err}");
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let server = start(test_config());
    let ep = endpoint(&server);
    let a = Client::connect(&ep, server.addr, "localhost", "a")
        .await
        .unwrap();
    let b = Client::connect(&ep, server.addr, "localhost", "b")
        .await
        .unwrap();
    eventually("a sees b", || a.roster().len() == 2).await;
    let b2 = b.clone();
    drop(b);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(a.roster().len(), 2, "a clone keeps the connection");
    drop(b2);
    eventually("b gone", || a.roster().len() == 1).await;
}

fn swarm_config(server: &TestServer, _dir: &std::path::Path, extra: &[&str]) -> SwarmConfig {
    let cert = server.cert_path.clone();
    let addr = server.addr.to_string();
    let mut args = vec![
        "quicktick-bot",
        "--server",
        &addr,
        "--cert",
        cert.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    SwarmConfig::try_parse_from(args).unwrap()
}

#[tokio::test]
async fn swarm_runs_and_reports() {
    let server = start(test_config());
    let dir = temp_dir("swarm");
    let report_path = dir.join("report.json");
    let cfg = swarm_config(
        &server,
        &dir,
        &[
            "--bots",
            "5",
            "--bots-per-endpoint",
            "2",
            "--duration",
            "2.5",
            "--chat-every-secs",
            "0.5",
            "--report",
            report_path.to_str().unwrap(),
        ],
    );
    let report = run(cfg, std::future::pending()).await.unwrap();
    let from_file: Report =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(from_file, report);
    assert_eq!(report.bots_requested, 5);
    assert_eq!(report.bots_connected, 5);
    assert_eq!(report.bots_connected_at_end, 5);
    assert_eq!(report.tick_rate, TICK_RATE);
    assert_eq!(report.connect_errors, 0);
    assert_eq!(report.presence_mismatches, 0);
    assert_eq!(report.chat_missing, 0);
    assert_eq!((report.chat_duplicates, report.chat_out_of_order), (0, 0));
    assert!(report.chat_sent >= 10, "{report:?}");
    assert_eq!(report.chat_received, report.chat_sent * 4);
    assert!(report.deltas_received > 0 && report.keyframes_received > 0);
    assert!(report.snapshots_per_bot_per_s > 10.0, "{report:?}");
    assert!(report.inputs_sent > 0);
    assert_eq!(report.decode_errors, 0);
    assert!(report.rtt_samples > 0 && report.rtt_ms.p50 > 0.0);
    assert!(
        report.close_reasons.is_empty(),
        "{:?}",
        report.close_reasons
    );
    let st = server.server.stats().snapshot();
    assert_eq!(
        st.bad_datagrams + st.bad_frames,
        0,
        "no invalid datagram or frame"
    );
    assert_eq!(st.datagrams_too_large, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn swarm_stops_on_shutdown_and_fails_without_server() {
    // Shutdown future ends the run early.
    let server = start(test_config());
    let dir = temp_dir("shutdown");
    let cfg = swarm_config(&server, &dir, &["--bots", "2"]);
    let stop = tokio::time::sleep(Duration::from_millis(800));
    let report = run(cfg, stop).await.unwrap();
    assert_eq!(report.bots_connected, 2);
    assert!(report.duration_s < 5.0);

    // Nobody listening: no bot can connect → one-line error naming the server.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut cfg = swarm_config(&server, &dir, &["--bots", "2", "--duration", "1"]);
    cfg.server = silent.local_addr().unwrap();
    let err = run(cfg, never()).await.unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("no bot could connect"), "{msg}");
    assert!(!msg.contains('\n'));
    let _ = std::fs::remove_dir_all(&dir);
}

fn never() -> impl Future<Output = ()> {
    std::future::pending()
}
