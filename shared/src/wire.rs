//! The wire codec for everything that is not a snapshot: input datagrams and the reliable-stream
//! messages. The only module that names bincode. Every decode is bounded by a byte limit and checked.
//!
//! Stream framing: a 2-byte big-endian payload length, then a bincode (standard config: varints,
//! little-endian) encoding of [`ClientMsg`] or [`ServerMsg`]. Layout details: `docs/PROTOCOL.md`.

use bincode::{Decode, Encode};

use crate::entity::EntityId;
use crate::input::{InputCmd, InputError};
use crate::tick::Tick;

/// Protocol version carried in `hello`; bumped on any incompatible wire change.
pub const PROTOCOL_VERSION: u16 = 2;
/// ALPN protocol id for the QUIC handshake.
pub const ALPN: &[u8] = b"quicktick/1";
/// First byte of an input datagram.
pub const DATAGRAM_INPUT: u8 = 0x01;
/// Largest input datagram accepted, bytes.
pub const MAX_INPUT_DATAGRAM: usize = 512;
/// Most inputs one datagram may carry.
pub const MAX_INPUTS_PER_DATAGRAM: usize = 16;
/// Largest stream frame payload accepted, bytes.
pub const MAX_FRAME: usize = 16384;
/// Longest chat line, in bytes of UTF-8 after control characters are stripped.
pub const MAX_CHAT_BYTES: usize = 256;
/// Longest player name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 32;
/// Most players one server admits (so the welcome's roster fits one frame).
pub const MAX_PLAYERS: usize = 128;
/// Most walls a map may have (so the welcome fits one frame).
pub const MAX_WALLS: usize = 64;
/// Length of a resume token, bytes.
pub const RESUME_TOKEN_BYTES: usize = 16;
/// Longest room name, bytes of UTF-8 (same rules as player names).
pub const MAX_ROOM_BYTES: usize = 32;
/// The room every player starts in.
pub const LOBBY_ROOM: &str = "lobby";

type Limited<const N: usize> = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<N>,
>;

fn cfg<const N: usize>() -> Limited<N> {
    bincode::config::standard().with_limit::<N>()
}

/// Why bytes from the network were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first byte names no datagram kind this version knows.
    #[error("unknown datagram kind {0:#04x}")]
    UnknownKind(u8),
    /// Larger than the limit for its kind.
    #[error("message of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    /// Not a valid encoding.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes left over after the message.
    #[error("trailing bytes after message")]
    Trailing,
    /// A field value the protocol forbids.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// An input command failed validation.
    #[error("invalid input: {0}")]
    Input(#[from] InputError),
}

/// Most memory one decoded message may claim (bincode counts claimed sizes, which exceed the wire
/// size: a `Vec<PlayerInfo>` claims `len × size_of::<PlayerInfo>()` before its strings).
const DECODE_ALLOC_LIMIT: usize = 64 * 1024;

fn decode_exact<T: Decode<()>, const N: usize>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > N {
        return Err(WireError::TooLarge(bytes.len(), N));
    }
    let (v, used) = bincode::decode_from_slice(bytes, cfg::<DECODE_ALLOC_LIMIT>())
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Trailing);
    }
    Ok(v)
}

fn encode_vec<T: Encode, const N: usize>(v: &T, prefix: &[u8]) -> Result<Vec<u8>, WireError> {
    let mut out = prefix.to_vec();
    let body =
        bincode::encode_to_vec(v, cfg::<N>()).map_err(|e| WireError::Malformed(e.to_string()))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Client → server datagram: recent inputs (redundant) plus the newest complete snapshot held.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct InputDatagram {
    /// Tick of the newest complete snapshot the client holds; `None` before the first one.
    pub snapshot_ack: Option<Tick>,
    /// The client's last few inputs, oldest first, ticks strictly increasing.
    pub inputs: Vec<InputCmd>,
}

impl InputDatagram {
    /// Encodes with the kind byte.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let v = encode_vec::<_, MAX_INPUT_DATAGRAM>(self, &[DATAGRAM_INPUT])?;
        if v.len() > MAX_INPUT_DATAGRAM {
            return Err(WireError::TooLarge(v.len(), MAX_INPUT_DATAGRAM));
        }
        Ok(v)
    }

    /// Decodes and validates a datagram including its kind byte.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() > MAX_INPUT_DATAGRAM {
            return Err(WireError::TooLarge(bytes.len(), MAX_INPUT_DATAGRAM));
        }
        match bytes.split_first() {
            Some((&DATAGRAM_INPUT, rest)) => {
                let d: Self = decode_exact::<_, MAX_INPUT_DATAGRAM>(rest)?;
                if d.inputs.len() > MAX_INPUTS_PER_DATAGRAM {
                    return Err(WireError::Invalid("too many inputs in one datagram"));
                }
                if d.inputs
                    .windows(2)
                    .any(|w| matches!(w, [a, b] if !b.tick.is_after(a.tick)))
                {
                    return Err(WireError::Invalid("input ticks not strictly increasing"));
                }
                for c in &d.inputs {
                    c.validate()?;
                }
                Ok(d)
            }
            Some((&k, _)) => Err(WireError::UnknownKind(k)),
            None => Err(WireError::Malformed("empty datagram".into())),
        }
    }
}

