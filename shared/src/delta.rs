//! Snapshot delta codec: encode a snapshot against a baseline into self-contained datagram parts, decode
//! a part, and apply it to the baseline it names. The bit layout is specified in `docs/PROTOCOL.md`.
//!
//! A snapshot is split by entity-index range: part *k* covers indices `start..end` and carries every
//! change in that range, so each part decodes and applies alone; the parts of one tick tile `0..65536`.

use crate::bits::{BitError, BitReader, BitWriter};
use crate::entity::{EntityId, EntityKind, EntityState};
use crate::quant::{PosQuant, VEL_BITS, YAW_BITS};
use crate::snapshot::Snapshot;
use crate::tick::Tick;

/// First byte of a snapshot datagram.
pub const DATAGRAM_SNAPSHOT: u8 = 0x02;
/// Exclusive end of the whole index space (a part covering up to here is the last one).
pub const RANGE_END_ALL: u32 = 0x1_0000;
/// Oldest baseline a delta may name, in ticks before the snapshot (8-bit offset on the wire).
pub const MAX_BASELINE_AGE: u32 = 255;
/// Upper bound of header bits: tick 32, baseline offset 8, input-ack flag+32, start 16, last-flag 1,
/// end 16, count 16.
pub const HEADER_MAX_BITS: usize = 32 + 8 + 1 + 32 + 16 + 1 + 16 + 16;
/// Largest entry (a spawn with a 16-bit gap) for 20-bit coordinates, in bits.
pub const ENTRY_MAX_BITS: usize =
    19 + 2 + 16 + 2 + 20 + 20 + 2 * VEL_BITS as usize + YAW_BITS as usize + 8;
/// Most parts one snapshot may be split into (receivers refuse more).
pub const MAX_PARTS: usize = 256;

const OP_UPDATE: u32 = 0;
const OP_SPAWN: u32 = 1;
const OP_DESPAWN: u32 = 2;

const F_POS: u32 = 1;
const F_VEL: u32 = 2;
const F_YAW: u32 = 4;
const F_HEALTH: u32 = 8;

/// Why a snapshot could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// `max_datagram` cannot hold even the header plus one entry.
    #[error("datagram limit {0} B is too small for a snapshot part")]
    DatagramTooSmall(usize),
    /// The baseline is not 1..=255 ticks older than the snapshot.
    #[error("baseline is not 1..=255 ticks older than the snapshot")]
    BaselineOutOfRange,
    /// The snapshot would need more than [`MAX_PARTS`] datagrams.
    #[error("snapshot needs more than {MAX_PARTS} parts")]
    TooManyParts,
}

/// Why a received snapshot part was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a snapshot datagram.
    #[error("not a snapshot datagram")]
    WrongKind,
    /// Ended early.
    #[error("truncated snapshot part")]
    Truncated,
    /// A field holds a value the format does not allow.
    #[error("malformed snapshot part: {0}")]
    Malformed(&'static str),
}

impl From<BitError> for DecodeError {
    fn from(_: BitError) -> Self {
        DecodeError::Truncated
    }
}

/// Why a decoded part could not be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The part is a delta against a tick the receiver does not hold.
    #[error("baseline {0} is not held")]
    MissingBaseline(Tick),
    /// An update or despawn names an index the baseline does not have.
    #[error("entity {0} is not in the baseline")]
    UnknownEntity(u16),
    /// A position delta leaves the map.
    #[error("entity {0} moved out of bounds")]
    OutOfBounds(u16),
}

/// The header of one snapshot part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartHeader {
    /// Tick of the snapshot.
    pub tick: Tick,
    /// Baseline the delta is against; `None` for a keyframe.
    pub baseline: Option<Tick>,
    /// Newest tick of this client's input that the server has applied, if any.
    pub input_ack: Option<Tick>,
    /// First entity index covered by this part.
    pub range_start: u32,
    /// Exclusive end of the covered index range (≤ [`RANGE_END_ALL`]).
    pub range_end: u32,
}

