//! Snapshot delta codec: encode a list of entity changes against a baseline into self-contained
//! datagram parts, decode a part, and apply it to the baseline it names. The bit layout is specified
//! in `docs/PROTOCOL.md` §5.
//!
//! A snapshot is split by entity-index range: part *k* covers indices `start..end` and carries every
//! change in that range, so each part decodes and applies alone; the parts of one tick tile `0..65536`.
//! Positions are coded as residuals from a prediction (baseline position + baseline velocity × age),
//! velocities and yaw as residuals from the baseline; indices as gap codes or a bitmap, whichever is
//! smaller for that part. An entity unchanged against the baseline costs nothing but its index gap.

use crate::bits::{BitError, BitReader, BitWriter};
use crate::entity::{EntityId, EntityKind, EntityState};
use crate::quant::{PosQuant, POS_QUANTUM, VEL_BITS, VEL_QUANTUM, YAW_BITS};
use crate::snapshot::Snapshot;
use crate::tick::Tick;

/// First byte of a snapshot datagram.
pub const DATAGRAM_SNAPSHOT: u8 = 0x02;
/// Exclusive end of the whole index space (a part covering up to here is the last one).
pub const RANGE_END_ALL: u32 = 0x1_0000;
/// Oldest baseline a delta may name, in ticks before the snapshot (an 8-bit offset on the wire, with
/// an escape to 16 bits for the old baselines a resumed session continues from).
pub const MAX_BASELINE_AGE: u32 = 65535;
/// Largest age coded in the 8-bit offset alone; the offset value 255 means "16-bit age follows".
pub const SHORT_BASELINE_AGE: u32 = 254;
/// Upper bound of header bits: tick 32, baseline offset 8 (+16 extended), input-ack flag+32, start
/// 16, last-flag 1, end 16, count 16, index mode 1, bitmap span 16.
pub const HEADER_MAX_BITS: usize = 32 + 8 + 16 + 1 + 32 + 16 + 1 + 16 + 16 + 1 + 16;
/// Largest index code of one entry (a 16-bit gap), bits.
pub const GAP_MAX_BITS: usize = 19;
/// Largest entry body (a spawn with 20-bit coordinates), bits.
pub const BODY_MAX_BITS: usize =
    2 + 16 + 2 + 20 + 20 + 1 + 2 * VEL_BITS as usize + YAW_BITS as usize + 8;
/// Most parts one snapshot may be split into (receivers refuse more).
pub const MAX_PARTS: usize = 256;
/// Position quanta moved per tick by one velocity quantum, times the tick rate.
const POS_PER_VEL: i64 = (VEL_QUANTUM / POS_QUANTUM) as i64;

const OP_UPDATE: u32 = 0;
const OP_SPAWN: u32 = 1;
const OP_DESPAWN: u32 = 2;

const F_POS: u32 = 1;
const F_VEL: u32 = 2;
const F_YAW: u32 = 4;
const F_HEALTH: u32 = 8;

/// Everything both sides must agree on to code snapshots: the position grid and the tick rate (the
/// position prediction uses it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    /// Position quantizer of the map.
    pub quant: PosQuant,
    /// Ticks per second.
    pub tick_rate: u32,
}

impl Codec {
    /// The codec for a `width × height` map at `tick_rate`.
    #[must_use]
    pub fn new(width: f32, height: f32, tick_rate: u32) -> Self {
        Self {
            quant: PosQuant::new(width, height),
            tick_rate: tick_rate.max(1),
        }
    }

    /// Where an entity at baseline state `b` is predicted to be `age` ticks later (quantized,
    /// clamped to the map): `b.pos + round(b.vel · age / tick_rate)` in integer arithmetic.
    #[must_use]
    pub fn predict_pos(&self, b: &EntityState, age: u32) -> (u32, u32) {
        let rate = i64::from(self.tick_rate);
        let step = |v: i32| {
            let n = i64::from(v) * POS_PER_VEL * i64::from(age);
            (n + n.signum() * (rate / 2)) / rate
        };
        let px = (i64::from(b.qx) + step(b.qvx)).clamp(0, i64::from(self.quant.max_qx));
        let py = (i64::from(b.qy) + step(b.qvy)).clamp(0, i64::from(self.quant.max_qy));
        (px as u32, py as u32)
    }
}

