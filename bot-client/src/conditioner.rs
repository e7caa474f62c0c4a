//! A seeded user-space link conditioner under real QUIC: loss, latency, jitter (which reorders) and
//! duplication, per direction, applied by wrapping the UDP socket a [`quinn::Endpoint`] uses.
//!
//! The impairment decisions are made by the sans-IO [`LinkSim`] (one per direction, time passed in);
//! this module only moves datagrams in and out of it:
//! - **up** (what this endpoint sends): [`AsyncUdpSocket::try_send`] offers each datagram (a GSO batch
//!   is split into its segments) to the up-link; whatever is due at once is sent inline, the rest is
//!   sent later by a background task through the inner socket. `try_send` never blocks and, on the
//!   impaired path, never fails (an inner send error is counted, as a lossy link would lose it).
//! - **down** (what this endpoint receives): [`AsyncUdpSocket::poll_recv`] reads everything the inner
//!   socket holds into the down-link (a GRO batch is split by its stride), hands quinn what is due,
//!   and arms a timer for the next delivery.
//!
//! A direction with no impairment and nothing queued is a pass-through to the inner socket (same
//! calls, same batching, no extra delay). Queues are bounded by [`QUEUE_CAP`] datagrams per direction
//! (beyond that a datagram is dropped and counted as `overflow`). Counters are read, and impairments
//! changed, through the [`Conditioner`] handle.
//!
//! [`ConditionedSocket::rewrap`] puts a fresh inner socket under the *same* links (impairments,
//! queues, counters, handle), for a client endpoint that changes its address (see
//! [`crate::migrate`]): from then on the up-link is sent through the new socket only, while the old
//! one still delivers what it receives until quinn drops it.
//!
//! [`Conditioner::blackout`] cuts the link both ways (a network switch, a tunnel, a pulled cable):
//! while it is on, every datagram offered, and every copy that was in flight and comes due, is dropped
//! and counted as `blackout`; the configured impairments are left untouched and apply again as soon
//! as it is turned off.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::ops::AddAssign;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use quicktick_shared::link::{LinkConfig, LinkSim};
use quicktick_shared::sim::Rng;
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rustls_pki_types::CertificateDer;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};

use crate::endpoint::client_endpoint_with;

/// Most datagrams one direction holds (in flight plus due but not yet handed on).
pub const QUEUE_CAP: usize = 4096;
/// Largest latency + jitter of one direction.
pub const MAX_DELAY: Duration = Duration::from_secs(60);
/// Most inner `poll_recv` calls in one `poll_recv` before handing over what is due.
const RECV_DRAIN_BOUND: usize = 64;

/// Impairments of both directions of an endpoint's link, and the seed of their random streams.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Impairment {
    /// What the endpoint sends (for a client: client → server).
    pub up: LinkConfig,
    /// What the endpoint receives (for a client: server → client).
    pub down: LinkConfig,
    /// Seed; each direction draws from its own stream derived from it.
    pub seed: u64,
}

impl Impairment {
    /// The same impairments both ways.
    #[must_use]
    pub fn symmetric(link: LinkConfig, seed: u64) -> Self {
        Self {
            up: link,
            down: link,
            seed,
        }
    }

    /// True when neither direction is impaired.
    #[must_use]
    pub fn is_none(&self) -> bool {
        self.up == LinkConfig::default() && self.down == LinkConfig::default()
    }

    /// The same impairments with a seed derived from this one and `index` (one per endpoint).
    #[must_use]
    pub fn for_endpoint(&self, index: usize) -> Self {
        let mut rng = Rng::new(self.seed ^ (index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        Self {
            seed: rng.next_u64(),
            ..*self
        }
    }

    /// Fails when a probability is outside `0..=1` (or NaN) or a direction's latency + jitter
    /// exceeds [`MAX_DELAY`].
    pub fn validate(&self) -> anyhow::Result<()> {
        check_link(&self.up).context("up-link")?;
        check_link(&self.down).context("down-link")
    }

    /// The seeds of the up- and down-link random streams.
    fn link_seeds(&self) -> (u64, u64) {
        let mut rng = Rng::new(self.seed);
        let up = rng.next_u64();
        (up, rng.next_u64())
    }
}

/// Fails on probabilities outside `0..=1` and delays beyond [`MAX_DELAY`].
fn check_link(link: &LinkConfig) -> anyhow::Result<()> {
    for (what, p) in [("loss", link.loss), ("duplication", link.duplicate)] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{what} probability {p} is not within 0..=1");
        }
    }
    if link.latency.saturating_add(link.jitter) > MAX_DELAY {
        bail!(
            "latency {:?} + jitter {:?} exceeds {MAX_DELAY:?}",
            link.latency,
            link.jitter
        );
    }
    Ok(())
}

