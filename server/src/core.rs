//! The server's authoritative core, free of I/O: the world, the lobby, every client's session and
//! the snapshot history. The tick thread feeds it events and executes the outputs it returns, so the
//! whole server logic runs in tests without sockets.

use std::collections::BTreeMap;
use std::sync::Arc;

use quicktick_shared::delta::SnapshotEncoder;
use quicktick_shared::entity::EntityId;
use quicktick_shared::input::{InputCmd, InputCounters};
use quicktick_shared::lobby::PresenceOutcome;
use quicktick_shared::lobby::{ChatOutcome, Lobby};
use quicktick_shared::map::Map;
use quicktick_shared::session::ServerSession;
use quicktick_shared::sim::Entity;
use quicktick_shared::sim::{SimConfig, SimEvent, World};
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{
    close, Channel, ClientMsg, ErrorCode, InputDatagram, LeaveReason, PlayerInfo, RefuseReason,
    ResumeRequest, Resumed, ServerMsg, Welcome, RESUME_TOKEN_BYTES,
};

use crate::config::ServerConfig;
use crate::interest::{Grid, InterestConfig};
use crate::replicate::{Frame, Limits, Replicator, Scratch};
use crate::telemetry::{NoProbe, Phase, TickProbe};

/// Identifies one QUIC connection for the life of the server.
pub type ConnId = u64;

/// An event for the core.
#[derive(Debug, Clone)]
pub enum CoreEvent {
    /// A connection sent `hello`.
    Hello {
        /// Connection.
        conn: ConnId,
        /// Protocol version it speaks.
        version: u16,
        /// Requested name.
        name: String,
        /// Connect token, if the client sent one.
        token: Option<String>,
        /// Wall-clock time of the hello, seconds since the Unix epoch (token expiry).
        now_unix: u64,
    },
    /// A decoded, validated input datagram.
    Input {
        /// Connection.
        conn: ConnId,
        /// The datagram.
        datagram: InputDatagram,
        /// Its size on the wire.
        bytes: usize,
    },
    /// A connection asked to resume a session (its first message).
    Resume {
        /// Connection.
        conn: ConnId,
        /// The request.
        req: ResumeRequest,
    },
    /// A stream message after the join (chat, presence, typing, room).
    Msg {
        /// Connection.
        conn: ConnId,
        /// The message.
        msg: ClientMsg,
    },
    /// The connection is gone.
    Gone {
        /// Connection.
        conn: ConnId,
        /// Why.
        reason: LeaveReason,
    },
}

/// Something the I/O shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum CoreOutput {
    /// Send a frame on the client's stream.
    Frame(ConnId, ServerMsg),
    /// Send a datagram (already within the size the shell reported for this connection).
    Datagram(ConnId, Vec<u8>),
    /// Send the queued frames, then close with this code and reason.
    CloseAfterFlush(ConnId, u32, String),
}

/// Counters of the core (the shell adds I/O counters of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreCounters {
    /// Ticks simulated.
    pub ticks: u64,
    /// Joins accepted.
    pub joins: u64,
    /// Joins refused.
    pub refusals: u64,
    /// Chat lines accepted.
    pub chat_lines: u64,
    /// Chat lines dropped by the per-player rate limit.
    pub chat_rate_limited: u64,
    /// Keyframes sent.
    pub keyframes: u64,
    /// Deltas sent.
    pub deltas: u64,
    /// Snapshot datagrams produced.
    pub snapshot_parts: u64,
    /// Snapshot bytes produced.
    pub snapshot_bytes: u64,
    /// Largest snapshot (all parts), bytes.
    pub snapshot_bytes_max: u64,
    /// Entity entries (spawn/update/despawn) sent, over all clients.
    pub entries: u64,
    /// Bits of part headers sent.
    pub header_bits: u64,
    /// Bits of index sections sent.
    pub index_bits: u64,
    /// Bits of entry bodies sent.
    pub body_bits: u64,
    /// Sum of the sizes of the views sent (entities each client held after each snapshot).
    pub view_entities: u64,
    /// Largest snapshot datagram, bytes.
    pub max_datagram_bytes: u64,
    /// Snapshots that could not be encoded (datagram limit below the protocol minimum).
    pub encode_failures: u64,
    /// Events from connections that are not (or no longer) players.
    pub stray_events: u64,
    /// Shots fired.
    pub shots: u64,
    /// Shots that hit.
    pub hits: u64,
    /// Shots judged against a rewound (lag-compensated) view.
    pub compensated_shots: u64,
    /// Input counters summed over players that left.
    pub departed_inputs: InputCounters,
    /// Sessions resumed on a new connection.
    pub resumes: u64,
    /// Of which had to restart from a keyframe (the client's baseline was no longer usable).
    pub resume_keyframes: u64,
    /// Resume requests refused (unknown player, wrong token, grace window passed).
    pub resume_refusals: u64,
    /// Connections closed because a newer one of the same player took over.
    pub replaced: u64,
    /// Dropped players whose grace window passed without a resume (removed for good).
    pub sessions_expired: u64,
    /// Typing indicators dropped by the rate limit.
    pub typing_dropped: u64,
    /// Presence changes accepted.
    pub presence_changes: u64,
    /// Per-client snapshots skipped because the client stopped acknowledging (sent every 8th tick).
    pub quiet_skips: u64,
    /// Error notices not sent because the player already got [`ERRORS_PER_S`] this second.
    pub errors_dropped: u64,
}

/// What the shell knows about a connection's path right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkState {
    /// Largest datagram the connection accepts now (`None`: datagrams unusable).
    pub max_datagram: Option<usize>,
    /// What the congestion controller would carry, bytes/s (congestion window / RTT); `None`: no cap.
    pub congestion_bytes_per_s: Option<f64>,
}

#[derive(Debug)]
struct Player {
    session: ServerSession,
    info: PlayerInfo,
    /// Path state, refreshed by the shell every tick.
    link: LinkState,
    /// Interest, priority and budget state.
    replicator: Replicator,
    /// Tick of the last rate-limit notice sent to this player.
    rate_notice: Option<u64>,
    /// The secret a resume must present (rotated at each resume).
    resume_token: Vec<u8>,
    /// The connect-token account this player joined with, if any (a second join replaces).
    account: Option<u64>,
    /// This tick's snapshot is skipped: the client stopped acknowledging.
    quiet: bool,
    /// Error notices sent in the current one-second window: (window start tick, count).
    errors: (u64, u32),
}

/// A dropped player's session, kept for the grace window.
#[derive(Debug)]
struct Parked {
    player: Player,
    /// The avatar, out of the world with its slot reserved.
    avatar: Option<Entity>,
    /// Core tick count at which the session is dropped for good.
    expires: u64,
}

/// The authoritative server state.
#[derive(Debug)]
pub struct ServerCore {
    cfg: ServerConfig,
    world: World,
    lobby: Lobby,
    current: Arc<Snapshot>,
    /// The last [`RECENT_TICKS`] world snapshots, oldest first (lag compensation rewinds into them).
    recent: std::collections::VecDeque<Arc<Snapshot>>,
    grid: Grid,
    scratch_rep: Scratch,
    encoder: SnapshotEncoder,
    players: BTreeMap<ConnId, Player>,
    /// Connection of each online player, by player id.
    conn_of: BTreeMap<u32, ConnId>,
    /// Dropped players within their grace window, by player id.
    parked: BTreeMap<u32, Parked>,
    /// Secure randomness for resume tokens.
    rng: ring::rand::SystemRandom,
    shutting_down: bool,
    /// Whether joins need a signed connect token.
    auth_required: bool,
    /// The token secret (when tokens are required).
    auth_secret: Option<Vec<u8>>,
    /// Nonces of tokens already used.
    replay: crate::auth::ReplayGuard,
    events: Vec<SimEvent>,
    scratch: Vec<Vec<u8>>,
    /// Counters.
    pub counters: CoreCounters,
}

