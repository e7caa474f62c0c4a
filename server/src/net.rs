//! The QUIC shell: endpoint construction, the accept loop (each incoming connection in its own task
//! with a handshake deadline), and the per-connection task that decodes hostile bytes, forwards
//! events to the tick thread and writes the client's stream.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use quicktick_shared::wire::{
    close, encode_frame, ClientMsg, ErrorCode, FrameDecoder, InputDatagram, LeaveReason, ServerMsg,
    WireError, ALPN, MAX_INPUT_DATAGRAM,
};
use quinn::{ConnectionError, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::time::{timeout_at, Instant};

use crate::config::ServerConfig;
use crate::core::ConnId;
use crate::stats::ServerStats;
use crate::telemetry::{CloseReason, ConnRegistry, ConnSampler, LinkCounters, Metrics};
use crate::tick_loop::{Control, Link, Outbound};
use crate::tls::CertKey;

/// Builds the server endpoint: TLS 1.3 with the `quicktick/1` ALPN, keep-alive and idle timeout from
/// the config, a small datagram send buffer, and one client-opened bidirectional stream.
pub fn server_endpoint(
    bind: SocketAddr,
    cert: CertKey,
    cfg: &ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .context("TLS 1.3 unavailable")?
    .with_no_client_auth()
    .with_single_cert(cert.chain, cert.key)
    .context("certificate and key do not match or are unsupported")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .context("TLS config unusable for QUIC")?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        VarInt::from_u64(cfg.idle_timeout_ms)
            .context("idle timeout too large")?
            .into(),
    ));
    t.keep_alive_interval(Some(Duration::from_millis(cfg.keep_alive_ms)));
    t.datagram_send_buffer_size(cfg.datagram_send_buffer);
    t.datagram_receive_buffer_size(Some(64 * 1024));
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    sc.transport_config(Arc::new(t));
    // quinn's default, relied on: a client keeps its session across address changes.
    sc.migration(true);
    quinn::Endpoint::server(sc, bind).with_context(|| format!("cannot bind UDP {bind}"))
}

/// Shared context of connection tasks.
pub(crate) struct NetCtx {
    pub cfg: ServerConfig,
    pub stats: Arc<ServerStats>,
    pub control: mpsc::Sender<Control>,
    pub inputs: mpsc::Sender<(ConnId, InputDatagram, usize)>,
    pub next_conn: AtomicU64,
    /// Connections between the first packet and `hello` (bounded: beyond it new ones are refused).
    pub pending: Arc<tokio::sync::Semaphore>,
    /// Metric handles.
    pub metrics: Metrics,
    /// Each connection's status, refreshed once a second by its task.
    pub conns: Arc<ConnRegistry>,
    /// Connections per IP address, open or in their handshake.
    pub per_ip: Arc<PerIp>,
    /// Connections per IP address that have not sent `hello` yet.
    pub pending_ip: Arc<PerIp>,
}

impl NetCtx {
    pub(crate) fn new(
        cfg: ServerConfig,
        stats: Arc<ServerStats>,
        control: mpsc::Sender<Control>,
        inputs: mpsc::Sender<(ConnId, InputDatagram, usize)>,
        metrics: Metrics,
        conns: Arc<ConnRegistry>,
    ) -> Self {
        Self {
            metrics,
            conns,
            pending: Arc::new(tokio::sync::Semaphore::new(cfg.max_pending_handshakes)),
            cfg,
            stats,
            control,
            inputs,
            next_conn: AtomicU64::new(1),
            per_ip: Arc::default(),
            pending_ip: Arc::default(),
        }
    }
}

/// A half-open connection's claim: a slot of `max_pending_handshakes` and of its address's
/// `max_pending_per_ip`, released when `hello` arrives or the connection ends.
pub(crate) struct Pending {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _ip: IpSlot,
}

