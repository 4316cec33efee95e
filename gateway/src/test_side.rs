//! For unit tests of code that runs on the side runtime (webhooks, push providers).

use std::future::Future;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Failure deadline of every wait; no test waits on time to make progress.
pub(crate) const WAIT: Duration = Duration::from_secs(20);

/// The side runtime as the gateway runs it: one tokio thread. The tests, like the cores,
/// call in from outside it.
pub(crate) struct Side {
    pub(crate) handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Side {
    pub(crate) fn start() -> Side {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            });
        });
        Side {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Awaits `f` on this (non-tokio) thread, failing the test after `WAIT`.
    pub(crate) fn wait<F: Future>(&self, f: F) -> F::Output {
        let (expired, expiry) = oneshot::channel::<()>();
        let watchdog = self.handle.spawn(async move {
            tokio::time::sleep(WAIT).await;
            let _ = expired.send(());
        });
        let out = futures_lite::future::block_on(futures_lite::future::or(
            async { Some(f.await) },
            async {
                let _ = expiry.await;
                None
            },
        ));
        watchdog.abort();
        out.expect("timed out")
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}
