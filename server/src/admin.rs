//! The admin HTTP listener (axum): `/metrics` (Prometheus text), `/status` (JSON), `/events`
//! (Server-Sent Events with replay from `Last-Event-ID`), `/world` and `/map` (JSON for the
//! dashboard) and `/`, the dashboard page (one embedded HTML file, no external resources).
//! Handlers only copy what the tick thread and connection tasks published, holding each lock just
//! long enough to clone it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use metrics_exporter_prometheus::PrometheusHandle;
use quicktick_shared::entity::EntityKind;
use quicktick_shared::map::Map;
use quicktick_shared::quant::POS_QUANTUM;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::events::{Event, EventRing};
use crate::stats::ServerStats;
use crate::telemetry::ConnRegistry;
use crate::tick_loop::Published;

/// The dashboard page.
const DASHBOARD: &str = include_str!("dashboard.html");
/// Events a new `/events` subscriber (no `Last-Event-ID`) receives from the ring first.
const INITIAL_REPLAY: u64 = 60;

/// What the handlers read.
#[derive(Debug)]
pub(crate) struct AdminState {
    /// When the server started.
    pub started: Instant,
    /// Configured tick rate.
    pub tick_rate: u32,
    /// Server counters.
    pub stats: Arc<ServerStats>,
    /// Snapshots, roster, players and tick statistics from the tick thread.
    pub published: Arc<Published>,
    /// Per-connection status from the connection tasks.
    pub conns: Arc<ConnRegistry>,
    /// Presence, chat and tick events.
    pub events: Arc<EventRing>,
    /// The process's Prometheus recorder.
    pub prometheus: Option<PrometheusHandle>,
    /// The map as JSON (static).
    pub map: Value,
    /// Flips to true when the server stops (ends event streams).
    pub stop: watch::Receiver<bool>,
    /// Permits for `/events` subscribers ([`MAX_SSE_SUBSCRIBERS`]).
    pub sse_slots: Arc<tokio::sync::Semaphore>,
}

impl AdminState {
    /// The map as the dashboard draws it.
    pub fn map_json(map: &Map) -> Value {
        json!({
            "id": map.id,
            "width": map.width,
            "height": map.height,
            "walls": map.walls.iter().map(|w| [w.min.x, w.min.y, w.max.x, w.max.y]).collect::<Vec<_>>(),
        })
    }
}

/// Binds the admin listener (so the caller learns the address before serving).
pub(crate) fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot bind the admin/metrics listener on TCP {addr}"))?;
    l.set_nonblocking(true)
        .context("admin listener: set_nonblocking")?;
    Ok(l)
}

/// Most `/events` subscribers at once; more get `503 Service Unavailable`.
pub const MAX_SSE_SUBSCRIBERS: usize = 64;

/// Runs the listener on its own thread with its own single-threaded runtime, so that however busy
/// the admin side gets (many dashboards, slow clients), it never takes time from the game's network
/// tasks. Returns a task that completes when that thread has stopped.
pub(crate) fn spawn(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("admin listener: runtime")?;
    let thread = std::thread::Builder::new()
        .name("quicktick-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => serve(l, state).await,
                    Err(e) => tracing::warn!("admin listener: cannot register with tokio: {e}"),
                }
            });
        })
        .context("admin listener: thread")?;
    Ok(tokio::task::spawn_blocking(move || {
        let _ = thread.join();
    }))
}

/// The router.
pub(crate) fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/world", get(world))
        .route("/map", get(map))
        .route("/events", get(events))
        .with_state(state)
}

/// Most admin HTTP connections at once; more are closed at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 256;
/// Time a client has to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves until `state.stop` flips: at most [`MAX_ADMIN_CONNECTIONS`] connections, each with
/// [`HEADER_READ_TIMEOUT`] to send its request headers (a slow-header client cannot hold a
/// connection open). Connections still open when the stop comes end with this thread's runtime.
pub(crate) async fn serve(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut stop = state.stop.clone();
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream); // over the connection cap: closed at once
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::trace!("admin connection ended: {e}");
            }
        });
    }
}

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD,
    )
        .into_response()
}

async fn metrics(State(st): State<Arc<AdminState>>) -> Response {
    match &st.prometheus {
        Some(h) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed in this process\n",
        )
            .into_response(),
    }
}

async fn map(State(st): State<Arc<AdminState>>) -> Json<Value> {
    Json(st.map.clone())
}

fn round2(v: f32) -> f64 {
    (f64::from(v) * 100.0).round() / 100.0
}

async fn world(State(st): State<Arc<AdminState>>) -> Json<Value> {
    let snap = st
        .published
        .recent
        .lock()
        .ok()
        .and_then(|r| r.back().cloned());
    let names = st
        .published
        .players
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let Some(snap) = snap else {
        return Json(json!({ "tick": null, "players": [], "npcs": [] }));
    };
    let mut players = Vec::new();
    let mut npcs = Vec::new();
    for e in &snap.entities {
        let (x, y) = (
            round2(e.qx as f32 * POS_QUANTUM),
            round2(e.qy as f32 * POS_QUANTUM),
        );
        match e.kind {
            EntityKind::Player => {
                let who = names.iter().find(|p| p.avatar == e.id.index);
                players.push(json!({
                    "id": who.map(|p| p.id),
                    "name": who.map(|p| p.name.as_str()),
                    "x": x,
                    "y": y,
                }));
            }
            EntityKind::Npc => npcs.push([x, y]),
        }
    }
    Json(json!({ "tick": snap.tick.0, "players": players, "npcs": npcs }))
}

