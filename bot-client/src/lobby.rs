//! The client's view of the lobby, fed by the reliable stream: the roster kept current from presence
//! messages, the chat log, and checks on what the server delivers (duplicate or out-of-order lines).
//! [`ChatReceipts`] is the compact record of which lines arrived, used by the swarm's end-of-run check.

use std::collections::{BTreeMap, HashMap, VecDeque};

use quicktick_shared::wire::{ChatLine, PlayerInfo, Resumed, ServerMsg, Welcome};

/// Which chat lines one client received, kept compact (4 bytes per line) so a swarm can keep them all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatReceipts {
    /// The receiving client's player id.
    pub me: u32,
    /// `Welcome::chat_seq`: lines with a higher sequence number were sent after this client joined.
    pub joined_after_seq: u64,
    /// The client's own lines as the server echoed them: `(seq, client_msg_id)`, arrival order.
    pub echoed: Vec<(u64, u32)>,
    /// Per sender id, the `client_msg_id`s received, sorted and unique.
    received: HashMap<u32, Vec<u32>>,
}

impl ChatReceipts {
    /// Empty receipts for player `me`, who joined after line `joined_after_seq`.
    #[must_use]
    pub fn new(me: u32, joined_after_seq: u64) -> Self {
        Self {
            me,
            joined_after_seq,
            ..Self::default()
        }
    }

    /// Records a received line; `false` when `(from, client_msg_id)` was already received.
    pub fn record(&mut self, line: &ChatLine) -> bool {
        let ids = self.received.entry(line.from).or_default();
        // Lines of one sender normally arrive in id order: append; otherwise keep the vector sorted.
        if ids.last().is_none_or(|&last| line.client_msg_id > last) {
            ids.push(line.client_msg_id);
        } else {
            match ids.binary_search(&line.client_msg_id) {
                Ok(_) => return false,
                Err(at) => ids.insert(at, line.client_msg_id),
            }
        }
        if line.from == self.me {
            self.echoed.push((line.seq, line.client_msg_id));
        }
        true
    }

    /// True when the line `client_msg_id` of sender `from` was received.
    #[must_use]
    pub fn has(&self, from: u32, client_msg_id: u32) -> bool {
        self.received
            .get(&from)
            .is_some_and(|ids| ids.binary_search(&client_msg_id).is_ok())
    }

    /// Distinct lines received (all senders, this client's echoes included).
    #[must_use]
    pub fn len(&self) -> usize {
        self.received.values().map(Vec::len).sum()
    }

    /// True when no line was received.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.received.values().all(Vec::is_empty)
    }
}

/// Counters of what arrived on the stream after the welcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LobbyCounters {
    /// Chat lines received (duplicates and own echoes included).
    pub chat_received: u64,
    /// Of which sent by other players (first copies only).
    pub chat_received_others: u64,
    /// Lines whose `(from, client_msg_id)` had already been received.
    pub chat_duplicates: u64,
    /// Lines whose `seq` was not greater than the previous line's.
    pub chat_out_of_order: u64,
    /// `Error` frames from the server.
    pub server_errors: u64,
    /// Messages not valid after the welcome (a second `Welcome` or `Refused`).
    pub unexpected: u64,
    /// `PlayerJoined` for an id already present, or `PlayerLeft`/`Presence` for one absent.
    pub presence_anomalies: u64,
    /// `Presence` changes received.
    pub presence_changes: u64,
    /// Typing indicators received.
    pub typing_seen: u64,
    /// Chat lines received in resume replays.
    pub chat_replayed: u64,
    /// Shots the server judged for this client.
    pub shots: u64,
    /// Of which hit something.
    pub hits: u64,
    /// Of which were judged against the rewound (lag-compensated) view.
    pub shots_compensated: u64,
    /// The server's latest report of this client's inputs: applied, missing, late, duplicates.
    pub inputs_applied: u64,
    /// See `inputs_applied`.
    pub inputs_missing: u64,
    /// See `inputs_applied`.
    pub inputs_late: u64,
    /// See `inputs_applied`.
    pub inputs_duplicate: u64,
}

