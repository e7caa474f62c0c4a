//! The link conditioner under real QUIC on 127.0.0.1, against the real server in-process: latency
//! shows in the RTT, a lossy down-link is survived and its drops are counted, and no impairment is
//! invisible. Every test is bounded by [`TEST_LIMIT`] and ends by itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::future::Future;

use clap::Parser;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{start, test_config, TestServer};
use quicktick_bot::conditioner::{
    conditioned_endpoint, conditioned_endpoint_with_handle, Conditioner, Impairment,
};
use quicktick_bot::swarm::{run, SwarmConfig};
use quicktick_bot::Client;
use quicktick_shared::link::LinkConfig;

/// Hard limit on each test.
const TEST_LIMIT: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("the test ran past its time limit")
}

fn bind() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn link(loss: f32, duplicate: f32, latency_ms: u64, jitter_ms: u64) -> LinkConfig {
    LinkConfig {
        loss,
        duplicate,
        latency: Duration::from_millis(latency_ms),
        jitter: Duration::from_millis(jitter_ms),
    }
}

/// A conditioned endpoint trusting `server`, a joined client on it, and the time the join took.
async fn join(
    server: &TestServer,
    imp: Impairment,
    name: &str,
) -> (quinn::Endpoint, Conditioner, Client, Duration) {
    join_with(server, imp, name, quicktick_bot::ClientOptions::default()).await
}

async fn join_with(
    server: &TestServer,
    imp: Impairment,
    name: &str,
    opts: quicktick_bot::ClientOptions,
) -> (quinn::Endpoint, Conditioner, Client, Duration) {
    let (ep, link) = conditioned_endpoint_with_handle(bind(), &server.trust, imp).unwrap();
    let t = Instant::now();
    let client = Client::connect_with(&ep, server.addr, "localhost", name, opts)
        .await
        .unwrap();
    (ep, link, client, t.elapsed())
}

