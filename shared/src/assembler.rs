//! Client-side reassembly of split snapshots and the ring of complete snapshots that deltas refer to.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::delta::{MAX_PARTS, RANGE_END_ALL};
use crate::entity::EntityState;
use crate::snapshot::Snapshot;
use crate::tick::Tick;

/// Most incomplete snapshots kept at once; the oldest is dropped beyond this.
pub const MAX_PENDING: usize = 8;

/// What happened to an inserted part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assembled {
    /// More parts of this tick are still missing.
    Incomplete,
    /// The part was already held (a duplicate) or overlaps one held: ignored.
    Duplicate,
    /// The part disagrees with the others of its tick (baseline); the tick was dropped.
    Inconsistent,
    /// All parts are in: the complete snapshot and its total size in bytes.
    Complete(Snapshot, usize),
}

#[derive(Debug)]
struct Pending {
    tick: Tick,
    baseline: Option<Tick>,
    /// (range start, range end, entities of that range), unsorted.
    parts: Vec<(u32, u32, Vec<EntityState>)>,
    bytes: usize,
}

/// Collects the parts of split snapshots until each tick's index ranges tile `0..65536`.
#[derive(Debug, Default)]
pub struct SnapshotAssembler {
    /// Incomplete ticks, oldest first, at most [`MAX_PENDING`].
    pending: VecDeque<Pending>,
}

impl SnapshotAssembler {
    /// An empty assembler.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the applied entities of one part covering `start..end`.
    pub fn insert(
        &mut self,
        tick: Tick,
        baseline: Option<Tick>,
        start: u32,
        end: u32,
        entities: Vec<EntityState>,
        bytes: usize,
    ) -> Assembled {
        if start == 0 && end == RANGE_END_ALL {
            self.pending.retain(|p| p.tick != tick);
            return Assembled::Complete(Snapshot { tick, entities }, bytes);
        }
        let pos = match self.pending.iter().position(|p| p.tick == tick) {
            Some(i) => i,
            None => {
                if self.pending.len() >= MAX_PENDING {
                    self.pending.pop_front();
                }
                self.pending.push_back(Pending {
                    tick,
                    baseline,
                    parts: Vec::new(),
                    bytes: 0,
                });
                self.pending.len() - 1
            }
        };
        let Some(p) = self.pending.get_mut(pos) else {
            return Assembled::Incomplete;
        };
        if p.baseline != baseline {
            self.pending.remove(pos);
            return Assembled::Inconsistent;
        }
        if p.parts.iter().any(|(s, e, _)| start < *e && *s < end) || p.parts.len() >= MAX_PARTS {
            return Assembled::Duplicate;
        }
        p.parts.push((start, end, entities));
        p.bytes += bytes;
        p.parts.sort_by_key(|(s, _, _)| *s);
        let mut next = 0u32;
        for (s, e, _) in &p.parts {
            if *s != next {
                return Assembled::Incomplete;
            }
            next = *e;
        }
        if next != RANGE_END_ALL {
            return Assembled::Incomplete;
        }
        let Some(p) = self.pending.remove(pos) else {
            return Assembled::Incomplete;
        };
        let bytes = p.bytes;
        let entities = p.parts.into_iter().flat_map(|(_, _, e)| e).collect();
        Assembled::Complete(Snapshot { tick, entities }, bytes)
    }

    /// Forgets incomplete snapshots not newer than `tick` (they can no longer be useful).
    pub fn discard_through(&mut self, tick: Tick) {
        self.pending.retain(|p| p.tick.is_after(tick));
    }
}

/// The client's recent complete snapshots, newest last: the baselines a server delta may name.
#[derive(Debug)]
pub struct BaselineRing {
    /// Complete snapshots in increasing tick order.
    snaps: VecDeque<Arc<Snapshot>>,
    /// Most snapshots retained.
    capacity: usize,
}

impl BaselineRing {
    /// A ring keeping the newest `capacity` snapshots.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            snaps: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    /// The newest complete snapshot.
    #[must_use]
    pub fn newest(&self) -> Option<&Arc<Snapshot>> {
        self.snaps.back()
    }

    /// The snapshot of exactly `tick`.
    #[must_use]
    pub fn get(&self, tick: Tick) -> Option<&Arc<Snapshot>> {
        self.snaps.iter().rev().find(|s| s.tick == tick)
    }

    /// The newest snapshot at or before `tick`, and the oldest one after it.
    #[must_use]
    pub fn around(&self, tick: Tick) -> (Option<&Arc<Snapshot>>, Option<&Arc<Snapshot>>) {
        let mut after = None;
        for s in self.snaps.iter().rev() {
            if s.tick.is_after(tick) {
                after = Some(s);
            } else {
                return (Some(s), after);
            }
        }
        (None, after)
    }

    /// Adds a snapshot newer than every held one (older ones are refused: returns false).
    pub fn push(&mut self, snap: Arc<Snapshot>) -> bool {
        if let Some(n) = self.snaps.back() {
            if !snap.tick.is_after(n.tick) {
                return false;
            }
        }
        if self.snaps.len() >= self.capacity {
            self.snaps.pop_front();
        }
        self.snaps.push_back(snap);
        true
    }
}
