//! Server configuration: the TOML file (`assets/server.toml` documents every key) with command-line
//! overrides applied on top, validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// Every server setting. Defaults equal `assets/server.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address to listen on.
    pub bind: SocketAddr,
    /// Ticks per second, 10..=128.
    pub tick_rate: u32,
    /// Most players at once.
    pub max_players: usize,
    /// Map file path.
    pub map: PathBuf,
    /// NPCs kept alive.
    pub npc_count: usize,
    /// Simulation seed.
    pub seed: u64,
    /// Inputs repeated per input datagram (3..=16).
    pub input_redundancy: u8,
    /// Snapshot history in ticks (2..=255).
    pub snapshot_history: u32,
    /// Most late ticks run back to back after a stall.
    pub max_catchup_ticks: u32,
    /// QUIC idle timeout, ms.
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive interval, ms.
    pub keep_alive_ms: u64,
    /// Time allowed for the QUIC handshake plus `hello`, ms.
    pub handshake_timeout_ms: u64,
    /// Most connections between their first packet and `hello`; more are refused at once.
    pub max_pending_handshakes: usize,
    /// Most connections (open or in their handshake) from one IP address; 0 = no limit. Excess
    /// attempts are closed with code 9 and a reason (or refused silently when far over).
    pub max_connections_per_ip: u32,
    /// Most connections one IP address may have between their first packet and `hello` (0: no
    /// limit), so that a few addresses cannot fill `max_pending_handshakes` for everyone.
    pub max_pending_per_ip: u32,
    /// Above this many new (unvalidated) handshakes in one second, clients must prove their address
    /// with a QUIC Retry round trip first; 0 = always.
    pub retry_above_handshakes_per_sec: u32,
    /// quinn datagram send buffer, bytes.
    pub datagram_send_buffer: usize,
    /// Frames queued per client before it is disconnected as a slow consumer.
    pub outbound_queue: usize,
    /// Directory for the generated development certificate.
    pub dev_cert_dir: PathBuf,
    /// Interest radius around a player's avatar, world units.
    pub interest_radius: f32,
    /// Extra distance before an entity in view leaves it, world units.
    pub interest_hysteresis: f32,
    /// Snapshot byte budget per client, bytes/s (also capped by the congestion controller).
    pub snapshot_budget_bytes_per_s: u64,
    /// Lag-compensation window, ms: shots are judged against what the shooter saw up to this far back.
    pub lag_comp_ms: u32,
    /// Who may join: `dev` (any name), `required` (signed connect tokens only), or `auto` (`dev` when
    /// bound to loopback, else `required`).
    pub auth: AuthMode,
    /// File holding the hex token secret (≥ 32 bytes); needed for `required` and for `token`.
    pub auth_secret_file: Option<PathBuf>,
    /// How long a player whose connection dropped keeps their session for a resume, ms (0: no
    /// resume; at most 600 000).
    pub resume_grace_ms: u32,
    /// Chat lines kept per channel (global, each room, each player's whispers) for replay, 1..=4096.
    pub chat_history: usize,
    /// TCP address of the admin HTTP listener (`/metrics`, `/status`, `/events`, the dashboard `/`);
    /// `None` (the default): no listener. Port 0 picks a free port ([`crate::Server::admin_addr`]).
    pub metrics_addr: Option<SocketAddr>,
    /// Graceful drain on SIGTERM/SIGINT/`--duration`, seconds (0..=3600): new connections are
    /// refused, players are told, the match goes on until they leave or this passes; then the rest
    /// are closed.
    pub drain_secs: u32,
    /// First tick number (tests start near `u32::MAX` to cross the wrap). Not in the file.
    #[serde(skip)]
    pub start_tick: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 4433)),
            tick_rate: 60,
            max_players: 64,
            map: PathBuf::from(DEFAULT_MAP_PATH),
            npc_count: 200,
            seed: 1,
            input_redundancy: 4,
            snapshot_history: 64,
            max_catchup_ticks: 4,
            idle_timeout_ms: 10_000,
            keep_alive_ms: 2_000,
            handshake_timeout_ms: 5_000,
            max_pending_handshakes: 256,
            max_connections_per_ip: 32,
            max_pending_per_ip: 16,
            retry_above_handshakes_per_sec: 100,
            datagram_send_buffer: 16 * 1024,
            outbound_queue: 1024,
            dev_cert_dir: PathBuf::from("quicktick-dev-cert"),
            interest_radius: 32.0,
            interest_hysteresis: 4.0,
            snapshot_budget_bytes_per_s: 128 * 1024,
            lag_comp_ms: 200,
            auth: AuthMode::Auto,
            auth_secret_file: None,
            resume_grace_ms: 30_000,
            chat_history: 256,
            metrics_addr: None,
            drain_secs: 10,
            start_tick: 0,
        }
    }
}

/// Join policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Any valid name may join (development).
    Dev,
    /// Only signed, unexpired, unused connect tokens.
    Required,
    /// `Dev` on a loopback address, `Required` anywhere else.
    Auto,
}

impl ServerConfig {
    /// The join policy in force for this bind address.
    #[must_use]
    pub fn effective_auth(&self) -> AuthMode {
        match self.auth {
            AuthMode::Auto if self.bind.ip().is_loopback() => AuthMode::Dev,
            AuthMode::Auto => AuthMode::Required,
            m => m,
        }
    }

    /// Reads the token secret from `auth_secret_file`; the error names the file.
    pub fn load_secret(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = &self.auth_secret_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read secret file {}", path.display()))?;
        crate::auth::parse_secret(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("secret file {}: {e}", path.display()))
    }
}

