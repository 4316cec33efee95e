//! The one-line text formats the `tern` CLI prints, so scripts (and tests) can rely on them.
//!
//! A message: `conversation=<id> seq=<n> from=<sender> time=<ms> text=<text>`. The text is the
//! payload as UTF-8 and runs to the end of the line; backslashes and control characters in it
//! are escaped (`\\`, `\n`, `\r`, `\t`, `\u{1b}`) so a message is always one line. A payload that
//! is not valid UTF-8 is printed as `hex=<lowercase hex>` instead of `text=`.

use std::fmt::Write;

use tern_protocol::{Deliver, SendAck};

use crate::ClientError;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `text` with backslashes and control characters escaped, so it fits on one line.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The line for one message.
pub fn message(m: &Deliver) -> String {
    let body = match std::str::from_utf8(&m.payload) {
        Ok(text) => format!("text={}", escape(text)),
        Err(_) => format!("hex={}", hex(&m.payload)),
    };
    format!(
        "conversation={} seq={} from={} time={} {body}",
        m.conversation_id, m.seq, m.sender, m.server_time_ms
    )
}

/// The line for a SendAck: `sent conversation=<id> seq=<n> time=<ms>`, plus ` duplicate=true`
/// when the server had the message already.
pub fn send_ack(ack: &SendAck) -> String {
    let mut line = format!(
        "sent conversation={} seq={} time={}",
        ack.conversation_id, ack.seq, ack.server_time_ms
    );
    if ack.duplicate {
        line.push_str(" duplicate=true");
    }
    line
}

/// The line for an error: `error: <CODE_NAME> (<number>): <message>` for a server error,
/// `error: <description>` otherwise.
pub fn error(e: &ClientError) -> String {
    match e {
        ClientError::Server { code, message } => {
            format!("error: {} ({}): {message}", code.name(), code.number())
        }
        other => format!("error: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tern_protocol::{ErrorCode, Target};

    use super::*;

    fn deliver(payload: &'static [u8]) -> Deliver {
        Deliver {
            conversation_id: 123,
            seq: 4,
            sender: "alice".into(),
            target: Some(Target::user("alice")),
            server_time_ms: 1_732_233_600_000,
            client_msg_id: "x".into(),
            content_type: 1,
            custom_type: String::new(),
            payload: Bytes::from_static(payload),
        }
    }

    #[test]
    fn message_line() {
        assert_eq!(
            message(&deliver(b"hello bob")),
            "conversation=123 seq=4 from=alice time=1732233600000 text=hello bob"
        );
    }

    #[test]
    fn message_line_stays_on_one_line() {
        assert_eq!(
            message(&deliver("a\nb\\c\t\u{1b}é".as_bytes())),
            "conversation=123 seq=4 from=alice time=1732233600000 text=a\\nb\\\\c\\t\\u{1b}é"
        );
    }

    #[test]
    fn binary_payload_is_hex() {
        assert_eq!(
            message(&deliver(&[0xff, 0x00, 0x41])),
            "conversation=123 seq=4 from=alice time=1732233600000 hex=ff0041"
        );
    }

    #[test]
    fn send_ack_line() {
        let mut ack = SendAck {
            client_msg_id: "x".into(),
            conversation_id: 123,
            seq: 1,
            server_time_ms: 1_732_233_600_000,
            duplicate: false,
        };
        assert_eq!(
            send_ack(&ack),
            "sent conversation=123 seq=1 time=1732233600000"
        );
        ack.duplicate = true;
        assert_eq!(
            send_ack(&ack),
            "sent conversation=123 seq=1 time=1732233600000 duplicate=true"
        );
    }

    #[test]
    fn error_line() {
        let e = ClientError::Server {
            code: ErrorCode::NotFound,
            message: "no user bob".into(),
        };
        assert_eq!(error(&e), "error: NOT_FOUND (3003): no user bob");
        assert_eq!(
            error(&ClientError::Disconnected),
            "error: disconnected from the server"
        );
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 1, 0xab]), "0001ab");
    }
}