/// Why a snapshot could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// `max_datagram` cannot hold even the header plus one entry.
    #[error("datagram limit {0} B is too small for a snapshot part")]
    DatagramTooSmall(usize),
    /// The baseline is not 1..=65535 ticks older than the snapshot.
    #[error("baseline is not 1..=65535 ticks older than the snapshot")]
    BaselineOutOfRange,
    /// The snapshot would need more than [`MAX_PARTS`] datagrams.
    #[error("snapshot needs more than {MAX_PARTS} parts")]
    TooManyParts,
    /// Changes not in strictly increasing index order.
    #[error("changes must be sorted by index without repeats")]
    Unsorted,
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
    /// A position leaves the map or a velocity its range.
    #[error("entity {0} has an out-of-range field")]
    OutOfRange(u16),
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
    /// Offset from the predicted position, in quanta.
    Residual(i32, i32),
    /// Absolute quantized position.
    Abs(u32, u32),
}

/// A velocity change in an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VelChange {
    /// Offset from the baseline velocity, in quanta.
    Residual(i32, i32),
    /// At rest.
    Zero,
    /// Absolute quantized velocity.
    Abs(i32, i32),
}

/// A yaw change in an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YawChange {
    /// Offset from the baseline yaw in steps (wrapping), -8..=7.
    Residual(i32),
    /// Absolute yaw.
    Abs(u16),
}

/// One decoded entity operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntityOp {
    /// A new entity (or a new generation in a reused slot) with its full state.
    Spawn(EntityState),
    /// Changed fields of an entity the baseline holds. A position not sent is the predicted one.
    Update {
        /// Slot index.
        index: u16,
        /// Position residual or absolute position; `None`: exactly the prediction.
        pos: Option<PosChange>,
        /// New velocity, if changed.
        vel: Option<VelChange>,
        /// New yaw, if changed.
        yaw: Option<YawChange>,
        /// New health, if changed.
        health: Option<u8>,
    },
    /// The entity in this slot is gone (from the world, or from this client's view).
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

/// What one encode produced.
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
    /// Bits spent on part headers (including the kind byte and padding).
    pub header_bits: usize,
    /// Bits spent on entity indices (gap codes or bitmaps).
    pub index_bits: usize,
    /// Bits spent on entry bodies.
    pub body_bits: usize,
}

/// One change of an entity between a baseline and a new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// Not in the baseline (or a new generation / kind at its index): full state.
    Spawn(&'a EntityState),
    /// In both, with different state.
    Update {
        /// Baseline state.
        base: &'a EntityState,
        /// New state.
        new: &'a EntityState,
    },
    /// In the baseline, not in the new snapshot.
    Despawn(u16),
}

impl Change<'_> {
    /// The slot index.
    #[must_use]
    pub fn index(&self) -> u16 {
        match self {
            Change::Spawn(n) | Change::Update { new: n, .. } => n.id.index,
            Change::Despawn(i) => *i,
        }
    }
}

/// Classifies one index present in `base` and/or `new`; `None` when nothing changed.
#[must_use]
pub fn change<'a>(
    base: Option<&'a EntityState>,
    new: Option<&'a EntityState>,
) -> Option<Change<'a>> {
    match (base, new) {
        (None, None) => None,
        (Some(b), None) => Some(Change::Despawn(b.id.index)),
        (None, Some(n)) => Some(Change::Spawn(n)),
        (Some(b), Some(n)) if b.id != n.id || b.kind != n.kind => Some(Change::Spawn(n)),
        (Some(b), Some(n)) if b == n => None,
        (Some(b), Some(n)) => Some(Change::Update { base: b, new: n }),
    }
}

/// Appends every change from `baseline` (none: a keyframe) to `new`, in index order.
pub fn diff<'a>(baseline: Option<&'a Snapshot>, new: &'a Snapshot, out: &mut Vec<Change<'a>>) {
    let base: &[EntityState] = baseline.map_or(&[], |b| b.entities.as_slice());
    diff_sorted(base, new.entities.iter(), out);
}