/// A position change in an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PosChange {
    /// Offset from the baseline position, in quanta.
    Delta(i32, i32),
    /// Absolute quantized position.
    Abs(u32, u32),
}

/// One decoded entity operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityOp {
    /// A new entity (or a new generation in a reused slot) with its full state.
    Spawn(EntityState),
    /// Changed fields of an entity the baseline holds.
    Update {
        /// Slot index.
        index: u16,
        /// New position, if changed.
        pos: Option<PosChange>,
        /// New quantized velocity, if changed.
        vel: Option<(i32, i32)>,
        /// New yaw, if changed.
        yaw: Option<u16>,
        /// New health, if changed.
        health: Option<u8>,
    },
    /// The entity in this slot is gone.
    Despawn(u16),
}

impl EntityOp {
    /// The slot index this op concerns.
    #[must_use]
    pub fn index(&self) -> u16 {
        match self {
            EntityOp::Spawn(s) => s.id.index,
            EntityOp::Update { index, .. } | EntityOp::Despawn(index) => *index,
        }
    }
}

/// A decoded snapshot part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPart {
    /// Header fields.
    pub header: PartHeader,
    /// Operations in strictly increasing index order, all inside the header's range.
    pub ops: Vec<EntityOp>,
}

/// What one call to [`SnapshotEncoder::encode`] produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Datagrams written.
    pub parts: usize,
    /// Total bytes over all parts.
    pub bytes: usize,
    /// Entities spawned, updated or despawned.
    pub changed: usize,
    /// True when no baseline was used.
    pub keyframe: bool,
}

/// Reusable snapshot encoder (keeps its scratch buffers between calls).
#[derive(Debug, Default)]
pub struct SnapshotEncoder {
    /// Body of the part being filled.
    body: BitWriter,
    /// One entry, encoded before it is known to fit.
    entry: BitWriter,
}

enum Change<'a> {
    Spawn(&'a EntityState),
    Update(&'a EntityState, &'a EntityState),
    Despawn(u16),
}

impl Change<'_> {
    fn index(&self) -> u16 {
        match self {
            Change::Spawn(n) | Change::Update(_, n) => n.id.index,
            Change::Despawn(i) => *i,
        }
    }
}

