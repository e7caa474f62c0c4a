//! Entity identity and quantized entity state, the unit a snapshot is made of.

/// An entity slot index plus a generation that changes every time the slot is reused, so a client can
/// tell "the same entity moved" from "a new entity took the slot" even within one tick.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, bincode::Encode, bincode::Decode,
)]
pub struct EntityId {
    /// Slot index (0..=65535); snapshots are sorted by it.
    pub index: u16,
    /// Reuse counter of the slot (wrapping).
    pub generation: u16,
}

/// What an entity is. Two bits on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, bincode::Encode, bincode::Decode)]
pub enum EntityKind {
    /// A player's avatar.
    Player = 0,
    /// A server-driven non-player entity.
    Npc = 1,
}

impl EntityKind {
    /// Wire value.
    #[must_use]
    pub fn to_bits(self) -> u32 {
        self as u32
    }

    /// Parses the wire value; `None` for reserved values.
    #[must_use]
    pub fn from_bits(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Player),
            1 => Some(Self::Npc),
            _ => None,
        }
    }
}

/// The quantized, replicated state of one entity: exactly what a snapshot carries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EntityState {
    /// Identity (slot + generation).
    pub id: EntityId,
    /// Player or NPC.
    pub kind: EntityKind,
    /// Position x in position quanta (see [`crate::quant::POS_QUANTUM`]).
    pub qx: u32,
    /// Position y in position quanta.
    pub qy: u32,
    /// Velocity x in velocity quanta.
    pub qvx: i32,
    /// Velocity y in velocity quanta.
    pub qvy: i32,
    /// Orientation in `YAW_BITS`-bit steps.
    pub yaw: u16,
    /// Health, 0..=255.
    pub health: u8,
}
