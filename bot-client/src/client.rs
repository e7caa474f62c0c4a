//! [`Client`]: one player's connection to a quicktick server, kept alive across drops. `connect` runs
//! the handshake up to the welcome, then a supervisor task runs the connection's background tasks
//! (snapshot datagrams, inputs every tick, the reliable stream, RTT samples) and, when the connection
//! is lost, reconnects with exponential backoff and full jitter and *resumes* the session: same player,
//! same avatar, snapshot deltas continuing from the baseline this client holds, missed chat replayed,
//! chat written meanwhile sent once. The methods only read or update shared state, so they are cheap
//! and synchronous; [`Client::subscribe`] streams the connection-state changes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use quicktick_shared::client::{ClientCounters, ClientSession};
use quicktick_shared::input::{InputCmd, BUTTON_FIRE};
use quicktick_shared::reconnect::{
    Backoff, BackoffPolicy, ChatOutbox, ConnectionState, LinkHealth, LinkStatus,
};
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{
    clean_chat, close, encode_frame, Channel, ChatLine, ClientMsg, FrameDecoder, PlayerInfo,
    PresenceState, RefuseReason, ResumeRequest, Resumed, ServerMsg, Welcome, MAX_CHAT_BYTES,
    PROTOCOL_VERSION,
};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{AbortHandle, JoinSet};

use crate::lobby::{ChatReceipts, LobbyView};

/// Default time allowed from `connect` to the welcome (also per reconnection attempt).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the RTT is sampled into [`ClientStats::rtt_us`].
pub const RTT_SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// Largest RTT the histogram distinguishes, microseconds (larger samples saturate).
pub const RTT_MAX_US: u64 = 10_000_000;
/// Frames queued for the stream writer before [`Client::chat`] refuses more.
pub const CHAT_QUEUE: usize = 256;
/// Default silence from the server after which the link is reported degraded.
pub const DEGRADED_AFTER: Duration = Duration::from_millis(500);
/// Default silence after which the connection is abandoned and a resume started (below the QUIC
/// idle timeout, so the client notices a dead path before QUIC does).
pub const DEAD_AFTER: Duration = Duration::from_secs(3);
/// How often the supervisor checks the link's health.
const HEALTH_PERIOD: Duration = Duration::from_millis(100);
/// How long [`Client::close`] waits for the connection to report closed.
const CLOSE_WAIT: Duration = Duration::from_millis(250);
/// Stream read buffer.
const READ_CHUNK: usize = 8192;
/// Connection-state changes kept for [`Client::state_log`].
const STATE_LOG: usize = 64;
/// Reconnection attempt instants kept for [`Client::attempt_times`].
const ATTEMPT_LOG: usize = 256;

/// Why [`Client::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server answered `hello` with `Refused`.
    #[error("refused by the server ({reason:?}): {detail}")]
    Refused {
        /// Machine-readable reason.
        reason: RefuseReason,
        /// The server's explanation.
        detail: String,
    },
    /// The connection attempt could not be started (bad address, no client config, endpoint closed).
    #[error("cannot start connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC handshake failed or the connection was lost before the welcome.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The server sent something other than a well-formed welcome or refusal.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No welcome within the connect timeout.
    #[error("timed out waiting for the welcome")]
    Timeout,
    /// A local resource could not be set up.
    #[error("client setup failed: {0}")]
    Setup(String),
}

/// Produces a connect token for each `hello` (the first join and any fresh re-join after a resume
/// was refused); each token admits one connection, so a token service hands out a new one each time.
pub type TokenSource = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Options of [`Client::connect_with`].
#[derive(Clone)]
pub struct ClientOptions {
    /// Most chat lines [`Client::chat_log`] keeps, oldest dropped first (default: unlimited). Receipts
    /// and counters cover every line whatever this is; a swarm sets it low to bound memory.
    pub chat_log_limit: usize,
    /// Time allowed from the start of a connection attempt to the welcome (default
    /// [`CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// Connect token for the first `hello` on servers that require one (`quicktick-server token`).
    pub token: Option<String>,
    /// Tokens for later `hello`s (re-joins after a refused resume); default none.
    pub token_source: Option<TokenSource>,
    /// Reconnection policy (default [`BackoffPolicy::default`]); `None`: a lost connection stays lost.
    pub reconnect: Option<BackoffPolicy>,
    /// Silence from the server after which the state becomes [`ConnectionState::Degraded`].
    pub degraded_after: Duration,
    /// Silence after which the connection is abandoned and a resume started.
    pub dead_after: Duration,
    /// Seed of the backoff jitter (default: from the clock; set it for reproducible runs).
    pub jitter_seed: Option<u64>,
    /// Chat lines kept unconfirmed (queued while disconnected), at most.
    pub chat_outbox: usize,
    /// After the server drained (a `Draining` notice, then a close with `SHUTDOWN`), reconnect to
    /// the same address in case it is restarting (default true). `false`: the state becomes
    /// `Lost` — a game with a matchmaker then looks for another server.
    pub reconnect_after_drain: bool,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("chat_log_limit", &self.chat_log_limit)
            .field("connect_timeout", &self.connect_timeout)
            .field("token", &self.token.as_ref().map(|_| "<token>"))
            .field("token_source", &self.token_source.is_some())
            .field("reconnect", &self.reconnect)
            .field("degraded_after", &self.degraded_after)
            .field("dead_after", &self.dead_after)
            .field("jitter_seed", &self.jitter_seed)
            .field("chat_outbox", &self.chat_outbox)
            .field("reconnect_after_drain", &self.reconnect_after_drain)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            chat_log_limit: usize::MAX,
            connect_timeout: CONNECT_TIMEOUT,
            token: None,
            token_source: None,
            reconnect: Some(BackoffPolicy::default()),
            degraded_after: DEGRADED_AFTER,
            dead_after: DEAD_AFTER,
            jitter_seed: None,
            chat_outbox: CHAT_QUEUE,
            reconnect_after_drain: true,
        }
    }
}

/// The server's `Draining` notice: it is shutting down and will close this connection within
/// `drain`; the match goes on until then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainNotice {
    /// Why, in the server's words.
    pub reason: String,
    /// Most time until the server closes the connection.
    pub drain: Duration,
    /// When the notice arrived.
    pub received_at: Instant,
}

/// How a connection ended, from [`Client::close_info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The server closed it on purpose for shutdown ([`close::SHUTDOWN`]) or this client quit
    /// ([`close::QUIT`]): nothing was lost. Timeouts, resets, protocol violations, slow-consumer
    /// kicks and internal errors are not clean.
    pub clean: bool,
    /// True when the server (not this client) closed it with an application close.
    pub by_server: bool,
    /// The application close code, for application closes.
    pub code: Option<u64>,
    /// The server's close reason text for application closes (e.g. `server shutting down`), this
    /// client's own reason for local closes, otherwise quinn's description (e.g. `timed out`).
    pub reason: String,
}

