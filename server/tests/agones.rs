//! The Agones lifecycle (feature `agones`) against a local Agones SDK server, the `dummy-agones` binary
//! (crates.io `dummy-agones` 0.1.2: `cargo install dummy-agones --version 0.1.2 --locked`; it serves
//! the SDK's gRPC API on 127.0.0.1:9357 and logs every health message). The test plays the allocator:
//! Ready → Allocated (by the test) → players reported → health stops while the tick loop is stalled on
//! purpose and resumes after → drain (label `draining`) → Shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start, test_config};
use quicktick_bot::{client_endpoint, Client};
use quicktick_server::agones::{HEALTH_PERIOD_SECS, PLAYERS_LABEL, STATE_LABEL};
use quicktick_server::{serve, ServerConfig};

/// The dummy's fixed port (the Agones SDK default).
const SDK_PORT: u16 = 9357;

/// Kills the SDK server when the test ends.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `$DUMMY_AGONES_BIN`, else `dummy-agones` on `PATH`, else in `$CARGO_HOME/bin` or `~/.cargo/bin`.
fn dummy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DUMMY_AGONES_BIN") {
        return p.into();
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("dummy-agones"))
        .find(|p| p.is_file())
        .expect("dummy-agones not found: cargo install dummy-agones --version 0.1.2 --locked")
}

/// Starts the SDK server; returns it and a counter of the health messages it logged.
fn spawn_sdk_server() -> (Reaper, Arc<AtomicU64>) {
    let mut child = Command::new(dummy_bin())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let reaper = Reaper(child);
    let health = Arc::new(AtomicU64::new(0));
    let h = health.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains("Got health message") {
                h.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", SDK_PORT)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "SDK server not up");
        std::thread::sleep(Duration::from_millis(20));
    }
    (reaper, health)
}

/// The GameServer's state and one of its labels, as the SDK server holds them.
async fn state(sdk: &mut agones::Sdk, label: &str) -> (String, Option<String>) {
    let gs = sdk.get_gameserver().await.unwrap();
    let state = gs.status.map(|s| s.state).unwrap_or_default();
    let label = gs.object_meta.and_then(|m| m.labels.get(label).cloned());
    (state, label)
}

/// Polls until `state`/`label` read `want`, for up to `within`.
async fn wait_for(
    sdk: &mut agones::Sdk,
    label: &str,
    want: (&str, Option<&str>),
    within: Duration,
) {
    let t = Instant::now();
    loop {
        let (s, l) = state(sdk, label).await;
        if s == want.0 && want.1.is_none_or(|w| l.as_deref() == Some(w)) {
            return;
        }
        assert!(
            t.elapsed() < within,
            "waiting for {want:?}, have {s:?} {label}={l:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn ready_allocated_players_health_stops_when_stalled_then_shutdown() {
    let (_sdk_server, health) = spawn_sdk_server();
    // What the Agones sidecar injects into the pod; the server's SDK client reads it.
    std::env::set_var("AGONES_SDK_GRPC_PORT", SDK_PORT.to_string());
    let mut allocator = agones::Sdk::new(Some(SDK_PORT), None).await.unwrap();

    let ts = start(ServerConfig {
        drain_secs: 2,
        ..test_config()
    });
    let stall = ts.server.tick_stall();
    let stats = ts.server.stats().clone();
    let (addr, trust) = (ts.addr, ts.trust.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(
        ts.server,
        async move {
            let _ = stop_rx.await;
        },
        std::future::pending(),
    ));

    // Ready once listening, with the state label.
    let long = Duration::from_secs(10);
    wait_for(&mut allocator, STATE_LABEL, ("Ready", Some("ready")), long).await;
    // The test allocates it, as a matchmaker's GameServerAllocation would.
    allocator.allocate().await.unwrap();
    wait_for(
        &mut allocator,
        STATE_LABEL,
        ("Allocated", Some("ready")),
        long,
    )
    .await;

    // Players are tracked as they connect and disconnect (the dummy has no alpha API: the label).
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &trust).unwrap();
    let a = Client::connect(&ep, addr, "localhost", "a").await.unwrap();
    let b = Client::connect(&ep, addr, "localhost", "b").await.unwrap();
    wait_for(
        &mut allocator,
        PLAYERS_LABEL,
        ("Allocated", Some("2")),
        long,
    )
    .await;
    a.close().await;
    wait_for(
        &mut allocator,
        PLAYERS_LABEL,
        ("Allocated", Some("1")),
        long,
    )
    .await;

    // Health pings arrive while the tick loop runs...
    let period = Duration::from_secs(HEALTH_PERIOD_SECS);
    let t = Instant::now();
    while health.load(Ordering::Relaxed) < 2 {
        assert!(t.elapsed() < period * 3, "no health pings");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...stop while it is stuck...
    let stall_for = Duration::from_secs(7);
    let stalled_at = Instant::now();
    stall.stall_next_tick(stall_for);
    tokio::time::sleep(period + Duration::from_millis(500)).await;
    let (seen, sent) = (
        health.load(Ordering::Relaxed),
        stats.health_pings.load(Ordering::Relaxed),
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(stalled_at.elapsed() < stall_for, "still stalled");
    assert_eq!(
        health.load(Ordering::Relaxed),
        seen,
        "no health while stuck"
    );
    assert_eq!(stats.health_pings.load(Ordering::Relaxed), sent);
    // ...and resume once it advances again.
    while health.load(Ordering::Relaxed) == seen {
        assert!(
            stalled_at.elapsed() < stall_for + period * 2,
            "health did not resume"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "health: {seen} pings before the stall, none for {:?} of it, resumed {:?} after it began",
        Duration::from_secs(3),
        stalled_at.elapsed()
    );

    // SIGTERM's path: draining label during the drain, Shutdown after it.
    let _ = stop_tx.send(());
    wait_for(
        &mut allocator,
        STATE_LABEL,
        ("Allocated", Some("draining")),
        Duration::from_secs(1),
    )
    .await;
    assert!(b.drain_notice().is_some() || b.is_connected());
    let s = tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve did not end")
        .unwrap()
        .unwrap();
    assert!(s.health_pings >= 3);
    wait_for(
        &mut allocator,
        STATE_LABEL,
        ("Shutdown", Some("stopped")),
        Duration::from_secs(2),
    )
    .await;
    let closed = b.close_info().expect("b was closed by the drain");
    assert!(closed.clean && closed.by_server, "{closed:?}");
}
