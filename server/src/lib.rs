//! quicktick-server: the dedicated authoritative game-state server.
//!
//! [`Server::start`] takes a bound [`quinn::Endpoint`] and runs the server in-process (tests start it
//! on 127.0.0.1:0); [`run`] adds a shutdown future; the `quicktick-server` binary wraps it with flags.
//!
//! # Layout
//! - [`auth`]: signed connect tokens (issue, verify, replay guard).
//! - [`config`]: settings file + validation; map loading.
//! - [`tls`]: PEM loading and the development certificate.
//! - [`core`]: the I/O-free authoritative core (world, lobby, sessions, snapshot encode).
//! - `tick_loop`: the dedicated tick thread: schedule, queues, executing the core's outputs.
//! - [`net`]: endpoint, accept loop, per-connection tasks.
//! - [`stats`]: lock-free counters.
//! - [`telemetry`]: metrics handles, the Prometheus recorder, tick-phase timing, per-connection sampling.
//! - [`events`]: the bounded, id-numbered event ring behind `/events`.
//! - `admin`: the admin HTTP listener (`/metrics`, `/status`, `/events`, `/world`, `/map`, `/`).
//! - [`agones`]: health settings shared with the manifest; with feature `agones` the SDK lifecycle (Ready, health from the tick loop, player
//!   tracking, state label, Shutdown).

// Tests may unwrap and index; library code may not (checked by the non-test build).
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod admin;
pub mod agones;
pub mod auth;
pub mod config;
pub mod core;
pub mod events;
pub mod interest;
pub mod net;
pub mod replicate;
pub mod stats;
pub mod telemetry;
mod tick_loop;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quicktick_shared::map::Map;
use quicktick_shared::wire::close;
use tokio::sync::{mpsc, watch};

pub use crate::config::ServerConfig;
pub use crate::stats::{ServerStats, StatsSnapshot};
pub use crate::tick_loop::{PlayerStatus, Published, TickSummary};

/// Capacity of the input queue from connection tasks to the tick thread (full → dropped, counted).
pub const INPUT_QUEUE: usize = 16 * 1024;
/// Capacity of the control queue (joins, chat, leaves: never dropped, senders wait).
pub const CONTROL_QUEUE: usize = 4096;

/// A running server.
#[derive(Debug)]
pub struct Server {
    endpoint: quinn::Endpoint,
    stats: Arc<ServerStats>,
    published: Arc<Published>,
    stop_tick: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    /// Flips to true when draining starts: the accept loop refuses new connections from then on.
    draining: watch::Sender<bool>,
    /// To the tick thread (the drain notice travels in order with joins and leaves).
    control: mpsc::Sender<tick_loop::Control>,
    /// `drain_secs` from the config: how long [`run`] lets the match go on after the stop signal.
    drain: Duration,
    /// The tick thread's debug stall request (see [`TickStall`]).
    stall_ms: Arc<AtomicU64>,
    tick_thread: Option<std::thread::JoinHandle<()>>,
    accept_task: tokio::task::JoinHandle<()>,
    /// The admin HTTP listener's address and task, when `metrics_addr` is set.
    admin: Option<(std::net::SocketAddr, tokio::task::JoinHandle<()>)>,
    /// Stops the admin listener and its event streams.
    stop_admin: watch::Sender<bool>,
    /// Presence, chat and tick events.
    events: Arc<events::EventRing>,
}

