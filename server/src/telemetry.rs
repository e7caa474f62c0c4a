//! Metrics and tick-phase timing. Metrics go through the `metrics` facade to the Prometheus recorder,
//! installed once per process ([`install_prometheus`]); every handle is registered once per server
//! ([`Metrics::register`]) so recording is an atomic operation, never a registry lookup. The names,
//! types and units are listed in `docs/METRICS.md` (a test keeps the two equal).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// A phase of one tick, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Draining the connection queues (joins, chat, input datagrams), refreshing path limits and
    /// taking each player's input for the tick.
    Inputs,
    /// The simulation step, shot results and the world snapshot.
    Sim,
    /// The interest grid rebuild and every client's wanted set.
    Interest,
    /// Every client's changes, budget, view and delta encode.
    Encode,
    /// Handing datagrams to QUIC and frames to the stream writers.
    Send,
    /// Publishing snapshots, roster and status for observers.
    Publish,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 6] = [
        Phase::Inputs,
        Phase::Sim,
        Phase::Interest,
        Phase::Encode,
        Phase::Send,
        Phase::Publish,
    ];

    /// The `phase` label value.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Phase::Inputs => "inputs",
            Phase::Sim => "sim",
            Phase::Interest => "interest",
            Phase::Encode => "encode",
            Phase::Send => "send",
            Phase::Publish => "publish",
        }
    }
}

/// Observes a tick from inside the I/O-free core: the core reads no clock, it only says where one
/// phase ends; the tick thread's [`PhaseTimer`] reads the clock.
pub trait TickProbe {
    /// The work since the previous call (or since the tick began) belonged to `phase`.
    fn phase_done(&mut self, phase: Phase);
    /// A snapshot of `bytes` (all its parts) was built for one client.
    fn snapshot_built(&mut self, bytes: usize);
}

/// A probe that observes nothing (tests, benches).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProbe;

impl TickProbe for NoProbe {
    fn phase_done(&mut self, _: Phase) {}
    fn snapshot_built(&mut self, _: usize) {}
}

/// Why a connection closed (the `reason` label of `quicktick_connection_closes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The QUIC handshake failed.
    HandshakeFailed,
    /// The QUIC handshake plus `hello` did not finish before the deadline.
    HandshakeTimeout,
    /// The client closed the connection or its stream.
    Quit,
    /// The path timed out or was reset.
    TimedOut,
    /// The client broke the protocol and was disconnected.
    ProtocolViolation,
    /// The server closed it (join refused, slow consumer, shutdown).
    ServerClosed,
}

impl CloseReason {
    /// Every reason.
    pub const ALL: [CloseReason; 6] = [
        CloseReason::HandshakeFailed,
        CloseReason::HandshakeTimeout,
        CloseReason::Quit,
        CloseReason::TimedOut,
        CloseReason::ProtocolViolation,
        CloseReason::ServerClosed,
    ];

    /// The label value.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::Quit => "quit",
            CloseReason::TimedOut => "timed_out",
            CloseReason::ProtocolViolation => "protocol_violation",
            CloseReason::ServerClosed => "server_closed",
        }
    }
}

