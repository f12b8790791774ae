//! Listeners and connections: bind, accept, serve; reload on SIGHUP or file change; shut down
//! gracefully.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};

use crate::config::{self, Config, ListenAddr, Matcher};
use crate::conn::{Conn, Counted, Drain};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::route::Via;
use crate::StartError;

/// What every connection reads: the current request path (swapped whole on reload, so
/// in-flight requests finish on the one they started with) and the metrics.
pub struct Shared {
    pub proxy: Arc<ArcSwap<Proxy>>,
    pub metrics: Arc<Metrics>,
}

/// What a listener is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Role {
    /// `[server] listen`: routed by host, prefix or absolute URI.
    Shared,
    /// A route's own `listen`, by route name.
    Dedicated(Arc<str>),
    /// `[server] admin`.
    Admin,
}

type Key = (Role, ListenAddr);

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

struct Bound {
    key: Key,
    route: Option<String>,
    socket: Socket,
}

/// A credgate whose listeners are bound (so callers can learn their ports) but not yet serving.
pub struct Server {
    shared: Arc<Shared>,
    config_path: PathBuf,
    files: Vec<PathBuf>,
    listeners: Vec<Bound>,
    settings: config::Server,
    workers: Option<Workers>,
}

/// Threads that serve connections, each on its own single-threaded runtime (like nginx's worker
/// processes): a connection, its requests and the upstream connections they open stay on one
/// thread, with no work stealing or cross-thread wake-ups on the request path. Every worker
/// accepts from every listening socket (see [`Serving::accept_on`]).
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// The connections each worker serves now.
    load: Vec<Gauge>,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(n: usize) -> std::io::Result<Self> {
        let mut w = Self {
            handles: Vec::with_capacity(n),
            load: (0..n).map(|_| Gauge::default()).collect(),
            stop: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::telemetry::on_park)
                .build()?;
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            w.handles.push(rt.handle().clone());
            w.stop.push(stop);
            w.threads.push(
                std::thread::Builder::new()
                    .name(format!("credgate-worker-{i}"))
                    .spawn(move || {
                        let _ = rt.block_on(stopped);
                    })?,
            );
        }
        Ok(w)
    }

    /// The worker to serve a connection that worker `me` accepted, counted there: `me`, unless
    /// it serves [`SLACK`] and a quarter more connections than the least busy worker. Without
    /// this, a burst of new keep-alive connections could all land on whichever worker was
    /// awake; with a tighter bound, the counts' swings under connection-per-request load cost
    /// hand-overs.
    fn seat(&self, me: usize) -> (usize, Counted) {
        let least = (0..self.load.len())
            .min_by_key(|&i| self.load[i].get())
            .unwrap_or(me);
        let mine = self.load[me].get();
        let to = if mine > self.load[least].get() + SLACK + mine / 4 {
            least
        } else {
            me
        };
        (to, Counted::new(&self.load[to]))
    }

    /// Ends the worker threads (what still runs on them is dropped) and waits for them.
    async fn stop(self) {
        drop(self.stop);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Server {
    /// Binds every listener in the config: `[server] listen`, `admin`, and each route's own.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        let settings = config.server.clone();
        let (config_path, files) = (config.source.clone(), config.files.clone());
        let mut listeners = Vec::new();
        for (key, route) in wanted(&config) {
            listeners.push(bind(key, route, settings.socket_mode).await?);
        }
        let metrics = Arc::new(Metrics::default());
        let proxy = Arc::new(ArcSwap::from_pointee(Proxy::new(config, &metrics, None)?));
        Ok(Self {
            shared: Arc::new(Shared { proxy, metrics }),
            config_path,
            files,
            listeners,
            settings,
            workers: None,
        })
    }

    /// Accepts and serves connections on `n` worker threads (see [`Workers`]) instead of the
    /// runtime that calls [`Server::run`], which then only reloads and refreshes tokens.
    pub fn with_workers(mut self, n: usize) -> Result<Self, StartError> {
        self.workers = Some(Workers::start(n).map_err(StartError::Workers)?);
        Ok(self)
    }

    /// The bound addresses of the shared TCP listeners.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.tcp_addrs(|k| k.0 == Role::Shared)
    }

    /// The bound address of a route's own listener.
    pub fn route_addr(&self, route: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| l.route.as_deref() == Some(route))
            .and_then(|l| local_addr(&l.socket))
    }

    /// The bound address of the admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.tcp_addrs(|k| k.0 == Role::Admin).first().copied()
    }

    fn tcp_addrs(&self, f: impl Fn(&Key) -> bool) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|l| f(&l.key))
            .filter_map(|l| local_addr(&l.socket))
            .collect()
    }

    /// Serves until `shutdown` completes, reloading the config on SIGHUP or when a file it
    /// reads changes; then stops accepting and lets in-flight requests finish for up to the
    /// configured grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let ctx = Arc::new(Serving {
            shared: self.shared,
            drain: Drain::default(),
            running: Mutex::new(HashMap::new()),
            header_read_timeout: self.settings.header_read_timeout,
            workers: self.workers.map(Arc::new),
        });
        let workers = ctx.workers.clone();
        // Before any listener accepts: a SIGHUP must never meet the default action (exit).
        let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        // Watching starts before any listener is announced, so no edit made after that is missed.
        let (changes, changed) = mpsc::unbounded_channel::<&'static str>();
        let watcher = watch_files(&self.files, changes.clone());
        ctx.shared.proxy.load().start();
        for l in self.listeners {
            ctx.spawn(l);
        }
        let (stop_reloading, reloading_stopped) = tokio::sync::oneshot::channel();
        let reloader = tokio::spawn(reloader(
            ctx.clone(),
            self.config_path,
            self.files,
            hangups.ok(),
            (changes, changed, watcher),
            reloading_stopped,
        ));

        shutdown.await;
        tracing::info!(
            grace_s = self.settings.shutdown_grace.as_secs_f32(),
            "shutting down: no new connections, finishing in-flight requests"
        );
        // Not aborted: a reload that is stopping a listener finishes first, or that listener's
        // accept tasks would still hold the server and no connection would be drained.
        let _ = stop_reloading.send(());
        let _ = reloader.await;
        let running: Vec<Running> = ctx
            .running
            .lock()
            .expect("listeners lock")
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in running {
            r.stop().await;
        }
        match Arc::into_inner(ctx) {
            Some(ctx) => {
                let closed =
                    tokio::time::timeout(self.settings.shutdown_grace, ctx.drain.shutdown());
                match closed.await {
                    Ok(()) => tracing::info!("all connections closed"),
                    Err(_) => tracing::warn!("grace period over; closing remaining connections"),
                }
            }
            None => {
                tracing::warn!("a listener task is still running; not waiting for connections")
            }
        }
        if let Some(workers) = workers.and_then(Arc::into_inner) {
            workers.stop().await;
        }
    }
}