/// What a player says they are doing (presence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Encode, Decode)]
pub enum PresenceState {
    /// In the lobby (the state on joining).
    #[default]
    Lobby,
    /// In the lobby and ready to play.
    Ready,
    /// Playing a match.
    InMatch,
    /// Away from the keyboard.
    Away,
}

/// A player as the lobby shows it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct PlayerInfo {
    /// Server-assigned player id, unique for the server's lifetime.
    pub id: u32,
    /// Display name.
    pub name: String,
    /// The player's avatar entity.
    pub avatar: EntityId,
    /// Presence state.
    pub state: PresenceState,
    /// The chat room the player is in ([`LOBBY_ROOM`] on joining).
    pub room: String,
}

/// Where a client sends a chat line or typing indicator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Encode, Decode)]
pub enum Channel {
    /// Everyone on the server.
    Global,
    /// Everyone in the sender's room.
    Room,
    /// One player.
    Whisper {
        /// The recipient's player id.
        to: u32,
    },
}

/// Where a delivered chat line was sent (the audience it had).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Encode, Decode)]
pub enum ChatScope {
    /// Everyone on the server.
    Global,
    /// Everyone in this room.
    Room(String),
    /// From the line's sender to this player only.
    Whisper {
        /// The recipient's player id.
        to: u32,
    },
}

/// Everything a client needs after joining.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Welcome {
    /// This client's player id.
    pub player_id: u32,
    /// Simulation rate, ticks per second.
    pub tick_rate: u16,
    /// The map being played.
    pub map_id: String,
    /// World width in units (position quantization derives from it).
    pub map_width: f32,
    /// World height in units.
    pub map_height: f32,
    /// This client's avatar entity.
    pub avatar: EntityId,
    /// The server's tick when the welcome was sent.
    pub server_tick: Tick,
    /// How many recent inputs each input datagram should repeat.
    pub input_redundancy: u8,
    /// Everyone in the lobby, this player included.
    pub players: Vec<PlayerInfo>,
    /// Server-assigned sequence number of the newest chat line before this player joined.
    pub chat_seq: u64,
    /// The map's walls as `[min_x, min_y, max_x, max_y]`, so the client can predict collisions.
    pub walls: Vec<[f32; 4]>,
    /// Lag-compensation window, ms: shots whose view time is older are judged at the present.
    pub lag_comp_ms: u16,
    /// Secret that lets this player resume the session after a dropped connection
    /// ([`RESUME_TOKEN_BYTES`] bytes; keep it private).
    pub resume_token: Vec<u8>,
    /// How long the server keeps a dropped player's session for a resume, ms.
    pub grace_ms: u32,
}

/// A reconnecting client's request to continue its session (first message instead of `hello`).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ResumeRequest {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u16,
    /// The player id from the welcome.
    pub player_id: u32,
    /// The newest resume token the server gave ([`Welcome::resume_token`] or [`Resumed::resume_token`]).
    pub token: Vec<u8>,
    /// Tick of the newest complete snapshot the client holds (the baseline it can decode against).
    pub snapshot_ack: Option<Tick>,
    /// Sequence number of the newest chat line the client received (replay starts after it).
    pub chat_cursor: u64,
}

