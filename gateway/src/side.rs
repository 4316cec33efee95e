//! The side runtime: one thread (`tern-side`) with a tokio runtime for everything HTTP — the
//! admin API, and (as they are configured) webhooks and push providers. The cores never wait
//! on it: they reach it through bounded queues and one-shot answers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tern_storage::MessageStore;
use tracing::warn;

use crate::admin::Bridge;
use crate::config::Config;
use crate::server::GatewayError;
use crate::token::Secret;

/// The running side thread.
#[derive(Debug)]
pub struct Side {
    thread: Option<std::thread::JoinHandle<()>>,
    api_url: Option<String>,
    handle: tokio::runtime::Handle,
    /// What the cores hand to the side thread.
    pub hooks: Hooks,
}

/// The side thread's entry points for the cores.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// The webhooks (a disabled handle when none is configured).
    pub webhooks: crate::webhook::Webhooks,
    /// Offline push notification jobs (None when no push provider is configured).
    pub offline: Option<async_channel::Sender<crate::push::OfflineJob>>,
}

/// Offline jobs the side thread holds before cores start dropping them.
const OFFLINE_QUEUE: usize = 10_000;

impl Side {
    /// Starts the side thread: binds the API (failing the start with the address if it cannot)
    /// and serves it until `shutdown` is set.
    pub fn start(
        cfg: &Arc<Config>,
        store: Arc<dyn MessageStore>,
        secret: Secret,
        bridge: Bridge,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Side, GatewayError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("tern-side")
            .build()
            .map_err(|e| GatewayError::Api(format!("cannot start the side runtime: {e}")))?;
        let handle = rt.handle().clone();
        let store_for_janitor = store.clone();
        let webhooks = if cfg.webhook.url.is_empty() {
            crate::webhook::Webhooks::disabled()
        } else {
            crate::webhook::Webhooks::start(cfg.webhook.clone(), &handle)
                .map_err(|e| GatewayError::Api(format!("webhook: {e}")))?
        };
        let any_provider =
            cfg.notify.webhook.is_some() || cfg.notify.apns.is_some() || cfg.notify.fcm.is_some();
        let mut offline_worker = None;
        let mut offline = None;
        let mut notifier = crate::notify::Notifier::disabled();
        if any_provider {
            let forget_store = store.clone();
            let hook: crate::notify::InvalidTokenHook =
                Arc::new(move |n| crate::push::forget_token(&*forget_store, n));
            notifier = crate::notify::Notifier::start(cfg.notify.clone(), &handle, Some(hook))
                .map_err(|e| GatewayError::Api(format!("notify: {e}")))?;
            let (tx, rx) = async_channel::bounded(OFFLINE_QUEUE);
            offline = Some(tx);
            offline_worker = Some(crate::push::run_offline(
                store.clone(),
                notifier.clone(),
                bridge.clone(),
                rx,
            ));
        }
        let mut api = None;
        if let Some(addr) = cfg.api {
            let api_secret = match &cfg.api_secret {
                Some(s) => s.clone(),
                None => {
                    let s =
                        Secret::load_or_create_named(&cfg.data_dir, "api_secret").map_err(|e| {
                            GatewayError::DataDir {
                                path: cfg.data_dir.join("api_secret").display().to_string(),
                                message: e.to_string(),
                            }
                        })?;
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
            };
            let std_listener =
                std::net::TcpListener::bind(addr).map_err(|e| GatewayError::Listen {
                    addr,
                    message: format!("admin API: {e}"),
                })?;
            let bound = std_listener
                .local_addr()
                .map_err(|e| GatewayError::Listen {
                    addr,
                    message: e.to_string(),
                })?;
            std_listener
                .set_nonblocking(true)
                .map_err(|e| GatewayError::Listen {
                    addr,
                    message: e.to_string(),
                })?;
            let tls = match (&cfg.tls_cert, &cfg.tls_key) {
                (Some(cert), Some(key)) => {
                    let identity = tern_quic::tls::load(cert, key)?;
                    let mut config = (*tern_quic::tls::server_config(&identity)?).clone();
                    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                    Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
                }
                _ => None,
            };
            let mut st = crate::api::ApiState::new(bridge, store, cfg.clone(), secret, &api_secret);
            st.webhooks = webhooks.clone();
            st.notifier = notifier.clone();
            let state = Arc::new(st);
            api = Some((std_listener, tls, state, bound));
        }
        let janitor_store = store_for_janitor;
        let api_url = api
            .as_ref()
            .map(|(_, tls, _, bound)| crate::api::describe(*bound, tls.is_some()));
        let thread = std::thread::Builder::new()
            .name("tern-side".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(push_janitor(janitor_store));
                    if let Some(worker) = offline_worker {
                        tokio::spawn(worker);
                    }
                    let stop = async {
                        while !shutdown.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    match api {
                        Some((listener, tls, state, _)) => {
                            match tokio::net::TcpListener::from_std(listener) {
                                Ok(listener) => {
                                    let app = crate::api::router(state);
                                    crate::api::serve(listener, tls, app, stop).await;
                                }
                                Err(e) => {
                                    warn!(error = %e, "admin API listener failed");
                                    stop.await;
                                }
                            }
                        }
                        None => stop.await,
                    }
                });
            })
            .map_err(|e| GatewayError::Api(format!("cannot start the side thread: {e}")))?;
        Ok(Side {
            thread: Some(thread),
            api_url,
            handle,
            hooks: Hooks { webhooks, offline },
        })
    }

    /// The API's URL base, if it listens.
    pub fn api_url(&self) -> Option<String> {
        self.api_url.clone()
    }

    /// A handle on the side runtime (for webhooks and push providers).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Waits for the side thread to end (it ends once shutdown is set).
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Deletes expired pushes once a minute (and once at start).
async fn push_janitor(store: Arc<dyn MessageStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        match crate::push::sweep_expired(&*store, crate::core::now_ms()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired pushes deleted"),
            Err(e) => warn!(error = %e, "cannot delete expired pushes"),
        }
    }
}
