//! Graceful drain over real QUIC: the real binary on SIGTERM with a swarm of 16 bots (exit 0 within the
//! drain time, every bot closed cleanly with the reason), and the in-process server draining while
//! players leave (match served, new connections refused, done as soon as everyone has left).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::{start, test_config};
use quicktick_bot::swarm::{run as swarm, SwarmConfig};
use quicktick_bot::{client_endpoint, load_trust, Client, ConnectError};
use quicktick_shared::wire::close;

const BOTS: usize = 16;
const DRAIN_SECS: u64 = 2;

/// Kills the server process if the test fails before it exits.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qt-drain-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts the real binary in `dir` on 127.0.0.1:0; returns it, its address (from the "listening" log
/// line) and a channel with the rest of its log lines.
fn spawn_server(dir: &Path) -> (Reaper, SocketAddr, std_mpsc::Receiver<String>) {
    let child = Command::new(env!("CARGO_BIN_EXE_quicktick-server"))
        .args(["--bind", "127.0.0.1:0", "--npcs", "50", "--drain-secs"])
        .arg(DRAIN_SECS.to_string())
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reaper = Reaper(child);
    let stderr = reaper.0.stderr.take().unwrap();
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("no 'listening' line from the server");
        if line.contains("listening") {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .expect("addr= in the listening line");
            return (reaper, addr.parse().unwrap(), rx);
        }
    }
}

#[tokio::test]
async fn sigterm_drains_sixteen_bots_and_exits_zero_within_the_drain_time() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = temp_dir("sigterm");
    let (mut server, addr, log) = spawn_server(&dir);
    let cert = dir.join("quicktick-dev-cert/cert.pem");
    let report_path = dir.join("report.json");

    // 16 bots from the library's swarm runner (it ends by itself once the server closed them all).
    let cfg = SwarmConfig::try_parse_from([
        "quicktick-bot",
        "--server",
        &addr.to_string(),
        "--cert",
        cert.to_str().unwrap(),
        "--bots",
        &BOTS.to_string(),
        "--duration",
        "60",
        "--chat-every-secs",
        "0.5",
        "--report",
        report_path.to_str().unwrap(),
    ])
    .unwrap();
    let bots = tokio::spawn(swarm(cfg, std::future::pending()));

    // An observer player: knows when all bots are in, and watches the match during the drain.
    let trust = load_trust(&cert).unwrap();
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &trust).unwrap();
    let observer = Client::connect(&ep, addr, "localhost", "observer")
        .await
        .unwrap();
    let t0 = Instant::now();
    while observer.roster().len() < BOTS + 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "bots did not join: {:?}",
            observer.roster().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let pid = server.0.id().to_string();
    let sent = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());

    // The notice arrives on the stream; the match goes on during the drain.
    while observer.drain_notice().is_none() {
        assert!(sent.elapsed() < Duration::from_secs(2), "no drain notice");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let notice = observer.drain_notice().unwrap();
    assert_eq!(notice.reason, "server shutting down");
    let before = observer.stats().session.snapshots;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = observer.stats().session.snapshots;
    assert!(
        during >= before + 20,
        "snapshots keep coming while draining: {before} → {during}"
    );
    assert!(observer.is_connected());

    // New connections are refused (at the QUIC level, before TLS).
    let late = Client::connect(&ep, addr, "localhost", "latecomer").await;
    match late {
        Err(ConnectError::Connection(quinn::ConnectionError::ConnectionClosed(c))) => {
            assert_eq!(c.error_code, quinn::TransportErrorCode::CONNECTION_REFUSED);
        }
        other => panic!("a connection during the drain must be refused: {other:?}"),
    }

    // The process exits 0 within the drain time: players are closed at drain − reserve.
    let status = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(DRAIN_SECS + 5),
            "server still running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let exit_after = sent.elapsed();
    assert!(status.success(), "exit status {status:?}");
    let drain = Duration::from_secs(DRAIN_SECS);
    let play = drain - quicktick_server::close_reserve(drain);
    println!("SIGTERM → exit {exit_after:?} (drain {drain:?}, play {play:?}, 17 players stayed)");
    assert_eq!(notice.drain, play);
    assert!(
        exit_after >= play - Duration::from_millis(100),
        "players stayed, so the match went on for the whole play time: {exit_after:?}"
    );
    assert!(exit_after < drain, "exit {exit_after:?}");
    let closed = observer.close_info().expect("observer closed");
    assert!(closed.clean && closed.by_server, "{closed:?}");
    assert_eq!(closed.code, Some(u64::from(close::SHUTDOWN)));
    assert_eq!(closed.reason, "server shutting down");

    // Every bot saw the notice and a clean close with the reason.
    let report = tokio::time::timeout(Duration::from_secs(20), bots)
        .await
        .expect("swarm did not end")
        .unwrap()
        .unwrap();
    assert_eq!(report.bots_connected, BOTS as u64, "{report:?}");
    assert_eq!(report.bots_connected_at_end, 0);
    assert_eq!(report.drain_notices, BOTS as u64);
    assert_eq!(report.clean_closes, BOTS as u64, "{report:?}");
    assert_eq!(
        report.close_reason_counts,
        [("server shutting down".to_owned(), BOTS as u64)].into()
    );
    let from_file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(from_file["clean_closes"], BOTS as u64);
    let lines: Vec<String> = log.try_iter().collect();
    assert!(
        lines.iter().any(|l| l.contains("drain over")),
        "log: {lines:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn drain_serves_the_match_until_everyone_left_then_stops_early() {
    let ts = start(test_config());
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &ts.trust).unwrap();
    let a = Client::connect(&ep, ts.addr, "localhost", "a")
        .await
        .unwrap();
    let b = Client::connect(&ep, ts.addr, "localhost", "b")
        .await
        .unwrap();
    let addr = ts.addr;
    let started = Instant::now();
    let drain = tokio::spawn(
        ts.server
            .drain_and_shutdown(Duration::from_secs(8), std::future::pending()),
    );
    while a.drain_notice().is_none() || b.drain_notice().is_none() {
        assert!(started.elapsed() < Duration::from_secs(2), "no notice");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(a.drain_notice().unwrap().drain, Duration::from_secs(7));
    // Chat and snapshots still work while draining.
    a.chat("leaving soon").unwrap();
    let t = Instant::now();
    while b.chat_log().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(2), "chat during drain");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = b.stats().session.snapshots;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.stats().session.snapshots > before + 5);
    assert!(Client::connect(&ep, addr, "localhost", "late")
        .await
        .is_err());

    // Players leave; the server stops as soon as the last one has gone, long before 8 s.
    a.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!drain.is_finished(), "b is still playing");
    b.close().await;
    let stats = tokio::time::timeout(Duration::from_secs(6), drain)
        .await
        .expect("drain did not end when everyone had left")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stats.drain_refused, 1);
    assert_eq!(stats.connections_current, 0);
    let ac = a.close_info().unwrap();
    assert!(ac.clean && !ac.by_server, "{ac:?}");
}
