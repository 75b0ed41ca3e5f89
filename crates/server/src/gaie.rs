//! The model-server metrics of the Kubernetes Gateway API Inference Extension (GAIE), under the
//! vLLM names its endpoint picker reads by default, beside modu's own `modu_*` series:
//!
//! - `vllm:num_requests_waiting` (gauge): requests queued for the batch, preempted ones included;
//! - `vllm:num_requests_running` (gauge): sequences in the running batch;
//! - `vllm:kv_cache_usage_perc` (gauge): the KV pool's used fraction, 0–1 (despite the name);
//! - `vllm:cache_config_info` (gauge, value 1): `block_size` (tokens per KV block) and
//!   `num_gpu_blocks` (blocks the KV pool holds) as labels;
//! - `vllm:lora_requests_info` (gauge, value: the time of this reading in Unix seconds):
//!   `running_lora_adapters`, the modules whose adapters are in memory (they serve a request
//!   without loading anything); `waiting_lora_adapters`, the modules of requests that have not
//!   produced their first token yet; `max_lora`, how many modules can be in memory at once (`--module-mem` over the
//!   largest resident module, or every registered module when memory is not limited).

use std::fmt::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::server::AppState;

/// Counts one request as waiting for `module` until dropped (at its first event).
pub(crate) struct WaitingModule {
    st: Arc<AppState>,
    module: String,
}

impl WaitingModule {
    pub(crate) fn new(st: &Arc<AppState>, module: &str) -> WaitingModule {
        let mut w = st.waiting_modules.lock().unwrap_or_else(|e| e.into_inner());
        *w.entry(module.to_string()).or_insert(0) += 1;
        WaitingModule {
            st: st.clone(),
            module: module.to_string(),
        }
    }
}

impl Drop for WaitingModule {
    fn drop(&mut self) {
        let mut w = self
            .st
            .waiting_modules
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&self.module) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.module);
            }
        }
    }
}

/// Label values are escaped as the Prometheus text format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(crate) fn render(st: &AppState) -> String {
    let m = &st.metrics;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge(
        "vllm:num_requests_waiting",
        "Requests waiting to join the running batch (GAIE TotalQueuedRequests).",
        m.queue_depth.load(Relaxed).to_string(),
    );
    gauge(
        "vllm:num_requests_running",
        "Sequences in the running batch (GAIE TotalRunningRequests).",
        m.running.load(Relaxed).to_string(),
    );
    let limit = m.kv_pool_limit.load(Relaxed);
    let used = m.kv_pool_used.load(Relaxed);
    let frac = if limit == 0 {
        0.0
    } else {
        (used as f64 / limit as f64).min(1.0)
    };
    gauge(
        "vllm:kv_cache_usage_perc",
        "Fraction of the KV cache pool in use, 0 to 1 (GAIE KVCacheUtilization).",
        format!("{frac}"),
    );
    let block_bytes = m.kv_block_bytes.load(Relaxed).max(1);
    let _ = writeln!(
        out,
        "# HELP vllm:cache_config_info KV cache configuration.\n# TYPE vllm:cache_config_info gauge\n\
         vllm:cache_config_info{{block_size=\"{}\",num_gpu_blocks=\"{}\"}} 1",
        modu_engine::KV_BLOCK,
        limit / block_bytes
    );
    let (resident, largest) = st.modules.resident();
    let budget = st.modules.budget();
    let max_lora = if budget > 0 && largest > 0 {
        (budget / largest).max(1)
    } else {
        st.modules.len()
    };
    let waiting: Vec<String> = st
        .waiting_modules
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .keys()
        .cloned()
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let _ = writeln!(
        out,
        "# HELP vllm:lora_requests_info Modules in memory and modules of requests without a first token yet; the value is the time of this reading.\n\
         # TYPE vllm:lora_requests_info gauge\n\
         vllm:lora_requests_info{{max_lora=\"{max_lora}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now}",
        label(&resident.join(",")),
        label(&waiting.join(",")),
    );
    out
}