impl Server {
    /// Starts the tick thread and the accept loop on `endpoint`. Must be called inside a tokio
    /// runtime.
    pub fn start(endpoint: quinn::Endpoint, cfg: ServerConfig, map: Map) -> anyhow::Result<Self> {
        cfg.validate()?;
        let stats = Arc::new(ServerStats::default());
        let published = Arc::new(Published::default());
        let stop_tick = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        // The recorder must exist before the handles are registered (else they are no-ops).
        let prometheus = cfg
            .metrics_addr
            .and_then(|_| telemetry::install_prometheus());
        let metrics = telemetry::Metrics::register();
        let events = Arc::new(events::EventRing::default());
        let conns = Arc::new(telemetry::ConnRegistry::default());
        let (stop_admin, stop_admin_rx) = watch::channel(false);
        let admin = match cfg.metrics_addr {
            Some(addr) => {
                let listener = admin::bind(addr)?;
                let bound = listener.local_addr().context("admin listener address")?;
                let state = Arc::new(admin::AdminState {
                    started: std::time::Instant::now(),
                    tick_rate: cfg.tick_rate,
                    stats: stats.clone(),
                    published: published.clone(),
                    conns: conns.clone(),
                    events: events.clone(),
                    prometheus,
                    map: admin::AdminState::map_json(&map),
                    stop: stop_admin_rx,
                    sse_slots: Arc::new(tokio::sync::Semaphore::new(admin::MAX_SSE_SUBSCRIBERS)),
                });
                tracing::info!(addr = %bound, "admin HTTP listening: /metrics /status /events, dashboard at /");
                Some((bound, admin::spawn(listener, state)?))
            }
            None => None,
        };
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        let stall_ms = Arc::new(AtomicU64::new(0));
        let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
        let mut core = core::ServerCore::new(cfg.clone(), map);
        if cfg.effective_auth() == config::AuthMode::Required {
            let secret = cfg.load_secret()?.context(
                "auth is required (the default off loopback) but no auth_secret_file is set",
            )?;
            core.require_tokens(secret);
        }
        let thread = tick_loop::TickThread {
            core,
            links: HashMap::new(),
            control_rx,
            input_rx,
            stats: stats.clone(),
            published: published.clone(),
            stop: stop_tick.clone(),
            failed: failed.clone(),
            stall_ms: stall_ms.clone(),
            tick_rate: cfg.tick_rate,
            max_catchup: cfg.max_catchup_ticks,
            out: Vec::new(),
            timer: telemetry::PhaseTimer::new(&metrics),
            metrics: metrics.clone(),
            events: events.clone(),
            marks: tick_loop::Marks::default(),
            window: tick_loop::Window::default(),
        };
        let tick_thread = std::thread::Builder::new()
            .name("quicktick-tick".into())
            .spawn(move || thread.run())
            .context("cannot start the tick thread")?;
        let (draining, draining_rx) = watch::channel(false);
        let drain = Duration::from_secs(u64::from(cfg.drain_secs));
        let ctx = Arc::new(net::NetCtx::new(
            cfg,
            stats.clone(),
            control_tx.clone(),
            input_tx,
            metrics,
            conns,
        ));
        let accept_task = tokio::spawn(net::accept_loop(endpoint.clone(), ctx, draining_rx));
        Ok(Self {
            endpoint,
            stats,
            published,
            stop_tick,
            failed,
            draining,
            control: control_tx,
            drain,
            stall_ms,
            tick_thread: Some(tick_thread),
            accept_task,
            admin,
            stop_admin,
            events,
        })
    }

