//! Server-wide counters, shared lock-free between the tick thread, connection tasks and observers
//! (logs, tests). Every field is a monotonically increasing count unless its doc says otherwise.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live server counters.
        #[derive(Debug, Default)]
        pub struct ServerStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A plain copy of [`ServerStats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        pub struct StatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl ServerStats {
            /// Reads every counter.
            #[must_use]
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }
    };
}

counters! {
    /// Ticks simulated.
    ticks,
    /// Ticks that started more than one period after their scheduled time.
    late_ticks,
    /// Ticks whose work took longer than one period.
    overruns,
    /// Ticks skipped after a stall longer than the catch-up bound.
    skipped_ticks,
    /// Longest tick so far, µs (a maximum, not a count).
    tick_us_max,
    /// Sum of tick durations, µs.
    tick_us_total,
    /// Connections that completed the QUIC handshake.
    connections_accepted,
    /// Connections currently open (a gauge).
    connections_current,
    /// Client address changes seen on open connections (QUIC connection migration, NAT rebinding),
    /// noticed when the next datagram from that client arrives.
    migrations,
    /// Handshakes that failed or timed out (QUIC or `hello`).
    handshake_failures,
    /// Connections refused because `max_pending_handshakes` were already pending.
    handshakes_refused,
    /// Connection attempts refused because the server was draining.
    drain_refused,
    /// QUIC Retry packets sent (address validation, above `retry_above_handshakes_per_sec`).
    retries_sent,
    /// Connection attempts refused because their IP address had `max_connections_per_ip` already.
    per_ip_refused,
    /// Health pings sent to the Agones SDK (feature `agones`; only while the tick loop advances).
    health_pings,
    /// Joins refused.
    refusals,
    /// Input datagrams accepted.
    input_datagrams,
    /// Bytes of accepted input datagrams.
    input_bytes,
    /// Stream bytes (frames) queued to clients.
    stream_bytes_sent,
    /// Input datagrams dropped because the tick thread's queue was full.
    input_queue_full,
    /// Datagrams refused as malformed, oversized or invalid (the sender is disconnected).
    bad_datagrams,
    /// Stream frames refused as malformed or oversized (the sender is disconnected).
    bad_frames,
    /// Snapshot datagrams handed to QUIC.
    datagrams_sent,
    /// Bytes of those datagrams.
    datagram_bytes_sent,
    /// Datagrams QUIC refused as larger than the path allows (must stay 0).
    datagrams_too_large,
    /// Datagrams QUIC refused for another reason (connection closing, datagrams unsupported).
    datagram_send_errors,
    /// Keyframes sent.
    keyframes,
    /// Deltas sent.
    deltas,
    /// Largest snapshot sent, bytes (a maximum).
    snapshot_bytes_max,
    /// Chat lines accepted.
    chat_lines,
    /// Clients disconnected because their stream queue was full.
    slow_consumers,
    /// Player-ticks simulated without that player's input.
    missing_inputs,
    /// Inputs that arrived after their tick.
    late_inputs,
    /// Players currently joined (a gauge).
    players,
    /// Entities in the world (a gauge).
    entities,
    /// Dropped players waiting in their grace window for a resume (a gauge).
    players_parked,
    /// Sessions resumed on a new connection.
    resumes,
    /// Of which restarted from a keyframe.
    resume_keyframes,
    /// Resume requests refused (no such session).
    resume_refusals,
    /// Connections closed because a newer connection of the same player took over.
    replaced,
    /// Dropped players removed for good when their grace window passed.
    sessions_expired,
    /// Chat lines dropped by the per-player rate limit.
    chat_rate_limited,
    /// Typing indicators dropped by the per-player rate limit.
    typing_dropped,
    /// Error notices not sent (a player gets at most 4 a second).
    errors_dropped,
    /// Stream messages or inputs from connections that are not (or no longer) players.
    stray_events,
    /// Per-client snapshots skipped because that client stopped acknowledging.
    quiet_skips,
}

impl ServerStats {
    /// Raises a maximum.
    pub fn max(&self, field: &AtomicU64, v: u64) {
        field.fetch_max(v, Ordering::Relaxed);
    }

    /// Adds to a counter.
    pub fn add(field: &AtomicU64, v: u64) {
        field.fetch_add(v, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(field: &AtomicU64, v: u64) {
        field.store(v, Ordering::Relaxed);
    }
}
