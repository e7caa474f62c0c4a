//! The lobby: who is in the game, the chat order, channels, history and presence. Pure state; the
//! server routes its output.
//!
//! Chat lines get one global sequence number each, in the order the server accepts them, whatever
//! their channel, so every client sees the lines it may see in the same order, and "the newest
//! sequence number I received" is a complete replay cursor. A player's message ids must increase; a
//! repeat (or an older id) is a duplicate and is dropped, which makes resends idempotent — also across
//! a resume, because the id state belongs to the player, not the connection.
//!
//! Members are *online* or *offline*: an offline member is a dropped player whose session the server
//! keeps for the grace window. Offline members are not in the roster (others saw them leave), keep
//! their place (they count against `max_players`) and still receive whispers into their history.
//!
//! Histories are bounded per channel: the global channel, each room, and each player's whispers (a
//! whisper is kept in the sender's and the recipient's). A replay past an evicted line says so.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::entity::EntityId;
use crate::wire::{
    clean_chat, valid_name, valid_room, Channel, ChatLine, ChatScope, PlayerInfo, PresenceState,
    RefuseReason, LOBBY_ROOM, PROTOCOL_VERSION,
};

/// Chat lines a player may send per second, sustained.
pub const CHAT_RATE_PER_S: f64 = 2.0;
/// Chat lines a player may send in a burst.
pub const CHAT_BURST: f64 = 8.0;
/// Shortest interval between two typing indicators of one player (more are dropped).
pub const TYPING_INTERVAL: Duration = Duration::from_millis(1000);
/// Shortest interval between two presence changes (state or room) of one player (more are refused).
pub const PRESENCE_INTERVAL: Duration = Duration::from_millis(250);
/// Rooms always allowed, whatever `max_players` (a room exists while a member, online or offline,
/// is in it, so there are at most `max(max_players, MAX_ROOMS) + 1`).
pub const MAX_ROOMS: usize = 64;
/// Default lines kept per channel history.
pub const DEFAULT_HISTORY: usize = 256;

#[derive(Debug, Clone)]
struct Member {
    /// Public info (state and room included).
    info: PlayerInfo,
    /// Connected now (offline: dropped, session kept for a resume).
    online: bool,
    /// Highest client message id accepted from this player.
    last_msg_id: Option<u32>,
    /// Chat rate-limit tokens (lines) and when they were last refilled.
    tokens: f64,
    refilled: Option<Duration>,
    /// Last typing indicator forwarded.
    typed: Option<Duration>,
    /// Last presence change accepted.
    presence_changed: Option<Duration>,
}

/// One channel's recent lines.
#[derive(Debug, Clone, Default)]
struct History {
    lines: VecDeque<ChatLine>,
    /// Highest sequence number evicted (0: none).
    evicted: u64,
}

impl History {
    fn push(&mut self, line: ChatLine, limit: usize) {
        if self.lines.len() >= limit.max(1) {
            if let Some(old) = self.lines.pop_front() {
                self.evicted = self.evicted.max(old.seq);
            }
        }
        self.lines.push_back(line);
    }

    /// Lines after `cursor`, and whether some after it were evicted.
    fn since(&self, cursor: u64) -> (impl Iterator<Item = &ChatLine>, bool) {
        (
            self.lines.iter().filter(move |l| l.seq > cursor),
            self.evicted > cursor,
        )
    }
}

/// Result of a chat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatOutcome {
    /// Accepted and sequenced: deliver to these online players (sender included).
    Accepted(ChatLine, Vec<u32>),
    /// A resend of an id already accepted (or older): drop silently.
    Duplicate,
    /// Empty or too long after stripping control characters.
    Rejected,
    /// The sender is not in the lobby.
    UnknownPlayer,
    /// A whisper to someone who is not in the lobby.
    UnknownRecipient,
    /// The sender exceeded [`CHAT_RATE_PER_S`] (burst [`CHAT_BURST`]): dropped.
    RateLimited,
}

