//! The byte stream under a connection: a TCP connection, TLS over a TCP connection, or one
//! bidirectional stream of a QUIC connection. The session code sees only [`Reader`] and
//! [`Writer`]; the same length-prefixed frames flow over each.
//!
//! TLS: a TCP connection as for plain TCP, then a TLS 1.3 or 1.2 handshake (rustls, ring) that
//! offers ALPN `tern/1` but accepts a server that selects no protocol. Server name and trust are
//! the same as for QUIC ([`tls_client_config`]). The stream is split into halves that share it
//! behind a lock; the session never reads and writes at the same time, so they do not contend.
//!
//! QUIC: one QUIC connection per transport connection, TLS 1.3 with ALPN `tern/1`, and one
//! bidirectional stream the client opens right after the handshake (the server learns of it
//! from the Hello the client writes first). The endpoint and connection live in the [`Writer`]
//! and are closed when it is dropped. The client accepts no stream from the server.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use quinn::{ConnectionError, TransportErrorCode, VarInt};
use rustls::AlertDescription;
use rustls_pki_types::{CertificateDer, DnsName, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use crate::{ClientConfig, ClientError, Result, config::Transport};

/// The ALPN protocol id of the Tern protocol: required over QUIC, offered over TLS.
pub(crate) const ALPN: &[u8] = b"tern/1";

/// QUIC keep-alive: below any sensible idle timeout of the server, so a quiet session is not
/// closed by the transport between the client's heartbeats (which may be further apart).
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// With several addresses for the server (e.g. `localhost`: `::1` and `127.0.0.1`), the next
/// address is tried this long after the previous one if neither has answered. A QUIC attempt
/// to an address nobody listens on does not fail, it waits for an answer that never comes.
const NEXT_ADDRESS_DELAY: Duration = Duration::from_millis(250);

/// How long [`Writer::shutdown`] waits for the server to acknowledge the end of the stream and
/// the connection close (QUIC), or for the last frames and the TLS close_notify to be written
/// (TLS), so leaving loses neither the last frames nor the close.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How a client opens transports; built once from the config (the CA file is read here).
#[derive(Debug)]
pub(crate) enum Connector {
    Tcp,
    Tls(Box<TlsConnector>),
    Quic(Box<QuicConnector>),
}

/// A TLS stream over TCP, client side.
type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

#[derive(Debug)]
pub(crate) struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    /// What is trusted, for error messages.
    trust: Arc<str>,
}

#[derive(Debug)]
pub(crate) struct QuicConnector {
    client: quinn::ClientConfig,
    /// The TLS server name the certificate must be valid for, as text quinn parses back.
    server_name: Arc<str>,
    /// What is trusted, for error messages.
    trust: Arc<str>,
}

/// Reading half of a transport.
#[derive(Debug)]
pub(crate) enum Reader {
    Tcp(OwnedReadHalf),
    Tls(ReadHalf<TlsStream>),
    Quic(quinn::RecvStream),
}

/// Writing half of a transport. The QUIC variant owns the connection and its endpoint.
#[derive(Debug)]
pub(crate) enum Writer {
    Tcp(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream>),
    Quic(Box<QuicWriter>),
}

#[derive(Debug)]
pub(crate) struct QuicWriter {
    send: quinn::SendStream,
    /// Dropping the last handle to the connection closes it.
    connection: quinn::Connection,
    /// Drives the connection's socket; kept as long as the connection.
    endpoint: quinn::Endpoint,
}

impl Connector {
    /// Checks what the transport needs from the config and, for TLS and QUIC, builds the TLS
    /// configuration (reading [`ClientConfig::ca`]).
    pub(crate) fn new(config: &ClientConfig) -> Result<Self> {
        match config.transport {
            Transport::Tcp => Ok(Self::Tcp),
            Transport::Tls => Ok(Self::Tls(Box::new(TlsConnector::new(config)?))),
            Transport::Quic => Ok(Self::Quic(Box::new(QuicConnector::new(config)?))),
            Transport::Dual => Err(ClientError::Config(
                "transport: dual is made of a TCP and a QUIC connector".into(),
            )),
        }
    }