impl CloseInfo {
    /// Classifies a quinn connection error.
    #[must_use]
    pub fn from_error(e: &quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => {
                let code = c.error_code.into_inner();
                Self {
                    clean: code == u64::from(close::SHUTDOWN) || code == u64::from(close::QUIT),
                    by_server: true,
                    code: Some(code),
                    reason: String::from_utf8_lossy(&c.reason).into_owned(),
                }
            }
            quinn::ConnectionError::LocallyClosed => Self {
                clean: true,
                by_server: false,
                code: Some(u64::from(close::QUIT)),
                reason: "closed by this client".into(),
            },
            other => Self {
                clean: false,
                by_server: false,
                code: None,
                reason: other.to_string(),
            },
        }
    }
}

/// A snapshot of a client's counters.
#[derive(Debug, Clone)]
pub struct ClientStats {
    /// The sans-IO session's counters: snapshots (complete), keyframes, deltas, snapshot bytes and
    /// max, parts, decode errors, missing baselines, stale/duplicate parts, inputs built, resumes and
    /// resume keyframes.
    pub session: ClientCounters,
    /// Datagrams received (all kinds).
    pub datagrams_received: u64,
    /// Bytes of all datagrams received.
    pub datagram_bytes_received: u64,
    /// Bytes read from the reliable stream.
    pub stream_bytes_received: u64,
    /// Input datagrams refused by `send_datagram` as too large, plus received datagrams longer than
    /// `max_datagram_size()` at receive time.
    pub datagrams_too_large: u64,
    /// Input datagrams handed to `send_datagram` successfully.
    pub input_datagrams_sent: u64,
    /// Input datagrams not sent for another reason (encode error, datagrams unsupported).
    pub datagram_send_errors: u64,
    /// Chat lines queued by [`Client::chat`].
    pub chat_sent: u64,
    /// Chat lines received, own echoes and duplicates included.
    pub chat_received: u64,
    /// Chat lines received from other players (first copies).
    pub chat_received_others: u64,
    /// Lines whose `(from, client_msg_id)` arrived twice.
    pub chat_duplicates: u64,
    /// Lines whose `seq` was not greater than the previous line's.
    pub chat_out_of_order: u64,
    /// Chat lines received in resume replays.
    pub chat_replayed: u64,
    /// Own lines the server settled without an echo (dropped by its rate limit or rejected).
    pub chat_dropped_by_server: u64,
    /// Own lines resent after a resume (the server drops the ones it already had).
    pub chat_resent: u64,
    /// `Error` frames from the server.
    pub server_errors: u64,
    /// Stream messages not valid after the welcome, plus presence anomalies (join of a present id,
    /// leave of an absent one).
    pub protocol_anomalies: u64,
    /// `conn.rtt()` sampled every [`RTT_SAMPLE_PERIOD`], microseconds.
    pub rtt_us: Histogram<u64>,
    /// From sending the input for tick T to the first snapshot showing the server applied T, µs.
    pub input_to_snapshot_us: Histogram<u64>,
    /// Own-avatar prediction error at each snapshot tick, micro-units (10⁻⁶ world units).
    pub prediction_error_uu: Histogram<u64>,
    /// Snapshots whose authoritative avatar differed from the prediction.
    pub corrections: u64,
    /// Input datagrams sent a second time, a few ms later (the session asks for it under loss).
    pub input_duplicates_sent: u64,
    /// Interpolated frames drawn after the first second.
    pub interpolation_frames: u64,
    /// Of which had no later snapshot and extrapolated (underruns), after the first second.
    pub interpolation_underruns: u64,
    /// Shots the server judged for this client.
    pub shots: u64,
    /// Of which hit.
    pub hits: u64,
    /// Of which were lag-compensated.
    pub shots_compensated: u64,
    /// The server's count of this client's inputs applied on time (last report).
    pub inputs_applied: u64,
    /// The server's count of this client's late inputs (last report).
    pub inputs_late: u64,
    /// The server's count of ticks simulated without this client's input (last report).
    pub inputs_missing: u64,
    /// Connections lost (each followed by reconnection attempts unless the policy is off).
    pub connections_lost: u64,
    /// Reconnection attempts made.
    pub reconnect_attempts: u64,
    /// Sessions resumed (same player and avatar).
    pub resumes: u64,
    /// Resumes whose first snapshot was a keyframe (the held baseline was no longer usable).
    pub resume_keyframes: u64,
    /// Resumes the server refused (session gone), followed by a fresh join as a new player.
    pub rejoins: u64,
    /// Joins refused because of the connect token (required, invalid, expired, replayed).
    pub token_refusals: u64,
    /// Times the link went silent past [`ClientOptions::degraded_after`].
    pub degraded: u64,
    /// The server's drain notice, if one arrived.
    pub drain_notice: Option<DrainNotice>,
    /// How the connection ended, once it has.
    pub closed: Option<CloseInfo>,
}

/// The movement, aim and buttons held until changed, sent every tick.
#[derive(Debug, Clone, Copy, Default)]
struct HeldInput {
    /// Movement x, the vector clamped to length 1.
    move_x: f32,
    /// Movement y.
    move_y: f32,
    /// Aim, radians in `[-π, π]`.
    aim: f32,
    /// Button bits.
    buttons: u8,
}

impl HeldInput {
    /// Makes arbitrary values valid for [`InputCmd::validate`]: non-finite → 0, movement longer than 1
    /// normalised, aim wrapped into `[-π, π]`.
    fn sanitized(move_x: f32, move_y: f32, aim: f32, fire: bool) -> Self {
        let finite = |v: f32| if v.is_finite() { v } else { 0.0 };
        let (mut x, mut y) = (finite(move_x), finite(move_y));
        let len = (x * x + y * y).sqrt();
        if len > 1.0 {
            x /= len;
            y /= len;
        }
        let tau = std::f32::consts::TAU;
        let mut a = finite(aim).rem_euclid(tau);
        if a > std::f32::consts::PI {
            a -= tau;
        }
        Self {
            move_x: x,
            move_y: y,
            aim: a,
            buttons: if fire { BUTTON_FIRE } else { 0 },
        }
    }

    fn cmd(self) -> InputCmd {
        InputCmd {
            tick: Tick(0), // stamped by the session
            move_x: self.move_x,
            move_y: self.move_y,
            aim: self.aim,
            buttons: self.buttons,
            ..InputCmd::idle(Tick(0))
        }
    }
}

