//! The scheduler on a fake model: KV budget and admission, preemption with recomputation,
//! cancellation, queue limits and fairness, fast and deterministic (no real weights).
//!
//! The fake model writes `[token, position, 0, 0]` as each position's key and value in every
//! layer, and its next token is a hash of *everything in its cache*: a sequence whose cache lost,
//! duplicated or reordered a position (a broken preemption or block table) continues
//! differently from [`expected`], which replays the same rule on the plain token history.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modu_engine::generate::GenerateParams;
use modu_engine::layers::plan_batch;
use modu_engine::models::{Model, ModelInfo};
use modu_engine::tokenizer::TokenizerSpec;
use modu_engine::{BaseShapes, KvCache, ModelError, ModuleRef, SamplingParams, Tokenizer};
use modu_server::metrics::Metrics;
use modu_server::scheduler::{
    self, SchedulerConfig, SchedulerHandle, SeqEvent, SeqRequest, ServiceTag, SubmitError,
};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const VOCAB: usize = 64;
const EOS: u32 = 1;
const LAYERS: usize = 2;
const KV: (usize, usize) = (1, 4);

/// The next token after `history` (never EOS or 0).
fn next_token(history: impl Iterator<Item = (u32, usize)>) -> u32 {
    let mut h: u64 = 1469598103934665603;
    for (tok, pos) in history {
        h = (h ^ (tok as u64 * 131 + pos as u64)).wrapping_mul(1099511628211);
    }
    (h % (VOCAB as u64 - 2)) as u32 + 2
}

/// Greedy continuation of `prompt` by the fake model's rule.
fn expected(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut hist = prompt.to_vec();
    for _ in 0..n {
        let t = next_token(hist.iter().enumerate().map(|(p, &t)| (t, p)));
        hist.push(t);
    }
    hist[prompt.len()..].to_vec()
}

type Step = (usize, u32, usize);

struct FakeModel {
    info: ModelInfo,
    /// `(tokens, first token, first position)` per sequence of every step, in order.
    log: Arc<Mutex<Vec<Vec<Step>>>>,
    /// Delay per step, to let tests act between steps.
    delay: Duration,
    shapes: BaseShapes,
    /// Predict with [`cyclic_next`] instead of [`next_token`] (an output that repeats, so that
    /// prompt-lookup drafts are accepted).
    cyclic: bool,
}

/// The cyclic rule: tokens 2..=11 follow each other in a loop; anything else leads to 2.
fn cyclic_next(last: u32) -> u32 {
    if (2..=11).contains(&last) {
        (last - 2 + 1) % 10 + 2
    } else {
        2
    }
}

impl Model for FakeModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn new_cache(&self, max_len: usize) -> KvCache {
        KvCache::new(&[KV; LAYERS], max_len)
    }

    fn module_shapes(&self) -> &BaseShapes {
        &self.shapes
    }

    fn forward_seqs_tail(
        &self,
        tokens: &[&[u32]],
        caches: &mut [&mut KvCache],
        tails: &[usize],
        _modules: &[&[ModuleRef]],
    ) -> Result<Vec<f32>, ModelError> {
        let segs = plan_batch(tokens, caches)?;
        self.log.lock().unwrap().push(
            tokens
                .iter()
                .zip(&segs)
                .map(|(t, s)| (t.len(), t[0], s.pos0))
                .collect(),
        );
        std::thread::sleep(self.delay);
        let mut out = Vec::new();
        for (((t, seg), cache), &tail) in tokens.iter().zip(&segs).zip(caches.iter_mut()).zip(tails)
        {
            let rows: Vec<f32> = t
                .iter()
                .enumerate()
                .flat_map(|(i, &tok)| [tok as f32, (seg.pos0 + i) as f32, 0.0, 0.0])
                .collect();
            for l in 0..LAYERS {
                cache.layer_mut(l).append(&rows, &rows);
            }
            let kv = cache.layer(LAYERS - 1);
            // One row per asked-for position: the next token after the history up to it.
            for end in kv.len() - tail + 1..=kv.len() {
                let next = if self.cyclic {
                    cyclic_next(kv.key_f16(end - 1, 0)[0].to_f32() as u32)
                } else {
                    next_token((0..end).map(|p| {
                        let k = kv.key_f16(p, 0);
                        assert_eq!(k[1].to_f32() as usize, p, "position {p} misplaced");
                        (k[0].to_f32() as u32, p)
                    }))
                };
                let mut logits = vec![0.0; VOCAB];
                logits[next as usize] = 10.0;
                out.extend(logits);
            }
        }
        Ok(out)
    }
}

