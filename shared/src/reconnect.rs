//! Client reconnection policy, sans-IO: exponential backoff with full jitter, the connection-state
//! events a client library reports, a silence detector for the link, and the outbox of chat lines
//! awaiting the server's echo.
//!
//! No clock and no RNG here: time is passed in as a [`Duration`] since an arbitrary origin (it only has
//! to be monotonic for one object), randomness as a `u64` drawn by the caller (e.g. from a seeded RNG).

use std::collections::VecDeque;
use std::time::Duration;

/// Reconnection policy: exponential backoff with full jitter (AWS architecture blog "Exponential
/// Backoff And Jitter"): the delay before attempt `n` (0-based) is uniform in
/// `[0, min(cap, base·2^n)]`, which spreads a crowd of clients that lost the same server over the whole
/// window instead of having them retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Upper bound of the first attempt's delay; doubles with each attempt. Must be > 0.
    pub base: Duration,
    /// Largest upper bound of any delay. Must be ≥ `base`.
    pub cap: Duration,
    /// Give up after this many attempts (`None`: no limit by count).
    pub max_attempts: Option<u32>,
    /// Give up once this long has passed since the first attempt (`None`: no limit by time).
    pub give_up_after: Option<Duration>,
    /// When the server announced it is going away (shutdown, restart), wait a delay uniform in
    /// `[0, restart_spread]` before the first attempt, so that the whole population of clients does
    /// not come back in the same instant.
    pub restart_spread: Duration,
}

impl Default for BackoffPolicy {
    /// Base 250 ms, cap 8 s, no attempt limit, give up after 60 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(8),
            max_attempts: None,
            give_up_after: Some(Duration::from_secs(60)),
            restart_spread: Duration::from_secs(5),
        }
    }
}

impl BackoffPolicy {
    /// Checks the policy: `base` > 0 and `cap` ≥ `base`.
    ///
    /// # Errors
    /// A short description of the first violated rule.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.base.is_zero() {
            return Err("backoff base must be greater than zero");
        }
        if self.cap < self.base {
            return Err("backoff cap must be at least the base");
        }
        Ok(())
    }

    /// The wait before the first attempt after the server announced it is going away: uniform in
    /// `[0, restart_spread]` from `random`.
    #[must_use]
    pub fn restart_delay(&self, random: u64) -> Duration {
        let span = self.restart_spread.as_nanos();
        let r = u128::from(random) % (span + 1);
        duration_from_nanos_saturating(r)
    }

    /// Upper bound of the delay before attempt `attempt` (0-based): `min(cap, base·2^attempt)`,
    /// saturating (never overflows for any attempt count).
    #[must_use]
    pub fn bound(&self, attempt: u32) -> Duration {
        let cap = self.cap.as_nanos();
        let grown = 1u128
            .checked_shl(attempt)
            .and_then(|factor| self.base.as_nanos().checked_mul(factor))
            .unwrap_or(cap);
        duration_from_nanos_saturating(grown.min(cap))
    }
}

/// `nanos` as a [`Duration`], saturating at `u64::MAX` nanoseconds (≈584 years).
fn duration_from_nanos_saturating(nanos: u128) -> Duration {
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// The state of one reconnection sequence under a [`BackoffPolicy`].
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The policy.
    policy: BackoffPolicy,
    /// Attempts counted since the last reset.
    attempts: u32,
    /// `now` of the first attempt since the last reset.
    first_attempt: Option<Duration>,
}

