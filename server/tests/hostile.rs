//! Hostile input over real QUIC: every bad datagram or frame costs only its sender (a close code and
//! reason), never the server or the other players.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::time::Duration;

use common::{count_datagrams, raw_endpoint, start, test_config, RawClient};
use quicktick_shared::wire::{close, ClientMsg, RefuseReason, ServerMsg, PROTOCOL_VERSION};

/// Runs `attack` from one client while a bystander plays, then checks the attacker got `code`, the
/// bystander kept receiving snapshots and the server still accepts new players.
async fn attack_costs_only_the_attacker<F, Fut>(attack: F, code: u32)
where
    F: FnOnce(RawClient) -> Fut,
    Fut: std::future::Future<Output = RawClient>,
{
    let ts = start(test_config());
    let ep = raw_endpoint(&ts.trust);
    let (bystander, _) = RawClient::join(&ep, ts.addr, "bystander").await;
    assert!(count_datagrams(&bystander.conn, Duration::from_millis(300)).await > 5);
    let (attacker, _) = RawClient::join(&ep, ts.addr, "attacker").await;
    let attacker = attack(attacker).await;
    let (got, reason) = attacker
        .closed()
        .await
        .expect("attacker was not disconnected");
    assert_eq!(got, u64::from(code), "close reason: {reason}");
    assert!(!reason.is_empty());
    // The bystander still gets snapshots and the server takes new players.
    assert!(count_datagrams(&bystander.conn, Duration::from_millis(300)).await > 5);
    let (late, w) = RawClient::join(&ep, ts.addr, "late").await;
    assert!(w.players.iter().any(|p| p.name == "bystander"));
    assert!(
        !w.players.iter().any(|p| p.name == "attacker"),
        "the attacker left presence"
    );
    drop(late);
    let s = ts.server.shutdown().await;
    assert_eq!(s.datagrams_too_large, 0);
}

#[tokio::test]
async fn garbage_datagram() {
    attack_costs_only_the_attacker(
        |c| async move {
            c.conn
                .send_datagram(vec![0xde, 0xad, 0xbe, 0xef, 1, 2, 3].into())
                .unwrap();
            c
        },
        close::PROTOCOL_VIOLATION,
    )
    .await;
}

#[tokio::test]
async fn truncated_input_datagram() {
    attack_costs_only_the_attacker(
        |c| async move {
            // kind byte, Some(ack) tag, then nothing.
            c.conn.send_datagram(vec![0x01, 0x01].into()).unwrap();
            c
        },
        close::PROTOCOL_VIOLATION,
    )
    .await;
}

#[tokio::test]
async fn oversized_datagram() {
    attack_costs_only_the_attacker(
        |c| async move {
            let max = c.conn.max_datagram_size().unwrap();
            c.conn
                .send_datagram(vec![0x01; max.min(1100)].into())
                .unwrap();
            c
        },
        close::PROTOCOL_VIOLATION,
    )
    .await;
}

#[tokio::test]
async fn nan_input() {
    attack_costs_only_the_attacker(
        |c| async move {
            // Hand-encoded: kind, ack None, 1 input: tick 5, move_x NaN, move_y 0, aim 0, buttons 0.
            let mut d = vec![0x01, 0x00, 0x01, 0x05];
            d.extend_from_slice(&f32::NAN.to_le_bytes());
            d.extend_from_slice(&0f32.to_le_bytes());
            d.extend_from_slice(&0f32.to_le_bytes());
            d.push(0);
            c.conn.send_datagram(d.into()).unwrap();
            c
        },
        close::PROTOCOL_VIOLATION,
    )
    .await;
}

#[tokio::test]
async fn oversized_frame() {
    attack_costs_only_the_attacker(
        |mut c| async move {
            c.send.write_all(&[0xff, 0xff, 0, 0, 0]).await.unwrap();
            c
        },
        close::PROTOCOL_VIOLATION,
    )
    .await;
}

#[tokio::test]
async fn malformed_frame() {
    attack_costs_only_the_attacker(
        |mut c| async move {
            c.send
                .write_all(&[0, 4, 0xee, 0xee, 0xee, 0xee])
                .await
                .unwrap();
            c
        },
        close::PROTOCOL_VIOLATION,
    )
    .await;
}