/// The answer to a successful [`ResumeRequest`]: the same player and avatar, continuing.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Resumed {
    /// The player id (unchanged).
    pub player_id: u32,
    /// The avatar entity (unchanged).
    pub avatar: EntityId,
    /// The server's tick when this was sent (restart the tick clock from it as from a welcome).
    pub server_tick: Tick,
    /// Everyone present now, this player included.
    pub players: Vec<PlayerInfo>,
    /// A fresh resume token (the previous one is no longer valid).
    pub resume_token: Vec<u8>,
    /// The baseline the next snapshot is delta-coded against (`None`: a keyframe follows).
    pub baseline: Option<Tick>,
    /// True when chat lines after the cursor were evicted from history and cannot be replayed.
    pub chat_truncated: bool,
    /// Chat lines replayed after this message: those after the cursor that this player may see.
    pub chat_replayed: u32,
}

/// Why a `hello` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum RefuseReason {
    /// The client speaks another protocol version.
    VersionMismatch,
    /// `max_players` are connected.
    ServerFull,
    /// Empty, too long, or containing control characters.
    BadName,
    /// The server is shutting down.
    ShuttingDown,
    /// The server requires a connect token and none was given.
    TokenRequired,
    /// The token is malformed or its signature is wrong (forged, or signed with another secret).
    TokenInvalid,
    /// The token's expiry has passed.
    TokenExpired,
    /// The token was already used (each token admits one connection).
    TokenReplayed,
    /// No resumable session matches (unknown player, wrong token, or the grace window passed): join
    /// afresh with `hello`.
    ResumeUnknown,
    /// Another player has this name (compared ignoring case).
    NameTaken,
}

/// Why a player left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum LeaveReason {
    /// Closed the connection.
    Quit,
    /// The connection timed out or failed.
    TimedOut,
    /// Removed by the server (protocol violation, slow consumer).
    Kicked,
}

/// A non-fatal error reported to the client on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum ErrorCode {
    /// The chat line was longer than [`MAX_CHAT_BYTES`] or empty after stripping.
    ChatRejected,
    /// A message that is not valid in the current state (for example a second `hello`).
    UnexpectedMessage,
    /// Chat lines sent faster than the server's per-player rate limit were dropped.
    RateLimited,
    /// A whisper to a player who is not present.
    UnknownRecipient,
    /// A room name that is invalid, or a new room when the server has its maximum of rooms.
    BadRoom,
}

/// A chat line as the server orders it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ChatLine {
    /// Server-assigned sequence number, strictly increasing across all lines.
    pub seq: u64,
    /// Sender's player id.
    pub from: u32,
    /// The sender's own id for the line (echoed so the sender can match it).
    pub client_msg_id: u32,
    /// Where it was sent.
    pub scope: ChatScope,
    /// The text, control characters stripped.
    pub text: String,
}

/// Client → server stream messages.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ClientMsg {
    /// First message: join request.
    Hello {
        /// Must equal [`PROTOCOL_VERSION`].
        version: u16,
        /// Display name, 1..=[`MAX_NAME_BYTES`] bytes, no control characters.
        name: String,
        /// A connect token signed by the server's secret (required when the server runs with
        /// `--auth required`; then the token's name is used).
        token: Option<String>,
    },
    /// Send a chat line.
    Chat {
        /// Client-chosen id, strictly increasing per player session (kept across resumes); a repeat
        /// or an older id is dropped as duplicate.
        client_msg_id: u32,
        /// Where to.
        channel: Channel,
        /// Text, at most [`MAX_CHAT_BYTES`] bytes.
        text: String,
    },
    /// First message instead of `hello`: continue a session after a dropped connection.
    Resume(ResumeRequest),
    /// Set this player's presence state.
    SetPresence {
        /// The new state.
        state: PresenceState,
    },
    /// The player is typing in a channel (rate-limited by the server; extra ones are dropped).
    Typing {
        /// Where.
        channel: Channel,
    },
    /// Move to a chat room (created when it does not exist).
    JoinRoom {
        /// Room name: 1..=[`MAX_ROOM_BYTES`] bytes, no control characters.
        room: String,
    },
}

