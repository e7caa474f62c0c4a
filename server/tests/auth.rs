//! Connect tokens over real QUIC: with `auth = required` only tokens signed with the server's secret,
//! unexpired and unused, admit a player (with the token's name); every other case is refused with
//! its own reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{raw_endpoint, start, test_config, RawClient};
use quicktick_server::auth::{issue, TokenBody};
use quicktick_server::config::AuthMode;
use quicktick_server::ServerConfig;
use quicktick_shared::wire::{close, ClientMsg, RefuseReason, ServerMsg, PROTOCOL_VERSION};

const SECRET: [u8; 32] = [0x5a; 32];

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(secret: &[u8], name: &str, expires: u64, nonce: u8) -> String {
    issue(
        secret,
        &TokenBody {
            player_id: 7,
            name: name.into(),
            expires_unix: expires,
            nonce: [nonce; 16],
        },
    )
}

async fn hello(
    ep: &quinn::Endpoint,
    addr: std::net::SocketAddr,
    token: Option<String>,
) -> ServerMsg {
    let mut c = RawClient::connect(ep, addr).await;
    c.send_msg(&ClientMsg::Hello {
        version: PROTOCOL_VERSION,
        name: "ignored".into(),
        token,
    })
    .await;
    let m = c.next_msg().await.expect("no answer");
    if let ServerMsg::Refused { .. } = m {
        assert_eq!(
            c.closed().await.map(|c| c.0),
            Some(u64::from(close::REFUSED))
        );
    } else {
        std::mem::forget(c); // keep the player connected for the rest of the test
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_joins_with_one_token_per_bot_and_reports_refusals() {
    use clap::Parser;
    let dir = std::env::temp_dir().join(format!("qt-auth-swarm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret.hex");
    let hex: String = SECRET.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&secret_file, hex).unwrap();
    let ts = start(ServerConfig {
        auth: AuthMode::Required,
        auth_secret_file: Some(secret_file),
        ..test_config()
    });
    // Three good tokens (distinct accounts) and one signed with another secret.
    let mut lines: Vec<String> = (0..3u8)
        .map(|i| {
            issue(
                &SECRET,
                &TokenBody {
                    player_id: 100 + u64::from(i),
                    name: format!("tok{i}"),
                    expires_unix: now() + 600,
                    nonce: [i + 40; 16],
                },
            )
        })
        .collect();
    lines.push(token(&[0x11; 32], "forged", now() + 600, 9));
    let tokens = dir.join("tokens.txt");
    std::fs::write(&tokens, lines.join("\n")).unwrap();
    let addr = ts.addr.to_string();
    let cert = ts.cert_path.display().to_string();
    let tokens_arg = tokens.display().to_string();
    let cfg = quicktick_bot::swarm::SwarmConfig::parse_from([
        "quicktick-bot",
        "--server",
        &addr,
        "--cert",
        &cert,
        "--bots",
        "4",
        "--duration",
        "2",
        "--tokens-file",
        &tokens_arg,
    ]);
    let report = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        quicktick_bot::swarm::run(cfg, std::future::pending()),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.bots_connected, 3);
    assert_eq!(
        report.token_refusals, 1,
        "{:?}",
        report.connect_error_messages
    );
    assert_eq!(report.presence_mismatches, 0);
    // Too few tokens for the bots asked for: refused before connecting.
    let cfg = quicktick_bot::swarm::SwarmConfig::parse_from([
        "quicktick-bot",
        "--server",
        &addr,
        "--cert",
        &cert,
        "--bots",
        "5",
        "--tokens-file",
        &tokens_arg,
    ]);
    let err = quicktick_bot::swarm::run(cfg, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("4 tokens for 5 bots"), "{err}");
    ts.server.shutdown().await;
}

#[tokio::test]
async fn only_signed_unexpired_unused_tokens_admit() {
    let dir = std::env::temp_dir().join(format!("qt-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret_file = dir.join("secret.hex");
    std::fs::write(
        &secret_file,
        SECRET
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
    .unwrap();
    let cfg = ServerConfig {
        auth: AuthMode::Required,
        auth_secret_file: Some(secret_file),
        ..test_config()
    };
    let ts = start(cfg);
    let ep = raw_endpoint(&ts.trust);

    let good = token(&SECRET, "alice", now() + 3600, 1);
    match hello(&ep, ts.addr, Some(good.clone())).await {
        ServerMsg::Welcome(w) => {
            let me = w.players.iter().find(|p| p.id == w.player_id).unwrap();
            assert_eq!(me.name, "alice", "the token's name is used");
        }
        other => panic!("valid token refused: {other:?}"),
    }
    let cases = [
        (None, RefuseReason::TokenRequired),
        (
            Some(token(&[1u8; 32], "mallory", now() + 3600, 2)),
            RefuseReason::TokenInvalid,
        ),
        (
            Some(good.replace("qt1.", "qt1.00")),
            RefuseReason::TokenInvalid,
        ),
        (
            Some(token(&SECRET, "late", now() - 1, 3)),
            RefuseReason::TokenExpired,
        ),
        (Some(good), RefuseReason::TokenReplayed),
    ];
    for (t, want) in cases {
        match hello(&ep, ts.addr, t).await {
            ServerMsg::Refused { reason, detail } => assert_eq!(reason, want, "{detail}"),
            other => panic!("expected {want:?}, got {other:?}"),
        }
    }
    let s = ts.server.shutdown().await;
    assert_eq!(s.refusals, 5);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn required_auth_without_a_secret_does_not_start() {
    let cfg = ServerConfig {
        auth: AuthMode::Required,
        ..test_config()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = std::env::temp_dir().join(format!("qt-auth-nosecret-{}", std::process::id()));
        let cert = quicktick_server::tls::load_or_create_dev_cert(&dir).unwrap();
        let ep = quicktick_server::net::server_endpoint("127.0.0.1:0".parse().unwrap(), cert, &cfg)
            .unwrap();
        let map = cfg.load_map().unwrap();
        let e = quicktick_server::Server::start(ep, cfg, map)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("auth_secret_file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

#[test]
fn auto_auth_is_dev_on_loopback_and_required_elsewhere() {
    let lo = ServerConfig::default();
    assert_eq!(lo.effective_auth(), AuthMode::Dev);
    let wide = ServerConfig {
        bind: "0.0.0.0:4433".parse().unwrap(),
        ..ServerConfig::default()
    };
    assert_eq!(wide.effective_auth(), AuthMode::Required);
}
