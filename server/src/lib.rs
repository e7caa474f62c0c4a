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

// Tests may unwrap and index; library code may not (checked by the non-test build).
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod admin;
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
    stop_accept: watch::Sender<bool>,
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
                });
                tracing::info!(addr = %bound, "admin HTTP listening: /metrics /status /events, dashboard at /");
                Some((bound, tokio::spawn(admin::serve(listener, state))))
            }
            None => None,
        };
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
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
        let (stop_accept, stop_rx) = watch::channel(false);
        let cfg_pending = cfg.max_pending_handshakes;
        let ctx = Arc::new(net::NetCtx {
            cfg,
            stats: stats.clone(),
            control: control_tx,
            inputs: input_tx,
            next_conn: AtomicU64::new(1),
            pending: Arc::new(tokio::sync::Semaphore::new(cfg_pending)),
            metrics,
            conns,
        });
        let accept_task = tokio::spawn(net::accept_loop(endpoint.clone(), ctx, stop_rx));
        Ok(Self {
            endpoint,
            stats,
            published,
            stop_tick,
            failed,
            stop_accept,
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

    /// Graceful shutdown: stop accepting, close every player with the reason "server shutting down"
    /// after flushing their stream, wait (bounded) for connections to close, and stop the tick thread.
    pub async fn shutdown(mut self) -> StatsSnapshot {
        let _ = self.stop_accept.send(true);
        let _ = (&mut self.accept_task).await;
        self.stop_tick.store(true, Ordering::Release);
        if let Some(t) = self.tick_thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while self.stats.connections_current.load(Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.endpoint
            .close(close::SHUTDOWN.into(), b"server shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        let _ = self.stop_admin.send(true);
        if let Some((_, task)) = self.admin.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        self.stats.snapshot()
    }
}

/// Runs a server on `endpoint` until `shutdown` completes, then shuts down gracefully.
pub async fn run(
    endpoint: quinn::Endpoint,
    cfg: ServerConfig,
    map: Map,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<StatsSnapshot> {
    let server = Server::start(endpoint, cfg, map)?;
    let failed = tokio::select! {
        () = shutdown => false,
        () = server.wait_failed() => true,
    };
    let stats = server.shutdown().await;
    if failed {
        anyhow::bail!("the tick thread failed (see the log); every client was closed with code 6");
    }
    Ok(stats)
}
