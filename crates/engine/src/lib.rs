//! modu's engine: tokenizer and chat templates from GGUF metadata, the model architectures, the
//! KV cache, sampling and the generation loop. Data flows one way: a request becomes tokens, the
//! model's forward pass turns them into logits with the kernels, and the sampler picks the next
//! token.

pub mod chat;
pub mod constrain;
pub mod error;
pub mod eval;
pub mod generate;
pub mod hf;
pub mod imatrix;
pub mod kv_cache;
pub mod layers;
pub mod lora;
pub mod models;
pub mod quantize;
pub mod sampling;
pub mod speculate;
pub mod synth;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, ChatTemplateError};
pub use constrain::{Constraint, Grammar, GrammarEngine, GrammarError, TokenMask};
pub use error::ModelError;
pub use kv_cache::{KvCache, KvPool, KV_BLOCK};
pub use lora::{AdapterFormat, BaseShapes, LoraAdapter, LoraError, ModuleRef, Proj};
pub use models::{load_model, BatchSeq, Logits, Model, ModelInfo};
pub use sampling::{Sampler, SamplingParams};
pub use speculate::{NgramDrafter, SpecConfig, SpecStats};
pub use tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
