//! Prometheus counters, gauges and histograms, kept as atomics so that the scheduler thread and
//! the HTTP handlers update them without locks and `/metrics` renders them without stopping
//! either.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket upper bounds in seconds: from 5 ms (a decode step of a tiny model) to a minute (a long
/// prompt queued behind a full batch).
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];

/// A cumulative histogram of durations.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, &b) in BUCKETS.iter().enumerate() {
            if s <= b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros() as u64, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Bucket, sum and count lines with extra labels (`labels` is `k="v",...`).
    fn render_labelled(&self, out: &mut String, name: &str, labels: &str) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{b}\"}} {}",
                self.counts[i].load(Relaxed)
            );
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {n}"
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Relaxed)
            );
        }
        let n = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

/// The most recent grammar-mask computation times, for quantiles (a Prometheus summary): a
/// mask takes microseconds to a millisecond, far below the latency histograms' buckets.
#[derive(Default)]
pub struct MaskTimes {
    recent: std::sync::Mutex<std::collections::VecDeque<f32>>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

/// Masks kept for the quantiles.
const MASK_WINDOW: usize = 1 << 16;

impl MaskTimes {
    pub fn observe(&self, d: Duration) {
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if r.len() == MASK_WINDOW {
            r.pop_front();
        }
        r.push_back(d.as_secs_f32());
    }

    /// The `q` quantiles (0–1, nearest rank) of the recent masks, in seconds.
    pub fn quantiles(&self, qs: &[f64]) -> Vec<f64> {
        let mut v: Vec<f32> = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        v.sort_by(f32::total_cmp);
        qs.iter()
            .map(|q| {
                if v.is_empty() {
                    return f64::NAN;
                }
                let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
                v[rank.min(v.len()) - 1] as f64
            })
            .collect()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
        let qs = [0.5, 0.9, 0.99];
        for (q, v) in qs.iter().zip(self.quantiles(&qs)) {
            let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{name}_sum {sum}\n{name}_count {}",
            self.count.load(Relaxed)
        );
    }
}

/// Counters of one (service, module) pair.
#[derive(Default)]
pub struct ServiceStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Request duration, arrival to last byte.
    pub latency: Histogram,
}

/// Picks one counter of a [`ServiceStats`].
type Field = fn(&ServiceStats) -> &AtomicU64;

/// Escape a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Everything `/metrics` reports.
#[derive(Default)]
pub struct Metrics {
    /// Per (service, module) series; a map behind a lock because services and modules are
    /// only known at run time (updated once or twice per request, not per token).
    pub by_service: Mutex<BTreeMap<(String, String), std::sync::Arc<ServiceStats>>>,
    pub requests_chat: AtomicU64,
    pub requests_completion: AtomicU64,
    /// Requests answered with a 4xx/5xx status.
    pub requests_failed: AtomicU64,
    /// Requests turned away because the queue was full (429).
    pub requests_rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Speculative decoding: tokens drafted by prompt lookup and verified, and how many of
    /// them were kept.
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    /// Sequences cancelled because their client went away.
    pub cancelled: AtomicU64,
    /// Times a constrained sequence's grammar mask was not ready when its logits were (it sat
    /// out a step instead of stalling the batch).
    pub mask_waits: AtomicU64,
    /// Sequences preempted to give a service below its share of the batch a slot.
    pub share_preemptions: AtomicU64,
    /// Time to compute each grammar mask (consuming the previous token included).
    pub mask_times: MaskTimes,
    /// Usage rows that could not be written after retries (each also logged with its request
    /// id).
    pub usage_write_failures: AtomicU64,
    /// Connections closed at once because `--max-connections` were open.
    pub connections_refused: AtomicU64,
    /// Open client connections.
    pub connections_open: AtomicU64,
    /// 1 while the scheduler thread runs; 0 once it has died (then `/health` fails).
    pub scheduler_alive: AtomicU64,
    /// Requests accepted but not yet running.
    pub queue_depth: AtomicU64,
    /// Sequences in the running batch.
    pub running: AtomicU64,
    /// Bytes of KV cache held by running sequences.
    pub kv_bytes: AtomicU64,
    pub steps: AtomicU64,
    /// Prompt tokens run through the model (admitted minus reused from the prefix cache).
    pub prefilled_tokens: AtomicU64,
    /// Requests that started from a cached prompt prefix.
    pub prefix_hits: AtomicU64,
    /// Prompt tokens whose keys and values were copied from the prefix cache.
    pub prefix_reused_tokens: AtomicU64,
    pub prefix_cache_evictions: AtomicU64,
    /// Bytes of KV cache held by the prefix cache.
    pub prefix_cache_bytes: AtomicU64,
    pub prefix_cache_entries: AtomicU64,
    /// Sequences preempted (their KV freed, to be recomputed) because KV memory ran out.
    pub preemptions: AtomicU64,
    /// Bytes of the KV pool in use (running sequences and prefix cache, shared blocks once).
    pub kv_pool_used: AtomicU64,
    /// The KV pool's limit (`--kv-mem`).
    pub kv_pool_limit: AtomicU64,
    /// Bytes of one KV block (`KV_BLOCK` positions of every layer).
    pub kv_block_bytes: AtomicU64,
    pub ttft: Histogram,
    pub inter_token: Histogram,
}