/// Connection counts by IP address (IPv4-mapped IPv6 counted as IPv4).
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection counted against its IP address until dropped.
#[derive(Debug)]
pub(crate) struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// Counts one more connection from `ip`; returns its slot and how many there were before.
    fn take(self: &Arc<Self>, ip: IpAddr) -> (IpSlot, u32) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(ip).or_insert(0);
        let before = *n;
        *n = n.saturating_add(1);
        (
            IpSlot {
                per_ip: self.clone(),
                ip,
            },
            before,
        )
    }

    /// Connections from `ip` now.
    fn count(&self, ip: IpAddr) -> u32 {
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self
            .per_ip
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// New (unvalidated) handshakes counted per one-second window, for the Retry threshold.
#[derive(Debug)]
struct HandshakeRate {
    window_start: Instant,
    count: u32,
}

impl HandshakeRate {
    /// Counts one arrival at `now`; returns the count in the current window, this one included.
    fn arrive(&mut self, now: Instant) -> u32 {
        if now.saturating_duration_since(self.window_start) >= Duration::from_secs(1) {
            self.window_start = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count
    }
}

/// Accepts connections until the endpoint closes; each one runs in its own task. In order, an
/// incoming connection is:
/// - refused at the QUIC level (`CONNECTION_REFUSED`, before any TLS work) once `draining` is true;
/// - sent a QUIC Retry when it has not proven its address and more than
///   `retry_above_handshakes_per_sec` new handshakes arrived in this one-second window (its retried
///   attempt comes back validated and goes on);
/// - over `max_connections_per_ip`: completed and closed with [`close::TOO_MANY_CONNECTIONS`] and a
///   reason; refused silently when its address already has twice the limit open or in a handshake
///   (so a flood of handshakes from one address costs no TLS work beyond the limit);
/// - refused when `max_pending_handshakes` are already pending;
/// - otherwise handed to its own task.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    ctx: Arc<NetCtx>,
    draining: watch::Receiver<bool>,
) {
    let mut rate = HandshakeRate {
        window_start: Instant::now(),
        count: 0,
    };
    let limit = ctx.cfg.max_connections_per_ip;
    while let Some(incoming) = endpoint.accept().await {
        if *draining.borrow() {
            ServerStats::add(&ctx.stats.drain_refused, 1);
            incoming.refuse();
            continue;
        }
        if !incoming.remote_address_validated()
            && rate.arrive(Instant::now()) > ctx.cfg.retry_above_handshakes_per_sec
            && incoming.may_retry()
        {
            match incoming.retry() {
                Ok(()) => ServerStats::add(&ctx.stats.retries_sent, 1),
                Err(e) => e.into_incoming().refuse(),
            }
            continue;
        }
        let ip = incoming.remote_address().ip().to_canonical();
        if limit > 0 && ctx.per_ip.count(ip) >= limit.saturating_mul(2) {
            ServerStats::add(&ctx.stats.per_ip_refused, 1);
            incoming.refuse();
            continue;
        }
        let pending_cap = ctx.cfg.max_pending_per_ip;
        if pending_cap > 0 && ctx.pending_ip.count(ip) >= pending_cap {
            // One address may not hold many half-open connections: the table of pending
            // handshakes is shared by everyone.
            ServerStats::add(&ctx.stats.handshakes_refused, 1);
            ctx.metrics.handshakes_refused.increment(1);
            incoming.refuse();
            continue;
        }
        let Ok(permit) = ctx.pending.clone().try_acquire_owned() else {
            // Too many half-open connections: refuse cheaply (QUIC CONNECTION_REFUSED).
            ServerStats::add(&ctx.stats.handshakes_refused, 1);
            ctx.metrics.handshakes_refused.increment(1);
            incoming.refuse();
            continue;
        };
        let permit = Pending {
            _permit: permit,
            _ip: ctx.pending_ip.take(ip).0,
        };
        let (slot, before) = ctx.per_ip.take(ip);
        let ctx = ctx.clone();
        if limit > 0 && before >= limit {
            ServerStats::add(&ctx.stats.per_ip_refused, 1);
            tokio::spawn(async move { too_many(incoming, &ctx, ip, slot, permit).await });
        } else {
            tokio::spawn(async move { connection(incoming, ctx, permit, slot).await });
        }
    }
}

/// Completes the handshake of a connection over the per-IP limit only to close it with a reason.
async fn too_many(
    incoming: quinn::Incoming,
    ctx: &NetCtx,
    ip: IpAddr,
    slot: IpSlot,
    permit: Pending,
) {
    let deadline = Instant::now() + Duration::from_millis(ctx.cfg.handshake_timeout_ms);
    if let Ok(Ok(conn)) = timeout_at(deadline, incoming).await {
        let reason = format!(
            "too many connections from {ip} (limit {})",
            ctx.cfg.max_connections_per_ip
        );
        tracing::info!("refused: {reason}");
        conn.close(close::TOO_MANY_CONNECTIONS.into(), reason.as_bytes());
    }
    drop((slot, permit));
}

fn leave_reason(e: &ConnectionError) -> LeaveReason {
    match e {
        ConnectionError::TimedOut | ConnectionError::Reset => LeaveReason::TimedOut,
        // The client gave up on a silent path and will resume: keep the session.
        ConnectionError::ApplicationClosed(a)
            if a.error_code.into_inner() == u64::from(close::RECONNECTING) =>
        {
            LeaveReason::TimedOut
        }
        ConnectionError::LocallyClosed => LeaveReason::Kicked,
        _ => LeaveReason::Quit,
    }
}

fn violation(
    conn: &quinn::Connection,
    stats: &std::sync::atomic::AtomicU64,
    metric: &metrics::Counter,
    what: &str,
    e: &WireError,
) -> LeaveReason {
    ServerStats::add(stats, 1);
    metric.increment(1);
    let reason = format!("protocol violation: {what}: {e}");
    tracing::info!(remote = %conn.remote_address(), "{reason}");
    let mut bytes = reason.into_bytes();
    bytes.truncate(512);
    conn.close(close::PROTOCOL_VIOLATION.into(), &bytes);
    LeaveReason::Kicked
}

async fn connection(incoming: quinn::Incoming, ctx: Arc<NetCtx>, permit: Pending, _slot: IpSlot) {
    let began = Instant::now();
    let deadline = began + Duration::from_millis(ctx.cfg.handshake_timeout_ms);
    let conn = match timeout_at(deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            ServerStats::add(&ctx.stats.handshake_failures, 1);
            ctx.metrics.close(CloseReason::HandshakeFailed);
            tracing::debug!("handshake failed: {e}");
            return;
        }
        Err(_) => {
            ServerStats::add(&ctx.stats.handshake_failures, 1);
            ctx.metrics.close(CloseReason::HandshakeTimeout);
            return;
        }
    };
    ServerStats::add(&ctx.stats.connections_accepted, 1);
    ctx.stats
        .connections_current
        .fetch_add(1, Ordering::Relaxed);
    ctx.metrics.connections_total.increment(1);
    ctx.metrics.connections.increment(1.0);
    let id = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let reason = serve(id, &conn, &ctx, (began, deadline), permit).await;
    ctx.metrics.close(reason);
    if let Ok(mut m) = ctx.conns.lock() {
        m.remove(&id);
    }
    ctx.metrics.connections.decrement(1.0);
    ctx.stats
        .connections_current
        .fetch_sub(1, Ordering::Relaxed);
}