/// Appends the changes from `base` to the entities yielded by `new` (both sorted by index, unique),
/// merged by index: entities only in `base` are despawns, only in `new` spawns.
pub fn diff_sorted<'a>(
    base: &'a [EntityState],
    new: impl Iterator<Item = &'a EntityState>,
    out: &mut Vec<Change<'a>>,
) {
    let mut new = new.peekable();
    let mut bi = 0usize;
    loop {
        let (b, n) = match (base.get(bi), new.peek().copied()) {
            (None, None) => break,
            (Some(b), Some(n)) if b.id.index == n.id.index => {
                bi += 1;
                new.next();
                (Some(b), Some(n))
            }
            (Some(b), Some(n)) if b.id.index < n.id.index => {
                bi += 1;
                (Some(b), None)
            }
            (Some(b), None) => {
                bi += 1;
                (Some(b), None)
            }
            (_, Some(n)) => {
                new.next();
                (None, Some(n))
            }
        };
        if let Some(c) = change(b, n) {
            out.push(c);
        }
    }
}

/// Reusable snapshot encoder (keeps its scratch buffers between calls).
#[derive(Debug, Default)]
pub struct SnapshotEncoder {
    /// Bodies of the entries of the part being filled.
    body: BitWriter,
    /// Indices of those entries.
    indices: Vec<u16>,
    /// Gap-code bits those indices need.
    gap_bits: usize,
}

struct Frame {
    tick: Tick,
    baseline: Option<Tick>,
    input_ack: Option<Tick>,
    age: u32,
}

