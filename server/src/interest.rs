//! Interest management: a uniform spatial grid over the quantized world, rebuilt once per tick in
//! O(entities), queried per client in O(entities near it). Which entities a client should hold is
//! decided here; what of them fits its budget is [`crate::replicate`]'s job.

use quicktick_shared::entity::EntityState;
use quicktick_shared::snapshot::Snapshot;

/// Interest settings, in world units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InterestConfig {
    /// An entity closer than this to a client's avatar enters its view.
    pub radius: f32,
    /// An entity already in the view leaves it only beyond `radius + hysteresis`.
    pub hysteresis: f32,
}

/// Entities bucketed by grid cell. Cells hold positions into the snapshot's entity vector.
#[derive(Debug, Default)]
pub struct Grid {
    /// Cell edge in position quanta.
    cell_q: u32,
    /// Columns and rows.
    cols: u32,
    rows: u32,
    /// `cells[row * cols + col]`: positions into `Snapshot::entities`.
    cells: Vec<Vec<u32>>,
}

impl Grid {
    /// Rebuilds the grid for `snap` with cells of `cell_q` quanta (the interest radius is a good
    /// size) over a world of `max_qx × max_qy` quanta.
    pub fn rebuild(&mut self, snap: &Snapshot, cell_q: u32, max_qx: u32, max_qy: u32) {
        let cell_q = cell_q.max(64);
        let cols = max_qx / cell_q + 1;
        let rows = max_qy / cell_q + 1;
        if (cols, rows, cell_q) != (self.cols, self.rows, self.cell_q) {
            self.cells = vec![Vec::new(); (cols * rows) as usize];
            (self.cols, self.rows, self.cell_q) = (cols, rows, cell_q);
        } else {
            for c in &mut self.cells {
                c.clear();
            }
        }
        for (i, e) in snap.entities.iter().enumerate() {
            let col = (e.qx / cell_q).min(cols - 1);
            let row = (e.qy / cell_q).min(rows - 1);
            if let Some(c) = self.cells.get_mut((row * cols + col) as usize) {
                c.push(i as u32);
            }
        }
    }

    /// Appends the positions (into the snapshot used for [`Grid::rebuild`]) of every entity in a
    /// cell overlapping the square of half-side `r_q` quanta around `(qx, qy)`.
    pub fn query(&self, qx: u32, qy: u32, r_q: u32, out: &mut Vec<u32>) {
        if self.cells.is_empty() {
            return;
        }
        let c0 = qx.saturating_sub(r_q) / self.cell_q;
        let c1 = (qx.saturating_add(r_q) / self.cell_q).min(self.cols - 1);
        let r0 = qy.saturating_sub(r_q) / self.cell_q;
        let r1 = (qy.saturating_add(r_q) / self.cell_q).min(self.rows - 1);
        for row in r0..=r1 {
            for col in c0..=c1 {
                if let Some(c) = self.cells.get((row * self.cols + col) as usize) {
                    out.extend_from_slice(c);
                }
            }
        }
    }
}

/// Squared distance between two entities in quanta².
#[must_use]
pub fn dist2(a: &EntityState, qx: u32, qy: u32) -> u64 {
    let dx = i64::from(a.qx) - i64::from(qx);
    let dy = i64::from(a.qy) - i64::from(qy);
    (dx * dx + dy * dy) as u64
}