/// Result of a presence or room change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceOutcome {
    /// Changed: tell these online players (the player included) the new info.
    Changed(PlayerInfo, Vec<u32>),
    /// Nothing changed.
    Unchanged,
    /// Invalid room name, or a new room beyond [`MAX_ROOMS`].
    BadRoom,
    /// Faster than [`PRESENCE_INTERVAL`]: refused.
    TooFast,
    /// Not a member.
    UnknownPlayer,
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
    /// Most members at once (online and offline).
    max_players: usize,
    /// Lines kept per channel.
    history_limit: usize,
    /// Global channel history.
    global: History,
    /// Room histories, by room name (dropped with the room's last member).
    rooms: BTreeMap<String, History>,
    /// Whisper histories, by player id.
    whispers: BTreeMap<u32, History>,
}

impl Lobby {
    /// An empty lobby for at most `max_players`, keeping [`DEFAULT_HISTORY`] lines per channel.
    #[must_use]
    pub fn new(max_players: usize) -> Self {
        Self::with_history(max_players, DEFAULT_HISTORY)
    }

    /// An empty lobby keeping `history_limit` lines per channel.
    #[must_use]
    pub fn with_history(max_players: usize, history_limit: usize) -> Self {
        Self {
            members: BTreeMap::new(),
            next_id: 1,
            chat_seq: 0,
            max_players,
            history_limit: history_limit.max(1),
            global: History::default(),
            rooms: BTreeMap::new(),
            whispers: BTreeMap::new(),
        }
    }

