//! `quicktick-server`: the dedicated server binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use quicktick_server::{config::ServerConfig, net::server_endpoint, tls};

/// quicktick dedicated game-state server (QUIC). Flags override the config file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Run a tool instead of the server.
    #[command(subcommand)]
    command: Option<Command>,
    /// Who may join: dev (any name), required (signed connect tokens), auto (dev on loopback,
    /// required elsewhere) [default: auto]
    #[arg(long, value_enum)]
    auth: Option<quicktick_server::config::AuthMode>,
    /// File with the hex token secret (>= 32 bytes), for --auth required and `token`
    #[arg(long, value_name = "FILE")]
    auth_secret_file: Option<PathBuf>,
    /// UDP address to listen on [default: 127.0.0.1:4433]
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Config file (TOML; see assets/server.toml for every key and its default)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Simulation rate in Hz, 10..=128 [default: 60]
    #[arg(long, value_name = "HZ")]
    tick_rate: Option<u32>,
    /// Map file [default: assets/maps/arena.toml, or the built-in arena if that file is absent]
    #[arg(long, value_name = "FILE")]
    map: Option<PathBuf>,
    /// Most players at once [default: 64]
    #[arg(long)]
    max_players: Option<usize>,
    /// Most connections from one IP address, 0 = no limit [default: 32]
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<u32>,
    /// Most half-open connections (before `hello`) from one IP address, 0 = no limit [default: 16]
    #[arg(long, value_name = "N")]
    max_pending_per_ip: Option<u32>,
    /// NPC entities in the world [default: 200]
    #[arg(long)]
    npcs: Option<usize>,
    /// Certificate chain (PEM). Without --cert/--key a development certificate is created in
    /// ./quicktick-dev-cert/ (cert.pem, key.pem) and reused.
    #[arg(long, value_name = "PEM", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) for --cert
    #[arg(long, value_name = "PEM", requires = "cert")]
    key: Option<PathBuf>,
    /// Stop gracefully after this many seconds [default: run until SIGINT/SIGTERM]
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// On SIGTERM/SIGINT/--duration: refuse new connections, tell players, and keep the match
    /// running up to this long while they leave, 0..=3600 [default: 10]
    #[arg(long, value_name = "SECS")]
    drain_secs: Option<u32>,
    /// Serve the admin HTTP listener (/metrics, /status, /events, dashboard at /) on this TCP
    /// address; `--metrics` alone means 127.0.0.1:9100 [default: off]
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9100")]
    metrics: Option<SocketAddr>,
    /// Log line format on stderr (filter with RUST_LOG, default "info")
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, target, fields, spans).
    Json,
}

/// Installs the global subscriber: `RUST_LOG` (default `info`), stderr, text or JSON lines.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Span closes are logged (with their busy time) only when a span's level is enabled, e.g.
    // RUST_LOG=quicktick_server=trace for the tick phases.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a signed connect token (uses auth_secret_file from --config or --auth-secret-file).
    Token {
        /// The player's name (1..=32 bytes).
        #[arg(long)]
        player: String,
        /// Validity, e.g. 90s, 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The player's account id: one account, one player — a second connection with the same id
        /// takes that player over [default: derived from the name, so distinct names are distinct
        /// accounts]
        #[arg(long)]
        id: Option<u64>,
    },
}

fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("--ttl must look like 90s, 30m, 1h or 7d (got {s:?})"))?;
    n.checked_mul(mult)
        .filter(|t| *t > 0 && *t <= 366 * 86_400)
        .ok_or_else(|| anyhow::anyhow!("--ttl must be within 1 s ..= 366 d"))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("quicktick-server: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    init_logging(args.log_format);
    let mut cfg = match &args.config {
        Some(p) => ServerConfig::from_file(p)?,
        None => ServerConfig::default(),
    };
    if let Some(b) = args.bind {
        cfg.bind = b;
    }
    if let Some(t) = args.tick_rate {
        cfg.tick_rate = t;
    }
    if let Some(m) = &args.map {
        cfg.map = m.clone();
    }
    if let Some(a) = args.auth {
        cfg.auth = a;
    }
    if let Some(f) = &args.auth_secret_file {
        cfg.auth_secret_file = Some(f.clone());
    }
    if let Some(Command::Token { player, ttl, id }) = &args.command {
        let secret = cfg
            .load_secret()?
            .context("`token` needs the secret: set auth_secret_file or --auth-secret-file")?;
        anyhow::ensure!(
            quicktick_shared::wire::valid_name(player),
            "--player must be 1..=32 bytes, no control characters"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| anyhow::anyhow!("no system randomness for the token nonce"))?;
        let body = quicktick_server::auth::TokenBody {
            player_id: id.unwrap_or_else(|| quicktick_server::auth::account_of_name(player)),
            name: player.clone(),
            expires_unix: now + parse_ttl(ttl)?,
            nonce,
        };
        println!("{}", quicktick_server::auth::issue(&secret, &body));
        return Ok(());
    }
    if let Some(m) = args.max_players {
        cfg.max_players = m;
    }
    if let Some(n) = args.npcs {
        cfg.npc_count = n;
    }
    if let Some(a) = args.metrics {
        cfg.metrics_addr = Some(a);
    }
    if let Some(n) = args.max_connections_per_ip {
        cfg.max_connections_per_ip = n;
    }
    if let Some(n) = args.max_pending_per_ip {
        cfg.max_pending_per_ip = n;
    }
    if let Some(d) = args.drain_secs {
        cfg.drain_secs = d;
    }
    cfg.validate()?;
    let map = cfg.load_map()?;
    let cert = match (&args.cert, &args.key) {
        (Some(c), Some(k)) => tls::load_pem(c, k)?,
        _ => tls::load_or_create_dev_cert(&cfg.dev_cert_dir)?,
    };
    let duration = match args.duration {
        Some(d) => Some(
            Duration::try_from_secs_f64(d)
                .ok()
                .filter(|d| !d.is_zero() && d.as_secs() <= 100 * 365 * 86_400)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--duration must be a positive number of seconds (at most 100 years)"
                    )
                })?,
        ),
        None => None,
    };
    // Fail before listening when tokens are required but there is no secret to check them with.
    if cfg.effective_auth() == quicktick_server::config::AuthMode::Required {
        cfg.load_secret()?.context(
            "auth is required (set, or the default off loopback) but no auth_secret_file / --auth-secret-file is set",
        )?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    rt.block_on(async move {
        let endpoint = server_endpoint(cfg.bind, cert, &cfg)?;
        tracing::info!(
            addr = %endpoint.local_addr()?,
            tick_rate = cfg.tick_rate,
            map = %map.id,
            npcs = cfg.npc_count,
            max_players = cfg.max_players,
            "quicktick-server listening"
        );
        let stop = async move {
            let duration = async {
                match duration {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = duration => tracing::info!("--duration reached: draining"),
                _ = signal() => tracing::info!("signal received: draining (a second signal cuts it short)"),
            }
        };
        let hurry = async {
            signal().await;
            tracing::info!("second signal: ending the drain now");
        };
        let s = quicktick_server::run_with_hurry(endpoint, cfg, map, stop, hurry).await?;
        tracing::info!(
            ticks = s.ticks,
            late_ticks = s.late_ticks,
            overruns = s.overruns,
            tick_us_mean = s.tick_us_total / s.ticks.max(1),
            tick_us_max = s.tick_us_max,
            connections = s.connections_accepted,
            datagrams_sent = s.datagrams_sent,
            datagrams_too_large = s.datagrams_too_large,
            keyframes = s.keyframes,
            deltas = s.deltas,
            chat_lines = s.chat_lines,
            "stopped"
        );
        Ok(())
    })
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