/// Every metric handle of one server (cheap to clone: handles are shared).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Open connections.
    pub connections: Gauge,
    /// Connections that completed the QUIC handshake.
    pub connections_total: Counter,
    /// Closes, by [`CloseReason`] (indexed like [`CloseReason::ALL`]).
    pub closes: [Counter; 6],
    /// Connections refused because too many handshakes were pending.
    pub handshakes_refused: Counter,
    /// First packet → `hello` received, seconds.
    pub handshake_seconds: Histogram,
    /// Players joined.
    pub players: Gauge,
    /// Ticks simulated.
    pub ticks: Counter,
    /// Work per tick, seconds.
    pub tick_seconds: Histogram,
    /// Start − scheduled start, seconds.
    pub tick_lateness_seconds: Histogram,
    /// Ticks that started more than a period late.
    pub ticks_late: Counter,
    /// Ticks whose work took longer than a period.
    pub overruns: Counter,
    /// Ticks skipped after a stall.
    pub ticks_skipped: Counter,
    /// Time per phase, seconds (indexed like [`Phase::ALL`]).
    pub phase_seconds: [Histogram; 6],
    /// Entities in the world.
    pub entities: Gauge,
    /// Bytes of one client's snapshot (all parts).
    pub snapshot_bytes: Histogram,
    /// Keyframes sent.
    pub keyframes: Counter,
    /// Deltas sent.
    pub deltas: Counter,
    /// Snapshot datagram bytes handed to QUIC.
    pub bytes_sent_snapshot: Counter,
    /// Stream frame bytes queued to clients.
    pub bytes_sent_stream: Counter,
    /// UDP bytes sent (QUIC's own count: all packets, headers and retransmissions included).
    pub bytes_sent_udp: Counter,
    /// Input datagram bytes accepted.
    pub bytes_received_input: Counter,
    /// Stream bytes received.
    pub bytes_received_stream: Counter,
    /// UDP bytes received (QUIC's count).
    pub bytes_received_udp: Counter,
    /// Snapshot datagrams handed to QUIC.
    pub datagrams_sent: Counter,
    /// Input datagrams accepted.
    pub datagrams_received: Counter,
    /// Datagrams refused by QUIC as too large.
    pub dropped_too_large: Counter,
    /// Datagrams evicted from QUIC's send buffer before being sent (estimated once a second).
    pub dropped_evicted: Counter,
    /// Input datagrams dropped because the tick thread's queue was full.
    pub dropped_queue_full: Counter,
    /// Datagrams QUIC refused for another reason (connection closing).
    pub dropped_send_error: Counter,
    /// Malformed datagrams (sender disconnected).
    pub bad_datagrams: Counter,
    /// Malformed stream frames (sender disconnected).
    pub bad_frames: Counter,
    /// Clients disconnected because their stream queue was full.
    pub slow_consumers: Counter,
    /// Inputs that arrived after their tick.
    pub inputs_late: Counter,
    /// Player-ticks simulated without that player's input.
    pub inputs_missing: Counter,
    /// Chat lines accepted.
    pub chat_messages: Counter,
    /// Joins refused.
    pub join_refusals: Counter,
    /// Sessions resumed on a new connection.
    pub resumes: Counter,
    /// Of which restarted from a keyframe.
    pub resume_keyframes: Counter,
    /// Dropped players waiting in their grace window.
    pub players_parked: Gauge,
    /// RTT of each connection, sampled once a second, seconds.
    pub rtt_seconds: Histogram,
    /// Packets QUIC declared lost.
    pub packets_lost: Counter,
    /// Packets QUIC sent.
    pub packets_sent: Counter,
}

impl Metrics {
    /// Registers every handle with the installed recorder (a no-op recorder when none is installed:
    /// then recording costs next to nothing).
    #[must_use]
    pub fn register() -> Self {
        use metrics::{counter, gauge, histogram};
        Self {
            connections: gauge!("quicktick_connections"),
            connections_total: counter!("quicktick_connections_total"),
            closes: CloseReason::ALL
                .map(|r| counter!("quicktick_connection_closes_total", "reason" => r.name())),
            handshakes_refused: counter!("quicktick_handshakes_refused_total"),
            handshake_seconds: histogram!("quicktick_handshake_seconds"),
            players: gauge!("quicktick_players"),
            ticks: counter!("quicktick_ticks_total"),
            tick_seconds: histogram!("quicktick_tick_duration_seconds"),
            tick_lateness_seconds: histogram!("quicktick_tick_lateness_seconds"),
            ticks_late: counter!("quicktick_ticks_late_total"),
            overruns: counter!("quicktick_tick_overruns_total"),
            ticks_skipped: counter!("quicktick_ticks_skipped_total"),
            phase_seconds: Phase::ALL
                .map(|p| histogram!("quicktick_tick_phase_seconds", "phase" => p.name())),
            entities: gauge!("quicktick_entities"),
            snapshot_bytes: histogram!("quicktick_snapshot_bytes"),
            keyframes: counter!("quicktick_snapshots_total", "kind" => "keyframe"),
            deltas: counter!("quicktick_snapshots_total", "kind" => "delta"),
            bytes_sent_snapshot: counter!("quicktick_bytes_sent_total", "kind" => "snapshot"),
            bytes_sent_stream: counter!("quicktick_bytes_sent_total", "kind" => "stream"),
            bytes_sent_udp: counter!("quicktick_bytes_sent_total", "kind" => "udp"),
            bytes_received_input: counter!("quicktick_bytes_received_total", "kind" => "input"),
            bytes_received_stream: counter!("quicktick_bytes_received_total", "kind" => "stream"),
            bytes_received_udp: counter!("quicktick_bytes_received_total", "kind" => "udp"),
            datagrams_sent: counter!("quicktick_datagrams_sent_total"),
            datagrams_received: counter!("quicktick_datagrams_received_total"),
            dropped_too_large: counter!("quicktick_datagrams_dropped_total", "reason" => "too_large"),
            dropped_evicted: counter!("quicktick_datagrams_dropped_total", "reason" => "evicted"),
            dropped_queue_full: counter!("quicktick_datagrams_dropped_total", "reason" => "queue_full"),
            dropped_send_error: counter!("quicktick_datagrams_dropped_total", "reason" => "send_error"),
            bad_datagrams: counter!("quicktick_bad_messages_total", "kind" => "datagram"),
            bad_frames: counter!("quicktick_bad_messages_total", "kind" => "frame"),
            slow_consumers: counter!("quicktick_slow_consumers_total"),
            inputs_late: counter!("quicktick_inputs_late_total"),
            inputs_missing: counter!("quicktick_inputs_missing_total"),
            chat_messages: counter!("quicktick_chat_messages_total"),
            join_refusals: counter!("quicktick_join_refusals_total"),
            resumes: counter!("quicktick_resumes_total", "baseline" => "delta"),
            resume_keyframes: counter!("quicktick_resumes_total", "baseline" => "keyframe"),
            players_parked: gauge!("quicktick_players_parked"),
            rtt_seconds: histogram!("quicktick_rtt_seconds"),
            packets_lost: counter!("quicktick_packets_lost_total"),
            packets_sent: counter!("quicktick_packets_sent_total"),
        }
    }

