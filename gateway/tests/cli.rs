//! The `tern-gateway` command line: token minting and start-up errors that name the problem.

use std::process::Command;

fn gateway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern-gateway"));
    // The admin API on any free port, so tests running side by side do not meet on its default.
    c.env("TERN_API", "127.0.0.1:0");
    c
}

#[test]
fn token_is_minted_with_the_persisted_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway()
        .args(["token", "--user", "alice", "--ttl", "2h", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let secret = std::fs::read_to_string(dir.path().join("secret")).unwrap();
    let claims = tern_gateway::token::verify(
        &tern_gateway::token::Secret::new(secret.trim().as_bytes().to_vec()),
        &token,
        tern_gateway::token::now_secs(),
    )
    .unwrap();
    assert_eq!(claims.sub, "alice");
    let ttl = claims.exp - tern_gateway::token::now_secs();
    assert!((7190..=7200).contains(&ttl), "{ttl}");
}

#[test]
fn bad_user_and_bad_config_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway()
        .args(["token", "--user", "", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--user"));

    let cfg = dir.path().join("tern.toml");
    std::fs::write(&cfg, "max_frame_bytes = 10\n").unwrap();
    let out = gateway().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`max_frame_bytes`"), "{err}");

    std::fs::write(&cfg, "no_such_option = true\n").unwrap();
    let out = gateway().arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no_such_option"), "{err}");
}

#[test]
fn port_in_use_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let out = gateway()
        .args(["--tcp", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn missing_locked_memory_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -l 0 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_tern-gateway"))
        .args(["--tcp", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot start the I/O executor"), "{err}");
    assert!(err.contains("ulimit -l"), "{err}");
}
