//! `deploy/` stays in step with the code: the Agones manifests parse, their health settings equal the
//! server's health ping constants, the ports agree with the Dockerfile, the grace period outlasts the
//! drain, and the image runs as a non-root user. (Docker itself does not run in CI.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use quicktick_server::agones::{
    HEALTH_FAILURE_THRESHOLD, HEALTH_INITIAL_DELAY_SECS, HEALTH_PERIOD_SECS,
};
use serde_yaml::Value;

fn read(rel: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn int(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a number: {v:?}"))
}

/// Checks a GameServer spec (the Fleet's template spec or a GameServer's spec).
fn check_game_server_spec(spec: &Value, file: &str) {
    let h = &spec["health"];
    assert_eq!(h["disabled"].as_bool(), Some(false), "{file}");
    assert_eq!(
        int(&h["periodSeconds"], "periodSeconds"),
        HEALTH_PERIOD_SECS,
        "{file}"
    );
    assert_eq!(
        int(&h["failureThreshold"], "failureThreshold"),
        HEALTH_FAILURE_THRESHOLD,
        "{file}"
    );
    assert_eq!(
        int(&h["initialDelaySeconds"], "initialDelaySeconds"),
        HEALTH_INITIAL_DELAY_SECS,
        "{file}"
    );
    let port = &spec["ports"][0];
    assert_eq!(port["protocol"].as_str(), Some("UDP"), "{file}");
    let container_port = int(&port["containerPort"], "containerPort");
    assert!(
        read("deploy/Dockerfile").contains(&format!("EXPOSE {container_port}/udp")),
        "{file}: the Dockerfile exposes another port"
    );
    let pod = &spec["template"]["spec"];
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_sequence()
        .expect("container args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    let after = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1))
            .copied()
            .unwrap_or_else(|| panic!("{file}: no {flag}"))
    };
    assert_eq!(
        after("--bind"),
        format!("0.0.0.0:{container_port}"),
        "{file}"
    );
    let drain: u64 = after("--drain-secs").parse().unwrap();
    let grace = int(&pod["terminationGracePeriodSeconds"], "grace period");
    assert!(
        grace > drain,
        "{file}: grace {grace} s must outlast the drain {drain} s"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
}

#[test]
fn fleet_and_gameserver_match_the_code() {
    let fleet = yaml("deploy/agones/fleet.yaml");
    assert_eq!(fleet["kind"].as_str(), Some("Fleet"));
    assert_eq!(fleet["apiVersion"].as_str(), Some("agones.dev/v1"));
    check_game_server_spec(&fleet["spec"]["template"]["spec"], "fleet.yaml");
    let gs = yaml("deploy/agones/gameserver.yaml");
    assert_eq!(gs["kind"].as_str(), Some("GameServer"));
    check_game_server_spec(&gs["spec"], "gameserver.yaml");
}

#[test]
fn dockerfile_is_multi_stage_and_runs_as_non_root() {
    let d = read("deploy/Dockerfile");
    assert!(d.contains(" AS builder"), "multi-stage");
    assert!(d.contains("FROM debian:bookworm-slim"));
    assert!(d.contains("--features agones"));
    let user = d
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
}
