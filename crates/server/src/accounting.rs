//! Recording what each admitted request used: one usage row, the labelled metrics and the
//! service's token window.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::response::{IntoResponse, Response};
use modu_engine::ModuleRef;

use crate::error::ApiError;
use crate::scheduler::{Cancelled, SeqStats};
use crate::services::ActiveGuard;
use crate::usage::UsageRecord;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::server::*;

pub(crate) fn failed(st: &AppState, e: ApiError) -> Response {
    st.metrics.requests_failed.fetch_add(1, Ordering::Relaxed);
    e.into_response()
}

/// Who and what one admitted request is accounted as.
pub(crate) struct AcctInfo {
    pub(crate) service: usize,
    pub(crate) module: String,
    pub(crate) endpoint: &'static str,
    pub(crate) request_id: String,
    pub(crate) arrived: Instant,
}

/// Accounting context of one admitted request, carried until its last byte. Every admitted
/// request is recorded exactly once: when it ends ([`Acct::record`]), or, if the response is
/// dropped first (the client disconnected), by a task that waits for the scheduler's report of
/// what the sequence had used and records it with status `cancelled`. The service's
/// concurrency slot is held until then.
pub(crate) struct Acct {
    pub(crate) st: Arc<AppState>,
    pub(crate) info: Option<AcctInfo>,
    /// The modules (pinned generations) and scales it runs with, and its prefix-cache key
    /// (service and modules).
    pub(crate) run_modules: Vec<ModuleRef>,
    pub(crate) cache_key: u64,
    pub(crate) prompt_tokens: usize,
    /// Generated tokens the response has received so far.
    pub(crate) received: usize,
    /// Where the scheduler reports a sequence dropped because its client went away.
    pub(crate) cancelled_rx: Option<UnboundedReceiver<Cancelled>>,
    pub(crate) cancelled_tx: Option<UnboundedSender<Cancelled>>,
    pub(crate) guard: Option<ActiveGuard>,
    /// Counts the request as waiting for its module until its first event arrives.
    pub(crate) waiting: Option<crate::gaie::WaitingModule>,
}

/// How long a dropped response waits for the scheduler's report before recording what it saw.
const CANCEL_REPORT_WAIT: Duration = Duration::from_secs(60);

impl Acct {
    /// Record the request's end (once).
    pub(crate) fn record(&mut self, status: &str, tokens: (usize, usize, usize), stats: &SeqStats) {
        if let Some(info) = self.info.take() {
            self.st.account(&info, status, tokens, stats);
        }
    }

    /// The request never reached the scheduler (refused at submission): nothing to record.
    pub(crate) fn dismiss(&mut self) {
        self.info = None;
    }

    pub(crate) fn request_id(&self) -> &str {
        self.info.as_ref().map_or("", |i| i.request_id.as_str())
    }
}

impl Drop for Acct {
    fn drop(&mut self) {
        let Some(info) = self.info.take() else {
            return;
        };
        let st = self.st.clone();
        let rx = self.cancelled_rx.take();
        let guard = self.guard.take();
        let (prompt, received) = (self.prompt_tokens, self.received);
        let task = async move {
            let report = match rx {
                Some(mut rx) => tokio::time::timeout(CANCEL_REPORT_WAIT, rx.recv())
                    .await
                    .ok()
                    .flatten(),
                None => None,
            };
            let (tokens, stats) = match report {
                Some(c) => (
                    (
                        c.prompt_tokens,
                        c.completion_tokens.max(received),
                        c.cached_tokens,
                    ),
                    c.stats,
                ),
                None => ((prompt, received, 0), SeqStats::default()),
            };
            st.account(&info, "cancelled", tokens, &stats);
            drop(guard);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(task);
            }
            Err(_) => eprintln!(
                "modu: request {} ended outside the runtime; not recorded",
                self.request_id()
            ),
        }
    }
}

impl AppState {
    /// Record a request's end: one committed SQLite row (retried), the labelled metrics and
    /// the service's token window.
    pub(crate) fn account(
        &self,
        a: &AcctInfo,
        status: &str,
        tokens: (usize, usize, usize),
        stats: &SeqStats,
    ) {
        let (prompt, completion, cached) = tokens;
        let duration = a.arrived.elapsed();
        let svc = &self.services.list[a.service];
        let m = self.metrics.service(&svc.name, &a.module);
        m.completion_tokens
            .fetch_add(completion as u64, Ordering::Relaxed);
        m.latency.observe(duration);
        if status == "error" {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.services.add_tokens(a.service, completion as u64);
        let machine = &self.services.machine;
        let rec = UsageRecord {
            ts: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            request_id: a.request_id.clone(),
            service: svc.name.clone(),
            module: a.module.clone(),
            endpoint: a.endpoint.into(),
            status: status.into(),
            prompt_tokens: prompt as u64,
            cached_tokens: cached as u64,
            completion_tokens: completion as u64,
            queue_s: stats.queued.as_secs_f64(),
            ttft_s: stats.ttft.map(|d| d.as_secs_f64()),
            duration_s: duration.as_secs_f64(),
            cpu_s: stats.cpu_s,
            energy_j: machine.energy_j(stats.wall_s, stats.cpu_s, stats.energy_j),
            cost: machine.cost(stats.cpu_s),
        };
        // The INSERT blocks briefly; tell the runtime so other tasks keep running. A busy or
        // failing database gets a few retries before the failure is counted and logged.
        let result = tokio::task::block_in_place(|| {
            let mut last = None;
            for wait_ms in [0u64, 20, 100, 400] {
                if wait_ms > 0 {
                    std::thread::sleep(Duration::from_millis(wait_ms));
                }
                match self.usage.record(&rec) {
                    Ok(()) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("at least one attempt"))
        });
        if let Err(e) = result {
            self.metrics
                .usage_write_failures
                .fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "modu: usage of request {} (service {}, status {status}) was not recorded: {e}",
                rec.request_id, rec.service
            );
        }
    }
}