    /// Opens a transport to `server` (`host:port`) within `timeout`.
    pub(crate) async fn connect(
        &self,
        server: &str,
        timeout: Duration,
    ) -> Result<(Reader, Writer)> {
        match self {
            Self::Tcp => {
                let (r, w) = tcp_stream(server, timeout).await?.into_split();
                Ok((Reader::Tcp(r), Writer::Tcp(w)))
            }
            Self::Tls(tls) => tls.connect(server, timeout).await,
            Self::Quic(quic) => tokio::time::timeout(timeout, quic.connect(server))
                .await
                .map_err(|_| {
                    // Over UDP an absent listener looks the same as a slow one: no answer.
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "QUIC handshake with {server} timed out: no answer within {timeout:?}"
                        ),
                    )
                })?,
        }
    }
}

/// Opens a TCP connection, trying each resolved address in turn.
async fn tcp_stream(server: &str, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    // Frames are small and latency matters more than packet count.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The TLS server name for `server` (`host:port`, `[v6]:port`): the host, as an IP address if it
/// is an IP literal.
pub(crate) fn server_name(server: &str) -> Result<ServerName<'static>> {
    if let Ok(addr) = server.parse::<SocketAddr>() {
        return Ok(ServerName::IpAddress(addr.ip().into()));
    }
    let bad = |why: String| ClientError::Config(format!("server: {why}"));
    let Some((host, port)) = server.rsplit_once(':') else {
        return Err(bad(format!("`{server}` is not HOST:PORT")));
    };
    if port.parse::<u16>().is_err() {
        return Err(bad(format!("`{server}` is not HOST:PORT")));
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    DnsName::try_from(host.to_owned())
        .map(ServerName::DnsName)
        .map_err(|_| {
            bad(format!(
                "`{host}` is neither a DNS name nor an IP address, so it cannot name the \
                 server's TLS certificate"
            ))
        })
}

/// The certificates in a PEM file, at least one.
fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bad = |reason: String| ClientError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(bad(
            "no PEM certificate (BEGIN CERTIFICATE) in the file".into()
        ));
    }
    Ok(certs)
}

/// The roots a TLS client trusts: only the certificates in `ca`, or without it the Mozilla roots
/// compiled in; and a description of that for error messages.
fn root_store(ca: Option<&Path>) -> Result<(rustls::RootCertStore, String)> {
    let mut roots = rustls::RootCertStore::empty();
    let trust = match ca {
        Some(path) => {
            for (i, cert) in read_ca(path)?.into_iter().enumerate() {
                roots.add(cert).map_err(|e| ClientError::CaFile {
                    path: path.to_owned(),
                    reason: format!("certificate {} is not usable: {e}", i + 1),
                })?;
            }
            format!("trusting only the certificates in {}", path.display())
        }
        None => {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            "trusting the built-in Mozilla roots; give the gateway's certificate as the CA \
             file if it is self-signed"
                .to_owned()
        }
    };
    Ok((roots, trust))
}

