//! The Agones lifecycle (feature `agones`): under Agones the SDK sidecar's gRPC port is in
//! `AGONES_SDK_GRPC_PORT`; the server then marks itself `Ready` once listening, sends a health ping
//! every [`HEALTH_PERIOD_SECS`] only if the tick loop advanced since the previous ping (a stuck
//! simulation stops the pings, and Agones marks the GameServer `Unhealthy`), reports players as they
//! join and leave, keeps the label [`STATE_LABEL`] current (`ready` → `draining` → `stopped`), and calls
//! `Shutdown` after the drain. `deploy/agones/fleet.yaml` sets the matching health settings.

//!
//! The constants are compiled without the feature too, so the manifest check runs in every build.

#[cfg(feature = "agones")]
pub use lifecycle::Lifecycle;

/// Seconds between health pings; the manifest's `health.periodSeconds` equals it (a test checks).
pub const HEALTH_PERIOD_SECS: u64 = 2;
/// Health checks Agones may miss before marking the GameServer `Unhealthy` (the manifest's
/// `failureThreshold`): a tick loop stuck for longer than `period × threshold` is replaced.
pub const HEALTH_FAILURE_THRESHOLD: u64 = 3;
/// Seconds Agones waits before the first health check (the manifest's `initialDelaySeconds`).
pub const HEALTH_INITIAL_DELAY_SECS: u64 = 5;
/// Label with the server's state: `ready`, `draining`, `stopped` (Agones stores SDK labels as
/// `agones.dev/sdk-<key>`).
pub const STATE_LABEL: &str = "quicktick.state";
/// Label with the number of players (kept even where the alpha player-tracking API is disabled).
pub const PLAYERS_LABEL: &str = "quicktick.players";
/// How often the roster is compared for player connect/disconnect reports, ms.
pub const PLAYER_POLL_MS: u64 = 250;

#[cfg(feature = "agones")]
mod lifecycle {
    use std::collections::BTreeSet;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Context;

    use super::{HEALTH_PERIOD_SECS, PLAYERS_LABEL, PLAYER_POLL_MS, STATE_LABEL};
    use crate::stats::ServerStats;
    use crate::tick_loop::Published;
    use crate::Server;

    /// The Agones side of a running server: the SDK client and the health and player tasks.
    pub struct Lifecycle {
        /// The SDK client (cheap to clone: one gRPC channel).
        sdk: agones::Sdk,
        /// Health pings while the tick loop advances.
        health: tokio::task::JoinHandle<()>,
        /// Player connect/disconnect reports.
        players: tokio::task::JoinHandle<()>,
    }

