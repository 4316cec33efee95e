//! Runtime-agnostic completions for writes.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

#[cfg(feature = "store")]
use futures_channel::oneshot;

use crate::error::{Result, StorageError};

/// The eventual result of a write (append, read position, membership change).
///
/// A plain future that any executor can poll (glommio, tokio, or [`Completion::wait`] on an
/// ordinary thread): the store's writer thread completes it through a one-shot channel and
/// wakes the task. It never hangs: if the writer goes away first (store closed), it resolves
/// to [`StorageError::Closed`]. Dropping it does not cancel the write.
#[derive(Debug)]
#[must_use = "a write is only known to be stored once its completion resolves to Ok"]
pub struct Completion<T> {
    state: State<T>,
}

#[derive(Debug)]
enum State<T> {
    Ready(Option<Result<T>>),
    /// Resolved by the writer thread (only `RocksStore` has one).
    #[cfg(feature = "store")]
    Pending(oneshot::Receiver<Result<T>>),
    Done,
}

// The state holds no self-references and is never pinned-projected.
impl<T> Unpin for Completion<T> {}

/// The writer's half of a [`Completion`].
#[cfg(feature = "store")]
pub(crate) type Completer<T> = oneshot::Sender<Result<T>>;

impl<T> Completion<T> {
    /// An already resolved completion.
    pub fn ready(r: Result<T>) -> Self {
        Completion {
            state: State::Ready(Some(r)),
        }
    }

    #[cfg(feature = "store")]
    pub(crate) fn channel() -> (Completer<T>, Self) {
        let (tx, rx) = oneshot::channel();
        (
            tx,
            Completion {
                state: State::Pending(rx),
            },
        )
    }

    /// Blocks the calling thread until the write completes. For tests, tools and plain
    /// threads; never call it on a reactor thread (await the future there instead).
    pub fn wait(mut self) -> Result<T> {
        thread_local! {
            static WAKER: RefCell<Option<Waker>> = const { RefCell::new(None) };
        }
        let waker = WAKER.with(|w| {
            w.borrow_mut()
                .get_or_insert_with(|| Waker::from(Arc::new(Unparker(thread::current()))))
                .clone()
        });
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(r) = Pin::new(&mut self).poll(&mut cx) {
                return r;
            }
            thread::park();
        }
    }
}

struct Unparker(Thread);

impl Wake for Unparker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl<T> Future for Completion<T> {
    type Output = Result<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let this = self.get_mut();
        // Without the writer thread (`MemStore` only) every completion is ready when made.
        #[cfg(not(feature = "store"))]
        let _ = cx;
        let out = match &mut this.state {
            State::Ready(r) => r.take().unwrap_or(Err(StorageError::Closed)),
            #[cfg(feature = "store")]
            State::Pending(rx) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(r)) => r,
                Poll::Ready(Err(oneshot::Canceled)) => Err(StorageError::Closed),
            },
            State::Done => panic!("Completion polled after it resolved"),
        };
        this.state = State::Done;
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_across_threads_and_on_drop() {
        let (tx, c) = Completion::<u32>::channel();
        let t = thread::spawn(move || tx.send(Ok(5)));
        assert_eq!(c.wait(), Ok(5));
        t.join().unwrap().unwrap();

        let (tx, c) = Completion::<u32>::channel();
        drop(tx);
        assert_eq!(c.wait(), Err(StorageError::Closed));
        assert_eq!(Completion::ready(Ok(1)).wait(), Ok(1));
    }
}
