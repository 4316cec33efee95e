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

/// Runs `command` to its end; its stdout, or a panic with its stderr if it failed.
fn succeeds(command: &mut Command) -> String {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn quick_start_send_listen_history() {
    let gw = Gateway::start(&[]);
    let alice = gw.token("alice");
    let bob = gw.token("bob");

    // Once the listener is logged in the message arrives live rather than through its login
    // sync; either way it must be printed exactly once.
    let (mut listen, lines) =
        spawn_logged_in(tern(&gw, &bob).args(["listen", "--count", "1", "--timeout", "20"]));
    std::thread::spawn(move || for _ in lines {});

    let ack = succeeds(tern(&gw, &alice).args(["send", "--to", "bob", "hello bob"]));
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

    let history = succeeds(tern(&gw, &bob).args(["history", "--with", "alice"]));
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

/// Spawns `tern` `command` with its output piped, and waits until it reports its login (a `#`
/// line on stderr); the child and the rest of its stderr.
fn spawn_logged_in(
    command: &mut Command,
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
) {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let logged_in = lines
        .by_ref()
        .take(20)
        .any(|l| l.unwrap_or_default().starts_with('#'));
    assert!(logged_in, "tern did not report its login");
    (child, lines)
}

/// The `seq=` word and the text of each line `tern` printed in the `listen` format.
fn seqs_and_texts(printed: &str) -> Vec<(&str, &str)> {
    printed
        .lines()
        .map(|l| {
            let seq = l
                .split_whitespace()
                .find(|w| w.starts_with("seq="))
                .unwrap();
            (seq, l.rsplit("text=").next().unwrap())
        })
        .collect()
}

/// `listen --recent` and `room --recent` print only the latest messages that came before them.
#[test]
fn recent_prints_only_the_latest_messages() {
    let gw = Gateway::start(&[]);
    let (alice, bob) = (gw.token("alice"), gw.token("bob"));
    for (flag, target) in [("--to", "bob"), ("--room", "live")] {
        for i in 1..=4 {
            succeeds(tern(&gw, &alice).args(["send", flag, target, &format!("m{i}")]));
        }
    }
    for command in [&["listen"][..], &["room", "live"]] {
        let mut args = command.to_vec();
        args.extend(["--recent", "2", "--count", "2", "--timeout", "20"]);
        let printed = succeeds(tern(&gw, &bob).args(&args));
        assert_eq!(
            seqs_and_texts(&printed),
            [("seq=3", "m3"), ("seq=4", "m4")],
            "{command:?}: {printed}"
        );
    }
}

/// Runs the README's quick-start block itself (with a free port and a temporary directory in
/// place of 7600 and ./demo), so the README cannot drift from what works.
#[test]
fn readme_quick_start_runs_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("## Quick start")
        .nth(1)
        .expect("quick start section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("sh block");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let script = block
        .lines()
        .filter(|l| !l.starts_with("export PATH="))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("127.0.0.1:7600", &format!("127.0.0.1:{port}"))
        .replace("./demo", &dir.path().join("demo").display().to_string());
    // The listener runs in the background; give it until it printed one line, then stop all.
    let listen_out = dir.path().join("listen.out");
    let script = script.replace("listen &", &format!("listen > {} &", listen_out.display()));
    let (stdout, stderr) = run_script(&script, &listen_out, "text=hello bob");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}\n{stderr}");
    assert!(
        lines[0].starts_with("sent conversation=") && lines[0].contains(" seq=1 "),
        "{stdout}"
    );
    assert!(
        lines[1].contains(" seq=1 from=alice ") && lines[1].ends_with("text=hello bob"),
        "{stdout}"
    );
    let listened = std::fs::read_to_string(&listen_out).unwrap();
    assert_eq!(listened.lines().count(), 1, "{listened}\n{stderr}");
    assert!(
        listened.contains(" seq=1 from=alice ") && listened.trim_end().ends_with("text=hello bob")
    );
}

/// Runs the README's QUIC and dual-channel block as written (free ports and a temporary directory in place of
/// 7600/7601 and ./demo), with the tokens minted as the first block mints them.
#[test]
fn readme_quic_quick_start_runs_as_written() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme
        .split("## Quick start")
        .nth(1)
        .expect("quick start section");
    let blocks: Vec<&str> = section
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    let tokens: Vec<&str> = blocks[0]
        .lines()
        .filter(|l| l.starts_with("ALICE=") || l.starts_with("BOB="))
        .collect();
    let quic_block = blocks
        .iter()
        .find(|b| b.contains("--transport quic"))
        .expect("a QUIC block");
    let tcp = tern_tests::free_port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo").display().to_string();
    let listen_out = dir.path().join("listen.out");
    let mut lines: Vec<String> = quic_block.lines().map(str::to_string).collect();
    // The gateway starts first; the tokens need its data directory.
    lines.splice(1..1, tokens.iter().map(|t| t.to_string()));
    let script = lines
        .join("\n")
        .replace("127.0.0.1:7600", &format!("127.0.0.1:{tcp}"))
        .replace("127.0.0.1:7601", &format!("127.0.0.1:{udp}"))
        .replace("./demo", &demo)
        .replace("listen &", &format!("listen > {} &", listen_out.display()));
    // Nothing waits for the gateway: minting a token creates or reads the same secret, and
    // `tern` waits for the certificate file and the port (`--wait`, here TERN_WAIT).
    let (stdout, stderr) = run_script(&script, &listen_out, "text=over both paths");
    let sent: Vec<&str> = stdout.lines().collect();
    assert_eq!(sent.len(), 2, "{stdout}\n{stderr}");
    for (line, seq) in sent.iter().zip([" seq=1 ", " seq=2 "]) {
        assert!(
            line.starts_with("sent conversation=") && line.contains(seq),
            "{stdout}"
        );
    }
    // The dual send was stored once (seq 2) and reached the listener once.
    let listened = std::fs::read_to_string(&listen_out).unwrap();
    let got: Vec<&str> = listened.lines().collect();
    assert_eq!(
        got.len(),
        2,
        "the listener printed:\n{listened}\nthe script's stderr:\n{stderr}"
    );
    assert!(
        got[0].contains(" seq=1 from=alice ") && got[0].ends_with("text=over QUIC"),
        "{listened}"
    );
    assert!(
        got[1].contains(" seq=2 from=alice ") && got[1].ends_with("text=over both paths"),
        "{listened}"
    );
}