/// I/O counters kept by the background tasks.
#[derive(Debug, Default)]
struct IoCounters {
    /// See [`ClientStats::datagrams_received`].
    datagrams_received: AtomicU64,
    /// See [`ClientStats::datagram_bytes_received`].
    datagram_bytes_received: AtomicU64,
    /// See [`ClientStats::stream_bytes_received`].
    stream_bytes_received: AtomicU64,
    /// See [`ClientStats::datagrams_too_large`].
    datagrams_too_large: AtomicU64,
    /// See [`ClientStats::input_datagrams_sent`].
    input_datagrams_sent: AtomicU64,
    /// See [`ClientStats::input_duplicates_sent`].
    input_duplicates_sent: AtomicU64,
    /// See [`ClientStats::datagram_send_errors`].
    datagram_send_errors: AtomicU64,
    /// See [`ClientStats::chat_sent`].
    chat_sent: AtomicU64,
    /// See [`ClientStats::chat_dropped_by_server`].
    chat_dropped_by_server: AtomicU64,
    /// See [`ClientStats::chat_resent`].
    chat_resent: AtomicU64,
    /// See [`ClientStats::connections_lost`].
    connections_lost: AtomicU64,
    /// See [`ClientStats::reconnect_attempts`].
    reconnect_attempts: AtomicU64,
    /// See [`ClientStats::rejoins`].
    rejoins: AtomicU64,
    /// See [`ClientStats::token_refusals`].
    token_refusals: AtomicU64,
    /// See [`ClientStats::degraded`].
    degraded: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Who this client is on the server and how to resume it.
#[derive(Debug, Clone)]
struct Identity {
    /// The current welcome (replaced by a fresh re-join; avatar and roster updated by a resume).
    welcome: Welcome,
    /// The newest resume token.
    resume_token: Vec<u8>,
}

/// The chat sender: the outbox (ids, unconfirmed lines) and the current connection's writer queue,
/// under one lock so ids reach the server in increasing order.
#[derive(Debug)]
struct ChatOut {
    /// Lines not yet echoed by the server.
    outbox: ChatOutbox<Channel>,
    /// Frames for the current connection's stream writer (`None` while disconnected).
    tx: Option<mpsc::Sender<Vec<u8>>>,
}

/// State shared by the handle, the supervisor and the connection tasks (each lock is held for a few
/// statements).
#[derive(Debug)]
struct Shared {
    /// Origin of the `now` passed to the session.
    start: Instant,
    /// The current connection.
    conn: Mutex<quinn::Connection>,
    /// Player identity and resume token.
    identity: Mutex<Identity>,
    /// Snapshot reassembly, baselines, tick estimate, input history.
    session: Mutex<ClientSession>,
    /// Input held until changed.
    input: Mutex<HeldInput>,
    /// Roster, chat log, receipts.
    lobby: Mutex<LobbyView>,
    /// Chat sender.
    chat: Mutex<ChatOut>,
    /// RTT samples.
    rtt: Mutex<Histogram<u64>>,
    /// Netcode measurements (input latency, prediction error, interpolation).
    net: Mutex<NetStats>,
    /// Silence detector.
    health: Mutex<LinkHealth>,
    /// Current connection state and its recent changes.
    state: Mutex<(ConnectionState, Vec<(Duration, ConnectionState)>)>,
    /// State-change notifications.
    events: broadcast::Sender<ConnectionState>,
    /// When reconnection attempts started.
    attempts: Mutex<Vec<Instant>>,
    /// The last connection's close reason.
    last_close: Mutex<Option<String>>,
    /// Set by [`Client::close`]: do not reconnect.
    closing: AtomicBool,
    /// A `Draining` notice arrived on the current connection.
    drained: AtomicBool,
    /// I/O counters.
    io: IoCounters,
    /// The server's drain notice, once received.
    drain: Mutex<Option<DrainNotice>>,
}

impl Shared {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn set_state(&self, s: ConnectionState) {
        let mut st = lock(&self.state);
        if st.0 == s {
            return;
        }
        tracing::debug!(state = ?s, "connection state");
        st.0 = s.clone();
        if st.1.len() >= STATE_LOG {
            st.1.remove(0);
        }
        st.1.push((self.start.elapsed(), s.clone()));
        drop(st);
        let _ = self.events.send(s);
    }

    fn conn(&self) -> quinn::Connection {
        lock(&self.conn).clone()
    }
}

/// Netcode measurements of one client.
#[derive(Debug, Clone)]
struct NetStats {
    /// Input-to-snapshot latency, µs.
    input_to_snapshot_us: Histogram<u64>,
    /// Prediction error, micro-units (1 unit = 10⁶).
    prediction_error_uu: Histogram<u64>,
    /// Interpolation (frames, underruns) counted during the first second, excluded from the report.
    interp_warmup: Option<(u64, u64)>,
}

/// Owned by the [`Client`] handles; dropping the last one closes the connection and stops the tasks.
#[derive(Debug)]
struct Inner {
    /// The name sent in `hello`.
    name: String,
    /// State shared with the tasks.
    shared: Arc<Shared>,
    /// The supervisor (owns the connection tasks).
    supervisor: AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        self.shared.conn().close(close::QUIT.into(), b"bye");
        self.supervisor.abort();
    }
}

/// A connected quicktick client. Cloning is cheap (shared handle); the connection closes when the last
/// clone is dropped or [`Client::close`] is called.
#[derive(Clone)]
pub struct Client {
    /// The shared handle.
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.inner.name)
            .field("player_id", &self.player_id())
            .field("remote", &self.inner.shared.conn().remote_address())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn new_rtt_histogram() -> Result<Histogram<u64>, ConnectError> {
    Histogram::new_with_bounds(1, RTT_MAX_US, 2).map_err(|e| ConnectError::Setup(e.to_string()))
}

/// The server's first answer on a new connection.
#[derive(Debug)]
enum Answer {
    /// Joined as a (new) player.
    Welcome(Welcome),
    /// The session continues.
    Resumed(Resumed),
}

/// What the handshake hands over to the background tasks.
struct Joined {
    /// The connection.
    conn: quinn::Connection,
    /// Our half of the control stream.
    send: quinn::SendStream,
    /// The server's half.
    recv: quinn::RecvStream,
    /// Bytes read past the answer stay here (replayed chat, for a resume).
    decoder: FrameDecoder,
    /// The answer.
    answer: Answer,
}

