//! The tick thread: owns the [`ServerCore`], runs it on a drift-free schedule (tick *n* starts at
//! `start + n·period`; lateness counted; catch-up bounded), drains the connection tasks' queues and
//! executes the core's outputs without ever awaiting the network.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{
    close, encode_frame, ClientMsg, InputDatagram, LeaveReason, PlayerInfo,
};
use quinn::SendDatagramError;
use tokio::sync::mpsc;

use crate::core::{ConnId, CoreEvent, CoreOutput, LinkState, ServerCore};
use crate::events::EventRing;
use crate::stats::ServerStats;
use crate::telemetry::{LinkCounters, Metrics, Phase, PhaseTimer, TickProbe};

/// What the writer task of a connection should do next.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// Write this frame.
    Frame(Vec<u8>),
    /// Finish the stream, wait briefly for the peer to read it, then close with code and reason.
    CloseAfterFlush(u32, String),
}

/// The tick thread's handle on a connection.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    /// For datagrams, size limits and closing.
    pub conn: quinn::Connection,
    /// Bounded queue to the connection's stream writer.
    pub out: mpsc::Sender<Outbound>,
    /// What the tick thread sent it (the connection task samples these once a second).
    pub counters: Arc<LinkCounters>,
}

/// Control events from connection tasks (never dropped; bounded by the number of connections).
#[derive(Debug)]
pub(crate) enum Control {
    /// A connection sent its first message (`hello` or `resume`).
    Join {
        /// Connection id.
        conn: ConnId,
        /// Its link.
        link: Link,
        /// The message.
        first: ClientMsg,
    },
    /// A later stream message.
    Msg {
        /// Connection id.
        conn: ConnId,
        /// The message.
        msg: ClientMsg,
    },
    /// The connection is gone.
    Gone {
        /// Connection id.
        conn: ConnId,
        /// Why.
        reason: LeaveReason,
    },
    /// Start draining: refuse joins, tell every player why and for how long the match goes on.
    Drain {
        /// Why, for the players.
        reason: String,
        /// Most milliseconds until the server closes the connections.
        drain_ms: u32,
    },
}

/// State the tick thread publishes for observers (tests, status).
#[derive(Debug, Default)]
pub struct Published {
    /// The most recent snapshots, oldest first (at most [`PUBLISHED_SNAPSHOTS`]).
    pub recent: Mutex<VecDeque<Arc<Snapshot>>>,
    /// The lobby roster after the last tick.
    pub roster: Mutex<Vec<PlayerInfo>>,
    /// Each player's status, refreshed a few times a second.
    pub players: Mutex<Vec<PlayerStatus>>,
    /// Tick statistics of the last full second.
    pub ticks: Mutex<TickSummary>,
}

/// A player as the tick thread sees it (for `/status`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PlayerStatus {
    /// Connection id.
    pub conn: ConnId,
    /// Player id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Slot index of the avatar entity.
    pub avatar: u16,
    /// Ticks between the current tick and the client's acked baseline (`None`: no ack yet).
    pub baseline_age_ticks: Option<i32>,
}

/// Tick statistics over one second (the `tick` event and `/status`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TickSummary {
    /// The current tick number.
    pub tick: u32,
    /// Ticks run in the last second, per second.
    pub rate_hz: f64,
    /// Duration of the newest tick, µs.
    pub last_us: u64,
    /// Mean tick duration over the last second, µs.
    pub avg_us: u64,
    /// Longest tick in the last second, µs.
    pub max_us: u64,
    /// Ticks since the start.
    pub ticks: u64,
    /// Overruns since the start.
    pub overruns: u64,
    /// Late ticks since the start.
    pub late: u64,
    /// Skipped ticks since the start.
    pub skipped: u64,
    /// Players now.
    pub players: u64,
    /// Entities now.
    pub entities: u64,
    /// Snapshot and stream bytes queued per second (last second).
    pub bytes_out_per_s: f64,
    /// Input datagram bytes received per second (last second).
    pub bytes_in_per_s: f64,
}

/// Snapshots kept in [`Published::recent`].
pub const PUBLISHED_SNAPSHOTS: usize = 256;

impl Published {
    /// The published snapshot of `tick`, if still kept.
    #[must_use]
    pub fn snapshot_at(&self, tick: Tick) -> Option<Arc<Snapshot>> {
        self.recent
            .lock()
            .ok()?
            .iter()
            .rev()
            .find(|s| s.tick == tick)
            .cloned()
    }
}

