//! The server's per-client session state: snapshot acknowledgement, the history of the views sent to
//! this client (the baselines its deltas refer to), and the client's input buffer. No I/O: the server
//! shell feeds datagrams in and asks what to send.
//!
//! Each client gets its own *view* per tick (interest management and the bandwidth budget decide
//! which entities and which changes it holds), so baselines are per client: the view sent at the
//! acknowledged tick, kept in a bounded ring.

use std::sync::Arc;

use crate::delta::{Codec, EncodeError, EncodeStats, SnapshotEncoder, MAX_BASELINE_AGE};
use crate::entity::EntityId;
use crate::input::InputBuffer;
use crate::snapshot::{Snapshot, SnapshotHistory};
use crate::tick::Tick;
use crate::wire::InputDatagram;

/// A client keeps at least this many complete snapshots (the newest 255), so a view fewer than this
/// many snapshots old is still held by it.
pub const CLIENT_HELD: u32 = 255;

/// Per-session counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Input datagrams accepted.
    pub input_datagrams: u64,
    /// Bytes of those datagrams.
    pub input_bytes: u64,
    /// Acks that moved the baseline forward.
    pub acks_accepted: u64,
    /// Acks for ticks never sent, or older than the current baseline.
    pub acks_ignored: u64,
    /// Snapshots sent as keyframes.
    pub keyframes_sent: u64,
    /// Snapshots sent as deltas.
    pub deltas_sent: u64,
    /// Snapshot bytes sent.
    pub snapshot_bytes: u64,
    /// Snapshot datagrams (parts) sent.
    pub snapshot_parts: u64,
    /// Stream bytes queued to this client (frames).
    pub stream_bytes: u64,
}

/// The server side of one client.
#[derive(Debug, Clone)]
pub struct ServerSession {
    /// Lobby player id.
    pub player_id: u32,
    /// The avatar this client drives.
    pub avatar: EntityId,
    /// Newest snapshot tick the client has acknowledged (`None`: no ack yet — never tick 0).
    acked: Option<Tick>,
    /// The view sent at `acked`, kept even after the ring evicts it (a resume continues from it).
    acked_view: Option<Arc<Snapshot>>,
    /// After a resume: the acked view may be older than the usual age limit until the next ack.
    resume_baseline: bool,
    /// Snapshots sent since the last accepted ack (or since the start).
    sent_since_ack: u32,
    /// Newest snapshot tick sent to this client.
    last_sent: Option<Tick>,
    /// The views sent to this client, by tick: the only baselines its deltas may use.
    sent: SnapshotHistory,
    /// Buffered inputs.
    pub inputs: InputBuffer,
    /// Counters.
    pub counters: SessionCounters,
}

impl ServerSession {
    /// A new session whose first simulated input tick is `next_tick`, keeping `history` sent views.
    #[must_use]
    pub fn new(player_id: u32, avatar: EntityId, next_tick: Tick, history: usize) -> Self {
        Self {
            player_id,
            avatar,
            acked: None,
            acked_view: None,
            resume_baseline: false,
            sent_since_ack: 0,
            last_sent: None,
            sent: SnapshotHistory::new(history),
            inputs: InputBuffer::new(next_tick),
            counters: SessionCounters::default(),
        }
    }

    /// Takes in a decoded, validated input datagram of `bytes` bytes.
    pub fn handle_input(&mut self, d: &InputDatagram, bytes: usize) {
        self.counters.input_datagrams += 1;
        self.counters.input_bytes += bytes as u64;
        if let Some(ack) = d.snapshot_ack {
            let sent = self.last_sent.is_some_and(|s| !ack.is_after(s));
            let newer = self.acked.is_none_or(|a| ack.is_after(a));
            if sent && newer {
                if let Some(v) = self.sent.get(ack) {
                    self.acked = Some(ack);
                    self.acked_view = Some(v.clone());
                    self.resume_baseline = false;
                    self.sent_since_ack = 0;
                }
                self.counters.acks_accepted += 1;
            } else {
                self.counters.acks_ignored += 1;
            }
        }
        for c in &d.inputs {
            self.inputs.insert(*c);
        }
    }

    /// The newest acknowledged tick.
    #[must_use]
    pub fn acked(&self) -> Option<Tick> {
        self.acked
    }