    /// The bound address of the admin HTTP listener (`/metrics`, `/status`, `/events`, `/`), when
    /// `metrics_addr` is set.
    #[must_use]
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
    }

    /// The event ring behind `/events`.
    #[must_use]
    pub fn events(&self) -> &Arc<events::EventRing> {
        &self.events
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Live counters.
    #[must_use]
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// What the tick thread publishes (recent snapshots, roster).
    #[must_use]
    pub fn published(&self) -> &Arc<Published> {
        &self.published
    }

    /// True when the tick thread died (a bug): the server no longer simulates and should stop.
    #[must_use]
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Completes when the tick thread has died.
    pub async fn wait_failed(&self) {
        while !self.failed() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A handle that makes the tick thread stall (tests of health reporting). Only code in this
    /// process can use it; nothing on the network reaches it.
    #[doc(hidden)]
    #[must_use]
    pub fn tick_stall(&self) -> TickStall {
        TickStall(self.stall_ms.clone())
    }

    /// The configured drain time (`drain_secs`).
    #[must_use]
    pub fn drain_time(&self) -> Duration {
        self.drain
    }

    /// True once draining has started.
    #[must_use]
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Starts draining and returns at once: new connection attempts are refused at the QUIC level,
    /// joins still in their handshake are refused with `ShuttingDown`, and every player gets
    /// `ServerMsg::Draining { reason, drain_ms }` while the match keeps running. Idempotent.
    pub async fn begin_drain(&self, drain: Duration) {
        if self.draining.send_replace(true) {
            return;
        }
        let drain_ms = u32::try_from(drain.as_millis()).unwrap_or(u32::MAX);
        tracing::info!(drain_ms, "draining: refusing new connections");
        let _ = self
            .control
            .send(tick_loop::Control::Drain {
                reason: SHUTDOWN_REASON.into(),
                drain_ms,
            })
            .await;
    }

    /// Graceful shutdown without a drain period: [`Self::drain_and_shutdown`] with zero drain time.
    /// Every player still gets the `Draining` notice, then the close.
    pub async fn shutdown(self) -> StatsSnapshot {
        self.drain_and_shutdown(Duration::ZERO, std::future::pending())
            .await
    }

    /// Graceful drain and shutdown, all within `drain` (when it is non-zero): [`Self::begin_drain`]
    /// with the play time `drain − close reserve` (the reserve is `min(drain / 4, 1 s)`); the match
    /// goes on until every connection has left, the play time has passed or `hurry` completes (e.g. a
    /// second signal), whichever is first; then every remaining player is closed with
    /// [`close::SHUTDOWN`] and the reason [`SHUTDOWN_REASON`] after their stream is flushed, the tick
    /// thread stops, and the endpoint waits until the closes are delivered, at most until `drain` is
    /// over. With a zero `drain` the close waits are [`CLOSE_WAIT`] and [`IDLE_WAIT`].
    pub async fn drain_and_shutdown(
        mut self,
        drain: Duration,
        hurry: impl Future<Output = ()>,
    ) -> StatsSnapshot {
        let started = tokio::time::Instant::now();
        let play = drain.saturating_sub(close_reserve(drain));
        self.begin_drain(play).await;
        let play_until = started + play;
        let everyone_left_or_deadline = async {
            while self.stats.connections_current.load(Ordering::Relaxed) > 0
                && tokio::time::Instant::now() < play_until
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            () = everyone_left_or_deadline => {}
            () = hurry => tracing::info!("drain cut short"),
        }
        tracing::info!(
            remaining = self.stats.connections_current.load(Ordering::Relaxed),
            "drain over: closing the remaining connections"
        );
        let now = tokio::time::Instant::now();
        let (close_until, idle_until) = if drain.is_zero() {
            (now + CLOSE_WAIT, now + CLOSE_WAIT + IDLE_WAIT)
        } else {
            let end = (started + drain).max(now + MIN_CLOSE_TIME);
            (end, end)
        };
        self.stop_tick.store(true, Ordering::Release);
        if let Some(t) = self.tick_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        while self.stats.connections_current.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < close_until
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.endpoint
            .close(close::SHUTDOWN.into(), SHUTDOWN_REASON.as_bytes());
        let _ = tokio::time::timeout_at(idle_until, self.endpoint.wait_idle()).await;
        if tokio::time::timeout(Duration::from_millis(200), &mut self.accept_task)
            .await
            .is_err()
        {
            self.accept_task.abort();
        }
        let _ = self.stop_admin.send(true);
        if let Some((_, task)) = self.admin.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        self.stats.snapshot()
    }
}

/// Test/debug hook: makes the tick thread sleep before its next tick, as a stuck simulation would.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct TickStall(Arc<AtomicU64>);

impl TickStall {
    /// The next tick starts only after sleeping `d` (then the catch-up bound applies).
    pub fn stall_next_tick(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.store(ms, Ordering::Release);
    }
}

/// The part of a drain kept for delivering the closes: `min(drain / 4, 1 s)`.
#[must_use]
pub fn close_reserve(drain: Duration) -> Duration {
    (drain / 4).min(Duration::from_secs(1))
}

/// The close reason (and drain notice reason) of a server shutdown.
pub const SHUTDOWN_REASON: &str = "server shutting down";
/// After a zero-time drain, how long the server waits for the connection tasks to finish their closes.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// Then, how long `Endpoint::wait_idle` may take to deliver the closes.
pub const IDLE_WAIT: Duration = Duration::from_secs(2);
/// The close phase of a drain gets at least this long, even after a late `hurry`.
const MIN_CLOSE_TIME: Duration = Duration::from_millis(100);

/// Runs a server on `endpoint` until `shutdown` completes, then drains for `drain_secs` and shuts
/// down gracefully ([`Server::drain_and_shutdown`]).
pub async fn run(
    endpoint: quinn::Endpoint,
    cfg: ServerConfig,
    map: Map,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<StatsSnapshot> {
    run_with_hurry(endpoint, cfg, map, shutdown, std::future::pending()).await
}

/// [`run`], where `hurry` completing during the drain cuts it short (the binary: a second signal).
pub async fn run_with_hurry(
    endpoint: quinn::Endpoint,
    cfg: ServerConfig,
    map: Map,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<StatsSnapshot> {
    serve(Server::start(endpoint, cfg, map)?, shutdown, hurry).await
}

/// Serves a started server until `shutdown` completes (or the tick thread fails), then drains for
/// `drain_secs` ([`Server::drain_and_shutdown`]). With the `agones` feature, under Agones (the
/// `AGONES_SDK_GRPC_PORT` variable set), the server also reports its lifecycle to the SDK sidecar:
/// `Ready` now, health while the tick loop advances, players, the `quicktick.state` label, and
/// `Shutdown` after the drain.
pub async fn serve(
    server: Server,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<StatsSnapshot> {
    #[cfg(feature = "agones")]
    let mut lifecycle = agones::Lifecycle::start_if_configured(&server).await?;
    let failed = tokio::select! {
        () = shutdown => false,
        () = server.wait_failed() => true,
    };
    let drain = if failed {
        Duration::ZERO
    } else {
        server.drain_time()
    };
    #[cfg(feature = "agones")]
    if let Some(l) = &mut lifecycle {
        l.draining().await;
    }
    let stats = server.drain_and_shutdown(drain, hurry).await;
    #[cfg(feature = "agones")]
    if let Some(l) = lifecycle {
        l.shutdown().await;
    }
    if failed {
        anyhow::bail!("the tick thread failed (see the log); every client was closed with code 6");
    }
    Ok(stats)
}
