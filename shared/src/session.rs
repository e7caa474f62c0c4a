//! The server's per-client session state: snapshot acknowledgement (which baseline to delta against)
//! and the client's input buffer. No I/O: the server shell feeds datagrams in and asks what to send.

use std::sync::Arc;

use crate::delta::{Codec, EncodeError, EncodeStats, SnapshotEncoder};
use crate::entity::EntityId;
use crate::input::InputBuffer;
use crate::snapshot::{Snapshot, SnapshotHistory};
use crate::tick::Tick;
use crate::wire::InputDatagram;

/// Per-session counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionCounters {
    /// Input datagrams accepted.
    pub input_datagrams: u64,
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
    /// Newest snapshot tick sent to this client.
    last_sent: Option<Tick>,
    /// Buffered inputs.
    pub inputs: InputBuffer,
    /// Counters.
    pub counters: SessionCounters,
}

impl ServerSession {
    /// A new session whose first simulated input tick is `next_tick`.
    #[must_use]
    pub fn new(player_id: u32, avatar: EntityId, next_tick: Tick) -> Self {
        Self {
            player_id,
            avatar,
            acked: None,
            last_sent: None,
            inputs: InputBuffer::new(next_tick),
            counters: SessionCounters::default(),
        }
    }

    /// Takes in a decoded, validated input datagram.
    pub fn handle_input(&mut self, d: &InputDatagram) {
        self.counters.input_datagrams += 1;
        if let Some(ack) = d.snapshot_ack {
            let sent = self.last_sent.is_some_and(|s| !ack.is_after(s));
            let newer = self.acked.is_none_or(|a| ack.is_after(a));
            if sent && newer {
                self.acked = Some(ack);
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

    /// The baseline to encode tick `tick` against: the acked snapshot when it is still in `history`
    /// and not older than `max_age` ticks; otherwise `None` (send a keyframe).
    #[must_use]
    pub fn baseline_for(
        &self,
        tick: Tick,
        history: &SnapshotHistory,
        max_age: u32,
    ) -> Option<Tick> {
        let a = self.acked?;
        let age = tick.diff(a);
        (age >= 1 && age as u32 <= max_age && history.get(a).is_some()).then_some(a)
    }

    /// Encodes `snap` for this client — a delta against its acked baseline when usable, else a
    /// keyframe — into datagrams of at most `max_datagram` bytes appended to `out`, and records it
    /// as sent. `snap` must already be in `history`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_snapshot(
        &mut self,
        snap: &Arc<Snapshot>,
        history: &SnapshotHistory,
        encoder: &mut SnapshotEncoder,
        codec: &Codec,
        max_datagram: usize,
        max_age: u32,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<EncodeStats, EncodeError> {
        let baseline = self
            .baseline_for(snap.tick, history, max_age)
            .and_then(|t| history.get(t));
        let input_ack = self.inputs.newest_received();
        let stats = encoder.encode(
            codec,
            snap,
            baseline.map(|b| b.as_ref()),
            input_ack,
            max_datagram,
            out,
        )?;
        self.on_sent(snap.tick, stats.keyframe, stats.bytes, stats.parts);
        Ok(stats)
    }

    /// Records that the snapshot of `tick` was sent.
    pub fn on_sent(&mut self, tick: Tick, keyframe: bool, bytes: usize, parts: usize) {
        self.last_sent = Some(tick);
        if keyframe {
            self.counters.keyframes_sent += 1;
        } else {
            self.counters.deltas_sent += 1;
        }
        self.counters.snapshot_bytes += bytes as u64;
        self.counters.snapshot_parts += parts as u64;
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
        );
        let ack = |t: u32| InputDatagram {
            snapshot_ack: Some(Tick(t)),
            inputs: vec![],
        };
        s.handle_input(&ack(5));
        assert_eq!(s.acked(), None, "never sent: ignored");
        for t in 1..=10 {
            s.on_sent(Tick(t), false, 10, 1);
        }
        s.handle_input(&ack(7));
        s.handle_input(&ack(6));
        s.handle_input(&ack(11));
        assert_eq!(s.acked(), Some(Tick(7)));
        assert_eq!(s.counters.acks_ignored, 3);
        let mut h = SnapshotHistory::new(8);
        for t in 3..=12 {
            h.push(Arc::new(Snapshot {
                tick: Tick(t),
                entities: vec![],
            }));
        }
        assert_eq!(s.baseline_for(Tick(12), &h, 255), Some(Tick(7)));
        assert_eq!(s.baseline_for(Tick(12), &h, 4), None, "too old for max_age");
        let mut h2 = SnapshotHistory::new(4);
        h2.push(Arc::new(Snapshot {
            tick: Tick(12),
            entities: vec![],
        }));
        assert_eq!(
            s.baseline_for(Tick(12), &h2, 255),
            None,
            "evicted from history: keyframe"
        );
    }
}
