//! The swarm runner behind the `quicktick-bot` binary: connects many bots over a few endpoints, drives
//! their behaviour and chat, prints one progress line per second, and at the end checks presence and
//! chat delivery, closes every bot and builds the [`Report`].

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use quicktick_shared::link::LinkConfig;
use quicktick_shared::wire::valid_name;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::behaviour::{Rng, Wander};
use crate::client::{Client, ClientOptions, TokenSource};
use crate::conditioner::{conditioned_endpoint_with_handle, ConditionerStats, Impairment};
use crate::endpoint::{client_endpoint, load_trust};
use crate::migrate::rebind_endpoint;
use crate::report::{
    aggregate, chat_lost, chat_missing, peak_per_second, presence_mismatches_among, BotOutcome,
    Report, RunFacts,
};
use quicktick_shared::reconnect::ConnectionState;

/// Delay between the starts of two consecutive bots' connection attempts.
pub const STAGGER: Duration = Duration::from_millis(2);
/// How often a bot updates its input.
pub const BEHAVIOUR_PERIOD: Duration = Duration::from_millis(100);
/// Chat interval jitter (±30 %).
pub const CHAT_JITTER: f64 = 0.3;
/// Wait after chatting stops for lines still in flight, before the end-of-run checks.
pub const CHAT_SETTLE: Duration = Duration::from_millis(1500);
/// Chat lines each bot keeps as text (receipts cover every line regardless).
pub const BOT_CHAT_LOG: usize = 16;
/// How long the swarm waits for the endpoints to deliver the closes.
const IDLE_WAIT: Duration = Duration::from_secs(2);

/// Flags of `quicktick-bot`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "quicktick-bot",
    version,
    about = "Runs a swarm of quicktick bots against a server and reports what they saw"
)]
pub struct SwarmConfig {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub server: SocketAddr,
    /// TLS server name to verify the certificate against.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Number of bots.
    #[arg(long, default_value_t = 8)]
    pub bots: usize,
    /// Run time in seconds (default: until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Bot names are `<prefix>-<pid>-<n>`.
    #[arg(long, default_value = "bot")]
    pub name_prefix: String,
    /// PEM certificate of the server to trust.
    #[arg(long, default_value = "quicktick-dev-cert/cert.pem")]
    pub cert: PathBuf,
    /// Write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Each bot sends a chat line about this often, ±30 % (0: never).
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    pub chat_every_secs: f64,
    /// Bots sharing one endpoint (one UDP socket).
    #[arg(long, default_value_t = 32)]
    pub bots_per_endpoint: usize,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Datagrams lost each way, percent (0-100). With every impairment flag at its default the
    /// sockets are plain; otherwise each endpoint's socket is conditioned in user space.
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "PCT",
        help_heading = "Link impairment"
    )]
    pub loss: f32,
    /// Added one-way latency each way.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "MS",
        help_heading = "Link impairment"
    )]
    pub latency_ms: u64,
    /// Extra one-way delay drawn uniformly from 0..=MS per datagram, each way (reorders).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "MS",
        help_heading = "Link impairment"
    )]
    pub jitter_ms: u64,
    /// Datagrams delivered twice each way, percent (0-100).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "PCT",
        help_heading = "Link impairment"
    )]
    pub dup: f32,
    /// Client-to-server loss, percent [default: --loss].
    #[arg(long, value_name = "PCT", help_heading = "Link impairment")]
    pub up_loss: Option<f32>,
    /// Server-to-client loss, percent [default: --loss].
    #[arg(long, value_name = "PCT", help_heading = "Link impairment")]
    pub down_loss: Option<f32>,
    /// Client-to-server one-way latency [default: --latency-ms].
    #[arg(long, value_name = "MS", help_heading = "Link impairment")]
    pub up_latency_ms: Option<u64>,
    /// Server-to-client one-way latency [default: --latency-ms].
    #[arg(long, value_name = "MS", help_heading = "Link impairment")]
    pub down_latency_ms: Option<u64>,
    /// Seed of the impairments; endpoint n draws from a seed derived from it and n.
    #[arg(long, default_value_t = 1, help_heading = "Link impairment")]
    pub seed: u64,
    /// Cut every endpoint's link completely (both ways) this many seconds into the run...
    #[arg(long, value_name = "SECS", help_heading = "Link impairment")]
    pub blackout_at: Option<f64>,
    /// ...for this long (bots notice, reconnect with backoff and resume).
    #[arg(
        long,
        default_value_t = 5.0,
        value_name = "SECS",
        help_heading = "Link impairment"
    )]
    pub blackout_secs: f64,
    /// Move every endpoint to a new UDP port this often (QUIC connection migration, as after a NAT
    /// rebinding); the sessions continue without reconnecting.
    #[arg(long, value_name = "SECS", help_heading = "Link impairment")]
    pub migrate_every: Option<f64>,
    /// After a server drain (shutdown notice, then close), keep reconnecting to the same address
    /// in case it is restarting, instead of ending the run.
    #[arg(long)]
    pub rejoin_after_drain: bool,
    /// Connect tokens, one per line (`quicktick-server token`), for servers that require them: each
    /// join (and each fresh re-join) takes the next unused line.
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
}