/// Server → client stream messages.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum ServerMsg {
    /// Joined.
    Welcome(Welcome),
    /// Not joined; the connection closes after this.
    Refused {
        /// Machine-readable reason.
        reason: RefuseReason,
        /// Human-readable detail.
        detail: String,
    },
    /// A chat line (including the client's own, echoed with its sequence number).
    Chat(ChatLine),
    /// Someone joined.
    PlayerJoined(PlayerInfo),
    /// Someone left.
    PlayerLeft {
        /// Their player id.
        id: u32,
        /// Why.
        reason: LeaveReason,
    },
    /// The outcome of one of this client's shots (lag-compensated).
    ShotResult {
        /// Tick the shot was fired at (the input's tick).
        tick: Tick,
        /// The entity hit, if any.
        hit: Option<EntityId>,
        /// False when the view time was outside the lag-compensation window (judged at the present).
        compensated: bool,
    },
    /// Once a second: how this client's inputs fared on the server (cumulative counts).
    InputStats {
        /// Inputs applied at their own tick.
        applied: u64,
        /// Ticks simulated without this client's input.
        missing: u64,
        /// Inputs that arrived after their tick.
        late: u64,
        /// Redundant copies dropped.
        duplicates: u64,
    },
    /// A non-fatal error about the client's last message.
    Error {
        /// What kind.
        code: ErrorCode,
        /// Human-readable detail.
        detail: String,
    },
    /// The session continues (answer to `Resume`); replayed chat lines follow.
    Resumed(Resumed),
    /// A player's presence state or room changed.
    Presence {
        /// Their player id.
        id: u32,
        /// Their state now.
        state: PresenceState,
        /// Their room now.
        room: String,
    },
    /// A player is typing.
    Typing {
        /// Their player id.
        id: u32,
        /// Where (as the recipient sees it).
        scope: ChatScope,
    },
    /// The server is draining (shutting down): it accepts no new players and keeps the match running
    /// for at most `drain_ms`, then closes every connection with [`close::SHUTDOWN`]. Sent once.
    Draining {
        /// Why (for the player), e.g. "server shutting down for maintenance".
        reason: String,
        /// Most milliseconds until the server closes the connection.
        drain_ms: u32,
    },
}

/// Encodes one stream message as a frame: 2-byte big-endian length, then the payload.
pub fn encode_frame<T: Encode>(msg: &T) -> Result<Vec<u8>, WireError> {
    let mut out = encode_vec::<_, MAX_FRAME>(msg, &[0, 0])?;
    let len = out.len() - 2;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len, MAX_FRAME));
    }
    let be = (len as u16).to_be_bytes();
    out.splice(0..2, be);
    Ok(out)
}

/// Incremental frame decoder: feed bytes as they arrive, pull whole messages out. Holds at most one
/// frame's worth of bytes plus the last read chunk, and refuses a declared length over [`MAX_FRAME`]
/// before buffering it.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Bytes received but not yet consumed.
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// An empty decoder.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_msg<T: Decode<()>>(&mut self) -> Result<Option<T>, WireError> {
        let Some(&[a, b]) = self.buf.get(..2) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([a, b]));
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len, MAX_FRAME));
        }
        let Some(payload) = self.buf.get(2..2 + len) else {
            return Ok(None);
        };
        let msg = decode_exact::<T, MAX_FRAME>(payload)?;
        self.buf.drain(..2 + len);
        Ok(Some(msg))
    }

    /// Bytes buffered and not yet consumed.
    #[must_use]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

