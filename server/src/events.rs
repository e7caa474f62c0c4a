//! The server's event log for observers: tick statistics once a second, presence and chat, each
//! with a monotonically increasing id, in a bounded ring so a reconnecting `/events` subscriber
//! (`Last-Event-ID`) receives what it missed. Writers (the tick thread) hold the lock only to push.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Events kept for replay.
pub const EVENT_RING: usize = 1024;

/// One event, serialized once when pushed.
#[derive(Debug)]
pub struct Event {
    /// Id, from 1, increasing by one per event.
    pub id: u64,
    /// The SSE event name: `tick`, `join`, `leave` or `chat`.
    pub kind: &'static str,
    /// JSON payload.
    pub data: String,
}

#[derive(Debug)]
struct Inner {
    next: u64,
    buf: VecDeque<Arc<Event>>,
}

/// A bounded ring of events plus a wake-up for subscribers.
#[derive(Debug)]
pub struct EventRing {
    inner: Mutex<Inner>,
    capacity: usize,
    /// The id of the newest event (subscribers wait on changes).
    newest: watch::Sender<u64>,
}

impl Default for EventRing {
    fn default() -> Self {
        Self::new(EVENT_RING)
    }
}

impl EventRing {
    /// An empty ring keeping the last `capacity` events.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                next: 1,
                buf: VecDeque::with_capacity(capacity.max(1)),
            }),
            capacity: capacity.max(1),
            newest: watch::Sender::new(0),
        }
    }

    /// Appends an event (its JSON is built before taking the lock) and wakes subscribers.
    /// Returns its id, or 0 if the payload could not be serialized.
    pub fn push(&self, kind: &'static str, data: &impl serde::Serialize) -> u64 {
        let Ok(data) = serde_json::to_string(data) else {
            return 0;
        };
        let id = {
            let Ok(mut g) = self.inner.lock() else {
                return 0;
            };
            let id = g.next;
            g.next += 1;
            if g.buf.len() >= self.capacity {
                g.buf.pop_front();
            }
            g.buf.push_back(Arc::new(Event { id, kind, data }));
            id
        };
        self.newest.send_replace(id);
        id
    }

    /// Appends to `out` the events with an id above `after` that are still kept, oldest first, at
    /// most `max`. Returns the id of the oldest event kept (0 when empty).
    pub fn since(&self, after: u64, max: usize, out: &mut Vec<Arc<Event>>) -> u64 {
        let Ok(g) = self.inner.lock() else {
            return 0;
        };
        let oldest = g.buf.front().map_or(0, |e| e.id);
        let skip = after.saturating_add(1).saturating_sub(oldest) as usize;
        out.extend(g.buf.iter().skip(skip).take(max).cloned());
        oldest
    }

    /// The id of the newest event (0: none yet).
    #[must_use]
    pub fn newest(&self) -> u64 {
        *self.newest.borrow()
    }

    /// A receiver that changes whenever an event is pushed.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.newest.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_the_ring_keeps_the_newest() {
        let r = EventRing::new(4);
        for i in 0..10u32 {
            assert_eq!(r.push("tick", &i), u64::from(i) + 1);
        }
        let mut out = Vec::new();
        let oldest = r.since(0, 100, &mut out);
        assert_eq!(oldest, 7);
        assert_eq!(
            out.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![7, 8, 9, 10]
        );
        out.clear();
        r.since(8, 100, &mut out);
        assert_eq!(out.iter().map(|e| e.id).collect::<Vec<_>>(), vec![9, 10]);
        assert_eq!(out[0].data, "8");
        out.clear();
        r.since(10, 100, &mut out);
        assert!(out.is_empty());
        assert_eq!(r.newest(), 10);
    }
}