fn tokenizer() -> Tokenizer {
    let chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut tokens = vec!["<pad>".to_string(), "<eos>".to_string()];
    tokens.extend(chars.chars().map(|c| c.to_string()));
    assert_eq!(tokens.len(), VOCAB);
    let mut types = vec![1i64; VOCAB];
    types[0] = 3;
    types[1] = 3;
    Tokenizer::from_spec(TokenizerSpec {
        model: "gpt2".into(),
        tokens,
        token_types: types,
        eos: Some(EOS as u64),
        ..Default::default()
    })
    .unwrap()
}

struct Harness {
    handle: SchedulerHandle,
    metrics: Arc<Metrics>,
    log: Arc<Mutex<Vec<Vec<Step>>>>,
    join: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// Bytes of one KV block of the fake model.
fn block_bytes() -> usize {
    KvCache::new(&[KV; LAYERS], 16).block_bytes()
}

fn start(config: SchedulerConfig, delay: Duration) -> Harness {
    start_model(config, delay, false)
}

fn start_model(config: SchedulerConfig, delay: Duration, cyclic: bool) -> Harness {
    let log = Arc::new(Mutex::new(Vec::new()));
    let model = FakeModel {
        info: ModelInfo {
            arch: "fake".into(),
            name: None,
            n_vocab: VOCAB,
            n_layer: LAYERS,
            n_embd: 4,
            n_ctx_train: 4096,
        },
        log: log.clone(),
        delay,
        shapes: BaseShapes {
            arch: "fake".into(),
            n_head: 1,
            n_head_kv: 1,
            layers: vec![[None; 7]; LAYERS],
        },
        cyclic,
    };
    let metrics = Arc::new(Metrics::default());
    let (handle, join) = scheduler::spawn(
        Box::new(model),
        Arc::new(tokenizer()),
        config,
        metrics.clone(),
    )
    .unwrap();
    Harness {
        handle,
        metrics,
        log,
        join: Some(join),
    }
}

fn config(parallel: usize, kv_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        parallel,
        max_queue: 64,
        ctx: 512,
        prefill_chunk: 8,
        prefix_cache_mem: 0,
        kv_mem: kv_blocks * block_bytes(),
    }
}

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        ignore_eos: true,
        ..Default::default()
    }
}

fn submit(h: &SchedulerHandle, prompt: Vec<u32>, max_tokens: usize) -> UnboundedReceiver<SeqEvent> {
    submit_params(h, prompt, greedy(max_tokens))
}

fn submit_params(
    h: &SchedulerHandle,
    prompt: Vec<u32>,
    params: GenerateParams,
) -> UnboundedReceiver<SeqEvent> {
    let (tx, rx) = unbounded_channel();
    h.submit(SeqRequest {
        prompt,
        params,
        events: tx,
        arrived: Instant::now(),
        service: Default::default(),
        modules: Vec::new(),
        cache_key: 0,
        cancelled: tokio::sync::mpsc::unbounded_channel().0,
        constraint: None,
    })
    .unwrap();
    rx
}