pub(crate) struct TickThread {
    pub core: ServerCore,
    pub links: HashMap<ConnId, Link>,
    pub control_rx: mpsc::Receiver<Control>,
    pub input_rx: mpsc::Receiver<(ConnId, InputDatagram, usize)>,
    pub stats: Arc<ServerStats>,
    pub published: Arc<Published>,
    pub stop: Arc<AtomicBool>,
    /// Set when the tick thread died of a panic (the server must stop).
    pub failed: Arc<AtomicBool>,
    /// Test/debug hook ([`crate::TickStall`]): milliseconds the next tick sleeps before running.
    pub stall_ms: Arc<AtomicU64>,
    pub tick_rate: u32,
    pub max_catchup: u32,
    pub out: Vec<CoreOutput>,
    /// Metric handles.
    pub metrics: Metrics,
    /// Times the phases of the current tick.
    pub timer: PhaseTimer,
    /// Presence, chat and tick events for observers.
    pub events: Arc<EventRing>,
    /// Core counters already added to the metrics.
    pub marks: Marks,
    /// The current one-second window of tick statistics.
    pub window: Window,
}

/// Core counter values already reported to the metrics (the core counts; the shell adds deltas).
#[derive(Debug, Default)]
pub(crate) struct Marks {
    resumes: u64,
    resume_keyframes: u64,
    keyframes: u64,
    deltas: u64,
    chat: u64,
    refusals: u64,
    late: u64,
    missing: u64,
}

/// Accumulates one second of tick statistics.
#[derive(Debug)]
pub(crate) struct Window {
    began: Instant,
    ticks: u64,
    total_us: u64,
    max_us: u64,
    bytes_out: u64,
    bytes_in: u64,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            began: Instant::now(),
            ticks: 0,
            total_us: 0,
            max_us: 0,
            bytes_out: 0,
            bytes_in: 0,
        }
    }
}

/// Most control events handled per tick (the rest wait for the next tick).
const MAX_CONTROL_PER_TICK: usize = 4096;
/// Most input datagrams handled per tick.
const MAX_INPUTS_PER_TICK: usize = 65_536;

