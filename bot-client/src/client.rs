//! [`Client`]: one connection to a quicktick server. `connect` runs the handshake up to the welcome, then
//! background tasks read snapshot datagrams, send inputs every tick, read and write the reliable stream
//! and sample the RTT; the methods only read or update shared state, so they are cheap and synchronous.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use quicktick_shared::client::{ClientCounters, ClientSession};
use quicktick_shared::input::{InputCmd, BUTTON_FIRE};
use quicktick_shared::snapshot::Snapshot;
use quicktick_shared::tick::Tick;
use quicktick_shared::wire::{
    clean_chat, close, encode_frame, ChatLine, ClientMsg, FrameDecoder, PlayerInfo, RefuseReason,
    ServerMsg, Welcome, MAX_CHAT_BYTES, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::lobby::{ChatReceipts, LobbyView};

/// Default time allowed from `connect` to the welcome.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the RTT is sampled into [`ClientStats::rtt_us`].
pub const RTT_SAMPLE_PERIOD: Duration = Duration::from_millis(100);
/// Largest RTT the histogram distinguishes, microseconds (larger samples saturate).
pub const RTT_MAX_US: u64 = 10_000_000;
/// Frames queued for the stream writer before [`Client::chat`] refuses more.
pub const CHAT_QUEUE: usize = 256;
/// How long [`Client::close`] waits for the connection to report closed.
const CLOSE_WAIT: Duration = Duration::from_millis(250);
/// Stream read buffer.
const READ_CHUNK: usize = 8192;

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

/// Options of [`Client::connect_with`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Most chat lines [`Client::chat_log`] keeps, oldest dropped first (default: unlimited). Receipts
    /// and counters cover every line whatever this is; a swarm sets it low to bound memory.
    pub chat_log_limit: usize,
    /// Time allowed from the start of the connection to the welcome (default [`CONNECT_TIMEOUT`]).
    pub connect_timeout: Duration,
    /// Connect token for servers that require one (`quicktick-server token`); default none.
    pub token: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            chat_log_limit: usize::MAX,
            connect_timeout: CONNECT_TIMEOUT,
            token: None,
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
    /// max, parts, decode errors, missing baselines, stale/duplicate parts, inputs built.
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
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// State shared by the handle and the background tasks (each lock is held for a few statements).
#[derive(Debug)]
struct Shared {
    /// Origin of the `now` passed to the session.
    start: Instant,
    /// Snapshot reassembly, baselines, tick estimate, input history.
    session: Mutex<ClientSession>,
    /// Input held until changed.
    input: Mutex<HeldInput>,
    /// Roster, chat log, receipts.
    lobby: Mutex<LobbyView>,
    /// RTT samples.
    rtt: Mutex<Histogram<u64>>,
    /// Netcode measurements (input latency, prediction error, interpolation).
    net: Mutex<NetStats>,
    /// I/O counters.
    io: IoCounters,
    /// The server's drain notice, once received.
    drain: Mutex<Option<DrainNotice>>,
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

/// The chat sender: id allocation and enqueueing happen under one lock so ids reach the server in
/// increasing order.
#[derive(Debug)]
struct ChatOut {
    /// Next `client_msg_id` (starts at 1).
    next_id: u32,
    /// Frames for the stream writer.
    tx: mpsc::Sender<Vec<u8>>,
}

/// Owned by the [`Client`] handles; dropping the last one closes the connection and stops the tasks.
#[derive(Debug)]
struct Inner {
    /// The connection.
    conn: quinn::Connection,
    /// The welcome.
    welcome: Welcome,
    /// The name sent in `hello`.
    name: String,
    /// State shared with the tasks.
    shared: Arc<Shared>,
    /// Chat sender.
    chat: Mutex<ChatOut>,
    /// The background tasks.
    tasks: Vec<AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.conn.close(close::QUIT.into(), b"bye");
        for t in &self.tasks {
            t.abort();
        }
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
            .field("player_id", &self.inner.welcome.player_id)
            .field("remote", &self.inner.conn.remote_address())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn new_rtt_histogram() -> Result<Histogram<u64>, ConnectError> {
    Histogram::new_with_bounds(1, RTT_MAX_US, 2).map_err(|e| ConnectError::Setup(e.to_string()))
}

/// What the handshake hands over to the background tasks.
struct Joined {
    /// The connection.
    conn: quinn::Connection,
    /// Our half of the control stream.
    send: quinn::SendStream,
    /// The server's half.
    recv: quinn::RecvStream,
    /// Bytes read past the welcome stay here.
    decoder: FrameDecoder,
    /// The welcome.
    welcome: Welcome,
}

impl Client {
    /// Connects to `server` (TLS name `server_name`) as `name` with default [`ClientOptions`]: QUIC
    /// handshake, `hello`, and the welcome, all within 10 s. Then spawns the background tasks.
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
        let rtt = new_rtt_histogram()?;
        let start = Instant::now();
        let joined = tokio::time::timeout(
            options.connect_timeout,
            handshake(endpoint, server, server_name, name, options.token.clone()),
        )
        .await
        .map_err(|_| ConnectError::Timeout)??;
        let Joined {
            conn,
            send,
            recv,
            decoder,
            welcome,
        } = joined;

        let shared = Arc::new(Shared {
            start,
            session: Mutex::new(ClientSession::new(welcome.clone(), start.elapsed())),
            input: Mutex::new(HeldInput::default()),
            lobby: Mutex::new(LobbyView::new(&welcome, options.chat_log_limit)),
            net: Mutex::new(NetStats {
                input_to_snapshot_us: rtt.clone(),
                prediction_error_uu: Histogram::new_with_bounds(1, 1_000_000_000, 2)
                    .map_err(|e| ConnectError::Setup(e.to_string()))?,
                interp_warmup: None,
            }),
            rtt: Mutex::new(rtt),
            io: IoCounters::default(),
            drain: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(CHAT_QUEUE);
        let tick_rate = welcome.tick_rate;
        let tasks = vec![
            tokio::spawn(datagram_reader(conn.clone(), shared.clone())).abort_handle(),
            tokio::spawn(input_sender(conn.clone(), shared.clone(), tick_rate)).abort_handle(),
            tokio::spawn(stream_reader(conn.clone(), recv, decoder, shared.clone())).abort_handle(),
            tokio::spawn(stream_writer(conn.clone(), send, rx)).abort_handle(),
            tokio::spawn(rtt_sampler(conn.clone(), shared.clone())).abort_handle(),
        ];
        tracing::debug!(name, player_id = welcome.player_id, %server, "joined");
        Ok(Client {
            inner: Arc::new(Inner {
                conn,
                welcome,
                name: name.to_owned(),
                shared,
                chat: Mutex::new(ChatOut { next_id: 1, tx }),
                tasks,
            }),
        })
    }

    /// The welcome the server sent.
    #[must_use]
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// This client's player id.
    #[must_use]
    pub fn player_id(&self) -> u32 {
        self.inner.welcome.player_id
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

    /// Queues a chat line for the stream writer and returns its `client_msg_id` (1, 2, 3, …). Fails
    /// when the text is empty or longer than [`MAX_CHAT_BYTES`], the queue is full, or the connection
    /// is closed. The text is sent as given; the server strips control characters.
    pub fn chat(&self, text: &str) -> anyhow::Result<u32> {
        if text.len() > MAX_CHAT_BYTES || clean_chat(text).is_none() {
            anyhow::bail!("chat line is empty or longer than {MAX_CHAT_BYTES} bytes");
        }
        if let Some(reason) = self.inner.conn.close_reason() {
            anyhow::bail!("connection closed: {reason}");
        }
        let mut out = lock(&self.inner.chat);
        let id = out.next_id;
        let next = id
            .checked_add(1)
            .ok_or_else(|| anyhow::anyhow!("chat message ids exhausted"))?;
        let frame = encode_frame(&ClientMsg::Chat {
            client_msg_id: id,
            text: text.to_owned(),
        })?;
        out.tx.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => anyhow::anyhow!("chat queue full"),
            mpsc::error::TrySendError::Closed(_) => anyhow::anyhow!("stream writer stopped"),
        })?;
        out.next_id = next;
        bump(&self.inner.shared.io.chat_sent, 1);
        Ok(id)
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
            .conn
            .close_reason()
            .map(|e| CloseInfo::from_error(&e))
    }

    /// True until the connection is closed (by either side) or lost.
    #[must_use]
    pub fn is_connected(&self) -> bool {
        self.inner.conn.close_reason().is_none()
    }

    /// Why the connection closed, as quinn words it (for an application close: `closed by peer:
    /// <reason> (code N)`), once closed.
    #[must_use]
    pub fn close_reason(&self) -> Option<String> {
        self.inner.conn.close_reason().map(|e| e.to_string())
    }

    /// The QUIC connection.
    #[must_use]
    pub fn connection(&self) -> &quinn::Connection {
        &self.inner.conn
    }

    /// Closes with [`close::QUIT`] and waits briefly for the connection to settle. To make sure the
    /// close reaches the server, also call `Endpoint::wait_idle`.
    pub async fn close(&self) {
        let conn = &self.inner.conn;
        conn.close(close::QUIT.into(), b"bye");
        let _ = tokio::time::timeout(CLOSE_WAIT, conn.closed()).await;
    }
}

/// QUIC handshake, control stream, `hello`, and the first server message.
async fn handshake(
    endpoint: &quinn::Endpoint,
    server: SocketAddr,
    server_name: &str,
    name: &str,
    token: Option<String>,
) -> Result<Joined, ConnectError> {
    let conn = endpoint.connect(server, server_name)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = encode_frame(&ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        name: name.to_owned(),
        token,
    })
    .map_err(|e| ConnectError::Protocol(format!("cannot encode hello: {e}")))?;
    send.write_all(&hello).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(c) => ConnectError::Connection(c),
        other => ConnectError::Protocol(format!("cannot send hello: {other}")),
    })?;

    let mut decoder = FrameDecoder::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match decoder.next_msg::<ServerMsg>() {
            Ok(Some(ServerMsg::Welcome(welcome))) => {
                return Ok(Joined {
                    conn,
                    send,
                    recv,
                    decoder,
                    welcome,
                })
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
            Ok(None) => {}
            Err(e) => {
                conn.close(close::PROTOCOL_VIOLATION.into(), b"bad frame");
                return Err(ConnectError::Protocol(format!(
                    "bad frame before welcome: {e}"
                )));
            }
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
                    if let ServerMsg::InputStats { late, .. } = &msg {
                        lock(&shared.session).on_input_stats(*late);
                    }
                    if let ServerMsg::Draining { reason, drain_ms } = &msg {
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