impl ServerCore {
    /// A core with the world at `cfg.start_tick`.
    #[must_use]
    pub fn new(cfg: ServerConfig, map: Map) -> Self {
        let sim = SimConfig {
            tick_rate: cfg.tick_rate,
            npc_count: cfg.npc_count,
            seed: cfg.seed,
        };
        let world = World::new(map, sim, Tick(cfg.start_tick));
        Self {
            lobby: Lobby::with_history(cfg.max_players, cfg.chat_history),
            current: Arc::new(world.snapshot()),
            recent: std::collections::VecDeque::new(),
            grid: Grid::default(),
            scratch_rep: Scratch::default(),
            world,
            encoder: SnapshotEncoder::new(),
            players: BTreeMap::new(),
            conn_of: BTreeMap::new(),
            parked: BTreeMap::new(),
            rng: ring::rand::SystemRandom::new(),
            shutting_down: false,
            auth_required: false,
            auth_secret: None,
            replay: crate::auth::ReplayGuard::default(),
            events: Vec::new(),
            scratch: Vec::new(),
            counters: CoreCounters::default(),
            cfg,
        }
    }

    /// The world.
    #[must_use]
    pub fn world(&self) -> &World {
        &self.world
    }

    /// Requires signed connect tokens, verified with `secret`, from now on.
    pub fn require_tokens(&mut self, secret: Vec<u8>) {
        self.auth_required = true;
        self.auth_secret = Some(secret);
    }

    /// The world, mutably (tests and benches that stage scenes).
    pub fn world_mut(&mut self) -> &mut World {
        &mut self.world
    }

    /// The view sent to a connection at `tick`, if still kept (tests compare the client's to it).
    #[must_use]
    pub fn sent_view(&self, conn: ConnId, tick: Tick) -> Option<Arc<Snapshot>> {
        self.players
            .get(&conn)
            .and_then(|p| p.session.sent_view(tick))
            .cloned()
    }

    /// The current tick's snapshot.
    #[must_use]
    pub fn current_snapshot(&self) -> &Arc<Snapshot> {
        &self.current
    }

    /// The lobby roster.
    #[must_use]
    pub fn roster(&self) -> Vec<PlayerInfo> {
        self.lobby.roster()
    }

    /// Number of players.
    #[must_use]
    pub fn player_count(&self) -> usize {
        self.players.len()
    }

    /// Input counters summed over current and departed players.
    #[must_use]
    pub fn input_counters(&self) -> InputCounters {
        let mut c = self.counters.departed_inputs;
        for p in self.players.values() {
            add_counters(&mut c, &p.session.inputs.counters);
        }
        for p in self.parked.values() {
            add_counters(&mut c, &p.player.session.inputs.counters);
        }
        c
    }

    /// Updates the datagram size limit of a connection (`None`: datagrams unsupported or closed).
    pub fn set_max_datagram(&mut self, conn: ConnId, max: Option<usize>) {
        if let Some(p) = self.players.get_mut(&conn) {
            p.link.max_datagram = max;
        }
    }

    /// Updates everything known about a connection's path.
    pub fn set_link(&mut self, conn: ConnId, link: LinkState) {
        if let Some(p) = self.players.get_mut(&conn) {
            p.link = link;
        }
    }

    /// Counts stream bytes queued to a connection.
    pub fn count_stream_bytes(&mut self, conn: ConnId, bytes: usize) {
        if let Some(p) = self.players.get_mut(&conn) {
            p.session.counters.stream_bytes += bytes as u64;
        }
    }