/// The default map path (relative to the working directory).
pub const DEFAULT_MAP_PATH: &str = "assets/maps/arena.toml";
/// The default arena, built in so the server runs from any directory.
pub const BUILTIN_MAP: &str = include_str!("../../assets/maps/arena.toml");

impl ServerConfig {
    /// Reads a config file; the error names the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("invalid config file {}: {}", path.display(), e.message())
        })?;
        Ok(cfg)
    }

    /// Checks ranges and relations between settings.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !(10..=128).contains(&self.tick_rate) {
            bail!(
                "tick_rate must be within 10..=128 Hz (got {})",
                self.tick_rate
            );
        }
        let most = quicktick_shared::wire::MAX_PLAYERS;
        if self.max_players == 0 || self.max_players > most {
            bail!(
                "max_players must be within 1..={most} (got {})",
                self.max_players
            );
        }
        if self.datagram_send_buffer < 4096 {
            bail!(
                "datagram_send_buffer must be at least 4096 bytes (got {})",
                self.datagram_send_buffer
            );
        }
        if self.npc_count > 60_000 {
            bail!("npc_count must be at most 60000 (got {})", self.npc_count);
        }
        if !(3..=16).contains(&self.input_redundancy) {
            bail!(
                "input_redundancy must be within 3..=16 (got {})",
                self.input_redundancy
            );
        }
        if !(2..=255).contains(&self.snapshot_history) {
            bail!(
                "snapshot_history must be within 2..=255 ticks (got {})",
                self.snapshot_history
            );
        }
        if self.keep_alive_ms == 0 || self.keep_alive_ms * 2 >= self.idle_timeout_ms {
            bail!("keep_alive_ms must be non-zero and below half of idle_timeout_ms");
        }
        let radius_ok = self.interest_radius.is_finite() && self.interest_radius >= 1.0;
        let hysteresis_ok = self.interest_hysteresis.is_finite() && self.interest_hysteresis >= 0.0;
        if !radius_ok || !hysteresis_ok {
            bail!("interest_radius must be >= 1 and interest_hysteresis >= 0 (world units)");
        }
        if self.lag_comp_ms > 1000 {
            bail!(
                "lag_comp_ms must be at most 1000 (got {})",
                self.lag_comp_ms
            );
        }
        if self.snapshot_budget_bytes_per_s < 4096 {
            bail!("snapshot_budget_bytes_per_s must be at least 4096");
        }
        if self.max_pending_handshakes == 0 || self.max_pending_handshakes > 65_536 {
            bail!(
                "max_pending_handshakes must be within 1..=65536 (got {})",
                self.max_pending_handshakes
            );
        }
        if self.resume_grace_ms > 600_000 {
            bail!(
                "resume_grace_ms must be at most 600000 (got {})",
                self.resume_grace_ms
            );
        }
        if !(1..=4096).contains(&self.chat_history) {
            bail!(
                "chat_history must be within 1..=4096 (got {})",
                self.chat_history
            );
        }
        if self.drain_secs > 3600 {
            bail!("drain_secs must be at most 3600 (got {})", self.drain_secs);
        }
        if self.handshake_timeout_ms == 0 || self.outbound_queue == 0 {
            bail!("handshake_timeout_ms and outbound_queue must be non-zero");
        }
        Ok(())
    }

    /// Loads the configured map. The default path falls back to the built-in arena when absent;
    /// any other path must exist. Errors name the file.
    pub fn load_map(&self) -> anyhow::Result<quicktick_shared::map::Map> {
        let text = match std::fs::read_to_string(&self.map) {
            Ok(t) => t,
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && self.map == Path::new(DEFAULT_MAP_PATH) =>
            {
                tracing::info!(
                    "{} not found: using the built-in default arena",
                    self.map.display()
                );
                BUILTIN_MAP.to_owned()
            }
            Err(e) => bail!("cannot read map file {}: {e}", self.map.display()),
        };
        quicktick_shared::map::Map::from_toml(&text)
            .map_err(|e| anyhow::anyhow!("map file {}: {e}", self.map.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_equals_defaults() {
        let text = include_str!("../../assets/server.toml");
        let cfg: ServerConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg, ServerConfig::default());
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn builtin_map_parses() {
        assert!(quicktick_shared::map::Map::from_toml(BUILTIN_MAP).is_ok());
    }

    #[test]
    fn bad_values_are_refused() {
        for c in [
            ServerConfig {
                tick_rate: 9,
                ..ServerConfig::default()
            },
            ServerConfig {
                tick_rate: 129,
                ..ServerConfig::default()
            },
            ServerConfig {
                input_redundancy: 2,
                ..ServerConfig::default()
            },
            ServerConfig {
                snapshot_history: 256,
                ..ServerConfig::default()
            },
            ServerConfig {
                keep_alive_ms: 6000,
                ..ServerConfig::default()
            },
            ServerConfig {
                max_players: 129,
                ..ServerConfig::default()
            },
            ServerConfig {
                datagram_send_buffer: 0,
                ..ServerConfig::default()
            },
            ServerConfig {
                drain_secs: 3601,
                ..ServerConfig::default()
            },
        ] {
            assert!(c.validate().is_err());
        }
    }

    #[test]
    fn unknown_keys_and_missing_files_name_the_file() {
        let dir = std::env::temp_dir().join(format!("qt-cfg-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join("bad.toml");
        let _ = std::fs::write(&p, "tick_rat = 60\n");
        let e = ServerConfig::from_file(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("bad.toml"), "{e}");
        let e = ServerConfig::from_file(&dir.join("nope.toml"))
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("nope.toml"), "{e}");
        let c = ServerConfig {
            map: dir.join("missing-map.toml"),
            ..ServerConfig::default()
        };
        let e = c
            .load_map()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("missing-map.toml"), "{e}");
    }
}
