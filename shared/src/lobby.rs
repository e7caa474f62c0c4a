//! The lobby: who is connected, the chat order and presence. Pure state; the server routes its output.
//!
//! Chat lines get one global sequence number each, in the order the server accepts them, so every
//! client sees the same order. A client's message ids must increase; a repeat is a duplicate and is
//! dropped, which makes resends idempotent.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::entity::EntityId;
use crate::wire::{clean_chat, valid_name, ChatLine, PlayerInfo, RefuseReason, PROTOCOL_VERSION};

#[derive(Debug, Clone)]
struct Member {
    /// Public info.
    info: PlayerInfo,
    /// Highest client message id accepted from this player.
    last_msg_id: Option<u32>,
    /// Chat rate-limit tokens (lines) and when they were last refilled.
    tokens: f64,
    refilled: Option<Duration>,
}

/// Chat lines a player may send per second, sustained.
pub const CHAT_RATE_PER_S: f64 = 2.0;
/// Chat lines a player may send in a burst.
pub const CHAT_BURST: f64 = 8.0;

/// Result of a chat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatOutcome {
    /// Accepted and sequenced: deliver to everyone.
    Accepted(ChatLine),
    /// A resend of an id already accepted: drop silently.
    Duplicate,
    /// Empty or too long after stripping control characters.
    Rejected,
    /// The sender is not in the lobby.
    UnknownPlayer,
    /// The sender exceeded [`CHAT_RATE_PER_S`] (burst [`CHAT_BURST`]): dropped.
    RateLimited,
}

/// Lobby state.
#[derive(Debug, Clone)]
pub struct Lobby {
    /// Members by player id.
    members: BTreeMap<u32, Member>,
    /// Next player id to hand out (ids are never reused while the server runs).
    next_id: u32,
    /// Sequence number of the last accepted chat line (0 = none yet).
    chat_seq: u64,
    /// Most members at once.
    max_players: usize,
}

impl Lobby {
    /// An empty lobby for at most `max_players`.
    #[must_use]
    pub fn new(max_players: usize) -> Self {
        Self {
            members: BTreeMap::new(),
            next_id: 1,
            chat_seq: 0,
            max_players,
        }
    }

    /// Checks a join request without changing anything.
    pub fn check_join(&self, version: u16, name: &str) -> Result<(), RefuseReason> {
        if version != PROTOCOL_VERSION {
            return Err(RefuseReason::VersionMismatch);
        }
        if !valid_name(name) {
            return Err(RefuseReason::BadName);
        }
        if self.members.len() >= self.max_players {
            return Err(RefuseReason::ServerFull);
        }
        Ok(())
    }

    /// Adds a member (after [`Lobby::check_join`]); returns their info.
    pub fn join(&mut self, name: &str, avatar: EntityId) -> PlayerInfo {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let info = PlayerInfo {
            id,
            name: name.to_owned(),
            avatar,
        };
        self.members.insert(
            id,
            Member {
                info: info.clone(),
                last_msg_id: None,
                tokens: CHAT_BURST,
                refilled: None,
            },
        );
        info
    }

    /// Removes a member; `None` if they were not in.
    pub fn leave(&mut self, id: u32) -> Option<PlayerInfo> {
        self.members.remove(&id).map(|m| m.info)
    }

    /// Sequences a chat line.
    pub fn chat(
        &mut self,
        from: u32,
        client_msg_id: u32,
        text: &str,
        now: Duration,
    ) -> ChatOutcome {
        let Some(m) = self.members.get_mut(&from) else {
            return ChatOutcome::UnknownPlayer;
        };
        if m.last_msg_id.is_some_and(|last| client_msg_id <= last) {
            return ChatOutcome::Duplicate;
        }
        let since = m.refilled.map_or(Duration::ZERO, |t| now.saturating_sub(t));
        m.tokens = (m.tokens + since.as_secs_f64() * CHAT_RATE_PER_S).min(CHAT_BURST);
        m.refilled = Some(now);
        if m.tokens < 1.0 {
            return ChatOutcome::RateLimited;
        }
        let Some(text) = clean_chat(text) else {
            return ChatOutcome::Rejected;
        };
        m.tokens -= 1.0;
        m.last_msg_id = Some(client_msg_id);
        self.chat_seq += 1;
        ChatOutcome::Accepted(ChatLine {
            seq: self.chat_seq,
            from,
            client_msg_id,
            text,
        })
    }

    /// Everyone present, by id.
    #[must_use]
    pub fn roster(&self) -> Vec<PlayerInfo> {
        self.members.values().map(|m| m.info.clone()).collect()
    }

    /// Number of members.
    #[must_use]
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when nobody is in.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Sequence number of the newest chat line.
    #[must_use]
    pub fn chat_seq(&self) -> u64 {
        self.chat_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AV: EntityId = EntityId {
        index: 0,
        generation: 1,
    };

    #[test]
    fn chat_rate_is_limited_per_player() {
        let mut l = Lobby::new(4);
        let a = l.join("a", AV).id;
        let b = l.join("b", AV).id;
        let mut ok = 0;
        for id in 1..=100u32 {
            if matches!(
                l.chat(a, id, "spam", Duration::ZERO),
                ChatOutcome::Accepted(_)
            ) {
                ok += 1;
            }
        }
        assert_eq!(ok, CHAT_BURST as usize, "a burst, then nothing");
        assert!(
            matches!(l.chat(b, 1, "hi", Duration::ZERO), ChatOutcome::Accepted(_)),
            "others unaffected"
        );
        assert!(
            matches!(
                l.chat(a, 101, "later", Duration::from_secs(1)),
                ChatOutcome::Accepted(_)
            ),
            "refilled"
        );
    }

    #[test]
    fn join_checks() {
        let mut l = Lobby::new(1);
        assert_eq!(
            l.check_join(PROTOCOL_VERSION + 1, "a"),
            Err(RefuseReason::VersionMismatch)
        );
        assert_eq!(
            l.check_join(PROTOCOL_VERSION, "a\u{0}"),
            Err(RefuseReason::BadName)
        );
        assert_eq!(l.check_join(PROTOCOL_VERSION, "a"), Ok(()));
        l.join("a", AV);
        assert_eq!(
            l.check_join(PROTOCOL_VERSION, "b"),
            Err(RefuseReason::ServerFull)
        );
    }

    #[test]
    fn chat_is_sequenced_deduplicated_and_cleaned() {
        let mut l = Lobby::new(4);
        let a = l.join("a", AV).id;
        let b = l.join("b", AV).id;
        assert!(matches!(
            l.chat(a, 1, "hi", Duration::ZERO),
            ChatOutcome::Accepted(ChatLine { seq: 1, .. })
        ));
        assert!(matches!(
            l.chat(b, 1, "yo", Duration::ZERO),
            ChatOutcome::Accepted(ChatLine { seq: 2, .. })
        ));
        assert_eq!(l.chat(a, 1, "hi", Duration::ZERO), ChatOutcome::Duplicate);
        assert_eq!(l.chat(a, 2, "\u{7}", Duration::ZERO), ChatOutcome::Rejected);
        match l.chat(a, 3, "x\ty", Duration::ZERO) {
            ChatOutcome::Accepted(c) => assert_eq!((c.seq, c.text.as_str()), (3, "xy")),
            other => panic!("{other:?}"),
        }
        l.leave(a);
        assert_eq!(
            l.chat(a, 9, "gone", Duration::ZERO),
            ChatOutcome::UnknownPlayer
        );
        assert_eq!(l.roster().len(), 1);
    }
}
