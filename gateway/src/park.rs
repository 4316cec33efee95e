//! Parked connections: what an idle logged-in TCP connection costs.
//!
//! A session that received nothing for `park_after_ms`, with nothing queued for it, gives up
//! its glommio state: its writer task ends, its request handling state is freed, and its
//! socket leaves glommio (whose pending read keeps an I/O source of about 500 bytes per
//! connection). The socket waits instead in one epoll set shared by every core, watched by one
//! thread ([`Parker`]). The session comes back, on its own core and in the same task, when
//! the socket becomes readable (a frame, or the peer closing), when something is queued for
//! it (a delivery, a kick), or when it must end.
//!
//! The watcher only reports: it pushes the session id to its core's inbox (a lock-free queue)
//! and wakes that core's [`run_unparker`], which wakes the session. Nothing of a session is
//! touched off its core. A report that arrives late (the session already came back for
//! another reason) is ignored, or costs at most one needless trip.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;
use polling::{Event, Events, Poller};
use tracing::warn;

use crate::core::Core;
use crate::sys::MovedFd;

/// The epoll set of parked sockets and the thread that watches it.
#[derive(Debug)]
pub struct Parker {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    poller: Poller,
    /// Per core: ids of its parked sessions whose socket became ready.
    inboxes: Box<[Inbox]>,
    stop: AtomicBool,
}

#[derive(Debug, Default)]
struct Inbox {
    ready: SegQueue<u64>,
    waker: AtomicWaker,
}

impl Parker {
    /// Creates the epoll set and starts its watcher thread, for `cores` cores.
    pub fn start(cores: usize) -> std::io::Result<Parker> {
        let shared = Arc::new(Shared {
            poller: Poller::new()?,
            inboxes: (0..cores).map(|_| Inbox::default()).collect(),
            stop: AtomicBool::new(false),
        });
        let watcher = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tern-parked".into())
            .spawn(move || watcher.watch())?;
        Ok(Parker {
            shared,
            thread: Some(thread),
        })
    }

    /// Parks `fd`, the socket of session `session` (whose id names its core): its readiness
    /// will wake the session through its core's [`run_unparker`]. On failure the descriptor
    /// is given back.
    pub fn park(&self, fd: MovedFd, session: u64) -> Result<ParkedFd, (std::io::Error, MovedFd)> {
        match crate::sys::watch(&self.shared.poller, &fd, Event::readable(session as usize)) {
            Ok(()) => Ok(ParkedFd {
                fd: Some(fd),
                shared: self.shared.clone(),
            }),
            Err(e) => Err((e, fd)),
        }
    }
}

impl Drop for Parker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if self.shared.poller.notify().is_ok()
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn watch(&self) {
        let mut events = Events::new();
        let mut woken = vec![false; self.inboxes.len()];
        loop {
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                warn!(error = %e, "parked connections can no longer be watched");
                return;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            for ev in events.iter() {
                let session = ev.key as u64;
                let core = crate::core::core_of_session(session);
                if let Some(inbox) = self.inboxes.get(core) {
                    inbox.ready.push(session);
                    woken[core] = true;
                }
            }
            for (core, w) in woken.iter_mut().enumerate() {
                if std::mem::take(w) {
                    self.inboxes[core].waker.wake();
                }
            }
        }
    }
}

/// A parked socket. Leaves the epoll set when taken back or dropped.
#[derive(Debug)]
pub struct ParkedFd {
    fd: Option<MovedFd>,
    shared: Arc<Shared>,
}

impl ParkedFd {
    /// Takes the socket out of the epoll set.
    pub fn unpark(mut self) -> MovedFd {
        let fd = self.fd.take().expect("taken once");
        let _ = self.shared.poller.delete(fd.as_fd());
        fd
    }
}

impl AsRawFd for ParkedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
    }
}

impl Drop for ParkedFd {
    fn drop(&mut self) {
        if let Some(fd) = &self.fd {
            let _ = self.shared.poller.delete(fd.as_fd());
        }
    }
}

/// Wakes this core's parked sessions whose socket became ready. Runs for the core's life.
pub async fn run_unparker(core: Rc<Core>, parker: Arc<Parker>) {
    let inbox = &parker.shared.inboxes[core.id];
    loop {
        std::future::poll_fn(|cx| {
            inbox.waker.register(cx.waker());
            if inbox.ready.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        while let Some(id) = inbox.ready.pop() {
            if let Some(s) = core.sessions.borrow().get(&id) {
                s.wake_readable();
            }
        }
    }
}