/// Complete snapshots the client assembled during `dur`.
async fn snapshots_during(client: &Client, dur: Duration) -> u64 {
    let before = client.stats().session.snapshots;
    tokio::time::sleep(dur).await;
    client.stats().session.snapshots - before
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::test]
async fn latency_50ms_each_way_shows_in_the_rtt() {
    bounded(async {
        let server = start(test_config());
        let imp = Impairment::symmetric(link(0.0, 0.0, 50, 0), 11);
        let (ep, link, client, joined_in) = join(&server, imp, "slow").await;
        // QUIC handshake (1 RTT) then hello → welcome on the stream (1 RTT).
        assert!(joined_in >= Duration::from_millis(190), "{joined_in:?}");

        let got = snapshots_during(&client, Duration::from_secs(2)).await;
        let rtt = client.connection().rtt();
        let st = client.stats();
        let p50 = st.rtt_us.value_at_quantile(0.5);
        eprintln!(
            "50 ms each way: joined in {:.0} ms, rtt {:.1} ms, sampled p50 {:.1} ms, {got} snapshots \
             in 2 s, link {:?}",
            ms(joined_in),
            ms(rtt),
            p50 as f64 / 1e3,
            link.stats()
        );
        assert!(
            (Duration::from_millis(90)..Duration::from_millis(200)).contains(&rtt),
            "{rtt:?}"
        );
        assert!(p50 >= 90_000, "sampled RTT p50 {p50} us");
        assert!(got > 60, "snapshots keep arriving: {got}");
        let l = link.stats();
        assert!(l.up.delayed > 0 && l.down.delayed > 0, "{l:?}");
        assert_eq!(l.up.dropped + l.down.dropped + l.up.overflow + l.down.overflow, 0);
        assert_eq!(l.down.released, l.down.offered - l.down.queued);

        client.close().await;
        drop(ep);
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn twenty_percent_down_loss_is_survived_and_counted() {
    bounded(async {
        let server = start(test_config());
        let imp = Impairment {
            up: LinkConfig::default(),
            down: link(0.2, 0.0, 0, 0),
            seed: 7,
        };
        let (ep, link, client, joined_in) = join(&server, imp, "lossy").await;

        let got = snapshots_during(&client, Duration::from_secs(2)).await;
        let later = snapshots_during(&client, Duration::from_millis(500)).await;
        let st = client.stats();
        let l = link.stats();
        let rate = l.down.dropped as f64 / l.down.offered as f64;
        eprintln!(
            "20 % down-loss: joined in {:.0} ms, {got} snapshots in 2 s then {later} in 0.5 s, \
             down dropped {}/{} = {:.1} %, rtt {:.2} ms, missing baseline {}",
            ms(joined_in),
            l.down.dropped,
            l.down.offered,
            rate * 100.0,
            ms(client.connection().rtt()),
            st.session.missing_baseline,
        );
        assert!(client.is_connected());
        assert!(got > 40, "snapshots keep arriving: {got}");
        assert!(later > 5, "still arriving: {later}");
        assert!(l.down.offered > 100, "{l:?}");
        assert!((0.12..=0.28).contains(&rate), "drop rate {rate}");
        assert_eq!(l.up, Default::default(), "the up-link is not impaired");
        assert_eq!(st.session.decode_errors, 0);
        assert_eq!(
            st.session.missing_baseline, 0,
            "the server only deltas against acked views"
        );

        client.close().await;
        drop(ep);
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn jitter_and_duplication_are_survived() {
    bounded(async {
        let server = start(test_config());
        let imp = Impairment::symmetric(link(0.05, 0.1, 10, 20), 3);
        let (ep, link, client, joined_in) = join(&server, imp, "jittery").await;
        client.set_input(1.0, 0.0, 0.0, false);
        let got = snapshots_during(&client, Duration::from_secs(2)).await;
        let st = client.stats();
        let l = link.stats();
        eprintln!(
            "5 % loss, 10 % dup, 10+0..20 ms: joined in {:.0} ms, {got} snapshots in 2 s, rtt \
             {:.1} ms, duplicate parts {}, link {l:?}",
            ms(joined_in),
            ms(client.connection().rtt()),
            st.session.duplicate_parts,
        );
        assert!(client.is_connected());
        assert!(got > 40, "snapshots keep arriving: {got}");
        assert!(l.up.duplicated > 0 && l.down.duplicated > 0, "{l:?}");
        assert!(l.up.dropped > 0 && l.down.dropped > 0, "{l:?}");
        assert_eq!(st.session.decode_errors, 0);
        assert_eq!(
            st.session.duplicate_parts, 0,
            "QUIC discards duplicate packets"
        );
        assert!(server.server.stats().snapshot().input_datagrams > 20);

        client.close().await;
        drop(ep);
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn no_impairment_is_invisible_until_latency_is_turned_on() {
    bounded(async {
        let server = start(test_config());
        let (ep, link, client, joined_in) = join(&server, Impairment::default(), "clean").await;
        let got = snapshots_during(&client, Duration::from_secs(1)).await;
        let rtt = client.connection().rtt();
        let st = client.stats();
        let (p50, max) = (st.rtt_us.value_at_quantile(0.5), st.rtt_us.max());
        eprintln!(
            "no impairment: joined in {:.1} ms, rtt {:.3} ms, sampled p50 {:.3} ms max {:.3} ms, \
             {got} snapshots in 1 s",
            ms(joined_in),
            ms(rtt),
            p50 as f64 / 1e3,
            max as f64 / 1e3,
        );
        // quinn's estimate on loopback includes the peer's delayed ACKs (a few ms); the plain
        // socket shows the same.
        assert!(p50 < 20_000, "sampled RTT p50 {p50} us");
        assert!(got > 40, "{got}");
        assert_eq!(
            link.stats(),
            Default::default(),
            "a pass-through counts nothing"
        );

        // The same connection, now 50 ms each way.
        link.set_up(link_of(50)).unwrap();
        link.set_down(link_of(50)).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let rtt = client.connection().rtt();
        eprintln!("after turning on 50 ms each way: rtt {:.1} ms", ms(rtt));
        assert!(rtt >= Duration::from_millis(90), "{rtt:?}");
        assert!(client.is_connected());

        // The plain entry point works the same way.
        let plain = conditioned_endpoint(bind(), &server.trust, Impairment::default()).unwrap();
        let other = Client::connect(&plain, server.addr, "localhost", "plain")
            .await
            .unwrap();
        assert!(other.connection().rtt() < Duration::from_millis(20));

        other.close().await;
        client.close().await;
        drop((ep, plain));
        server.server.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn a_short_blackout_stops_everything_and_the_connection_survives_it() {
    bounded(async {
        let server = start(test_config());
        let imp = Impairment::symmetric(link_of(10), 21);
        // QUIC itself must carry the connection through (no resume: the client does not give up on
        // a silent path for 20 s here).
        let opts = quicktick_bot::ClientOptions {
            dead_after: Duration::from_secs(20),
            ..quicktick_bot::ClientOptions::default()
        };
        let (ep, link, client, _) = join_with(&server, imp, "tunnel", opts).await;
        let id = client.connection().stable_id();
        assert!(snapshots_during(&client, Duration::from_millis(500)).await > 15);

        link.blackout(true);
        // What was in flight may still land in the first few ms; after that, nothing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let during = snapshots_during(&client, Duration::from_millis(1500)).await;
        let cut = link.stats();
        link.blackout(false);
        // QUIC resumes at its next probe: the probe timeout kept doubling during the silence, so
        // this may take about as long as the blackout itself.
        let ended = Instant::now();
        let at_end = client.stats().session.snapshots;
        while client.stats().session.snapshots == at_end {
            assert!(
                ended.elapsed() < Duration::from_secs(8),
                "no snapshot after the blackout: {:?}",
                link.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let resumed_in = ended.elapsed();
        let after = snapshots_during(&client, Duration::from_secs(1)).await;
        let l = link.stats();
        eprintln!(
            "1.6 s blackout: {during} snapshots during, resumed {:.0} ms after it ended, then \
             {after} in 1 s, link {l:?}",
            ms(resumed_in)
        );
        assert_eq!(during, 0, "nothing gets through a blackout");
        assert!(cut.up.blackout > 0 && cut.down.blackout > 0, "{cut:?}");
        assert!(after > 20, "snapshots flow again: {after}");
        assert_eq!(l.up.blackout, cut.up.blackout, "nothing cut after it ends");
        assert_eq!(l.down.blackout, cut.down.blackout);
        assert_eq!(link.impairment().up, link_of(10), "the impairment is back");
        assert!(client.is_connected());
        assert_eq!(client.connection().stable_id(), id, "the same connection");

        client.close().await;
        drop(ep);
        server.server.shutdown().await;
    })
    .await;
}

fn link_of(latency_ms: u64) -> LinkConfig {
    link(0.0, 0.0, latency_ms, 0)
}

#[tokio::test]
async fn invalid_impairment_is_refused() {
    let server = start(test_config());
    let bad = Impairment::symmetric(link(1.5, 0.0, 0, 0), 1);
    assert!(conditioned_endpoint(bind(), &server.trust, bad).is_err());
    let bad = Impairment::symmetric(link(0.0, 0.0, 120_000, 0), 1);
    assert!(conditioned_endpoint(bind(), &server.trust, bad).is_err());
    assert!(conditioned_endpoint(bind(), &[], Impairment::default()).is_err());
    server.server.shutdown().await;
}

#[tokio::test]
async fn swarm_flags_condition_every_endpoint() {
    bounded(async {
        let server = start(test_config());
        let addr = server.addr.to_string();
        let cfg = SwarmConfig::try_parse_from([
            "quicktick-bot",
            "--server",
            &addr,
            "--cert",
            server.cert_path.to_str().unwrap(),
            "--bots",
            "4",
            "--bots-per-endpoint",
            "2",
            "--duration",
            "2",
            "--chat-every-secs",
            "0.5",
            "--loss",
            "10",
            "--latency-ms",
            "25",
            "--jitter-ms",
            "5",
            "--seed",
            "4",
        ])
        .unwrap();
        let t = Instant::now();
        let report = run(cfg, std::future::pending()).await.unwrap();
        eprintln!(
            "swarm 10 % loss, 25+0..5 ms each way: {:.1} s, bots {}/{}, rtt p50 {:.1} ms, {:.1} \
             snapshots/bot/s, chat sent {} missing {}",
            t.elapsed().as_secs_f64(),
            report.bots_connected,
            report.bots_requested,
            report.rtt_ms.p50,
            report.snapshots_per_bot_per_s,
            report.chat_sent,
            report.chat_missing,
        );
        assert_eq!(report.bots_connected, 4);
        assert_eq!(report.bots_connected_at_end, 4);
        assert!(report.rtt_ms.p50 >= 45.0, "{report:?}");
        assert!(report.snapshots_per_bot_per_s > 10.0, "{report:?}");
        assert!(report.chat_sent > 0);
        assert_eq!(report.chat_missing, 0, "chat is reliable over a lossy link");
        assert_eq!(report.decode_errors, 0);
        server.server.shutdown().await;
    })
    .await;
}
