//! The dashboard in a real browser: headless Chromium (Debian's `chromium`) opens `/` while bots
//! play over QUIC on 127.0.0.1; the test drives it over the DevTools protocol (`--remote-debugging-pipe`:
//! JSON messages separated by NUL on fds 3/4, so no extra port or WebSocket), asserts the map shows
//! every bot and the graphs advance, and saves a screenshot to `target/artifacts/dashboard.png`.
//!
//! Chromium missing fails the test, unless `QUICKTICK_SKIP_BROWSER=1`. `QUICKTICK_CHROMIUM` names
//! another binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::http::get;
use common::{start, test_config};
use quicktick_bot::{client_endpoint, Client};
use quicktick_server::ServerConfig;
use serde_json::{json, Value};

const BOTS: usize = 5;

/// A headless Chromium driven over `--remote-debugging-pipe`; killed on drop.
struct Browser {
    child: Child,
    to: ChildStdin,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    profile: PathBuf,
}

impl Browser {
    fn launch(binary: &Path, artifacts: &Path) -> Self {
        let profile = std::env::temp_dir().join(format!(
            "quicktick-chromium-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let log = std::fs::File::create(artifacts.join("chromium.log")).unwrap();
        // The pipe protocol reads fd 3 and writes fd 4: map them onto our stdin/stdout pipes.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2"#)
            .arg(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                "--window-size=1400,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("cannot start chromium");
        let to = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while let Ok(n) = r.read_until(0, &mut buf) {
                if n == 0 {
                    break;
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
                buf.clear();
            }
        });
        Self {
            child,
            to,
            from,
            next_id: 1,
            profile,
        }
    }

    /// Sends a command (to a page session if given) and waits for its result (15 s at most).
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).unwrap();
        self.to.flush().unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("chromium did not answer {method} within 15 s"));
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method} failed: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its JSON value.
    fn eval(&mut self, session: &str, expr: &str) -> Value {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The page's counters (`<body data-…>`).
fn dataset(b: &mut Browser, session: &str) -> Value {
    b.eval(
        session,
        "JSON.stringify(document.body ? document.body.dataset : {})",
    )
    .as_str()
    .map_or(Value::Null, |s| serde_json::from_str(s).unwrap())
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium_shows_the_bots() {
    let binary = std::env::var_os("QUICKTICK_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    if !binary.exists() {
        if std::env::var("QUICKTICK_SKIP_BROWSER").is_ok_and(|v| v == "1") {
            eprintln!(
                "SKIPPED: {} not found and QUICKTICK_SKIP_BROWSER=1",
                binary.display()
            );
            return;
        }
        panic!(
            "{} not found: install Debian's `chromium` (apt-get install -y chromium) or set \
             QUICKTICK_SKIP_BROWSER=1 to skip this test",
            binary.display()
        );
    }
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();

    let ts = start(ServerConfig {
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    });
    let admin = ts.server.admin_addr().unwrap();
    let ep = client_endpoint("127.0.0.1:0".parse().unwrap(), &ts.trust).unwrap();
    let mut bots = Vec::new();
    for i in 0..BOTS {
        let c = Client::connect(&ep, ts.addr, "localhost", &format!("bot{i}"))
            .await
            .unwrap();
        let a = i as f32 * 1.3;
        c.set_input(a.cos() * 0.6, a.sin() * 0.6, a, false);
        c.chat(&format!("{} says hi", c.name())).unwrap();
        bots.push(c);
    }

    // The browser runs on its own thread (its calls block); bots keep playing meanwhile.
    let url = format!("http://{admin}/");
    let shot = artifacts.join("dashboard.png");
    let shot2 = shot.clone();
    let result = tokio::task::spawn_blocking(move || {
        let mut b = Browser::launch(&binary, &artifacts);
        let target = b.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().unwrap().to_owned();
        let attached = b.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        let s = attached["sessionId"].as_str().unwrap().to_owned();
        b.call(
            Some(&s),
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        );
        b.call(Some(&s), "Page.navigate", json!({ "url": url }));
        // Wait (bounded) until the map shows every bot and a tick was plotted.
        let end = Instant::now() + Duration::from_secs(20);
        let first = loop {
            let d = dataset(&mut b, &s);
            if num(&d, "players") == BOTS as u64 && num(&d, "ticksPlotted") >= 1 {
                break d;
            }
            assert!(
                Instant::now() < end,
                "dashboard never showed {BOTS} players: {d}"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        // The graphs advance: one `tick` event per second.
        std::thread::sleep(Duration::from_millis(3200));
        let second = dataset(&mut b, &s);
        let png = b.call(
            Some(&s),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        );
        let png = base64_decode(png["data"].as_str().unwrap());
        std::fs::write(&shot2, &png).unwrap();
        let log_lines = b.eval(&s, "document.getElementById('log').childNodes.length");
        let _ = b.call(None, "Browser.close", json!({}));
        (first, second, png.len(), log_lines)
    })
    .await
    .unwrap();
    let (first, second, png_len, log_lines) = result;
    eprintln!(
        "dashboard: first {first}, second {second}, screenshot {} ({png_len} B)",
        shot.display()
    );
    assert_eq!(num(&second, "players"), BOTS as u64, "{second}");
    assert_eq!(num(&second, "npcs"), 100, "{second}");
    assert!(
        num(&second, "ticksPlotted") >= num(&first, "ticksPlotted") + 2,
        "graphs did not advance: {first} → {second}"
    );
    assert!(
        num(&second, "worldTick") > num(&first, "worldTick"),
        "map did not advance: {first} → {second}"
    );
    assert!(num(&second, "lastEventId") > 0);
    assert!(
        log_lines.as_u64().unwrap() >= (2 * BOTS) as u64,
        "joins + chats in the log: {log_lines}"
    );
    assert!(png_len > 10_000, "screenshot too small: {png_len} B");
    // The server agrees on the number of players.
    let status: Value = serde_json::from_str(&get(admin, "/status").await.body).unwrap();
    assert_eq!(status["player_count"], BOTS);
    for c in &bots {
        assert!(c.is_connected());
    }
    ts.server.shutdown().await;
}