/// The rustls client configuration of both TLS transports: ring, the roots of [`root_store`],
/// `versions`, ALPN [`ALPN`], no client certificate. Returns it with the trust description.
fn tls_client_config(
    config: &ClientConfig,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(rustls::ClientConfig, Arc<str>)> {
    // Explicitly ring, whatever other crypto provider another crate in the process enables.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
    let (mut tls, trust) = match config.pin {
        Some(pin) => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned { pin, provider }))
                .with_no_client_auth(),
            format!("trusting only the certificate with SHA-256 {}", hex(&pin)),
        ),
        None => {
            let (roots, trust) = root_store(config.ca.as_deref())?;
            (
                builder.with_root_certificates(roots).with_no_client_auth(),
                trust,
            )
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok((tls, trust.into()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Trusts the one server certificate whose SHA-256 is `pin` ([`ClientConfig::pin`]), and
/// checks the handshake's signatures with it as rustls' own verifier does.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            // A certificate error, so that the server gets a bad_certificate alert.
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                    std::io::Error::other(format!(
                        "the server's certificate has SHA-256 {}, not the pinned {}",
                        hex(&got),
                        hex(&self.pin)
                    )),
                ))),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl TlsConnector {
    fn new(config: &ClientConfig) -> Result<Self> {
        let server_name = server_name(&config.server)?;
        let (tls, trust) =
            tls_client_config(config, &[&rustls::version::TLS13, &rustls::version::TLS12])?;
        Ok(Self {
            config: Arc::new(tls),
            server_name,
            trust,
        })
    }

    /// Connects over TCP, then runs the TLS handshake; both together within `timeout`.
    async fn connect(&self, server: &str, timeout: Duration) -> Result<(Reader, Writer)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let tcp = tcp_stream(server, timeout).await?;
        let handshake = tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(self.server_name.clone(), tcp);
        let stream = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS handshake with {server} timed out: TCP connect and handshake not \
                         done within {timeout:?}"
                    ),
                )
            })?
            .map_err(|e| self.handshake_error(server, e))?;
        let (_, session) = stream.get_ref();
        // Selecting no protocol is allowed: ALPN is optional over TLS, unlike over QUIC.
        tracing::debug!(
            version = ?session.protocol_version(),
            alpn = ?session.alpn_protocol().map(String::from_utf8_lossy),
            "TLS handshake done"
        );
        let (r, w) = tokio::io::split(stream);
        Ok((Reader::Tls(r), Writer::Tls(w)))
    }

    /// Names why a handshake failed. rustls' own errors (certificate, alerts, a peer that does
    /// not speak TLS) are [`ClientError::Tls`]; so is a connection the server closed mid-way.
    /// Other socket errors stay I/O errors of their kind.
    fn handshake_error(&self, server: &str, e: io::Error) -> ClientError {
        let tls = |reason: String| ClientError::Tls {
            server: server.to_owned(),
            reason,
        };
        // tokio-rustls wraps rustls' error in an `io::Error` of kind `InvalidData`.
        if let Some(error) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return tls(match error {
                rustls::Error::InvalidCertificate(_) => format!("{error} ({})", self.trust),
                rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol) => {
                    "the server sent TLS alert NoApplicationProtocol: it speaks none of the \
                     offered ALPN protocols (tern/1)"
                        .into()
                }
                rustls::Error::AlertReceived(alert) => {
                    format!("the server sent TLS alert {alert:?}")
                }
                rustls::Error::InvalidMessage(_) => {
                    format!("{error}; the server does not speak TLS (a plain TCP port?)")
                }
                other => other.to_string(),
            });
        }
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return tls(
                "the server closed the connection during the handshake (not a TLS port, or it \
                 turned the connection away)"
                    .into(),
            );
        }
        io::Error::new(e.kind(), format!("TLS handshake with {server}: {e}")).into()
    }
}

impl QuicConnector {
    fn new(config: &ClientConfig) -> Result<Self> {
        let server_name = server_name(&config.server)?;
        let (tls, trust) = tls_client_config(config, &[&rustls::version::TLS13])?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
            .map_err(|e| ClientError::Config(format!("TLS: {e}")))?;
        let mut transport = quinn::TransportConfig::default();
        transport
            .keep_alive_interval(Some(KEEP_ALIVE))
            // The session is the one stream the client opens; the server opens none.
            .max_concurrent_bidi_streams(VarInt::from_u32(0))
            .max_concurrent_uni_streams(VarInt::from_u32(0));
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport));
        Ok(Self {
            client,
            server_name: server_name.to_str().into(),
            trust,
        })
    }

    /// Resolves `server` and races a connection to each address, each started
    /// [`NEXT_ADDRESS_DELAY`] after the one before. The first to open its stream wins; a TLS or
    /// ALPN failure ends the race at once (the server answered, and the answer was no).
    async fn connect(&self, server: &str) -> Result<(Reader, Writer)> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server).await?.collect();
        let mut attempts = tokio::task::JoinSet::new();
        for (i, addr) in addrs.into_iter().enumerate() {
            let attempt = Attempt {
                client: self.client.clone(),
                server: server.into(),
                server_name: self.server_name.clone(),
                trust: self.trust.clone(),
                addr,
            };
            let delay = NEXT_ADDRESS_DELAY * u32::try_from(i).unwrap_or(u32::MAX);
            attempts.spawn(async move {
                tokio::time::sleep(delay).await;
                attempt.run().await
            });
        }
        let mut first_error = None;
        while let Some(joined) = attempts.join_next().await {
            let error = match joined {
                Ok(Ok(transport)) => return Ok(transport),
                Ok(Err(e @ (ClientError::Tls { .. } | ClientError::Alpn { .. }))) => return Err(e),
                Ok(Err(e)) => e,
                Err(e) => io::Error::other(format!("QUIC connect task failed: {e}")).into(),
            };
            tracing::debug!(%error, "QUIC connection attempt failed");
            first_error.get_or_insert(error);
        }
        // Dropping `attempts` aborts the attempts still running.
        Err(first_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{server}: no address to connect to"),
            )
            .into()
        }))
    }
}