impl Backoff {
    /// A fresh sequence (no attempt yet) under `policy`.
    #[must_use]
    pub fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            attempts: 0,
            first_attempt: None,
        }
    }

    /// The policy.
    #[must_use]
    pub fn policy(&self) -> &BackoffPolicy {
        &self.policy
    }

    /// Delay before the next attempt, drawn uniformly from `[0, min(cap, base·2^attempt)]` using
    /// `random` (any u64, e.g. from a seeded RNG); counts the attempt. `None` = give up:
    /// `max_attempts` attempts were already made, or `now` − the first attempt's `now` ≥
    /// `give_up_after` (the first call of a sequence is the first attempt, so `give_up_after = 0`
    /// gives up at once). Giving up counts nothing. No overflow for any attempt count.
    pub fn next_delay(&mut self, now: Duration, random: u64) -> Option<Duration> {
        if self
            .policy
            .max_attempts
            .is_some_and(|max| self.attempts >= max)
        {
            return None;
        }
        let first = self.first_attempt.unwrap_or(now);
        if self
            .policy
            .give_up_after
            .is_some_and(|limit| now.saturating_sub(first) >= limit)
        {
            return None;
        }
        self.first_attempt = Some(first);
        let bound = self.policy.bound(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        Some(scale(bound, random))
    }

    /// Attempts since the last reset.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over (after a successful (re)connect): no attempts, no give-up clock.
    pub fn reset(&mut self) {
        self.attempts = 0;
        self.first_attempt = None;
    }
}

/// `random` mapped uniformly onto `[0, bound]` (multiply-shift; `bound` saturates at `u64::MAX` ns).
fn scale(bound: Duration, random: u64) -> Duration {
    let span = u128::from(u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX)) + 1;
    // span ≤ 2^64, random < 2^64: the product fits in u128 and the result is ≤ span − 1.
    duration_from_nanos_saturating((u128::from(random) * span) >> 64)
}

/// What the client library reports about its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// The first connection is being established.
    Connecting,
    /// Joined: snapshots are flowing.
    Connected,
    /// Connected, but the server has been silent for a while (see [`LinkHealth`]).
    Degraded,
    /// The connection dropped; reconnection attempt `attempt` (1-based) is in progress or scheduled.
    Reconnecting {
        /// The attempt number, 1-based.
        attempt: u32,
    },
    /// A reconnection succeeded and the session was resumed.
    Resumed,
    /// Gave up (or the server refused us): the session is over.
    Lost {
        /// Why, for the player.
        reason: String,
    },
}

/// What [`LinkHealth`] concludes from the silence since the last packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkStatus {
    /// A packet arrived within `degraded_after`.
    Healthy,
    /// Silent for at least `degraded_after` (but less than `dead_after`).
    Degraded,
    /// Silent for at least `dead_after`.
    Dead,
}

/// Silence detector: fed with the time of every packet received from the server; says when the link
/// looks degraded or dead.
#[derive(Debug, Clone)]
pub struct LinkHealth {
    /// Silence after which the link is degraded.
    degraded_after: Duration,
    /// Silence after which the link is dead.
    dead_after: Duration,
    /// Newest receive time (or the creation time).
    last_receive: Duration,
}

impl LinkHealth {
    /// A detector that counts silence from `now`. If `dead_after` < `degraded_after`, the link goes
    /// from healthy straight to dead.
    #[must_use]
    pub fn new(degraded_after: Duration, dead_after: Duration, now: Duration) -> Self {
        Self {
            degraded_after,
            dead_after,
            last_receive: now,
        }
    }

    /// A packet arrived at `now` (an older `now` than the newest seen is ignored).
    pub fn on_receive(&mut self, now: Duration) {
        self.last_receive = self.last_receive.max(now);
    }

    /// Time since the newest packet (zero if `now` is before it).
    #[must_use]
    pub fn silence(&self, now: Duration) -> Duration {
        now.saturating_sub(self.last_receive)
    }

    /// Healthy / Degraded / Dead by the length of the silence at `now`.
    #[must_use]
    pub fn status(&self, now: Duration) -> LinkStatus {
        let silence = self.silence(now);
        if silence >= self.dead_after {
            LinkStatus::Dead
        } else if silence >= self.degraded_after {
            LinkStatus::Degraded
        } else {
            LinkStatus::Healthy
        }
    }
}

/// One chat line awaiting the server's echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingChat<C> {
    /// Its client message id (strictly increasing per outbox, from 1).
    pub id: u32,
    /// The channel it was written to.
    pub channel: C,
    /// The text.
    pub text: String,
}

