//! quicktick-bot: the client library a game (or a test) embeds to play on a quicktick server, and the
//! bot swarm built on it. The protocol logic lives in `quicktick-shared`; this crate is its I/O shell.
//!
//! # Layout
//! - [`endpoint`]: trusted certificates and the client QUIC endpoint (TLS, ALPN, transport settings).
//! - [`conditioner`]: a seeded link conditioner (loss, latency, jitter, duplication per direction)
//!   wrapping the UDP socket under QUIC, and the conditioned client endpoint.
//! - [`migrate`]: QUIC connection migration: move a client endpoint to a fresh UDP socket (a new
//!   address) without reconnecting, conditioned like the old one.
//! - [`client`]: [`Client`]: handshake, background tasks (datagrams, inputs, stream), shared state.
//! - [`lobby`]: the client's view of the lobby: roster, chat log, duplicate/order checks, chat receipts.
//! - [`behaviour`]: what a bot does each step (wander, unstick, aim, fire), pure and seeded.
//! - [`swarm`]: the swarm runner behind the `quicktick-bot` binary (flags, progress, end-of-run checks).
//! - [`report`]: the end-of-run report and the pure computations behind it.

pub mod behaviour;
pub mod client;
pub mod conditioner;
pub mod endpoint;
pub mod lobby;
pub mod migrate;
pub mod report;
pub mod swarm;

pub use client::{Client, ClientOptions, ClientStats, CloseInfo, ConnectError, DrainNotice};
pub use endpoint::{client_endpoint, load_trust};
pub use migrate::rebind_endpoint;