/// One QUIC connection attempt to one address.
struct Attempt {
    client: quinn::ClientConfig,
    server: Arc<str>,
    server_name: Arc<str>,
    trust: Arc<str>,
    addr: SocketAddr,
}

impl Attempt {
    async fn run(self) -> Result<(Reader, Writer)> {
        let bind: SocketAddr = match self.addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let endpoint = quinn::Endpoint::client(bind)?;
        let connecting = endpoint
            .connect_with(self.client.clone(), self.addr, &self.server_name)
            .map_err(|e| match e {
                quinn::ConnectError::InvalidServerName(name) => {
                    ClientError::Config(format!("server: `{name}` is not a valid TLS server name"))
                }
                other => io::Error::other(format!("QUIC connect to {}: {other}", self.addr)).into(),
            })?;
        let connection = connecting.await.map_err(|e| self.handshake_error(e))?;
        let protocol = connection
            .handshake_data()
            .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|data| data.protocol);
        if protocol.as_deref() != Some(ALPN) {
            // rustls already refuses this; checked again because everything after relies on it.
            return Err(ClientError::Alpn {
                server: self.server.to_string(),
                reason: match protocol {
                    Some(p) => format!("it chose `{}`", String::from_utf8_lossy(&p)),
                    None => "it chose no ALPN protocol".into(),
                },
            });
        }
        let (send, recv) = connection
            .open_bi()
            .await
            .map_err(|e| connection_io_error(&e, "opening the QUIC stream"))?;
        Ok((
            Reader::Quic(recv),
            Writer::Quic(Box::new(QuicWriter {
                send,
                connection,
                endpoint,
            })),
        ))
    }

    /// Names why a handshake failed: TLS (alerts, certificates) and ALPN get their own errors.
    fn handshake_error(&self, e: ConnectionError) -> ClientError {
        // A TLS failure closes the connection with CRYPTO_ERROR(alert): raised here when this
        // side refused (`TransportError`, with rustls' text), or sent by the server.
        let (alert, local_reason) = match &e {
            ConnectionError::TransportError(t) => (tls_alert(t.code), Some(t.reason.as_str())),
            ConnectionError::ConnectionClosed(close) => (tls_alert(close.error_code), None),
            _ => (None, None),
        };
        let Some(alert) = alert else {
            return connection_io_error(&e, &format!("QUIC handshake with {}", self.addr)).into();
        };
        let server = self.server.to_string();
        if alert == AlertDescription::NoApplicationProtocol {
            let reason = match local_reason {
                Some(text) => format!("it agreed to no ALPN protocol ({text})"),
                None => "it refused the handshake with TLS alert NoApplicationProtocol".into(),
            };
            return ClientError::Alpn { server, reason };
        }
        let reason = match (local_reason, &e) {
            // rustls says "invalid peer certificate: ..." for every certificate problem.
            (Some(text), _)
                if is_certificate_alert(alert) || text.starts_with("invalid peer certificate") =>
            {
                format!("{text} ({})", self.trust)
            }
            (Some(text), _) => text.to_owned(),
            (None, ConnectionError::ConnectionClosed(close)) if !close.reason.is_empty() => {
                format!(
                    "the server sent TLS alert {alert:?}: {}",
                    String::from_utf8_lossy(&close.reason)
                )
            }
            (None, _) => format!("the server sent TLS alert {alert:?}"),
        };
        ClientError::Tls { server, reason }
    }
}