impl SwarmConfig {
    /// The link impairment the flags ask for, or `None` when they ask for none. Percentages are
    /// converted to probabilities; the per-direction flags override the both-ways ones.
    #[must_use]
    pub fn impairment(&self) -> Option<Impairment> {
        let link = |loss: f32, latency_ms: u64| LinkConfig {
            loss: loss / 100.0,
            duplicate: self.dup / 100.0,
            latency: Duration::from_millis(latency_ms),
            jitter: Duration::from_millis(self.jitter_ms),
        };
        let imp = Impairment {
            up: link(
                self.up_loss.unwrap_or(self.loss),
                self.up_latency_ms.unwrap_or(self.latency_ms),
            ),
            down: link(
                self.down_loss.unwrap_or(self.loss),
                self.down_latency_ms.unwrap_or(self.latency_ms),
            ),
            seed: self.seed,
        };
        (!imp.is_none() || self.blackout_at.is_some()).then_some(imp)
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Connecting, moving, chatting.
    Run,
    /// Ending: no new connections, no chat; bots keep moving.
    Quiet,
    /// Bots stop.
    Stop,
}

/// One bot's place in the swarm.
#[derive(Debug)]
enum Slot {
    /// Not connected yet.
    Connecting,
    /// Joined at `at`.
    Connected {
        /// The client.
        client: Client,
        /// When the welcome arrived.
        at: Instant,
    },
    /// The attempt failed.
    Failed(String),
}

type Registry = Arc<Mutex<Vec<Slot>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn set_slot(reg: &Registry, i: usize, slot: Slot) {
    if let Some(s) = lock(reg).get_mut(i) {
        *s = slot;
    }
}

/// The connected clients and when they joined.
fn connected(reg: &Registry) -> Vec<(Client, Instant)> {
    lock(reg)
        .iter()
        .filter_map(|s| match s {
            Slot::Connected { client, at } => Some((client.clone(), *at)),
            _ => None,
        })
        .collect()
}

/// The error of every failed connection attempt.
fn failures(reg: &Registry) -> Vec<String> {
    lock(reg)
        .iter()
        .filter_map(|s| match s {
            Slot::Failed(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

/// Validates the flags that clap cannot.
fn check(cfg: &SwarmConfig) -> anyhow::Result<()> {
    if cfg.bots == 0 {
        bail!("--bots must be at least 1");
    }
    if cfg.bots_per_endpoint == 0 {
        bail!("--bots-per-endpoint must be at least 1");
    }
    if let Some(d) = cfg.duration {
        if !(d.is_finite() && d > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
    }
    if !(cfg.chat_every_secs.is_finite() && cfg.chat_every_secs >= 0.0) {
        bail!("--chat-every-secs must be 0 or more");
    }
    let percents = [
        ("--loss", Some(cfg.loss)),
        ("--dup", Some(cfg.dup)),
        ("--up-loss", cfg.up_loss),
        ("--down-loss", cfg.down_loss),
    ];
    for (flag, pct) in percents {
        if let Some(p) = pct {
            if !(0.0..=100.0).contains(&p) {
                bail!("{flag} must be a percentage within 0..=100");
            }
        }
    }
    if let Some(imp) = cfg.impairment() {
        imp.validate()
            .context("--latency-ms / --jitter-ms too large")?;
    }
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if cfg
        .blackout_at
        .is_some_and(|v| !(v.is_finite() && v >= 0.0))
        || !positive(cfg.blackout_secs)
    {
        bail!("--blackout-at must be 0 or more and --blackout-secs positive");
    }
    if cfg.migrate_every.is_some_and(|v| !positive(v)) {
        bail!("--migrate-every must be a positive number of seconds");
    }
    Ok(())
}

/// The name of bot `n` in a run whose names start with `run_prefix`.
#[must_use]
pub fn bot_name(run_prefix: &str, n: usize) -> String {
    format!("{run_prefix}{n}")
}

/// Runs the swarm until `cfg.duration` elapses, `shutdown` completes, or no bot is left connected;
/// then does the end-of-run checks, closes every bot, writes `cfg.report` if set and returns the
/// report. Fails when the certificate cannot be read, the flags are invalid, or no bot could connect.
pub async fn run(cfg: SwarmConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<Report> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    check(&cfg)?;
    let trust = load_trust(&cfg.cert)?;
    let run_prefix = format!("{}-{}-", cfg.name_prefix, std::process::id());
    let last_name = bot_name(&run_prefix, cfg.bots - 1);
    if !valid_name(&last_name) {
        bail!("bot name {last_name:?} is not a valid player name (too long or control characters)");
    }
    let bind: SocketAddr = if cfg.server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let impairment = cfg.impairment();
    let mut links = Vec::new();
    let endpoints = (0..cfg.bots.div_ceil(cfg.bots_per_endpoint))
        .map(|n| match impairment {
            None => client_endpoint(bind, &trust),
            Some(imp) => {
                let (endpoint, link) =
                    conditioned_endpoint_with_handle(bind, &trust, imp.for_endpoint(n))?;
                links.push(link);
                Ok(endpoint)
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if let Some(imp) = impairment {
        tracing::info!(up = ?imp.up, down = ?imp.down, seed = imp.seed, "link impaired");
    }

    let tokens: Option<TokenSource> = match &cfg.tokens_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read tokens file {}", path.display()))?;
            let queue: std::collections::VecDeque<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_owned)
                .collect();
            if queue.len() < cfg.bots {
                bail!(
                    "tokens file {} has {} tokens for {} bots",
                    path.display(),
                    queue.len(),
                    cfg.bots
                );
            }
            let queue = Arc::new(Mutex::new(queue));
            Some(Arc::new(move || lock(&queue).pop_front()))
        }
    };

    let started = Instant::now();
    let mut chaos = JoinSet::new();
    let migrations = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if let Some(at) = cfg.blackout_at {
        let links = links.clone();
        let secs = cfg.blackout_secs;
        chaos.spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(at)).await;
            tracing::info!(secs, "blackout starts");
            for l in &links {
                l.blackout(true);
            }
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            for l in &links {
                l.blackout(false);
            }
            tracing::info!("blackout ends");
        });
    }
    if let Some(every) = cfg.migrate_every {
        let endpoints = endpoints.clone();
        let links = links.clone();
        let moved = migrations.clone();
        chaos.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs_f64(every)).await;
                for (n, e) in endpoints.iter().enumerate() {
                    match rebind_endpoint(e, links.get(n)) {
                        Ok(addr) => {
                            moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tracing::debug!(%addr, "endpoint moved");
                        }
                        Err(err) => tracing::warn!("cannot move endpoint: {err:#}"),
                    }
                }
            }
        });
    }
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    let registry: Registry = Arc::new(Mutex::new(
        (0..cfg.bots).map(|_| Slot::Connecting).collect(),
    ));
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let cfg = Arc::new(cfg);
    let mut bots = JoinSet::new();
    for i in 0..cfg.bots {
        let Some(endpoint) = endpoints.get(i / cfg.bots_per_endpoint) else {
            break;
        };
        bots.spawn(bot(
            i,
            bot_name(&run_prefix, i),
            endpoint.clone(),
            cfg.clone(),
            tokens.clone(),
            registry.clone(),
            phase_rx.clone(),
            seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
    }
    tracing::info!(
        bots = cfg.bots,
        endpoints = endpoints.len(),
        server = %cfg.server,
        "swarm starting"
    );

    // Main phase: progress once per second until the end.
    let deadline = cfg.duration.map(|d| started + Duration::from_secs_f64(d));
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    tokio::pin!(shutdown);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut progress = Progress::new(started);
    loop {
        tokio::select! {
            () = &mut shutdown => { tracing::info!("interrupted"); break }
            () = &mut until_deadline => break,
            _ = ticker.tick() => {
                let (pending, clients) = {
                    let reg = lock(&registry);
                    let pending = reg.iter().filter(|s| matches!(s, Slot::Connecting)).count();
                    drop(reg);
                    (pending, connected(&registry))
                };
                let line = progress.line(&clients, cfg.bots);
                println!("{line}");
                let alive = |c: &Client| !matches!(c.state(), ConnectionState::Lost { .. });
                if pending == 0 && !clients.iter().any(|(c, _)| alive(c)) {
                    tracing::warn!("no bot connected any more; ending the run");
                    break;
                }
            }
        }
    }

    // End of run: stop chatting and connecting, let chat in flight arrive, then check.
    let _ = phase_tx.send(Phase::Quiet);
    let joined = connected(&registry);
    if joined.is_empty() {
        let _ = phase_tx.send(Phase::Stop);
        while bots.join_next().await.is_some() {}
        for e in &endpoints {
            e.close(0u32.into(), b"bye");
        }
        let errors = failures(&registry);
        let first = errors.first().map_or("no attempt finished", String::as_str);
        bail!("no bot could connect to {}: {first}", cfg.server);
    }
    tokio::time::sleep(CHAT_SETTLE).await;
    let checked_at = Instant::now();
    let (outcomes, facts) = check_end(&joined, checked_at, &run_prefix);
    let _ = phase_tx.send(Phase::Stop);

    let mut closing = JoinSet::new();
    for (client, _) in &joined {
        let c = client.clone();
        closing.spawn(async move { c.close().await });
    }
    while closing.join_next().await.is_some() {}
    drop(joined);
    while bots.join_next().await.is_some() {}
    let connect_errors = failures(&registry);
    lock(&registry).clear();
    for e in &endpoints {
        let _ = tokio::time::timeout(IDLE_WAIT, e.wait_idle()).await;
    }

    chaos.abort_all();
    let token_refusals = connect_errors
        .iter()
        .filter(|e| e.starts_with("refused by the server (Token"))
        .count() as u64;
    let facts = RunFacts {
        token_refusals,
        bots_requested: cfg.bots as u64,
        duration: checked_at.duration_since(started),
        connect_errors,
        migrations: migrations.load(std::sync::atomic::Ordering::Relaxed),
        ..facts
    };
    let report = aggregate(&facts, &outcomes);
    if let Some(path) = &cfg.report {
        let json = serde_json::to_string_pretty(&report).context("cannot serialize the report")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write report file {}", path.display()))?;
    }
    println!(
        "done: {:.1}s bots {}/{} (at end {}) snapshots {} (slowest bot {:.1}/s) rtt p50 {:.2} ms \
         p99 {:.2} ms chat sent {} recv {} missing {} dup {} presence mismatches {}",
        report.duration_s,
        report.bots_connected,
        report.bots_requested,
        report.bots_connected_at_end,
        report.snapshots_received,
        report.snapshots_per_bot_per_s,
        report.rtt_ms.p50,
        report.rtt_ms.p99,
        report.chat_sent,
        report.chat_received,
        report.chat_missing,
        report.chat_duplicates,
        report.presence_mismatches,
    );
    if !links.is_empty() {
        let mut total = ConditionerStats::default();
        for l in &links {
            total += l.stats();
        }
        let (up, down) = (total.up, total.down);
        println!(
            "link: up offered {} dropped {} duplicated {} delayed {} overflow {} blackout {}; \
             down offered {} dropped {} duplicated {} delayed {} overflow {} blackout {}",
            up.offered,
            up.dropped,
            up.duplicated,
            up.delayed,
            up.overflow,
            up.blackout,
            down.offered,
            down.dropped,
            down.duplicated,
            down.delayed,
            down.overflow,
            down.blackout,
        );
    }
    Ok(report)
}

/// The connect error recorded for a bot whose attempt was cut short by the end of the run.
const ABANDONED: &str = "run ended before the welcome";

/// The end-of-run checks over every bot that joined: per-bot outcomes, and the run facts known from
/// them (tick rate, close reasons, presence mismatches, missing chat).
fn check_end(
    joined: &[(Client, Instant)],
    checked_at: Instant,
    run_prefix: &str,
) -> (Vec<BotOutcome>, RunFacts) {
    let mut outcomes = Vec::with_capacity(joined.len());
    let mut receipts = Vec::with_capacity(joined.len());
    let mut rosters = Vec::new();
    let mut names = BTreeSet::new();
    let mut close_reasons = Vec::new();
    let mut attempts = Vec::new();
    let mut firsts = Vec::new();
    // Every player id a bot of this run holds: other players on the server are not compared.
    let ours: BTreeSet<u32> = joined.iter().map(|(c, _)| c.player_id()).collect();
    let _ = run_prefix;
    for (client, at) in joined {
        let up = client.is_connected();
        let stats = client.stats();
        let unconfirmed = client.chat_pending() as u64 + stats.chat_dropped_by_server;
        outcomes.push(BotOutcome {
            stats,
            connected_for: checked_at.saturating_duration_since(*at),
            connected_at_end: up,
        });
        let times = client.attempt_times();
        firsts.extend(times.first().copied());
        attempts.extend(times);
        receipts.push((up, client.chat_receipts(), unconfirmed));
        if up {
            names.insert(client.player_id());
            rosters.push(client.roster().into_iter().map(|p| p.id).collect());
        } else if let Some(r) = client.close_reason() {
            close_reasons.push(r);
        }
    }
    let senders: Vec<_> = receipts.iter().map(|(_, r, _)| r).collect();
    let lost_senders: Vec<_> = receipts.iter().map(|(_, r, u)| (r, *u)).collect();
    let receivers: Vec<_> = receipts
        .iter()
        .filter(|(up, _, _)| *up)
        .map(|(_, r, _)| r)
        .collect();
    let facts = RunFacts {
        tick_rate: joined.first().map_or(0, |(c, _)| c.welcome().tick_rate),
        close_reasons,
        presence_mismatches: presence_mismatches_among(&rosters, &names, &ours),
        chat_missing: chat_missing(&senders, &receivers),
        chat_lost: chat_lost(&lost_senders, &receivers),
        peak_attempts_per_s: peak_per_second(&mut attempts),
        peak_first_attempts_per_s: peak_per_second(&mut firsts),
        ..RunFacts::default()
    };
    (outcomes, facts)
}

/// Waits until the phase is at least `at_least`.
async fn reached(phase: &mut watch::Receiver<Phase>, at_least: Phase) {
    let rank = |p: Phase| match p {
        Phase::Run => 0,
        Phase::Quiet => 1,
        Phase::Stop => 2,
    };
    if phase
        .wait_for(|p| rank(*p) >= rank(at_least))
        .await
        .is_err()
    {
        // The runner is gone: treat as stopped.
    }
}

/// One bot: staggered connect, then behaviour and chat until the run stops or the connection ends.
#[allow(
    clippy::too_many_arguments,
    reason = "one task's inputs, each used once; a struct would only rename them"
)]
async fn bot(
    i: usize,
    name: String,
    endpoint: quinn::Endpoint,
    cfg: Arc<SwarmConfig>,
    tokens: Option<TokenSource>,
    registry: Registry,
    mut phase: watch::Receiver<Phase>,
    seed: u64,
) {
    let options = ClientOptions {
        chat_log_limit: BOT_CHAT_LOG,
        token_source: tokens,
        jitter_seed: Some(seed),
        reconnect_after_drain: cfg.rejoin_after_drain,
        ..ClientOptions::default()
    };
    let attempt = async {
        tokio::time::sleep(STAGGER.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX))).await;
        Client::connect_with(&endpoint, cfg.server, &cfg.server_name, &name, options).await
    };
    let client = tokio::select! {
        r = attempt => match r {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%name, "cannot connect: {e}");
                set_slot(&registry, i, Slot::Failed(e.to_string()));
                return;
            }
        },
        () = reached(&mut phase, Phase::Quiet) => {
            set_slot(&registry, i, Slot::Failed(ABANDONED.into()));
            return;
        }
    };
    set_slot(
        &registry,
        i,
        Slot::Connected {
            client: client.clone(),
            at: Instant::now(),
        },
    );

    let mut rng = Rng::new(seed);
    let mut wander = Wander::new(rng.next_u64());
    let chat_every =
        (cfg.chat_every_secs > 0.0).then(|| Duration::from_secs_f64(cfg.chat_every_secs));
    let start = Instant::now();
    let mut next_chat = chat_every.map(|e| start + rng.jittered(e, CHAT_JITTER));
    let mut lines = 0u32;
    let mut avatar = client.welcome().avatar;
    let mut player = client.player_id();
    let mut interval = tokio::time::interval(BEHAVIOUR_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = reached(&mut phase, Phase::Stop) => return,
        }
        if let ConnectionState::Lost { reason } = client.state() {
            tracing::info!(%name, %reason, "connection lost for good");
            return;
        }
        if client.player_id() != player {
            // Re-joined afresh as a new player (the server lost the session): new avatar.
            player = client.player_id();
            avatar = client.welcome().avatar;
        }
        let velocity = client.latest_snapshot().and_then(|s| {
            s.get(avatar.index)
                .filter(|e| e.id == avatar)
                .map(|e| (e.qvx, e.qvy))
        });
        let input = wander.step(start.elapsed(), velocity);
        client.set_input(input.move_x, input.move_y, input.aim, input.fire);

        if let (Some(every), Some(at)) = (chat_every, next_chat) {
            let now = Instant::now();
            if now >= at && *phase.borrow() == Phase::Run {
                lines += 1;
                if let Err(e) = client.chat(&format!("{name} says hello #{lines}")) {
                    tracing::debug!(%name, "chat not sent: {e}");
                }
                next_chat = Some(now + rng.jittered(every, CHAT_JITTER));
            }
        }
    }
}