/// Where to connect, kept by the supervisor for reconnections.
#[derive(Clone)]
struct Target {
    endpoint: quinn::Endpoint,
    server: SocketAddr,
    server_name: String,
    name: String,
    options: ClientOptions,
}

impl Client {
    /// Connects to `server` (TLS name `server_name`) as `name` with default [`ClientOptions`]: QUIC
    /// handshake, `hello`, and the welcome, all within 10 s. Then starts the supervisor.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        server_name: &str,
        name: &str,
    ) -> Result<Client, ConnectError> {
        Self::connect_with(
            endpoint,
            server,
            server_name,
            name,
            ClientOptions::default(),
        )
        .await
    }

    /// [`Client::connect`] with explicit options.
    pub async fn connect_with(
        endpoint: &quinn::Endpoint,
        server: SocketAddr,
        server_name: &str,
        name: &str,
        options: ClientOptions,
    ) -> Result<Client, ConnectError> {
        if let Some(p) = &options.reconnect {
            p.validate().map_err(|e| ConnectError::Setup(e.into()))?;
        }
        let rtt = new_rtt_histogram()?;
        let start = Instant::now();
        let hello = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            name: name.to_owned(),
            token: options
                .token
                .clone()
                .or_else(|| options.token_source.as_ref().and_then(|f| f())),
        };
        let joined = tokio::time::timeout(
            options.connect_timeout,
            handshake(endpoint, server, server_name, &hello),
        )
        .await
        .map_err(|_| ConnectError::Timeout)??;
        let Answer::Welcome(welcome) = &joined.answer else {
            return Err(ConnectError::Protocol("resumed without asking".into()));
        };
        let welcome = welcome.clone();
        let now = start.elapsed();
        let (events, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            start,
            conn: Mutex::new(joined.conn.clone()),
            identity: Mutex::new(Identity {
                resume_token: welcome.resume_token.clone(),
                welcome: welcome.clone(),
            }),
            session: Mutex::new(ClientSession::new(welcome.clone(), now)),
            input: Mutex::new(HeldInput::default()),
            lobby: Mutex::new(LobbyView::new(&welcome, options.chat_log_limit)),
            chat: Mutex::new(ChatOut {
                outbox: ChatOutbox::new(options.chat_outbox.max(1)),
                tx: None,
            }),
            net: Mutex::new(NetStats {
                input_to_snapshot_us: rtt.clone(),
                prediction_error_uu: Histogram::new_with_bounds(1, 1_000_000_000, 2)
                    .map_err(|e| ConnectError::Setup(e.to_string()))?,
                interp_warmup: None,
            }),
            rtt: Mutex::new(rtt),
            health: Mutex::new(LinkHealth::new(
                options.degraded_after,
                options.dead_after,
                now,
            )),
            state: Mutex::new((
                ConnectionState::Connected,
                vec![(now, ConnectionState::Connected)],
            )),
            events,
            attempts: Mutex::new(Vec::new()),
            last_close: Mutex::new(None),
            closing: AtomicBool::new(false),
            drained: AtomicBool::new(false),
            io: IoCounters::default(),
            drain: Mutex::new(None),
        });
        let target = Target {
            endpoint: endpoint.clone(),
            server,
            server_name: server_name.to_owned(),
            name: name.to_owned(),
            options,
        };
        tracing::debug!(name, player_id = welcome.player_id, %server, "joined");
        let supervisor = tokio::spawn(supervise(shared.clone(), target, joined)).abort_handle();
        Ok(Client {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                shared,
                supervisor,
            }),
        })
    }

    /// The welcome of the current player (a fresh re-join after a refused resume replaces it; a
    /// resume keeps it, with the roster of the resume).
    #[must_use]
    pub fn welcome(&self) -> Welcome {
        lock(&self.inner.shared.identity).welcome.clone()
    }

    /// This client's player id.
    #[must_use]
    pub fn player_id(&self) -> u32 {
        lock(&self.inner.shared.identity).welcome.player_id
    }

    /// The name this client joined with.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Sets the input sent every tick until changed. Values are made valid: non-finite → 0, movement
    /// longer than 1 normalised, aim wrapped into `[-π, π]`.
    pub fn set_input(&self, move_x: f32, move_y: f32, aim: f32, fire: bool) {
        *lock(&self.inner.shared.input) = HeldInput::sanitized(move_x, move_y, aim, fire);
    }

    /// The newest complete snapshot received.
    #[must_use]
    pub fn latest_snapshot(&self) -> Option<Arc<Snapshot>> {
        lock(&self.inner.shared.session).latest().cloned()
    }

    /// Who is present now (the welcome's roster kept current from presence messages), by player id.
    #[must_use]
    pub fn roster(&self) -> Vec<PlayerInfo> {
        lock(&self.inner.shared.lobby).roster()
    }

    /// Sends a chat line to everyone ([`Channel::Global`]); see [`Client::chat_to`].
    pub fn chat(&self, text: &str) -> anyhow::Result<u32> {
        self.chat_to(Channel::Global, text)
    }

    /// Queues a chat line and returns its `client_msg_id` (1, 2, 3, …). While disconnected the line
    /// waits in the outbox and is sent on resume; every unconfirmed line is resent after a resume (the
    /// server drops ids it already has, so each line is delivered once). Fails when the text is empty
    /// or longer than [`MAX_CHAT_BYTES`], the outbox or the send queue is full, or the client is
    /// closed for good.
    pub fn chat_to(&self, channel: Channel, text: &str) -> anyhow::Result<u32> {
        if text.len() > MAX_CHAT_BYTES || clean_chat(text).is_none() {
            anyhow::bail!("chat line is empty or longer than {MAX_CHAT_BYTES} bytes");
        }
        if let ConnectionState::Lost { reason } = self.state() {
            anyhow::bail!("connection lost: {reason}");
        }
        let mut out = lock(&self.inner.shared.chat);
        let id = out.outbox.push(channel.clone(), text.to_owned())?;
        if let Some(tx) = &out.tx {
            let frame = encode_frame(&ClientMsg::Chat {
                client_msg_id: id,
                channel,
                text: text.to_owned(),
            })?;
            match tx.try_send(frame) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    out.outbox.reject(id);
                    anyhow::bail!("chat queue full");
                }
                // The connection is going away: the line stays in the outbox for the resume.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        bump(&self.inner.shared.io.chat_sent, 1);
        Ok(id)
    }

    /// Sends a stream message now (presence, typing, room); errors while disconnected.
    fn send_msg(&self, msg: &ClientMsg) -> anyhow::Result<()> {
        let frame = encode_frame(msg)?;
        let out = lock(&self.inner.shared.chat);
        let tx = out
            .tx
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("not connected"))?;
        tx.try_send(frame)
            .map_err(|_| anyhow::anyhow!("send queue full or connection closing"))
    }

    /// Sets this player's presence state (the server refuses changes faster than 4 per second).
    pub fn set_presence(&self, state: PresenceState) -> anyhow::Result<()> {
        self.send_msg(&ClientMsg::SetPresence { state })
    }

    /// Moves to a chat room.
    pub fn join_room(&self, room: &str) -> anyhow::Result<()> {
        self.send_msg(&ClientMsg::JoinRoom {
            room: room.to_owned(),
        })
    }

    /// Tells others this player is typing in `channel` (the server forwards at most one a second).
    pub fn typing(&self, channel: Channel) -> anyhow::Result<()> {
        self.send_msg(&ClientMsg::Typing { channel })
    }

    /// Chat lines received, arrival order (all of them unless [`ClientOptions::chat_log_limit`]).
    #[must_use]
    pub fn chat_log(&self) -> Vec<ChatLine> {
        lock(&self.inner.shared.lobby).chat_log()
    }

    /// Which chat lines were received, and this client's echoed lines.
    #[must_use]
    pub fn chat_receipts(&self) -> ChatReceipts {
        lock(&self.inner.shared.lobby).receipts().clone()
    }

    /// Own chat lines not yet confirmed by the server's echo.
    #[must_use]
    pub fn chat_pending(&self) -> usize {
        lock(&self.inner.shared.chat).outbox.len()
    }

    /// The connection state now.
    #[must_use]
    pub fn state(&self) -> ConnectionState {
        lock(&self.inner.shared.state).0.clone()
    }

    /// The recent state changes with the time since `connect` started (at most 64).
    #[must_use]
    pub fn state_log(&self) -> Vec<(Duration, ConnectionState)> {
        lock(&self.inner.shared.state).1.clone()
    }

    /// A stream of connection-state changes from now on.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<ConnectionState> {
        self.inner.shared.events.subscribe()
    }

    /// When each reconnection attempt started (at most the last 256).
    #[must_use]
    pub fn attempt_times(&self) -> Vec<Instant> {
        lock(&self.inner.shared.attempts).clone()
    }

    /// A snapshot of the counters.
    #[must_use]
    pub fn stats(&self) -> ClientStats {
        let sh = &self.inner.shared;
        let (session, corrections, frames, underruns) = {
            let s = lock(&sh.session);
            let i = s.interpolator();
            (s.counters, s.predictor().corrections, i.frames, i.underruns)
        };
        let net = lock(&sh.net).clone();
        let warm = net.interp_warmup.unwrap_or((frames, underruns));
        let lobby = lock(&sh.lobby).counters();
        let rtt_us = lock(&sh.rtt).clone();
        ClientStats {
            session,
            datagrams_received: get(&sh.io.datagrams_received),
            datagram_bytes_received: get(&sh.io.datagram_bytes_received),
            stream_bytes_received: get(&sh.io.stream_bytes_received),
            datagrams_too_large: get(&sh.io.datagrams_too_large),
            input_datagrams_sent: get(&sh.io.input_datagrams_sent),
            datagram_send_errors: get(&sh.io.datagram_send_errors),
            chat_sent: get(&sh.io.chat_sent),
            chat_received: lobby.chat_received,
            chat_received_others: lobby.chat_received_others,
            chat_duplicates: lobby.chat_duplicates,
            chat_out_of_order: lobby.chat_out_of_order,
            chat_replayed: lobby.chat_replayed,
            chat_dropped_by_server: get(&sh.io.chat_dropped_by_server),
            chat_resent: get(&sh.io.chat_resent),
            server_errors: lobby.server_errors,
            protocol_anomalies: lobby.unexpected + lobby.presence_anomalies,
            rtt_us,
            input_to_snapshot_us: net.input_to_snapshot_us,
            prediction_error_uu: net.prediction_error_uu,
            corrections,
            input_duplicates_sent: get(&sh.io.input_duplicates_sent),
            interpolation_frames: frames.saturating_sub(warm.0),
            interpolation_underruns: underruns.saturating_sub(warm.1),
            shots: lobby.shots,
            hits: lobby.hits,
            shots_compensated: lobby.shots_compensated,
            inputs_applied: lobby.inputs_applied,
            inputs_late: lobby.inputs_late,
            inputs_missing: lobby.inputs_missing,
            connections_lost: get(&sh.io.connections_lost),
            reconnect_attempts: get(&sh.io.reconnect_attempts),
            resumes: session.resumes,
            resume_keyframes: session.resume_keyframes,
            rejoins: get(&sh.io.rejoins),
            token_refusals: get(&sh.io.token_refusals),
            degraded: get(&sh.io.degraded),
            drain_notice: lock(&sh.drain).clone(),
            closed: self.close_info(),
        }
    }

    /// The server's drain notice (it is shutting down and will close this connection soon), if one
    /// arrived. A game would tell the player and, typically, find another server.
    #[must_use]
    pub fn drain_notice(&self) -> Option<DrainNotice> {
        lock(&self.inner.shared.drain).clone()
    }

    /// How the connection ended (clean or not, who closed it, code and reason), once closed.
    #[must_use]
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.inner
            .shared
            .conn()
            .close_reason()
            .map(|e| CloseInfo::from_error(&e))
    }

    /// True while a connection is up (false while reconnecting and once lost or closed).
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.inner.shared.conn().close_reason().is_none()
    }

    /// Why the current (or, while reconnecting, the last) connection closed, as quinn words it (for
    /// an application close: `closed by peer: <reason> (code N)`).
    #[must_use]
    pub fn close_reason(&self) -> Option<String> {
        self.inner
            .shared
            .conn()
            .close_reason()
            .map(|e| e.to_string())
            .or_else(|| lock(&self.inner.shared.last_close).clone())
    }

    /// The current QUIC connection (a new one after each reconnection).
    #[must_use]
    pub fn connection(&self) -> quinn::Connection {
        self.inner.shared.conn()
    }

    /// Closes with [`close::QUIT`] (the server removes the player at once: no resume) and waits
    /// briefly for the connection to settle. To make sure the close reaches the server, also call
    /// `Endpoint::wait_idle`.
    pub async fn close(&self) {
        let sh = &self.inner.shared;
        sh.closing.store(true, Ordering::Relaxed);
        self.inner.supervisor.abort();
        let conn = sh.conn();
        conn.close(close::QUIT.into(), b"bye");
        sh.set_state(ConnectionState::Lost {
            reason: "closed by the client".into(),
        });
        let _ = tokio::time::timeout(CLOSE_WAIT, conn.closed()).await;
    }
}

