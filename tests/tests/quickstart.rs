//! The README's quick start, run with the real `tern-gateway` and `tern` binaries.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use tern_tests::{Gateway, WAIT, binary, wait_child};

fn tern(gw: &Gateway, token: &str) -> Command {
    let mut c = Command::new(binary("tern"));
    c.arg("--server")
        .arg(gw.addr.to_string())
        .arg("--token")
        .arg(token);
    c
}

#[test]
fn quick_start_send_listen_history() {
    let gw = Gateway::start(&[]);
    let alice = gw.token("alice");
    let bob = gw.token("bob");

    let mut listen = tern(&gw, &bob)
        .args(["listen", "--count", "1", "--timeout", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the listener is logged in (it reports that on stderr) so the message arrives
    // live rather than through its login sync; either way it must be printed exactly once.
    let stderr = listen.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let logged_in = lines
        .by_ref()
        .take(20)
        .any(|l| l.unwrap_or_default().starts_with('#'));
    assert!(logged_in, "listen did not report its login");
    std::thread::spawn(move || for _ in lines {});

    let out = tern(&gw, &alice)
        .args(["send", "--to", "bob", "hello bob"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack = String::from_utf8(out.stdout).unwrap();
    assert!(ack.starts_with("sent conversation="), "{ack}");
    assert!(ack.contains(" seq=1 "), "{ack}");
    let conv = ack
        .split_whitespace()
        .find_map(|w| w.strip_prefix("conversation="))
        .unwrap()
        .to_string();

    let status = wait_child(&mut listen, WAIT).expect("listen exits after one message");
    assert!(status.success());
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut listen.stdout.take().unwrap(), &mut printed).unwrap();
    let line = printed.lines().next().expect("one line");
    assert!(
        line.starts_with(&format!("conversation={conv} seq=1 from=alice time=")),
        "{line}"
    );
    assert!(line.ends_with(" text=hello bob"), "{line}");

    let out = tern(&gw, &bob)
        .args(["history", "--with", "alice"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 1, "{history}");
    assert!(
        lines[0].starts_with(&format!("conversation={conv} seq=1 from=alice ")),
        "{history}"
    );
    assert!(lines[0].ends_with("text=hello bob"));

    // A server error is printed with its code name and the exit status is 1.
    let out = tern(&gw, &bob)
        .args(["history", "--with", "nobody-here"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("NOT_FOUND (3003)"), "{err}");
}
