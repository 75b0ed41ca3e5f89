//! The module registry: LoRA adapters over the served base model, by name.
//!
//! Modules are registered at start (`--module NAME=PATH`) or at run time (`POST /v1/modules`)
//! and looked up per request. Loading reads and validates the file against the base model's
//! shapes on the calling (HTTP blocking-pool) thread, never on the scheduler thread, so running
//! streams do not pause. Every (re)load creates a new *generation*: a request holds an `Arc` of
//! the generation it started with, so unloading or replacing a module never disturbs requests
//! in flight (they finish on the old weights, which are freed when the last one ends).
//!
//! A byte budget bounds the resident adapters: when a load or a reload goes over it, the least
//! recently used modules that no request is using are evicted (their weights dropped, their
//! registration kept) and re-read from their file on the next request that names them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use modu_engine::{BaseShapes, LoraAdapter, LoraError};

/// Why a module operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("invalid module name {0:?}: use 1-64 letters (any script), digits, '.', '_' or '-'")]
    BadName(String),
    #[error("the name {0:?} is the base model's; pick another module name")]
    BaseName(String),
    #[error("no module named {0:?} is registered")]
    NotFound(String),
    #[error("{0}")]
    OutsideDirs(String),
    #[error("module {name:?}: {source}")]
    Load {
        name: String,
        #[source]
        source: LoraError,
    },
}

/// One module as `GET /v1/modules` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleSummary {
    pub name: String,
    pub path: String,
    pub format: String,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    /// Whether its weights are in memory (an evicted module reloads on demand).
    pub resident: bool,
    pub resident_bytes: usize,
    pub generation: u64,
    pub requests: u64,
    /// Milliseconds the last (re)load took.
    pub load_ms: f64,
}

struct Entry {
    path: PathBuf,
    adapter: Option<Arc<LoraAdapter>>,
    generation: u64,
    /// Kept from the last load for listing while evicted.
    summary: ModuleSummary,
    last_used: u64,
}

struct Inner {
    modules: BTreeMap<String, Entry>,
    clock: u64,
}

/// The registry; shared by the HTTP handlers.
pub struct ModuleRegistry {
    shapes: BaseShapes,
    base_names: Vec<String>,
    /// Most bytes of resident adapters (0 = no limit).
    budget: usize,
    inner: Mutex<Inner>,
    generations: AtomicU64,
    evictions: AtomicU64,
    /// Times an evicted module was read back in for a request.
    reloads: AtomicU64,
    /// Canonical directories run-time loads may read from.
    dirs: Vec<PathBuf>,
}

/// A module picked for a request: the generation it runs with.
#[derive(Clone)]
pub struct ModuleHandle {
    pub name: String,
    pub adapter: Arc<LoraAdapter>,
    pub generation: u64,
}

fn check_name(name: &str) -> Result<(), ModuleError> {
    // Korean service and module names (번역-lora) are normal here.
    let ok = !name.is_empty()
        && name.chars().count() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ModuleError::BadName(name.to_string()))
    }
}

impl ModuleRegistry {
    /// An empty registry for a base model with `shapes`, known as `base_names`.
    pub fn new(shapes: BaseShapes, base_names: Vec<String>, budget: usize) -> Self {
        Self {
            shapes,
            base_names,
            budget,
            inner: Mutex::new(Inner {
                modules: BTreeMap::new(),
                clock: 0,
            }),
            generations: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            dirs: Vec::new(),
        }
    }

    /// Restrict run-time loads ([`ModuleRegistry::check_dir`]) to these directories.
    pub fn set_dirs(&mut self, dirs: &[PathBuf]) -> std::io::Result<()> {
        self.dirs = dirs
            .iter()
            .map(std::fs::canonicalize)
            .collect::<std::io::Result<_>>()?;
        Ok(())
    }