/// How a connection ended, as the supervisor sees it.
enum End {
    /// QUIC reported it closed.
    Closed(quinn::ConnectionError),
    /// Silent past `dead_after`: abandoned.
    Dead,
}

/// Whether a connection that ended like this is worth resuming.
fn resumable(e: &quinn::ConnectionError) -> bool {
    use quinn::ConnectionError as E;
    match e {
        E::ApplicationClosed(a) => {
            let code = u32::try_from(a.error_code.into_inner()).unwrap_or(u32::MAX);
            matches!(
                code,
                close::SHUTDOWN | close::INTERNAL_ERROR | close::SLOW_CONSUMER
            )
        }
        E::TimedOut | E::Reset | E::ConnectionClosed(_) | E::TransportError(_) => true,
        E::LocallyClosed | E::VersionMismatch | E::CidsExhausted => false,
    }
}

fn next_random(state: &mut u64) -> u64 {
    // splitmix64
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Runs the connection's tasks; when it ends, reconnects and resumes per the policy.
async fn supervise(shared: Arc<Shared>, target: Target, first: Joined) {
    let mut joined = first;
    let policy = target.options.reconnect;
    let mut backoff = policy.map(Backoff::new);
    let mut rng = target.options.jitter_seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    });
    loop {
        let conn = joined.conn.clone();
        let mut tasks = run_connection(&shared, joined);
        let end = watch(&shared, &conn).await;
        tasks.abort_all();
        lock(&shared.chat).tx = None;
        let reason = match &end {
            End::Closed(e) => e.to_string(),
            End::Dead => {
                conn.close(close::RECONNECTING.into(), b"path silent; resuming");
                "no packets from the server".to_owned()
            }
        };
        *lock(&shared.last_close) = Some(reason.clone());
        if shared.closing.load(Ordering::Relaxed) {
            return;
        }
        bump(&shared.io.connections_lost, 1);
        let drained = shared.drained.swap(false, Ordering::Relaxed);
        let worth = match &end {
            End::Closed(e) => resumable(e) && (target.options.reconnect_after_drain || !drained),
            End::Dead => true,
        };
        let Some(backoff) = backoff.as_mut().filter(|_| worth) else {
            shared.set_state(ConnectionState::Lost { reason });
            return;
        };
        tracing::debug!(%reason, "connection lost; reconnecting");
        let restart = matches!(&end, End::Closed(quinn::ConnectionError::ApplicationClosed(a))
        if matches!(
            u32::try_from(a.error_code.into_inner()).unwrap_or(u32::MAX),
            close::SHUTDOWN | close::INTERNAL_ERROR
        ));
        if restart {
            // The server is going away (perhaps restarting): spread the returns of all its clients.
            shared.set_state(ConnectionState::Reconnecting { attempt: 0 });
            let wait = backoff.policy().restart_delay(next_random(&mut rng));
            tokio::time::sleep(wait).await;
        }
        match reconnect(&shared, &target, backoff, &mut rng).await {
            Ok(j) => {
                backoff.reset();
                joined = j;
            }
            Err(reason) => {
                shared.set_state(ConnectionState::Lost { reason });
                return;
            }
        }
    }
}

