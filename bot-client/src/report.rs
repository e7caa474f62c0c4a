//! The swarm's end-of-run report (written as pretty JSON) and the pure computations behind it:
//! aggregation of per-bot stats, the presence check and the chat-delivery check.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::ClientStats;
use crate::lobby::ChatReceipts;

/// Three RTT percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of a histogram of microseconds, as milliseconds (all 0 when empty).
    #[must_use]
    pub fn from_us(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

/// Mean, 95th percentile and maximum of an error, in world units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorStats {
    /// Mean.
    pub mean: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Largest.
    pub max: f64,
    /// Samples.
    pub samples: u64,
}

impl ErrorStats {
    /// From a histogram of micro-units.
    #[must_use]
    pub fn from_micro_units(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            mean: h.mean() / 1e6,
            p95: h.value_at_quantile(0.95) as f64 / 1e6,
            max: h.max() as f64 / 1e6,
            samples: h.len(),
        }
    }
}

/// The end-of-run report. Counters are sums over all bots that connected, unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Bots asked for (`--bots`).
    pub bots_requested: u64,
    /// Bots that completed the handshake.
    pub bots_connected: u64,
    /// Of which still connected at the end (before the swarm closed them).
    pub bots_connected_at_end: u64,
    /// Server tick rate from the welcome (0 when no bot joined).
    pub tick_rate: u16,
    /// Wall time from start to the end-of-run checks, seconds.
    pub duration_s: f64,
    /// Complete snapshots assembled.
    pub snapshots_received: u64,
    /// Bytes of all complete snapshots.
    pub snapshot_bytes_total: u64,
    /// Largest complete snapshot, bytes (max over bots).
    pub snapshot_bytes_max: u64,
    /// Complete keyframes.
    pub keyframes_received: u64,
    /// Complete deltas.
    pub deltas_received: u64,
    /// Snapshot datagrams received.
    pub snapshot_parts_received: u64,
    /// Parts for ticks not newer than the newest complete snapshot.
    pub stale_parts: u64,
    /// Parts received twice.
    pub duplicate_parts: u64,
    /// Datagrams refused as too large on send, or received larger than `max_datagram_size()`.
    pub datagrams_too_large: u64,
    /// Snapshot datagrams that failed to decode or apply.
    pub decode_errors: u64,
    /// Parts whose baseline was not held.
    pub missing_baseline: u64,
    /// Input datagrams sent.
    pub inputs_sent: u64,
    /// Input datagrams not sent for another reason.
    pub input_send_errors: u64,
    /// Bytes received, datagrams and stream.
    pub bytes_received: u64,
    /// Chat lines sent.
    pub chat_sent: u64,
    /// Chat lines received from other players (first copies).
    pub chat_received: u64,
    /// Lines received twice by the same bot.
    pub chat_duplicates: u64,
    /// Lines whose `seq` was not greater than the previous one a bot received.
    pub chat_out_of_order: u64,
    /// (line, bot) pairs where a line sent after the bot joined was echoed to its sender but not
    /// received by that bot (bots connected at the end only).
    pub chat_missing: u64,
    /// `Error` frames from the server.
    pub server_errors: u64,
    /// Unexpected stream messages and presence anomalies.
    pub protocol_anomalies: u64,
    /// RTT percentiles over every 100 ms sample of every bot.
    pub rtt_ms: Percentiles,
    /// RTT samples taken.
    pub rtt_samples: u64,
    /// From sending the input for tick T to the first snapshot showing the server applied T.
    pub input_to_snapshot_ms: Percentiles,
    /// Own-avatar prediction error at each snapshot tick, world units.
    pub prediction_error: ErrorStats,
    /// Snapshots whose authoritative avatar differed from the prediction.
    pub corrections: u64,
    /// Inputs the server reports as arriving after their tick.
    pub late_inputs: u64,
    /// Input datagrams sent twice (the client's remedy once the server reports late inputs).
    pub input_duplicates_sent: u64,
    /// Ticks the server simulated without the bot's input.
    pub missing_inputs: u64,
    /// Inputs the server applied on time.
    pub inputs_applied: u64,
    /// Interpolated frames drawn after each bot's first second.
    pub interpolation_frames: u64,
    /// Of which extrapolated because no later snapshot had arrived.
    pub interpolation_underruns: u64,
    /// Shots the server judged.
    pub shots: u64,
    /// Of which hit something.
    pub hits: u64,
    /// Of which were judged against the rewound view (lag compensation).
    pub shots_compensated: u64,
    /// Bots whose roster differed from the set of swarm bots connected at the end.
    pub presence_mismatches: u64,
    /// Complete snapshots per second of the slowest bot (over its connected time).
    pub snapshots_per_bot_per_s: f64,
    /// Failed connection attempts.
    pub connect_errors: u64,
    /// Distinct connect error messages.
    pub connect_error_messages: Vec<String>,
    /// Distinct reasons of connections that closed before the swarm closed them.
    pub close_reasons: Vec<String>,
    /// Connections lost (each bot may lose and resume several).
    pub connections_lost: u64,
    /// Reconnection attempts made.
    pub reconnect_attempts: u64,
    /// Most reconnection attempts started within any one second, over all bots.
    pub peak_attempts_per_s: u64,
    /// Most bots making their *first* reconnection attempt within any one second (how well the
    /// restart spread and jitter spread a herd).
    pub peak_first_attempts_per_s: u64,
    /// Sessions resumed (same player and avatar).
    pub resumes: u64,
    /// Resumes whose first snapshot was a keyframe.
    pub resume_keyframes: u64,
    /// Resumes refused (session gone) that joined afresh as a new player.
    pub rejoins: u64,
    /// Endpoint address changes (QUIC connection migration, `--migrate-every`).
    pub migrations: u64,
    /// Times a bot's link went silent past the degraded threshold.
    pub degraded: u64,
    /// Chat lines lost: lines sent that the server never confirmed (still queued or dropped), plus
    /// confirmed lines that some other bot connected at the end (and joined before) never received.
    pub chat_lost: u64,
    /// Chat lines received in resume replays.
    pub chat_replayed: u64,
    /// Own lines resent after a resume (the server drops those it already had).
    pub chat_resent: u64,
    /// Joins or re-joins refused because of the connect token.
    pub token_refusals: u64,
    /// Bots whose connection ended cleanly before the swarm closed them: the server closed it on
    /// purpose for shutdown (code 1), after its drain.
    #[serde(default)]
    pub clean_closes: u64,
    /// Per close reason (the server's reason text, or quinn's words for timeouts and resets), how
    /// many bots' connections ended with it before the swarm closed them.
    #[serde(default)]
    pub close_reason_counts: BTreeMap<String, u64>,
    /// Bots that received the server's `Draining` notice.
    #[serde(default)]
    pub drain_notices: u64,
}