/// Generated token ids until `Done`, or the error message.
fn collect(mut rx: UnboundedReceiver<SeqEvent>) -> Result<Vec<u32>, String> {
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no result within 30 s");
        match rx.try_recv() {
            Ok(SeqEvent::Text { token: Some(t), .. }) => ids.push(t.id),
            Ok(SeqEvent::Text { token: None, .. }) => {}
            Ok(SeqEvent::Done {
                completion_tokens, ..
            }) => {
                assert_eq!(completion_tokens, ids.len());
                return Ok(ids);
            }
            Ok(SeqEvent::Error(e)) => return Err(e),
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => return Err(format!("channel closed: {e}")),
        }
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 7 + i * 3) % 62 + 2)
        .collect()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn enough_kv_memory_means_no_preemption_and_exact_outputs() {
    let h = start(config(4, 0), Duration::ZERO);
    let rxs: Vec<_> = (0..6)
        .map(|i| submit(&h.handle, prompt(i, 10 + i as usize * 7), 40))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        let p = prompt(i as u32, 10 + i * 7);
        assert_eq!(collect(rx).unwrap(), expected(&p, 40), "request {i}");
    }
    assert_eq!(h.metrics.preemptions.load(Ordering::Relaxed), 0);
    // At most `parallel` sequences per step.
    assert!(h.log.lock().unwrap().iter().all(|s| s.len() <= 4));
}

#[test]
fn exhausted_kv_memory_preempts_and_recomputes_without_changing_outputs() {
    // Each request grows to 20 + 60 = 80 positions = 5 blocks; four at once would need 20
    // blocks but the pool has 9, so younger sequences are preempted and recomputed. A step takes
    // 1 ms so that all four are submitted before the first can finish on its own.
    let h = start(config(4, 9), Duration::from_millis(1));
    let rxs: Vec<_> = (0..4)
        .map(|i| submit(&h.handle, prompt(i, 20), 60))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(
            collect(rx).unwrap(),
            expected(&prompt(i as u32, 20), 60),
            "request {i} after preemption"
        );
    }
    let pre = h.metrics.preemptions.load(Ordering::Relaxed);
    assert!(pre > 0, "the budget forces preemption");
    // Never more KV than the budget, and every block comes back.
    let m = h.metrics.clone();
    wait_for("the pool to empty", || {
        m.kv_pool_used.load(Ordering::Relaxed) == 0 && m.running.load(Ordering::Relaxed) == 0
    });
    assert_eq!(
        h.metrics.kv_pool_limit.load(Ordering::Relaxed) as usize,
        9 * block_bytes()
    );
}

#[test]
fn a_prompt_larger_than_kv_memory_is_refused_but_others_run() {
    let h = start(config(2, 4), Duration::ZERO);
    let big = submit(&h.handle, prompt(1, 100), 4);
    let small = submit(&h.handle, prompt(2, 10), 4);
    let err = collect(big).unwrap_err();
    assert!(err.contains("KV memory"), "{err}");
    assert_eq!(collect(small).unwrap(), expected(&prompt(2, 10), 4));
}

#[test]
fn a_sequence_that_fills_the_whole_pool_alone_finishes_with_length() {
    // 3 blocks = 48 positions: the 10-token prompt and 38 generated tokens fill them, and the
    // logits of the last position give a 39th token.
    let h = start(config(1, 3), Duration::ZERO);
    let rx = submit(&h.handle, prompt(3, 10), 100);
    let out = collect(rx).unwrap();
    assert_eq!(out, expected(&prompt(3, 10), 39));
}

#[test]
fn cancelled_sequence_frees_its_kv_at_once() {
    let h = start(config(2, 0), Duration::from_millis(5));
    let mut rx = submit(&h.handle, prompt(4, 30), 10_000);
    let m = h.metrics.clone();
    wait_for("the first token", || {
        matches!(rx.try_recv(), Ok(SeqEvent::Text { .. }))
    });
    assert!(m.kv_pool_used.load(Ordering::Relaxed) > 0);
    drop(rx);
    wait_for("the KV to be freed", || {
        m.kv_pool_used.load(Ordering::Relaxed) == 0 && m.running.load(Ordering::Relaxed) == 0
    });
    assert_eq!(m.cancelled.load(Ordering::Relaxed), 1);
    // The scheduler is still serving.
    assert_eq!(
        collect(submit(&h.handle, prompt(5, 5), 3)).unwrap(),
        expected(&prompt(5, 5), 3)
    );
}