/// Counters of one direction. Every datagram offered (plus every extra copy) is either dropped, lost
/// to overflow, lost to a blackout, still queued, or released:
/// `offered + duplicated = dropped + overflow + blackout + queued + released`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Datagrams offered to the impaired link (GSO/GRO batches count each segment).
    pub offered: u64,
    /// Dropped by the loss model.
    pub dropped: u64,
    /// Extra copies made by the duplication model.
    pub duplicated: u64,
    /// Copies released later than they were offered (latency, jitter).
    pub delayed: u64,
    /// Dropped because the direction already held [`QUEUE_CAP`] datagrams.
    pub overflow: u64,
    /// Copies dropped by a [`Conditioner::blackout`]: offered while it was on, or in flight and due
    /// while it was on.
    pub blackout: u64,
    /// Copies released from the link (sent through the inner socket, or handed to quinn).
    pub released: u64,
    /// Up only: released datagrams the inner socket refused (counted as lost).
    pub send_errors: u64,
    /// Datagrams held now (a gauge).
    pub queued: u64,
}

impl AddAssign for DirectionStats {
    fn add_assign(&mut self, o: Self) {
        self.offered += o.offered;
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.delayed += o.delayed;
        self.overflow += o.overflow;
        self.blackout += o.blackout;
        self.released += o.released;
        self.send_errors += o.send_errors;
        self.queued += o.queued;
    }
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConditionerStats {
    /// What the endpoint sends.
    pub up: DirectionStats,
    /// What the endpoint receives.
    pub down: DirectionStats,
}

impl AddAssign for ConditionerStats {
    fn add_assign(&mut self, o: Self) {
        self.up += o.up;
        self.down += o.down;
    }
}

/// A handle on a conditioned socket's links: counters, and impairments that may be changed while
/// it runs. Cheap to clone; outlives the socket harmlessly.
#[derive(Debug, Clone)]
pub struct Conditioner {
    /// Up-link state.
    up: Arc<Mutex<Link>>,
    /// Down-link state.
    down: Arc<Mutex<Link>>,
    /// Wakes the up-link sender task.
    up_wake: Arc<Notify>,
    /// Link time zero (shared by every socket put under these links).
    epoch: Instant,
}

impl Conditioner {
    /// Counters of both directions.
    #[must_use]
    pub fn stats(&self) -> ConditionerStats {
        ConditionerStats {
            up: lock(&self.up).stats(),
            down: lock(&self.down).stats(),
        }
    }

    /// The current impairments (the seed field is the one the socket was created with).
    #[must_use]
    pub fn impairment(&self) -> Impairment {
        let (up, seed) = {
            let link = lock(&self.up);
            (link.sim.config, link.seed)
        };
        let down = lock(&self.down).sim.config;
        Impairment { up, down, seed }
    }

    /// Changes the up-link impairments for datagrams offered from now on (queued ones keep their
    /// delivery times). Fails like [`Impairment::validate`].
    pub fn set_up(&self, link: LinkConfig) -> anyhow::Result<()> {
        check_link(&link)?;
        lock(&self.up).sim.config = link;
        self.up_wake.notify_one();
        Ok(())
    }

    /// Changes the down-link impairments for datagrams received from now on.
    pub fn set_down(&self, link: LinkConfig) -> anyhow::Result<()> {
        check_link(&link)?;
        lock(&self.down).sim.config = link;
        Ok(())
    }

    /// Turns a blackout on or off. While on, nothing gets through in either direction: datagrams
    /// offered, and copies in flight that come due, are dropped and counted as
    /// [`DirectionStats::blackout`]. The impairments (and changes made with [`Self::set_up`] /
    /// [`Self::set_down`] meanwhile) are kept and apply again when it is turned off; datagrams
    /// still in flight then (e.g. behind a latency) are delivered as usual. Idempotent.
    pub fn blackout(&self, on: bool) {
        lock(&self.up).blackout = on;
        lock(&self.down).blackout = on;
        // The sender task re-reads the link (in-flight copies are now dropped, or sent again).
        self.up_wake.notify_one();
    }