/// What is known about one bot that connected, at the end of the run.
#[derive(Debug, Clone)]
pub struct BotOutcome {
    /// Its counters.
    pub stats: ClientStats,
    /// From its welcome to the end-of-run checks.
    pub connected_for: Duration,
    /// Still connected then.
    pub connected_at_end: bool,
}

/// Run-wide facts that are not per-bot sums.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    /// Bots asked for.
    pub bots_requested: u64,
    /// Server tick rate.
    pub tick_rate: u16,
    /// From start to the end-of-run checks.
    pub duration: Duration,
    /// One message per failed connection attempt.
    pub connect_errors: Vec<String>,
    /// One reason per connection that closed before the end.
    pub close_reasons: Vec<String>,
    /// From [`presence_mismatches`].
    pub presence_mismatches: u64,
    /// From [`chat_missing`].
    pub chat_missing: u64,
    /// From [`chat_lost`].
    pub chat_lost: u64,
    /// From [`peak_per_second`] over every bot's reconnection attempts.
    pub peak_attempts_per_s: u64,
    /// From [`peak_per_second`] over every bot's first reconnection attempt.
    pub peak_first_attempts_per_s: u64,
    /// Endpoint rebinds done by the swarm.
    pub migrations: u64,
    /// Bots refused at the first join because of the connect token.
    pub token_refusals: u64,
}