/// Why [`ChatOutbox::push`] refused a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxError {
    /// `capacity` lines are already unconfirmed.
    #[error("chat outbox full")]
    Full,
    /// Every id up to `u32::MAX` has been used.
    #[error("chat message ids exhausted")]
    IdsExhausted,
}

/// Chat written by the player, kept until the server's echo confirms it, so it can be resent after a
/// resume (the server de-duplicates by id, so a resend of a line it already accepted is harmless).
#[derive(Debug, Clone)]
pub struct ChatOutbox<C> {
    /// Unconfirmed lines, in id order.
    pending: VecDeque<PendingChat<C>>,
    /// The id of the next line (`None` once `u32::MAX` has been used).
    next_id: Option<u32>,
    /// Most unconfirmed lines held.
    capacity: usize,
}

impl<C: Clone> ChatOutbox<C> {
    /// An empty outbox holding at most `capacity` unconfirmed lines; ids start at 1.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            pending: VecDeque::new(),
            next_id: Some(1),
            capacity,
        }
    }

    /// Queues a line; returns its client message id.
    ///
    /// # Errors
    /// [`OutboxError::Full`] when `capacity` lines are unconfirmed, [`OutboxError::IdsExhausted`] when
    /// every id has been used.
    pub fn push(&mut self, channel: C, text: String) -> Result<u32, OutboxError> {
        if self.pending.len() >= self.capacity {
            return Err(OutboxError::Full);
        }
        let id = self.next_id.ok_or(OutboxError::IdsExhausted)?;
        self.next_id = id.checked_add(1);
        self.pending.push_back(PendingChat { id, channel, text });
        Ok(id)
    }

    /// The server echoed line `id`: it and every older pending line are settled (the server processes a
    /// stream in order and ignores ids ≤ the newest it accepted, so older unconfirmed lines were dropped
    /// by it: rate limit or reject). Returns how many older lines were settled without an echo (lost by
    /// the server's decision). An echo of an id no longer pending settles only the older lines.
    pub fn confirm(&mut self, id: u32) -> usize {
        let mut lost = 0;
        while let Some(front) = self.pending.front() {
            if front.id > id {
                break;
            }
            if front.id < id {
                lost += 1;
            }
            self.pending.pop_front();
        }
        lost
    }

    /// The server rejected line `id` (error notice): drop it. Unknown ids are ignored.
    pub fn reject(&mut self, id: u32) {
        self.pending.retain(|p| p.id != id);
    }

    /// Unconfirmed lines in id order (to resend after a resume; the server de-duplicates by id).
    pub fn pending(&self) -> impl Iterator<Item = &PendingChat<C>> {
        self.pending.iter()
    }

    /// Number of unconfirmed lines.
    #[must_use]
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// No unconfirmed line.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Rng;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn unlimited() -> BackoffPolicy {
        BackoffPolicy {
            max_attempts: None,
            give_up_after: None,
            ..BackoffPolicy::default()
        }
    }

    #[test]
    fn default_policy_is_valid_and_validate_rejects_bad_ones() {
        let p = BackoffPolicy::default();
        assert_eq!(p.base, ms(250));
        assert_eq!(p.cap, ms(8000));
        assert_eq!(p.max_attempts, None);
        assert_eq!(p.give_up_after, Some(Duration::from_secs(60)));
        assert_eq!(p.validate(), Ok(()));
        let zero = BackoffPolicy {
            base: Duration::ZERO,
            ..p
        };
        assert!(zero.validate().is_err());
        let small_cap = BackoffPolicy { cap: ms(100), ..p };
        assert!(small_cap.validate().is_err());
        let equal = BackoffPolicy { cap: p.base, ..p };
        assert_eq!(equal.validate(), Ok(()));
    }

    #[test]
    fn delay_never_exceeds_the_bound_and_never_overflows() {
        let p = unlimited();
        let mut b = Backoff::new(p);
        let mut rng = Rng::new(7);
        for n in 0..=1000u32 {
            assert_eq!(b.attempts(), n);
            let expected_bound = if n < 10 { p.base * 2u32.pow(n) } else { p.cap }.min(p.cap);
            assert_eq!(p.bound(n), expected_bound, "attempt {n}");
            // Extremes of the random input and a random one.
            for r in [0, u64::MAX, rng.next_u64()] {
                let mut probe = b.clone();
                let d = probe.next_delay(ms(u64::from(n)), r).unwrap();
                assert!(
                    d <= expected_bound,
                    "attempt {n}: {d:?} > {expected_bound:?}"
                );
            }
            let d = b.next_delay(ms(u64::from(n)), u64::MAX).unwrap();
            assert_eq!(d, expected_bound, "u64::MAX maps onto the bound itself");
        }
        // Huge durations and attempt counts saturate instead of overflowing.
        let huge = BackoffPolicy {
            base: Duration::from_secs(u64::MAX / 4),
            cap: Duration::MAX,
            ..unlimited()
        };
        for n in [0, 1, 2, 3, 63, 64, 127, 128, 1000, u32::MAX] {
            let d = Backoff {
                policy: huge,
                attempts: n,
                first_attempt: None,
            }
            .next_delay(Duration::MAX, u64::MAX)
            .unwrap();
            assert!(d <= Duration::MAX);
        }
        let mut saturated = Backoff {
            policy: unlimited(),
            attempts: u32::MAX,
            first_attempt: None,
        };
        assert!(saturated.next_delay(ms(0), 1).unwrap() <= ms(8000));
        assert_eq!(saturated.attempts(), u32::MAX);
    }

    #[test]
    fn delays_cover_the_whole_window_uniformly() {
        // Attempt 3: bound = min(8 s, 250 ms · 8) = 2 s; 10 000 draws into 20 buckets of 100 ms.
        let p = unlimited();
        let mut rng = Rng::new(42);
        let mut buckets = [0u32; 21];
        let (mut lo, mut hi) = (Duration::MAX, Duration::ZERO);
        for _ in 0..10_000 {
            let mut b = Backoff {
                policy: p,
                attempts: 3,
                first_attempt: None,
            };
            let d = b.next_delay(ms(0), rng.next_u64()).unwrap();
            assert!(d <= ms(2000));
            lo = lo.min(d);
            hi = hi.max(d);
            buckets[(d.as_millis() / 100) as usize] += 1;
        }
        assert!(lo < ms(5), "low end reached: {lo:?}");
        assert!(hi > ms(1995), "high end reached: {hi:?}");
        for (i, &c) in buckets.iter().take(20).enumerate() {
            assert!((400..=600).contains(&c), "bucket {i}: {c} (expected ≈500)");
        }
        // Extremes of the random input map onto the ends of the window exactly.
        let mut b = Backoff::new(p);
        assert_eq!(b.next_delay(ms(0), 0), Some(Duration::ZERO));
        assert_eq!(b.next_delay(ms(0), u64::MAX), Some(ms(500)));
        assert_eq!(b.next_delay(ms(0), u64::MAX / 2), Some(ms(500)));
    }

    #[test]
    fn jitter_spreads_a_crowd_across_the_window() {
        // 100 clients dropped by the same server at the same instant, each with its own random stream.
        let p = BackoffPolicy::default();
        let clients = 100;
        for attempt in 3..8u32 {
            let mut buckets = std::collections::BTreeMap::<u128, u32>::new();
            for client in 0..clients {
                let mut rng = Rng::new(1000 + client);
                let mut b = Backoff::new(p);
                let mut at = Duration::ZERO;
                let mut d = Duration::ZERO;
                for _ in 0..=attempt {
                    d = b.next_delay(at, rng.next_u64()).unwrap();
                    at += d;
                }
                assert!(d <= p.bound(attempt));
                *buckets.entry(d.as_millis() / 100).or_default() += 1;
            }
            let worst = buckets.values().copied().max().unwrap();
            assert!(
                worst <= 25,
                "attempt {attempt}: {worst} of {clients} clients in one 100 ms bucket"
            );
            assert!(
                buckets.len() >= 10,
                "attempt {attempt}: only {} buckets used",
                buckets.len()
            );
        }
    }

    #[test]
    fn gives_up_by_count_and_by_time_and_reset_starts_over() {
        let mut by_count = Backoff::new(BackoffPolicy {
            max_attempts: Some(3),
            give_up_after: None,
            ..BackoffPolicy::default()
        });
        for _ in 0..3 {
            assert!(by_count.next_delay(ms(0), 5).is_some());
        }
        assert_eq!(by_count.next_delay(ms(0), 5), None);
        assert_eq!(by_count.attempts(), 3, "giving up counts nothing");
        by_count.reset();
        assert_eq!(by_count.attempts(), 0);
        assert!(by_count.next_delay(ms(0), 5).is_some());

        let mut by_time = Backoff::new(BackoffPolicy {
            give_up_after: Some(Duration::from_secs(60)),
            ..BackoffPolicy::default()
        });
        let origin = Duration::from_secs(1000);
        assert!(by_time.next_delay(origin, 1).is_some());
        assert!(by_time.next_delay(origin + ms(59_999), 1).is_some());
        assert_eq!(by_time.next_delay(origin + ms(60_000), 1), None);
        assert_eq!(by_time.next_delay(origin + ms(90_000), 1), None);
        assert_eq!(by_time.attempts(), 2);
        // A clock that goes backwards never gives up early.
        let mut back = by_time.clone();
        back.reset();
        assert!(back.next_delay(origin, 1).is_some());
        assert!(back.next_delay(Duration::ZERO, 1).is_some());
        // After a reset the time limit counts from the new first attempt.
        by_time.reset();
        assert_eq!(
            by_time.next_delay(origin + ms(90_000), 1),
            Some(Duration::ZERO)
        );
        assert!(by_time.next_delay(origin + ms(149_999), 1).is_some());
        assert_eq!(by_time.next_delay(origin + ms(150_000), 1), None);

        let mut never = Backoff::new(BackoffPolicy {
            max_attempts: Some(0),
            ..BackoffPolicy::default()
        });
        assert_eq!(never.next_delay(ms(0), 1), None);
        let mut instant = Backoff::new(BackoffPolicy {
            give_up_after: Some(Duration::ZERO),
            ..BackoffPolicy::default()
        });
        assert_eq!(instant.next_delay(ms(0), 1), None);

        // Reset also restarts the exponential growth.
        let mut grow = Backoff::new(unlimited());
        for _ in 0..6 {
            grow.next_delay(ms(0), 1);
        }
        grow.reset();
        assert_eq!(grow.next_delay(ms(0), u64::MAX), Some(ms(250)));
    }

    #[test]
    fn link_health_transitions() {
        let t0 = Duration::from_secs(5);
        let mut h = LinkHealth::new(ms(500), ms(3000), t0);
        assert_eq!(h.status(t0), LinkStatus::Healthy);
        assert_eq!(h.status(t0 + ms(499)), LinkStatus::Healthy);
        assert_eq!(h.status(t0 + ms(500)), LinkStatus::Degraded);
        assert_eq!(h.status(t0 + ms(2999)), LinkStatus::Degraded);
        assert_eq!(h.status(t0 + ms(3000)), LinkStatus::Dead);
        // A packet brings it back to healthy, from degraded or dead.
        h.on_receive(t0 + ms(3500));
        assert_eq!(h.status(t0 + ms(3500)), LinkStatus::Healthy);
        assert_eq!(h.silence(t0 + ms(3600)), ms(100));
        // Out-of-order receive times do not move the clock back.
        h.on_receive(t0);
        assert_eq!(h.status(t0 + ms(3900)), LinkStatus::Healthy);
        assert_eq!(h.status(t0 + ms(4000)), LinkStatus::Degraded);
        // A `now` before the last packet is zero silence.
        assert_eq!(h.status(t0), LinkStatus::Healthy);
        // Dead threshold below the degraded one: straight to dead.
        let odd = LinkHealth::new(ms(500), ms(200), t0);
        assert_eq!(odd.status(t0 + ms(300)), LinkStatus::Dead);
    }

    #[test]
    fn connection_state_values() {
        let lost = ConnectionState::Lost {
            reason: "gave up after 60 s".into(),
        };
        assert_ne!(lost, ConnectionState::Connected);
        assert_eq!(
            ConnectionState::Reconnecting { attempt: 2 },
            ConnectionState::Reconnecting { attempt: 2 }
        );
    }

    #[test]
    fn outbox_confirm_reject_pending() {
        let mut o = ChatOutbox::<&str>::new(8);
        assert!(o.is_empty());
        let ids: Vec<u32> = (0..5)
            .map(|i| o.push("global", format!("line {i}")).unwrap())
            .collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(o.len(), 5);
        // Echo of 1: nothing older was lost.
        assert_eq!(o.confirm(1), 0);
        // Echo of 4: 2 and 3 were dropped by the server (rate limit), settled without an echo.
        assert_eq!(o.confirm(4), 2);
        assert_eq!(o.pending().map(|p| p.id).collect::<Vec<_>>(), vec![5]);
        // A duplicate echo changes nothing.
        assert_eq!(o.confirm(4), 0);
        assert_eq!(o.len(), 1);
        let six = o.push("room", "six".into()).unwrap();
        let seven = o.push("global", "seven".into()).unwrap();
        o.reject(six);
        o.reject(999);
        let pending: Vec<_> = o.pending().cloned().collect();
        assert_eq!(
            pending,
            vec![
                PendingChat {
                    id: 5,
                    channel: "global",
                    text: "line 4".into()
                },
                PendingChat {
                    id: seven,
                    channel: "global",
                    text: "seven".into()
                },
            ]
        );
        // Confirming the newest settles everything; 5 was never echoed.
        assert_eq!(o.confirm(seven), 1);
        assert!(o.is_empty());
        // Ids keep increasing after the outbox drains (the server ignores ids ≤ the newest accepted).
        assert_eq!(o.push("global", "eight".into()), Ok(8));
        // An echo of an id not pending (rejected before) still settles older lines.
        let nine = o.push("global", "nine".into()).unwrap();
        o.reject(nine);
        assert_eq!(o.confirm(nine), 1);
        assert!(o.is_empty());
    }

    #[test]
    fn outbox_capacity_and_id_exhaustion() {
        let mut o = ChatOutbox::<u8>::new(2);
        assert_eq!(o.push(0, "a".into()), Ok(1));
        assert_eq!(o.push(0, "b".into()), Ok(2));
        assert_eq!(o.push(0, "c".into()), Err(OutboxError::Full));
        assert_eq!(o.len(), 2);
        assert_eq!(o.confirm(1), 0);
        assert_eq!(o.push(0, "c".into()), Ok(3), "room again after a confirm");
        assert_eq!(OutboxError::Full.to_string(), "chat outbox full");

        let mut zero = ChatOutbox::<u8>::new(0);
        assert_eq!(zero.push(0, "x".into()), Err(OutboxError::Full));

        let mut near_end = ChatOutbox::<u8>::new(4);
        near_end.next_id = Some(u32::MAX - 1);
        assert_eq!(near_end.push(1, "a".into()), Ok(u32::MAX - 1));
        assert_eq!(near_end.push(1, "b".into()), Ok(u32::MAX));
        assert_eq!(near_end.push(1, "c".into()), Err(OutboxError::IdsExhausted));
        assert_eq!(
            OutboxError::IdsExhausted.to_string(),
            "chat message ids exhausted"
        );
        assert_eq!(near_end.confirm(u32::MAX), 1);
        assert!(near_end.is_empty());
        assert_eq!(
            near_end.push(1, "d".into()),
            Err(OutboxError::IdsExhausted),
            "ids never wrap back to used values"
        );
    }
}