/// Waits until the connection closes or goes silent for too long, reporting degradation.
async fn watch(shared: &Shared, conn: &quinn::Connection) -> End {
    let mut interval = tokio::time::interval(HEALTH_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut degraded = false;
    loop {
        tokio::select! {
            e = conn.closed() => return End::Closed(e),
            _ = interval.tick() => {}
        }
        let status = lock(&shared.health).status(shared.now());
        match status {
            LinkStatus::Healthy if degraded => {
                degraded = false;
                shared.set_state(ConnectionState::Connected);
            }
            LinkStatus::Healthy => {}
            LinkStatus::Degraded if !degraded => {
                degraded = true;
                bump(&shared.io.degraded, 1);
                shared.set_state(ConnectionState::Degraded);
            }
            LinkStatus::Degraded => {}
            LinkStatus::Dead => return End::Dead,
        }
    }
}

/// Reconnection attempts with backoff until one joins (resumed or fresh) or the policy gives up.
async fn reconnect(
    shared: &Arc<Shared>,
    target: &Target,
    backoff: &mut Backoff,
    rng: &mut u64,
) -> Result<Joined, String> {
    let mut resume = true;
    let mut skip_delay = false;
    loop {
        let delay = if std::mem::take(&mut skip_delay) {
            Some(Duration::ZERO)
        } else {
            backoff.next_delay(shared.now(), next_random(rng))
        };
        let Some(delay) = delay else {
            return Err(format!(
                "gave up reconnecting after {} attempts",
                backoff.attempts()
            ));
        };
        shared.set_state(ConnectionState::Reconnecting {
            attempt: backoff.attempts(),
        });
        tokio::time::sleep(delay).await;
        if shared.closing.load(Ordering::Relaxed) {
            return Err("closed by the client".into());
        }
        bump(&shared.io.reconnect_attempts, 1);
        {
            let mut a = lock(&shared.attempts);
            if a.len() >= ATTEMPT_LOG {
                a.remove(0);
            }
            a.push(Instant::now());
        }
        let first = if resume {
            let id = lock(&shared.identity).clone();
            let snapshot_ack = lock(&shared.session).latest().map(|s| s.tick);
            ClientMsg::Resume(ResumeRequest {
                version: PROTOCOL_VERSION,
                player_id: id.welcome.player_id,
                token: id.resume_token,
                snapshot_ack,
                chat_cursor: lock(&shared.lobby).cursor(),
            })
        } else {
            ClientMsg::Hello {
                version: PROTOCOL_VERSION,
                name: target.name.clone(),
                token: target.options.token_source.as_ref().and_then(|f| f()),
            }
        };
        let attempt = tokio::time::timeout(
            target.options.connect_timeout,
            handshake(&target.endpoint, target.server, &target.server_name, &first),
        )
        .await;
        match attempt {
            Ok(Ok(j)) => {
                adopt(shared, &j);
                return Ok(j);
            }
            Ok(Err(ConnectError::Refused { reason, detail })) => match reason {
                RefuseReason::ResumeUnknown if resume => {
                    // The session is gone (grace passed, server restarted): join afresh, at once
                    // (the same attempt, in effect).
                    tracing::debug!(%detail, "resume refused; joining afresh");
                    resume = false;
                    backoff.reset();
                    skip_delay = true;
                    continue;
                }
                RefuseReason::ServerFull | RefuseReason::ShuttingDown => {}
                RefuseReason::TokenRequired
                | RefuseReason::TokenInvalid
                | RefuseReason::TokenExpired
                | RefuseReason::TokenReplayed => {
                    bump(&shared.io.token_refusals, 1);
                    return Err(format!("re-join refused ({reason:?}): {detail}"));
                }
                _ => return Err(format!("refused ({reason:?}): {detail}")),
            },
            Ok(Err(e)) => tracing::debug!("reconnection attempt failed: {e}"),
            Err(_) => tracing::debug!("reconnection attempt timed out"),
        }
    }
}

/// Takes in a successful (re)connection's answer: resume or fresh join.
fn adopt(shared: &Shared, j: &Joined) {
    let now = shared.now();
    *lock(&shared.conn) = j.conn.clone();
    lock(&shared.health).on_receive(now);
    match &j.answer {
        Answer::Resumed(r) => {
            lock(&shared.session).resume(r, now);
            lock(&shared.lobby).resumed(r);
            let mut id = lock(&shared.identity);
            id.resume_token.clone_from(&r.resume_token);
            id.welcome.avatar = r.avatar;
            id.welcome.players.clone_from(&r.players);
            drop(id);
            shared.set_state(ConnectionState::Resumed);
        }
        Answer::Welcome(w) => {
            bump(&shared.io.rejoins, 1);
            *lock(&shared.session) = ClientSession::new(w.clone(), now);
            lock(&shared.lobby).rejoined(w);
            *lock(&shared.identity) = Identity {
                welcome: w.clone(),
                resume_token: w.resume_token.clone(),
            };
            shared.set_state(ConnectionState::Connected);
        }
    }
}

/// Spawns a connection's tasks and sends the chat outbox (everything unconfirmed, in id order).
fn run_connection(shared: &Arc<Shared>, j: Joined) -> JoinSet<()> {
    let Joined {
        conn,
        send,
        recv,
        decoder,
        answer: _,
    } = j;
    let (tx, rx) = mpsc::channel(CHAT_QUEUE);
    {
        let mut out = lock(&shared.chat);
        let mut resent = 0;
        for p in out.outbox.pending() {
            if let Ok(f) = encode_frame(&ClientMsg::Chat {
                client_msg_id: p.id,
                channel: p.channel.clone(),
                text: p.text.clone(),
            }) {
                if tx.try_send(f).is_ok() {
                    resent += 1;
                }
            }
        }
        bump(&shared.io.chat_resent, resent);
        out.tx = Some(tx);
    }
    let tick_rate = lock(&shared.identity).welcome.tick_rate;
    let mut set = JoinSet::new();
    set.spawn(datagram_reader(conn.clone(), shared.clone()));
    set.spawn(input_sender(conn.clone(), shared.clone(), tick_rate));
    set.spawn(stream_reader(conn.clone(), recv, decoder, shared.clone()));
    set.spawn(stream_writer(conn.clone(), send, rx));
    set.spawn(rtt_sampler(conn, shared.clone()));
    set
}

/// QUIC handshake, control stream, the first message (`hello` or `resume`), and the server's answer.
async fn handshake(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
    first: &ClientMsg,
) -> Result<Joined, ConnectError> {
    let conn = endpoint.connect(server, server_name)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = encode_frame(first)
        .map_err(|e| ConnectError::Protocol(format!("cannot encode hello: {e}")))?;
    send.write_all(&hello).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(c) => ConnectError::Connection(c),
        other => ConnectError::Protocol(format!("cannot send hello: {other}")),
    })?;

    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let answer = match decoder.next_msg::<ServerMsg>() {
            Ok(Some(ServerMsg::Welcome(w))) => Some(Answer::Welcome(w)),
            Ok(Some(ServerMsg::Resumed(r))) if matches!(first, ClientMsg::Resume(_)) => {
                Some(Answer::Resumed(r))
            }
            Ok(Some(ServerMsg::Refused { reason, detail })) => {
                return Err(ConnectError::Refused { reason, detail })
            }
            Ok(Some(other)) => {
                conn.close(close::PROTOCOL_VIOLATION.into(), b"expected welcome");
                return Err(ConnectError::Protocol(format!(
                    "expected welcome, got {}",
                    msg_kind(&other)
                )));
            }
            Ok(None) => None,
            Err(e) => {
                conn.close(close::PROTOCOL_VIOLATION.into(), b"bad frame");
                return Err(ConnectError::Protocol(format!(
                    "bad frame before welcome: {e}"
                )));
            }
        };
        if let Some(answer) = answer {
            return Ok(Joined {
                conn,
                send,
                recv,
                decoder,
                answer,
            });
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.extend(buf.get(..n).unwrap_or_default()),
            Ok(None) => {
                return Err(ConnectError::Protocol(
                    "server finished the stream before the welcome".into(),
                ))
            }
            Err(quinn::ReadError::ConnectionLost(e)) => return Err(ConnectError::Connection(e)),
            Err(e) => {
                return Err(ConnectError::Protocol(format!(
                    "stream failed before the welcome: {e}"
                )))
            }
        }
    }
}