fn distinct(v: &[String]) -> Vec<String> {
    v.iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Builds the report from run facts and per-bot outcomes.
#[must_use]
pub fn aggregate(facts: &RunFacts, bots: &[BotOutcome]) -> Report {
    let mut r = Report {
        bots_requested: facts.bots_requested,
        bots_connected: bots.len() as u64,
        tick_rate: facts.tick_rate,
        duration_s: facts.duration.as_secs_f64(),
        chat_missing: facts.chat_missing,
        presence_mismatches: facts.presence_mismatches,
        connect_errors: facts.connect_errors.len() as u64,
        connect_error_messages: distinct(&facts.connect_errors),
        close_reasons: distinct(&facts.close_reasons),
        chat_lost: facts.chat_lost,
        peak_attempts_per_s: facts.peak_attempts_per_s,
        peak_first_attempts_per_s: facts.peak_first_attempts_per_s,
        migrations: facts.migrations,
        token_refusals: facts.token_refusals,
        ..Report::default()
    };
    let mut rtt: Option<Histogram<u64>> = None;
    let mut lat: Option<Histogram<u64>> = None;
    let mut perr: Option<Histogram<u64>> = None;
    let mut slowest: Option<f64> = None;
    for b in bots {
        let s = &b.stats;
        let c = &s.session;
        r.bots_connected_at_end += u64::from(b.connected_at_end);
        r.snapshots_received += c.snapshots;
        r.snapshot_bytes_total += c.snapshot_bytes;
        r.snapshot_bytes_max = r.snapshot_bytes_max.max(c.snapshot_bytes_max);
        r.keyframes_received += c.keyframes;
        r.deltas_received += c.deltas;
        r.snapshot_parts_received += c.parts;
        r.stale_parts += c.stale_parts;
        r.duplicate_parts += c.duplicate_parts;
        r.decode_errors += c.decode_errors;
        r.missing_baseline += c.missing_baseline;
        r.datagrams_too_large += s.datagrams_too_large;
        r.inputs_sent += s.input_datagrams_sent;
        r.input_send_errors += s.datagram_send_errors;
        r.bytes_received += s.datagram_bytes_received + s.stream_bytes_received;
        r.chat_sent += s.chat_sent;
        r.chat_received += s.chat_received_others;
        r.chat_duplicates += s.chat_duplicates;
        r.chat_out_of_order += s.chat_out_of_order;
        r.server_errors += s.server_errors;
        r.protocol_anomalies += s.protocol_anomalies;
        r.corrections += s.corrections;
        r.late_inputs += s.inputs_late;
        r.input_duplicates_sent += s.input_duplicates_sent;
        r.missing_inputs += s.inputs_missing;
        r.inputs_applied += s.inputs_applied;
        r.interpolation_frames += s.interpolation_frames;
        r.interpolation_underruns += s.interpolation_underruns;
        r.shots += s.shots;
        r.hits += s.hits;
        r.shots_compensated += s.shots_compensated;
        r.connections_lost += s.connections_lost;
        r.reconnect_attempts += s.reconnect_attempts;
        r.resumes += s.resumes;
        r.resume_keyframes += s.resume_keyframes;
        r.rejoins += s.rejoins;
        r.degraded += s.degraded;
        r.chat_replayed += s.chat_replayed;
        r.chat_resent += s.chat_resent;
        r.token_refusals += s.token_refusals;
        r.drain_notices += u64::from(s.drain_notice.is_some());
        if let (false, Some(c)) = (b.connected_at_end, &s.closed) {
            r.clean_closes += u64::from(c.clean);
            *r.close_reason_counts.entry(c.reason.clone()).or_default() += 1;
        }
        for (acc, h) in [
            (&mut lat, &s.input_to_snapshot_us),
            (&mut perr, &s.prediction_error_uu),
        ] {
            match acc {
                None => *acc = Some(h.clone()),
                Some(a) => {
                    let _ = a.add(h);
                }
            }
        }
        match &mut rtt {
            None => rtt = Some(s.rtt_us.clone()),
            Some(h) => {
                if h.add(&s.rtt_us).is_err() {
                    tracing::warn!("RTT histograms with different bounds; one bot skipped");
                }
            }
        }
        let secs = b.connected_for.as_secs_f64();
        let rate = if secs > 0.0 {
            c.snapshots as f64 / secs
        } else {
            0.0
        };
        slowest = Some(slowest.map_or(rate, |m: f64| m.min(rate)));
    }
    if let Some(h) = &rtt {
        r.rtt_ms = Percentiles::from_us(h);
        r.rtt_samples = h.len();
    }
    r.snapshots_per_bot_per_s = slowest.unwrap_or(0.0);
    if let Some(h) = &lat {
        r.input_to_snapshot_ms = Percentiles::from_us(h);
    }
    if let Some(h) = &perr {
        r.prediction_error = ErrorStats::from_micro_units(h);
    }
    r
}

/// How many of `rosters` (one per bot connected at the end, the names it sees) differ from
/// `connected` (the names of the swarm's bots connected at the end). Only roster names starting with
/// `run_prefix` (this run's bots) are compared, so other players on the server do not count.
#[must_use]
pub fn presence_mismatches(
    rosters: &[BTreeSet<String>],
    connected: &BTreeSet<String>,
    run_prefix: &str,
) -> u64 {
    let ours: BTreeSet<String> = rosters
        .iter()
        .flatten()
        .chain(connected)
        .filter(|n| n.starts_with(run_prefix))
        .cloned()
        .collect();
    presence_mismatches_among(rosters, connected, &ours)
}

/// How many of `rosters` (one per bot connected at the end: the player ids it sees) differ from
/// `connected` (the ids of the swarm's bots connected at the end), comparing only ids in `ours` (the
/// ids this run's bots hold), so other players on the server do not count. Ids, not names: with
/// connect tokens the server names players after their tokens.
#[must_use]
pub fn presence_mismatches_among<T: Ord>(
    rosters: &[BTreeSet<T>],
    connected: &BTreeSet<T>,
    ours: &BTreeSet<T>,
) -> u64 {
    rosters
        .iter()
        .filter(|roster| {
            let seen: BTreeSet<&T> = roster.iter().filter(|n| ours.contains(*n)).collect();
            seen.len() != connected.len() || !connected.iter().all(|n| seen.contains(n))
        })
        .count() as u64
}

/// Chat lines that did not arrive: for every line a sender had echoed back (so the server accepted
/// and sequenced it), every receiver (other than the sender) that joined before the line but does not
/// have it counts once. `senders`: every bot that connected; `receivers`: the bots connected at the end.
#[must_use]
pub fn chat_missing(senders: &[&ChatReceipts], receivers: &[&ChatReceipts]) -> u64 {
    let mut missing = 0;
    for a in senders {
        for &(seq, id) in &a.echoed {
            missing += receivers
                .iter()
                .filter(|b| b.me != a.me && seq > b.joined_after_seq && !b.has(a.me, id))
                .count() as u64;
        }
    }
    missing
}

/// Chat lines lost, counted once per line: every line a sender wrote that the server never
/// confirmed (`unconfirmed`: per sender, lines still queued or settled without an echo), plus every
/// echoed line that at least one receiver other than its sender, joined before it, does not have.
#[must_use]
pub fn chat_lost(senders: &[(&ChatReceipts, u64)], receivers: &[&ChatReceipts]) -> u64 {
    let mut lost = 0;
    for (a, unconfirmed) in senders {
        lost += unconfirmed;
        for &(seq, id) in &a.echoed {
            let missing = receivers
                .iter()
                .any(|b| b.me != a.me && seq > b.joined_after_seq && !b.has(a.me, id));
            lost += u64::from(missing);
        }
    }
    lost
}

/// The most instants that fall within any one-second window.
#[must_use]
pub fn peak_per_second(times: &mut [std::time::Instant]) -> u64 {
    times.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while let (Some(h), Some(l)) = (times.get(hi), times.get(lo)) {
            if h.duration_since(*l) < Duration::from_secs(1) {
                break;
            }
            lo += 1;
        }
        best = best.max(hi + 1 - lo);
    }
    best as u64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use quicktick_shared::client::ClientCounters;
    use quicktick_shared::wire::ChatLine;

    fn names(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn presence_is_compared_on_this_runs_bots() {
        let connected = names(&["bot-7-0", "bot-7-1", "bot-7-2"]);
        let rosters = [
            names(&["bot-7-0", "bot-7-1", "bot-7-2"]),
            names(&["bot-7-0", "bot-7-1", "bot-7-2", "alice", "bot-9-0"]), // others ignored
            names(&["bot-7-0", "bot-7-1"]),                                // misses one
            names(&["bot-7-0", "bot-7-1", "bot-7-2", "bot-7-3"]),          // a departed bot
            names(&["bot-7-0", "bot-7-1", "bot-7-9"]),                     // same size, wrong one
        ];
        assert_eq!(presence_mismatches(&rosters, &connected, "bot-7-"), 3);
        assert_eq!(presence_mismatches(&[], &connected, "bot-7-"), 0);
        let ids = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
        let ours = ids(&[1, 2, 3, 4]);
        let rosters = [
            ids(&[1, 2, 3]),
            ids(&[1, 2, 3, 99]),
            ids(&[1, 2]),
            ids(&[1, 2, 3, 4]),
        ];
        assert_eq!(
            presence_mismatches_among(&rosters, &ids(&[1, 2, 3]), &ours),
            2
        );
    }

    fn receipts(me: u32, joined_after: u64, lines: &[(u64, u32, u32)]) -> ChatReceipts {
        let mut r = ChatReceipts::new(me, joined_after);
        for &(seq, from, id) in lines {
            r.record(&ChatLine {
                seq,
                from,
                client_msg_id: id,
                scope: quicktick_shared::wire::ChatScope::Global,
                text: String::new(),
            });
        }
        r
    }

    #[test]
    fn chat_missing_counts_pairs() {
        // Bot 1 sent ids 1 (seq 1) and 2 (seq 4); bot 2 sent id 1 (seq 2); bot 3 joined after seq 2.
        let a = receipts(1, 0, &[(1, 1, 1), (2, 2, 1), (4, 1, 2)]);
        let b = receipts(2, 0, &[(1, 1, 1), (2, 2, 1)]); // misses 1/2
        let c = receipts(3, 2, &[(4, 1, 2)]); // 1/1 and 2/1 predate it: not missing
        let all = [&a, &b, &c];
        assert_eq!(chat_missing(&all, &all), 1);
        // A line never echoed to its sender is not counted, even if nobody got it.
        let d = receipts(4, 0, &[]);
        assert_eq!(chat_missing(&[&a, &b, &c, &d], &all), 1);
        // A disconnected receiver does not count; a disconnected sender's lines still do.
        assert_eq!(chat_missing(&all, &[&a, &c]), 0);
        assert_eq!(chat_missing(&all, &[&b]), 1);
        // Lost counts lines, not pairs, plus what the server never confirmed.
        let e = receipts(5, 0, &[(1, 1, 1), (2, 2, 1)]); // also misses 1/2
        let rx = [&a, &b, &c, &e];
        assert_eq!(chat_lost(&[(&a, 0), (&b, 0), (&c, 0)], &rx), 1);
        assert_eq!(chat_lost(&[(&a, 2), (&b, 0)], &rx), 3);
    }

    #[test]
    fn peak_attempts_per_second() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut v = vec![
            at(0),
            at(100),
            at(900),
            at(1000),
            at(1050),
            at(2500),
            at(1999),
        ];
        assert_eq!(
            peak_per_second(&mut v),
            4,
            "100, 900, 1000 and 1050 within one second"
        );
        assert_eq!(peak_per_second(&mut []), 0);
    }

    fn stats(snapshots: u64, bytes_max: u64, rtt_us: &[u64]) -> ClientStats {
        let mut h = Histogram::new_with_bounds(1, crate::client::RTT_MAX_US, 2).unwrap();
        for &v in rtt_us {
            h.record(v).unwrap();
        }
        ClientStats {
            session: ClientCounters {
                snapshots,
                keyframes: 1,
                deltas: snapshots - 1,
                snapshot_bytes: snapshots * 100,
                snapshot_bytes_max: bytes_max,
                parts: snapshots + 2,
                decode_errors: 1,
                missing_baseline: 2,
                ..ClientCounters::default()
            },
            datagrams_received: snapshots + 2,
            datagram_bytes_received: 1000,
            stream_bytes_received: 24,
            datagrams_too_large: 0,
            input_datagrams_sent: 300,
            datagram_send_errors: 0,
            chat_sent: 3,
            chat_received: 10,
            chat_received_others: 7,
            chat_duplicates: 1,
            chat_out_of_order: 0,
            server_errors: 0,
            protocol_anomalies: 0,
            input_to_snapshot_us: {
                let mut l = h.clone();
                l.reset();
                l.record(17_000).unwrap();
                l
            },
            prediction_error_uu: {
                let mut p = Histogram::new_with_bounds(1, 1_000_000_000, 2).unwrap();
                p.record(0).unwrap();
                p.record(15_625).unwrap();
                p
            },
            corrections: 1,
            input_duplicates_sent: 0,
            interpolation_frames: 100,
            interpolation_underruns: 1,
            shots: 4,
            hits: 1,
            shots_compensated: 4,
            inputs_applied: 290,
            inputs_late: 1,
            inputs_missing: 2,
            rtt_us: h,
            chat_replayed: 0,
            chat_dropped_by_server: 0,
            chat_resent: 0,
            connections_lost: 1,
            reconnect_attempts: 2,
            resumes: 1,
            resume_keyframes: 0,
            rejoins: 0,
            token_refusals: 0,
            degraded: 1,
            drain_notice: None,
            closed: None,
        }
    }

    #[test]
    fn aggregation_sums_and_takes_extremes() {
        let bots = [
            BotOutcome {
                stats: stats(100, 500, &[1000; 99]),
                connected_for: Duration::from_secs(10),
                connected_at_end: true,
            },
            BotOutcome {
                stats: ClientStats {
                    drain_notice: Some(crate::client::DrainNotice {
                        reason: "server shutting down".into(),
                        drain: Duration::from_secs(10),
                        received_at: std::time::Instant::now(),
                    }),
                    closed: Some(crate::client::CloseInfo {
                        clean: true,
                        by_server: true,
                        code: Some(1),
                        reason: "server shutting down".into(),
                    }),
                    ..stats(50, 900, &[3000])
                },
                connected_for: Duration::from_secs(10),
                connected_at_end: false,
            },
        ];
        let facts = RunFacts {
            bots_requested: 3,
            tick_rate: 30,
            duration: Duration::from_millis(10_500),
            connect_errors: vec!["refused".into(), "refused".into()],
            close_reasons: vec!["timed out".into(), "b".into(), "timed out".into()],
            presence_mismatches: 1,
            chat_missing: 4,
            chat_lost: 2,
            peak_attempts_per_s: 7,
            peak_first_attempts_per_s: 5,
            migrations: 3,
            token_refusals: 0,
        };
        let r = aggregate(&facts, &bots);
        assert_eq!(
            (r.chat_lost, r.peak_attempts_per_s, r.migrations),
            (2, 7, 3)
        );
        assert_eq!(
            (
                r.connections_lost,
                r.reconnect_attempts,
                r.resumes,
                r.degraded
            ),
            (2, 4, 2, 2)
        );
        assert_eq!(r.bots_requested, 3);
        assert_eq!(r.bots_connected, 2);
        assert_eq!(r.bots_connected_at_end, 1);
        assert_eq!(r.snapshots_received, 150);
        assert_eq!(r.snapshot_bytes_total, 15_000);
        assert_eq!(r.snapshot_bytes_max, 900);
        assert_eq!(r.keyframes_received, 2);
        assert_eq!(r.deltas_received, 148);
        assert_eq!(r.decode_errors, 2);
        assert_eq!(r.missing_baseline, 4);
        assert_eq!(r.inputs_sent, 600);
        assert_eq!(r.bytes_received, 2048);
        assert_eq!(r.chat_sent, 6);
        assert_eq!(r.chat_received, 14);
        assert_eq!(r.chat_duplicates, 2);
        assert_eq!(r.chat_missing, 4);
        assert_eq!(r.presence_mismatches, 1);
        assert_eq!(r.connect_errors, 2);
        assert_eq!(r.connect_error_messages, ["refused"]);
        assert_eq!(r.close_reasons, ["b", "timed out"]);
        assert_eq!((r.clean_closes, r.drain_notices), (1, 1));
        assert_eq!(
            r.close_reason_counts,
            BTreeMap::from([("server shutting down".to_owned(), 1)])
        );
        assert_eq!(r.rtt_samples, 100);
        assert!((r.rtt_ms.p50 - 1.0).abs() < 0.02);
        assert!((r.rtt_ms.max - 3.0).abs() < 0.05);
        assert!((r.snapshots_per_bot_per_s - 5.0).abs() < 1e-9);
        assert!((r.duration_s - 10.5).abs() < 1e-9);
        // Serializes with the documented keys, and reads back.
        let json = serde_json::to_string_pretty(&r).unwrap();
        for key in [
            "\"bots_requested\"",
            "\"rtt_ms\"",
            "\"p99\"",
            "\"snapshots_per_bot_per_s\"",
            "\"close_reasons\"",
            "\"clean_closes\"",
            "\"close_reason_counts\"",
        ] {
            assert!(json.contains(key), "{key}");
        }
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn empty_run_reports_zeros() {
        let r = aggregate(&RunFacts::default(), &[]);
        assert_eq!(r.snapshots_per_bot_per_s, 0.0);
        assert_eq!(r.rtt_ms, Percentiles::default());
        assert_eq!(r.bots_connected, 0);
    }
}
