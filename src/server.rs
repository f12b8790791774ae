//! Listeners and connections: bind, accept, serve with hyper, shut down gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, Matcher};
use crate::proxy::Proxy;
use crate::route::Via;
use crate::StartError;

/// A credgate whose listeners are bound (so callers can learn their ports) but not yet serving.
pub struct Server {
    proxy: Arc<Proxy>,
    listeners: Vec<Listener>,
    grace: Duration,
    header_read_timeout: Duration,
}

struct Listener {
    via: Via,
    /// The route that owns this listener, if it is a dedicated one.
    route: Option<String>,
    socket: TcpListener,
}

impl Server {
    /// Binds every listener in the config: `[server] listen` and each route's own `listen`.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let mut wanted: Vec<(Via, Option<String>, SocketAddr)> = config
            .server
            .listen
            .iter()
            .map(|a| (Via::Shared, None, *a))
            .collect();
        for r in &config.routes {
            if let Matcher::Listener(addr) = r.matcher {
                wanted.push((Via::Dedicated(addr), Some(r.name.to_string()), addr));
            }
        }
        let mut listeners = Vec::with_capacity(wanted.len());
        for (via, route, addr) in wanted {
            let socket = TcpListener::bind(addr)
                .await
                .map_err(|e| StartError::Bind(addr, e))?;
            listeners.push(Listener { via, route, socket });
        }
        let (grace, header_read_timeout) = (
            config.server.shutdown_grace,
            config.server.header_read_timeout,
        );
        Ok(Self {
            proxy: Arc::new(Proxy::new(config)?),
            listeners,
            grace,
            header_read_timeout,
        })
    }

    /// The bound addresses of the shared listeners.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|l| l.via == Via::Shared)
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// The bound address of a route's own listener.
    pub fn route_addr(&self, route: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.route.as_deref() == Some(route))
            .and_then(|l| l.socket.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests
    /// finish for up to the configured grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        let graceful = Arc::new(GracefulShutdown::new());
        let (stop_tx, stop_rx) = watch::channel(());
        self.proxy.start();
        let mut accepting = tokio::task::JoinSet::new();
        for l in self.listeners {
            if let Ok(addr) = l.socket.local_addr() {
                tracing::info!(%addr, route = l.route.as_deref().unwrap_or("(shared)"), "listening");
            }
            accepting.spawn(accept_loop(
                l,
                self.proxy.clone(),
                builder.clone(),
                graceful.clone(),
                stop_rx.clone(),
            ));
        }
        shutdown.await;
        tracing::info!(
            grace_s = self.grace.as_secs_f32(),
            "shutting down: no new connections, finishing in-flight requests"
        );
        drop(stop_tx);
        while accepting.join_next().await.is_some() {}
        let graceful = Arc::into_inner(graceful).expect("accept loops have ended");
        match tokio::time::timeout(self.grace, graceful.shutdown()).await {
            Ok(()) => tracing::info!("all connections closed"),
            Err(_) => tracing::warn!("grace period over; closing remaining connections"),
        }
    }
}

async fn accept_loop(
    l: Listener,
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    graceful: Arc<GracefulShutdown>,
    mut stop: watch::Receiver<()>,
) {
    let via = l.via;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.changed() => return,
            accepted = l.socket.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let svc = service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(via, req).await) }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