    /// The baseline for the snapshot of `tick`: the view sent at the acked tick, when it is not
    /// older than `max_age` ticks, or — older — while the client must still hold it: fewer than
    /// [`CLIENT_HELD`] snapshots were sent after it (a client keeps its last 255 complete ones), or
    /// right after a resume chose it. Otherwise `None` (send a keyframe).
    #[must_use]
    pub fn baseline(&self, tick: Tick, max_age: u32) -> Option<Arc<Snapshot>> {
        let a = self.acked?;
        let age = tick.diff(a);
        if age < 1 || age as u32 > MAX_BASELINE_AGE {
            return None;
        }
        let held = self.resume_baseline || self.sent_since_ack < CLIENT_HELD;
        if age as u32 > max_age && !held {
            return None;
        }
        self.sent
            .get(a)
            .or(self.acked_view.as_ref().filter(|v| v.tick == a))
            .cloned()
    }

    /// Continues this session on a new connection whose client holds snapshots up to `held` (the
    /// newest complete one; it keeps at least the 255 before it), with inputs starting at
    /// `next_tick`. Picks the baseline for the next delta: the view sent at `held` if still kept,
    /// else the acked view when the client must still hold it (fewer than 255 ticks older than
    /// `held`). Returns it, or `None` when the next snapshot must be a keyframe.
    pub fn resume(&mut self, held: Option<Tick>, next_tick: Tick) -> Option<Tick> {
        let counters = self.inputs.counters;
        self.inputs = InputBuffer::new(next_tick);
        self.inputs.counters = counters;
        let chosen = held.and_then(|h| {
            if let Some(v) = self.sent.get(h) {
                return Some(v.clone());
            }
            let v = self.acked_view.as_ref()?;
            let behind = h.diff(v.tick);
            (0..255).contains(&behind).then(|| v.clone())
        });
        match chosen {
            Some(v) => {
                self.acked = Some(v.tick);
                self.acked_view = Some(v);
                self.resume_baseline = true;
                self.sent_since_ack = 0;
            }
            None => {
                self.acked = None;
                self.acked_view = None;
                self.resume_baseline = false;
            }
        }
        self.acked
    }

    /// The view sent to this client at `tick`, if still kept.
    #[must_use]
    pub fn sent_view(&self, tick: Tick) -> Option<&Arc<Snapshot>> {
        self.sent.get(tick)
    }

    /// Snapshots sent since the client's last accepted ack: a client that stopped acknowledging
    /// (dead path, blackout) is sent fewer snapshots by the server.
    #[must_use]
    pub fn sent_since_ack(&self) -> u32 {
        self.sent_since_ack
    }

    /// Records the view sent for its tick and what it cost.
    pub fn record_sent(&mut self, view: Arc<Snapshot>, stats: &EncodeStats) {
        self.sent_since_ack = self.sent_since_ack.saturating_add(1);
        self.last_sent = Some(view.tick);
        self.sent.push(view);
        if stats.keyframe {
            self.counters.keyframes_sent += 1;
        } else {
            self.counters.deltas_sent += 1;
        }
        self.counters.snapshot_bytes += stats.bytes as u64;
        self.counters.snapshot_parts += stats.parts as u64;
    }