/// Invisible or direction-changing format characters (zero-width spaces and joiners, bidi embeddings,
/// overrides and isolates, word joiner, invisible operators, BOM, soft hyphen) that let text
/// impersonate other text. They are treated like control characters.
#[must_use]
pub fn is_hidden_format(c: char) -> bool {
    matches!(c, '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

fn is_unwanted(c: char) -> bool {
    c.is_control() || is_hidden_format(c)
}

/// Checks a player name: 1..=[`MAX_NAME_BYTES`] bytes, no control or hidden format characters (see
/// [`is_hidden_format`]), no leading or trailing whitespace, not blank.
#[must_use]
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && !name.chars().any(is_unwanted)
        && name.trim() == name
}

/// Checks a room name: the rules of [`valid_name`] with [`MAX_ROOM_BYTES`].
#[must_use]
pub fn valid_room(room: &str) -> bool {
    room.len() <= MAX_ROOM_BYTES && valid_name(room)
}

/// Strips control and hidden format characters from chat text; `None` if the result is blank or
/// longer than [`MAX_CHAT_BYTES`].
#[must_use]
pub fn clean_chat(text: &str) -> Option<String> {
    let s: String = text.chars().filter(|c| !is_unwanted(*c)).collect();
    (!s.trim().is_empty() && s.len() <= MAX_CHAT_BYTES).then_some(s)
}

/// QUIC application close codes used by quicktick (the close reason carries a readable message).
pub mod close {
    /// Normal close by the peer (player quit).
    pub const QUIT: u32 = 0;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 1;
    /// The peer sent bytes that violate the protocol (malformed, oversized, invalid values).
    pub const PROTOCOL_VIOLATION: u32 = 2;
    /// The join was refused (reason in the `Refused` frame and the close reason).
    pub const REFUSED: u32 = 3;
    /// The client did not complete `hello` in time.
    pub const HANDSHAKE_TIMEOUT: u32 = 4;
    /// The client did not read its stream fast enough.
    pub const SLOW_CONSUMER: u32 = 5;
    /// The server hit an internal error (its simulation stopped); reconnect later.
    pub const INTERNAL_ERROR: u32 = 6;
    /// A newer connection of the same player took over (resume or the same identity joined again).
    pub const REPLACED: u32 = 7;
    /// Sent by a client that abandons a silent path and will resume on a new connection: the server
    /// keeps the session for the grace window (unlike [`QUIT`]).
    pub const RECONNECTING: u32 = 8;
    /// The client's IP address already has `max_connections_per_ip` connections open or opening.
    pub const TOO_MANY_CONNECTIONS: u32 = 9;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::EntityId;

    #[test]
    fn input_datagram_round_trip_and_hostile_bytes() {
        let d = InputDatagram {
            snapshot_ack: Some(Tick(u32::MAX)),
            inputs: (0..3)
                .map(|t| InputCmd {
                    tick: Tick(t),
                    move_x: 0.6,
                    move_y: -0.8,
                    aim: 1.0,
                    buttons: 1,
                    view_tick: Tick(t),
                    view_frac: 0,
                })
                .collect(),
        };
        let bytes = d.encode().unwrap_or_default();
        assert_eq!(InputDatagram::decode(&bytes), Ok(d.clone()));
        for n in 0..bytes.len() {
            assert!(
                InputDatagram::decode(bytes.get(..n).unwrap_or_default()).is_err(),
                "truncated at {n}"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(InputDatagram::decode(&trailing), Err(WireError::Trailing));
        assert!(matches!(
            InputDatagram::decode(&[0x7f, 1, 2]),
            Err(WireError::UnknownKind(0x7f))
        ));
        assert!(matches!(
            InputDatagram::decode(&vec![1u8; 4000]),
            Err(WireError::TooLarge(..))
        ));
        let nan = InputDatagram {
            inputs: vec![InputCmd {
                move_x: f32::NAN,
                ..InputCmd::idle(Tick(1))
            }],
            ..d.clone()
        };
        let bytes =
            encode_vec::<_, MAX_INPUT_DATAGRAM>(&nan, &[DATAGRAM_INPUT]).unwrap_or_default();
        assert!(matches!(
            InputDatagram::decode(&bytes),
            Err(WireError::Input(InputError::NonFinite))
        ));
        let unordered = InputDatagram {
            inputs: vec![InputCmd::idle(Tick(5)), InputCmd::idle(Tick(5))],
            ..d
        };
        let bytes =
            encode_vec::<_, MAX_INPUT_DATAGRAM>(&unordered, &[DATAGRAM_INPUT]).unwrap_or_default();
        assert!(matches!(
            InputDatagram::decode(&bytes),
            Err(WireError::Invalid(_))
        ));
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let msgs = vec![
            ServerMsg::Chat(ChatLine {
                seq: 7,
                from: 2,
                client_msg_id: 9,
                scope: ChatScope::Room("lobby".into()),
                text: "héllo".into(),
            }),
            ServerMsg::PlayerJoined(PlayerInfo {
                id: 3,
                name: "x".into(),
                avatar: EntityId {
                    index: 4,
                    generation: 1,
                },
                state: PresenceState::Ready,
                room: LOBBY_ROOM.into(),
            }),
            ServerMsg::PlayerLeft {
                id: 3,
                reason: LeaveReason::TimedOut,
            },
        ];
        let bytes: Vec<u8> = msgs
            .iter()
            .flat_map(|m| encode_frame(m).unwrap_or_default())
            .collect();
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for b in bytes {
            dec.extend(&[b]);
            while let Ok(Some(m)) = dec.next_msg::<ServerMsg>() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn draining_round_trips_as_the_last_variant() {
        let m = ServerMsg::Draining {
            reason: "server shutting down".into(),
            drain_ms: 10_000,
        };
        let frame = encode_frame(&m).unwrap_or_default();
        // Variant index 11 (after `Typing`), then the reason and the varint drain time.
        assert_eq!(frame.get(2), Some(&11));
        let mut dec = FrameDecoder::new();
        dec.extend(&frame);
        assert_eq!(dec.next_msg::<ServerMsg>(), Ok(Some(m)));
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut dec = FrameDecoder::new();
        dec.extend(&[0xff, 0xff]);
        assert!(matches!(
            dec.next_msg::<ClientMsg>(),
            Err(WireError::TooLarge(..))
        ));
        let mut dec = FrameDecoder::new();
        dec.extend(&[0, 3, 9, 9, 9]);
        assert!(matches!(
            dec.next_msg::<ClientMsg>(),
            Err(WireError::Malformed(_))
        ));
        // A string length prefix far beyond the frame must not allocate or panic.
        let mut dec = FrameDecoder::new();
        dec.extend(&[0, 6, 0, 1, 253, 0xff, 0xff, 0xff]);
        assert!(dec.next_msg::<ClientMsg>().is_err());
    }

    #[test]
    fn frames_up_to_the_limit_decode_and_a_full_lobby_welcome_fits() {
        // A chat frame of exactly MAX_FRAME payload bytes decodes (the server then rejects the
        // text as too long, without closing the connection).
        let mut text = "x".repeat(MAX_FRAME - 8);
        let mut frame = encode_frame(&ClientMsg::Chat {
            client_msg_id: 1,
            channel: Channel::Global,
            text: text.clone(),
        })
        .unwrap_or_default();
        while frame.len() - 2 < MAX_FRAME {
            text.push('x');
            frame = encode_frame(&ClientMsg::Chat {
                client_msg_id: 1,
                channel: Channel::Global,
                text: text.clone(),
            })
            .unwrap_or_default();
        }
        assert_eq!(frame.len() - 2, MAX_FRAME);
        let mut dec = FrameDecoder::new();
        dec.extend(&frame);
        assert!(matches!(
            dec.next_msg::<ClientMsg>(),
            Ok(Some(ClientMsg::Chat { .. }))
        ));
        // The largest lobby (MAX_PLAYERS, longest names) still fits one welcome frame.
        let players = (0..MAX_PLAYERS as u32)
            .map(|id| PlayerInfo {
                id,
                name: "n".repeat(MAX_NAME_BYTES),
                avatar: EntityId {
                    index: 65535,
                    generation: 65535,
                },
                state: PresenceState::InMatch,
                room: "r".repeat(MAX_ROOM_BYTES),
            })
            .collect();
        let w = Welcome {
            player_id: 1,
            tick_rate: 60,
            map_id: "m".repeat(64),
            map_width: 1.0,
            map_height: 1.0,
            avatar: EntityId {
                index: 1,
                generation: 1,
            },
            server_tick: Tick(u32::MAX),
            input_redundancy: 4,
            players,
            chat_seq: u64::MAX,
            walls: vec![[0.0; 4]; 64],
            lag_comp_ms: 200,
            resume_token: vec![0xff; RESUME_TOKEN_BYTES],
            grace_ms: u32::MAX,
        };
        let frame = encode_frame(&ServerMsg::Welcome(w.clone())).unwrap_or_default();
        let mut dec = FrameDecoder::new();
        dec.extend(&frame);
        assert_eq!(dec.next_msg::<ServerMsg>(), Ok(Some(ServerMsg::Welcome(w))));
    }

    #[test]
    fn names_and_chat_cleaning() {
        assert!(valid_name("bot-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("   "));
        assert!(!valid_name("a\nb"));
        assert!(!valid_name(&"x".repeat(MAX_NAME_BYTES + 1)));
        assert_eq!(clean_chat("hi\u{7}\tthere"), Some("hithere".into()));
        assert_eq!(clean_chat("\u{1b}\u{0}"), None);
        assert!(!valid_name("\u{200b}"));
        assert!(!valid_name("\u{202e}exe.txt"));
        assert_eq!(clean_chat("\u{200b}"), None);
        assert_eq!(clean_chat("\u{202e}txt.exe"), Some("txt.exe".into()));
        assert_eq!(clean_chat(&"y".repeat(MAX_CHAT_BYTES + 1)), None);
    }
}
