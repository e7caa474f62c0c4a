//! quicktick-shared: the sans-IO protocol core of quicktick.
//!
//! No tokio, no sockets, no clock: time is passed in. The server and the client library are thin I/O
//! shells around these types; tests drive them deterministically in memory.
//!
//! # Layout
//! - [`tick`]: tick numbers and wrapping sequence math.
//! - [`bits`]: bit writer/reader for the snapshot format.
//! - [`quant`]: quantization grids for position, velocity, yaw.
//! - [`entity`]: entity ids (slot + generation) and quantized entity state.
//! - [`snapshot`]: snapshots and the server's bounded snapshot history.
//! - [`delta`]: snapshot delta encode / decode / apply, split into self-contained datagram parts.
//! - [`assembler`]: client-side reassembly of split snapshots and the ring of held baselines.
//! - [`input`]: input commands, validation, the server input buffer, the client redundancy window.
//! - [`wire`]: input datagrams, stream messages and frames (the only module that names bincode).
//! - [`link`]: a seeded sans-IO link conditioner (loss, latency, jitter, duplication).
//! - [`lobby`]: roster, presence, chat channels, sequencing, de-duplication and bounded history.
//! - [`session`]: the server's per-client state (acks, baselines, inputs).
//! - [`client`]: the client's session state machine and server-tick estimator.
//! - [`netcode`]: client prediction/reconciliation, interpolation, adaptive input lead.
//! - [`reconnect`]: reconnection backoff with full jitter, connection states, link silence, chat outbox.
//! - [`map`]: map format (TOML text).
//! - [`sim`]: the deterministic simulation step.

// Tests may unwrap and index; library code may not (checked by the non-test build).
#![cfg_attr(
    test,
    allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod assembler;
pub mod bits;
pub mod client;
pub mod delta;
pub mod entity;
pub mod input;
pub mod link;
pub mod lobby;
pub mod map;
pub mod netcode;
pub mod quant;
pub mod reconnect;
pub mod session;
pub mod sim;
pub mod snapshot;
pub mod tick;
pub mod wire;

#[cfg(test)]
mod tests;
