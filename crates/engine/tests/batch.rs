//! Batch invariance: sequences stepped together through `forward_batch` (one weight pass for
//! all of them, different lengths and positions) get exactly the logits they get alone.

mod common;

use std::sync::Arc;

use modu_engine::{load_model, BatchSeq, Logits};
use modu_gguf::GgufFile;

fn check(model_name: &str) {
    let file = Arc::new(GgufFile::open(common::model_path(model_name)).unwrap());
    let model = load_model(file).unwrap();
    let prompts: [&[u32]; 3] = [
        &[2, 651, 6037, 576, 4794],
        &[2, 9259],
        &[2, 1018, 1261, 7423, 23676, 1531, 691, 3285],
    ];
    let steps: [[u32; 3]; 4] = [
        [108, 23674, 506],
        [496, 1595, 529],
        [18, 669, 108],
        [9079, 3224, 5279],
    ];

    // Alone.
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut cache = model.new_cache(64);
        let mut rows = vec![model.forward(p, &mut cache, Logits::Last).unwrap()];
        for s in &steps {
            rows.push(model.forward(&[s[i]], &mut cache, Logits::Last).unwrap());
        }
        alone.push(rows);
    }

    // Together: a joint prefill, then joint single-token steps.
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache(64)).collect();
    let mut together: Vec<Vec<Vec<f32>>> = vec![vec![]; prompts.len()];
    {
        let mut seqs: Vec<BatchSeq> = prompts
            .iter()
            .zip(caches.iter_mut())
            .map(|(p, c)| BatchSeq {
                tokens: p,
                cache: c,
            })
            .collect();
        for (i, l) in model
            .forward_batch(&mut seqs)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            together[i].push(l);
        }
    }
    for s in &steps {
        let toks: Vec<[u32; 1]> = s.iter().map(|&t| [t]).collect();
        let mut seqs: Vec<BatchSeq> = toks
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, c)| BatchSeq {
                tokens: t,
                cache: c,
            })
            .collect();
        for (i, l) in model
            .forward_batch(&mut seqs)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            together[i].push(l);
        }
    }
    for i in 0..prompts.len() {
        for (step, (a, b)) in alone[i].iter().zip(&together[i]).enumerate() {
            assert_eq!(a.len(), model.info().n_vocab);
            assert!(
                a == b,
                "{model_name}: sequence {i} step {step}: batched logits differ from the solo run"
            );
        }
    }
}

#[test]
fn gemma_batch_equals_alone() {
    check("gemma-3-270m");
}

#[test]
fn qwen_batch_equals_alone() {
    check("qwen2.5-coder-0.5b-instruct");
}

#[test]
fn bad_batches_are_errors() {
    let file = Arc::new(GgufFile::open(common::model_path("gemma-3-270m")).unwrap());
    let model = load_model(file).unwrap();
    let mut c1 = model.new_cache(4);
    let mut c2 = model.new_cache(4);
    // The second sequence does not fit: nothing is cached for either.
    let mut seqs = vec![
        BatchSeq {
            tokens: &[2, 3],
            cache: &mut c1,
        },
        BatchSeq {
            tokens: &[2, 3, 4, 5, 6],
            cache: &mut c2,
        },
    ];
    assert!(model.forward_batch(&mut seqs).is_err());
    drop(seqs);
    assert_eq!((c1.len(), c2.len()), (0, 0));
    let mut seqs: Vec<BatchSeq> = vec![];
    assert!(model.forward_batch(&mut seqs).is_err());
}