/// Roster, chat log and delivery checks of one client.
#[derive(Debug, Clone)]
pub(crate) struct LobbyView {
    /// Who is present, by player id.
    roster: BTreeMap<u32, PlayerInfo>,
    /// Received lines, arrival order, at most `log_limit` (oldest dropped first).
    log: VecDeque<ChatLine>,
    /// Most lines `log` keeps.
    log_limit: usize,
    /// Sequence number of the previous line received.
    last_seq: Option<u64>,
    /// Newest chat sequence number this client has seen or was told precedes it (resume cursor).
    cursor: u64,
    /// Lines still expected from the current resume replay.
    replay_left: u32,
    /// Which lines arrived.
    receipts: ChatReceipts,
    /// Counters.
    counters: LobbyCounters,
}

impl LobbyView {
    /// The view right after `welcome`, keeping at most `log_limit` chat lines.
    pub(crate) fn new(welcome: &Welcome, log_limit: usize) -> Self {
        Self {
            roster: welcome.players.iter().map(|p| (p.id, p.clone())).collect(),
            log: VecDeque::new(),
            log_limit,
            last_seq: None,
            cursor: welcome.chat_seq,
            replay_left: 0,
            receipts: ChatReceipts::new(welcome.player_id, welcome.chat_seq),
            counters: LobbyCounters::default(),
        }
    }

    /// Takes in one server message received after the welcome.
    pub(crate) fn handle(&mut self, msg: ServerMsg) {
        match msg {
            ServerMsg::Chat(line) => self.chat(line),
            ServerMsg::PlayerJoined(info) => {
                if self.roster.insert(info.id, info).is_some() {
                    self.counters.presence_anomalies += 1;
                }
            }
            ServerMsg::PlayerLeft { id, reason } => {
                if self.roster.remove(&id).is_none() {
                    self.counters.presence_anomalies += 1;
                }
                tracing::trace!(id, ?reason, "player left");
            }
            ServerMsg::Presence { id, state, room } => {
                self.counters.presence_changes += 1;
                match self.roster.get_mut(&id) {
                    Some(p) => {
                        p.state = state;
                        p.room = room;
                    }
                    None => self.counters.presence_anomalies += 1,
                }
            }
            ServerMsg::Typing { .. } => self.counters.typing_seen += 1,
            ServerMsg::Resumed(r) => self.resumed(&r),
            ServerMsg::ShotResult {
                hit, compensated, ..
            } => {
                let c = &mut self.counters;
                c.shots += 1;
                c.hits += u64::from(hit.is_some());
                c.shots_compensated += u64::from(compensated);
            }
            ServerMsg::InputStats {
                applied,
                missing,
                late,
                duplicates,
            } => {
                let c = &mut self.counters;
                (
                    c.inputs_applied,
                    c.inputs_missing,
                    c.inputs_late,
                    c.inputs_duplicate,
                ) = (applied, missing, late, duplicates);
            }
            ServerMsg::Error { code, detail } => {
                self.counters.server_errors += 1;
                tracing::warn!(?code, %detail, "server reported an error");
            }
            // Kept by the client itself (`Client::drain_notice`).
            ServerMsg::Draining { .. } => {}
            ServerMsg::Welcome(_) | ServerMsg::Refused { .. } => {
                self.counters.unexpected += 1;
                tracing::warn!("unexpected welcome/refused after joining");
            }
        }
    }

    /// The session continued on a new connection: the roster is the server's again, and the
    /// replayed lines that follow count as replays.
    pub(crate) fn resumed(&mut self, r: &Resumed) {
        self.roster = r.players.iter().map(|p| (p.id, p.clone())).collect();
        self.replay_left = r.chat_replayed;
    }

    /// Joined afresh as a new player (the old session was gone): roster, cursor and receipts start
    /// over from `welcome`; counters continue.
    pub(crate) fn rejoined(&mut self, welcome: &Welcome) {
        self.roster = welcome.players.iter().map(|p| (p.id, p.clone())).collect();
        self.cursor = welcome.chat_seq;
        self.last_seq = None;
        self.replay_left = 0;
        self.receipts = ChatReceipts::new(welcome.player_id, welcome.chat_seq);
    }

    /// The resume cursor: the newest chat sequence number received (or the join point).
    pub(crate) fn cursor(&self) -> u64 {
        self.cursor
    }