/// The metrics label of how a served connection ended.
fn close_reason(conn: &quinn::Connection, leave: Option<LeaveReason>) -> CloseReason {
    match conn.close_reason() {
        Some(ConnectionError::TimedOut | ConnectionError::Reset) => CloseReason::TimedOut,
        Some(ConnectionError::LocallyClosed) => match leave {
            Some(LeaveReason::Quit) => CloseReason::Quit,
            _ => CloseReason::ServerClosed,
        },
        _ => match leave {
            Some(LeaveReason::TimedOut) => CloseReason::TimedOut,
            _ => CloseReason::Quit,
        },
    }
}

async fn serve(
    id: ConnId,
    conn: &quinn::Connection,
    ctx: &NetCtx,
    (began, deadline): (Instant, Instant),
    permit: Pending,
) -> CloseReason {
    // The stream and `hello` must arrive before the handshake deadline.
    let mut dec = FrameDecoder::new();
    let mut buf = vec![0u8; 4096];
    let hello = timeout_at(deadline, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| Err(leave_reason(&e)))?;
        loop {
            match dec.next_msg::<ClientMsg>() {
                Ok(Some(first @ (ClientMsg::Hello { .. } | ClientMsg::Resume(_)))) => {
                    return Ok((send, recv, first))
                }
                Ok(Some(_)) => {
                    return Err(Ok(WireError::Invalid(
                        "the first message must be hello or resume",
                    )));
                }
                Ok(None) => {}
                Err(e) => return Err(Ok(e)),
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => dec.extend(buf.get(..n).unwrap_or_default()),
                Ok(None) => return Err(Err(LeaveReason::Quit)),
                Err(_) => return Err(Err(LeaveReason::TimedOut)),
            }
        }
    })
    .await;
    let (send, mut recv, first) = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(Ok(e))) => {
            let m = &ctx.metrics.bad_frames;
            violation(conn, &ctx.stats.bad_frames, m, "bad hello", &e);
            return CloseReason::ProtocolViolation;
        }
        Ok(Err(Err(r))) => return close_reason(conn, Some(r)),
        Err(_) => {
            ServerStats::add(&ctx.stats.handshake_failures, 1);
            conn.close(
                close::HANDSHAKE_TIMEOUT.into(),
                b"no hello before the handshake deadline",
            );
            return CloseReason::HandshakeTimeout;
        }
    };
    drop(permit); // past hello: no longer a half-open connection
    ctx.metrics
        .handshake_seconds
        .record(began.elapsed().as_secs_f64());
    let (tx, rx) = mpsc::channel(ctx.cfg.outbound_queue);
    tokio::spawn(writer(send, rx, conn.clone()));
    let own_tx = tx.clone();
    let counters = Arc::new(LinkCounters::default());
    let mut sampler = ConnSampler::new(conn, counters.clone(), ctx.cfg.datagram_send_buffer);
    let mut sample_every = tokio::time::interval_at(
        Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    sample_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let link = Link {
        conn: conn.clone(),
        out: tx,
        counters,
    };
    if ctx
        .control
        .send(Control::Join {
            conn: id,
            link,
            first,
        })
        .await
        .is_err()
    {
        conn.close(close::SHUTDOWN.into(), b"server shutting down");
        return CloseReason::ServerClosed;
    }
    let mut remote = conn.remote_address();
    let mut violated = false;
    let reason = loop {
        tokio::select! {
            _ = sample_every.tick() => {
                let status = sampler.sample(id, conn, &ctx.metrics);
                if let Ok(mut m) = ctx.conns.lock() {
                    m.insert(id, status);
                }
            }
            d = conn.read_datagram() => match d {
                Ok(bytes) => {
                    note_migration(conn, &mut remote, &ctx.stats);
                    let bad = &ctx.metrics.bad_datagrams;
                    if bytes.len() > MAX_INPUT_DATAGRAM {
                        violated = true;
                        break violation(conn, &ctx.stats.bad_datagrams, bad, "datagram", &WireError::TooLarge(bytes.len(), MAX_INPUT_DATAGRAM));
                    }
                    match InputDatagram::decode(&bytes) {
                        Ok(d) => {
                            ServerStats::add(&ctx.stats.input_datagrams, 1);
                            ServerStats::add(&ctx.stats.input_bytes, bytes.len() as u64);
                            ctx.metrics.datagrams_received.increment(1);
                            ctx.metrics.bytes_received_input.increment(bytes.len() as u64);
                            if ctx.inputs.try_send((id, d, bytes.len())).is_err() {
                                ServerStats::add(&ctx.stats.input_queue_full, 1);
                                ctx.metrics.dropped_queue_full.increment(1);
                            }
                        }
                        Err(e) => {
                            violated = true;
                            break violation(conn, &ctx.stats.bad_datagrams, bad, "input datagram", &e);
                        }
                    }
                }
                Err(e) => break leave_reason(&e),
            },
            r = recv.read(&mut buf) => match r {
                Ok(Some(n)) => {
                    ctx.metrics.bytes_received_stream.increment(n as u64);
                    dec.extend(buf.get(..n).unwrap_or_default());
                    let mut bad = None;
                    loop {
                        match dec.next_msg::<ClientMsg>() {
                            Ok(Some(ClientMsg::Hello { .. } | ClientMsg::Resume(_))) => {
                                let err = ServerMsg::Error { code: ErrorCode::UnexpectedMessage, detail: "already joined".into() };
                                if let Ok(f) = encode_frame(&err) {
                                    let _ = own_tx.try_send(Outbound::Frame(f));
                                }
                            }
                            Ok(Some(msg)) => {
                                if ctx.control.send(Control::Msg { conn: id, msg }).await.is_err() {
                                    break;
                                }
                            }
                            Ok(None) => break,
                            Err(e) => {
                                bad = Some(e);
                                break;
                            }
                        }
                    }
                    if let Some(e) = bad {
                        violated = true;
                        let m = &ctx.metrics.bad_frames;
                        break violation(conn, &ctx.stats.bad_frames, m, "stream frame", &e);
                    }
                }
                Ok(None) => {
                    conn.close(close::QUIT.into(), b"stream finished");
                    break LeaveReason::Quit;
                }
                Err(e) => match conn.close_reason() {
                    Some(c) => break leave_reason(&c),
                    None => {
                        // The client reset or stopped its half of the control stream: it left.
                        let reason = format!("control stream ended: {e}");
                        conn.close(close::QUIT.into(), reason.as_bytes());
                        break LeaveReason::Quit;
                    }
                },
            },
        }
    };
    let _ = ctx.control.send(Control::Gone { conn: id, reason }).await;
    if violated {
        CloseReason::ProtocolViolation
    } else {
        close_reason(conn, Some(reason))
    }
}

/// Counts a change of the client's address (QUIC migration), checked as each datagram arrives.
fn note_migration(conn: &quinn::Connection, remote: &mut SocketAddr, stats: &ServerStats) {
    let now = conn.remote_address();
    if now != *remote {
        ServerStats::add(&stats.migrations, 1);
        tracing::debug!(from = %remote, to = %now, "client migrated");
        *remote = now;
    }
}

async fn writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<Outbound>,
    conn: quinn::Connection,
) {
    while let Some(o) = rx.recv().await {
        match o {
            Outbound::Frame(bytes) => {
                if let Err(e) = send.write_all(&bytes).await {
                    // The client stopped reading its control stream (STOP_SENDING) or is gone: it
                    // can no longer see chat or presence, so it cannot stay in the game.
                    let reason = format!("control stream stopped: {e}");
                    conn.close(close::QUIT.into(), reason.as_bytes());
                    return;
                }
            }
            Outbound::CloseAfterFlush(code, reason) => {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                conn.close(code.into(), reason.as_bytes());
                return;
            }
        }
    }
}