impl Metrics {
    /// The counters of `service` using `module`.
    pub fn service(&self, service: &str, module: &str) -> std::sync::Arc<ServiceStats> {
        let mut m = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((service.to_string(), module.to_string()))
            .or_default()
            .clone()
    }

    fn render_services(&self, out: &mut String) {
        let m = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let series: [(&str, &str, Field); 4] = [
            (
                "modu_service_requests_total",
                "Generation requests per service and module.",
                |s| &s.requests,
            ),
            (
                "modu_service_errors_total",
                "Requests answered with an error per service and module.",
                |s| &s.errors,
            ),
            (
                "modu_service_prompt_tokens_total",
                "Prompt tokens per service and module.",
                |s| &s.prompt_tokens,
            ),
            (
                "modu_service_completion_tokens_total",
                "Generated tokens per service and module.",
                |s| &s.completion_tokens,
            ),
        ];
        for (name, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for ((svc, module), st) in m.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",module=\"{}\"}} {}",
                    label(svc),
                    label(module),
                    get(st).load(Relaxed)
                );
            }
        }
        let name = "modu_service_request_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Request duration (arrival to last byte) per service and module.\n# TYPE {name} histogram"
        );
        for ((svc, module), st) in m.iter() {
            let labels = format!("service=\"{}\",module=\"{}\"", label(svc), label(module));
            st.latency.render_labelled(out, name, &labels);
        }
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_services(&mut out);
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                v.load(Relaxed)
            );
        };
        let _ = writeln!(
            out,
            "# HELP modu_requests_total Generation requests received.\n# TYPE modu_requests_total counter\nmodu_requests_total{{endpoint=\"chat\"}} {}\nmodu_requests_total{{endpoint=\"completions\"}} {}",
            self.requests_chat.load(Relaxed),
            self.requests_completion.load(Relaxed)
        );
        counter(
            &mut out,
            "modu_requests_failed_total",
            "Requests answered with an error status.",
            &self.requests_failed,
        );
        counter(
            &mut out,
            "modu_requests_rejected_total",
            "Requests refused with 429 because the queue was full.",
            &self.requests_rejected,
        );
        counter(
            &mut out,
            "modu_prompt_tokens_total",
            "Prompt tokens admitted.",
            &self.prompt_tokens,
        );
        counter(
            &mut out,
            "modu_generation_tokens_total",
            "Tokens generated.",
            &self.generated_tokens,
        );
        counter(
            &mut out,
            "modu_spec_draft_tokens_total",
            "Draft tokens verified by speculative decoding (prompt lookup).",
            &self.spec_draft_tokens,
        );
        counter(
            &mut out,
            "modu_spec_accepted_tokens_total",
            "Draft tokens kept by speculative decoding (each saved a forward pass).",
            &self.spec_accepted_tokens,
        );
        counter(
            &mut out,
            "modu_cancelled_total",
            "Sequences cancelled because the client disconnected.",
            &self.cancelled,
        );
        counter(
            &mut out,
            "modu_grammar_mask_waits_total",
            "Steps a constrained sequence sat out because its grammar mask was not ready.",
            &self.mask_waits,
        );
        counter(
            &mut out,
            "modu_share_preemptions_total",
            "Sequences preempted so that a service below its share of the batch could run.",
            &self.share_preemptions,
        );
        self.mask_times.render(
            &mut out,
            "modu_grammar_mask_seconds",
            "Time to compute a grammar mask (structured output), over the most recent masks.",
        );
        counter(
            &mut out,
            "modu_connections_refused_total",
            "Connections closed at once because the connection cap was reached.",
            &self.connections_refused,
        );
        counter(
            &mut out,
            "modu_usage_write_failures_total",
            "Usage records that could not be written after retries.",
            &self.usage_write_failures,
        );
        counter(
            &mut out,
            "modu_batch_steps_total",
            "Batched forward steps run.",
            &self.steps,
        );
        gauge(
            &mut out,
            "modu_connections_open",
            "Open client connections.",
            &self.connections_open,
        );
        gauge(
            &mut out,
            "modu_scheduler_alive",
            "1 while the scheduler thread runs.",
            &self.scheduler_alive,
        );
        gauge(
            &mut out,
            "modu_queue_depth",
            "Requests waiting for a batch slot.",
            &self.queue_depth,
        );
        gauge(
            &mut out,
            "modu_running_sequences",
            "Sequences in the running batch.",
            &self.running,
        );
        gauge(
            &mut out,
            "modu_kv_cache_bytes",
            "KV-cache bytes held by running sequences.",
            &self.kv_bytes,
        );
        counter(
            &mut out,
            "modu_prefill_tokens_total",
            "Prompt tokens run through the model (not reused from the prefix cache).",
            &self.prefilled_tokens,
        );
        counter(
            &mut out,
            "modu_prefix_cache_hits_total",
            "Requests that started from a cached prompt prefix.",
            &self.prefix_hits,
        );
        counter(
            &mut out,
            "modu_prefix_cache_reused_tokens_total",
            "Prompt tokens reused from the prefix cache instead of prefilled.",
            &self.prefix_reused_tokens,
        );
        counter(
            &mut out,
            "modu_prefix_cache_evictions_total",
            "Prefix-cache entries evicted to stay within the memory budget.",
            &self.prefix_cache_evictions,
        );
        gauge(
            &mut out,
            "modu_prefix_cache_bytes",
            "KV-cache bytes held by the prefix cache.",
            &self.prefix_cache_bytes,
        );
        gauge(
            &mut out,
            "modu_prefix_cache_entries",
            "Sequences held by the prefix cache.",
            &self.prefix_cache_entries,
        );
        counter(
            &mut out,
            "modu_preemptions_total",
            "Sequences preempted (KV freed, recomputed later) because KV memory ran out.",
            &self.preemptions,
        );
        gauge(
            &mut out,
            "modu_kv_pool_used_bytes",
            "Bytes of the paged KV pool in use (shared blocks counted once).",
            &self.kv_pool_used,
        );
        gauge(
            &mut out,
            "modu_kv_pool_limit_bytes",
            "Limit of the paged KV pool (--kv-mem).",
            &self.kv_pool_limit,
        );
        self.ttft.render(
            &mut out,
            "modu_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
        );
        self.inter_token.render(
            &mut out,
            "modu_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one sequence.",
        );
        out
    }
}
