//! Proxies on 127.0.0.1 that stand between a test client and the gateway, so that a test can cut
//! one network path of a client for a while: stall or reset TCP connections, drop UDP datagrams.
//!
//! Each proxy runs on its own thread with a single-threaded tokio runtime, so the test that owns
//! it may block, sleep or run its own runtime freely. Dropping a proxy stops its thread and closes
//! all of its sockets.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot, watch};

/// Bytes a TCP proxy holds per connection and direction.
const TCP_BUFFER: usize = 64 * 1024;

/// Largest UDP payload, so no datagram is ever truncated.
const UDP_BUFFER: usize = 64 * 1024;

/// Most client addresses a UDP proxy serves; datagrams from further addresses are dropped.
const UDP_MAX_CLIENTS: usize = 1024;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("proxy runtime")
}

/// Shared state of a TCP proxy, watched by every connection.
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// No bytes move while set.
    stalled: bool,
    /// No bytes move from the upstream server to the clients while set.
    replies_stalled: bool,
    /// Bumped by each reset; a connection accepted under an older generation is reset.
    generation: u64,
}

#[derive(Debug)]
enum Command {
    /// Reset every current connection, then answer on the channel.
    Reset(std::sync::mpsc::Sender<()>),
    Shutdown,
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`.
///
/// Every connection accepted on [`TcpProxy::addr`] gets its own connection to the upstream
/// address, and bytes are copied both ways, with at most 64 KiB held per direction. When one
/// side shuts down its writing half, the proxy shuts down the writing half towards the other
/// side; when either side fails, both sockets are closed with a reset. Dropping the proxy
/// closes its listening socket and every proxied connection.
#[derive(Debug)]
pub struct TcpProxy {
    /// The address clients connect to.
    pub addr: SocketAddr,
    control: Arc<watch::Sender<Control>>,
    commands: mpsc::UnboundedSender<Command>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Starts a proxy listening on a free 127.0.0.1 port; connections go to `upstream`.
    ///
    /// Panics if the listening socket or the proxy's thread cannot be set up.
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TCP proxy");
        let addr = listener.local_addr().expect("TCP proxy address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking TCP proxy listener");
        let rt = runtime();
        let listener = {
            let _context = rt.enter();
            TcpListener::from_std(listener).expect("register TCP proxy listener")
        };
        let control = Arc::new(watch::Sender::new(Control::default()));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicU64::new(0));
        let thread = {
            let control = control.clone();
            let accepted = accepted.clone();
            std::thread::Builder::new()
                .name(format!("tcp-proxy-{}", addr.port()))
                .spawn(move || {
                    rt.block_on(tcp_accept_loop(
                        listener, upstream, control, command_rx, accepted,
                    ));
                    // Dropping the runtime drops every connection task and closes its sockets.
                    drop(rt);
                })
                .expect("spawn TCP proxy thread")
        };
        TcpProxy {
            addr,
            control,
            commands,
            accepted,
            thread: Some(thread),
        }
    }

    /// Stops moving bytes in both directions on every proxied connection, current and new
    /// (new connections are accepted and connected upstream but stalled too). Nothing is
    /// dropped or reordered: what is in flight waits (like a network that drops every packet,
    /// which TCP retransmits later). The proxy stops reading from its sockets, so once the
    /// kernel's buffers are full the sender's writes block. A shutdown of a writing half is held
    /// back as well. Returns at once.
    pub fn stall(&self) {
        self.control
            .send_if_modified(|c| !std::mem::replace(&mut c.stalled, true));
    }

    /// As [`TcpProxy::stall`], in one direction only: what the upstream server sends waits,
    /// what clients send goes on to it (a request arrives, its answer is held back).
    pub fn stall_replies(&self) {
        self.control
            .send_if_modified(|c| !std::mem::replace(&mut c.replies_stalled, true));
    }

    /// Moves bytes again after [`TcpProxy::stall`] or [`TcpProxy::stall_replies`], in the
    /// order they were sent.
    pub fn resume(&self) {
        self.control.send_if_modified(|c| {
            let was = c.stalled || c.replies_stalled;
            (c.stalled, c.replies_stalled) = (false, false);
            was
        });
    }

    /// Closes every current proxied connection on both sides with a reset (SO_LINGER 0), as a
    /// NAT that forgot its mappings would. Connections whose handshake the kernel has completed
    /// but which the proxy has not yet taken are reset too. New connections keep working
    /// (subject to [`TcpProxy::stall`]). Returns once all those sockets are closed.
    ///
    /// Panics if the proxy's thread does not answer within [`crate::WAIT`].
    pub fn reset_all(&self) {
        let (done, done_rx) = std::sync::mpsc::channel();
        if self.commands.send(Command::Reset(done)).is_err() {
            panic!("TCP proxy on {} has stopped", self.addr);
        }
        if done_rx.recv_timeout(crate::WAIT).is_err() {
            panic!("TCP proxy on {} did not reset its connections", self.addr);
        }
    }

    /// Connections accepted so far (a counter that only grows).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Closes a socket with a reset instead of an orderly shutdown once it is dropped.
fn set_abortive_close<S: std::os::fd::AsRawFd>(socket: &S) {
    let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
}

async fn tcp_accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    control: Arc<watch::Sender<Control>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    accepted: Arc<AtomicU64>,
) {
    // Each connection task holds a clone of the current generation's sender; once all clones
    // of a generation are gone, all its connections are closed.
    let (mut alive, mut alive_rx) = mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Reset(done)) => {
                    control.send_modify(|c| c.generation += 1);
                    // Reset connections waiting in the listen queue as well.
                    while let Ok((socket, _)) = SockRef::from(&listener).accept() {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        let _ = socket.set_linger(Some(Duration::ZERO));
                    }
                    let (next, next_rx) = mpsc::channel(1);
                    drop(std::mem::replace(&mut alive, next));
                    let mut old = std::mem::replace(&mut alive_rx, next_rx);
                    // `None` once every connection of the older generations has finished.
                    let _ = old.recv().await;
                    let _ = done.send(());
                }
                Some(Command::Shutdown) | None => return,
            },
            incoming = listener.accept() => match incoming {
                Ok((client, _)) => {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let generation = control.borrow().generation;
                    let control = control.subscribe();
                    let alive = alive.clone();
                    tokio::spawn(async move {
                        tcp_connection(client, upstream, control, generation).await;
                        drop(alive);
                    });
                }
                // Out of file descriptors, say: try again a little later.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

/// Waits until the proxy resets the connections of `generation` (or stops).
async fn reset_requested(control: &mut watch::Receiver<Control>, generation: u64) {
    let _ = control.wait_for(|c| c.generation != generation).await;
}

async fn tcp_connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut control: watch::Receiver<Control>,
    generation: u64,
) {
    let _ = client.set_nodelay(true);
    let mut reset = control.clone();
    let connected = tokio::select! {
        biased;
        () = reset_requested(&mut reset, generation) => None,
        server = TcpStream::connect(upstream) => server.ok(),
    };
    let Some(mut server) = connected else {
        set_abortive_close(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    let abort = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let (upward, downward) = (control.clone(), control.clone());
        let both_ways = async {
            tokio::try_join!(
                pump(client_read, server_write, upward, false),
                pump(server_read, client_write, downward, true),
            )
        };
        tokio::select! {
            biased;
            () = reset_requested(&mut control, generation) => true,
            copied = both_ways => copied.is_err(),
        }
    };
    if abort {
        set_abortive_close(&client);
        set_abortive_close(&server);
    }
}

/// Whether bytes are held in this direction (`replies`: from the upstream server).
fn held(c: &Control, replies: bool) -> bool {
    c.stalled || (replies && c.replies_stalled)
}

/// Waits until bytes may move in this direction.
async fn running(control: &mut watch::Receiver<Control>, replies: bool) -> io::Result<()> {
    match control.wait_for(|c| !held(c, replies)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other("proxy stopped")),
    }
}

/// Waits until this direction is stalled.
async fn stalled(control: &mut watch::Receiver<Control>, replies: bool) -> io::Result<()> {
    match control.wait_for(|c| held(c, replies)).await {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other("proxy stopped")),
    }
}

/// Copies bytes from `from` to `to` until end of stream, then shuts down `to`'s writing half.
/// Neither reads nor writes while the proxy is stalled (in this direction; `replies`: from the
/// upstream server): an operation under way when the stall begins is abandoned (both are cancel
/// safe) and started again on resume.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut control: watch::Receiver<Control>,
    replies: bool,
) -> io::Result<()> {
    let mut buffer = vec![0u8; TCP_BUFFER];
    loop {
        let read = loop {
            running(&mut control, replies).await?;
            tokio::select! {
                biased;
                stop = stalled(&mut control, replies) => stop?,
                read = from.read(&mut buffer) => break read?,
            }
        };
        if read == 0 {
            running(&mut control, replies).await?;
            return to.shutdown().await;
        }
        let mut written = 0;
        while written < read {
            running(&mut control, replies).await?;
            tokio::select! {
                biased;
                stop = stalled(&mut control, replies) => stop?,
                n = to.write(&buffer[written..read]) => match n? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => written += n,
                },
            }
        }
    }
}

/// Counters and switch shared between a UDP proxy and its thread.
#[derive(Debug, Default)]
struct UdpState {
    dropping: AtomicBool,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

impl UdpState {
    /// Counts a datagram about to be sent, so the count is current by the time it arrives.
    fn sending(&self) {
        self.forwarded.fetch_add(1, Ordering::SeqCst);
    }

    /// Moves a datagram counted by `sending` to the dropped count, because sending failed.
    fn send_failed(&self) {
        self.forwarded.fetch_sub(1, Ordering::SeqCst);
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }

    fn dropping(&self) -> bool {
        self.dropping.load(Ordering::SeqCst)
    }
}

/// A UDP proxy on 127.0.0.1 in front of `upstream`: each client address gets its own upstream
/// socket (so the server sees one address per client address).
///
/// Replies from the upstream address to one of those sockets go back to its client from
/// [`UdpProxy::addr`]. At most 1024 client addresses are served; datagrams from further ones are
/// dropped. Dropping the proxy closes all of its sockets.
#[derive(Debug)]
pub struct UdpProxy {
    /// The address clients send to.
    pub addr: SocketAddr,
    state: Arc<UdpState>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl UdpProxy {
    /// Starts a proxy on a free 127.0.0.1 port; datagrams go to `upstream`.
    ///
    /// Panics if the socket or the proxy's thread cannot be set up.
    pub fn start(upstream: SocketAddr) -> UdpProxy {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP proxy");
        let addr = socket.local_addr().expect("UDP proxy address");
        socket
            .set_nonblocking(true)
            .expect("non-blocking UDP proxy socket");
        let rt = runtime();
        let socket = {
            let _context = rt.enter();
            UdpSocket::from_std(socket).expect("register UDP proxy socket")
        };
        let state = Arc::new(UdpState::default());
        let (stop, stop_rx) = oneshot::channel();
        let thread = {
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("udp-proxy-{}", addr.port()))
                .spawn(move || {
                    rt.block_on(udp_loop(socket, upstream, state, stop_rx));
                    // Dropping the runtime drops every reply task and closes its socket.
                    drop(rt);
                })
                .expect("spawn UDP proxy thread")
        };
        UdpProxy {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Drops every datagram in both directions until [`UdpProxy::resume`]. A datagram is
    /// dropped if the proxy reads it after this returns.
    pub fn drop_all(&self) {
        self.state.dropping.store(true, Ordering::SeqCst);
    }

    /// Forwards datagrams again.
    pub fn resume(&self) {
        self.state.dropping.store(false, Ordering::SeqCst);
    }

    /// Datagrams forwarded so far (both directions). A datagram is counted before it leaves
    /// the proxy, so the count includes every datagram the receiver has seen.
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Datagrams dropped so far (both directions).
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether a receive error only reports an earlier datagram that was refused, so the socket
/// is still usable.
fn transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn udp_loop(
    front: UdpSocket,
    upstream: SocketAddr,
    state: Arc<UdpState>,
    mut stop: oneshot::Receiver<()>,
) {
    let front = Arc::new(front);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; UDP_BUFFER];
    loop {
        let (len, client) = tokio::select! {
            _ = &mut stop => return,
            received = front.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(e) if transient(&e) => continue,
                Err(_) => return,
            },
        };
        if state.dropping() {
            state.drop_one();
            continue;
        }
        let socket = match clients.get(&client) {
            Some(socket) => socket.clone(),
            None if clients.len() >= UDP_MAX_CLIENTS => {
                state.drop_one();
                continue;
            }
            None => {
                let Some(socket) = upstream_socket(upstream).await else {
                    state.drop_one();
                    continue;
                };
                let socket = Arc::new(socket);
                clients.insert(client, socket.clone());
                tokio::spawn(udp_replies(
                    socket.clone(),
                    front.clone(),
                    client,
                    state.clone(),
                ));
                socket
            }
        };
        state.sending();
        if socket.send(&buffer[..len]).await.is_err() {
            state.send_failed();
        }
    }
}

async fn upstream_socket(upstream: SocketAddr) -> Option<UdpSocket> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    socket.connect(upstream).await.ok()?;
    Some(socket)
}

/// Sends what `upstream` receives back to `client` through the proxy's own socket.
async fn udp_replies(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    state: Arc<UdpState>,
) {
    let mut buffer = vec![0u8; UDP_BUFFER];
    loop {
        let len = match upstream.recv(&mut buffer).await {
            Ok(len) => len,
            Err(e) if transient(&e) => continue,
            Err(_) => return,
        };
        if state.dropping() {
            state.drop_one();
            continue;
        }
        state.sending();
        if front.send_to(&buffer[..len], client).await.is_err() {
            state.send_failed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};

    /// Upper bound on a wait for something that should happen at once.
    const PATIENCE: Duration = crate::WAIT;
    /// How long a read must stay empty to show that nothing is coming.
    const QUIET: Duration = Duration::from_millis(300);

    /// A listener standing in for the gateway.
    fn upstream() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").expect("bind upstream")
    }

    /// Accepts one connection, failing the test if none comes within `PATIENCE`.
    fn accept(listener: &TcpListener) -> TcpStream {
        let listener = listener.try_clone().expect("clone listener");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(listener.accept().map(|(s, _)| s));
        });
        let stream = rx
            .recv_timeout(PATIENCE)
            .expect("the proxy connects upstream")
            .expect("accept");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
    }

    fn connect(proxy: &TcpProxy) -> TcpStream {
        let stream = TcpStream::connect(proxy.addr).expect("connect to proxy");
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        stream
    }

    /// A client connected through `proxy`, and the upstream end of its connection.
    fn pair(proxy: &TcpProxy, listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = connect(proxy);
        let server = accept(listener);
        (client, server)
    }

    fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut buffer = vec![0u8; len];
        stream.read_exact(&mut buffer).expect("read");
        buffer
    }

    /// Asserts that nothing arrives on `stream` for `QUIET`.
    fn assert_quiet(stream: &mut TcpStream) {
        stream.set_read_timeout(Some(QUIET)).unwrap();
        let mut buffer = [0u8; 64];
        match stream.read(&mut buffer) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected no bytes while stalled, got {other:?}"),
        }
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
    }

    /// Asserts that `stream` was closed: a read gives an error or end of stream.
    fn assert_closed(stream: &mut TcpStream) {
        let mut buffer = [0u8; 64];
        match stream.read(&mut buffer) {
            Ok(0) => {}
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected a closed connection, got {other:?}"),
        }
    }

    #[test]
    fn tcp_forwards_both_ways_and_stall_holds_bytes_until_resume() {
        let listener = upstream();
        let proxy = TcpProxy::start(listener.local_addr().unwrap());
        let (mut client, mut server) = pair(&proxy, &listener);
        assert_eq!(server.peer_addr().unwrap().ip(), proxy.addr.ip());

        client.write_all(b"hello").unwrap();
        assert_eq!(read_exactly(&mut server, 5), b"hello");
        server.write_all(b"world").unwrap();
        assert_eq!(read_exactly(&mut client, 5), b"world");

        proxy.stall();
        client.write_all(b"abc").unwrap();
        server.write_all(b"xyz").unwrap();
        assert_quiet(&mut server);
        assert_quiet(&mut client);
        client.write_all(b"def").unwrap();
        server.write_all(b"uvw").unwrap();

        proxy.resume();
        assert_eq!(read_exactly(&mut server, 6), b"abcdef");
        assert_eq!(read_exactly(&mut client, 6), b"xyzuvw");
        client.write_all(b"more").unwrap();
        assert_eq!(read_exactly(&mut server, 4), b"more");
        assert_eq!(proxy.accepted(), 1);
    }

    #[test]
    fn tcp_stall_holds_new_connections_too() {
        let listener = upstream();
        let proxy = TcpProxy::start(listener.local_addr().unwrap());
        proxy.stall();
        let (mut client, mut server) = pair(&proxy, &listener);
        assert_eq!(proxy.accepted(), 1);
        client.write_all(b"ping").unwrap();
        server.write_all(b"pong").unwrap();
        assert_quiet(&mut server);
        assert_quiet(&mut client);

        proxy.resume();
        assert_eq!(read_exactly(&mut server, 4), b"ping");
        assert_eq!(read_exactly(&mut client, 4), b"pong");
    }

    #[test]
    fn tcp_stall_stops_reading_so_the_sender_blocks() {
        let listener = upstream();
        let proxy = TcpProxy::start(listener.local_addr().unwrap());
        let (mut client, mut server) = pair(&proxy, &listener);
        client.write_all(b"x").unwrap();
        assert_eq!(read_exactly(&mut server, 1), b"x");

        proxy.stall();
        // Write until the kernel refuses more: only its buffers hold what the proxy won't read.
        client.set_nonblocking(true).unwrap();
        let pattern = |i: usize| (i % 251) as u8;
        // A whole number of pattern periods, so that wrapping around the chunk continues it.
        let chunk: Vec<u8> = (0..251 * 256).map(pattern).collect();
        let mut sent = 0usize;
        loop {
            let offset = sent % chunk.len();
            match client.write(&chunk[offset..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("write: {e}"),
            }
            assert!(sent < 256 << 20, "the proxy kept reading while stalled");
        }
        client.set_nonblocking(false).unwrap();
        assert!(sent > 0);
        assert_quiet(&mut server);

        proxy.resume();
        let received = read_exactly(&mut server, sent);
        assert!(received.iter().enumerate().all(|(i, &b)| b == pattern(i)));
        client.write_all(b"end").unwrap();
        assert_eq!(read_exactly(&mut server, 3), b"end");
    }

    #[test]
    fn tcp_reset_all_resets_both_sides_and_new_connections_work() {
        let listener = upstream();
        let proxy = TcpProxy::start(listener.local_addr().unwrap());
        let (mut client, mut server) = pair(&proxy, &listener);
        let (mut stalled_client, mut stalled_server) = pair(&proxy, &listener);
        client.write_all(b"a").unwrap();
        assert_eq!(read_exactly(&mut server, 1), b"a");
        stalled_client.write_all(b"b").unwrap();
        assert_eq!(read_exactly(&mut stalled_server, 1), b"b");

        proxy.stall();
        stalled_client.write_all(b"held").unwrap();
        proxy.reset_all();
        proxy.resume();
        for stream in [
            &mut client,
            &mut server,
            &mut stalled_client,
            &mut stalled_server,
        ] {
            // `reset_all` has returned, so the resets are already on their way.
            let error = stream.read(&mut [0u8; 64]).expect_err("a reset connection");
            assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
        }
        assert_eq!(proxy.accepted(), 2);

        let (mut client, mut server) = pair(&proxy, &listener);
        client.write_all(b"again").unwrap();
        assert_eq!(read_exactly(&mut server, 5), b"again");
        server.write_all(b"ok").unwrap();
        assert_eq!(read_exactly(&mut client, 2), b"ok");
        assert_eq!(proxy.accepted(), 3);
    }

    #[test]
    fn tcp_half_close_is_forwarded() {
        let listener = upstream();
        let proxy = TcpProxy::start(listener.local_addr().unwrap());
        let (mut client, mut server) = pair(&proxy, &listener);
        client.write_all(b"last").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut received = Vec::new();
        server.read_to_end(&mut received).expect("end of stream");
        assert_eq!(received, b"last");

        server.write_all(b"bye").unwrap();
        drop(server);
        let mut received = Vec::new();
        client.read_to_end(&mut received).expect("end of stream");
        assert_eq!(received, b"bye");
    }

    #[test]
    fn tcp_drop_closes_listener_and_connections() {
        let listener = upstream();
        let proxy = TcpProxy::start(listener.local_addr().unwrap());
        let addr = proxy.addr;
        let (mut client, mut server) = pair(&proxy, &listener);
        client.write_all(b"hi").unwrap();
        assert_eq!(read_exactly(&mut server, 2), b"hi");

        drop(proxy);
        assert_closed(&mut client);
        assert_closed(&mut server);
        let refused = TcpStream::connect(addr).expect_err("nothing listens any more");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }

    fn udp_socket() -> UdpSocket {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
        socket
    }

    fn receive(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buffer = [0u8; 2048];
        let (len, from) = socket.recv_from(&mut buffer).expect("datagram");
        (buffer[..len].to_vec(), from)
    }

    fn assert_udp_quiet(socket: &UdpSocket) {
        socket.set_read_timeout(Some(QUIET)).unwrap();
        let mut buffer = [0u8; 2048];
        match socket.recv_from(&mut buffer) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            other => panic!("expected no datagram, got {other:?}"),
        }
        socket.set_read_timeout(Some(PATIENCE)).unwrap();
    }

    #[test]
    fn udp_round_trip_and_drop_all() {
        let echo = udp_socket();
        let proxy = UdpProxy::start(echo.local_addr().unwrap());
        let client = udp_socket();

        client.send_to(b"one", proxy.addr).unwrap();
        let (data, mapped) = receive(&echo);
        assert_eq!(data, b"one");
        assert_ne!(mapped, proxy.addr);
        echo.send_to(&data, mapped).unwrap();
        assert_eq!(receive(&client), (b"one".to_vec(), proxy.addr));
        assert_eq!((proxy.forwarded(), proxy.dropped()), (2, 0));

        proxy.drop_all();
        client.send_to(b"lost out", proxy.addr).unwrap();
        assert_udp_quiet(&echo);
        echo.send_to(b"lost back", mapped).unwrap();
        assert_udp_quiet(&client);
        // A datagram is judged when the proxy reads it: both must be read before resuming.
        let deadline = std::time::Instant::now() + PATIENCE;
        while proxy.dropped() < 2 {
            assert!(std::time::Instant::now() < deadline, "the proxy read both");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }

        proxy.resume();
        // Each socket delivers in order, so the dropped datagrams were handled before these.
        client.send_to(b"two", proxy.addr).unwrap();
        assert_eq!(receive(&echo), (b"two".to_vec(), mapped));
        echo.send_to(b"two", mapped).unwrap();
        assert_eq!(receive(&client), (b"two".to_vec(), proxy.addr));
        assert_eq!((proxy.forwarded(), proxy.dropped()), (4, 2));
    }

    #[test]
    fn udp_each_client_address_gets_its_own_upstream_address() {
        let server = udp_socket();
        let proxy = UdpProxy::start(server.local_addr().unwrap());
        let (first, second) = (udp_socket(), udp_socket());

        first.send_to(b"first", proxy.addr).unwrap();
        let (data, first_mapped) = receive(&server);
        assert_eq!(data, b"first");
        second.send_to(b"second", proxy.addr).unwrap();
        let (data, second_mapped) = receive(&server);
        assert_eq!(data, b"second");
        assert_ne!(first_mapped, second_mapped);
        first.send_to(b"first again", proxy.addr).unwrap();
        assert_eq!(receive(&server), (b"first again".to_vec(), first_mapped));

        server.send_to(b"to second", second_mapped).unwrap();
        server.send_to(b"to first", first_mapped).unwrap();
        assert_eq!(receive(&second), (b"to second".to_vec(), proxy.addr));
        assert_eq!(receive(&first), (b"to first".to_vec(), proxy.addr));
        assert_eq!((proxy.forwarded(), proxy.dropped()), (5, 0));
    }

    #[test]
    fn udp_drop_closes_the_socket() {
        let server = udp_socket();
        let proxy = UdpProxy::start(server.local_addr().unwrap());
        let addr = proxy.addr;
        drop(proxy);
        UdpSocket::bind(addr).expect("the proxy's port is free again");
    }
}