impl SnapshotEncoder {
    /// A new encoder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes `new` against `baseline` (a keyframe when `None`): every difference.
    pub fn encode(
        &mut self,
        codec: &Codec,
        new: &Snapshot,
        baseline: Option<&Snapshot>,
        input_ack: Option<Tick>,
        max_datagram: usize,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<EncodeStats, EncodeError> {
        let mut changes = Vec::new();
        diff(baseline, new, &mut changes);
        self.encode_changes(
            codec,
            new.tick,
            baseline.map(|b| b.tick),
            &changes,
            input_ack,
            max_datagram,
            out,
        )
    }

    /// Encodes the snapshot of `tick` as `changes` (sorted by index) against the baseline of
    /// `baseline_tick` (`None`: a keyframe, and every change must be a spawn) into datagrams of at
    /// most `max_datagram` bytes appended to `out`. Entities of the baseline without a change stay
    /// as they are.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_changes(
        &mut self,
        codec: &Codec,
        tick: Tick,
        baseline_tick: Option<Tick>,
        changes: &[Change<'_>],
        input_ack: Option<Tick>,
        max_datagram: usize,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<EncodeStats, EncodeError> {
        let budget_bits = max_datagram
            .saturating_mul(8)
            .saturating_sub(HEADER_MAX_BITS + 8 + 7);
        if budget_bits < GAP_MAX_BITS + BODY_MAX_BITS {
            return Err(EncodeError::DatagramTooSmall(max_datagram));
        }
        let age = match baseline_tick {
            Some(b) => {
                let age = tick.diff(b);
                if age < 1 || age as u32 > MAX_BASELINE_AGE {
                    return Err(EncodeError::BaselineOutOfRange);
                }
                age as u32
            }
            None => 0,
        };
        if changes
            .windows(2)
            .any(|w| matches!(w, [a, b] if a.index() >= b.index()))
        {
            return Err(EncodeError::Unsorted);
        }
        let frame = Frame {
            tick,
            baseline: baseline_tick,
            input_ack,
            age,
        };
        let first_out = out.len();
        let mut stats = EncodeStats {
            keyframe: baseline_tick.is_none(),
            ..EncodeStats::default()
        };
        let mut start = 0u32;
        self.reset_part();
        for c in changes {
            let index = c.index();
            let gap = gap_bits(self.gap_from(start, index));
            let body = body_bits(codec, age, c);
            if !self.indices.is_empty()
                && self.gap_bits + gap + self.body.bit_len() + body > budget_bits
            {
                if out.len() - first_out + 1 >= MAX_PARTS {
                    out.truncate(first_out);
                    return Err(EncodeError::TooManyParts);
                }
                self.flush(&frame, start, u32::from(index), out, &mut stats);
                start = u32::from(index);
            }
            self.gap_bits += gap_bits(self.gap_from(start, index));
            self.indices.push(index);
            write_body(&mut self.body, codec, age, c);
            stats.changed += 1;
        }
        self.flush(&frame, start, RANGE_END_ALL, out, &mut stats);
        stats.parts = out.len() - first_out;
        Ok(stats)
    }

    fn reset_part(&mut self) {
        self.body.clear();
        self.indices.clear();
        self.gap_bits = 0;
    }

    fn gap_from(&self, start: u32, index: u16) -> u32 {
        let prev = self
            .indices
            .last()
            .map_or(i64::from(start) - 1, |p| i64::from(*p));
        (i64::from(index) - prev - 1).max(0) as u32
    }

    fn flush(
        &mut self,
        f: &Frame,
        start: u32,
        end: u32,
        out: &mut Vec<Vec<u8>>,
        stats: &mut EncodeStats,
    ) {
        let span = self.indices.last().map_or(0, |l| u32::from(*l) + 1 - start);
        let bitmap_bits = 16 + span as usize;
        let use_bitmap = bitmap_bits < self.gap_bits;
        let mut h = BitWriter::with_capacity(24 + self.body.byte_len());
        h.write(f.tick.0, 32);
        match f.baseline.map(|_| f.age) {
            None => h.write(0, 8),
            Some(a) if a <= SHORT_BASELINE_AGE => h.write(a, 8),
            Some(a) => {
                h.write(255, 8);
                h.write(a, 16);
            }
        }
        match f.input_ack {
            Some(t) => {
                h.write_bool(true);
                h.write(t.0, 32);
            }
            None => h.write_bool(false),
        }
        h.write(start, 16);
        if end == RANGE_END_ALL {
            h.write_bool(true);
        } else {
            h.write_bool(false);
            h.write(end, 16);
        }
        h.write(self.indices.len() as u32, 16);
        h.write_bool(use_bitmap);
        let header_bits = h.bit_len();
        if use_bitmap {
            h.write(span, 16);
            let mut next = self.indices.iter().peekable();
            for i in 0..span {
                let hit = next.peek().is_some_and(|x| u32::from(**x) == start + i);
                if hit {
                    next.next();
                }
                h.write_bool(hit);
            }
        } else {
            let mut prev = i64::from(start) - 1;
            for &i in &self.indices {
                write_gap(&mut h, (i64::from(i) - prev - 1) as u32);
                prev = i64::from(i);
            }
        }
        let index_bits = h.bit_len() - header_bits;
        h.append(&self.body);
        let mut bytes = Vec::with_capacity(1 + h.byte_len());
        bytes.push(DATAGRAM_SNAPSHOT);
        h.finish_into(&mut bytes);
        stats.index_bits += index_bits;
        stats.body_bits += self.body.bit_len();
        stats.header_bits += bytes.len() * 8 - index_bits - self.body.bit_len();
        stats.bytes += bytes.len();
        out.push(bytes);
        self.reset_part();
    }
}

fn gap_bits(g: u32) -> usize {
    match g {
        0 => 1,
        1..=16 => 6,
        17..=272 => 11,
        _ => 19,
    }
}

fn write_gap(w: &mut BitWriter, g: u32) {
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

fn fits(v: i64, bits: u32) -> bool {
    let lim = 1i64 << (bits - 1);
    (-lim..lim).contains(&v)
}

fn yaw_delta(from: u16, to: u16) -> i32 {
    let d = (i32::from(to) - i32::from(from)).rem_euclid(1 << YAW_BITS);
    if d >= 1 << (YAW_BITS - 1) {
        d - (1 << YAW_BITS)
    } else {
        d
    }
}

/// The fields an update carries and how (shared by the size estimate and the writer).
struct UpdatePlan {
    mask: u32,
    pos: Option<PosChange>,
    vel: Option<VelChange>,
    yaw: i32,
}

fn plan_update(codec: &Codec, age: u32, b: &EntityState, n: &EntityState) -> UpdatePlan {
    let (px, py) = codec.predict_pos(b, age);
    let pos = if (px, py) == (n.qx, n.qy) {
        None
    } else {
        let dx = i64::from(n.qx) - i64::from(px);
        let dy = i64::from(n.qy) - i64::from(py);
        Some(if fits(dx, 8) && fits(dy, 8) {
            PosChange::Residual(dx as i32, dy as i32)
        } else {
            PosChange::Abs(n.qx, n.qy)
        })
    };
    let vel = if (b.qvx, b.qvy) == (n.qvx, n.qvy) {
        None
    } else if (n.qvx, n.qvy) == (0, 0) {
        Some(VelChange::Zero)
    } else {
        let dx = i64::from(n.qvx) - i64::from(b.qvx);
        let dy = i64::from(n.qvy) - i64::from(b.qvy);
        Some(if fits(dx, 4) && fits(dy, 4) {
            VelChange::Residual(dx as i32, dy as i32)
        } else {
            VelChange::Abs(n.qvx, n.qvy)
        })
    };
    let mut mask = 0;
    if pos.is_some() {
        mask |= F_POS;
    }
    if vel.is_some() {
        mask |= F_VEL;
    }
    if b.yaw != n.yaw {
        mask |= F_YAW;
    }
    if b.health != n.health {
        mask |= F_HEALTH;
    }
    UpdatePlan {
        mask,
        pos,
        vel,
        yaw: yaw_delta(b.yaw, n.yaw),
    }
}

/// Bits of one entry's body (without its index code): what a budget needs to know.
#[must_use]
pub fn body_bits(codec: &Codec, age: u32, c: &Change<'_>) -> usize {
    let q = &codec.quant;
    match c {
        Change::Despawn(_) => 2,
        Change::Spawn(n) => {
            let vel = if (n.qvx, n.qvy) == (0, 0) {
                1
            } else {
                1 + 2 * VEL_BITS as usize
            };
            2 + 16 + 2 + q.bits_x as usize + q.bits_y as usize + vel + YAW_BITS as usize + 8
        }
        Change::Update { base, new } => {
            let p = plan_update(codec, age, base, new);
            let mut bits = 2 + 4;
            bits += match p.pos {
                None => 0,
                Some(PosChange::Residual(dx, dy))
                    if fits(i64::from(dx), 4) && fits(i64::from(dy), 4) =>
                {
                    1 + 8
                }
                Some(PosChange::Residual(..)) => 2 + 16,
                Some(PosChange::Abs(..)) => 2 + q.bits_x as usize + q.bits_y as usize,
            };
            bits += match p.vel {
                None => 0,
                Some(VelChange::Residual(..)) => 1 + 8,
                Some(VelChange::Zero) => 2,
                Some(VelChange::Abs(..)) => 2 + 2 * VEL_BITS as usize,
            };
            if p.mask & F_YAW != 0 {
                bits += if fits(i64::from(p.yaw), 4) {
                    5
                } else {
                    1 + YAW_BITS as usize
                };
            }
            if p.mask & F_HEALTH != 0 {
                bits += 8;
            }
            bits
        }
    }
}

/// Bits of one entry including the largest index code: a safe upper bound for budgeting.
#[must_use]
pub fn entry_bits_max(codec: &Codec, age: u32, c: &Change<'_>) -> usize {
    GAP_MAX_BITS + body_bits(codec, age, c)
}

fn write_body(w: &mut BitWriter, codec: &Codec, age: u32, c: &Change<'_>) {
    let q = &codec.quant;
    match c {
        Change::Despawn(_) => w.write(OP_DESPAWN, 2),
        Change::Spawn(n) => {
            w.write(OP_SPAWN, 2);
            w.write(u32::from(n.id.generation), 16);
            w.write(n.kind.to_bits(), 2);
            w.write(n.qx, q.bits_x);
            w.write(n.qy, q.bits_y);
            if (n.qvx, n.qvy) == (0, 0) {
                w.write_bool(false);
            } else {
                w.write_bool(true);
                w.write_signed(n.qvx, VEL_BITS);
                w.write_signed(n.qvy, VEL_BITS);
            }
            w.write(u32::from(n.yaw), YAW_BITS);
            w.write(u32::from(n.health), 8);
        }
        Change::Update { base, new } => {
            let p = plan_update(codec, age, base, new);
            w.write(OP_UPDATE, 2);
            w.write(p.mask, 4);
            match p.pos {
                Some(PosChange::Residual(dx, dy))
                    if fits(i64::from(dx), 4) && fits(i64::from(dy), 4) =>
                {
                    w.write_bool(true);
                    w.write_signed(dx, 4);
                    w.write_signed(dy, 4);
                }
                Some(PosChange::Residual(dx, dy)) => {
                    w.write(0b10, 2); // '0','1'
                    w.write_signed(dx, 8);
                    w.write_signed(dy, 8);
                }
                Some(PosChange::Abs(x, y)) => {
                    w.write(0b00, 2); // '0','0'
                    w.write(x, q.bits_x);
                    w.write(y, q.bits_y);
                }
                None => {}
            }
            match p.vel {
                Some(VelChange::Residual(dx, dy)) => {
                    w.write_bool(true);
                    w.write_signed(dx, 4);
                    w.write_signed(dy, 4);
                }
                Some(VelChange::Zero) => w.write(0b10, 2), // '0','1'
                Some(VelChange::Abs(x, y)) => {
                    w.write(0b00, 2); // '0','0'
                    w.write_signed(x, VEL_BITS);
                    w.write_signed(y, VEL_BITS);
                }
                None => {}
            }
            if p.mask & F_YAW != 0 {
                if fits(i64::from(p.yaw), 4) {
                    w.write_bool(true);
                    w.write_signed(p.yaw, 4);
                } else {
                    w.write_bool(false);
                    w.write(u32::from(new.yaw), YAW_BITS);
                }
            }
            if p.mask & F_HEALTH != 0 {
                w.write(u32::from(new.health), 8);
            }
        }
    }
}

fn read_abs_pos(r: &mut BitReader<'_>, q: &PosQuant) -> Result<(u32, u32), DecodeError> {
    let qx = r.read(q.bits_x)?;
    let qy = r.read(q.bits_y)?;
    if qx > q.max_qx || qy > q.max_qy {
        return Err(DecodeError::Malformed("position out of bounds"));
    }
    Ok((qx, qy))
}

/// An absolute velocity pair; −2048 (outside ±[`crate::quant::VEL_MAX_Q`]) is refused.
fn read_vel(r: &mut BitReader<'_>) -> Result<(i32, i32), DecodeError> {
    let (x, y) = (r.read_signed(VEL_BITS)?, r.read_signed(VEL_BITS)?);
    let lim = crate::quant::VEL_MAX_Q;
    if x.abs() > lim || y.abs() > lim {
        return Err(DecodeError::Malformed("velocity out of range"));
    }
    Ok((x, y))
}

fn read_body(
    r: &mut BitReader<'_>,
    codec: &Codec,
    index: u16,
    keyframe: bool,
) -> Result<EntityOp, DecodeError> {
    let q = &codec.quant;
    Ok(match r.read(2)? {
        OP_SPAWN => {
            let generation = r.read(16)? as u16;
            let kind =
                EntityKind::from_bits(r.read(2)?).ok_or(DecodeError::Malformed("entity kind"))?;
            let (qx, qy) = read_abs_pos(r, q)?;
            let (qvx, qvy) = if r.read_bool()? { read_vel(r)? } else { (0, 0) };
            EntityOp::Spawn(EntityState {
                id: EntityId { index, generation },
                kind,
                qx,
                qy,
                qvx,
                qvy,
                yaw: r.read(YAW_BITS)? as u16,
                health: r.read(8)? as u8,
            })
        }
        OP_DESPAWN if !keyframe => EntityOp::Despawn(index),
        OP_UPDATE if !keyframe => {
            // Mask 0 is valid: the entity moved exactly as predicted from its baseline velocity.
            let mask = r.read(4)?;
            let pos = if mask & F_POS != 0 {
                Some(if r.read_bool()? {
                    PosChange::Residual(r.read_signed(4)?, r.read_signed(4)?)
                } else if r.read_bool()? {
                    PosChange::Residual(r.read_signed(8)?, r.read_signed(8)?)
                } else {
                    let (x, y) = read_abs_pos(r, q)?;
                    PosChange::Abs(x, y)
                })
            } else {
                None
            };
            let vel = if mask & F_VEL != 0 {
                Some(if r.read_bool()? {
                    VelChange::Residual(r.read_signed(4)?, r.read_signed(4)?)
                } else if r.read_bool()? {
                    VelChange::Zero
                } else {
                    let (x, y) = read_vel(r)?;
                    VelChange::Abs(x, y)
                })
            } else {
                None
            };
            let yaw = if mask & F_YAW != 0 {
                Some(if r.read_bool()? {
                    YawChange::Residual(r.read_signed(4)?)
                } else {
                    YawChange::Abs(r.read(YAW_BITS)? as u16)
                })
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
        OP_DESPAWN | OP_UPDATE => {
            return Err(DecodeError::Malformed("update or despawn in a keyframe"))
        }
        _ => return Err(DecodeError::Malformed("reserved entity op")),
    })
}

/// Decodes one snapshot datagram (including its kind byte). Never panics on any input.
pub fn decode_part(bytes: &[u8], codec: &Codec) -> Result<SnapshotPart, DecodeError> {
    let (&kind, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
    if kind != DATAGRAM_SNAPSHOT {
        return Err(DecodeError::WrongKind);
    }
    let mut r = BitReader::new(rest);
    let tick = Tick(r.read(32)?);
    let mut offset = r.read(8)?;
    if offset == 255 {
        offset = r.read(16)?;
        if offset <= SHORT_BASELINE_AGE {
            return Err(DecodeError::Malformed("extended baseline age below 255"));
        }
    }
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
    let mut indices: Vec<u16> = Vec::with_capacity(count);
    if r.read_bool()? {
        let span = r.read(16)?;
        if span > range_end - range_start || span as usize > r.remaining_bits() {
            return Err(DecodeError::Malformed("bitmap span"));
        }
        for i in 0..span {
            if r.read_bool()? {
                if indices.len() == count {
                    return Err(DecodeError::Malformed("bitmap has more entries than count"));
                }
                indices.push((range_start + i) as u16);
            }
        }
        if indices.len() != count {
            return Err(DecodeError::Malformed(
                "bitmap has fewer entries than count",
            ));
        }
    } else {
        let mut prev = i64::from(range_start) - 1;
        for _ in 0..count {
            let index = prev + 1 + i64::from(read_gap(&mut r)?);
            if index >= i64::from(range_end) {
                return Err(DecodeError::Malformed(
                    "entity index outside the part's range",
                ));
            }
            prev = index;
            indices.push(index as u16);
        }
    }
    let mut ops = Vec::with_capacity(count);
    for index in indices {
        ops.push(read_body(&mut r, codec, index, baseline.is_none())?);
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
    codec: &Codec,
) -> Result<Vec<EntityState>, ApplyError> {
    let h = &part.header;
    let (base, age): (&[EntityState], u32) = match h.baseline {
        None => (&[], 0),
        Some(t) => match baseline {
            Some(b) if b.tick == t => (b.range(h.range_start, h.range_end), h.tick.diff(t) as u32),
            _ => return Err(ApplyError::MissingBaseline(t)),
        },
    };
    let q = &codec.quant;
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
                let (px, py) = codec.predict_pos(b, age);
                (e.qx, e.qy) = match pos {
                    None => (px, py),
                    Some(PosChange::Abs(x, y)) => (*x, *y),
                    Some(PosChange::Residual(dx, dy)) => {
                        match (px.checked_add_signed(*dx), py.checked_add_signed(*dy)) {
                            (Some(x), Some(y)) if x <= q.max_qx && y <= q.max_qy => (x, y),
                            _ => return Err(ApplyError::OutOfRange(index)),
                        }
                    }
                };
                match vel {
                    None => {}
                    Some(VelChange::Zero) => (e.qvx, e.qvy) = (0, 0),
                    Some(VelChange::Abs(x, y)) => (e.qvx, e.qvy) = (*x, *y),
                    Some(VelChange::Residual(dx, dy)) => {
                        let lim = crate::quant::VEL_MAX_Q;
                        let (x, y) = (e.qvx + dx, e.qvy + dy);
                        if x.abs() > lim || y.abs() > lim {
                            return Err(ApplyError::OutOfRange(index));
                        }
                        (e.qvx, e.qvy) = (x, y);
                    }
                }
                match yaw {
                    None => {}
                    Some(YawChange::Abs(y)) => e.yaw = *y,
                    Some(YawChange::Residual(d)) => {
                        e.yaw = (i32::from(e.yaw) + d).rem_euclid(1 << YAW_BITS) as u16
                    }
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