    /// Per-player session counters, by player id.
    pub fn session_counters(
        &self,
    ) -> impl Iterator<Item = (u32, quicktick_shared::session::SessionCounters)> + '_ {
        self.players
            .values()
            .map(|p| (p.info.id, p.session.counters))
    }

    /// Connections of current players.
    pub fn conns(&self) -> impl Iterator<Item = ConnId> + '_ {
        self.players.keys().copied()
    }

    /// Handles one event.
    pub fn handle(&mut self, ev: CoreEvent, out: &mut Vec<CoreOutput>) {
        match ev {
            CoreEvent::Hello {
                conn,
                version,
                name,
                token,
                now_unix,
            } => {
                self.hello(conn, version, &name, token.as_deref(), now_unix, out);
            }
            CoreEvent::Input {
                conn,
                datagram,
                bytes,
            } => match self.players.get_mut(&conn) {
                Some(p) => p.session.handle_input(&datagram, bytes),
                None => self.counters.stray_events += 1,
            },
            CoreEvent::Resume { conn, req } => self.resume(conn, &req, out),
            CoreEvent::Msg { conn, msg } => self.message(conn, msg, out),
            CoreEvent::Gone { conn, reason } => self.gone(conn, reason, out),
        }
    }

    /// Checks a connect token against the join policy; returns the name to use and the token's
    /// account id.
    fn admit_token(
        &mut self,
        name: &str,
        token: Option<&str>,
        now_unix: u64,
    ) -> Result<(String, Option<u64>), RefuseReason> {
        let Some(secret) = self.auth_secret.as_deref().filter(|_| self.auth_required) else {
            return Ok((name.to_owned(), None));
        };
        let body =
            crate::auth::verify(secret, token.ok_or(RefuseReason::TokenRequired)?, now_unix)?;
        if !self.replay.first_use(&body, now_unix) {
            return Err(RefuseReason::TokenReplayed);
        }
        Ok((body.name, Some(body.player_id)))
    }

    fn refuse(
        &mut self,
        conn: ConnId,
        reason: RefuseReason,
        version: u16,
        out: &mut Vec<CoreOutput>,
    ) {
        self.counters.refusals += 1;
        let detail = match reason {
            RefuseReason::VersionMismatch => format!(
                "protocol version {version} is not supported (server speaks {})",
                quicktick_shared::wire::PROTOCOL_VERSION
            ),
            RefuseReason::ServerFull => {
                format!("server full ({} players)", self.cfg.max_players)
            }
            RefuseReason::BadName => "name must be 1..=32 bytes with no control characters".into(),
            RefuseReason::ShuttingDown => "server shutting down".into(),
            RefuseReason::TokenRequired => "this server requires a connect token".into(),
            RefuseReason::TokenInvalid => {
                "the connect token is malformed or not signed by this server".into()
            }
            RefuseReason::TokenExpired => "the connect token has expired".into(),
            RefuseReason::TokenReplayed => "the connect token was already used".into(),
            RefuseReason::NameTaken => "another player has this name".into(),
            RefuseReason::ResumeUnknown => {
                "no session to resume (unknown player, wrong token or grace window passed): join with hello"
                    .into()
            }
        };
        out.push(CoreOutput::Frame(
            conn,
            ServerMsg::Refused {
                reason,
                detail: detail.clone(),
            },
        ));
        out.push(CoreOutput::CloseAfterFlush(conn, close::REFUSED, detail));
    }

    fn new_resume_token(&self) -> Vec<u8> {
        let mut t = vec![0u8; RESUME_TOKEN_BYTES];
        if ring::rand::SecureRandom::fill(&self.rng, &mut t).is_err() {
            // No entropy source: a token nobody can guess is impossible, so resumes are disabled
            // for this session (an empty token never matches).
            t.clear();
        }
        t
    }

    fn welcome(&self, info: &PlayerInfo, resume_token: Vec<u8>) -> Welcome {
        Welcome {
            player_id: info.id,
            tick_rate: self.cfg.tick_rate as u16,
            map_id: self.world.map().id.clone(),
            map_width: self.world.map().width,
            map_height: self.world.map().height,
            avatar: info.avatar,
            server_tick: self.world.tick(),
            input_redundancy: self.cfg.input_redundancy,
            players: self.lobby.roster(),
            chat_seq: self.lobby.chat_seq(),
            walls: self
                .world
                .map()
                .walls
                .iter()
                .map(|w| [w.min.x, w.min.y, w.max.x, w.max.y])
                .collect(),
            lag_comp_ms: self.cfg.lag_comp_ms.min(u32::from(u16::MAX)) as u16,
            resume_token,
            grace_ms: self.cfg.resume_grace_ms,
        }
    }

    fn hello(
        &mut self,
        conn: ConnId,
        version: u16,
        name: &str,
        token: Option<&str>,
        now_unix: u64,
        out: &mut Vec<CoreOutput>,
    ) {
        if self.players.contains_key(&conn) {
            out.push(CoreOutput::Frame(
                conn,
                ServerMsg::Error {
                    code: ErrorCode::UnexpectedMessage,
                    detail: "already joined".into(),
                },
            ));
            return;
        }
        let admitted = if self.shutting_down {
            Err(RefuseReason::ShuttingDown)
        } else if version != quicktick_shared::wire::PROTOCOL_VERSION {
            Err(RefuseReason::VersionMismatch)
        } else {
            self.admit_token(name, token, now_unix)
        };
        let (name, account) = match admitted {
            Ok(a) => a,
            Err(reason) => return self.refuse(conn, reason, version, out),
        };
        // The same account joining again takes over its player: never two avatars.
        if let Some(account) = account {
            let existing = self
                .players
                .iter()
                .find(|(_, p)| p.account == Some(account))
                .map(|(_, p)| p.info.id)
                .or_else(|| {
                    self.parked
                        .iter()
                        .find(|(_, p)| p.player.account == Some(account))
                        .map(|(id, _)| *id)
                });
            if let Some(id) = existing {
                if let Some(player) = self.take_session(id, out) {
                    let token = self.new_resume_token();
                    self.attach(conn, player, None, token, out);
                    return;
                }
            }
        }
        let check = self.lobby.check_join(version, &name);
        let avatar = check.and_then(|()| self.world.spawn_player().ok_or(RefuseReason::ServerFull));
        let avatar = match avatar {
            Ok(a) => a,
            Err(reason) => return self.refuse(conn, reason, version, out),
        };
        let info = self.lobby.join(&name, avatar);
        self.counters.joins += 1;
        // Presence first to everyone already in, then the welcome (with the full roster) to the new one.
        for c in self.players.keys() {
            out.push(CoreOutput::Frame(*c, ServerMsg::PlayerJoined(info.clone())));
        }
        let resume_token = self.new_resume_token();
        out.push(CoreOutput::Frame(
            conn,
            ServerMsg::Welcome(self.welcome(&info, resume_token.clone())),
        ));
        let history = self.cfg.snapshot_history as usize;
        let session = ServerSession::new(info.id, avatar, self.world.tick().next(), history);
        let player = Player {
            rate_notice: None,
            session,
            link: LinkState::default(),
            replicator: Replicator::default(),
            resume_token,
            account,
            quiet: false,
            errors: (0, 0),
            info,
        };
        self.conn_of.insert(player.info.id, conn);
        self.players.insert(conn, player);
    }

    /// Detaches player `id` from wherever it is (an online connection, which is closed as
    /// replaced, or the parked set) with its avatar back in the world. `None` if there is no such
    /// session or its avatar cannot come back.
    fn take_session(&mut self, id: u32, out: &mut Vec<CoreOutput>) -> Option<Player> {
        if let Some(old) = self.conn_of.remove(&id) {
            let p = self.players.remove(&old)?;
            self.counters.replaced += 1;
            out.push(CoreOutput::CloseAfterFlush(
                old,
                close::REPLACED,
                "replaced by a newer connection of this player".into(),
            ));
            return Some(p);
        }
        let parked = self.parked.remove(&id)?;
        if let Some(e) = parked.avatar {
            if !self.world.restore(e) {
                self.lobby.leave(id);
                return None;
            }
        }
        Some(parked.player)
    }

    /// Attaches a taken-over session to `conn`: a `Resumed` (when the client holds snapshots:
    /// `resume` = its held tick and chat cursor) or a fresh `Welcome`, presence for the others, and
    /// the chat replay.
    fn attach(
        &mut self,
        conn: ConnId,
        mut player: Player,
        resume: Option<(Option<Tick>, u64)>,
        token: Vec<u8>,
        out: &mut Vec<CoreOutput>,
    ) {
        let id = player.info.id;
        let came_back = self.lobby.set_online(id, true).is_some();
        if let Some(info) = self.lobby.member(id) {
            player.info = info.clone();
        }
        player.resume_token = token.clone();
        player.link = LinkState::default();
        player.rate_notice = None;
        let next = self.world.tick().next();
        if came_back {
            for c in self.players.keys() {
                out.push(CoreOutput::Frame(
                    *c,
                    ServerMsg::PlayerJoined(player.info.clone()),
                ));
            }
        }
        match resume {
            Some((held, cursor)) => {
                let baseline = player.session.resume(held, next);
                self.counters.resumes += 1;
                if baseline.is_none() {
                    self.counters.resume_keyframes += 1;
                }
                let (lines, truncated) = self.lobby.replay(id, cursor);
                out.push(CoreOutput::Frame(
                    conn,
                    ServerMsg::Resumed(Resumed {
                        player_id: id,
                        avatar: player.info.avatar,
                        server_tick: self.world.tick(),
                        players: self.lobby.roster(),
                        resume_token: token,
                        baseline,
                        chat_truncated: truncated,
                        chat_replayed: lines.len() as u32,
                    }),
                ));
                out.extend(
                    lines
                        .into_iter()
                        .map(|l| CoreOutput::Frame(conn, ServerMsg::Chat(l))),
                );
            }
            None => {
                player.session.resume(None, next);
                out.push(CoreOutput::Frame(
                    conn,
                    ServerMsg::Welcome(self.welcome(&player.info, token)),
                ));
            }
        }
        self.conn_of.insert(id, conn);
        self.players.insert(conn, player);
    }

    fn resume(&mut self, conn: ConnId, req: &ResumeRequest, out: &mut Vec<CoreOutput>) {
        if self.players.contains_key(&conn) {
            out.push(CoreOutput::Frame(
                conn,
                ServerMsg::Error {
                    code: ErrorCode::UnexpectedMessage,
                    detail: "already joined".into(),
                },
            ));
            return;
        }
        let refusal = if self.shutting_down {
            Some(RefuseReason::ShuttingDown)
        } else if req.version != quicktick_shared::wire::PROTOCOL_VERSION {
            Some(RefuseReason::VersionMismatch)
        } else {
            let token = self
                .conn_of
                .get(&req.player_id)
                .and_then(|c| self.players.get(c))
                .or_else(|| self.parked.get(&req.player_id).map(|p| &p.player))
                .map(|p| p.resume_token.as_slice());
            match token {
                Some(t) if !t.is_empty() && tokens_equal(t, &req.token) => None,
                _ => Some(RefuseReason::ResumeUnknown),
            }
        };
        if let Some(reason) = refusal {
            if reason == RefuseReason::ResumeUnknown {
                self.counters.resume_refusals += 1;
            }
            return self.refuse(conn, reason, req.version, out);
        }
        let Some(player) = self.take_session(req.player_id, out) else {
            self.counters.resume_refusals += 1;
            return self.refuse(conn, RefuseReason::ResumeUnknown, req.version, out);
        };
        let token = self.new_resume_token();
        self.attach(
            conn,
            player,
            Some((req.snapshot_ack, req.chat_cursor)),
            token,
            out,
        );
    }

    /// Seconds of simulated time as the clock of rate limits.
    fn now(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(
            self.counters.ticks as f64 / f64::from(self.cfg.tick_rate),
        )
    }

    /// Sends a non-fatal error notice, at most [`ERRORS_PER_S`] per player per second (more are
    /// dropped and counted): refusals must not become a flood of their own.
    fn error(&mut self, out: &mut Vec<CoreOutput>, conn: ConnId, code: ErrorCode, detail: String) {
        let ticks = self.counters.ticks;
        let window = u64::from(self.cfg.tick_rate);
        if let Some(p) = self.players.get_mut(&conn) {
            if ticks >= p.errors.0 + window {
                p.errors = (ticks, 0);
            }
            if p.errors.1 >= ERRORS_PER_S {
                self.counters.errors_dropped += 1;
                return;
            }
            p.errors.1 += 1;
        }
        out.push(CoreOutput::Frame(conn, ServerMsg::Error { code, detail }));
    }

    fn message(&mut self, conn: ConnId, msg: ClientMsg, out: &mut Vec<CoreOutput>) {
        let Some(id) = self.players.get(&conn).map(|p| p.info.id) else {
            self.counters.stray_events += 1;
            return;
        };
        let now = self.now();
        match msg {
            ClientMsg::Chat {
                client_msg_id,
                channel,
                text,
            } => self.chat(conn, client_msg_id, &channel, &text, out),
            ClientMsg::Hello { .. } | ClientMsg::Resume(_) => self.error(
                out,
                conn,
                ErrorCode::UnexpectedMessage,
                "already joined".into(),
            ),
            ClientMsg::SetPresence { state } => {
                let o = self.lobby.set_state(id, state, now);
                self.presence(conn, o, out);
            }
            ClientMsg::JoinRoom { room } => {
                let o = self.lobby.join_room(id, &room, now);
                self.presence(conn, o, out);
            }
            ClientMsg::Typing { channel } => match self.lobby.typing(id, &channel, now) {
                Some((scope, to)) => {
                    for p in to {
                        if let Some(c) = self.conn_of.get(&p) {
                            out.push(CoreOutput::Frame(
                                *c,
                                ServerMsg::Typing {
                                    id,
                                    scope: scope.clone(),
                                },
                            ));
                        }
                    }
                }
                None => self.counters.typing_dropped += 1,
            },
        }
    }

    fn presence(&mut self, conn: ConnId, o: PresenceOutcome, out: &mut Vec<CoreOutput>) {
        match o {
            PresenceOutcome::Changed(info, to) => {
                self.counters.presence_changes += 1;
                if let Some(p) = self.players.get_mut(&conn) {
                    p.info = info.clone();
                }
                for p in to {
                    if let Some(c) = self.conn_of.get(&p) {
                        out.push(CoreOutput::Frame(
                            *c,
                            ServerMsg::Presence {
                                id: info.id,
                                state: info.state,
                                room: info.room.clone(),
                            },
                        ));
                    }
                }
            }
            PresenceOutcome::Unchanged => {}
            PresenceOutcome::BadRoom => self.error(
                out,
                conn,
                ErrorCode::BadRoom,
                format!(
                    "room names are 1..={} bytes without control characters or surrounding spaces",
                    quicktick_shared::wire::MAX_ROOM_BYTES,
                ),
            ),
            PresenceOutcome::TooFast => self.error(
                out,
                conn,
                ErrorCode::RateLimited,
                format!(
                    "presence changes limited to one per {} ms",
                    quicktick_shared::lobby::PRESENCE_INTERVAL.as_millis()
                ),
            ),
            PresenceOutcome::UnknownPlayer => self.counters.stray_events += 1,
        }
    }

    fn chat(
        &mut self,
        conn: ConnId,
        client_msg_id: u32,
        channel: &Channel,
        text: &str,
        out: &mut Vec<CoreOutput>,
    ) {
        let now = self.now();
        let ticks = self.counters.ticks;
        let rate = u64::from(self.cfg.tick_rate);
        let Some(id) = self.players.get(&conn).map(|p| p.info.id) else {
            self.counters.stray_events += 1;
            return;
        };
        match self.lobby.chat(id, client_msg_id, channel, text, now) {
            ChatOutcome::RateLimited => {
                self.counters.chat_rate_limited += 1;
                // Tell the sender, at most once a second (the notices must not flood it either).
                let notice = self
                    .players
                    .get_mut(&conn)
                    .is_some_and(|p| p.rate_notice.is_none_or(|t| ticks >= t + rate));
                if notice {
                    if let Some(p) = self.players.get_mut(&conn) {
                        p.rate_notice = Some(ticks);
                    }
                    self.error(
                        out,
                        conn,
                        ErrorCode::RateLimited,
                        format!(
                            "chat limited to {} lines/s (burst {}); line {client_msg_id} dropped",
                            quicktick_shared::lobby::CHAT_RATE_PER_S,
                            quicktick_shared::lobby::CHAT_BURST
                        ),
                    );
                }
            }
            ChatOutcome::Accepted(line, to) => {
                self.counters.chat_lines += 1;
                for p in to {
                    if let Some(c) = self.conn_of.get(&p) {
                        out.push(CoreOutput::Frame(*c, ServerMsg::Chat(line.clone())));
                    }
                }
            }
            ChatOutcome::Duplicate => {}
            ChatOutcome::Rejected => self.error(
                out,
                conn,
                ErrorCode::ChatRejected,
                format!(
                    "chat line {client_msg_id} is empty or longer than {} bytes",
                    quicktick_shared::wire::MAX_CHAT_BYTES
                ),
            ),
            ChatOutcome::UnknownRecipient => self.error(
                out,
                conn,
                ErrorCode::UnknownRecipient,
                format!("chat line {client_msg_id}: no such player to whisper to"),
            ),
            ChatOutcome::UnknownPlayer => self.counters.stray_events += 1,
        }
    }

    fn broadcast(&self, out: &mut Vec<CoreOutput>, msg: impl Fn(ConnId) -> ServerMsg) {
        for c in self.players.keys() {
            out.push(CoreOutput::Frame(*c, msg(*c)));
        }
    }

    /// A connection ended. A player who quit or was kicked leaves for good; one whose connection
    /// timed out or failed is parked for the grace window: out of the world and the roster (others
    /// see them leave), with the session kept for a resume.
    fn gone(&mut self, conn: ConnId, reason: LeaveReason, out: &mut Vec<CoreOutput>) {
        let Some(p) = self.players.remove(&conn) else {
            return;
        };
        let id = p.info.id;
        if self.conn_of.get(&id) == Some(&conn) {
            self.conn_of.remove(&id);
        }
        if reason == LeaveReason::TimedOut && self.cfg.resume_grace_ms > 0 && !self.shutting_down {
            let avatar = self.world.park(p.session.avatar);
            self.lobby.set_online(id, false);
            let grace_ticks =
                u64::from(self.cfg.resume_grace_ms) * u64::from(self.cfg.tick_rate) / 1000;
            self.parked.insert(
                id,
                Parked {
                    player: p,
                    avatar,
                    expires: self.counters.ticks + grace_ticks.max(1),
                },
            );
        } else {
            self.world.despawn(p.session.avatar);
            self.lobby.leave(id);
            add_counters(
                &mut self.counters.departed_inputs,
                &p.session.inputs.counters,
            );
        }
        self.broadcast(out, |_| ServerMsg::PlayerLeft { id, reason });
    }

    /// Drops parked sessions whose grace window has passed.
    fn expire_parked(&mut self) {
        let now = self.counters.ticks;
        let expired: Vec<u32> = self
            .parked
            .iter()
            .filter(|(_, p)| p.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = self.parked.remove(&id) {
                self.counters.sessions_expired += 1;
                if let Some(e) = p.avatar {
                    self.world.release(e.id);
                }
                self.lobby.leave(id);
                add_counters(
                    &mut self.counters.departed_inputs,
                    &p.player.session.inputs.counters,
                );
            }
        }
    }

    /// Number of dropped players waiting for a resume.
    #[must_use]
    pub fn parked_count(&self) -> usize {
        self.parked.len()
    }

    /// Runs one tick: each player's input for the tick, the simulation step, the snapshot, and a
    /// delta-encoded snapshot for every player within its connection's datagram limit.
    pub fn tick(&mut self, out: &mut Vec<CoreOutput>) {
        self.tick_probed(out, &mut NoProbe);
    }

    /// [`ServerCore::tick`], telling `probe` where each phase ends (inputs, sim, interest, encode);
    /// each phase also runs in a `trace`-level span of its name.
    pub fn tick_probed(&mut self, out: &mut Vec<CoreOutput>, probe: &mut impl TickProbe) {
        let span = tracing::trace_span!("inputs").entered();
        self.expire_parked();
        let inputs: Vec<(EntityId, InputCmd)> = self
            .players
            .values_mut()
            .map(|p| (p.session.avatar, p.session.inputs.take().0))
            .collect();
        drop(span);
        probe.phase_done(Phase::Inputs);
        let span = tracing::trace_span!("sim").entered();
        self.events.clear();
        let next = self.world.tick().next();
        let window_ticks = f64::from(self.cfg.lag_comp_ms) * f64::from(self.cfg.tick_rate) / 1000.0;
        let recent = &self.recent;
        let mut rewind =
            |_shooter: EntityId, cmd: &InputCmd| rewound_targets(recent, next, cmd, window_ticks);
        self.world.step_with(&inputs, &mut rewind, &mut self.events);
        for e in &self.events {
            if let SimEvent::Shot {
                shooter,
                hit,
                compensated,
            } = *e
            {
                self.counters.shots += 1;
                self.counters.hits += u64::from(hit.is_some());
                self.counters.compensated_shots += u64::from(compensated);
                if let Some((conn, _)) = self
                    .players
                    .iter()
                    .find(|(_, p)| p.session.avatar == shooter)
                {
                    out.push(CoreOutput::Frame(
                        *conn,
                        ServerMsg::ShotResult {
                            tick: next,
                            hit,
                            compensated,
                        },
                    ));
                }
            }
        }
        self.counters.ticks += 1;
        let snap = Arc::new(self.world.snapshot());
        self.current = snap.clone();
        if self.recent.len() >= RECENT_TICKS {
            self.recent.pop_front();
        }
        self.recent.push_back(snap.clone());
        if snap.tick.0.is_multiple_of(self.cfg.tick_rate) {
            for (conn, p) in &self.players {
                let c = p.session.inputs.counters;
                let stats = ServerMsg::InputStats {
                    applied: c.applied,
                    missing: c.missing,
                    late: c.late,
                    duplicates: c.duplicates,
                };
                out.push(CoreOutput::Frame(*conn, stats));
            }
        }
        drop(span);
        probe.phase_done(Phase::Sim);
        let span = tracing::trace_span!("interest").entered();
        let codec = self.world.codec();
        let interest = InterestConfig {
            radius: self.cfg.interest_radius,
            hysteresis: self.cfg.interest_hysteresis,
        };
        let cell_q = (interest.radius / quicktick_shared::quant::POS_QUANTUM) as u32;
        self.grid
            .rebuild(&snap, cell_q, codec.quant.max_qx, codec.quant.max_qy);
        let frame = Frame {
            world: &snap,
            grid: &self.grid,
            codec: &codec,
            interest,
        };
        // A client that stopped acknowledging (dead path, blackout, crash) for over a second gets a
        // snapshot every 8th tick only, until an ack arrives: little bandwidth into the void, and the
        // view it last acked stays a usable baseline far longer (see `ServerSession::baseline`).
        let quiet_after = self.cfg.tick_rate;
        let quiet_tick = !snap.tick.0.is_multiple_of(QUIET_EVERY);
        for p in self.players.values_mut() {
            p.quiet = quiet_tick && p.session.sent_since_ack() > quiet_after;
            if p.link.max_datagram.is_some() && !p.quiet {
                let baseline = p.session.baseline(snap.tick, self.cfg.snapshot_history);
                p.replicator.select(
                    &frame,
                    p.session.avatar,
                    baseline.as_deref(),
                    &mut self.scratch_rep,
                );
            }
        }
        drop(span);
        probe.phase_done(Phase::Interest);
        let _span = tracing::trace_span!("encode").entered();
        let rate = f64::from(self.cfg.tick_rate);
        for (conn, p) in &mut self.players {
            let Some(max) = p.link.max_datagram else {
                continue;
            };
            if p.quiet {
                self.counters.quiet_skips += 1;
                continue;
            }
            let budget = self.cfg.snapshot_budget_bytes_per_s as f64;
            let per_s = p
                .link
                .congestion_bytes_per_s
                .map_or(budget, |c| c.min(budget));
            let refill = per_s / rate;
            let limits = Limits {
                max_datagram: max,
                refill,
                capacity: 2.0 * refill,
            };
            let baseline = p.session.baseline(snap.tick, self.cfg.snapshot_history);
            let input_ack = p.session.inputs.newest_received();
            self.scratch.clear();
            match p.replicator.replicate(
                &frame,
                p.session.avatar,
                baseline.as_deref(),
                input_ack,
                limits,
                &mut self.scratch_rep,
                &mut self.encoder,
                &mut self.scratch,
            ) {
                Ok((view, stats)) => {
                    let c = &mut self.counters;
                    c.entries += stats.changed as u64;
                    c.header_bits += stats.header_bits as u64;
                    c.index_bits += stats.index_bits as u64;
                    c.body_bits += stats.body_bits as u64;
                    c.view_entities += view.entities.len() as u64;
                    let biggest = self.scratch.iter().map(Vec::len).max().unwrap_or(0);
                    c.max_datagram_bytes = c.max_datagram_bytes.max(biggest as u64);
                    p.session.record_sent(view, &stats);
                    if stats.keyframe {
                        c.keyframes += 1;
                    } else {
                        c.deltas += 1;
                    }
                    c.snapshot_parts += stats.parts as u64;
                    c.snapshot_bytes += stats.bytes as u64;
                    c.snapshot_bytes_max = c.snapshot_bytes_max.max(stats.bytes as u64);
                    probe.snapshot_built(stats.bytes);
                    out.extend(
                        self.scratch
                            .drain(..)
                            .map(|d| CoreOutput::Datagram(*conn, d)),
                    );
                }
                Err(e) => {
                    self.counters.encode_failures += 1;
                    tracing::warn!(conn, "snapshot not sent: {e}");
                }
            }
        }
        probe.phase_done(Phase::Encode);
    }

    /// Starts draining: refuses further joins (`ShuttingDown`) and tells every player why and how long
    /// the match goes on (`ServerMsg::Draining`). The world keeps running; [`Self::shutdown`] ends it.
    pub fn begin_drain(&mut self, reason: &str, drain_ms: u32, out: &mut Vec<CoreOutput>) {
        if self.shutting_down {
            return;
        }
        self.shutting_down = true;
        for c in self.players.keys() {
            out.push(CoreOutput::Frame(
                *c,
                ServerMsg::Draining {
                    reason: reason.to_owned(),
                    drain_ms,
                },
            ));
        }
    }

    /// Starts shutting down: refuses further joins and closes every player with a reason.
    pub fn shutdown(&mut self, out: &mut Vec<CoreOutput>) {
        self.shutting_down = true;
        for c in self.players.keys() {
            out.push(CoreOutput::CloseAfterFlush(
                *c,
                close::SHUTDOWN,
                "server shutting down".into(),
            ));
        }
    }

    /// Each player's connection, lobby entry and newest acked snapshot tick (for status pages).
    pub fn player_acks(&self) -> impl Iterator<Item = (ConnId, &PlayerInfo, Option<Tick>)> + '_ {
        self.players
            .iter()
            .map(|(c, p)| (*c, &p.info, p.session.acked()))
    }

    /// The player id of a connection, if it has joined.
    #[must_use]
    pub fn player_id(&self, conn: ConnId) -> Option<u32> {
        self.players.get(&conn).map(|p| p.info.id)
    }
}

