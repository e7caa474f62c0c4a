//! Snapshots (the quantized world at one tick) and the server's bounded history of them.

use std::sync::Arc;

use crate::entity::EntityState;
use crate::tick::Tick;

/// The quantized state of every replicated entity at one tick, sorted by slot index (unique).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The tick this state is the result of.
    pub tick: Tick,
    /// Entities sorted by `id.index`, one per index.
    pub entities: Vec<EntityState>,
}

impl Snapshot {
    /// The entity in slot `index`, if any.
    #[must_use]
    pub fn get(&self, index: u16) -> Option<&EntityState> {
        self.entities
            .binary_search_by_key(&index, |e| e.id.index)
            .ok()
            .and_then(|i| self.entities.get(i))
    }

    /// The entities whose index lies in `start..end` (`end` may be 65536).
    #[must_use]
    pub fn range(&self, start: u32, end: u32) -> &[EntityState] {
        let lo = self
            .entities
            .partition_point(|e| u32::from(e.id.index) < start);
        let hi = self
            .entities
            .partition_point(|e| u32::from(e.id.index) < end);
        self.entities.get(lo..hi).unwrap_or(&[])
    }

    /// True when entities are sorted by index with no duplicates (an invariant of every snapshot).
    #[must_use]
    pub fn is_well_formed(&self) -> bool {
        self.entities
            .windows(2)
            .all(|w| matches!(w, [a, b] if a.id.index < b.id.index))
    }
}

/// A fixed-capacity ring of recent snapshots, indexed by tick. Old entries are overwritten, so memory
/// is bounded by `capacity` snapshots whatever the clients do.
#[derive(Debug, Clone)]
pub struct SnapshotHistory {
    /// Slot `tick % capacity` holds the snapshot of that tick, if still retained.
    slots: Vec<Option<Arc<Snapshot>>>,
}

impl SnapshotHistory {
    /// A history holding the last `capacity` ticks (at least 2).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: vec![None; capacity.max(2)],
        }
    }

    /// How many ticks are retained.
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn slot(&self, tick: Tick) -> usize {
        tick.0 as usize % self.slots.len()
    }

    /// Stores a snapshot, evicting whatever was `capacity` ticks older.
    pub fn push(&mut self, snap: Arc<Snapshot>) {
        let i = self.slot(snap.tick);
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some(snap);
        }
    }

    /// The snapshot of exactly `tick`, if retained.
    #[must_use]
    pub fn get(&self, tick: Tick) -> Option<&Arc<Snapshot>> {
        self.slots
            .get(self.slot(tick))
            .and_then(|s| s.as_ref())
            .filter(|s| s.tick == tick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_and_exact() {
        let mut h = SnapshotHistory::new(4);
        for t in 0..10u32 {
            h.push(Arc::new(Snapshot {
                tick: Tick(u32::MAX - 3).add(t),
                entities: vec![],
            }));
        }
        let newest = Tick(u32::MAX - 3).add(9);
        assert!(h.get(newest).is_some());
        assert!(h.get(newest.sub(3)).is_some());
        assert!(h.get(newest.sub(4)).is_none());
    }
}
