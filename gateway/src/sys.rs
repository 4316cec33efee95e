//! The gateway's only `unsafe`: moving a socket's file descriptor between cores (and parking
//! it, `park.rs`), sending to a socket outside glommio (the core's flusher, `outbound.rs`), and
//! the few system calls std does not wrap (limits, socket options, signals, huge pages).
//!
//! glommio's `TcpStream` is bound to the executor that created it and has no `into_raw_fd`, so a
//! connection changes core by duplicating its descriptor, dropping the original stream on the
//! accepting core, and adopting the duplicate on the owning core.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use glommio::net::TcpStream;

/// A descriptor in flight between cores, or parked (`park.rs`). Closes itself if never
/// adopted.
#[derive(Debug)]
pub struct MovedFd(OwnedFd);

impl AsFd for MovedFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for MovedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Adds a parked socket to the parked connections' epoll set.
pub fn watch(
    poller: &polling::Poller,
    fd: &MovedFd,
    interest: polling::Event,
) -> std::io::Result<()> {
    // SAFETY: polling requires the descriptor to be deleted from the set before it is closed.
    // `fd` only leaves `park.rs` through `ParkedFd`, whose `unpark` and `Drop` delete it first.
    unsafe { poller.add(fd.as_raw_fd(), interest) }
}

/// Duplicates `stream`'s descriptor so the stream can be dropped while the socket lives on.
pub fn dup_stream(stream: &TcpStream) -> std::io::Result<MovedFd> {
    let fd: RawFd = stream.as_raw_fd();
    // SAFETY: `fd` is a valid open descriptor owned by `stream`, which outlives this call.
    // F_DUPFD_CLOEXEC returns a new descriptor we then own exclusively.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(MovedFd(unsafe { OwnedFd::from_raw_fd(new) }))
}

/// Adopts a moved descriptor as a stream of the current executor.
pub fn adopt_stream(fd: MovedFd) -> TcpStream {
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd.0);
    // SAFETY: `raw` is an open, connected TCP socket whose ownership we take over from the
    // `OwnedFd` (into_raw_fd released it); nothing else refers to it.
    unsafe { TcpStream::from_raw_fd(raw) }
}

/// Sets up (and closes) a one-entry io_uring to see whether the kernel lets this process use
/// io_uring at all: the error if it does not (ENOSYS: no io_uring, or a seccomp filter hides
/// it; EPERM: turned off by `kernel.io_uring_disabled` or a security policy), None if it does
/// or failed for another reason (such as locked memory).
pub fn io_uring_refused() -> Option<std::io::Error> {
    // struct io_uring_params: 120 bytes, zeroed asks for nothing special.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes only `params`, which is large enough.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd >= 0 {
        // SAFETY: `fd` is the ring's descriptor, ours alone.
        unsafe { libc::close(fd as libc::c_int) };
        return None;
    }
    let e = std::io::Error::last_os_error();
    matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)).then_some(e)
}

/// The soft and hard value of a resource limit (0, 0 if it cannot be read).
pub fn rlimit(resource: libc::__rlimit_resource_t) -> (u64, u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid, writable rlimit; getrlimit only writes into it.
    if unsafe { libc::getrlimit(resource, &mut r) } == 0 {
        (r.rlim_cur, r.rlim_max)
    } else {
        (0, 0)
    }
}

/// shutdown(2) on a stream's socket, synchronously (no borrow of the stream is held across an
/// await). Errors (e.g. already disconnected) are ignored: this is best effort before a close.
pub fn shutdown(stream: &TcpStream, how: std::net::Shutdown) {
    shutdown_fd(stream.as_raw_fd(), how);
}

/// [`shutdown`] on a descriptor that the caller knows to be open.
pub fn shutdown_fd(fd: RawFd, how: std::net::Shutdown) {
    let how = match how {
        std::net::Shutdown::Read => libc::SHUT_RD,
        std::net::Shutdown::Write => libc::SHUT_WR,
        std::net::Shutdown::Both => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown(2) does not touch memory; on a descriptor that is not an open socket it
    // only fails.
    unsafe {
        libc::shutdown(fd, how);
    }
}

/// Makes the socket's close send a reset (SO_LINGER with a zero timeout) and drop whatever is
/// still queued in either direction. Best effort.
pub fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the caller passes an open socket; `linger` is a valid struct of the size passed,
    // which setsockopt only reads. A stale descriptor only makes the call fail.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Bytes written to the socket that the peer has not acknowledged yet (SIOCOUTQ); 0 on error.
pub fn unsent_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (= SIOCOUTQ) writes one int into `n`, which is valid and writable.
    let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if r == 0 { n.max(0) as usize } else { 0 }
}

/// Stops the kernel from backing this process's memory with transparent huge pages
/// (`PR_SET_THP_DISABLE`, inherited by threads and children). Fails only on kernels without
/// the setting (before 3.15).
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes a write past the file-size limit (`ulimit -f`) fail with `EFBIG`, which the store
/// reports as a write error, instead of killing the process with SIGXFSZ.
pub fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; it is
    // async-signal-safe and affects only how the kernel delivers SIGXFSZ.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Makes a write to a connection the peer has closed fail with `EPIPE` instead of killing the
/// process with SIGPIPE. A Rust `main` ignores SIGPIPE already; a gateway embedded in another
/// program (or run under a C `main`, as the session fuzz target does) must too.
pub fn ignore_broken_pipe_signal() {
    // SAFETY: as above, SIG_IGN installs no handler code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Sends what a TCP socket takes now, without blocking and without SIGPIPE. `WouldBlock` when it
/// takes nothing.
pub fn send_now(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the call; the kernel checks `fd`.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}
