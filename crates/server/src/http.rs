//! The connection layer: accepting sockets under a connection cap, HTTP/1 with a header
//! timeout (which also bounds how long a kept-alive connection may idle), and the drain on
//! shutdown: refuse new requests with 503 (still answering probes), let in-flight responses
//! finish up to the drain timeout, then cancel what is left and stop listening.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::error::ServerError;
use crate::server::{AppState, Stop};

pub(crate) async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    state: Arc<AppState>,
    stop: impl std::future::Future<Output = Stop>,
) -> Result<(), ServerError> {
    let limits = state.limits.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    let why = loop {
        tokio::select! {
            why = &mut stop => break why,
            accepted = listener.accept() => {
                let sock = match accepted {
                    Ok((sock, _)) => sock,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        eprintln!("modu: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Over the cap: closed at once, before anything is read or buffered.
                    state.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                    drop(sock);
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_timeout)
                    .max_buf_size(64 << 10);
                let conn = builder.serve_connection(
                    TokioIo::new(sock),
                    TowerToHyperService::new(app.clone()),
                );
                let conn = graceful.watch(conn);
                let metrics = state.metrics.clone();
                metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _ = conn.await;
                    metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
    };
    // Draining: the responses already under way run to their end; new requests get 503 (and
    // `/health` 503, `/live` 200), on open connections and on new ones, which are still
    // accepted so that a load balancer's or kubelet's probe sees the drain instead of a refused
    // connection. New connections are closed after one request and not waited for.
    state.draining.store(true, Ordering::SeqCst);
    let drained = match why {
        Stop::Asked => {
            let drain = tokio::time::timeout(limits.drain_timeout, graceful.shutdown());
            tokio::select! {
                r = drain => r.is_ok(),
                () = accept_while_draining(&listener, &app, &slots, &state) => false,
            }
        }
        Stop::SchedulerDied => false,
    };
    drop(listener);
    if !drained {
        // Cancel whatever is left (their clients get an error event / 503).
        state.sched.shutdown();
    }
    match why {
        Stop::Asked => Ok(()),
        Stop::SchedulerDied => Err(ServerError::Runtime(std::io::Error::other(
            "the scheduler thread died; exiting so that a supervisor can restart the server",
        ))),
    }
}

/// Serves connections accepted during the drain (see [`serve_connections`]): one request each,
/// under the same connection cap and header timeout; never returns.
async fn accept_while_draining(
    listener: &tokio::net::TcpListener,
    app: &Router,
    slots: &Arc<tokio::sync::Semaphore>,
    state: &Arc<AppState>,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            state
                .metrics
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(state.limits.header_timeout)
            .keep_alive(false)
            .max_buf_size(64 << 10);
        let conn =
            builder.serve_connection(TokioIo::new(sock), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
}