/// The listeners a config asks for.
fn wanted(config: &Config) -> Vec<(Key, Option<String>)> {
    let shared = config
        .server
        .listen
        .iter()
        .map(|a| ((Role::Shared, a.clone()), None));
    let admin = config
        .server
        .admin
        .map(|a| ((Role::Admin, ListenAddr::Tcp(a)), None));
    let dedicated = config.routes.iter().filter_map(|r| match r.matcher {
        Matcher::Listener(a) => Some((
            (Role::Dedicated(r.name.clone()), ListenAddr::Tcp(a)),
            Some(r.name.to_string()),
        )),
        Matcher::Shared { .. } => None,
    });
    shared.chain(admin).chain(dedicated).collect()
}

async fn bind(key: Key, route: Option<String>, socket_mode: u32) -> Result<Bound, StartError> {
    let socket = match &key.1 {
        ListenAddr::Tcp(addr) => {
            Socket::Tcp(bind_tcp(*addr).map_err(|e| StartError::Bind(key.1.to_string(), e))?)
        }
        ListenAddr::Unix(path) => Socket::Unix(
            bind_unix(path, socket_mode).map_err(|e| StartError::Bind(key.1.to_string(), e))?,
        ),
    };
    Ok(Bound { key, route, socket })
}

/// Connections the kernel completes before credgate accepts them. tokio's bind uses 128, which
/// lets a burst of new connections (a test rig, a fleet of cron jobs starting at once) overflow
/// the queue, and each caller that overflows it waits a second for its SYN to be resent. The
/// kernel caps this at `net.core.somaxconn` (4096 since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4096;

/// How many more connections than the least busy worker a worker serves before it hands new
/// ones over (see [`Workers::seat`]).
const SLACK: i64 = 2;

fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds a Unix socket (replacing a stale one from an earlier run) with the given mode, so
/// file permissions decide who may spend the credentials.
fn bind_unix(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

fn local_addr(s: &Socket) -> Option<SocketAddr> {
    match s {
        Socket::Tcp(l) => l.local_addr().ok(),
        Socket::Unix(_) => None,
    }
}

/// Everything the listeners share while serving.
struct Serving {
    shared: Arc<Shared>,
    drain: Drain,
    /// The listeners accepting now, by what they are for and where. A std mutex: only the
    /// reloader and shutdown touch it, never across an await.
    running: Mutex<HashMap<Key, Running>>,
    header_read_timeout: Duration,
    workers: Option<Arc<Workers>>,
}

struct Running {
    stop: watch::Sender<()>,
    /// An accept loop per worker (one on the calling runtime without workers).
    tasks: Vec<tokio::task::JoinHandle<()>>,
    path: Option<PathBuf>,
}

impl Running {
    async fn stop(self) {
        drop(self.stop);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(p) = self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Serving {
    fn spawn(self: &Arc<Self>, l: Bound) {
        let (stop, stopped) = watch::channel(());
        let shown = match &l.socket {
            Socket::Tcp(s) => s
                .local_addr()
                .map_or_else(|_| l.key.1.to_string(), |a| a.to_string()),
            Socket::Unix(_) => l.key.1.to_string(),
        };
        let what = match (&l.key.0, &l.route) {
            (Role::Admin, _) => "admin".to_owned(),
            (_, Some(r)) => format!("route {r}"),
            _ => "shared".to_owned(),
        };
        let path = match &l.key.1 {
            ListenAddr::Unix(p) => Some(p.clone()),
            ListenAddr::Tcp(_) => None,
        };
        let role = l.key.0;
        let tasks = match &self.workers {
            None => vec![tokio::spawn(self.clone().accept_loop(
                None,
                role.clone(),
                l.socket,
                stopped,
            ))],
            Some(workers) => self.accept_on(workers, &role, l.socket, &stopped, &shown),
        };
        if tasks.is_empty() {
            // Left out of the running set, so the next reload binds it again.
            tracing::error!(addr = %shown, listener = %what, "no worker can accept; not listening");
            if let Some(p) = path {
                let _ = std::fs::remove_file(p);
            }
            return;
        }
        tracing::info!(addr = %shown, listener = %what, "listening");
        let key = (role, l.key.1);
        self.running
            .lock()
            .expect("listeners lock")
            .insert(key, Running { stop, tasks, path });
    }

    /// Starts an accept loop for `socket` on every worker, each with its own descriptor for it
    /// registered with its own runtime: a connection is served where it was accepted, with no
    /// hand-over between threads, unless that worker already serves more than its share (see
    /// [`Workers::seat`]). Each new connection wakes every idle worker; all but one find
    /// nothing to accept.
    fn accept_on(
        self: &Arc<Self>,
        workers: &Workers,
        role: &Role,
        socket: Socket,
        stopped: &watch::Receiver<()>,
        shown: &str,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let socket = match socket.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(addr = %shown, error = %e, "the workers cannot take the listener");
                return Vec::new();
            }
        };
        let mut tasks = Vec::with_capacity(workers.handles.len());
        for (i, rt) in workers.handles.iter().enumerate() {
            // Registered with the worker's runtime here, so a failure is known now.
            let mine = socket.try_clone().and_then(|s| {
                let _in = rt.enter();
                s.into_tokio()
            });
            match mine {
                Ok(mine) => tasks.push(rt.spawn(self.clone().accept_loop(
                    Some(i),
                    role.clone(),
                    mine,
                    stopped.clone(),
                ))),
                Err(e) => tracing::warn!(addr = %shown, error = %e, "a worker cannot accept"),
            }
        }
        tasks
    }

    /// Accepts on `socket` for worker `me` (the calling runtime without workers) until stopped.
    async fn accept_loop(
        self: Arc<Self>,
        me: Option<usize>,
        role: Role,
        socket: Socket,
        mut stop: watch::Receiver<()>,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stop.changed() => return,
                a = accept(&socket) => a,
            };
            match accepted {
                Ok(Accepted::Tcp(s)) => {
                    let _ = s.set_nodelay(true);
                    match me.zip(self.workers.as_deref()) {
                        Some((me, workers)) => match workers.seat(me) {
                            (to, seat) if to == me => self.conn(&role, Some(seat)).serve(s),
                            // Watched from now on, so a shutdown waits for it even before the
                            // other worker takes it.
                            (to, seat) => {
                                hand_over(&workers.handles[to], self.conn(&role, Some(seat)), s)
                            }
                        },
                        None => self.conn(&role, None).serve(s),
                    }
                }
                // Served where accepted, uncounted: few, and a Unix stream would need a
                // hand-over of its own.
                Ok(Accepted::Unix(s)) => self.conn(&role, None).serve(s),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// What a newly accepted connection needs; it is watched for shutdown from now on.
    fn conn(&self, role: &Role, seat: Option<Counted>) -> Conn {
        Conn {
            seat,
            shared: self.shared.clone(),
            stop: self.drain.stop_signal(),
            header_read_timeout: self.header_read_timeout,
            admin: *role == Role::Admin,
            via: match role {
                Role::Dedicated(name) => Via::Dedicated(name.clone()),
                _ => Via::Shared,
            },
        }
    }

    /// Loads the config again and swaps it in; the old one keeps serving if anything fails.
    async fn reload(self: &Arc<Self>, path: &Path) -> Result<Vec<PathBuf>, String> {
        let config = config::load(path).map_err(|e| e.to_string())?;
        let files = config.files.clone();
        let socket_mode = config.server.socket_mode;
        let want = wanted(&config);
        let missing: Vec<_> = {
            let running = self.running.lock().expect("listeners lock");
            want.iter()
                .filter(|(k, _)| !running.contains_key(k))
                .cloned()
                .collect()
        };
        let mut fresh = Vec::with_capacity(missing.len());
        for (key, route) in missing {
            fresh.push(
                bind(key, route, socket_mode)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let proxy = Proxy::new(
            config,
            &self.shared.metrics,
            Some(&self.shared.proxy.load()),
        )
        .map_err(|e| e.to_string())?;
        proxy.start();
        self.shared.proxy.store(Arc::new(proxy));
        let gone: Vec<Running> = {
            let mut running = self.running.lock().expect("listeners lock");
            let gone_keys: Vec<Key> = running
                .keys()
                .filter(|k| !want.iter().any(|(w, _)| w == *k))
                .cloned()
                .collect();
            gone_keys.iter().filter_map(|k| running.remove(k)).collect()
        };
        for r in gone {
            r.stop().await;
        }
        // Only now: a new socket may replace a removed one at the same path.
        for l in fresh {
            self.spawn(l);
        }
        Ok(files)
    }
}

/// Serves `s` on the worker `rt` runs: the socket moves to that worker's runtime.
fn hand_over(rt: &tokio::runtime::Handle, conn: Conn, s: tokio::net::TcpStream) {
    let s = match s.into_std() {
        Ok(s) => s,
        Err(e) => return tracing::warn!(error = %e, "cannot hand a connection over"),
    };
    rt.spawn(async move {
        match tokio::net::TcpStream::from_std(s) {
            Ok(s) => conn.serve(s),
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection over"),
        }
    });
}

/// A listening socket between runtimes: each worker registers its own descriptor for it.
enum StdSocket {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl Socket {
    fn into_std(self) -> std::io::Result<StdSocket> {
        Ok(match self {
            Self::Tcp(l) => StdSocket::Tcp(l.into_std()?),
            Self::Unix(l) => StdSocket::Unix(l.into_std()?),
        })
    }
}

impl StdSocket {
    fn try_clone(&self) -> std::io::Result<Self> {
        Ok(match self {
            Self::Tcp(l) => Self::Tcp(l.try_clone()?),
            Self::Unix(l) => Self::Unix(l.try_clone()?),
        })
    }

    /// Registers the socket with the runtime this is called on.
    fn into_tokio(self) -> std::io::Result<Socket> {
        Ok(match self {
            Self::Tcp(l) => Socket::Tcp(TcpListener::from_std(l)?),
            Self::Unix(l) => Socket::Unix(UnixListener::from_std(l)?),
        })
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(socket: &Socket) -> std::io::Result<Accepted> {
    match socket {
        Socket::Tcp(l) => l.accept().await.map(|(s, _)| Accepted::Tcp(s)),
        Socket::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

/// Reloads on SIGHUP and when the config or a file it names changes (debounced), until `stop`
/// says so (or is dropped); a reload under way when it does is finished first.
async fn reloader(
    ctx: Arc<Serving>,
    path: PathBuf,
    mut files: Vec<PathBuf>,
    hangups: Option<tokio::signal::unix::Signal>,
    (tx, mut rx, mut watcher): (
        mpsc::UnboundedSender<&'static str>,
        mpsc::UnboundedReceiver<&'static str>,
        Option<notify::RecommendedWatcher>,
    ),
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let hup = tx.clone();
    let signals = tokio::spawn(async move {
        let Some(mut s) = hangups else { return };
        while s.recv().await.is_some() {
            let _ = hup.send("SIGHUP");
        }
    });
    loop {
        let why = tokio::select! {
            biased;
            _ = &mut stop => break,
            why = rx.recv() => match why {
                Some(why) => why,
                None => break,
            },
        };
        // Editors and secret managers write in bursts: let the burst finish.
        tokio::select! {
            biased;
            _ = &mut stop => break,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        while rx.try_recv().is_ok() {}
        match ctx.reload(&path).await {
            Ok(new_files) => {
                ctx.shared.metrics.reloaded(true);
                tracing::info!(trigger = why, "config reloaded");
                if new_files != files {
                    files = new_files;
                    watcher = watch_files(&files, tx.clone());
                }
            }
            Err(e) => {
                ctx.shared.metrics.reloaded(false);
                tracing::error!(trigger = why, error = %e, "config reload rejected; the previous config keeps serving");
            }
        }
    }
    drop(watcher);
    signals.abort();
}

/// Watches the directories of `files` (so atomic replaces and Kubernetes' `..data` symlink
/// swaps are seen) and reports changes to any of them.
fn watch_files(
    files: &[PathBuf],
    tx: mpsc::UnboundedSender<&'static str>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let watched: Vec<PathBuf> = files
        .iter()
        .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let dirs: Vec<PathBuf> = {
        let mut d: Vec<PathBuf> = watched
            .iter()
            .filter_map(|f| f.parent().map(Path::to_owned))
            .collect();
        d.sort();
        d.dedup();
        d
    };
    let relevant = {
        let (watched, dirs) = (watched.clone(), dirs.clone());
        move |p: &Path| {
            watched.iter().any(|w| w == p)
                || (p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".."))
                    && p.parent().is_some_and(|d| dirs.iter().any(|x| x == d)))
        }
    };
    let handler = move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, EventKind::Access(_)) && ev.paths.iter().any(|p| relevant(p)) {
                let _ = tx.send("file change");
            }
        }
    };
    let mut w = match notify::recommended_watcher(handler) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch config files; reload with SIGHUP");
            return None;
        }
    };
    for d in &dirs {
        if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory; reload with SIGHUP");
        }
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A burst of connections one worker accepts is spread until the workers are level within
    /// the slack; each connection counts where it is served until it ends.
    #[test]
    fn a_burst_accepted_by_one_worker_is_spread_over_all() {
        let workers = Workers::start(2).expect("two workers");
        let load = |i: usize| workers.load[i].get();
        let mut seats: Vec<(usize, Counted)> = (0..64).map(|_| workers.seat(0)).collect();
        let on = |w: usize, seats: &[(usize, Counted)]| seats.iter().filter(|s| s.0 == w).count();
        assert_eq!(on(0, &seats) as i64, load(0));
        assert_eq!(on(1, &seats) as i64, load(1));
        assert!(
            load(1) > 0 && load(0) - load(1) <= SLACK + load(0) / 4 + 1,
            "64 connections accepted by worker 0 are served {} / {}",
            load(0),
            load(1)
        );
        // The first few stay where they were accepted: no hand-over for a small lead.
        assert!(seats[..3].iter().all(|s| s.0 == 0));

        // Worker 1's connections end: the least busy, it keeps what it accepts.
        seats.retain(|s| s.0 == 0);
        assert_eq!(load(1), 0);
        let more: Vec<_> = (0..8).map(|_| workers.seat(1)).collect();
        assert!(
            more.iter().all(|s| s.0 == 1),
            "worker 1 keeps what it accepts"
        );
        drop(seats);
        assert_eq!(load(0), 0);
        drop(more);
        assert_eq!(load(1), 0, "a seat is freed when its connection ends");
    }
}