async fn status(State(st): State<Arc<AdminState>>) -> Json<Value> {
    let ticks = st.published.ticks.lock().map(|t| *t).unwrap_or_default();
    let players = st
        .published
        .players
        .lock()
        .map(|p| p.clone())
        .unwrap_or_default();
    let conns = st.conns.lock().map(|c| c.clone()).unwrap_or_default();
    let snap = st
        .published
        .recent
        .lock()
        .ok()
        .and_then(|r| r.back().cloned());
    let (mut n_players, mut n_npcs) = (0usize, 0usize);
    for e in snap.iter().flat_map(|s| s.entities.iter()) {
        match e.kind {
            EntityKind::Player => n_players += 1,
            EntityKind::Npc => n_npcs += 1,
        }
    }
    let s = st.stats.snapshot();
    let players: Vec<Value> = players
        .iter()
        .map(|p| {
            let c = conns.get(&p.conn);
            json!({
                "id": p.id,
                "name": p.name,
                "conn": p.conn,
                "baseline_age_ticks": p.baseline_age_ticks,
                "rtt_ms": c.map(|c| c.rtt_ms),
                "loss": c.map(|c| c.loss),
                "lost_packets": c.map(|c| c.lost_packets),
                "bytes_out_per_s": c.map(|c| c.bytes_out_per_s),
                "bytes_in_per_s": c.map(|c| c.bytes_in_per_s),
                "snapshot_bytes_per_s": c.map(|c| c.snapshot_bytes_per_s),
                "datagrams_evicted": c.map(|c| c.datagrams_evicted),
                "connected_s": c.map(|c| c.connected_s),
                "remote": c.map(|c| c.remote.as_str()),
            })
        })
        .collect();
    Json(json!({
        "uptime_s": st.started.elapsed().as_secs_f64(),
        "tick_rate": st.tick_rate,
        "tick": ticks,
        "tick_totals": {
            "ticks": s.ticks,
            "mean_us": s.tick_us_total / s.ticks.max(1),
            "max_us": s.tick_us_max,
            "overruns": s.overruns,
            "late": s.late_ticks,
            "skipped": s.skipped_ticks,
        },
        "entities": { "total": n_players + n_npcs, "players": n_players, "npcs": n_npcs },
        "connections": s.connections_current,
        "player_count": players.len(),
        "players": players,
        "counters": s,
    }))
}

/// One `/events` subscriber.
struct Subscriber {
    /// Held while subscribed.
    _slot: tokio::sync::OwnedSemaphorePermit,
    ring: Arc<EventRing>,
    newest: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    /// Id of the last event sent.
    last: u64,
    pending: VecDeque<Arc<Event>>,
    /// A `gap` notice to send first (the ring no longer held some requested events).
    gap: Option<(u64, u64)>,
}

impl Subscriber {
    async fn next(mut self) -> Option<(Result<SseEvent, Infallible>, Self)> {
        loop {
            if let Some((from, to)) = self.gap.take() {
                let ev = SseEvent::default()
                    .event("gap")
                    .data(json!({ "missed_from": from, "missed_to": to }).to_string());
                return Some((Ok(ev), self));
            }
            if let Some(e) = self.pending.pop_front() {
                self.last = e.id;
                let ev = SseEvent::default()
                    .id(e.id.to_string())
                    .event(e.kind)
                    .data(e.data.as_str());
                return Some((Ok(ev), self));
            }
            self.newest.borrow_and_update();
            let mut buf = Vec::new();
            self.ring.since(self.last, 256, &mut buf);
            if !buf.is_empty() {
                self.pending.extend(buf);
                continue;
            }
            tokio::select! {
                r = self.newest.changed() => if r.is_err() { return None },
                _ = self.stop.wait_for(|s| *s) => return None,
            }
        }
    }
}

async fn events(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, (StatusCode, &'static str)> {
    let slot = st.sse_slots.clone().try_acquire_owned().map_err(|_| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many /events subscribers\n",
        )
    })?;
    let newest = st.events.newest();
    // An id newer than any event comes from before a server restart (ids start again at 1): such a
    // subscriber is served like a new one.
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&r| r <= newest);
    let last = resume.unwrap_or(newest.saturating_sub(INITIAL_REPLAY));
    let mut pending = Vec::new();
    let oldest = st.events.since(last, usize::MAX, &mut pending);
    let gap = resume
        .filter(|&r| oldest > 0 && r.saturating_add(1) < oldest)
        .map(|r| (r.saturating_add(1), oldest - 1));
    let sub = Subscriber {
        _slot: slot,
        ring: st.events.clone(),
        newest: st.events.subscribe(),
        stop: st.stop.clone(),
        last: pending.last().map_or(last, |e| e.id),
        pending: pending.into(),
        gap,
    };
    Ok(
        Sse::new(futures_util::stream::unfold(sub, Subscriber::next))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(10))),
    )
}