fn msg_kind(m: &ServerMsg) -> &'static str {
    match m {
        ServerMsg::Welcome(_) => "welcome",
        ServerMsg::Refused { .. } => "refused",
        ServerMsg::Chat(_) => "chat",
        ServerMsg::PlayerJoined(_) => "player_joined",
        ServerMsg::PlayerLeft { .. } => "player_left",
        ServerMsg::ShotResult { .. } => "shot_result",
        ServerMsg::InputStats { .. } => "input_stats",
        ServerMsg::Error { .. } => "error",
        ServerMsg::Resumed(_) => "resumed",
        ServerMsg::Presence { .. } => "presence",
        ServerMsg::Typing { .. } => "typing",
        ServerMsg::Draining { .. } => "draining",
    }
}

/// Feeds every received datagram to the session until the connection ends.
async fn datagram_reader(conn: quinn::Connection, shared: Arc<Shared>) {
    loop {
        let bytes = match conn.read_datagram().await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!("datagram reader stops: {e}");
                return;
            }
        };
        let io = &shared.io;
        lock(&shared.health).on_receive(shared.now());
        bump(&io.datagrams_received, 1);
        bump(&io.datagram_bytes_received, bytes.len() as u64);
        if conn
            .max_datagram_size()
            .is_some_and(|max| bytes.len() > max)
        {
            bump(&io.datagrams_too_large, 1);
        }
        let now = shared.start.elapsed();
        let (result, latencies, errors) = {
            let mut session = lock(&shared.session);
            let result = session.handle_datagram(&bytes, now);
            let latencies = std::mem::take(&mut session.latency_samples);
            let errors = std::mem::take(&mut session.predictor_mut().errors);
            (result, latencies, errors)
        };
        if let Err(e) = result {
            tracing::trace!("snapshot datagram refused: {e}");
        }
        if !latencies.is_empty() || !errors.is_empty() {
            let mut net = lock(&shared.net);
            for l in latencies {
                let _ = net
                    .input_to_snapshot_us
                    .record((l.as_micros() as u64).max(1));
            }
            for e in errors {
                let _ = net.prediction_error_uu.record((f64::from(e) * 1e6) as u64);
            }
        }
    }
}

