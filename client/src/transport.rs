//! The byte stream under a connection. Only TCP today; QUIC (one bidirectional stream per
//! connection) becomes another variant of these enums without touching the session code.

use std::{io, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// Reading half of a transport.
#[derive(Debug)]
pub(crate) enum Reader {
    Tcp(OwnedReadHalf),
}

/// Writing half of a transport.
#[derive(Debug)]
pub(crate) enum Writer {
    Tcp(OwnedWriteHalf),
}

/// Opens a transport to `server` (`host:port`), trying each resolved address in turn.
pub(crate) async fn connect(server: &str, timeout: Duration) -> io::Result<(Reader, Writer)> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    // Frames are small and latency matters more than packet count.
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    Ok((Reader::Tcp(r), Writer::Tcp(w)))
}

impl Reader {
    /// Reads what is available into `buf`; `Ok(0)` at end of stream. Cancel-safe.
    pub(crate) async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Self::Tcp(r) => r.read_buf(buf).await,
        }
    }
}

impl Writer {
    /// Writes all of `buf`.
    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(w) => w.write_all(buf).await,
        }
    }

    /// Closes the sending direction.
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(w) => w.shutdown().await,
        }
    }
}