    /// True while a [`Self::blackout`] is on.
    #[must_use]
    pub fn in_blackout(&self) -> bool {
        lock(&self.up).blackout
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One datagram and what the socket needs to send or deliver it.
#[derive(Clone)]
struct Datagram {
    /// Destination (up) or source (down).
    addr: SocketAddr,
    /// ECN bits.
    ecn: Option<EcnCodepoint>,
    /// Source IP to send from (up) or destination IP it was sent to (down).
    ip: Option<IpAddr>,
    /// Payload.
    bytes: Vec<u8>,
}

impl fmt::Debug for Datagram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datagram")
            .field("addr", &self.addr)
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl Datagram {
    fn transmit(&self) -> Transmit<'_> {
        Transmit {
            destination: self.addr,
            ecn: self.ecn,
            contents: &self.bytes,
            segment_size: None,
            src_ip: self.ip,
        }
    }
}

/// A datagram inside the [`LinkSim`], which carries only its id.
#[derive(Debug)]
struct Pending {
    /// The datagram.
    datagram: Datagram,
    /// Copies still in the link.
    copies: usize,
    /// When it was offered (link time).
    offered_at: Duration,
}

/// One direction: the sans-IO link plus the datagrams it refers to.
#[derive(Debug)]
struct Link {
    /// Impairment decisions and delivery order; its payloads are ids into `pending`.
    sim: LinkSim,
    /// The datagrams in the link, by id.
    pending: HashMap<u64, Pending>,
    /// Next id.
    next_id: u64,
    /// Released, not yet sent (up) or handed to quinn (down).
    ready: VecDeque<Datagram>,
    /// Counters (`queued` is computed).
    counters: DirectionStats,
    /// The seed the socket was created with.
    seed: u64,
    /// Blackout: nothing is offered or released.
    blackout: bool,
    /// Up only: the generation of the socket whose sender task sends for this link (the newest
    /// [`ConditionedSocket::rewrap`]); older sockets' tasks stop.
    owner: u64,
}

impl Link {
    fn new(config: LinkConfig, link_seed: u64, seed: u64) -> Self {
        Self {
            sim: LinkSim::new(config, link_seed),
            pending: HashMap::new(),
            next_id: 0,
            ready: VecDeque::new(),
            counters: DirectionStats::default(),
            seed,
            blackout: false,
            owner: 0,
        }
    }

    fn stats(&self) -> DirectionStats {
        DirectionStats {
            queued: (self.sim.in_flight() + self.ready.len()) as u64,
            ..self.counters
        }
    }

    /// No impairment, no blackout and nothing held: the socket passes straight through.
    fn passthrough(&self) -> bool {
        !self.blackout
            && self.sim.config == LinkConfig::default()
            && self.sim.in_flight() == 0
            && self.ready.is_empty()
    }

    /// Offers a datagram to the link at link time `now`.
    fn offer(&mut self, now: Duration, datagram: Datagram) {
        self.counters.offered += 1;
        if self.blackout {
            self.counters.blackout += 1;
            return;
        }
        if self.sim.in_flight() + self.ready.len() >= QUEUE_CAP {
            self.counters.overflow += 1;
            return;
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let (before, dropped) = (self.sim.in_flight(), self.sim.dropped);
        self.sim.send(now, id.to_le_bytes().to_vec());
        let copies = self.sim.in_flight().saturating_sub(before);
        if self.sim.dropped > dropped {
            self.counters.dropped += 1;
        }
        if copies > 1 {
            self.counters.duplicated += (copies - 1) as u64;
        }
        if copies > 0 {
            self.pending.insert(
                id,
                Pending {
                    datagram,
                    copies,
                    offered_at: now,
                },
            );
        }
    }

    /// Moves every copy due by `now` to `ready`, in delivery order (during a blackout: drops them).
    fn release(&mut self, now: Duration) {
        for key in self.sim.poll(now) {
            let Ok(key) = <[u8; 8]>::try_from(key.as_slice()) else {
                continue;
            };
            let id = u64::from_le_bytes(key);
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            if self.blackout {
                self.counters.blackout += 1;
                p.copies = p.copies.saturating_sub(1);
                if p.copies == 0 {
                    self.pending.remove(&id);
                }
                continue;
            }
            self.counters.released += 1;
            if now > p.offered_at {
                self.counters.delayed += 1;
            }
            p.copies = p.copies.saturating_sub(1);
            if p.copies > 0 {
                self.ready.push_back(p.datagram.clone());
            } else if let Some(p) = self.pending.remove(&id) {
                self.ready.push_back(p.datagram);
            }
        }
    }
}

/// A [`quinn::AsyncUdpSocket`] that impairs what passes through it (see the module docs).
pub struct ConditionedSocket {
    /// The real socket.
    inner: Arc<dyn AsyncUdpSocket>,
    /// Up-link state (shared with the sender task and the handle).
    up: Arc<Mutex<Link>>,
    /// Down-link state.
    down: Arc<Mutex<Link>>,
    /// Wakes the sender task when the up-link has something queued.
    up_wake: Arc<Notify>,
    /// Wakes `poll_recv` at the next down-link delivery (created on first use).
    timer: Mutex<Option<Pin<Box<Sleep>>>>,
    /// Link time zero.
    epoch: Instant,
    /// Which socket of these links this is (0 for the first, then one more per rewrap).
    generation: u64,
    /// Dropped with the socket: stops the sender task.
    _closed: watch::Sender<()>,
}

impl fmt::Debug for ConditionedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConditionedSocket")
            .field("inner", &self.inner)
            .field("generation", &self.generation)
            .field("up", &lock(&self.up).stats())
            .field("down", &lock(&self.down).stats())
            .finish_non_exhaustive()
    }
}

impl ConditionedSocket {
    /// Wraps `inner` (e.g. from [`quinn::Runtime::wrap_udp_socket`]) with `imp`, and spawns the
    /// up-link sender task, which ends when the returned socket is dropped. Fails when `imp` is
    /// invalid or there is no tokio runtime.
    pub fn wrap(
        inner: Arc<dyn AsyncUdpSocket>,
        imp: Impairment,
    ) -> anyhow::Result<(Arc<Self>, Conditioner)> {
        imp.validate()?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow!("a conditioned socket needs a tokio runtime"))?;
        let (up_seed, down_seed) = imp.link_seeds();
        let up = Arc::new(Mutex::new(Link::new(imp.up, up_seed, imp.seed)));
        let down = Arc::new(Mutex::new(Link::new(imp.down, down_seed, imp.seed)));
        let handle = Conditioner {
            up,
            down,
            up_wake: Arc::new(Notify::new()),
            epoch: Instant::now(),
        };
        let socket = Self::start(inner, &handle, 0, &runtime);
        Ok((socket, handle))
    }

