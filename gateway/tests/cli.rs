//! The `tern-gateway` command line: token minting, start-up errors that name the problem, and
//! what the process sets up for itself (huge pages).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn gateway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern-gateway"));
    // The admin API on any free port, so tests running side by side do not meet on its default.
    c.env("TERN_API", "127.0.0.1:0");
    c
}

/// The command's stderr, after checking that it refused its arguments (exit status 2).
fn refused(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The token `tern-gateway token` printed; panics with its stderr if it failed.
fn minted(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn verify(
    secret: &str,
    token: &str,
) -> Result<tern_gateway::token::Claims, tern_gateway::token::TokenError> {
    tern_gateway::token::verify(
        &tern_gateway::token::Secret::new(secret.as_bytes().to_vec()),
        token,
        tern_gateway::token::now_secs(),
    )
}

#[test]
fn token_is_minted_with_the_persisted_secret() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway()
        .args(["token", "--user", "alice", "--ttl", "2h", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let token = minted(out);
    let secret = std::fs::read_to_string(dir.path().join("secret")).unwrap();
    let claims = verify(secret.trim(), &token).unwrap();
    assert_eq!(claims.sub, "alice");
    let ttl = claims.exp - tern_gateway::token::now_secs();
    assert!((7190..=7200).contains(&ttl), "{ttl}");
}

#[test]
fn bad_user_and_bad_config_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused(
        gateway()
            .args(["token", "--user", "", "--data-dir"])
            .arg(dir.path()),
    );
    assert!(err.contains("--user"), "{err}");

    let cfg = dir.path().join("tern.toml");
    std::fs::write(&cfg, "max_frame_bytes = 10\n").unwrap();
    let err = refused(gateway().arg("--config").arg(&cfg));
    assert!(err.contains("`max_frame_bytes`"), "{err}");

    std::fs::write(&cfg, "no_such_option = true\n").unwrap();
    let err = refused(gateway().arg("--config").arg(&cfg));
    assert!(err.contains("no_such_option"), "{err}");

    // The same mistakes through --set and TERN_SET name the setting (`token` reads the
    // configuration as the server does, and exits).
    let token = ["token", "--user", "alice", "--data-dir"];
    let err = refused(
        gateway()
            .args(token)
            .arg(dir.path())
            .args(["--set", "max_frame_bytes=10"]),
    );
    assert!(err.contains("`max_frame_bytes`"), "{err}");
    let err = refused(
        gateway()
            .env("TERN_SET", "cores=1;;no_such_option=1")
            .args(token)
            .arg(dir.path()),
    );
    assert!(err.contains("invalid --set \"no_such_option=1\""), "{err}");
}

/// TERN_SET and --set add up (empty entries skipped), --set winning for a key both set, and the
/// token is signed with the secret they give.
#[test]
fn settings_from_the_environment_and_flags_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let from_env = "e".repeat(40);
    let from_flag = "f".repeat(40);
    let out = gateway()
        .env("TERN_SET", format!("secret={from_env}; ;cores=1;"))
        .args(["token", "--user", "alice", "--data-dir"])
        .arg(dir.path())
        .args(["--set", &format!("secret = {from_flag} ")])
        .output()
        .unwrap();
    let token = minted(out);
    assert_eq!(verify(&from_flag, &token).unwrap().sub, "alice");
    assert!(verify(&from_env, &token).is_err());
    // Nothing was written: the configured secret is used, not the data directory's.
    assert!(!dir.path().join("secret").exists());
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

/// The `THP_enabled` line of /proc/PID/status of a gateway started with `config`, read once it
/// listens.
fn huge_pages_of_a_running_gateway(config: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tern.toml");
    std::fs::write(&file, config).unwrap();
    let mut child = gateway()
        .args(["--tcp", "127.0.0.1:0", "--cores", "1", "--config"])
        .arg(&file)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    let mut started = false;
    for line in stderr.lines().map_while(Result::ok) {
        started = line.starts_with("tern-gateway listening on");
        seen.push(line);
        if started {
            break;
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(started, "the gateway did not start: {seen:?}");
    status
        .unwrap()
        .lines()
        .find(|l| l.starts_with("THP_enabled:"))
        .expect("a kernel that reports THP_enabled (5.0 or later)")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn transparent_huge_pages_are_off_unless_configured() {
    assert_eq!(huge_pages_of_a_running_gateway(""), "THP_enabled: 0");
    // A kernel built without huge pages reports 0 whatever the process asks for.
    if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
        return;
    }
    assert_eq!(
        huge_pages_of_a_running_gateway("transparent_huge_pages = true\n"),
        "THP_enabled: 1"
    );
}