#[test]
fn full_queue_refuses_submissions() {
    let mut cfg = config(1, 0);
    cfg.max_queue = 2;
    let h = start(cfg, Duration::from_millis(20));
    let rxs: Vec<_> = (0..3)
        .map(|i| submit(&h.handle, prompt(i, 5), 20))
        .collect();
    let (tx, _rx) = unbounded_channel();
    let r = h.handle.submit(SeqRequest {
        prompt: prompt(9, 5),
        params: greedy(1),
        events: tx,
        arrived: Instant::now(),
        service: Default::default(),
        modules: Vec::new(),
        cache_key: 0,
        cancelled: tokio::sync::mpsc::unbounded_channel().0,
        constraint: None,
    });
    assert_eq!(r.err(), Some(SubmitError::QueueFull));
    for rx in rxs {
        assert_eq!(collect(rx).unwrap().len(), 20);
    }
}

#[test]
fn long_prompt_is_chunked_and_never_stalls_running_decodes() {
    let h = start(config(2, 0), Duration::from_millis(1));
    let mut a = submit(&h.handle, prompt(6, 4), 400);
    wait_for("the first token", || {
        matches!(a.try_recv(), Ok(SeqEvent::Text { .. }))
    });
    let b = submit(&h.handle, prompt(7, 200), 2);
    assert_eq!(collect(b).unwrap(), expected(&prompt(7, 200), 2));
    let log = h.log.lock().unwrap().clone();
    let chunks: Vec<&Vec<Step>> = log
        .iter()
        .filter(|s| s.iter().any(|&(n, _, _)| n == 8))
        .collect();
    // 200 prompt tokens at 8 per step, each step also decoding `a`.
    assert_eq!(chunks.len(), 25);
    for s in &chunks {
        assert_eq!(
            s.len(),
            2,
            "a prefill step without the running decode: {s:?}"
        );
        assert!(s.iter().any(|&(n, _, _)| n == 1), "{s:?}");
    }
}

#[test]
fn requests_start_in_arrival_order_and_none_starves() {
    let h = start(config(2, 0), Duration::from_millis(1));
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(i, 6)).collect();
    let rxs: Vec<_> = prompts
        .iter()
        .map(|p| submit(&h.handle, p.clone(), 10))
        .collect();
    for (p, rx) in prompts.iter().zip(rxs) {
        assert_eq!(collect(rx).unwrap(), expected(p, 10));
    }
    // FCFS with 2 slots: prompts start (position 0) in arrival order, never more than two
    // sequences per step.
    let log = h.log.lock().unwrap().clone();
    let order: Vec<u32> = log
        .iter()
        .flatten()
        .filter(|&&(_, _, pos0)| pos0 == 0)
        .map(|&(_, first, _)| first)
        .collect();
    let want: Vec<u32> = prompts.iter().map(|p| p[0]).collect();
    assert_eq!(order, want);
    assert!(log.iter().all(|s| s.len() <= 2));
}