    /// The counter of a close reason.
    pub fn close(&self, reason: CloseReason) {
        let i = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        if let Some(c) = self.closes.get(i) {
            c.increment(1);
        }
    }
}

/// Installs the Prometheus recorder as the process's global `metrics` recorder, once; later calls
/// return the same handle. `None` when another recorder was installed first. Also starts the
/// recorder's upkeep (a small thread draining histogram buffers every 5 s).
pub fn install_prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 16e-3,
                25e-3, 50e-3, 100e-3, 250e-3, 1.0,
            ];
            let bytes = [
                16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &bytes));
            let handle = match builder.and_then(PrometheusBuilder::install_recorder) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!("metrics recorder not installed: {e}");
                    return None;
                }
            };
            let upkeep = handle.clone();
            let started = std::thread::Builder::new()
                .name("quicktick-metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                });
            if let Err(e) = started {
                tracing::warn!("metrics upkeep thread not started: {e}");
            }
            Some(handle)
        })
        .clone()
}

/// Times the phases of a tick on the tick thread: each [`TickProbe::phase_done`] adds the time since
/// the previous mark to that phase. Two clock reads per phase; no allocation.
#[derive(Debug)]
pub struct PhaseTimer {
    last: Instant,
    /// Time per phase in the current tick (indexed like [`Phase::ALL`]).
    pub spent: [Duration; 6],
    snapshot_bytes: Histogram,
}

impl PhaseTimer {
    /// A timer whose snapshot sizes go to `metrics`.
    #[must_use]
    pub fn new(metrics: &Metrics) -> Self {
        Self {
            last: Instant::now(),
            spent: [Duration::ZERO; 6],
            snapshot_bytes: metrics.snapshot_bytes.clone(),
        }
    }

    /// Starts a tick.
    pub fn begin(&mut self) {
        self.spent = [Duration::ZERO; 6];
        self.last = Instant::now();
    }

    /// Records the tick's phase times into `metrics`.
    pub fn record(&self, metrics: &Metrics) {
        for (h, d) in metrics.phase_seconds.iter().zip(self.spent) {
            h.record(d.as_secs_f64());
        }
    }

    /// Time spent in `phase` this tick.
    #[must_use]
    pub fn spent(&self, phase: Phase) -> Duration {
        let i = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        self.spent.get(i).copied().unwrap_or_default()
    }
}

impl TickProbe for PhaseTimer {
    fn phase_done(&mut self, phase: Phase) {
        let now = Instant::now();
        let i = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        if let Some(s) = self.spent.get_mut(i) {
            *s += now.saturating_duration_since(self.last);
        }
        self.last = now;
    }

    fn snapshot_built(&mut self, bytes: usize) {
        self.snapshot_bytes.record(bytes as f64);
    }
}

/// Counts the tick thread keeps per connection (shared with the connection task, which samples
/// them once a second).
#[derive(Debug, Default)]
pub struct LinkCounters {
    /// Snapshot datagrams QUIC accepted for this connection.
    pub datagrams: AtomicU64,
    /// Their bytes.
    pub datagram_bytes: AtomicU64,
    /// Stream bytes queued.
    pub stream_bytes: AtomicU64,
}

/// Each connection's latest [`ConnStatus`], by connection id.
pub type ConnRegistry = std::sync::Mutex<std::collections::HashMap<u64, ConnStatus>>;