    /// Puts `inner` under the links of `handle` (same impairments, queues, counters and blackout
    /// state; `handle` keeps working): from now on the up-link's delayed datagrams go out through
    /// `inner`, and the socket previously under these links stops sending them (it still delivers
    /// what it receives, until it is dropped). For [`quinn::Endpoint::rebind_abstract`]. Fails when
    /// there is no tokio runtime.
    pub fn rewrap(
        inner: Arc<dyn AsyncUdpSocket>,
        handle: &Conditioner,
    ) -> anyhow::Result<Arc<Self>> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| anyhow!("a conditioned socket needs a tokio runtime"))?;
        let generation = {
            let mut up = lock(&handle.up);
            up.owner = up.owner.wrapping_add(1);
            up.owner
        };
        let socket = Self::start(inner, handle, generation, &runtime);
        // The old sender task sees it is no longer the owner and stops; the new one takes over.
        handle.up_wake.notify_one();
        Ok(socket)
    }

    /// A socket over `inner` and the links of `handle`, and its up-link sender task.
    fn start(
        inner: Arc<dyn AsyncUdpSocket>,
        handle: &Conditioner,
        generation: u64,
        runtime: &tokio::runtime::Handle,
    ) -> Arc<Self> {
        let (closed_tx, closed_rx) = watch::channel(());
        runtime.spawn(send_delayed(
            inner.clone(),
            handle.up.clone(),
            handle.up_wake.clone(),
            handle.epoch,
            generation,
            closed_rx,
        ));
        Arc::new(Self {
            inner,
            up: handle.up.clone(),
            down: handle.down.clone(),
            up_wake: handle.up_wake.clone(),
            timer: Mutex::new(None),
            epoch: handle.epoch,
            generation,
            _closed: closed_tx,
        })
    }

    /// Link time.
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Copies what is due into quinn's buffers; the number of datagrams written.
    fn hand_over(down: &mut Link, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta]) -> usize {
        let mut n = 0;
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some(d) = down.ready.pop_front() else {
                break;
            };
            let len = d.bytes.len().min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..len), d.bytes.get(..len)) {
                dst.copy_from_slice(src);
            }
            *m = RecvMeta {
                addr: d.addr,
                len,
                stride: len,
                ecn: d.ecn,
                dst_ip: d.ip,
            };
            n += 1;
        }
        n
    }
}