impl TickThread {
    pub fn run(mut self) {
        let period = Duration::from_secs_f64(1.0 / f64::from(self.tick_rate));
        let start = Instant::now();
        let mut n: u64 = 1;
        let mut last_log = Instant::now();
        loop {
            let deadline = start + period.mul_f64(n as f64);
            let now = Instant::now();
            if now < deadline {
                std::thread::sleep(deadline - now);
            }
            let began = Instant::now();
            let lateness = began.saturating_duration_since(deadline);
            self.metrics
                .tick_lateness_seconds
                .record(lateness.as_secs_f64());
            if lateness > period {
                ServerStats::add(&self.stats.late_ticks, 1);
                self.metrics.ticks_late.increment(1);
            }
            let due = (began.duration_since(start).as_secs_f64() / period.as_secs_f64()) as u64;
            if due > n + u64::from(self.max_catchup) {
                let skip = due - n - u64::from(self.max_catchup);
                ServerStats::add(&self.stats.skipped_ticks, skip);
                self.metrics.ticks_skipped.increment(skip);
                n += skip;
            }
            if self.stop.load(Ordering::Acquire) {
                self.shutdown();
                return;
            }
            let stall = self.stall_ms.swap(0, Ordering::AcqRel);
            if stall > 0 {
                tracing::warn!(
                    stall_ms = stall,
                    "tick thread stalled on purpose (debug hook)"
                );
                std::thread::sleep(Duration::from_millis(stall));
            }
            let tick = std::panic::AssertUnwindSafe(|| self.tick_once());
            if let Err(panic) = std::panic::catch_unwind(tick) {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(
                    "tick thread panicked ({what}): closing every connection and stopping"
                );
                for l in self.links.values() {
                    l.conn
                        .close(close::INTERNAL_ERROR.into(), b"internal server error");
                }
                self.failed.store(true, Ordering::Release);
                return;
            }
            n += 1;
            let took = began.elapsed();
            let us = took.as_micros() as u64;
            ServerStats::add(&self.stats.ticks, 1);
            ServerStats::add(&self.stats.tick_us_total, us);
            self.stats.max(&self.stats.tick_us_max, us);
            self.metrics.ticks.increment(1);
            self.metrics.tick_seconds.record(took.as_secs_f64());
            self.timer.record(&self.metrics);
            if took > period {
                ServerStats::add(&self.stats.overruns, 1);
                self.metrics.overruns.increment(1);
            }
            self.window.ticks += 1;
            self.window.total_us += us;
            self.window.max_us = self.window.max_us.max(us);
            if self.window.began.elapsed() >= Duration::from_secs(1) {
                self.summarize(us);
            }
            if tracing::enabled!(target: "quicktick_server::tick", tracing::Level::TRACE) {
                let t = &self.timer;
                let us = |p| t.spent(p).as_micros() as u64;
                tracing::trace!(
                    target: "quicktick_server::tick",
                    tick = self.core.world().tick().0,
                    total_us = took.as_micros() as u64,
                    inputs_us = us(Phase::Inputs),
                    sim_us = us(Phase::Sim),
                    interest_us = us(Phase::Interest),
                    encode_us = us(Phase::Encode),
                    send_us = us(Phase::Send),
                    publish_us = us(Phase::Publish),
                    "tick phases"
                );
            }
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                let s = self.stats.snapshot();
                tracing::info!(
                    tick = %self.core.world().tick(),
                    players = s.players,
                    entities = s.entities,
                    tick_us_mean = s.tick_us_total / s.ticks.max(1),
                    tick_us_max = s.tick_us_max,
                    late = s.late_ticks,
                    overruns = s.overruns,
                    kb_sent = s.datagram_bytes_sent / 1000,
                    "server"
                );
            }
        }
    }

    /// Closes the one-second window: publishes and emits a `tick` event.
    fn summarize(&mut self, last_us: u64) {
        let w = std::mem::take(&mut self.window);
        let secs = w.began.elapsed().as_secs_f64().max(1e-3);
        let s = self.stats.snapshot();
        let summary = TickSummary {
            tick: self.core.world().tick().0,
            rate_hz: w.ticks as f64 / secs,
            last_us,
            avg_us: w.total_us / w.ticks.max(1),
            max_us: w.max_us,
            ticks: s.ticks,
            overruns: s.overruns,
            late: s.late_ticks,
            skipped: s.skipped_ticks,
            players: s.players,
            entities: s.entities,
            bytes_out_per_s: (s.datagram_bytes_sent + s.stream_bytes_sent)
                .saturating_sub(w.bytes_out) as f64
                / secs,
            bytes_in_per_s: s.input_bytes.saturating_sub(w.bytes_in) as f64 / secs,
        };
        self.window.bytes_out = s.datagram_bytes_sent + s.stream_bytes_sent;
        self.window.bytes_in = s.input_bytes;
        if let Ok(mut t) = self.published.ticks.lock() {
            *t = summary;
        }
        self.events.push("tick", &summary);
    }

    fn handle_control(&mut self, c: Control) {
        let chat_before = self.core.counters.chat_lines;
        let (conn, what) = match &c {
            Control::Join { conn, .. } => (*conn, 0),
            Control::Msg { conn, .. } => (*conn, 1),
            Control::Gone { conn, .. } => (*conn, 2),
            Control::Drain { .. } => (0, 3),
        };
        let leaving = (what == 2).then(|| self.player_info(conn)).flatten();
        let chat_text = match &c {
            Control::Msg {
                msg: ClientMsg::Chat { text, .. },
                ..
            } => Some(text.clone()),
            _ => None,
        };
        self.handle_control_inner(c);
        match what {
            0 => {
                if let Some((id, name)) = self.player_info(conn) {
                    self.events
                        .push("join", &serde_json::json!({ "id": id, "name": name }));
                }
            }
            1 if self.core.counters.chat_lines > chat_before => {
                if let (Some((id, name)), Some(text)) = (self.player_info(conn), chat_text) {
                    self.events.push(
                        "chat",
                        &serde_json::json!({ "from": id, "name": name, "text": text }),
                    );
                }
            }
            2 => {
                if let Some((id, name)) = leaving {
                    self.events
                        .push("leave", &serde_json::json!({ "id": id, "name": name }));
                }
            }
            _ => {}
        }
    }

    fn player_info(&self, conn: ConnId) -> Option<(u32, String)> {
        self.core
            .player_acks()
            .find(|(c, _, _)| *c == conn)
            .map(|(_, info, _)| (info.id, info.name.clone()))
    }

    fn handle_control_inner(&mut self, c: Control) {
        let ev = match c {
            Control::Join { conn, link, first } => {
                self.links.insert(conn, link);
                match first {
                    ClientMsg::Resume(req) => CoreEvent::Resume { conn, req },
                    ClientMsg::Hello {
                        version,
                        name,
                        token,
                    } => {
                        let now_unix = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        CoreEvent::Hello {
                            conn,
                            version,
                            name,
                            token,
                            now_unix,
                        }
                    }
                    msg => CoreEvent::Msg { conn, msg },
                }
            }
            Control::Msg { conn, msg } => CoreEvent::Msg { conn, msg },
            Control::Gone { conn, reason } => {
                self.links.remove(&conn);
                CoreEvent::Gone { conn, reason }
            }
            Control::Drain { reason, drain_ms } => {
                tracing::info!(
                    drain_ms,
                    players = self.core.player_count(),
                    "draining: {reason}"
                );
                self.core.begin_drain(&reason, drain_ms, &mut self.out);
                return;
            }
        };
        self.core.handle(ev, &mut self.out);
    }

    pub fn tick_once(&mut self) {
        self.timer.begin();
        let span = tracing::trace_span!("inputs").entered();
        for _ in 0..MAX_CONTROL_PER_TICK {
            match self.control_rx.try_recv() {
                Ok(c) => self.handle_control(c),
                Err(_) => break,
            }
        }
        for _ in 0..MAX_INPUTS_PER_TICK {
            match self.input_rx.try_recv() {
                Ok((conn, datagram, bytes)) => self.core.handle(
                    CoreEvent::Input {
                        conn,
                        datagram,
                        bytes,
                    },
                    &mut self.out,
                ),
                Err(_) => break,
            }
        }
        let conns: Vec<ConnId> = self.core.conns().collect();
        for c in conns {
            let link = self.links.get(&c).map_or(LinkState::default(), |l| {
                let path = l.conn.stats().path;
                let rtt = path.rtt.as_secs_f64().max(0.001);
                LinkState {
                    max_datagram: l.conn.max_datagram_size(),
                    congestion_bytes_per_s: Some(path.cwnd as f64 / rtt),
                }
            });
            self.core.set_link(c, link);
        }
        drop(span);
        self.core.tick_probed(&mut self.out, &mut self.timer);
        tracing::trace_span!("send").in_scope(|| self.execute());
        self.timer.phase_done(Phase::Send);
        tracing::trace_span!("publish").in_scope(|| self.publish());
        self.timer.phase_done(Phase::Publish);
    }

    fn execute(&mut self) {
        let out = std::mem::take(&mut self.out);
        for o in out {
            match o {
                CoreOutput::Datagram(c, bytes) => {
                    let Some(link) = self.links.get(&c) else {
                        continue;
                    };
                    let len = bytes.len() as u64;
                    match link.conn.send_datagram(bytes.into()) {
                        Ok(()) => {
                            ServerStats::add(&self.stats.datagrams_sent, 1);
                            ServerStats::add(&self.stats.datagram_bytes_sent, len);
                            ServerStats::add(&link.counters.datagrams, 1);
                            ServerStats::add(&link.counters.datagram_bytes, len);
                            self.metrics.datagrams_sent.increment(1);
                            self.metrics.bytes_sent_snapshot.increment(len);
                        }
                        Err(SendDatagramError::TooLarge) => {
                            ServerStats::add(&self.stats.datagrams_too_large, 1);
                            self.metrics.dropped_too_large.increment(1);
                        }
                        Err(_) => {
                            ServerStats::add(&self.stats.datagram_send_errors, 1);
                            self.metrics.dropped_send_error.increment(1);
                        }
                    }
                }
                CoreOutput::Frame(c, msg) => {
                    let Some(link) = self.links.get(&c) else {
                        continue;
                    };
                    let bytes = match encode_frame(&msg) {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::error!(conn = c, "cannot encode frame: {e}");
                            continue;
                        }
                    };
                    let len = bytes.len();
                    match link.out.try_send(Outbound::Frame(bytes)) {
                        Ok(()) => {
                            ServerStats::add(&self.stats.stream_bytes_sent, len as u64);
                            ServerStats::add(&link.counters.stream_bytes, len as u64);
                            self.metrics.bytes_sent_stream.increment(len as u64);
                            self.core.count_stream_bytes(c, len);
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            ServerStats::add(&self.stats.slow_consumers, 1);
                            self.metrics.slow_consumers.increment(1);
                            tracing::info!(conn = c, "disconnecting slow consumer");
                            link.conn.close(
                                close::SLOW_CONSUMER.into(),
                                b"slow consumer: stream queue full",
                            );
                            // Once: later outputs for it are skipped until its task reports it gone.
                            self.links.remove(&c);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
                CoreOutput::CloseAfterFlush(c, code, reason) => {
                    let Some(link) = self.links.get(&c) else {
                        continue;
                    };
                    if link
                        .out
                        .try_send(Outbound::CloseAfterFlush(code, reason.clone()))
                        .is_err()
                    {
                        link.conn.close(code.into(), reason.as_bytes());
                    }
                }
            }
        }
    }

    fn publish(&mut self) {
        let c = self.core.counters;
        let ic = self.core.input_counters();
        ServerStats::set(&self.stats.keyframes, c.keyframes);
        ServerStats::set(&self.stats.deltas, c.deltas);
        ServerStats::set(&self.stats.snapshot_bytes_max, c.snapshot_bytes_max);
        ServerStats::set(&self.stats.chat_lines, c.chat_lines);
        ServerStats::set(&self.stats.refusals, c.refusals);
        ServerStats::set(&self.stats.missing_inputs, ic.missing);
        ServerStats::set(&self.stats.late_inputs, ic.late);
        ServerStats::set(&self.stats.players, self.core.player_count() as u64);
        ServerStats::set(&self.stats.players_parked, self.core.parked_count() as u64);
        ServerStats::set(&self.stats.resumes, c.resumes);
        ServerStats::set(&self.stats.resume_keyframes, c.resume_keyframes);
        ServerStats::set(&self.stats.resume_refusals, c.resume_refusals);
        ServerStats::set(&self.stats.replaced, c.replaced);
        ServerStats::set(&self.stats.sessions_expired, c.sessions_expired);
        ServerStats::set(&self.stats.chat_rate_limited, c.chat_rate_limited);
        ServerStats::set(&self.stats.typing_dropped, c.typing_dropped);
        ServerStats::set(&self.stats.errors_dropped, c.errors_dropped);
        ServerStats::set(&self.stats.stray_events, c.stray_events);
        ServerStats::set(&self.stats.quiet_skips, c.quiet_skips);
        let entities = self.core.world().entity_count() as u64;
        ServerStats::set(&self.stats.entities, entities);
        let m = &self.metrics;
        let k = &mut self.marks;
        m.keyframes
            .increment(c.keyframes.saturating_sub(k.keyframes));
        m.deltas.increment(c.deltas.saturating_sub(k.deltas));
        m.chat_messages
            .increment(c.chat_lines.saturating_sub(k.chat));
        m.join_refusals
            .increment(c.refusals.saturating_sub(k.refusals));
        m.inputs_late.increment(ic.late.saturating_sub(k.late));
        m.inputs_missing
            .increment(ic.missing.saturating_sub(k.missing));
        let delta_resumes = c.resumes.saturating_sub(c.resume_keyframes);
        m.resumes.increment(delta_resumes.saturating_sub(k.resumes));
        m.resume_keyframes
            .increment(c.resume_keyframes.saturating_sub(k.resume_keyframes));
        m.players_parked.set(self.core.parked_count() as f64);
        *k = Marks {
            resumes: delta_resumes,
            resume_keyframes: c.resume_keyframes,
            keyframes: c.keyframes,
            deltas: c.deltas,
            chat: c.chat_lines,
            refusals: c.refusals,
            late: ic.late,
            missing: ic.missing,
        };
        m.players.set(self.core.player_count() as f64);
        m.entities.set(entities as f64);
        let tick = self.core.world().tick();
        if tick.0.is_multiple_of(15) {
            if let Ok(mut ps) = self.published.players.lock() {
                ps.clear();
                ps.extend(
                    self.core
                        .player_acks()
                        .map(|(conn, info, acked)| PlayerStatus {
                            conn,
                            id: info.id,
                            name: info.name.clone(),
                            avatar: info.avatar.index,
                            baseline_age_ticks: acked.map(|a| tick.diff(a)),
                        }),
                );
            }
        }
        if let Ok(mut r) = self.published.recent.lock() {
            let s = self.core.current_snapshot();
            if r.len() >= PUBLISHED_SNAPSHOTS {
                r.pop_front();
            }
            r.push_back(s.clone());
        }
        if let Ok(mut r) = self.published.roster.lock() {
            *r = self.core.roster();
        }
    }

    fn shutdown(&mut self) {
        // Handle what already arrived (joins, leaves), then close everyone with the reason.
        for _ in 0..MAX_CONTROL_PER_TICK {
            match self.control_rx.try_recv() {
                Ok(c) => self.handle_control(c),
                Err(_) => break,
            }
        }
        self.core.shutdown(&mut self.out);
        self.execute();
        self.publish();
    }
}