#[tokio::test]
async fn refusals_are_clear() {
    let ts = start(quicktick_server::ServerConfig {
        max_players: 1,
        ..test_config()
    });
    let ep = raw_endpoint(&ts.trust);
    for (version, name, want) in [
        (PROTOCOL_VERSION + 1, "v", RefuseReason::VersionMismatch),
        (PROTOCOL_VERSION, "bad\nname", RefuseReason::BadName),
        (PROTOCOL_VERSION, "", RefuseReason::BadName),
    ] {
        let mut c = RawClient::connect(&ep, ts.addr).await;
        c.send_msg(&ClientMsg::Hello {
            version,
            name: name.into(),
            token: None,
        })
        .await;
        match c.next_msg().await {
            Some(ServerMsg::Refused { reason, detail }) => assert_eq!(reason, want, "{detail}"),
            other => panic!("expected refusal, got {other:?}"),
        }
        assert_eq!(
            c.closed().await.map(|c| c.0),
            Some(u64::from(close::REFUSED))
        );
    }
    let (_first, _) = RawClient::join(&ep, ts.addr, "first").await;
    let mut c = RawClient::connect(&ep, ts.addr).await;
    c.send_msg(&ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "second".into(),
        token: None,
    })
    .await;
    assert!(matches!(
        c.next_msg().await,
        Some(ServerMsg::Refused {
            reason: RefuseReason::ServerFull,
            ..
        })
    ));
    ts.server.shutdown().await;
}

#[tokio::test]
async fn silent_client_hits_the_handshake_deadline() {
    let ts = start(test_config());
    let ep = raw_endpoint(&ts.trust);
    let c = RawClient::connect(&ep, ts.addr).await; // opens the stream but never says hello
    let (code, reason) = c.closed().await.expect("not closed");
    assert_eq!(code, u64::from(close::HANDSHAKE_TIMEOUT), "{reason}");
    ts.server.shutdown().await;
}

#[tokio::test]
async fn shutdown_tells_players_why() {
    let ts = start(test_config());
    let ep = raw_endpoint(&ts.trust);
    let (c, _) = RawClient::join(&ep, ts.addr, "p").await;
    let stop = tokio::spawn(ts.server.shutdown());
    let (code, reason) = c.closed().await.expect("not closed");
    assert_eq!(code, u64::from(close::SHUTDOWN));
    assert_eq!(reason, "server shutting down");
    let _ = stop.await;
}

#[tokio::test]
async fn input_ticks_half_the_tick_space_away_are_ignored() {
    use quicktick_shared::input::InputCmd;
    use quicktick_shared::tick::Tick;
    use quicktick_shared::wire::InputDatagram;
    let ts = start(test_config());
    let ep = raw_endpoint(&ts.trust);
    let (bystander, _) = RawClient::join(&ep, ts.addr, "bystander").await;
    let (attacker, w) = RawClient::join(&ep, ts.addr, "half").await;
    let next = w.server_tick.0.wrapping_add(1);
    for k in -150i64..=150 {
        let t = next.wrapping_add(1 << 31).wrapping_add(k as u32);
        let d = InputDatagram {
            snapshot_ack: None,
            inputs: vec![InputCmd::idle(Tick(t))],
        };
        attacker
            .conn
            .send_datagram(d.encode().unwrap().into())
            .unwrap();
    }
    // Valid encodings with hostile ticks: ignored (counted), nobody is disturbed.
    assert!(count_datagrams(&bystander.conn, Duration::from_millis(500)).await > 15);
    assert!(count_datagrams(&attacker.conn, Duration::from_millis(200)).await > 5);
    assert!(!ts.server.failed());
    ts.server.shutdown().await;
}