impl AsyncUdpSocket for ConditionedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let mut up = lock(&self.up);
        if up.passthrough() {
            drop(up);
            return self.inner.try_send(transmit);
        }
        let now = self.now();
        let segment = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for chunk in transmit.contents.chunks(segment) {
            up.offer(
                now,
                Datagram {
                    addr: transmit.destination,
                    ecn: transmit.ecn,
                    ip: transmit.src_ip,
                    bytes: chunk.to_vec(),
                },
            );
        }
        // Send what is due now inline, unless older datagrams are waiting for the sender task (or a
        // newer socket took over the link: its task sends them).
        let behind = !up.ready.is_empty() || up.owner != self.generation;
        up.release(now);
        if !behind {
            while let Some(d) = up.ready.pop_front() {
                match self.inner.try_send(&d.transmit()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        up.ready.push_front(d);
                        break;
                    }
                    Err(e) => {
                        up.counters.send_errors += 1;
                        tracing::trace!("conditioned send failed: {e}");
                    }
                }
            }
        }
        let wake = !up.ready.is_empty() || up.sim.in_flight() > 0;
        drop(up);
        if wake {
            self.up_wake.notify_one();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut down = lock(&self.down);
        if down.passthrough() {
            drop(down);
            return self.inner.poll_recv(cx, bufs, meta);
        }
        if bufs.is_empty() || meta.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Everything the inner socket holds enters the link (quinn's buffers serve as scratch).
        let now = self.now();
        let mut drained = false;
        for _ in 0..RECV_DRAIN_BOUND {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => {
                    for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                        let data = buf.get(..m.len).unwrap_or(buf);
                        let stride = if m.stride == 0 { m.len } else { m.stride }.max(1);
                        for chunk in data.chunks(stride) {
                            down.offer(
                                now,
                                Datagram {
                                    addr: m.addr,
                                    ecn: m.ecn,
                                    ip: m.dst_ip,
                                    bytes: chunk.to_vec(),
                                },
                            );
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    drained = true;
                    break;
                }
            }
        }
        if !drained {
            // The inner socket registered no wake-up: come back for the rest.
            cx.waker().wake_by_ref();
        }
        // Hand over what is due; otherwise wake at the next delivery.
        for _ in 0..2 {
            down.release(self.now());
            let n = Self::hand_over(&mut down, bufs, meta);
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            let Some(at) = down.sim.next_delivery() else {
                return Poll::Pending;
            };
            let deadline = self.epoch + at;
            let mut timer = lock(&self.timer);
            let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            timer.as_mut().reset(deadline);
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The up-link sender task: sends each datagram when due, waits for writability when the inner
/// socket is full, ends when the socket is dropped or a newer socket took over the link
/// ([`ConditionedSocket::rewrap`]).
async fn send_delayed(
    inner: Arc<dyn AsyncUdpSocket>,
    up: Arc<Mutex<Link>>,
    wake: Arc<Notify>,
    epoch: Instant,
    generation: u64,
    mut closed: watch::Receiver<()>,
) {
    let mut poller = inner.clone().create_io_poller();
    loop {
        loop {
            let next = {
                let mut link = lock(&up);
                if link.owner != generation {
                    drop(link);
                    // Pass on a wake-up this task may have taken from the new owner.
                    wake.notify_one();
                    return;
                }
                link.release(epoch.elapsed());
                link.ready.pop_front()
            };
            let Some(d) = next else { break };
            match inner.try_send(&d.transmit()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    lock(&up).ready.push_front(d);
                    let writable = std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx));
                    tokio::select! {
                        r = writable => if let Err(e) = r {
                            let mut link = lock(&up);
                            link.ready.pop_front();
                            link.counters.send_errors += 1;
                            tracing::trace!("conditioned socket not writable: {e}");
                        },
                        _ = closed.changed() => return,
                    }
                }
                Err(e) => {
                    lock(&up).counters.send_errors += 1;
                    tracing::trace!("conditioned send failed: {e}");
                }
            }
        }
        let next = lock(&up).sim.next_delivery();
        let due = async move {
            match next {
                Some(at) => tokio::time::sleep_until(epoch + at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = closed.changed() => return,
            () = wake.notified() => {}
            () = due => {}
        }
    }
}

/// A client endpoint like [`crate::endpoint::client_endpoint`] (same client config, same socket
/// options) whose socket is conditioned by `imp`. Must be called inside a tokio runtime.
pub fn conditioned_endpoint(
    bind: SocketAddr,
    trust: &[CertificateDer<'static>],
    imp: Impairment,
) -> anyhow::Result<quinn::Endpoint> {
    conditioned_endpoint_with_handle(bind, trust, imp).map(|(endpoint, _)| endpoint)
}

/// [`conditioned_endpoint`], plus the handle on its links (counters, impairment changes).
pub fn conditioned_endpoint_with_handle(
    bind: SocketAddr,
    trust: &[CertificateDer<'static>],
    imp: Impairment,
) -> anyhow::Result<(quinn::Endpoint, Conditioner)> {
    imp.validate()?;
    let mut handle = None;
    let endpoint = client_endpoint_with(bind, trust, |inner| {
        let (socket, h) = ConditionedSocket::wrap(inner, imp)?;
        handle = Some(h);
        Ok(socket)
    })?;
    let handle = handle.ok_or_else(|| anyhow!("the socket was not conditioned"))?;
    Ok((endpoint, handle))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;
    use std::collections::BTreeSet;

    fn link(loss: f32, duplicate: f32, latency_ms: u64, jitter_ms: u64) -> LinkConfig {
        LinkConfig {
            loss,
            duplicate,
            latency: Duration::from_millis(latency_ms),
            jitter: Duration::from_millis(jitter_ms),
        }
    }

    /// A conditioned socket on 127.0.0.1 and a plain tokio socket as its peer.
    async fn pair(imp: Impairment) -> (Arc<ConditionedSocket>, Conditioner, tokio::net::UdpSocket) {
        // Large receive buffers: the bursts below must not be lost in the kernel.
        let bind = || {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let state = quinn::udp::UdpSocketState::new((&s).into()).unwrap();
            let _ = state.set_recv_buffer_size((&s).into(), 4 << 20);
            s
        };
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, bind()).unwrap();
        let (socket, handle) = ConditionedSocket::wrap(inner, imp).unwrap();
        let peer = bind();
        peer.set_nonblocking(true).unwrap();
        let peer = tokio::net::UdpSocket::from_std(peer).unwrap();
        (socket, handle, peer)
    }

    /// Sends like quinn does: on `WouldBlock`, waits for writability and retries.
    async fn send(socket: &Arc<ConditionedSocket>, to: SocketAddr, bytes: &[u8]) {
        send_transmit(socket, to, bytes, None).await;
    }

    async fn send_transmit(
        socket: &Arc<ConditionedSocket>,
        to: SocketAddr,
        bytes: &[u8],
        segment_size: Option<usize>,
    ) {
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: bytes,
            segment_size,
            src_ip: None,
        };
        let mut poller = socket.clone().create_io_poller();
        loop {
            match socket.try_send(&transmit) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx))
                        .await
                        .unwrap();
                }
                Err(e) => panic!("send failed: {e}"),
            }
        }
    }

    /// Receives datagrams from the conditioned socket's `poll_recv` until `quiet` passes without one.
    async fn recv_all(socket: &ConditionedSocket, quiet: Duration) -> Vec<(Instant, Vec<u8>)> {
        let mut got = Vec::new();
        let mut storage = vec![vec![0u8; 2048]; 4];
        loop {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = [RecvMeta::default(); 4];
            let r = tokio::time::timeout(
                quiet,
                std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await;
            let Ok(r) = r else { return got };
            let n = r.unwrap();
            let at = Instant::now();
            for (m, b) in meta.iter().zip(bufs.iter()).take(n) {
                got.push((at, b[..m.len].to_vec()));
            }
        }
    }

    fn ids(got: &[Vec<u8>]) -> Vec<u32> {
        got.iter()
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn invalid_impairments_are_refused() {
        let bad = [
            link(1.5, 0.0, 0, 0),
            link(f32::NAN, 0.0, 0, 0),
            link(0.0, -0.1, 0, 0),
            link(0.0, 0.0, 50_000, 20_000),
        ];
        for b in bad {
            assert!(Impairment::symmetric(b, 1).validate().is_err(), "{b:?}");
            assert!(Impairment {
                down: b,
                ..Impairment::default()
            }
            .validate()
            .is_err());
        }
        assert!(Impairment::symmetric(link(1.0, 1.0, 30_000, 30_000), 1)
            .validate()
            .is_ok());
        assert!(Impairment::default().is_none());
        assert!(!Impairment::symmetric(link(0.0, 0.0, 1, 0), 1).is_none());
    }

    #[test]
    fn endpoint_seeds_differ_and_are_reproducible() {
        let imp = Impairment::symmetric(link(0.1, 0.0, 0, 0), 7);
        let seeds: BTreeSet<u64> = (0..100).map(|i| imp.for_endpoint(i).seed).collect();
        assert_eq!(seeds.len(), 100);
        assert_eq!(imp.for_endpoint(3), imp.for_endpoint(3));
        let (up, down) = imp.link_seeds();
        assert_ne!(up, down);
    }

    #[test]
    fn needs_a_runtime() {
        let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let inner = {
            let _guard = rt.enter();
            quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, std).unwrap()
        };
        assert!(ConditionedSocket::wrap(inner, Impairment::default()).is_err());
    }

    #[tokio::test]
    async fn up_link_loses_duplicates_delays_and_reorders_like_the_link_sim() {
        let cfg = link(0.2, 0.1, 20, 10);
        let imp = Impairment {
            up: cfg,
            down: LinkConfig::default(),
            seed: 42,
        };
        let (socket, handle, peer) = pair(imp).await;
        let to = peer.local_addr().unwrap();
        let receiver = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(300), peer.recv(&mut buf)).await
            {
                got.push((Instant::now(), buf[..n].to_vec()));
            }
            got
        });
        let start = Instant::now();
        for i in 0..500u32 {
            send(&socket, to, &i.to_le_bytes()).await;
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let got = receiver.await.unwrap();
        assert!(
            got[0].0.duration_since(start) >= Duration::from_millis(20),
            "nothing arrives before the latency"
        );
        let payloads: Vec<Vec<u8>> = got.into_iter().map(|g| g.1).collect();
        let ids = ids(&payloads);
        let distinct: BTreeSet<u32> = ids.iter().copied().collect();
        let st = handle.stats().up;
        // The decisions are the LinkSim's with the derived seed.
        let mut reference = LinkSim::new(cfg, imp.link_seeds().0);
        for i in 0..500u32 {
            reference.send(Duration::ZERO, i.to_le_bytes().to_vec());
        }
        assert_eq!(st.dropped, reference.dropped);
        assert_eq!(st.offered, 500);
        assert_eq!(st.released, 500 - st.dropped + st.duplicated);
        assert_eq!(st.delayed, st.released);
        assert_eq!((st.overflow, st.send_errors, st.queued), (0, 0, 0));
        assert_eq!(distinct.len() as u64, 500 - st.dropped);
        assert_eq!(ids.len() as u64, st.released, "every copy arrived");
        assert!((60..=140).contains(&st.dropped), "{st:?}");
        assert!(st.duplicated > 10, "{st:?}");
        assert!(ids.windows(2).any(|w| w[1] < w[0]), "jitter reorders");
        assert_eq!(handle.stats().down, DirectionStats::default());
    }

    #[tokio::test]
    async fn down_link_delays_and_loses_before_quinn_sees_it() {
        let imp = Impairment {
            up: LinkConfig::default(),
            down: link(0.3, 0.0, 30, 0),
            seed: 5,
        };
        let (socket, handle, peer) = pair(imp).await;
        let addr = socket.local_addr().unwrap();
        let start = Instant::now();
        for i in 0..100u32 {
            peer.send_to(&i.to_le_bytes(), addr).await.unwrap();
        }
        let got = recv_all(&socket, Duration::from_millis(200)).await;
        assert!(got[0].0.duration_since(start) >= Duration::from_millis(30));
        let payloads: Vec<Vec<u8>> = got.into_iter().map(|g| g.1).collect();
        let ids = ids(&payloads);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "no jitter: in order");
        let st = handle.stats().down;
        assert_eq!(st.offered, 100);
        assert_eq!(ids.len() as u64, 100 - st.dropped);
        assert!((12..=50).contains(&st.dropped), "{st:?}");
        assert_eq!(st.delayed, st.released);
    }

    #[tokio::test]
    async fn no_impairment_is_a_pass_through_and_impairment_can_change() {
        let (socket, handle, peer) = pair(Impairment::default()).await;
        let to = peer.local_addr().unwrap();
        send(&socket, to, b"hello").await;
        let mut buf = [0u8; 16];
        let (n, from) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"hello"[..], socket.local_addr().unwrap())
        );
        peer.send_to(b"back", socket.local_addr().unwrap())
            .await
            .unwrap();
        let got = recv_all(&socket, Duration::from_millis(100)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(
            handle.stats(),
            ConditionerStats::default(),
            "nothing counted"
        );

        // Turn on up-link latency: the next datagram is held.
        handle.set_up(link(0.0, 0.0, 40, 0)).unwrap();
        assert!(handle.set_up(link(2.0, 0.0, 0, 0)).is_err());
        let sent = Instant::now();
        send(&socket, to, b"later").await;
        let (n, _) = peer.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"later");
        assert!(sent.elapsed() >= Duration::from_millis(40));
        assert_eq!(handle.stats().up.delayed, 1);
        assert_eq!(handle.impairment().up.latency, Duration::from_millis(40));
    }

    /// Every copy is accounted for: `offered + duplicated = dropped + overflow + blackout + queued + released`.
    fn balanced(st: &DirectionStats) -> bool {
        st.offered + st.duplicated
            == st.dropped + st.overflow + st.blackout + st.queued + st.released
    }

    #[tokio::test]
    async fn blackout_drops_both_ways_and_restores_the_link() {
        let (socket, handle, peer) = pair(Impairment::default()).await;
        let to = peer.local_addr().unwrap();
        let addr = socket.local_addr().unwrap();
        assert!(!handle.in_blackout());
        handle.blackout(true);
        handle.blackout(true);
        assert!(handle.in_blackout());
        for i in 0..10u32 {
            send(&socket, to, &i.to_le_bytes()).await;
            peer.send_to(&i.to_le_bytes(), addr).await.unwrap();
        }
        assert!(
            recv_all(&socket, Duration::from_millis(100))
                .await
                .is_empty(),
            "nothing received during the blackout"
        );
        let mut buf = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), peer.recv(&mut buf))
                .await
                .is_err(),
            "nothing sent during the blackout"
        );
        let st = handle.stats();
        assert_eq!((st.up.offered, st.up.blackout), (10, 10), "{st:?}");
        assert_eq!((st.down.offered, st.down.blackout), (10, 10), "{st:?}");
        assert_eq!(
            st.up.dropped + st.down.dropped + st.up.released + st.down.released,
            0
        );
        assert_eq!(
            handle.impairment(),
            Impairment::default(),
            "configs untouched"
        );

        // Off again: a pass-through once more (nothing more counted as blackout).
        handle.blackout(false);
        assert!(!handle.in_blackout());
        send(&socket, to, b"after").await;
        let n = peer.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"after");
        peer.send_to(b"back", addr).await.unwrap();
        let got = recv_all(&socket, Duration::from_millis(100)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, b"back");
        let after = handle.stats();
        assert_eq!((after.up.blackout, after.down.blackout), (10, 10));
        assert!(balanced(&after.up) && balanced(&after.down), "{after:?}");
    }

    #[tokio::test]
    async fn blackout_drops_copies_in_flight_and_keeps_the_impairment() {
        let latency = link(0.0, 0.0, 60, 0);
        let imp = Impairment::symmetric(latency, 9);
        let (socket, handle, peer) = pair(imp).await;
        let to = peer.local_addr().unwrap();
        let addr = socket.local_addr().unwrap();
        // In flight behind the latency when the link is cut.
        for i in 0..5u32 {
            send(&socket, to, &i.to_le_bytes()).await;
            peer.send_to(&i.to_le_bytes(), addr).await.unwrap();
        }
        // Let the down-link take them in (they wait for their delivery time inside the link).
        let early = recv_all(&socket, Duration::from_millis(20)).await;
        assert!(early.is_empty());
        handle.blackout(true);
        // Changing an impairment during a blackout is kept for afterwards.
        let later = link(0.0, 0.0, 30, 0);
        handle.set_up(later).unwrap();
        let mut buf = [0u8; 16];
        assert!(
            tokio::time::timeout(Duration::from_millis(150), peer.recv(&mut buf))
                .await
                .is_err(),
            "copies in flight are lost in the blackout"
        );
        assert!(recv_all(&socket, Duration::from_millis(100))
            .await
            .is_empty());
        let st = handle.stats();
        assert_eq!((st.up.blackout, st.down.blackout), (5, 5), "{st:?}");
        assert_eq!((st.up.queued, st.down.queued), (0, 0), "{st:?}");
        assert!(balanced(&st.up) && balanced(&st.down), "{st:?}");

        handle.blackout(false);
        assert_eq!(
            handle.impairment(),
            Impairment {
                up: later,
                down: latency,
                seed: 9
            },
            "the impairments apply again"
        );
        let sent = Instant::now();
        send(&socket, to, b"again").await;
        let n = peer.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"again");
        assert!(sent.elapsed() >= Duration::from_millis(30));
        peer.send_to(b"down", addr).await.unwrap();
        let got = recv_all(&socket, Duration::from_millis(150)).await;
        assert_eq!(got.len(), 1);
        let st = handle.stats();
        assert_eq!((st.up.blackout, st.down.blackout), (5, 5), "{st:?}");
        assert_eq!((st.up.released, st.down.released), (1, 1), "{st:?}");
        assert!(balanced(&st.up) && balanced(&st.down), "{st:?}");
    }

    #[tokio::test]
    async fn rewrap_moves_the_up_link_to_the_new_socket_and_keeps_the_handle() {
        let imp = Impairment {
            up: link(0.0, 0.0, 40, 0),
            ..Impairment::default()
        };
        let (old, handle, peer) = pair(imp).await;
        let to = peer.local_addr().unwrap();
        let old_addr = old.local_addr().unwrap();
        for i in 0..3u32 {
            send(&old, to, &i.to_le_bytes()).await;
        }
        let fresh = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, fresh).unwrap();
        let new = ConditionedSocket::rewrap(inner, &handle).unwrap();
        let new_addr = new.local_addr().unwrap();
        assert_ne!(new_addr, old_addr);
        for i in 3..6u32 {
            send(&new, to, &i.to_le_bytes()).await;
        }
        // Everything still in the up-link leaves from the new address (as after a NAT rebinding).
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        for _ in 0..6 {
            let (n, from) = tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            got.push((u32::from_le_bytes(buf[..n].try_into().unwrap()), from));
        }
        assert_eq!(
            got,
            (0..6u32).map(|i| (i, new_addr)).collect::<Vec<_>>(),
            "in order, all from the new socket"
        );
        // The same handle controls and counts the new socket.
        handle.blackout(true);
        send(&new, to, b"cut!").await;
        handle.blackout(false);
        let st = handle.stats().up;
        assert_eq!((st.offered, st.released, st.blackout), (7, 6, 1), "{st:?}");
        // The old socket still delivers what reaches it, through the shared down-link.
        handle.set_down(link(0.0, 0.0, 10, 0)).unwrap();
        peer.send_to(b"late", old_addr).await.unwrap();
        let late = recv_all(&old, Duration::from_millis(100)).await;
        assert_eq!(late.len(), 1);
        assert_eq!(handle.stats().down.released, 1);
    }

    #[tokio::test]
    async fn queues_are_bounded() {
        let (socket, handle, peer) = pair(Impairment {
            up: link(0.0, 0.0, 10_000, 0),
            ..Impairment::default()
        })
        .await;
        let to = peer.local_addr().unwrap();
        for i in 0..(QUEUE_CAP as u32 + 10) {
            send(&socket, to, &i.to_le_bytes()).await;
        }
        let st = handle.stats().up;
        assert_eq!(st.overflow, 10);
        assert_eq!(st.queued, QUEUE_CAP as u64);
    }

    #[tokio::test]
    async fn gso_batches_are_split_into_datagrams() {
        let (socket, handle, peer) = pair(Impairment {
            up: link(0.0, 0.0, 5, 0),
            ..Impairment::default()
        })
        .await;
        let to = peer.local_addr().unwrap();
        send_transmit(&socket, to, b"aaaabbbbcc", Some(4)).await;
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        for _ in 0..3 {
            let n = peer.recv(&mut buf).await.unwrap();
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, [b"aaaa".to_vec(), b"bbbb".to_vec(), b"cc".to_vec()]);
        assert_eq!(handle.stats().up.offered, 3);
    }
}