/// Runs a README block with bash, the built binaries first on PATH. The block starts a gateway
/// and a listener in the background (`%1`, `%2`); once the listener's output (`listen_out`)
/// shows `wait_for` (bounded: 400 × 50 ms), both are stopped. Returns stdout and stderr (the
/// gateway's log and the listener's messages, for the callers' failure messages); panics if
/// the script failed.
fn run_script(script: &str, listen_out: &std::path::Path, wait_for: &str) -> (String, String) {
    let bin_dir = binary("tern").parent().unwrap().to_path_buf();
    let script = format!(
        "set -e\n{script}\nfor i in $(seq 1 400); do grep -q '{wait_for}' \"$LISTEN_OUT\" && break; \
         sleep 0.05; done\nkill %2 %1\nwait || true\n"
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .env("LISTEN_OUT", listen_out)
        // The gateway starts in the background: on a loaded machine it may take longer than
        // the client's default 5 s of retrying a refused connection.
        .env("TERN_WAIT", "60")
        // The admin API on any free port: other tests may run a README gateway at the same time.
        .env("TERN_API", "127.0.0.1:0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

/// `tern listen --token-command` stays logged in past the expiry of each token: it runs the
/// command again before each token expires (here every second, for tokens of 2 s).
#[test]
fn listen_with_a_token_command_outlives_its_tokens() {
    let gw = Gateway::start(&["--cores", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let calls = dir.path().join("calls");
    let command = format!(
        "echo x >> '{}' && '{}' token --data-dir '{}' --user bob --ttl 2s",
        calls.display(),
        binary("tern-gateway").display(),
        gw.data_dir.display()
    );
    let (mut listen, lines) = spawn_logged_in(
        Command::new(binary("tern"))
            .arg("--server")
            .arg(gw.addr.to_string())
            .arg("--token-command")
            .arg(&command)
            .args(["listen", "--count", "2", "--timeout", "30"]),
    );
    let errors = std::thread::spawn(move || {
        lines
            .map_while(Result::ok)
            .filter(|l| {
                !l.starts_with('#')
                    || ["disconnected", "reconnected", "kicked"]
                        .iter()
                        .any(|w| l.contains(w))
            })
            .collect::<Vec<_>>()
    });
    let alice = gw.token("alice");
    succeeds(tern(&gw, &alice).args(["send", "--to", "bob", "before"]));
    // The fourth token is fetched at least 1.5 s after the first, which has expired by then.
    let started = std::time::Instant::now();
    let count = || {
        std::fs::read_to_string(&calls)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    while count() < 4 {
        assert!(
            started.elapsed() < WAIT,
            "the token command ran {} times",
            count()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    succeeds(tern(&gw, &alice).args(["send", "--to", "bob", "after"]));
    let status = wait_child(&mut listen, WAIT).expect("listen exits after two messages");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut listen.stdout.take().unwrap(), &mut printed).unwrap();
    assert!(status.success(), "{printed}");
    assert_eq!(
        seqs_and_texts(&printed),
        [("seq=1", "before"), ("seq=2", "after")]
    );
    // Never kicked or reconnected: the same session all along.
    assert_eq!(errors.join().unwrap(), Vec::<String>::new());
}