    fn chat(&mut self, line: ChatLine) {
        self.cursor = self.cursor.max(line.seq);
        let c = &mut self.counters;
        if self.replay_left > 0 {
            self.replay_left -= 1;
            c.chat_replayed += 1;
        }
        c.chat_received += 1;
        if self.last_seq.is_some_and(|prev| line.seq <= prev) {
            c.chat_out_of_order += 1;
        }
        self.last_seq = Some(self.last_seq.map_or(line.seq, |p| p.max(line.seq)));
        if !self.receipts.record(&line) {
            c.chat_duplicates += 1;
        } else if line.from != self.receipts.me {
            c.chat_received_others += 1;
        }
        if self.log_limit > 0 {
            if self.log.len() >= self.log_limit {
                self.log.pop_front();
            }
            self.log.push_back(line);
        }
    }

    /// Everyone present, by player id.
    pub(crate) fn roster(&self) -> Vec<PlayerInfo> {
        self.roster.values().cloned().collect()
    }

    /// The kept chat lines, arrival order.
    pub(crate) fn chat_log(&self) -> Vec<ChatLine> {
        self.log.iter().cloned().collect()
    }

    /// Which lines arrived.
    pub(crate) fn receipts(&self) -> &ChatReceipts {
        &self.receipts
    }

    /// Counters.
    pub(crate) fn counters(&self) -> LobbyCounters {
        self.counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quicktick_shared::entity::EntityId;
    use quicktick_shared::tick::Tick;
    use quicktick_shared::wire::LeaveReason;

    fn player(id: u32, name: &str) -> PlayerInfo {
        PlayerInfo {
            id,
            name: name.into(),
            avatar: EntityId {
                index: id as u16,
                generation: 0,
            },
            state: quicktick_shared::wire::PresenceState::Lobby,
            room: "lobby".into(),
        }
    }

    fn welcome(me: u32, chat_seq: u64) -> Welcome {
        Welcome {
            player_id: me,
            tick_rate: 30,
            map_id: "m".into(),
            map_width: 100.0,
            map_height: 100.0,
            avatar: EntityId {
                index: 1,
                generation: 0,
            },
            server_tick: Tick(10),
            input_redundancy: 4,
            players: vec![player(1, "a"), player(me, "me")],
            chat_seq,
            walls: vec![],
            lag_comp_ms: 200,
            resume_token: vec![1; 16],
            grace_ms: 30_000,
        }
    }

    fn line(seq: u64, from: u32, id: u32) -> ServerMsg {
        ServerMsg::Chat(ChatLine {
            seq,
            from,
            client_msg_id: id,
            scope: quicktick_shared::wire::ChatScope::Global,
            text: format!("{from}/{id}"),
        })
    }

    #[test]
    fn roster_follows_presence() {
        let mut v = LobbyView::new(&welcome(2, 0), usize::MAX);
        v.handle(ServerMsg::PlayerJoined(player(3, "c")));
        v.handle(ServerMsg::PlayerLeft {
            id: 1,
            reason: LeaveReason::Quit,
        });
        let names: Vec<_> = v.roster().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["me", "c"]);
        v.handle(ServerMsg::PlayerLeft {
            id: 9,
            reason: LeaveReason::Kicked,
        });
        assert_eq!(v.counters().presence_anomalies, 1);
    }

    #[test]
    fn chat_duplicates_order_and_echoes() {
        let mut v = LobbyView::new(&welcome(2, 5), 3);
        for m in [
            line(6, 1, 1),
            line(7, 2, 1),
            line(8, 1, 3),
            line(8, 1, 3), // duplicate, and seq not increasing
            line(4, 1, 2), // out of order, new id below the newest of that sender
        ] {
            v.handle(m);
        }
        let c = v.counters();
        assert_eq!(c.chat_received, 5);
        assert_eq!(c.chat_duplicates, 1);
        assert_eq!(c.chat_out_of_order, 2);
        assert_eq!(c.chat_received_others, 3);
        let r = v.receipts();
        assert_eq!(r.echoed, [(7, 1)]);
        assert!(r.has(1, 1) && r.has(1, 2) && r.has(1, 3) && r.has(2, 1));
        assert!(!r.has(1, 4) && !r.has(3, 1));
        assert_eq!(r.len(), 4);
        assert_eq!(r.joined_after_seq, 5);
        // The log keeps the newest three lines.
        let seqs: Vec<_> = v.chat_log().iter().map(|l| l.seq).collect();
        assert_eq!(seqs, [8, 8, 4]);
    }

    #[test]
    fn zero_log_limit_keeps_no_text_but_counts() {
        let mut v = LobbyView::new(&welcome(2, 0), 0);
        v.handle(line(1, 1, 1));
        assert!(v.chat_log().is_empty());
        assert!(v.receipts().has(1, 1));
    }
}