/// Totals from the previous progress line, to print rates.
#[derive(Debug)]
struct Progress {
    /// The run's start.
    started: Instant,
    /// When the previous line was printed.
    last_at: Instant,
    /// Complete snapshots then (all bots).
    last_snapshots: u64,
    /// Bytes received then (all bots).
    last_bytes: u64,
}

impl Progress {
    fn new(started: Instant) -> Self {
        Self {
            started,
            last_at: started,
            last_snapshots: 0,
            last_bytes: 0,
        }
    }

    /// One progress line over every bot that joined.
    fn line(&mut self, clients: &[(Client, Instant)], requested: usize) -> String {
        let now = Instant::now();
        let (mut snapshots, mut bytes, mut sent, mut received) = (0, 0, 0, 0);
        let mut rtts = Vec::new();
        let mut up = 0;
        for (c, _) in clients {
            let s = c.stats();
            snapshots += s.session.snapshots;
            bytes += s.datagram_bytes_received + s.stream_bytes_received;
            sent += s.chat_sent;
            received += s.chat_received_others;
            if c.is_connected() {
                up += 1;
                rtts.push(c.connection().rtt());
            }
        }
        rtts.sort_unstable();
        let p50 = rtts.get(rtts.len() / 2).copied().unwrap_or_default();
        let dt = now.duration_since(self.last_at).as_secs_f64().max(1e-3);
        let line = format!(
            "{:>7.1}s bots {up}/{requested} snapshots/s {:.0} in {:.1} kB/s rtt p50 {:.2} ms \
             chat sent {sent} recv {received}",
            now.duration_since(self.started).as_secs_f64(),
            snapshots.saturating_sub(self.last_snapshots) as f64 / dt,
            bytes.saturating_sub(self.last_bytes) as f64 / dt / 1000.0,
            p50.as_secs_f64() * 1000.0,
        );
        self.last_at = now;
        self.last_snapshots = snapshots;
        self.last_bytes = bytes;
        line
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_match_the_documentation() {
        let cfg = SwarmConfig::try_parse_from(["quicktick-bot"]).unwrap();
        assert_eq!(cfg.server, "127.0.0.1:4433".parse().unwrap());
        assert_eq!(cfg.bots, 8);
        assert_eq!(cfg.duration, None);
        assert_eq!(cfg.name_prefix, "bot");
        assert_eq!(cfg.cert, PathBuf::from("quicktick-dev-cert/cert.pem"));
        assert_eq!(cfg.chat_every_secs, 3.0);
        assert_eq!(cfg.bots_per_endpoint, 32);
        assert_eq!(cfg.impairment(), None, "no impairment by default");
        assert_eq!(cfg.seed, 1);
        assert!(check(&cfg).is_ok());
        let bad = SwarmConfig::try_parse_from(["quicktick-bot", "--bots", "0"]).unwrap();
        assert!(check(&bad).is_err());
        let bad = SwarmConfig::try_parse_from(["quicktick-bot", "--duration=-1"]).unwrap();
        assert!(check(&bad).is_err());
    }

    #[test]
    fn impairment_flags() {
        let cfg = SwarmConfig::try_parse_from([
            "quicktick-bot",
            "--loss",
            "10",
            "--latency-ms",
            "40",
            "--jitter-ms",
            "5",
            "--dup",
            "2",
            "--down-loss",
            "25",
            "--up-latency-ms",
            "10",
            "--seed",
            "9",
        ])
        .unwrap();
        assert!(check(&cfg).is_ok());
        let imp = cfg.impairment().unwrap();
        assert_eq!(imp.seed, 9);
        assert_eq!(imp.up.loss, 0.1);
        assert_eq!(imp.down.loss, 0.25);
        assert_eq!(imp.up.latency, Duration::from_millis(10));
        assert_eq!(imp.down.latency, Duration::from_millis(40));
        assert_eq!(imp.up.jitter, Duration::from_millis(5));
        assert_eq!(imp.down.duplicate, 0.02);
        let one_way = SwarmConfig::try_parse_from(["quicktick-bot", "--up-loss", "5"]).unwrap();
        let imp = one_way.impairment().unwrap();
        assert_eq!((imp.up.loss, imp.down), (0.05, LinkConfig::default()));
        for bad in [
            ["--loss", "101"],
            ["--dup", "-1"],
            ["--down-loss", "NaN"],
            ["--latency-ms", "61000"],
        ] {
            let arg = format!("{}={}", bad[0], bad[1]);
            let cfg = SwarmConfig::try_parse_from(["quicktick-bot", &arg]).unwrap();
            assert!(check(&cfg).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bot_names_are_valid_and_unique() {
        let prefix = format!("bot-{}-", u32::MAX);
        let names: BTreeSet<_> = (0..2000).map(|n| bot_name(&prefix, n)).collect();
        assert_eq!(names.len(), 2000);
        assert!(names
            .iter()
            .all(|n| valid_name(n) && n.starts_with(&prefix)));
    }

    #[tokio::test]
    async fn missing_cert_is_a_one_line_error_naming_the_file() {
        let cfg = SwarmConfig::try_parse_from([
            "quicktick-bot",
            "--cert",
            "/nonexistent/qt/cert.pem",
            "--duration",
            "1",
        ])
        .unwrap();
        let err = run(cfg, std::future::pending()).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("/nonexistent/qt/cert.pem"), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