#[tokio::test]
async fn a_chat_flood_is_rate_limited_and_disturbs_nobody() {
    use quicktick_shared::wire::{encode_frame, ErrorCode};
    let ts = start(test_config());
    let ep = raw_endpoint(&ts.trust);
    let mut readers = Vec::new();
    for i in 0..3 {
        readers.push(RawClient::join(&ep, ts.addr, &format!("reader{i}")).await.0);
    }
    let (mut attacker, _) = RawClient::join(&ep, ts.addr, "flood").await;
    let mut buf = Vec::new();
    for id in 1..=4000u32 {
        buf.extend(
            encode_frame(&ClientMsg::Chat {
                client_msg_id: id,
                channel: quicktick_shared::wire::Channel::Global,
                text: "b".repeat(256),
            })
            .unwrap(),
        );
    }
    attacker.send.write_all(&buf).await.unwrap();
    // The attacker hears that it is limited.
    let mut limited = false;
    while let Some(m) = attacker.next_msg().await {
        if matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::RateLimited,
                ..
            }
        ) {
            limited = true;
            break;
        }
    }
    assert!(limited, "no rate-limit notice");
    // Every reader is still connected and got only the burst.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in &mut readers {
        assert!(
            r.conn.close_reason().is_none(),
            "reader disconnected: {:?}",
            r.conn.close_reason()
        );
        let mut lines = 0;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), r.next_msg()).await
        {
            lines += usize::from(matches!(m, ServerMsg::Chat(_)));
        }
        assert!(lines <= 10, "{lines} flood lines delivered");
        assert!(count_datagrams(&r.conn, Duration::from_millis(200)).await > 5);
    }
    let s = ts.server.shutdown().await;
    assert_eq!(s.slow_consumers, 0);
}

#[tokio::test]
async fn a_client_that_abandons_its_control_stream_is_closed_with_a_reason() {
    let ts = start(test_config());
    let ep = raw_endpoint(&ts.trust);
    let (mut resetter, _) = RawClient::join(&ep, ts.addr, "resetter").await;
    resetter.send.reset(0u32.into()).unwrap();
    let (code, reason) = resetter.closed().await.expect("not closed");
    assert_eq!(code, u64::from(close::QUIT));
    assert!(reason.contains("control stream"), "{reason}");
    // One that stops reading: the server notices on its next frame (input stats come every second).
    let (mut stopper, _) = RawClient::join(&ep, ts.addr, "stopper").await;
    stopper.recv.stop(0u32.into()).unwrap();
    let (code, reason) = stopper.closed().await.expect("not closed");
    assert_eq!(code, u64::from(close::QUIT));
    assert!(reason.contains("control stream"), "{reason}");
    let (late, w) = RawClient::join(&ep, ts.addr, "late").await;
    assert_eq!(w.players.len(), 1, "both left presence: {:?}", w.players);
    drop(late);
    ts.server.shutdown().await;
}

#[tokio::test]
async fn one_address_cannot_hold_many_half_open_connections() {
    let ts = start(quicktick_server::ServerConfig {
        max_pending_per_ip: 8,
        ..test_config()
    });
    // The attacker is another host: 127.0.0.2 (any 127/8 address reaches loopback on Linux).
    let evil = common::raw_endpoint_at(&ts.trust, "127.0.0.2:0".parse().unwrap());
    let mut silent = Vec::new();
    let mut refused = 0;
    for _ in 0..12 {
        match evil.connect(ts.addr, "localhost").unwrap().await {
            Ok(c) => silent.push(c),
            Err(_) => refused += 1,
        }
    }
    let per_ip = 8;
    assert_eq!(silent.len(), per_ip, "{per_ip} half-open slots per address");
    assert_eq!(refused, 12 - per_ip);
    // Everyone else still gets in.
    let ep = raw_endpoint(&ts.trust);
    let (_honest, w) = RawClient::join(&ep, ts.addr, "honest").await;
    assert_eq!(w.players.len(), 1);
    drop(silent);
    ts.server.shutdown().await;
}

#[tokio::test]
async fn half_open_connections_are_bounded() {
    let ts = start(quicktick_server::ServerConfig {
        max_pending_handshakes: 3,
        ..test_config()
    });
    let ep = raw_endpoint(&ts.trust);
    let (bystander, _) = RawClient::join(&ep, ts.addr, "bystander").await;
    // Connections that never say hello hold their slot until the handshake deadline.
    let mut silent = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        match ep.connect(ts.addr, "localhost").unwrap().await {
            Ok(c) => silent.push(c),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(silent.len(), 3, "three half-open slots");
    assert_eq!(refused, 3);
    assert!(
        count_datagrams(&bystander.conn, Duration::from_millis(300)).await > 5,
        "bystander unaffected"
    );
    // After the deadline frees the slots, players can join again.
    for c in &silent {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.closed()).await;
    }
    let (_late, w) = RawClient::join(&ep, ts.addr, "late").await;
    assert_eq!(w.players.len(), 2);
    assert_eq!(ts.server.stats().snapshot().handshakes_refused, 3);
    ts.server.shutdown().await;
}