/// Most error notices a player is sent per second.
pub const ERRORS_PER_S: u32 = 4;

/// A client that stopped acknowledging is sent a snapshot every this many ticks.
pub const QUIET_EVERY: u32 = 8;

/// Compares two tokens in time independent of where they differ.
fn tokens_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// World snapshots kept for lag compensation (≈1 s at 60 Hz; the window is at most 1000 ms).
pub const RECENT_TICKS: usize = 130;

/// The target positions a shooter saw: entities interpolated between the snapshots of `view_tick`
/// and the next at `view_frac`, if that view is within `window_ticks` of the tick being simulated.
fn rewound_targets(
    recent: &std::collections::VecDeque<Arc<Snapshot>>,
    now: Tick,
    cmd: &InputCmd,
    window_ticks: f64,
) -> Option<Vec<(EntityId, glam::Vec2)>> {
    let age = f64::from(now.diff(cmd.view_tick)) - f64::from(cmd.view_frac) / 256.0;
    if !(0.0..=window_ticks).contains(&age) {
        return None;
    }
    let a = recent.iter().rev().find(|s| s.tick == cmd.view_tick)?;
    let b = recent.iter().rev().find(|s| s.tick == cmd.view_tick.next());
    let t = f32::from(cmd.view_frac) / 256.0;
    let q = quicktick_shared::quant::POS_QUANTUM;
    Some(
        a.entities
            .iter()
            .map(|e| {
                let pa = glam::Vec2::new(e.qx as f32, e.qy as f32) * q;
                let pb = b
                    .and_then(|b| b.get(e.id.index))
                    .filter(|n| n.id == e.id)
                    .map_or(pa, |n| glam::Vec2::new(n.qx as f32, n.qy as f32) * q);
                (e.id, pa.lerp(pb, t))
            })
            .collect(),
    )
}