    /// Checks a join request without changing anything. A name equal (ignoring case) to a
    /// member's, online or within its grace window, is taken.
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
        if self.name_taken(name) {
            return Err(RefuseReason::NameTaken);
        }
        Ok(())
    }

    /// Whether a member (online or offline) has this name, ignoring case.
    #[must_use]
    pub fn name_taken(&self, name: &str) -> bool {
        let lower = name.to_lowercase();
        self.members
            .values()
            .any(|m| m.info.name.to_lowercase() == lower)
    }

    /// Adds an online member (after [`Lobby::check_join`]) in [`LOBBY_ROOM`]; returns their info.
    pub fn join(&mut self, name: &str, avatar: EntityId) -> PlayerInfo {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        let info = PlayerInfo {
            id,
            name: name.to_owned(),
            avatar,
            state: PresenceState::Lobby,
            room: LOBBY_ROOM.to_owned(),
        };
        self.rooms.entry(info.room.clone()).or_default();
        self.members.insert(
            id,
            Member {
                info: info.clone(),
                online: true,
                last_msg_id: None,
                tokens: CHAT_BURST,
                refilled: None,
                typed: None,
                presence_changed: None,
            },
        );
        info
    }

    /// Removes a member for good (their whisper history goes, and their room's when they were its
    /// last member); `None` if they were not in.
    pub fn leave(&mut self, id: u32) -> Option<PlayerInfo> {
        let m = self.members.remove(&id)?;
        self.whispers.remove(&id);
        self.drop_room_if_empty(&m.info.room);
        Some(m.info)
    }

    /// Marks a member online or offline; returns their info when it changed.
    pub fn set_online(&mut self, id: u32, online: bool) -> Option<PlayerInfo> {
        let m = self.members.get_mut(&id)?;
        if m.online == online {
            return None;
        }
        m.online = online;
        Some(m.info.clone())
    }

    /// Whether `id` is a member that is online.
    #[must_use]
    pub fn is_online(&self, id: u32) -> bool {
        self.members.get(&id).is_some_and(|m| m.online)
    }

    /// A member's info (online or offline).
    #[must_use]
    pub fn member(&self, id: u32) -> Option<&PlayerInfo> {
        self.members.get(&id).map(|m| &m.info)
    }

    fn drop_room_if_empty(&mut self, room: &str) {
        if room != LOBBY_ROOM && !self.members.values().any(|m| m.info.room == room) {
            self.rooms.remove(room);
        }
    }

    /// Online members who see a line or indicator of `scope` sent by `from`.
    fn audience(&self, scope: &ChatScope, from: u32) -> Vec<u32> {
        self.members
            .iter()
            .filter(|(id, m)| {
                m.online
                    && match scope {
                        ChatScope::Global => true,
                        ChatScope::Room(r) => m.info.room == *r,
                        ChatScope::Whisper { to } => **id == *to || **id == from,
                    }
            })
            .map(|(id, _)| *id)
            .collect()
    }

    fn scope_of(&self, from: u32, channel: &Channel) -> Result<ChatScope, ChatOutcome> {
        match channel {
            Channel::Global => Ok(ChatScope::Global),
            Channel::Room => self
                .members
                .get(&from)
                .map(|m| ChatScope::Room(m.info.room.clone()))
                .ok_or(ChatOutcome::UnknownPlayer),
            Channel::Whisper { to } if self.members.contains_key(to) => {
                Ok(ChatScope::Whisper { to: *to })
            }
            Channel::Whisper { .. } => Err(ChatOutcome::UnknownRecipient),
        }
    }

    /// Sequences a chat line at time `now` (any monotonic origin).
    pub fn chat(
        &mut self,
        from: u32,
        client_msg_id: u32,
        channel: &Channel,
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
        // Every line past the rate check costs a token, refused ones included (so refusals cannot
        // be used to flood the sender's own error channel).
        m.tokens -= 1.0;
        let scope = match self.scope_of(from, channel) {
            Ok(s) => s,
            Err(o) => return o,
        };
        let Some(text) = clean_chat(text) else {
            return ChatOutcome::Rejected;
        };
        let Some(m) = self.members.get_mut(&from) else {
            return ChatOutcome::UnknownPlayer;
        };
        m.last_msg_id = Some(client_msg_id);
        self.chat_seq += 1;
        let line = ChatLine {
            seq: self.chat_seq,
            from,
            client_msg_id,
            scope: scope.clone(),
            text,
        };
        let limit = self.history_limit;
        match &scope {
            ChatScope::Global => self.global.push(line.clone(), limit),
            ChatScope::Room(r) => self
                .rooms
                .entry(r.clone())
                .or_default()
                .push(line.clone(), limit),
            ChatScope::Whisper { to } => {
                for id in [from, *to] {
                    self.whispers
                        .entry(id)
                        .or_default()
                        .push(line.clone(), limit);
                }
            }
        }
        let audience = self.audience(&scope, from);
        ChatOutcome::Accepted(line, audience)
    }

    /// The lines `id` may see with a sequence number above `cursor`, in order, and whether some of
    /// them were evicted from history (cannot be replayed).
    #[must_use]
    pub fn replay(&self, id: u32, cursor: u64) -> (Vec<ChatLine>, bool) {
        let Some(m) = self.members.get(&id) else {
            return (Vec::new(), false);
        };
        let mut lines: Vec<ChatLine> = Vec::new();
        let mut truncated = false;
        let mut take = |h: Option<&History>| {
            if let Some(h) = h {
                let (it, t) = h.since(cursor);
                lines.extend(it.cloned());
                truncated |= t;
            }
        };
        take(Some(&self.global));
        take(self.rooms.get(&m.info.room));
        take(self.whispers.get(&id));
        lines.sort_by_key(|l| l.seq);
        lines.dedup_by_key(|l| l.seq);
        (lines, truncated)
    }

    /// A typing indicator from `id` at `now`: the scope and the online players to tell (the typist
    /// excluded), or `None` when dropped (rate limit, unknown channel or player).
    pub fn typing(
        &mut self,
        id: u32,
        channel: &Channel,
        now: Duration,
    ) -> Option<(ChatScope, Vec<u32>)> {
        let scope = self.scope_of(id, channel).ok()?;
        let m = self.members.get_mut(&id)?;
        if m.typed
            .is_some_and(|t| now.saturating_sub(t) < TYPING_INTERVAL)
        {
            return None;
        }
        m.typed = Some(now);
        let mut to = self.audience(&scope, id);
        to.retain(|p| *p != id);
        Some((scope, to))
    }

    fn presence_gate(&mut self, id: u32, now: Duration) -> Result<(), PresenceOutcome> {
        let m = self
            .members
            .get_mut(&id)
            .ok_or(PresenceOutcome::UnknownPlayer)?;
        if m.presence_changed
            .is_some_and(|t| now.saturating_sub(t) < PRESENCE_INTERVAL)
        {
            return Err(PresenceOutcome::TooFast);
        }
        m.presence_changed = Some(now);
        Ok(())
    }

    fn everyone_online(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter(|(_, m)| m.online)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Sets a member's presence state.
    pub fn set_state(&mut self, id: u32, state: PresenceState, now: Duration) -> PresenceOutcome {
        if self.members.get(&id).is_some_and(|m| m.info.state == state) {
            return PresenceOutcome::Unchanged;
        }
        if let Err(o) = self.presence_gate(id, now) {
            return o;
        }
        let Some(m) = self.members.get_mut(&id) else {
            return PresenceOutcome::UnknownPlayer;
        };
        m.info.state = state;
        let info = m.info.clone();
        PresenceOutcome::Changed(info, self.everyone_online())
    }

    /// Moves a member to `room` (names are case-insensitive: stored lower-case; created if new).
    /// A room exists only while a member is in it, so there are never more than `max_players + 1`
    /// (the lobby): rooms cannot be used up.
    pub fn join_room(&mut self, id: u32, room: &str, now: Duration) -> PresenceOutcome {
        if !valid_room(room) {
            return PresenceOutcome::BadRoom;
        }
        let room = room.to_lowercase();
        let room = room.as_str();
        if !self.rooms.contains_key(room) && self.rooms.len() > self.max_players.max(MAX_ROOMS) {
            return PresenceOutcome::BadRoom;
        }
        if self.members.get(&id).is_some_and(|m| m.info.room == room) {
            return PresenceOutcome::Unchanged;
        }
        if let Err(o) = self.presence_gate(id, now) {
            return o;
        }
        let Some(m) = self.members.get_mut(&id) else {
            return PresenceOutcome::UnknownPlayer;
        };
        let old = std::mem::replace(&mut m.info.room, room.to_owned());
        let info = m.info.clone();
        self.rooms.entry(room.to_owned()).or_default();
        self.drop_room_if_empty(&old);
        PresenceOutcome::Changed(info, self.everyone_online())
    }

    /// Everyone online, by id.
    #[must_use]
    pub fn roster(&self) -> Vec<PlayerInfo> {
        self.members
            .values()
            .filter(|m| m.online)
            .map(|m| m.info.clone())
            .collect()
    }

    /// Number of members, online and offline.
    #[must_use]
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Number of online members.
    #[must_use]
    pub fn online(&self) -> usize {
        self.members.values().filter(|m| m.online).count()
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

    /// Number of rooms.
    #[must_use]
    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AV: EntityId = EntityId {
        index: 0,
        generation: 1,
    };
    const T0: Duration = Duration::ZERO;

    fn accepted(o: ChatOutcome) -> (ChatLine, Vec<u32>) {
        match o {
            ChatOutcome::Accepted(l, a) => (l, a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chat_rate_is_limited_per_player() {
        let mut l = Lobby::new(4);
        let a = l.join("a", AV).id;
        let b = l.join("b", AV).id;
        let mut ok = 0;
        for id in 1..=100u32 {
            if matches!(
                l.chat(a, id, &Channel::Global, "spam", T0),
                ChatOutcome::Accepted(..)
            ) {
                ok += 1;
            }
        }
        assert_eq!(ok, CHAT_BURST as usize, "a burst, then nothing");
        assert!(
            matches!(
                l.chat(b, 1, &Channel::Global, "hi", T0),
                ChatOutcome::Accepted(..)
            ),
            "others unaffected"
        );
        assert!(
            matches!(
                l.chat(a, 101, &Channel::Global, "later", Duration::from_secs(1)),
                ChatOutcome::Accepted(..)
            ),
            "refilled"
        );
    }

    #[test]
    fn join_checks_count_offline_members() {
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
        let a = l.join("a", AV).id;
        l.set_online(a, false);
        assert!(
            l.roster().is_empty(),
            "offline members are not in the roster"
        );
        assert_eq!(
            l.check_join(PROTOCOL_VERSION, "b"),
            Err(RefuseReason::ServerFull),
            "an offline member keeps their place"
        );
        l.leave(a);
        assert_eq!(l.check_join(PROTOCOL_VERSION, "b"), Ok(()));
    }

    #[test]
    fn chat_is_sequenced_deduplicated_and_cleaned() {
        let mut l = Lobby::new(4);
        let a = l.join("a", AV).id;
        let b = l.join("b", AV).id;
        assert_eq!(accepted(l.chat(a, 1, &Channel::Global, "hi", T0)).0.seq, 1);
        assert_eq!(accepted(l.chat(b, 1, &Channel::Global, "yo", T0)).0.seq, 2);
        assert_eq!(
            l.chat(a, 1, &Channel::Global, "hi", T0),
            ChatOutcome::Duplicate
        );
        assert_eq!(
            l.chat(a, 2, &Channel::Global, "\u{7}", T0),
            ChatOutcome::Rejected
        );
        let (c, _) = accepted(l.chat(a, 3, &Channel::Global, "x\ty", T0));
        assert_eq!((c.seq, c.text.as_str()), (3, "xy"));
        l.leave(a);
        assert_eq!(
            l.chat(a, 9, &Channel::Global, "gone", T0),
            ChatOutcome::UnknownPlayer
        );
        assert_eq!(l.roster().len(), 1);
    }

    #[test]
    fn channels_route_to_their_audience() {
        let mut l = Lobby::new(8);
        let a = l.join("a", AV).id;
        let b = l.join("b", AV).id;
        let c = l.join("c", AV).id;
        assert!(matches!(
            l.join_room(c, "arena", T0),
            PresenceOutcome::Changed(..)
        ));
        let (_, to) = accepted(l.chat(a, 1, &Channel::Room, "lobby only", T0));
        assert_eq!(to, vec![a, b]);
        let (line, to) = accepted(l.chat(c, 1, &Channel::Room, "arena only", T0));
        assert_eq!(to, vec![c]);
        assert_eq!(line.scope, ChatScope::Room("arena".into()));
        let (_, to) = accepted(l.chat(a, 2, &Channel::Whisper { to: c }, "psst", T0));
        assert_eq!(to, vec![a, c]);
        let (_, to) = accepted(l.chat(b, 1, &Channel::Global, "all", T0));
        assert_eq!(to, vec![a, b, c]);
        assert_eq!(
            l.chat(a, 3, &Channel::Whisper { to: 99 }, "nobody", T0),
            ChatOutcome::UnknownRecipient
        );
        // b replays from 0: its room's line, the global line; not the arena line nor the whisper.
        let (lines, truncated) = l.replay(b, 0);
        assert!(!truncated);
        let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![1, 4]);
        // c: arena line, whisper, global.
        let seqs: Vec<u64> = l.replay(c, 0).0.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        assert_eq!(l.replay(c, 3).0.len(), 1, "cursor respected");
    }

    #[test]
    fn offline_members_get_whispers_in_history_and_replay_reports_eviction() {
        let mut l = Lobby::with_history(4, 3);
        let a = l.join("a", AV).id;
        let b = l.join("b", AV).id;
        l.set_online(b, false);
        let (_, to) = accepted(l.chat(a, 1, &Channel::Whisper { to: b }, "while away", T0));
        assert_eq!(to, vec![a], "b is offline: nothing delivered now");
        for i in 2..=4 {
            l.chat(a, i, &Channel::Global, "g", T0);
        }
        l.set_online(b, true);
        let (lines, truncated) = l.replay(b, 0);
        assert_eq!(
            lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert!(!truncated);
        for i in 5..=6 {
            l.chat(a, i, &Channel::Global, "g", T0);
        }
        let (lines, truncated) = l.replay(b, 1);
        assert!(truncated, "global lines 2 and 3 were evicted");
        assert_eq!(
            lines.iter().map(|l| l.seq).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        assert!(!l.replay(b, 3).1, "nothing after the cursor was evicted");
    }

    #[test]
    fn presence_and_typing_are_rate_limited() {
        let mut l = Lobby::new(4);
        let a = l.join("a", AV).id;
        let b = l.join("b", AV).id;
        match l.set_state(a, PresenceState::Ready, T0) {
            PresenceOutcome::Changed(info, to) => {
                assert_eq!(info.state, PresenceState::Ready);
                assert_eq!(to, vec![a, b]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            l.set_state(a, PresenceState::Ready, T0),
            PresenceOutcome::Unchanged
        );
        assert_eq!(
            l.set_state(a, PresenceState::Away, Duration::from_millis(10)),
            PresenceOutcome::TooFast
        );
        assert!(matches!(
            l.set_state(a, PresenceState::Away, PRESENCE_INTERVAL),
            PresenceOutcome::Changed(..)
        ));
        assert_eq!(
            l.join_room(a, "bad\nroom", T0),
            PresenceOutcome::BadRoom,
            "room names follow the name rules"
        );
        let (scope, to) = l
            .typing(a, &Channel::Global, T0)
            .unwrap_or((ChatScope::Global, vec![]));
        assert_eq!((scope, to), (ChatScope::Global, vec![b]));
        assert!(l
            .typing(a, &Channel::Global, Duration::from_millis(500))
            .is_none());
        assert!(l.typing(a, &Channel::Global, TYPING_INTERVAL).is_some());
        assert_eq!(l.roster()[0].state, PresenceState::Away);
    }

    #[test]
    fn rooms_cannot_run_out_and_vanish_with_their_last_member() {
        let n = MAX_ROOMS + 8;
        let mut l = Lobby::new(n);
        let ids: Vec<u32> = (0..n).map(|i| l.join(&format!("p{i}"), AV).id).collect();
        // Every player may squat a room of its own: the next one still gets one.
        for (i, id) in ids.iter().enumerate() {
            assert!(
                matches!(
                    l.join_room(*id, &format!("r{i}"), T0),
                    PresenceOutcome::Changed(..)
                ),
                "room {i}"
            );
        }
        assert_eq!(l.room_count(), n + 1, "every player's room and the lobby");
        // Names are case-insensitive, and may not be padded with spaces.
        assert!(matches!(
            l.join_room(ids[1], "R0", PRESENCE_INTERVAL),
            PresenceOutcome::Changed(ref info, _) if info.room == "r0"
        ));
        assert_eq!(
            l.join_room(ids[2], " r0", PRESENCE_INTERVAL),
            PresenceOutcome::BadRoom
        );
        assert_eq!(l.room_count(), n, "r1 went with its last member");
        l.leave(ids[0]);
        l.leave(ids[1]);
        assert_eq!(l.room_count(), n - 1, "r0 too");
    }

    #[test]
    fn names_are_unique_ignoring_case_and_refusals_cost_chat_tokens() {
        let mut l = Lobby::new(8);
        let a = l.join("Alice", AV).id;
        assert_eq!(
            l.check_join(PROTOCOL_VERSION, "alice"),
            Err(RefuseReason::NameTaken)
        );
        assert_eq!(
            l.check_join(PROTOCOL_VERSION, "alice "),
            Err(RefuseReason::BadName)
        );
        l.set_online(a, false);
        assert_eq!(
            l.check_join(PROTOCOL_VERSION, "ALICE"),
            Err(RefuseReason::NameTaken),
            "a player in its grace window keeps its name"
        );
        l.set_online(a, true);
        let mut refused = 0;
        for id in 1..=20 {
            match l.chat(a, id, &Channel::Whisper { to: 999 }, "x", T0) {
                ChatOutcome::UnknownRecipient => refused += 1,
                ChatOutcome::RateLimited => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            refused, CHAT_BURST as usize,
            "whispers to nobody use up the burst"
        );
    }
}