    /// Encodes the whole of `snap` for this client (no interest management, no budget): a delta
    /// against its acked view when usable, else a keyframe, into datagrams of at most
    /// `max_datagram` bytes appended to `out`; records it as sent.
    pub fn encode_snapshot(
        &mut self,
        snap: &Arc<Snapshot>,
        encoder: &mut SnapshotEncoder,
        codec: &Codec,
        max_datagram: usize,
        max_age: u32,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<EncodeStats, EncodeError> {
        let baseline = self.baseline(snap.tick, max_age);
        let input_ack = self.inputs.newest_received();
        let stats = encoder.encode(
            codec,
            snap,
            baseline.as_deref(),
            input_ack,
            max_datagram,
            out,
        )?;
        self.record_sent(snap.clone(), &stats);
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_only_move_forward_and_only_to_sent_ticks() {
        let mut s = ServerSession::new(
            1,
            EntityId {
                index: 0,
                generation: 1,
            },
            Tick(0),
            8,
        );
        let ack = |t: u32| InputDatagram {
            snapshot_ack: Some(Tick(t)),
            inputs: vec![],
        };
        s.handle_input(&ack(5), 10);
        assert_eq!(s.acked(), None, "never sent: ignored");
        for t in 1..=10 {
            s.record_sent(
                Arc::new(Snapshot {
                    tick: Tick(t),
                    entities: vec![],
                }),
                &EncodeStats::default(),
            );
        }
        s.handle_input(&ack(7), 10);
        s.handle_input(&ack(6), 10);
        s.handle_input(&ack(11), 10);
        assert_eq!(s.acked(), Some(Tick(7)));
        assert_eq!(s.counters.acks_ignored, 3);
        assert_eq!(s.baseline(Tick(12), 255).map(|b| b.tick), Some(Tick(7)));
        assert_eq!(
            s.baseline(Tick(12), 4).map(|b| b.tick),
            Some(Tick(7)),
            "older than max_age, but the client still holds it (3 snapshots after it)"
        );
        for t in 11..=20 {
            s.record_sent(
                Arc::new(Snapshot {
                    tick: Tick(t),
                    entities: vec![],
                }),
                &EncodeStats::default(),
            );
        }
        assert_eq!(
            s.baseline(Tick(21), 255).map(|b| b.tick),
            Some(Tick(7)),
            "evicted from the 8-tick ring, but the acked view is kept"
        );
        assert_eq!(
            s.baseline(Tick(21), 10).map(|b| b.tick),
            Some(Tick(7)),
            "older than max_age, but only 10 snapshots were sent after it: the client holds it"
        );
        sent(&mut s, 21..=270);
        assert_eq!(s.sent_since_ack(), 260);
        assert!(
            s.baseline(Tick(271), 64).is_none(),
            "255+ snapshots after it: the client may have dropped it: keyframe"
        );
    }

    fn sent(s: &mut ServerSession, range: std::ops::RangeInclusive<u32>) {
        for t in range {
            s.record_sent(
                Arc::new(Snapshot {
                    tick: Tick(t),
                    entities: vec![],
                }),
                &EncodeStats::default(),
            );
        }
    }

    #[test]
    fn resume_continues_from_a_baseline_the_client_still_holds() {
        let av = EntityId {
            index: 0,
            generation: 1,
        };
        let mut s = ServerSession::new(1, av, Tick(0), 8);
        sent(&mut s, 1..=10);
        s.handle_input(
            &InputDatagram {
                snapshot_ack: Some(Tick(8)),
                inputs: vec![],
            },
            10,
        );
        // The client holds 10 (its ack was lost): still in the ring → that exact view.
        assert_eq!(s.resume(Some(Tick(10)), Tick(11)), Some(Tick(10)));
        // Much later (the ring rolled over while the server sent into the void): the acked view,
        // even far older than the usual age limit, because the client is < 255 ticks past it.
        let mut s2 = ServerSession::new(1, av, Tick(0), 8);
        sent(&mut s2, 1..=10);
        s2.handle_input(
            &InputDatagram {
                snapshot_ack: Some(Tick(8)),
                inputs: vec![],
            },
            10,
        );
        sent(&mut s2, 11..=600);
        assert_eq!(s2.resume(Some(Tick(9)), Tick(601)), Some(Tick(8)));
        assert_eq!(
            s2.baseline(Tick(601), 64).map(|b| b.tick),
            Some(Tick(8)),
            "age 593 allowed after a resume"
        );
        assert_eq!(s2.inputs.next_tick(), Tick(601));
        // A client that saw 255 or more ticks past the acked view may have dropped it: keyframe.
        let mut s3 = ServerSession::new(1, av, Tick(0), 8);
        sent(&mut s3, 1..=10);
        s3.handle_input(
            &InputDatagram {
                snapshot_ack: Some(Tick(2)),
                inputs: vec![],
            },
            10,
        );
        sent(&mut s3, 11..=400);
        assert_eq!(s3.resume(Some(Tick(300)), Tick(401)), None);
        assert!(s3.baseline(Tick(401), 64).is_none());
        assert_eq!(s.resume(None, Tick(11)), None, "nothing held: keyframe");
    }
}
