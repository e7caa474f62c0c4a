//! The admin HTTP listener during a real bot run over QUIC on 127.0.0.1: every metric listed in
//! docs/METRICS.md is served with its type (and is non-zero where the doc says traffic flows),
//! `/status` agrees with the bots on the players, `/world` shows them, `/events` numbers its events
//! and resumes after `Last-Event-ID`, and `/` serves the dashboard.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::http::{get, get_with, sse_events};
use common::{start, test_config};
use quicktick_bot::{client_endpoint, Client};
use quicktick_server::ServerConfig;

const BOTS: usize = 6;

/// One row of the metrics table in docs/METRICS.md.
#[derive(Debug)]
struct DocMetric {
    name: String,
    kind: String,
    nonzero: bool,
}

fn doc_metrics() -> Vec<DocMetric> {
    let doc = include_str!("../../docs/METRICS.md");
    let rows: Vec<DocMetric> = doc
        .lines()
        .filter(|l| l.starts_with("| `quicktick_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            // | name | type | unit | labels | bot run | meaning |
            DocMetric {
                name: cells[1].trim_matches('`').to_owned(),
                kind: cells[2].to_owned(),
                nonzero: cells[5] == "> 0",
            }
        })
        .collect();
    assert!(rows.len() >= 25, "the doc table lost rows: {rows:?}");
    rows
}