/// The TLS alert a QUIC CRYPTO_ERROR code (0x100..=0x1ff) carries.
fn tls_alert(code: TransportErrorCode) -> Option<AlertDescription> {
    let code = u64::from(code);
    (0x100..=0x1ff)
        .contains(&code)
        .then(|| AlertDescription::from((code & 0xff) as u8))
}

fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
    )
}

/// A lost or refused QUIC connection as an I/O error of the matching kind.
fn connection_io_error(e: &ConnectionError, what: &str) -> io::Error {
    let kind = match e {
        ConnectionError::TimedOut => io::ErrorKind::TimedOut,
        ConnectionError::ConnectionClosed(close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            io::ErrorKind::ConnectionRefused
        }
        ConnectionError::Reset => io::ErrorKind::ConnectionReset,
        ConnectionError::ConnectionClosed(_)
        | ConnectionError::ApplicationClosed(_)
        | ConnectionError::LocallyClosed => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("{what}: {e}"))
}

impl Reader {
    /// Reads what is available into `buf`; `Ok(0)` at end of stream. Cancel-safe.
    pub(crate) async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Self::Tcp(r) => r.read_buf(buf).await,
            Self::Tls(r) => match r.read_buf(buf).await {
                // The end of the TCP stream without a close_notify first (the gateway closes
                // so). A truncation is no risk: frames are length-prefixed and a partial one
                // is never handed on, the same as a TCP connection that ends.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                other => other,
            },
            // quinn's `ReadError` converts to `io::Error` with a matching kind.
            Self::Quic(r) => r.read_buf(buf).await,
        }
    }
}