fn submit_as(
    h: &SchedulerHandle,
    service: &str,
    priority: u32,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> UnboundedReceiver<SeqEvent> {
    let (tx, rx) = unbounded_channel();
    h.submit(SeqRequest {
        prompt,
        params: greedy(max_tokens),
        events: tx,
        arrived: Instant::now(),
        service: ServiceTag {
            name: service.into(),
            priority,
        },
        modules: Vec::new(),
        cache_key: 0,
        cancelled: tokio::sync::mpsc::unbounded_channel().0,
        constraint: None,
    })
    .unwrap();
    rx
}

/// The first token of each prompt in the order the prompts started (position 0 fed).
fn start_order(h: &Harness) -> Vec<u32> {
    h.log
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .filter(|&&(_, _, pos0)| pos0 == 0)
        .map(|&(_, first, _)| first)
        .collect()
}

#[test]
fn a_busy_service_cannot_starve_a_quiet_one() {
    // One batch slot; service A queues 6 requests, then quiet service B sends 2. FCFS would
    // start B's after all of A's; fair admission alternates as soon as B is waiting.
    let h = start(config(1, 0), Duration::from_millis(1));
    let a: Vec<Vec<u32>> = (0..6).map(|i| vec![2 + i, 10, 11]).collect();
    let b: Vec<Vec<u32>> = (0..2).map(|i| vec![40 + i, 10, 11]).collect();
    let mut rxs: Vec<_> = a
        .iter()
        .map(|p| submit_as(&h.handle, "A", 1, p.clone(), 8))
        .collect();
    rxs.extend(b.iter().map(|p| submit_as(&h.handle, "B", 1, p.clone(), 8)));
    for (p, rx) in a.iter().chain(&b).zip(rxs) {
        assert_eq!(collect(rx).unwrap(), expected(p, 8));
    }
    let order = start_order(&h);
    assert_eq!(order.len(), 8);
    let pos = |first: u32| order.iter().position(|&t| t == first).unwrap();
    // B's requests start among the first four (A's first may already be running when B
    // arrives), not 7th and 8th.
    assert!(pos(40) <= 2 && pos(41) <= 4, "start order {order:?}");
    // Within a service, arrival order is kept.
    let a_order: Vec<u32> = order.iter().copied().filter(|&t| t < 40).collect();
    assert_eq!(a_order, (2..8).collect::<Vec<u32>>());
}

#[test]
fn admission_is_weighted_by_priority() {
    let h = start(config(1, 0), Duration::from_millis(1));
    let mut rxs = Vec::new();
    for i in 0..6 {
        rxs.push(submit_as(&h.handle, "low", 1, vec![2 + i, 10], 6));
    }
    for i in 0..6 {
        rxs.push(submit_as(&h.handle, "high", 3, vec![40 + i, 10], 6));
    }
    for rx in rxs {
        assert_eq!(collect(rx).unwrap().len(), 6);
    }
    let order = start_order(&h);
    let high_in_first_8 = order[..8].iter().filter(|&&t| t >= 40).count();
    // Priority 3 against 1: about three of every four admissions while both wait
    // (FCFS would give it 2 of the first 8).
    assert!(high_in_first_8 >= 5, "start order {order:?}");
}

#[test]
fn a_service_below_its_share_gets_a_slot_without_waiting() {
    // Two slots, both taken by service "hog"'s long requests, with two more of hog's queued
    // ahead; "quiet" is owed one slot (equal priorities), so its request goes past hog's queue
    // and preempts hog's younger running one instead of waiting ~400 steps. Hog's outputs stay
    // exact (the preempted one is recomputed).
    let h = start(config(2, 0), Duration::from_millis(1));
    let hog: Vec<Vec<u32>> = (0..4).map(|i| prompt(i, 5)).collect();
    let mut hog_rx: Vec<_> = hog
        .iter()
        .map(|p| submit_as(&h.handle, "hog", 1, p.clone(), 400))
        .collect();
    wait_for("two hog requests to run and two to wait", || {
        h.metrics.running.load(Ordering::Relaxed) == 2
            && h.metrics.queue_depth.load(Ordering::Relaxed) == 2
    });
    let quiet = prompt(9, 4);
    let q = collect(submit_as(&h.handle, "quiet", 1, quiet.clone(), 4)).unwrap();
    assert_eq!(q, expected(&quiet, 4));
    // Neither hog request has finished by then; both finish exactly.
    let mut got = vec![Vec::new(); 4];
    let mut done = [false; 4];
    let mut drain = |rxs: &mut Vec<UnboundedReceiver<SeqEvent>>, got: &mut Vec<Vec<u32>>| {
        for (i, rx) in rxs.iter_mut().enumerate() {
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    SeqEvent::Text { token: Some(t), .. } => got[i].push(t.id),
                    SeqEvent::Done { .. } => done[i] = true,
                    SeqEvent::Error(e) => panic!("hog request failed: {e}"),
                    _ => {}
                }
            }
        }
        done
    };
    assert_eq!(
        drain(&mut hog_rx, &mut got),
        [false; 4],
        "a hog request finished first"
    );
    assert!(h.metrics.share_preemptions.load(Ordering::Relaxed) >= 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while drain(&mut hog_rx, &mut got) != [true; 4] {
        assert!(Instant::now() < deadline, "hog requests did not finish");
        std::thread::sleep(Duration::from_millis(2));
    }
    for (p, g) in hog.iter().zip(&got) {
        assert_eq!(g, &expected(p, 400));
    }
}