/// Sum of every sample of `name` (any labels) in a Prometheus text body.
fn sum_samples(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) {
    let end = tokio::time::Instant::now() + timeout;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_status_world_and_events_during_a_bot_run() {
    let ts = start(ServerConfig {
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    });
    let admin = ts.server.admin_addr().expect("admin listener bound");
    assert_ne!(admin.port(), 0);
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &ts.trust).unwrap();
    let mut bots = Vec::new();
    for i in 0..BOTS {
        let c = Client::connect(&ep, ts.addr, "localhost", &format!("bot{i}"))
            .await
            .unwrap();
        let a = i as f32 * 1.1;
        c.set_input(a.cos() * 0.7, a.sin() * 0.7, a, i % 3 == 0);
        bots.push(c);
    }
    for c in &bots {
        c.chat(&format!("hello from {}", c.name())).unwrap();
    }

    // /status: the same players as the bots see, each with link figures once sampled (1 Hz).
    let names: BTreeSet<String> = bots.iter().map(|c| c.name().to_owned()).collect();
    wait_until(
        "status with every player sampled",
        Duration::from_secs(8),
        || async {
            let r = get(admin, "/status").await;
            assert_eq!(r.status, 200);
            assert!(r.header("content-type").unwrap().contains("json"));
            let s: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            let players = s["players"].as_array().unwrap();
            players.len() == BOTS
                && players.iter().all(|p| p["rtt_ms"].is_number())
                && s["tick"]["ticks"].as_u64().unwrap_or(0) > 0
        },
    )
    .await;
    let s: serde_json::Value = serde_json::from_str(&get(admin, "/status").await.body).unwrap();
    let got: BTreeSet<String> = s["players"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, names);
    assert_eq!(s["player_count"], BOTS);
    assert!(bots.iter().all(|c| c.roster().len() == BOTS));
    assert_eq!(s["entities"]["players"], BOTS);
    assert_eq!(s["entities"]["npcs"], 100);
    assert_eq!(s["connections"], BOTS);
    let rate = s["tick"]["rate_hz"].as_f64().unwrap();
    assert!((40.0..80.0).contains(&rate), "tick rate {rate}");
    for p in s["players"].as_array().unwrap() {
        let rtt = p["rtt_ms"].as_f64().unwrap();
        assert!(rtt > 0.0 && rtt < 500.0, "{p}");
        assert!(p["bytes_out_per_s"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["snapshot_bytes_per_s"].as_f64().unwrap() > 0.0, "{p}");
        let age = p["baseline_age_ticks"].as_i64().expect("acked baseline");
        assert!((0..64).contains(&age), "{p}");
    }

    // /metrics: every documented metric, with its type; non-zero where traffic flows.
    let m = get(admin, "/metrics").await;
    assert_eq!(m.status, 200);
    for d in doc_metrics() {
        let type_line = format!("# TYPE {} {}", d.name, d.kind);
        assert!(
            m.body.lines().any(|l| l == type_line),
            "{type_line:?} missing from /metrics"
        );
        if d.nonzero {
            let series = if d.kind == "histogram" {
                format!("{}_count", d.name)
            } else {
                d.name.clone()
            };
            assert!(
                sum_samples(&m.body, &series) > 0.0,
                "{series} is zero during a bot run"
            );
        }
    }
    for phase in ["inputs", "sim", "interest", "encode", "send", "publish"] {
        let l = format!("quicktick_tick_phase_seconds_count{{phase=\"{phase}\"}}");
        assert!(m.body.contains(&l), "no {l}");
    }
    for kind in ["snapshot", "stream", "udp"] {
        let l = format!("quicktick_bytes_sent_total{{kind=\"{kind}\"}}");
        assert!(sum_samples(&m.body, &l) > 0.0, "{l} is zero");
    }
    assert!(sum_samples(&m.body, "quicktick_bytes_received_total{kind=\"input\"}") > 0.0);

    // /world: the bots on the map.
    let w: serde_json::Value = serde_json::from_str(&get(admin, "/world").await.body).unwrap();
    assert_eq!(w["players"].as_array().unwrap().len(), BOTS);
    assert_eq!(w["npcs"].as_array().unwrap().len(), 100);
    let map: serde_json::Value = serde_json::from_str(&get(admin, "/map").await.body).unwrap();
    assert!(!map["walls"].as_array().unwrap().is_empty());

    // /events: numbered from 1, joins and chat of every bot; a resume starts after the given id.
    let r = get_with(
        admin,
        "/events",
        &[("Last-Event-ID", "0")],
        Duration::from_millis(1500),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .contains("text/event-stream"));
    let evs = sse_events(&r.body);
    let ids: Vec<u64> = evs.iter().filter_map(|e| e.id).collect();
    assert_eq!(ids.first(), Some(&1), "{evs:?}");
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "ids not consecutive: {ids:?}"
    );
    let joined: BTreeSet<String> = evs
        .iter()
        .filter(|e| e.event == "join")
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.data).unwrap()["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(joined, names);
    assert_eq!(evs.iter().filter(|e| e.event == "chat").count(), BOTS);
    let tick = evs
        .iter()
        .find(|e| e.event == "tick")
        .expect("a tick event");
    let t: serde_json::Value = serde_json::from_str(&tick.data).unwrap();
    assert!(t["rate_hz"].as_f64().unwrap() > 0.0);
    let resume_after = ids[ids.len() / 2];
    let r = get_with(
        admin,
        "/events",
        &[("Last-Event-ID", &resume_after.to_string())],
        Duration::from_millis(800),
    )
    .await;
    let resumed: Vec<u64> = sse_events(&r.body).iter().filter_map(|e| e.id).collect();
    assert_eq!(resumed.first(), Some(&(resume_after + 1)), "{resumed:?}");
    assert!(resumed.len() >= ids.len() - ids.len() / 2 - 1);

    // An id from before a server restart (newer than any event here) is served like a new
    // subscriber, not left waiting forever; u64::MAX does not overflow.
    for id in ["99999999999", "18446744073709551615"] {
        let r = get_with(
            admin,
            "/events",
            &[("Last-Event-ID", id)],
            Duration::from_millis(800),
        )
        .await;
        let evs = sse_events(&r.body);
        assert!(
            evs.iter().any(|e| e.id.is_some()) && !evs.iter().any(|e| e.event == "gap"),
            "Last-Event-ID {id}: {evs:?}"
        );
    }
    // Subscribers are capped: the one past the cap gets 503 while the others stay open.
    let mut open = Vec::new();
    for _ in 0..quicktick_server::admin::MAX_SSE_SUBSCRIBERS {
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut s,
            format!("GET /events HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::io::AsyncReadExt::read(&mut s, &mut buf)
            .await
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        open.push(s);
    }
    let over = get_with(admin, "/events", &[], Duration::from_millis(500)).await;
    assert_eq!(over.status, 503);
    drop(open);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = get_with(admin, "/events", &[], Duration::from_millis(300)).await;
    assert_eq!(again.status, 200, "slots come back when subscribers leave");

    // A client that never finishes its request headers is cut off.
    let mut slow = tokio::net::TcpStream::connect(admin).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut slow, b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let t = std::time::Instant::now();
    let ended = tokio::time::timeout(
        quicktick_server::admin::HEADER_READ_TIMEOUT + Duration::from_secs(3),
        async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut slow, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // e.g. a 408 response, then the close
                }
            }
        },
    )
    .await;
    assert!(
        ended.is_ok(),
        "slow-header connection still open after {:?}",
        t.elapsed()
    );

    // The dashboard page, every byte served by the server.
    let page = get(admin, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<canvas id=\"map\""));
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));

    // A leave shows up as an event.
    let leaver = bots.pop().unwrap();
    let left_name = leaver.name().to_owned();
    leaver.close().await;
    let last = *ids.last().unwrap();
    wait_until("leave event", Duration::from_secs(5), || {
        let left_name = left_name.clone();
        async move {
            let r = get_with(
                admin,
                "/events",
                &[("Last-Event-ID", &last.to_string())],
                Duration::from_millis(300),
            )
            .await;
            sse_events(&r.body)
                .iter()
                .any(|e| e.event == "leave" && e.data.contains(&left_name))
        }
    })
    .await;

    let stats = ts.server.shutdown().await;
    assert_eq!(stats.datagrams_too_large, 0);
    // The listener is gone after shutdown.
    assert!(tokio::net::TcpStream::connect(admin).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_listener_unless_asked() {
    let ts = start(test_config());
    assert_eq!(ts.server.admin_addr(), None);
    ts.server.shutdown().await;
}