/// Spacing between an input datagram and its duplicate when the session asks for duplicates.
const DUPLICATE_SPACING: Duration = Duration::from_millis(3);

/// Sends the held input once per tick until the connection ends.
async fn input_sender(conn: quinn::Connection, shared: Arc<Shared>, tick_rate: u16) {
    let period = Duration::from_secs_f64(1.0 / f64::from(tick_rate.clamp(1, 1000)));
    loop {
        // Send each input just before it is due (tick sync), at most a tick apart.
        let wait = {
            let now = shared.start.elapsed();
            lock(&shared.session).next_input_wait(now, conn.rtt())
        };
        tokio::time::sleep(wait.min(period)).await;
        let cmd = lock(&shared.input).cmd();
        let now = shared.start.elapsed();
        let (built, frames, underruns) = {
            let mut session = lock(&shared.session);
            let built = session.build_input(now, conn.rtt(), cmd);
            // "Render" a frame: the interpolated view a game would draw now.
            let _ = session.interpolate(now);
            let i = session.interpolator();
            (built, i.frames, i.underruns)
        };
        if now >= Duration::from_secs(1) {
            let mut net = lock(&shared.net);
            if net.interp_warmup.is_none() {
                net.interp_warmup = Some((frames, underruns));
            }
        }
        let io = &shared.io;
        let bytes = match built {
            Ok(b) => b,
            Err(e) => {
                bump(&io.datagram_send_errors, 1);
                tracing::debug!("cannot build input datagram: {e}");
                continue;
            }
        };
        let duplicate = lock(&shared.session).duplicate_inputs();
        let copy = duplicate.then(|| bytes.clone());
        match conn.send_datagram(bytes.into()) {
            Ok(()) => {
                bump(&io.input_datagrams_sent, 1);
                if let Some(copy) = copy {
                    // Under loss, the same datagram again a few ms later (see LeadControl).
                    tokio::time::sleep(DUPLICATE_SPACING).await;
                    if conn.send_datagram(copy.into()).is_ok() {
                        bump(&io.input_duplicates_sent, 1);
                    }
                }
            }
            Err(quinn::SendDatagramError::TooLarge) => bump(&io.datagrams_too_large, 1),
            Err(quinn::SendDatagramError::ConnectionLost(e)) => {
                tracing::debug!("input sender stops: {e}");
                return;
            }
            Err(e) => {
                bump(&io.datagram_send_errors, 1);
                tracing::debug!("cannot send input datagram: {e}");
            }
        }
    }
}

/// Reads server messages from the control stream into the lobby view.
async fn stream_reader(
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    mut decoder: FrameDecoder,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        loop {
            match decoder.next_msg::<ServerMsg>() {
                Ok(Some(msg)) => {
                    match &msg {
                        ServerMsg::InputStats { late, .. } => {
                            lock(&shared.session).on_input_stats(*late);
                        }
                        ServerMsg::Chat(line) if line.from == shared_player_id(&shared) => {
                            let settled = lock(&shared.chat).outbox.confirm(line.client_msg_id);
                            bump(&shared.io.chat_dropped_by_server, settled as u64);
                        }
                        _ => {}
                    }
                    if let ServerMsg::Draining { reason, drain_ms } = &msg {
                        shared.drained.store(true, Ordering::Relaxed);
                        tracing::info!(%reason, drain_ms, "the server is draining");
                        *lock(&shared.drain) = Some(DrainNotice {
                            reason: reason.clone(),
                            drain: Duration::from_millis(u64::from(*drain_ms)),
                            received_at: Instant::now(),
                        });
                    }
                    lock(&shared.lobby).handle(msg);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("bad frame from the server: {e}");
                    conn.close(close::PROTOCOL_VIOLATION.into(), b"bad frame");
                    return;
                }
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                lock(&shared.health).on_receive(shared.now());
                bump(&shared.io.stream_bytes_received, n as u64);
                decoder.extend(buf.get(..n).unwrap_or_default());
            }
            Ok(None) => {
                tracing::debug!("server finished the control stream");
                return;
            }
            Err(e) => {
                tracing::debug!("stream reader stops: {e}");
                return;
            }
        }
    }
}

fn shared_player_id(shared: &Shared) -> u32 {
    lock(&shared.identity).welcome.player_id
}

/// Writes queued frames to the control stream in order.
async fn stream_writer(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    loop {
        let frame = tokio::select! {
            f = rx.recv() => f,
            _ = conn.closed() => None,
        };
        let Some(frame) = frame else { return };
        if let Err(e) = send.write_all(&frame).await {
            tracing::debug!("stream writer stops: {e}");
            return;
        }
    }
}

/// Records `conn.rtt()` every [`RTT_SAMPLE_PERIOD`].
async fn rtt_sampler(conn: quinn::Connection, shared: Arc<Shared>) {
    let mut interval = tokio::time::interval(RTT_SAMPLE_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = conn.closed() => return,
        }
        let us = u64::try_from(conn.rtt().as_micros()).unwrap_or(u64::MAX);
        lock(&shared.rtt).saturating_record(us.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_input_is_always_valid() {
        let cases = [
            (0.0, 0.0, 0.0, false),
            (3.0, 4.0, 10.0, true),
            (f32::NAN, f32::INFINITY, f32::NEG_INFINITY, false),
            (-0.6, 0.8, -7.0, true),
            (1e30, -1e30, 1e30, false),
        ];
        for (x, y, a, f) in cases {
            let h = HeldInput::sanitized(x, y, a, f);
            let cmd = h.cmd();
            assert_eq!(cmd.validate(), Ok(()), "{x} {y} {a}");
            assert_eq!(cmd.fire(), f);
            assert!(cmd.aim.abs() <= std::f32::consts::PI + 1e-6);
        }
        let h = HeldInput::sanitized(3.0, 4.0, 0.5, false);
        assert!((h.move_x - 0.6).abs() < 1e-6 && (h.move_y - 0.8).abs() < 1e-6);
        assert!((h.aim - 0.5).abs() < 1e-6);
    }

    #[test]
    fn rtt_histogram_builds() {
        assert!(new_rtt_histogram().is_ok());
    }
}
