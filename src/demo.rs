//! `credgate demo`: credgate in front of the embedded fake Oblien, on loopback, no account needed.

use std::path::Path;

use crate::fake::{FakeOblien, FakeOptions};
use crate::server::Server;

/// The shipped demo config, compiled in so the demo runs from any directory.
pub const CONFIG: &str = include_str!("../config/demo.toml");
const API_PORT: u16 = 18181;
const GATEWAY_PORT: u16 = 18182;

/// Sets the environment variables `config/demo.toml` reads its secrets from. Call it before
/// any thread starts (environment writes are not thread-safe).
pub fn set_demo_env() {
    let o = FakeOptions::default();
    for (k, v) in [
        ("CREDGATE_DEMO_CLIENT_ID", o.client_id),
        ("CREDGATE_DEMO_CLIENT_SECRET", o.client_secret),
        ("CREDGATE_DEMO_OAUTH_CLIENT_ID", o.oauth_client_id),
        ("CREDGATE_DEMO_OAUTH_CLIENT_SECRET", o.oauth_client_secret),
    ] {
        std::env::set_var(k, v);
    }
}

/// Starts the fake and credgate, prints what to try, and serves until `shutdown`.
pub async fn run(shutdown: impl std::future::Future<Output = ()>) -> Result<(), String> {
    let fake = FakeOblien::start(FakeOptions {
        api_port: API_PORT,
        gateway_port: GATEWAY_PORT,
        ..FakeOptions::default()
    })
    .map_err(|e| {
        format!("cannot start the fake Oblien on 127.0.0.1:{API_PORT}/{GATEWAY_PORT}: {e}")
    })?;
    let config = crate::config::parse(CONFIG, Path::new("config/demo.toml (built in)"))
        .map_err(|e| e.to_string())?;
    let server = Server::bind(config).await.map_err(|e| e.to_string())?;
    let addr = server.local_addrs()[0];
    println!(
        "\ncredgate demo: a fake Oblien API on {api} and gateway on {gw}, credgate on http://{addr}\n\
         Try (the fake echoes what it received; credgate added the credentials):\n\n\
         \x20 curl -s http://{addr}/api/workspace/ws_demo/internal-api-access        # X-Client-ID/Secret injected\n\
         \x20 curl -s http://{addr}/w/ws_demo/files?path=/app                         # gateway JWT, fetched and cached\n\
         \x20 curl -s http://{addr}/w/ws_other/exec                                   # a second workspace, its own token\n\
         \x20 curl -s http://{addr}/w/ws_nope/files                                   # 403: not in the allow-list\n\
         \x20 curl -sN http://{addr}/w/ws_demo/sse                                    # server-sent events, streamed\n\
         \x20 curl -s http://{addr}/oauth-api/anything                                # OAuth2 client-credentials token\n\
         \x20 curl -s -x http://{addr} http://127.0.0.1:{API_PORT}/workspace/ws_demo/internal-api-access   # forward-proxy mode\n\n\
         Gateway tokens live 60 s: watch the log for \"token fetched\" as credgate refreshes them early.\n\
         Ctrl-C to stop.\n",
        api = fake.api_addr(),
        gw = fake.gateway_addr(),
    );
    server.run(shutdown).await;
    drop(fake);
    Ok(())
}
