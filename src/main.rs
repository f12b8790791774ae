//! The `credgate` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use credgate::config;
use credgate::server::Server;
use credgate::telemetry::{self, LogFormat};

/// mimalloc (per-thread heaps, like credgate's per-thread workers): 3% fewer instructions per
/// request than glibc's malloc, and memory freed by a burst of connections goes back to the
/// system (see the sweep in `conn.rs`). Its `no_thp` feature keeps it from asking for transparent
/// huge pages, which kept whole 2 MiB pages resident for a few live objects. Called as in
/// [`credgate::alloc`], not through the `mimalloc` crate's aligned entry points.
#[global_allocator]
static ALLOC: credgate::alloc::MiMalloc = credgate::alloc::MiMalloc;

const EXAMPLES: &str = "\
Examples:
  credgate --config config/credgate.toml          run the proxy
  credgate check --config config/credgate.toml    validate and print the route table
  credgate demo                                   run against an embedded fake upstream
  HTTP_PROXY=http://127.0.0.1:8080 curl http://api.oblien.com/workspace

Secrets are never given on the command line: the config names an env var or a file.";

#[derive(Parser)]
#[command(name = "credgate", version, about, after_help = EXAMPLES)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, env = "CREDGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum, default_value = "pretty", global = true)]
    log_format: LogFormat,
    /// Threads serving connections, each with its own event loop (default: one per CPU).
    /// 1 runs everything on one thread.
    #[arg(long, env = "CREDGATE_WORKERS", global = true)]
    workers: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config and print the route table (never secrets).
    Check,
    /// Run credgate in front of an embedded fake Oblien API on loopback (no account needed).
    Demo,
    /// Run only the embedded fake Oblien API and gateway (for benchmarks and trying things out).
    #[command(hide = true)]
    Fake {
        #[arg(long, default_value_t = 18181)]
        api_port: u16,
        #[arg(long, default_value_t = 18182)]
        gateway_port: u16,
    },
    /// Exit 0 if the admin listener reports ready (`/readyz`), 1 otherwise (for HEALTHCHECK).
    Health {
        /// The admin address; defaults to `[server] admin` from the config.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_health = matches!(cli.command, Some(Command::Health { .. }));
    if matches!(cli.command, Some(Command::Demo)) {
        // Before any thread exists: the demo config reads its secrets from the environment.
        credgate::demo::set_demo_env();
    }
    let _logs = telemetry::init(cli.log_format);
    let workers = cli.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |n| n.get(),
    );
    // This thread reloads and refreshes tokens, and with one worker also accepts and serves;
    // with more, the workers accept and serve connections on threads of their own (see
    // `Server::with_workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(telemetry::on_park)
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        match (cli.command, cli.config) {
            (Some(Command::Demo), _) => credgate::demo::run(shutdown_signal()).await,
            (Some(Command::Health { admin }), config) => health(admin, config).await,
            (Some(Command::Fake { api_port, gateway_port }), _) => {
                let shutdown = shutdown_signal();
                let opts = credgate::fake::FakeOptions { api_port, gateway_port, ..Default::default() };
                let fake = credgate::fake::FakeOblien::start(opts).map_err(|e| e.to_string())?;
                tracing::info!(api = %fake.api_addr(), gateway = %fake.gateway_addr(), "fake Oblien serving");
                shutdown.await;
                Ok(())
            }
            (_, None) => Err(
                "no config: pass --config PATH or set CREDGATE_CONFIG (or try `credgate demo`)"
                    .into(),
            ),
            (None, Some(path)) => run(path, workers).await,
            (Some(Command::Check), Some(path)) => check(path),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("credgate: error: {e}");
            ExitCode::from(if is_health { 1 } else { 2 })
        }
    }
}

async fn run(path: PathBuf, workers: usize) -> Result<(), String> {
    let shutdown = shutdown_signal();
    let config = config::load(&path).map_err(|e| e.to_string())?;
    let mut server = Server::bind(config).await.map_err(|e| e.to_string())?;
    if workers > 1 {
        server = server.with_workers(workers).map_err(|e| e.to_string())?;
    }
    server.run(shutdown).await;
    Ok(())
}

fn check(path: PathBuf) -> Result<(), String> {
    let config = config::load(&path).map_err(|e| e.to_string())?;
    println!("{}: ok, {} route(s)", path.display(), config.routes.len());
    let listen: Vec<String> = config
        .server
        .listen
        .iter()
        .map(ToString::to_string)
        .collect();
    println!("listen: {}", listen.join(", "));
    if let Some(admin) = config.server.admin {
        println!("admin: {admin}");
    }
    for r in &config.routes {
        let headers: Vec<&str> = r.auth.injects().iter().map(|h| h.as_str()).collect();
        println!(
            "  {:<20} {:<32} -> {:<40} auth={} {}",
            r.name,
            r.matcher.to_string(),
            r.upstream.to_string(),
            r.auth_spec.kind(),
            if headers.is_empty() {
                String::new()
            } else {
                format!("sets [{}]", headers.join(", "))
            }
        );
    }
    Ok(())
}

/// Asks the admin listener's `/readyz`; the exit code says whether credgate is ready.
async fn health(
    admin: Option<std::net::SocketAddr>,
    config: Option<PathBuf>,
) -> Result<(), String> {
    let addr = match (admin, config) {
        (Some(a), _) => a,
        (None, Some(path)) => config::load(&path)
            .map_err(|e| e.to_string())?
            .server
            .admin
            .ok_or("the config has no [server] admin address; pass --admin ADDR")?,
        (None, None) => return Err("pass --admin ADDR or --config PATH".into()),
    };
    let (status, body) = credgate::admin::probe(addr, "/readyz")
        .await
        .map_err(|e| format!("admin listener {addr}: {e}"))?;
    print!("{body}");
    if status == 200 {
        Ok(())
    } else {
        Err(format!("not ready (HTTP {status})"))
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called (before any
/// listener is bound), so a signal that comes early still means a clean shutdown.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}