impl Writer {
    /// Writes all of `buf`.
    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Self::Tcp(w) => w.write_all(buf).await,
            Self::Tls(w) => {
                // rustls may keep records that did not fit the socket; flush sends them now
                // instead of with the next write.
                w.write_all(buf).await?;
                w.flush().await
            }
            Self::Quic(q) => Ok(q.send.write_all(buf).await?),
        }
    }

    /// Closes the sending direction. For TLS: sends close_notify, then shuts the TCP sending
    /// direction, within [`CLOSE_GRACE`]. For QUIC: finishes the stream, waits (at most
    /// [`CLOSE_GRACE`]) until the server has acknowledged all of it, then closes the connection.
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(w) => w.shutdown().await,
            Self::Tls(w) => tokio::time::timeout(CLOSE_GRACE, w.shutdown())
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "TLS close_notify not sent within the close grace period",
                    ))
                }),
            Self::Quic(q) => {
                q.send
                    .finish()
                    .map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e))?;
                let leave = async {
                    // `finish` only queues the end of the stream; closing the connection before
                    // it is acknowledged could lose the last frames (e.g. acks).
                    let _ = q.send.stopped().await;
                    q.connection.close(VarInt::from_u32(0), b"client closed");
                    // Lets the endpoint send the close before the process may exit.
                    q.endpoint.wait_idle().await;
                };
                let _ = tokio::time::timeout(CLOSE_GRACE, leave).await;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(server: &str) -> String {
        match server_name(server) {
            Ok(ServerName::IpAddress(ip)) => format!("ip {}", IpAddr::from(ip)),
            Ok(ServerName::DnsName(dns)) => format!("dns {}", dns.as_ref()),
            Ok(other) => format!("other {other:?}"),
            Err(e) => format!("error {e}"),
        }
    }

    #[test]
    fn server_name_is_the_host_and_an_ip_literal_stays_an_ip() {
        assert_eq!(name("127.0.0.1:7600"), "ip 127.0.0.1");
        assert_eq!(name("[::1]:7600"), "ip ::1");
        assert_eq!(name("localhost:7600"), "dns localhost");
        assert_eq!(name("chat.example.com:443"), "dns chat.example.com");
        assert_eq!(
            name("localhost"),
            "error invalid client config: server: `localhost` is not HOST:PORT"
        );
        assert_eq!(
            name("a b:1"),
            "error invalid client config: server: `a b` is neither a DNS name nor an IP \
             address, so it cannot name the server's TLS certificate"
        );
        // quinn gets the name as text and parses it back; an IP must stay an IP.
        let text = server_name("127.0.0.1:1").unwrap().to_str().into_owned();
        assert!(matches!(
            ServerName::try_from(text.as_str()),
            Ok(ServerName::IpAddress(_))
        ));
    }

    #[test]
    fn crypto_error_codes_carry_tls_alerts() {
        assert_eq!(
            tls_alert(TransportErrorCode::crypto(120)),
            Some(AlertDescription::NoApplicationProtocol)
        );
        assert_eq!(
            tls_alert(TransportErrorCode::crypto(48)),
            Some(AlertDescription::UnknownCA)
        );
        assert_eq!(tls_alert(TransportErrorCode::CONNECTION_REFUSED), None);
    }

    #[test]
    fn ca_file_errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let mut config = ClientConfig::new("127.0.0.1:1", "t", "d");
        config.transport = Transport::Quic;
        config.ca = Some(missing.clone());
        match Connector::new(&config) {
            Err(ClientError::CaFile { path, reason }) => {
                assert_eq!(path, missing);
                assert!(reason.starts_with("cannot read it: "), "{reason}");
            }
            other => panic!("expected CaFile, got {other:?}"),
        }

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        config.ca = Some(empty.clone());
        let err = Connector::new(&config).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "CA file {}: no PEM certificate (BEGIN CERTIFICATE) in the file",
                empty.display()
            )
        );
        assert!(err.is_permanent());

        // TLS over TCP reads the file with the same code and reports the same.
        config.transport = Transport::Tls;
        assert_eq!(
            Connector::new(&config).unwrap_err().to_string(),
            err.to_string()
        );
        config.ca = Some(missing.clone());
        assert!(matches!(
            Connector::new(&config),
            Err(ClientError::CaFile { path, .. }) if path == missing
        ));

        // Without a CA file the built-in roots are used; TCP needs no TLS at all.
        config.ca = None;
        assert!(matches!(Connector::new(&config), Ok(Connector::Tls(_))));
        config.transport = Transport::Quic;
        assert!(matches!(Connector::new(&config), Ok(Connector::Quic(_))));
        config.transport = Transport::Tcp;
        config.ca = Some(missing);
        assert!(matches!(Connector::new(&config), Ok(Connector::Tcp)));
    }

    #[test]
    fn tls_offers_tern_1_and_names_an_ip_server_by_its_address() {
        let mut config = ClientConfig::new("127.0.0.1:1", "t", "d");
        config.transport = Transport::Tls;
        let Ok(Connector::Tls(tls)) = Connector::new(&config) else {
            panic!("expected a TLS connector");
        };
        // Versions are checked end to end (tests/tls.rs: a TLS 1.3 and a TLS 1.2 server).
        assert_eq!(tls.config.alpn_protocols, vec![b"tern/1".to_vec()]);
        assert!(matches!(tls.server_name, ServerName::IpAddress(_)));
    }

    #[tokio::test]
    async fn the_connect_timeout_bounds_tcp_connect_and_tls_handshake() {
        // The kernel completes the TCP handshake into the backlog; nobody ever answers TLS.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap().to_string();
        let mut config = ClientConfig::new(&server, "t", "d");
        config.transport = Transport::Tls;
        let connector = Connector::new(&config).unwrap();
        let started = std::time::Instant::now();
        let timeout = Duration::from_millis(200);
        match connector.connect(&server, timeout).await {
            Err(ClientError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::TimedOut);
                assert_eq!(
                    e.to_string(),
                    format!(
                        "TLS handshake with {server} timed out: TCP connect and handshake not \
                         done within 200ms"
                    )
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(started.elapsed() >= timeout);
    }
}
