//! The tick thread: owns the [`ServerCore`], runs it on a drift-free schedule (tick *n* starts at
//! `start + n·period`; lateness counted; catch-up bounded), drains the connection tasks' queues and
//! executes the core's outputs without ever awaiting the network.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{close, encode_frame, InputDatagram, LeaveReason, PlayerInfo};
use quinn::SendDatagramError;
use tokio::sync::mpsc;

use crate::core::{ConnId, CoreEvent, CoreOutput, LinkState, ServerCore};
use crate::stats::ServerStats;

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
}

/// Control events from connection tasks (never dropped; bounded by the number of connections).
#[derive(Debug)]
pub(crate) enum Control {
    /// A connection sent `hello`.
    Join {
        /// Connection id.
        conn: ConnId,
        /// Its link.
        link: Link,
        /// Protocol version.
        version: u16,
        /// Requested name.
        name: String,
        /// Connect token, if sent.
        token: Option<String>,
    },
    /// A chat request.
    Chat {
        /// Connection id.
        conn: ConnId,
        /// Client message id.
        client_msg_id: u32,
        /// Text.
        text: String,
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
            if began.saturating_duration_since(deadline) > period {
                ServerStats::add(&self.stats.late_ticks, 1);
            }
            let due = (began.duration_since(start).as_secs_f64() / period.as_secs_f64()) as u64;
            if due > n + u64::from(self.max_catchup) {
                let skip = due - n - u64::from(self.max_catchup);
                ServerStats::add(&self.stats.skipped_ticks, skip);
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
            if took > period {
                ServerStats::add(&self.stats.overruns, 1);
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

    fn handle_control(&mut self, c: Control) {
        let ev = match c {
            Control::Join {
                conn,
                link,
                version,
                name,
                token,
            } => {
                self.links.insert(conn, link);
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
            Control::Chat {
                conn,
                client_msg_id,
                text,
            } => CoreEvent::Chat {
                conn,
                client_msg_id,
                text,
            },
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
        self.core.tick(&mut self.out);
        self.execute();
        self.publish();
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
                        }
                        Err(SendDatagramError::TooLarge) => {
                            ServerStats::add(&self.stats.datagrams_too_large, 1)
                        }
                        Err(_) => ServerStats::add(&self.stats.datagram_send_errors, 1),
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
                            self.core.count_stream_bytes(c, len);
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            ServerStats::add(&self.stats.slow_consumers, 1);
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
        ServerStats::set(
            &self.stats.entities,
            self.core.world().entity_count() as u64,
        );
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