fn speculative(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        speculative: Some(modu_engine::SpecConfig::default()),
        ..greedy(max_tokens)
    }
}

/// Greedy continuation by the cyclic rule.
fn expected_cyclic(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut last = *prompt.last().unwrap();
    (0..n)
        .map(|_| {
            last = cyclic_next(last);
            last
        })
        .collect()
}

#[test]
fn speculation_inside_continuous_batching_is_exact_and_saves_steps() {
    let h = start_model(config(4, 0), Duration::ZERO, true);
    // Two speculating requests and a plain one in the same batch.
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| prompt(i, 9 + i as usize)).collect();
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let params = if i < 2 { speculative(60) } else { greedy(60) };
            submit_params(&h.handle, p.clone(), params)
        })
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(
            collect(rx).unwrap(),
            expected_cyclic(&prompts[i], 60),
            "request {i}"
        );
    }
    let drafted = h.metrics.spec_draft_tokens.load(Ordering::Relaxed);
    let kept = h.metrics.spec_accepted_tokens.load(Ordering::Relaxed);
    assert!(
        kept >= 60,
        "drafts of a repeating output are kept: {kept} of {drafted}"
    );
    // Verification passes feed several tokens, and at most SPEC_STEP_TOKENS per step once
    // prompts are in; the plain request never gets a draft, so the whole batch finishes in
    // the steps the plain one needs.
    let log = h.log.lock().unwrap();
    assert!(log
        .iter()
        .any(|step| step.iter().any(|s| s.0 > 1 && s.2 > 12)));
    assert!(log.len() < 60 + 10, "{} steps", log.len());
}

#[test]
fn rejected_drafts_change_nothing() {
    // The hash rule never repeats what came before, so drafts (when a bigram recurs) fail.
    let h = start(config(2, 0), Duration::ZERO);
    // Nine tokens: a chunk of 8, then the last one alone, after which "5 6" recurs.
    let p = vec![5, 6, 7, 5, 6, 7, 8, 5, 6];
    let out = collect(submit_params(&h.handle, p.clone(), speculative(50))).unwrap();
    assert_eq!(out, expected(&p, 50));
    assert!(h.metrics.spec_draft_tokens.load(Ordering::Relaxed) > 0);
}

#[test]
fn speculation_under_preemption_is_exact() {
    // As the preemption test above, with every request speculating: drafts only take free
    // blocks, and a preempted sequence recomputes its kept tokens.
    let h = start_model(config(4, 9), Duration::from_millis(1), true);
    let rxs: Vec<_> = (0..4)
        .map(|i| submit_params(&h.handle, prompt(i, 20), speculative(60)))
        .collect();
    for (i, rx) in rxs.into_iter().enumerate() {
        assert_eq!(
            collect(rx).unwrap(),
            expected_cyclic(&prompt(i as u32, 20), 60),
            "request {i}"
        );
    }
    let m = h.metrics.clone();
    wait_for("the pool to empty", || {
        m.kv_pool_used.load(Ordering::Relaxed) == 0 && m.running.load(Ordering::Relaxed) == 0
    });
}