    impl std::fmt::Debug for Lifecycle {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Lifecycle").finish_non_exhaustive()
        }
    }

    impl Lifecycle {
        /// Under Agones (`AGONES_SDK_GRPC_PORT` set), connects to the SDK (the crate waits up to 30 s),
        /// marks the server `Ready` and starts the health and player tasks; `None` elsewhere.
        pub async fn start_if_configured(server: &Server) -> anyhow::Result<Option<Self>> {
            if std::env::var_os("AGONES_SDK_GRPC_PORT").is_none() {
                tracing::info!("AGONES_SDK_GRPC_PORT not set: not running under Agones");
                return Ok(None);
            }
            Self::start(server).await.map(Some)
        }

        /// Connects to the SDK at `AGONES_SDK_GRPC_PORT` (default 9357), sets the state label, calls
        /// `Ready`, and starts the health and player tasks.
        pub async fn start(server: &Server) -> anyhow::Result<Self> {
            let mut sdk = agones::Sdk::new(None, None)
                .await
                .context("cannot reach the Agones SDK server (AGONES_SDK_GRPC_PORT)")?;
            sdk.set_label(STATE_LABEL, "ready")
                .await
                .context("Agones SetLabel failed")?;
            sdk.ready().await.context("Agones Ready failed")?;
            tracing::info!("Agones: Ready");
            let health = tokio::spawn(health_task(sdk.clone(), server.stats().clone()));
            let players = tokio::spawn(player_task(sdk.clone(), server.published().clone()));
            Ok(Self {
                sdk,
                health,
                players,
            })
        }

        /// The server started draining: label `draining` (the allocator should send nobody new).
        pub async fn draining(&mut self) {
            if let Err(e) = self.sdk.set_label(STATE_LABEL, "draining").await {
                tracing::warn!("Agones SetLabel draining failed: {e}");
            }
        }

        /// After the drain: stops the tasks, labels `stopped` and calls `Shutdown`.
        pub async fn shutdown(mut self) {
            self.health.abort();
            self.players.abort();
            if let Err(e) = self.sdk.set_label(STATE_LABEL, "stopped").await {
                tracing::warn!("Agones SetLabel stopped failed: {e}");
            }
            match self.sdk.shutdown().await {
                Ok(()) => tracing::info!("Agones: Shutdown"),
                Err(e) => tracing::warn!("Agones Shutdown failed: {e}"),
            }
        }
    }

    /// Every [`HEALTH_PERIOD_SECS`], one health ping if the tick counter moved since the last one.
    async fn health_task(sdk: agones::Sdk, stats: Arc<ServerStats>) {
        let mut pings = sdk.health_check();
        let mut interval = tokio::time::interval(Duration::from_secs(HEALTH_PERIOD_SECS));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick = None;
        let mut stalled = false;
        loop {
            interval.tick().await;
            let ticks = stats.ticks.load(Ordering::Relaxed);
            if last_tick == Some(ticks) {
                if !stalled {
                    tracing::warn!(
                        ticks,
                        "tick loop has not advanced: withholding Agones health pings"
                    );
                    stalled = true;
                }
                continue;
            }
            if stalled {
                tracing::info!(
                    ticks,
                    "tick loop advancing again: Agones health pings resume"
                );
                stalled = false;
            }
            last_tick = Some(ticks);
            if pings.send(()).await.is_err() {
                // The health stream ended (sidecar restarted): open a new one.
                pings = sdk.health_check();
                if pings.send(()).await.is_err() {
                    tracing::warn!("Agones health stream unavailable");
                    continue;
                }
            }
            ServerStats::add(&stats.health_pings, 1);
        }
    }

    /// Reports joins and leaves: the alpha player-tracking API (`PlayerConnect`/`PlayerDisconnect`, by
    /// player id) where the SDK server supports it, and always the [`PLAYERS_LABEL`] count.
    async fn player_task(mut sdk: agones::Sdk, published: Arc<Published>) {
        let mut alpha = Some(sdk.alpha().clone());
        let mut known: BTreeSet<u32> = BTreeSet::new();
        let mut labelled = None;
        let mut interval = tokio::time::interval(Duration::from_millis(PLAYER_POLL_MS));
        loop {
            interval.tick().await;
            let now: BTreeSet<u32> = match published.roster.lock() {
                Ok(r) => r.iter().map(|p| p.id).collect(),
                Err(_) => continue,
            };
            for id in now.difference(&known) {
                if let Some(a) = &mut alpha {
                    if let Err(e) = a.player_connect(id.to_string()).await {
                        tracing::info!(
                            "Agones alpha player tracking unavailable ({e}); label only"
                        );
                        alpha = None;
                    }
                }
            }
            for id in known.difference(&now) {
                if let Some(a) = &mut alpha {
                    if let Err(e) = a.player_disconnect(id.to_string()).await {
                        tracing::info!(
                            "Agones alpha player tracking unavailable ({e}); label only"
                        );
                        alpha = None;
                    }
                }
            }
            known = now;
            if labelled != Some(known.len()) {
                match sdk.set_label(PLAYERS_LABEL, known.len().to_string()).await {
                    Ok(()) => labelled = Some(known.len()),
                    Err(e) => tracing::warn!("Agones SetLabel players failed: {e}"),
                }
            }
        }
    }
}
