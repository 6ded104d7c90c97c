//! The command line: help for every scenario, and bad arguments refused with a message that
//! names the problem (the scenarios themselves are exercised against real servers by
//! tests/loadgen/test_scenarios.py).

use std::process::{Command, Output};

fn loadgen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gale-loadgen")).args(args).output().expect("run gale-loadgen")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_scenario_has_help() {
    for scenario in ["connect", "echo", "fanout", "compare", "storm"] {
        let o = loadgen(&[scenario, "--help"]);
        assert!(o.status.success(), "{scenario} --help");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("--json"), "{scenario} help lists --json");
    }
}

#[test]
fn bad_arguments_are_named() {
    let cases: &[(&[&str], &str)] = &[
        (&["echo", "--url", "http://127.0.0.1:1/"], "ws://"),
        (&["echo", "--url", "ws://127.0.0.1:1/", "--connections", "0"], "--connections"),
        (&["echo", "--url", "ws://127.0.0.1:1/", "--pipeline", "0"], "--pipeline"),
        (&["echo", "--url", "ws://127.0.0.1:1/", "--duration", "0"], "--duration"),
        (&["echo", "--url", "ws://127.0.0.1:1/", "--rate", "0"], "--rate"),
        (&["echo", "--url", "ws://192.0.2.1:1/", "--source-ips", "2"], "--source-ips"),
        (&["connect", "--url", "ws://127.0.0.1:1/", "--procs", "0"], "--procs"),
        (&["fanout", "--url", "ws://127.0.0.1:1/", "--size", "8"], "--size"),
        (&["compare", "--server", "nocommand"], "NAME=COMMAND"),
        (&["echo", "--url", "ws://127.0.0.1:1/", "--connections", "many"], "--connections"),
        (&["storm"], "--url"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "--connections", "0"], "--connections"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "--topics", "0"], "--topics"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "--rate", "0"], "--rate"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "--deadline", "0"], "--deadline"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "--cut", "restart"], "--server-cmd"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "--cut", "sideways"], "--cut"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "-c", "100000000"], "--procs"),
        (&["storm", "--url", "http://127.0.0.1:1/ws"], "ws://"),
        (&["storm", "--url", "ws://127.0.0.1:1/ws", "--publish-url", "ftp://x"], "--publish-url"),
        (
            &["echo", "--url", "ws://127.0.0.1:1/", "--p99-target", "0"],
            "--p99-target must be a positive number of milliseconds",
        ),
        (&["echo", "--url", "ws://127.0.0.1:1/", "--p99-target=-1"], "--p99-target"),
        (&["echo", "--url", "ws://127.0.0.1:1/", "--p99-target", "5", "--max-rate", "10"], "--max-rate"),
        (
            &["echo", "--url", "ws://127.0.0.1:1/", "--p99-target", "5", "--step-duration", "0"],
            "--step-duration",
        ),
        (&["fanout", "--url", "ws://127.0.0.1:1/", "--p99-target", "5", "--max-steps", "0"], "--max-steps"),
        (&["fanout", "--url", "ws://127.0.0.1:1/", "--p99-target", "5", "--precision", "0"], "--precision"),
        (&["compare", "--server", "a=x", "--p99-target", "0"], "--p99-target"),
        (&["compare", "--server", "a=x", "--scenario", "connect", "--p99-target", "5"], "not connect"),
    ];
    for (args, named) in cases {
        let o = loadgen(args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(stderr(&o).contains(named), "{args:?}: stderr should name {named}: {}", stderr(&o));
    }
}

#[test]
fn rate_search_is_offered_where_a_rate_is() {
    for scenario in ["echo", "fanout", "compare"] {
        let o = loadgen(&[scenario, "--help"]);
        let text = String::from_utf8_lossy(&o.stdout);
        for option in ["--p99-target", "--step-duration", "--max-steps", "--max-rate", "--precision"] {
            assert!(text.contains(option), "{scenario} help lists {option}");
        }
    }
}

#[test]
fn a_rate_search_against_nothing_fails_in_one_line() {
    let o =
        loadgen(&["echo", "--url", "ws://127.0.0.1:1/", "-c", "2", "--p99-target", "5", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.starts_with("gale-loadgen: cannot reach ws://127.0.0.1:1/"), "{e}");
}

#[test]
fn unreachable_server_is_reported_with_its_cause() {
    // Port 1 on loopback: nothing listens there.
    let o = loadgen(&["echo", "--url", "ws://127.0.0.1:1/", "-c", "3", "-d", "0.5", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("cannot reach ws://127.0.0.1:1/") && e.contains("refused"), "{e}");
}

#[test]
fn connect_to_a_dead_port_reports_causes_in_words() {
    let o = loadgen(&["connect", "--url", "ws://127.0.0.1:1/", "-c", "2", "--hold", "0.2", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("failed: connection refused ×2"), "{out}");
    // No Rust debug formatting: enum names, empty maps, quoted strings.
    for leak in ["Refused", "{}", "{", "\""] {
        assert!(!out.contains(leak), "summary shows {leak:?}: {out}");
    }
    assert_eq!(
        stderr(&o),
        "gale-loadgen: cannot reach ws://127.0.0.1:1/: 0 of 2 connections opened: connection refused ×2\n"
    );
}

#[test]
fn a_server_that_cannot_start_fails_the_comparison_in_one_line() {
    let o =
        loadgen(&["compare", "--server", "x=/nonexistent/bin --port {port}", "-d", "0.5", "--rounds", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    // Progress lines, then the verdict; nothing from the shell or from `kill`.
    let lines: Vec<&str> = e.lines().collect();
    assert_eq!(
        lines,
        [
            "[1/2] x — echo 100 conn, 20 B, pipeline 1 (round 1)",
            "[2/2] x — echo 100 conn, 20 B, pipeline 1 (round 2)",
            "gale-loadgen: x: 2 of 2 runs failed: `/nonexistent/bin --port {port}` exited at start: command not \
             found (exit status 127)",
        ],
        "{e}"
    );
    // The table shows no figures for it, not zeros.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| x | - | - | - |"), "{out}");
}

#[test]
fn a_storm_against_nothing_names_the_cause() {
    let o = loadgen(&["storm", "--url", "ws://127.0.0.1:1/ws", "-c", "3", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "gale-loadgen: cannot reach ws://127.0.0.1:1/ws: 0 of 3 connections opened: connection refused ×3\n"
    );
}

#[test]
fn a_storm_server_that_cannot_start_is_named() {
    let o = loadgen(&["storm", "--cut", "restart", "--server-cmd", "/nonexistent/gale serve --port {port}"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("/nonexistent/gale serve --port {port}") && e.contains("command not found"), "{e}");
}