    /// The canonical form of `path` if it lies inside one of the module directories (symbolic
    /// links resolved first, so none leads outside). Without directories, run-time loading is
    /// off.
    pub fn check_dir(&self, path: &Path) -> Result<PathBuf, ModuleError> {
        if self.dirs.is_empty() {
            return Err(ModuleError::OutsideDirs(
                "loading modules at run time is off: start the server with --module-dir DIR".into(),
            ));
        }
        let real = std::fs::canonicalize(path)
            .map_err(|e| ModuleError::OutsideDirs(format!("{}: {e}", path.display())))?;
        if self.dirs.iter().any(|d| real.starts_with(d)) {
            Ok(real)
        } else {
            Err(ModuleError::OutsideDirs(format!(
                "{} is outside the module directories (--module-dir)",
                path.display()
            )))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (no multi-step updates).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self, name: &str, path: &Path) -> Result<(Arc<LoraAdapter>, f64), ModuleError> {
        let t = Instant::now();
        let ad =
            LoraAdapter::open(path, Some(&self.shapes)).map_err(|source| ModuleError::Load {
                name: name.to_string(),
                source,
            })?;
        Ok((Arc::new(ad), t.elapsed().as_secs_f64() * 1e3))
    }

    fn summary(
        name: &str,
        path: &Path,
        ad: &LoraAdapter,
        generation: u64,
        load_ms: f64,
    ) -> ModuleSummary {
        ModuleSummary {
            name: name.to_string(),
            path: path.display().to_string(),
            format: format!("{:?}", ad.format()),
            rank: ad.rank(),
            alpha: ad.alpha(),
            targets: ad.targets().iter().map(|p| format!("{p:?}")).collect(),
            resident: true,
            resident_bytes: ad.resident_bytes(),
            generation,
            requests: 0,
            load_ms,
        }
    }

    /// Register (or replace) `name` from `path`: read and validate the file, then swap it in.
    pub fn load(&self, name: &str, path: &Path) -> Result<ModuleSummary, ModuleError> {
        check_name(name)?;
        if self.base_names.iter().any(|b| b.eq_ignore_ascii_case(name)) {
            return Err(ModuleError::BaseName(name.to_string()));
        }
        let (ad, ms) = self.read(name, path)?;
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let summary = Self::summary(name, path, &ad, generation, ms);
        let mut g = self.lock();
        g.clock += 1;
        let clock = g.clock;
        let requests = g.modules.get(name).map_or(0, |e| e.summary.requests);
        g.modules.insert(
            name.to_string(),
            Entry {
                path: path.to_path_buf(),
                adapter: Some(ad),
                generation,
                summary: ModuleSummary {
                    requests,
                    ..summary.clone()
                },
                last_used: clock,
            },
        );
        self.evict_over_budget(&mut g, name);
        Ok(summary)
    }

    /// Forget `name`. Requests already running on it finish normally.
    pub fn unload(&self, name: &str) -> Result<(), ModuleError> {
        match self.lock().modules.remove(name) {
            Some(_) => Ok(()),
            None => Err(ModuleError::NotFound(name.to_string())),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lock().modules.contains_key(name)
    }

    /// The current generation of `name` for a new request (re-read from its file first if it
    /// was evicted).
    pub fn get(&self, name: &str) -> Result<ModuleHandle, ModuleError> {
        let path = {
            let mut g = self.lock();
            g.clock += 1;
            let clock = g.clock;
            let e = g
                .modules
                .get_mut(name)
                .ok_or_else(|| ModuleError::NotFound(name.to_string()))?;
            e.last_used = clock;
            e.summary.requests += 1;
            if let Some(ad) = &e.adapter {
                return Ok(ModuleHandle {
                    name: name.to_string(),
                    adapter: ad.clone(),
                    generation: e.generation,
                });
            }
            e.path.clone()
        };
        // Evicted: reload outside the lock.
        let (ad, ms) = self.read(name, &path)?;
        let mut g = self.lock();
        let Some(e) = g.modules.get_mut(name) else {
            return Err(ModuleError::NotFound(name.to_string()));
        };
        if let Some(cur) = &e.adapter {
            // Someone reloaded it meanwhile; use theirs.
            return Ok(ModuleHandle {
                name: name.to_string(),
                adapter: cur.clone(),
                generation: e.generation,
            });
        }
        self.reloads.fetch_add(1, Ordering::Relaxed);
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        e.adapter = Some(ad.clone());
        e.generation = generation;
        e.summary.resident = true;
        e.summary.generation = generation;
        e.summary.load_ms = ms;
        self.evict_over_budget(&mut g, name);
        Ok(ModuleHandle {
            name: name.to_string(),
            adapter: ad,
            generation,
        })
    }

    /// Drop the weights of idle modules, least recently used first, until the resident bytes
    /// fit the budget (`keep` is never evicted).
    fn evict_over_budget(&self, g: &mut Inner, keep: &str) {
        if self.budget == 0 {
            return;
        }
        loop {
            let resident: usize = g
                .modules
                .values()
                .filter(|e| e.adapter.is_some())
                .map(|e| e.summary.resident_bytes)
                .sum();
            if resident <= self.budget {
                return;
            }
            let victim = g
                .modules
                .iter()
                .filter(|(n, e)| {
                    n.as_str() != keep
                        && e.adapter
                            .as_ref()
                            .is_some_and(|a| Arc::strong_count(a) == 1)
                })
                .min_by_key(|(_, e)| e.last_used)
                .map(|(n, _)| n.clone());
            let Some(v) = victim else {
                return; // everything else is in use
            };
            let e = g.modules.get_mut(&v).expect("victim exists");
            e.adapter = None;
            e.summary.resident = false;
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn list(&self) -> Vec<ModuleSummary> {
        self.lock()
            .modules
            .values()
            .map(|e| e.summary.clone())
            .collect()
    }

    /// Names of the modules whose adapters are in memory, sorted, and the largest one's bytes.
    pub fn resident(&self) -> (Vec<String>, usize) {
        let inner = self.lock();
        let mut names = Vec::new();
        let mut largest = 0;
        for (name, e) in inner.modules.iter() {
            if e.adapter.is_some() {
                names.push(name.clone());
                largest = largest.max(e.summary.resident_bytes);
            }
        }
        names.sort();
        (names, largest)
    }

    /// Most bytes of resident adapters (0: no limit).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes of adapters held by the registry.
    pub fn resident_bytes(&self) -> usize {
        self.lock()
            .modules
            .values()
            .filter(|e| e.adapter.is_some())
            .map(|e| e.summary.resident_bytes)
            .sum()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Evicted modules read back in for a request.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.lock().modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