impl SnapshotEncoder {
    /// A new encoder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `new` against `baseline` (a keyframe when `None`) into datagrams of at most
    /// `max_datagram` bytes each, appended to `out`.
    pub fn encode(
        &mut self,
        quant: &PosQuant,
        new: &Snapshot,
        baseline: Option<&Snapshot>,
        input_ack: Option<Tick>,
        max_datagram: usize,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<EncodeStats, EncodeError> {
        let header_bits = HEADER_MAX_BITS + 8;
        let budget_bits = max_datagram.saturating_mul(8).saturating_sub(header_bits);
        if budget_bits < ENTRY_MAX_BITS {
            return Err(EncodeError::DatagramTooSmall(max_datagram));
        }
        if let Some(b) = baseline {
            let age = new.tick.diff(b.tick);
            if age < 1 || age as u32 > MAX_BASELINE_AGE {
                return Err(EncodeError::BaselineOutOfRange);
            }
        }
        let first_out = out.len();
        let mut stats = EncodeStats {
            keyframe: baseline.is_none(),
            ..EncodeStats::default()
        };
        let mut part = PartState {
            start: 0,
            prev: -1,
            count: 0,
        };
        self.body.clear();

        let empty: &[EntityState] = &[];
        let base = baseline.map_or(empty, |b| b.entities.as_slice());
        let (mut bi, mut ni) = (0usize, 0usize);
        loop {
            let change = match (base.get(bi), new.entities.get(ni)) {
                (None, None) => break,
                (Some(b), None) => {
                    bi += 1;
                    Change::Despawn(b.id.index)
                }
                (None, Some(n)) => {
                    ni += 1;
                    Change::Spawn(n)
                }
                (Some(b), Some(n)) => {
                    if b.id.index < n.id.index {
                        bi += 1;
                        Change::Despawn(b.id.index)
                    } else if n.id.index < b.id.index {
                        ni += 1;
                        Change::Spawn(n)
                    } else {
                        bi += 1;
                        ni += 1;
                        if b.id.generation != n.id.generation || b.kind != n.kind {
                            Change::Spawn(n)
                        } else if b == n {
                            continue;
                        } else {
                            Change::Update(b, n)
                        }
                    }
                }
            };
            let index = change.index();
            self.entry.clear();
            write_entry(
                &mut self.entry,
                quant,
                index as i32 - part.prev - 1,
                &change,
            );
            if part.count > 0
                && (self.body.bit_len() + self.entry.bit_len() > budget_bits
                    || part.count == u16::MAX as usize)
            {
                if out.len() - first_out + 1 >= MAX_PARTS {
                    out.truncate(first_out);
                    return Err(EncodeError::TooManyParts);
                }
                let end = u32::from(index);
                stats.bytes += self.flush(new.tick, baseline, input_ack, &part, end, out);
                part = PartState {
                    start: end,
                    prev: i32::from(index) - 1,
                    count: 0,
                };
                self.entry.clear();
                write_entry(&mut self.entry, quant, 0, &change);
            }
            self.body.append(&self.entry);
            part.count += 1;
            part.prev = i32::from(index);
            stats.changed += 1;
        }
        stats.bytes += self.flush(new.tick, baseline, input_ack, &part, RANGE_END_ALL, out);
        stats.parts = out.len() - first_out;
        Ok(stats)
    }

    fn flush(
        &mut self,
        tick: Tick,
        baseline: Option<&Snapshot>,
        input_ack: Option<Tick>,
        part: &PartState,
        end: u32,
        out: &mut Vec<Vec<u8>>,
    ) -> usize {
        let mut h = BitWriter::with_capacity(16 + self.body.byte_len());
        h.write(tick.0, 32);
        h.write(baseline.map_or(0, |b| tick.diff(b.tick) as u32), 8);
        match input_ack {
            Some(t) => {
                h.write_bool(true);
                h.write(t.0, 32);
            }
            None => h.write_bool(false),
        }
        h.write(part.start, 16);
        if end == RANGE_END_ALL {
            h.write_bool(true);
        } else {
            h.write_bool(false);
            h.write(end, 16);
        }
        h.write(part.count as u32, 16);
        h.append(&self.body);
        let mut bytes = Vec::with_capacity(1 + h.byte_len());
        bytes.push(DATAGRAM_SNAPSHOT);
        h.finish_into(&mut bytes);
        self.body.clear();
        let n = bytes.len();
        out.push(bytes);
        n
    }
}

struct PartState {
    start: u32,
    prev: i32,
    count: usize,
}

fn write_gap(w: &mut BitWriter, gap: i32) {
    let g = gap.max(0) as u32;
    if g == 0 {
        w.write(0b0, 1);
    } else if g <= 16 {
        w.write(0b01, 2);
        w.write(g - 1, 4);
    } else if g <= 272 {
        w.write(0b011, 3);
        w.write(g - 17, 8);
    } else {
        w.write(0b111, 3);
        w.write(g, 16);
    }
}

fn read_gap(r: &mut BitReader<'_>) -> Result<u32, BitError> {
    if !r.read_bool()? {
        return Ok(0);
    }
    if !r.read_bool()? {
        return Ok(r.read(4)? + 1);
    }
    if !r.read_bool()? {
        return Ok(r.read(8)? + 17);
    }
    r.read(16)
}

fn write_full(w: &mut BitWriter, quant: &PosQuant, n: &EntityState) {
    w.write(u32::from(n.id.generation), 16);
    w.write(n.kind.to_bits(), 2);
    w.write(n.qx, quant.bits_x);
    w.write(n.qy, quant.bits_y);
    w.write_signed(n.qvx, VEL_BITS);
    w.write_signed(n.qvy, VEL_BITS);
    w.write(u32::from(n.yaw), YAW_BITS);
    w.write(u32::from(n.health), 8);
}

fn write_entry(w: &mut BitWriter, quant: &PosQuant, gap: i32, change: &Change<'_>) {
    write_gap(w, gap);
    match change {
        Change::Spawn(n) => {
            w.write(OP_SPAWN, 2);
            write_full(w, quant, n);
        }
        Change::Despawn(_) => w.write(OP_DESPAWN, 2),
        Change::Update(b, n) => {
            w.write(OP_UPDATE, 2);
            let pos = b.qx != n.qx || b.qy != n.qy;
            let vel = b.qvx != n.qvx || b.qvy != n.qvy;
            let mask = u32::from(pos) * F_POS
                + u32::from(vel) * F_VEL
                + u32::from(b.yaw != n.yaw) * F_YAW
                + u32::from(b.health != n.health) * F_HEALTH;
            w.write(mask, 4);
            if pos {
                let dx = n.qx as i64 - b.qx as i64;
                let dy = n.qy as i64 - b.qy as i64;
                if (-128..=127).contains(&dx) && (-128..=127).contains(&dy) {
                    w.write_bool(true);
                    w.write_signed(dx as i32, 8);
                    w.write_signed(dy as i32, 8);
                } else {
                    w.write_bool(false);
                    w.write(n.qx, quant.bits_x);
                    w.write(n.qy, quant.bits_y);
                }
            }
            if vel {
                w.write_signed(n.qvx, VEL_BITS);
                w.write_signed(n.qvy, VEL_BITS);
            }
            if mask & F_YAW != 0 {
                w.write(u32::from(n.yaw), YAW_BITS);
            }
            if mask & F_HEALTH != 0 {
                w.write(u32::from(n.health), 8);
            }
        }
    }
}

/// Decodes one snapshot datagram (including its kind byte). Never panics on any input.
pub fn decode_part(bytes: &[u8], quant: &PosQuant) -> Result<SnapshotPart, DecodeError> {
    let (&kind, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
    if kind != DATAGRAM_SNAPSHOT {
        return Err(DecodeError::WrongKind);
    }
    let mut r = BitReader::new(rest);
    let tick = Tick(r.read(32)?);
    let offset = r.read(8)?;
    let baseline = (offset != 0).then(|| tick.sub(offset));
    let input_ack = if r.read_bool()? {
        Some(Tick(r.read(32)?))
    } else {
        None
    };
    let range_start = r.read(16)?;
    let range_end = if r.read_bool()? {
        RANGE_END_ALL
    } else {
        r.read(16)?
    };
    if range_end <= range_start {
        return Err(DecodeError::Malformed("empty index range"));
    }
    let count = r.read(16)? as usize;
    if count > (range_end - range_start) as usize {
        return Err(DecodeError::Malformed("more entries than indices"));
    }
    // Every entry takes at least 3 bits: refuse counts the payload cannot hold before allocating.
    if count * 3 > r.remaining_bits() {
        return Err(DecodeError::Truncated);
    }
    let mut ops = Vec::with_capacity(count);
    let mut prev = i64::from(range_start) - 1;
    for _ in 0..count {
        let index = prev + 1 + i64::from(read_gap(&mut r)?);
        if index >= i64::from(range_end) {
            return Err(DecodeError::Malformed(
                "entity index outside the part's range",
            ));
        }
        prev = index;
        let index = index as u16;
        let op = match r.read(2)? {
            OP_SPAWN => {
                let generation = r.read(16)? as u16;
                let kind = EntityKind::from_bits(r.read(2)?)
                    .ok_or(DecodeError::Malformed("entity kind"))?;
                let qx = r.read(quant.bits_x)?;
                let qy = r.read(quant.bits_y)?;
                if qx > quant.max_qx || qy > quant.max_qy {
                    return Err(DecodeError::Malformed("position out of bounds"));
                }
                EntityOp::Spawn(EntityState {
                    id: EntityId { index, generation },
                    kind,
                    qx,
                    qy,
                    qvx: r.read_signed(VEL_BITS)?,
                    qvy: r.read_signed(VEL_BITS)?,
                    yaw: r.read(YAW_BITS)? as u16,
                    health: r.read(8)? as u8,
                })
            }
            OP_DESPAWN => EntityOp::Despawn(index),
            OP_UPDATE => {
                let mask = r.read(4)?;
                if mask == 0 {
                    return Err(DecodeError::Malformed("update with no changed field"));
                }
                let pos = if mask & F_POS != 0 {
                    Some(if r.read_bool()? {
                        PosChange::Delta(r.read_signed(8)?, r.read_signed(8)?)
                    } else {
                        let qx = r.read(quant.bits_x)?;
                        let qy = r.read(quant.bits_y)?;
                        if qx > quant.max_qx || qy > quant.max_qy {
                            return Err(DecodeError::Malformed("position out of bounds"));
                        }
                        PosChange::Abs(qx, qy)
                    })
                } else {
                    None
                };
                let vel = if mask & F_VEL != 0 {
                    Some((r.read_signed(VEL_BITS)?, r.read_signed(VEL_BITS)?))
                } else {
                    None
                };
                let yaw = if mask & F_YAW != 0 {
                    Some(r.read(YAW_BITS)? as u16)
                } else {
                    None
                };
                let health = if mask & F_HEALTH != 0 {
                    Some(r.read(8)? as u8)
                } else {
                    None
                };
                EntityOp::Update {
                    index,
                    pos,
                    vel,
                    yaw,
                    health,
                }
            }
            _ => return Err(DecodeError::Malformed("reserved entity op")),
        };
        ops.push(op);
    }
    if r.remaining_bits() >= 8 {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(SnapshotPart {
        header: PartHeader {
            tick,
            baseline,
            input_ack,
            range_start,
            range_end,
        },
        ops,
    })
}

/// Applies a decoded part to its baseline, returning the entities of the part's index range at the
/// part's tick. `baseline` must be the snapshot the header names (ignored for keyframes).
pub fn apply_part(
    baseline: Option<&Snapshot>,
    part: &SnapshotPart,
    quant: &PosQuant,
) -> Result<Vec<EntityState>, ApplyError> {
    let h = &part.header;
    let base: &[EntityState] = match h.baseline {
        None => &[],
        Some(t) => match baseline {
            Some(b) if b.tick == t => b.range(h.range_start, h.range_end),
            _ => return Err(ApplyError::MissingBaseline(t)),
        },
    };
    let mut out = Vec::with_capacity(base.len() + part.ops.len());
    let mut bi = 0usize;
    for op in &part.ops {
        let index = op.index();
        while let Some(b) = base.get(bi).filter(|b| b.id.index < index) {
            out.push(*b);
            bi += 1;
        }
        let held = base.get(bi).filter(|b| b.id.index == index);
        if held.is_some() {
            bi += 1;
        }
        match (op, held) {
            (EntityOp::Spawn(s), _) => out.push(*s),
            (EntityOp::Despawn(_), Some(_)) => {}
            (
                EntityOp::Update {
                    pos,
                    vel,
                    yaw,
                    health,
                    ..
                },
                Some(b),
            ) => {
                let mut e = *b;
                match pos {
                    Some(PosChange::Abs(x, y)) => (e.qx, e.qy) = (*x, *y),
                    Some(PosChange::Delta(dx, dy)) => {
                        let x = e.qx.checked_add_signed(*dx).filter(|x| *x <= quant.max_qx);
                        let y = e.qy.checked_add_signed(*dy).filter(|y| *y <= quant.max_qy);
                        match (x, y) {
                            (Some(x), Some(y)) => (e.qx, e.qy) = (x, y),
                            _ => return Err(ApplyError::OutOfBounds(index)),
                        }
                    }
                    None => {}
                }
                if let Some((vx, vy)) = vel {
                    (e.qvx, e.qvy) = (*vx, *vy);
                }
                if let Some(y) = yaw {
                    e.yaw = *y;
                }
                if let Some(hp) = health {
                    e.health = *hp;
                }
                out.push(e);
            }
            (_, None) => return Err(ApplyError::UnknownEntity(index)),
        }
    }
    out.extend_from_slice(base.get(bi..).unwrap_or(&[]));
    Ok(out)
}
