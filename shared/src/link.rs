//! A seeded, sans-IO link conditioner: loss, latency, jitter (which reorders), and duplication.
//! Time is passed in. Used by the in-memory test harnesses, and by I/O shells that wrap a socket.

use std::time::Duration;

use crate::sim::Rng;

/// Impairments of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinkConfig {
    /// Probability that a datagram is dropped, 0..=1.
    pub loss: f32,
    /// Probability that a datagram is delivered twice, 0..=1.
    pub duplicate: f32,
    /// Fixed one-way delay.
    pub latency: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per datagram (reorders datagrams).
    pub jitter: Duration,
}

/// One direction of an impaired link.
#[derive(Debug, Clone)]
pub struct LinkSim {
    /// Impairments (may be changed at any time).
    pub config: LinkConfig,
    /// Random stream.
    rng: Rng,
    /// In flight: (deliver at, sequence, bytes).
    queue: Vec<(Duration, u64, Vec<u8>)>,
    /// Sequence counter (stable order among equal delivery times).
    seq: u64,
    /// Datagrams dropped so far.
    pub dropped: u64,
}

impl LinkSim {
    /// A link with `config` and a seed.
    #[must_use]
    pub fn new(config: LinkConfig, seed: u64) -> Self {
        Self {
            config,
            rng: Rng::new(seed),
            queue: Vec::new(),
            seq: 0,
            dropped: 0,
        }
    }

    /// Sends a datagram at `now`.
    pub fn send(&mut self, now: Duration, bytes: Vec<u8>) {
        if self.rng.unit() < self.config.loss {
            self.dropped += 1;
            return;
        }
        let copies = if self.rng.unit() < self.config.duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = self.config.jitter.mul_f32(self.rng.unit());
            self.seq += 1;
            self.queue
                .push((now + self.config.latency + jitter, self.seq, bytes.clone()));
        }
    }

    /// Everything due by `now`, in delivery order.
    pub fn poll(&mut self, now: Duration) -> Vec<Vec<u8>> {
        let mut due: Vec<(Duration, u64, Vec<u8>)> = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue.get(i).is_some_and(|q| q.0 <= now) {
                due.push(self.queue.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|d| (d.0, d.1));
        due.into_iter().map(|d| d.2).collect()
    }

    /// The earliest pending delivery time.
    #[must_use]
    pub fn next_delivery(&self) -> Option<Duration> {
        self.queue.iter().map(|q| q.0).min()
    }

    /// Datagrams in flight.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_latency_jitter_and_duplication() {
        let cfg = LinkConfig {
            loss: 0.1,
            duplicate: 0.1,
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
        };
        let mut l = LinkSim::new(cfg, 3);
        for i in 0..1000u32 {
            l.send(
                Duration::from_millis(u64::from(i)),
                i.to_le_bytes().to_vec(),
            );
        }
        assert!(
            l.poll(Duration::from_millis(19)).is_empty(),
            "nothing arrives before the latency"
        );
        let got = l.poll(Duration::from_secs(10));
        let ids: Vec<u32> = got
            .iter()
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert!((850..=1000).contains(&ids.iter().collect::<std::collections::BTreeSet<_>>().len()));
        assert!(
            ids.len() > ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
            "duplicates"
        );
        assert!(ids.windows(2).any(|w| w[1] < w[0]), "reordered");
        assert_eq!(l.in_flight(), 0);
    }
}
