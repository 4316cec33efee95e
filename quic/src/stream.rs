//! Byte streams: [`RecvStream`] implements `AsyncRead`, [`SendStream`] implements `AsyncWrite`.
//! Both read and write quinn-proto's stream buffers directly; the connection's driver task does
//! the sending.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use quinn_proto::{ConnectionError, FinishError, ReadError, ReadableError, StreamId, VarInt};

use crate::connection::ConnectionRef;

/// The receiving half of a stream. Reading returns `Ok(0)` once the peer finished the stream.
///
/// Dropping it before the end asks the peer to stop sending (STOP_SENDING, code 0).
pub struct RecvStream {
    conn: ConnectionRef,
    id: StreamId,
    /// The end was reached or the stream was reset or stopped: nothing left to stop on drop.
    done: bool,
}

/// The sending half of a stream. A write copies into quinn-proto's send buffer and returns;
/// when flow control or the connection's send window is exhausted it waits, so a writer can
/// never queue more than that window. `close` finishes the stream (FIN) without waiting for
/// the peer's acknowledgement.
///
/// Dropping it without closing finishes the stream, as in quinn.
pub struct SendStream {
    conn: ConnectionRef,
    id: StreamId,
    /// Finished or reset: nothing left to do on drop.
    done: bool,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvStream").field("id", &self.id).finish()
    }
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendStream").field("id", &self.id).finish()
    }
}

/// The error a stream operation reports once its connection has ended.
pub(crate) fn connection_error(e: &ConnectionError) -> io::Error {
    let kind = match e {
        ConnectionError::TimedOut => io::ErrorKind::TimedOut,
        ConnectionError::Reset => io::ErrorKind::ConnectionReset,
        ConnectionError::LocallyClosed => io::ErrorKind::NotConnected,
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, e.clone())
}

impl RecvStream {
    pub(crate) fn new(conn: ConnectionRef, id: StreamId) -> Self {
        Self {
            conn,
            id,
            done: false,
        }
    }

    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.id.into()
    }

    /// Discards unread data and asks the peer to stop sending, with `code`.
    pub fn stop(&mut self, code: VarInt) {
        if self.done {
            return;
        }
        self.done = true;
        let mut st = self.conn.shared().state.borrow_mut();
        if st.inner.recv_stream(self.id).stop(code).is_ok() {
            st.wake_driver();
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.done {
            return Poll::Ready(Ok(0));
        }
        let mut st = this.conn.shared().state.borrow_mut();
        let st = &mut *st;
        let mut stream = st.inner.recv_stream(this.id);
        let mut chunks = match stream.read(true) {
            Ok(chunks) => chunks,
            Err(ReadableError::ClosedStream) => {
                this.done = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "stream already stopped",
                )));
            }
            Err(e @ ReadableError::IllegalOrderedRead) => {
                return Poll::Ready(Err(io::Error::other(e)));
            }
        };
        let result = chunks.next(buf.len());
        // Reading frees flow-control credit; the driver tells the peer.
        if chunks.finalize().should_transmit() {
            st.wake_driver();
        }
        match result {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len();
                buf[..n].copy_from_slice(&chunk.bytes);
                Poll::Ready(Ok(n))
            }
            Ok(None) => {
                this.done = true;
                Poll::Ready(Ok(0))
            }
            Err(ReadError::Blocked) => {
                if let Some(e) = &st.error {
                    return Poll::Ready(Err(connection_error(e)));
                }
                st.blocked_readers.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
            Err(ReadError::Reset(code)) => {
                this.done = true;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("stream reset by the peer with code {code}"),
                )))
            }
        }
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut st) = self.conn.shared().state.try_borrow_mut()
            && st.error.is_none()
            && st
                .inner
                .recv_stream(self.id)
                .stop(VarInt::from_u32(0))
                .is_ok()
        {
            st.wake_driver();
        }
    }
}

impl SendStream {
    pub(crate) fn new(conn: ConnectionRef, id: StreamId) -> Self {
        Self {
            conn,
            id,
            done: false,
        }
    }

    /// The QUIC stream id.
    pub fn id(&self) -> u64 {
        self.id.into()
    }

    /// Abandons the stream: unsent data is discarded and the peer gets RESET_STREAM with
    /// `code`.
    pub fn reset(&mut self, code: VarInt) {
        if self.done {
            return;
        }
        self.done = true;
        let mut st = self.conn.shared().state.borrow_mut();
        if st.inner.send_stream(self.id).reset(code).is_ok() {
            st.wake_driver();
        }
    }

    /// Finishes the stream: the peer reads to the end of what was written, then `Ok(0)`.
    pub fn finish(&mut self) -> io::Result<()> {
        if self.done {
            return Ok(());
        }
        let mut st = self.conn.shared().state.borrow_mut();
        if let Some(e) = &st.error {
            return Err(connection_error(e));
        }
        let result = st.inner.send_stream(self.id).finish();
        self.done = true;
        match result {
            Ok(()) => {
                st.wake_driver();
                Ok(())
            }
            // Already finished or reset.
            Err(FinishError::ClosedStream) => Ok(()),
            Err(FinishError::Stopped(code)) => Err(stopped(code)),
        }
    }
}

fn stopped(code: VarInt) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("the peer stopped the stream with code {code}"),
    )
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = this.conn.shared().state.borrow_mut();
        // quinn-proto reports a closed connection as "blocked"; do not wait for it.
        if let Some(e) = &st.error {
            return Poll::Ready(Err(connection_error(e)));
        }
        match st.inner.send_stream(this.id).write(buf) {
            Ok(n) => {
                st.wake_driver();
                Poll::Ready(Ok(n))
            }
            Err(quinn_proto::WriteError::Blocked) => {
                st.blocked_writers.insert(this.id, cx.waker().clone());
                Poll::Pending
            }
            Err(quinn_proto::WriteError::Stopped(code)) => Poll::Ready(Err(stopped(code))),
            Err(quinn_proto::WriteError::ClosedStream) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "stream already finished or reset",
            ))),
        }
    }

    /// Everything written is already in quinn-proto's buffer, which the driver drains; there is
    /// nothing to flush.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let st = self.conn.shared().state.borrow();
        match &st.error {
            Some(e) => Poll::Ready(Err(connection_error(e))),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_close(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().finish())
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Ok(mut st) = self.conn.shared().state.try_borrow_mut() {
            if st.error.is_some() {
                return;
            }
            match st.inner.send_stream(self.id).finish() {
                Ok(()) => st.wake_driver(),
                Err(FinishError::Stopped(code)) => {
                    if st.inner.send_stream(self.id).reset(code).is_ok() {
                        st.wake_driver();
                    }
                }
                Err(FinishError::ClosedStream) => {}
            }
        }
    }
}