/// What a connection task publishes about its connection once a second (for `/status`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ConnStatus {
    /// Connection id.
    pub conn: u64,
    /// The client's address.
    pub remote: String,
    /// Seconds since the connection was accepted.
    pub connected_s: f64,
    /// QUIC's smoothed RTT, ms.
    pub rtt_ms: f64,
    /// Packets lost / packets sent over the last second (0..=1).
    pub loss: f64,
    /// Packets lost since the start.
    pub lost_packets: u64,
    /// UDP bytes sent per second (last second).
    pub bytes_out_per_s: f64,
    /// UDP bytes received per second (last second).
    pub bytes_in_per_s: f64,
    /// Snapshot bytes per second handed to QUIC (last second).
    pub snapshot_bytes_per_s: f64,
    /// Datagrams evicted from the send buffer since the start (estimate).
    pub datagrams_evicted: u64,
}

/// Samples one connection's QUIC statistics once a second into metrics and a [`ConnStatus`].
#[derive(Debug)]
pub struct ConnSampler {
    started: Instant,
    last_at: Instant,
    last: quinn::ConnectionStats,
    last_snapshot_bytes: u64,
    evicted: u64,
    /// QUIC's datagram send buffer size, bytes (config `datagram_send_buffer`).
    send_buffer: usize,
    /// Counts kept by the tick thread.
    pub link: Arc<LinkCounters>,
}

impl ConnSampler {
    /// Starts sampling `conn`, whose datagram send buffer holds `send_buffer` bytes.
    #[must_use]
    pub fn new(conn: &quinn::Connection, link: Arc<LinkCounters>, send_buffer: usize) -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last_at: now,
            last: conn.stats(),
            last_snapshot_bytes: 0,
            evicted: 0,
            send_buffer,
            link,
        }
    }

    /// Takes a sample: adds the deltas since the previous one to `m` and returns the status.
    pub fn sample(&mut self, id: u64, conn: &quinn::Connection, m: &Metrics) -> ConnStatus {
        let now = Instant::now();
        let s = conn.stats();
        let dt = now.saturating_duration_since(self.last_at).as_secs_f64();
        let per_s = |d: u64| if dt > 0.0 { d as f64 / dt } else { 0.0 };
        let sent = s
            .path
            .sent_packets
            .saturating_sub(self.last.path.sent_packets);
        let lost = s
            .path
            .lost_packets
            .saturating_sub(self.last.path.lost_packets);
        let tx = s.udp_tx.bytes.saturating_sub(self.last.udp_tx.bytes);
        let rx = s.udp_rx.bytes.saturating_sub(self.last.udp_rx.bytes);
        m.packets_sent.increment(sent);
        m.packets_lost.increment(lost);
        m.bytes_sent_udp.increment(tx);
        m.bytes_received_udp.increment(rx);
        m.rtt_seconds.record(conn.rtt().as_secs_f64());
        // Datagrams QUIC accepted but never put in a packet were evicted (the send buffer keeps
        // only the newest): accepted − transmitted − (an estimate of) those still queued.
        let accepted = self.link.datagrams.load(Ordering::Relaxed);
        let bytes = self.link.datagram_bytes.load(Ordering::Relaxed);
        let mean = bytes.checked_div(accepted).unwrap_or(0).max(1);
        let queued = (self.send_buffer as u64)
            .saturating_sub(conn.datagram_send_buffer_space() as u64)
            .div_ceil(mean);
        let evicted = accepted
            .saturating_sub(s.frame_tx.datagram)
            .saturating_sub(queued);
        if evicted > self.evicted {
            m.dropped_evicted.increment(evicted - self.evicted);
            self.evicted = evicted;
        }
        let snapshot_bytes = bytes.saturating_sub(self.last_snapshot_bytes);
        self.last_snapshot_bytes = bytes;
        let status = ConnStatus {
            conn: id,
            remote: conn.remote_address().to_string(),
            connected_s: now.saturating_duration_since(self.started).as_secs_f64(),
            rtt_ms: conn.rtt().as_secs_f64() * 1000.0,
            loss: if sent > 0 {
                lost as f64 / sent as f64
            } else {
                0.0
            },
            lost_packets: s.path.lost_packets,
            bytes_out_per_s: per_s(tx),
            bytes_in_per_s: per_s(rx),
            snapshot_bytes_per_s: per_s(snapshot_bytes),
            datagrams_evicted: self.evicted,
        };
        self.last = s;
        self.last_at = now;
        status
    }
}