fn add_counters(acc: &mut InputCounters, c: &InputCounters) {
    acc.applied += c.applied;
    acc.missing += c.missing;
    acc.late += c.late;
    acc.duplicates += c.duplicates;
    acc.too_far_ahead += c.too_far_ahead;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use quicktick_shared::wire::PROTOCOL_VERSION;

    fn core(players: usize) -> ServerCore {
        let cfg = ServerConfig {
            max_players: players,
            npc_count: 50,
            start_tick: u32::MAX - 3,
            ..ServerConfig::default()
        };
        ServerCore::new(cfg, Map::open(64.0, 64.0))
    }

    fn frames(out: &[CoreOutput], conn: ConnId) -> Vec<ServerMsg> {
        out.iter()
            .filter_map(|o| match o {
                CoreOutput::Frame(c, m) if *c == conn => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn join_chat_presence_and_leave() {
        let mut c = core(8);
        let mut out = Vec::new();
        for conn in 1..=3 {
            c.handle(
                CoreEvent::Hello {
                    conn,
                    version: PROTOCOL_VERSION,
                    name: format!("p{conn}"),
                    token: None,
                    now_unix: 0,
                },
                &mut out,
            );
        }
        // Conn 1 saw p2 and p3 join; conn 3's welcome lists all three.
        let f1 = frames(&out, 1);
        assert!(matches!(&f1[0], ServerMsg::Welcome(w) if w.players.len() == 1));
        assert_eq!(
            f1.iter()
                .filter(|m| matches!(m, ServerMsg::PlayerJoined(_)))
                .count(),
            2
        );
        assert!(matches!(&frames(&out, 3)[0], ServerMsg::Welcome(w) if w.players.len() == 3));
        out.clear();
        for (conn, id) in [(2, 1), (1, 1), (2, 2), (2, 2)] {
            c.handle(
                CoreEvent::Msg {
                    conn,
                    msg: ClientMsg::Chat {
                        client_msg_id: id,
                        channel: Channel::Global,
                        text: format!("m{conn}.{id}"),
                    },
                },
                &mut out,
            );
        }
        for conn in 1..=3 {
            let seqs: Vec<u64> = frames(&out, conn)
                .iter()
                .filter_map(|m| match m {
                    ServerMsg::Chat(l) => Some(l.seq),
                    _ => None,
                })
                .collect();
            assert_eq!(
                seqs,
                vec![1, 2, 3],
                "same order for everyone, duplicate dropped"
            );
        }
        out.clear();
        let avatar = c.players[&2].session.avatar;
        c.handle(
            CoreEvent::Gone {
                conn: 2,
                reason: LeaveReason::TimedOut,
            },
            &mut out,
        );
        assert_eq!(
            c.parked_count(),
            1,
            "a timed-out player is parked for a resume"
        );
        assert!(c.world().entity(avatar).is_none(), "avatar left the world");
        assert_eq!(c.roster().len(), 2);
        assert!(frames(&out, 1).contains(&ServerMsg::PlayerLeft {
            id: 2,
            reason: LeaveReason::TimedOut
        }));
        // Events from a departed connection are ignored.
        c.handle(
            CoreEvent::Msg {
                conn: 2,
                msg: ClientMsg::Chat {
                    client_msg_id: 9,
                    channel: Channel::Global,
                    text: "ghost".into(),
                },
            },
            &mut out,
        );
        assert_eq!(c.counters.stray_events, 1);
    }

    #[test]
    fn snapshots_fit_each_connections_limit_and_become_deltas() {
        let mut c = core(4);
        let mut out = Vec::new();
        for conn in 1..=2 {
            c.handle(
                CoreEvent::Hello {
                    conn,
                    version: PROTOCOL_VERSION,
                    name: format!("p{conn}"),
                    token: None,
                    now_unix: 0,
                },
                &mut out,
            );
        }
        c.set_max_datagram(1, Some(1162));
        c.set_max_datagram(2, Some(1414));
        for _ in 0..20 {
            out.clear();
            let t = c.world().tick();
            for conn in 1..=2 {
                let datagram = InputDatagram {
                    snapshot_ack: Some(t),
                    inputs: vec![],
                };
                c.handle(
                    CoreEvent::Input {
                        conn,
                        datagram,
                        bytes: 10,
                    },
                    &mut out,
                );
            }
            c.tick(&mut out);
            for o in &out {
                if let CoreOutput::Datagram(conn, d) = o {
                    assert!(d.len() <= if *conn == 1 { 1162 } else { 1414 });
                }
            }
        }
        assert!(c.world().tick().0 < 100, "crossed the tick wrap");
        assert_eq!(c.counters.keyframes, 2, "one keyframe each, then deltas");
        assert_eq!(c.counters.deltas, 38);
    }

    fn hello(c: &mut ServerCore, conn: ConnId, name: &str, out: &mut Vec<CoreOutput>) -> Welcome {
        c.handle(
            CoreEvent::Hello {
                conn,
                version: PROTOCOL_VERSION,
                name: name.into(),
                token: None,
                now_unix: 0,
            },
            out,
        );
        frames(out, conn)
            .into_iter()
            .find_map(|m| match m {
                ServerMsg::Welcome(w) => Some(w),
                _ => None,
            })
            .unwrap()
    }

    fn ack_and_tick(c: &mut ServerCore, conns: &[ConnId], out: &mut Vec<CoreOutput>) {
        let t = c.world().tick();
        for &conn in conns {
            c.handle(
                CoreEvent::Input {
                    conn,
                    datagram: InputDatagram {
                        snapshot_ack: Some(t),
                        inputs: vec![],
                    },
                    bytes: 10,
                },
                out,
            );
        }
        c.tick(out);
    }

    fn chat(
        c: &mut ServerCore,
        conn: ConnId,
        id: u32,
        channel: Channel,
        out: &mut Vec<CoreOutput>,
    ) {
        c.handle(
            CoreEvent::Msg {
                conn,
                msg: ClientMsg::Chat {
                    client_msg_id: id,
                    channel,
                    text: format!("line {id}"),
                },
            },
            out,
        );
    }

    #[test]
    fn a_dropped_player_resumes_with_the_same_avatar_baseline_and_missed_chat() {
        let mut c = core(4);
        let mut out = Vec::new();
        let w = hello(&mut c, 1, "a", &mut out);
        hello(&mut c, 2, "b", &mut out);
        c.set_max_datagram(1, Some(1200));
        c.set_max_datagram(2, Some(1200));
        for _ in 0..5 {
            ack_and_tick(&mut c, &[1, 2], &mut out);
        }
        let held = c.world().tick();
        let seen_seq = {
            chat(&mut c, 2, 1, Channel::Global, &mut out);
            c.lobby.chat_seq()
        };
        out.clear();
        c.handle(
            CoreEvent::Gone {
                conn: 1,
                reason: LeaveReason::TimedOut,
            },
            &mut out,
        );
        assert!(c.world().entity(w.avatar).is_none(), "out of the world");
        assert_eq!(c.roster().len(), 1, "out of the roster");
        assert!(frames(&out, 2).contains(&ServerMsg::PlayerLeft {
            id: w.player_id,
            reason: LeaveReason::TimedOut
        }));
        // While away: 400 ticks (past the 255-tick short age), chat everywhere it can reach a.
        for i in 0..400 {
            ack_and_tick(&mut c, &[2], &mut out);
            if i == 10 {
                chat(&mut c, 2, 2, Channel::Global, &mut out);
                chat(&mut c, 2, 3, Channel::Whisper { to: w.player_id }, &mut out);
                chat(&mut c, 2, 4, Channel::Room, &mut out);
            }
        }
        // Another client joins and gets the parked avatar's slot? No: the slot stays reserved.
        hello(&mut c, 3, "c", &mut out);
        out.clear();
        // A wrong token is refused; the right one resumes.
        c.handle(
            CoreEvent::Resume {
                conn: 4,
                req: ResumeRequest {
                    version: PROTOCOL_VERSION,
                    player_id: w.player_id,
                    token: vec![0; RESUME_TOKEN_BYTES],
                    snapshot_ack: Some(held),
                    chat_cursor: seen_seq,
                },
            },
            &mut out,
        );
        assert!(matches!(
            &frames(&out, 4)[0],
            ServerMsg::Refused {
                reason: RefuseReason::ResumeUnknown,
                ..
            }
        ));
        out.clear();
        c.handle(
            CoreEvent::Resume {
                conn: 5,
                req: ResumeRequest {
                    version: PROTOCOL_VERSION,
                    player_id: w.player_id,
                    token: w.resume_token.clone(),
                    snapshot_ack: Some(held),
                    chat_cursor: seen_seq,
                },
            },
            &mut out,
        );
        let f = frames(&out, 5);
        let ServerMsg::Resumed(r) = &f[0] else {
            panic!("{f:?}")
        };
        assert_eq!((r.player_id, r.avatar), (w.player_id, w.avatar));
        assert_eq!(r.baseline, Some(held), "continues from the held snapshot");
        assert_ne!(r.resume_token, w.resume_token, "token rotated");
        assert_eq!(r.players.len(), 3);
        assert_eq!(r.chat_replayed, 3);
        let replayed: Vec<u64> = f[1..]
            .iter()
            .filter_map(|m| match m {
                ServerMsg::Chat(l) => Some(l.seq),
                _ => None,
            })
            .collect();
        assert_eq!(replayed, vec![seen_seq + 1, seen_seq + 2, seen_seq + 3]);
        assert!(c.world().entity(w.avatar).is_some(), "avatar back");
        assert!(frames(&out, 2).contains(&ServerMsg::PlayerJoined(
            c.lobby.member(w.player_id).unwrap().clone()
        )));
        // The next snapshot is a delta against the held tick, 400+ ticks old.
        let keyframes = c.counters.keyframes;
        c.set_max_datagram(5, Some(1200));
        out.clear();
        c.tick(&mut out);
        assert_eq!(
            c.counters.keyframes, keyframes,
            "no keyframe for the resumed player"
        );
        assert_eq!((c.counters.resumes, c.counters.resume_keyframes), (1, 0));
        // The old token no longer works.
        out.clear();
        c.handle(
            CoreEvent::Resume {
                conn: 6,
                req: ResumeRequest {
                    version: PROTOCOL_VERSION,
                    player_id: w.player_id,
                    token: w.resume_token.clone(),
                    snapshot_ack: Some(held),
                    chat_cursor: 0,
                },
            },
            &mut out,
        );
        assert!(matches!(&frames(&out, 6)[0], ServerMsg::Refused { .. }));
        assert!(
            c.world().entity(w.avatar).is_some(),
            "a refused resume changes nothing"
        );
    }

    #[test]
    fn a_resume_while_the_old_connection_lives_replaces_it_and_grace_expiry_cleans_up() {
        let mut c = core(4);
        let mut out = Vec::new();
        let w = hello(&mut c, 1, "a", &mut out);
        hello(&mut c, 2, "b", &mut out);
        out.clear();
        c.handle(
            CoreEvent::Resume {
                conn: 3,
                req: ResumeRequest {
                    version: PROTOCOL_VERSION,
                    player_id: w.player_id,
                    token: w.resume_token.clone(),
                    snapshot_ack: None,
                    chat_cursor: 0,
                },
            },
            &mut out,
        );
        assert!(out.contains(&CoreOutput::CloseAfterFlush(
            1,
            close::REPLACED,
            "replaced by a newer connection of this player".into()
        )));
        assert!(matches!(&frames(&out, 3)[0], ServerMsg::Resumed(r) if r.baseline.is_none()));
        assert!(
            !frames(&out, 2)
                .iter()
                .any(|m| matches!(m, ServerMsg::PlayerLeft { .. } | ServerMsg::PlayerJoined(_))),
            "a replaced connection is not a leave: presence unchanged"
        );
        assert_eq!(c.player_count(), 2, "never two avatars");
        // The old connection's end arrives later: ignored.
        c.handle(
            CoreEvent::Gone {
                conn: 1,
                reason: LeaveReason::TimedOut,
            },
            &mut out,
        );
        assert_eq!((c.player_count(), c.parked_count()), (2, 0));
        // Now the new connection times out and nobody resumes within the grace window.
        c.handle(
            CoreEvent::Gone {
                conn: 3,
                reason: LeaveReason::TimedOut,
            },
            &mut out,
        );
        assert_eq!(c.parked_count(), 1);
        let grace_ticks = c.cfg.resume_grace_ms as u64 * u64::from(c.cfg.tick_rate) / 1000;
        for _ in 0..=grace_ticks {
            c.tick(&mut out);
        }
        assert_eq!((c.parked_count(), c.lobby.len()), (0, 1));
        assert_eq!(c.counters.sessions_expired, 1);
        // A player who quits is gone at once.
        c.handle(
            CoreEvent::Gone {
                conn: 2,
                reason: LeaveReason::Quit,
            },
            &mut out,
        );
        assert_eq!((c.parked_count(), c.lobby.len()), (0, 0));
    }

    #[test]
    fn drain_notifies_once_and_refuses_joins() {
        let mut c = core(4);
        let mut out = Vec::new();
        c.handle(
            CoreEvent::Hello {
                conn: 1,
                version: PROTOCOL_VERSION,
                name: "a".into(),
                token: None,
                now_unix: 0,
            },
            &mut out,
        );
        out.clear();
        c.begin_drain("maintenance", 2000, &mut out);
        c.begin_drain("again", 1, &mut out);
        assert_eq!(
            out,
            vec![CoreOutput::Frame(
                1,
                ServerMsg::Draining {
                    reason: "maintenance".into(),
                    drain_ms: 2000
                }
            )]
        );
        out.clear();
        c.handle(
            CoreEvent::Hello {
                conn: 2,
                version: PROTOCOL_VERSION,
                name: "b".into(),
                token: None,
                now_unix: 0,
            },
            &mut out,
        );
        assert!(matches!(
            &out[0],
            CoreOutput::Frame(
                2,
                ServerMsg::Refused {
                    reason: RefuseReason::ShuttingDown,
                    ..
                }
            )
        ));
        // The match goes on while draining.
        let before = c.world().tick();
        out.clear();
        c.tick(&mut out);
        assert!(c.world().tick().is_after(before));
        assert_eq!(c.player_count(), 1);
    }

    #[test]
    fn the_same_account_joining_again_takes_over_its_player() {
        let secret = vec![7u8; 32];
        let mut c = core(4);
        c.require_tokens(secret.clone());
        let tok = |nonce: u8| {
            crate::auth::issue(
                &secret,
                &crate::auth::TokenBody {
                    player_id: 42,
                    name: "carol".into(),
                    expires_unix: 1_000,
                    nonce: [nonce; 16],
                },
            )
        };
        let mut out = Vec::new();
        for (conn, nonce) in [(1, 1u8), (2, 2)] {
            c.handle(
                CoreEvent::Hello {
                    conn,
                    version: PROTOCOL_VERSION,
                    name: "x".into(),
                    token: Some(tok(nonce)),
                    now_unix: 10,
                },
                &mut out,
            );
        }
        let w = |conn| {
            frames(&out, conn)
                .into_iter()
                .find_map(|m| match m {
                    ServerMsg::Welcome(w) => Some(w),
                    _ => None,
                })
                .unwrap()
        };
        let (w1, w2) = (w(1), w(2));
        assert_eq!(
            (w1.player_id, w1.avatar),
            (w2.player_id, w2.avatar),
            "same player"
        );
        assert_eq!(c.player_count(), 1, "never two avatars");
        assert_eq!(c.roster().len(), 1);
        assert!(out.contains(&CoreOutput::CloseAfterFlush(
            1,
            close::REPLACED,
            "replaced by a newer connection of this player".into()
        )));
        assert_eq!(c.counters.replaced, 1);
    }

    #[test]
    fn error_notices_are_throttled_per_player() {
        let mut c = core(4);
        let mut out = Vec::new();
        hello(&mut c, 1, "a", &mut out);
        out.clear();
        for _ in 0..200 {
            c.handle(
                CoreEvent::Msg {
                    conn: 1,
                    msg: ClientMsg::JoinRoom {
                        room: "bad\nroom".into(),
                    },
                },
                &mut out,
            );
        }
        let errors = frames(&out, 1)
            .iter()
            .filter(|m| matches!(m, ServerMsg::Error { .. }))
            .count();
        assert_eq!(errors, ERRORS_PER_S as usize);
        assert_eq!(c.counters.errors_dropped, 200 - u64::from(ERRORS_PER_S));
        // A second later the player may be told again.
        for _ in 0..c.cfg.tick_rate {
            c.tick(&mut out);
        }
        out.clear();
        c.handle(
            CoreEvent::Msg {
                conn: 1,
                msg: ClientMsg::JoinRoom {
                    room: " padded".into(),
                },
            },
            &mut out,
        );
        assert_eq!(frames(&out, 1).len(), 1);
    }

    #[test]
    fn shutdown_refuses_and_closes_everyone() {
        let mut c = core(4);
        let mut out = Vec::new();
        c.handle(
            CoreEvent::Hello {
                conn: 1,
                version: PROTOCOL_VERSION,
                name: "a".into(),
                token: None,
                now_unix: 0,
            },
            &mut out,
        );
        out.clear();
        c.shutdown(&mut out);
        assert_eq!(
            out,
            vec![CoreOutput::CloseAfterFlush(
                1,
                close::SHUTDOWN,
                "server shutting down".into()
            )]
        );
        out.clear();
        c.handle(
            CoreEvent::Hello {
                conn: 2,
                version: PROTOCOL_VERSION,
                name: "b".into(),
                token: None,
                now_unix: 0,
            },
            &mut out,
        );
        assert!(matches!(
            &out[0],
            CoreOutput::Frame(
                2,
                ServerMsg::Refused {
                    reason: RefuseReason::ShuttingDown,
                    ..
                }
            )
        ));
    }
}
