//! QUIC connection migration over real QUIC on 127.0.0.1 (issue 5 item 3): a client whose address
//! changes (its endpoint moves to a fresh UDP socket, as after a NAT rebinding) keeps its session
//! without reconnecting: the same quinn connection, the same player, snapshots and inputs keep
//! flowing, chat still arrives, and the server counts the address changes. Every test is bounded by
//! [`TEST_LIMIT`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use common::{start, test_config, TestServer};
use quicktick_bot::conditioner::{conditioned_endpoint_with_handle, Conditioner, Impairment};
use quicktick_bot::{client_endpoint, rebind_endpoint, Client};
use quicktick_shared::link::LinkConfig;

/// Hard limit on each test.
const TEST_LIMIT: Duration = Duration::from_secs(30);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("the test ran past its time limit")
}

fn bind() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the test follows on the migrating client.
struct Progress {
    snapshots: u64,
    applied_inputs: u64,
}

fn progress(c: &Client) -> Progress {
    let st = c.stats();
    Progress {
        snapshots: st.session.snapshots,
        applied_inputs: st.input_to_snapshot_us.len(),
    }
}

/// Two clients play 1 s, then A's endpoint is rebound twice, 1 s apart: after each rebind A keeps
/// the same connection and player, keeps receiving snapshots, its inputs keep being applied, its
/// chat reaches B, and the server counts a migration, with no new connection.
async fn migrate_twice(
    server: &TestServer,
    ep_a: &quinn::Endpoint,
    cond: Option<&Conditioner>,
    a: &Client,
    b: &Client,
) {
    a.set_input(0.7, 0.2, 0.0, false);
    b.set_input(-0.5, 0.5, 1.0, false);
    eventually("both rosters full", || {
        a.roster().len() == 2 && b.roster().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let id = a.connection().stable_id();
    let player = a.player_id();
    let mut addr = ep_a.local_addr().unwrap();
    let stats = server.server.stats();
    for round in 1..=2u64 {
        let before = progress(a);
        let new_addr = rebind_endpoint(ep_a, cond).unwrap();
        assert_ne!(new_addr, addr, "round {round}: a new local address");
        assert_eq!(new_addr.ip(), addr.ip());
        assert_eq!(ep_a.local_addr().unwrap(), new_addr);
        addr = new_addr;
        let text = format!("moved {round}");
        a.chat(&text).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;

        let after = progress(a);
        let s = stats.snapshot();
        eprintln!(
            "rebind {round} → {new_addr}: snapshots {} → {}, applied inputs {} → {}, server \
             migrations {}, connections accepted {}, rtt {:?}",
            before.snapshots,
            after.snapshots,
            before.applied_inputs,
            after.applied_inputs,
            s.migrations,
            s.connections_accepted,
            a.connection().rtt(),
        );
        assert!(a.is_connected(), "round {round}: {:?}", a.close_reason());
        assert_eq!(
            a.connection().stable_id(),
            id,
            "round {round}: the same connection"
        );
        assert_eq!(a.player_id(), player);
        assert!(
            after.snapshots > before.snapshots + 20,
            "round {round}: snapshots keep arriving: {} → {}",
            before.snapshots,
            after.snapshots
        );
        assert!(
            after.applied_inputs > before.applied_inputs + 20,
            "round {round}: inputs sent from the new address are applied"
        );
        eventually("the chat line reaches b over the migrated stream", || {
            b.chat_log()
                .iter()
                .any(|l| l.from == player && l.text == text)
        })
        .await;
        assert!(s.migrations >= round, "round {round}: {s:?}");
        assert_eq!(s.connections_accepted, 2, "no reconnect");
    }

    let s = stats.snapshot();
    assert!(s.migrations >= 2, "{s:?}");
    assert_eq!(s.connections_accepted, 2, "no reconnect");
    assert_eq!(s.connections_current, 2);
    assert_eq!(s.players, 2);
    assert_eq!(s.bad_datagrams + s.bad_frames, 0);
    let roster = server.server.published().roster.lock().unwrap().clone();
    assert_eq!(roster.len(), 2, "{roster:?}");
    assert!(roster.iter().any(|p| p.id == player));
    assert_eq!(a.roster().len(), 2);
    assert_eq!(b.roster().len(), 2);
    assert!(b.is_connected());
    let st = a.stats();
    assert_eq!(st.session.decode_errors, 0);
    assert_eq!(st.protocol_anomalies, 0);
    assert_eq!(st.chat_duplicates, 0);
}

#[tokio::test]
async fn a_client_keeps_its_session_across_two_address_changes() {
    bounded(async {
        let server = start(test_config());
        let ep_a = client_endpoint(bind(), &server.trust).unwrap();
        let ep_b = client_endpoint(bind(), &server.trust).unwrap();
        let a = Client::connect(&ep_a, server.addr, "localhost", "mover")
            .await
            .unwrap();
        let b = Client::connect(&ep_b, server.addr, "localhost", "stayer")
            .await
            .unwrap();

        migrate_twice(&server, &ep_a, None, &a, &b).await;

        a.close().await;
        b.close().await;
        drop((ep_a, ep_b));
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn migration_under_a_conditioned_link_keeps_the_impairment() {
    bounded(async {
        let server = start(test_config());
        let latency = LinkConfig {
            latency: Duration::from_millis(20),
            ..LinkConfig::default()
        };
        let (ep_a, cond) = conditioned_endpoint_with_handle(
            bind(),
            &server.trust,
            Impairment::symmetric(latency, 5),
        )
        .unwrap();
        let ep_b = client_endpoint(bind(), &server.trust).unwrap();
        let a = Client::connect(&ep_a, server.addr, "localhost", "mover")
            .await
            .unwrap();
        let b = Client::connect(&ep_b, server.addr, "localhost", "stayer")
            .await
            .unwrap();

        let before = cond.stats();
        migrate_twice(&server, &ep_a, Some(&cond), &a, &b).await;

        // The rebound sockets are under the same links: impaired, and counted by the same handle.
        let rtt = a.connection().rtt();
        assert!(
            rtt >= Duration::from_millis(38),
            "20 ms each way still applies: {rtt:?}"
        );
        let l = cond.stats();
        eprintln!("conditioned link after two rebinds: {l:?}");
        assert!(l.up.released > before.up.released + 100, "{l:?}");
        assert!(l.down.released > before.down.released + 100, "{l:?}");
        assert_eq!(
            l.up.delayed, l.up.released,
            "every datagram went through the latency"
        );
        assert_eq!(l.down.delayed, l.down.released);
        assert_eq!(
            l.up.send_errors + l.up.overflow + l.down.overflow,
            0,
            "{l:?}"
        );
        assert_eq!(cond.impairment().up, latency);

        a.close().await;
        b.close().await;
        drop((ep_a, ep_b));
        server.server.shutdown().await;
    })
    .await;
}
