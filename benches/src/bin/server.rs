//! One benchmark server:
//! `server --variant NAME --port N [--serve reqctx|reqctx-notimer|axum|watched]
//! [--runtime current-thread|multi-thread] [--workers 1]`.
//!
//! `--serve`: `tower_reqctx::serve` as it ships (`reqctx`, the default), the same with
//! hyper's HTTP/1 header-read timer off (`reqctx-notimer`, to isolate that timer's cost:
//! `serve` arms it for every request, plain `axum::serve` does not), plain `axum::serve`,
//! or `axum::serve` over `WatchedListener` (`watched`).
//! `--runtime`: tokio's current-thread runtime, or the multi-thread one with `--workers`
//! workers (the default).
//!
//! Prints `ready ADDR` once it listens. SIGTERM (or SIGINT) shuts it down gracefully and the
//! process exits, so valgrind writes its profile.

use std::future::IntoFuture;
use std::time::Duration;

use reqctx_benches::{Variant, flag};
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{SignalKind, signal};
use tower_reqctx::{ConnectionContext, WatchedListener};

fn main() {
    if let Err(err) = run() {
        eprintln!("server: {err}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name: String = flag(&args, "--variant")?.ok_or("--variant NAME is required")?;
    let variant = Variant::from_name(&name).ok_or_else(|| format!("no variant {name:?}"))?;
    let port: u16 = flag(&args, "--port")?.unwrap_or(0);
    let workers: usize = flag(&args, "--workers")?.unwrap_or(1);
    let serve: String = flag(&args, "--serve")?.unwrap_or_else(|| "reqctx".to_owned());
    if !["reqctx", "reqctx-notimer", "axum", "watched"].contains(&serve.as_str()) {
        return Err(format!(
            "--serve reqctx|reqctx-notimer|axum|watched, not {serve:?}"
        ));
    }
    let runtime: String = flag(&args, "--runtime")?.unwrap_or_else(|| "multi-thread".to_owned());
    let rt = match runtime.as_str() {
        "current-thread" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        "multi-thread" => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build(),
        _ => {
            return Err(format!(
                "--runtime current-thread|multi-thread, not {runtime:?}"
            ));
        }
    }
    .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = listen(port).map_err(|e| format!("bind 127.0.0.1:{port}: {e}"))?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        println!(
            "ready {}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let app = variant.app();
        let served = if serve == "watched" {
            axum::serve(
                WatchedListener::new(listener),
                app.into_make_service_with_connect_info::<ConnectionContext>(),
            )
            .with_graceful_shutdown(stop)
            .into_future()
            .await
        } else if serve != "axum" {
            let timer = serve == "reqctx";
            tower_reqctx::serve(listener, app)
                .drain_timeout(Duration::from_millis(200))
                .http_builder(|builder| {
                    if !timer {
                        builder.http1().header_read_timeout(None);
                    }
                })
                .with_graceful_shutdown(stop)
                .into_future()
                .await
        } else {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .into_future()
                .await
        };
        served.map_err(|e| e.to_string())
    })
}

/// A listener on 127.0.0.1 with a deep accept queue: 10,000 connects at once must not
/// overflow it (an overflowed SYN is retried a second later).
fn listen(port: u16) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind((std::net::Ipv4Addr::LOCALHOST, port).into())?;
    socket.listen(4096)
}
