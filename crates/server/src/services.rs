//! Services: who may call the server, with which key, which modules they may use and how much.
//!
//! A service is one tenant of the shared base model (an app, a team). Its API keys are stored as
//! SHA-256 hashes only: keys are 256-bit random tokens, so a fast unsalted hash is as strong as
//! a password hash here and lets a request's key be found with one hash and one map lookup.
//! Limits are enforced per service at the HTTP edge (requests and tokens per sliding minute,
//! concurrent requests, tokens per request); the scheduler then shares the batch between
//! services by priority (see `scheduler`).
//!
//! Without a config file there is one open service, `default`, and the server stays on loopback.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The name of the service used when no config is given (or a config has no keys at all).
pub const DEFAULT_SERVICE: &str = "default";

/// The usage database's file name when a config does not set `database` (beside the config).
pub const DEFAULT_DATABASE: &str = "modu-usage.db";

/// Why a services config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `toml`'s message names the line and column and quotes the offending line.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The machine's power and price model, for energy and cost accounting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Watts drawn by the machine when idle.
    #[serde(default = "default_idle")]
    pub watts_idle: f64,
    /// Watts drawn with every core busy.
    #[serde(default = "default_busy")]
    pub watts_busy: f64,
    /// Price of one machine-hour (any currency), attributed to requests by CPU share.
    #[serde(default)]
    pub price_per_hour: f64,
    /// Cores the CPU share is taken of; default: the cores this process may use.
    #[serde(default)]
    pub cores: Option<usize>,
}

fn default_idle() -> f64 {
    10.0
}
fn default_busy() -> f64 {
    65.0
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            watts_idle: default_idle(),
            watts_busy: default_busy(),
            price_per_hour: 0.0,
            cores: None,
        }
    }
}

impl MachineConfig {
    pub fn cores(&self) -> f64 {
        self.cores
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1)
            .max(1) as f64
    }

    /// Joules for a request that was in batches for `wall_s` seconds of (its token share of)
    /// step time and used `cpu_s` CPU-seconds: its share of the idle draw plus the dynamic
    /// draw of the cores it kept busy. Measured RAPL joules win when available.
    pub fn energy_j(&self, wall_s: f64, cpu_s: f64, rapl_j: Option<f64>) -> f64 {
        match rapl_j {
            Some(j) => j,
            None => {
                wall_s * self.watts_idle
                    + cpu_s / self.cores() * (self.watts_busy - self.watts_idle)
            }
        }
    }

    /// The request's share of the machine-hour price: CPU-seconds over the machine's
    /// core-seconds.
    pub fn cost(&self, cpu_s: f64) -> f64 {
        cpu_s / self.cores() / 3600.0 * self.price_per_hour
    }
}

/// Per-service limits; `None` means unlimited.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    /// Prompt plus completion tokens per sliding minute.
    pub tokens_per_minute: Option<u64>,
    pub max_concurrent: Option<usize>,
    /// `max_tokens` of a request is capped at this.
    pub max_tokens_per_request: Option<usize>,
}

/// One service as written in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `sha256:<hex>` of each API key.
    #[serde(default)]
    pub key_hashes: Vec<String>,
    /// Modules (the base model's id, or LoRA module names) the service may use; absent means
    /// all.
    #[serde(default)]
    pub allowed_modules: Option<Vec<String>>,
    /// The module used when a request names none (or names the base model generically).
    #[serde(default)]
    pub default_module: Option<String>,
    /// Weight of the service in batch admission (2 gets twice the slots of 1 under load).
    #[serde(default = "default_priority")]
    pub priority: u32,
    #[serde(flatten)]
    pub limits: Limits,
}

fn default_priority() -> u32 {
    1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub key_hashes: Vec<String>,
}

/// `[metrics]` of `modu.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    #[serde(default)]
    pub key_hashes: Vec<String>,
    /// `/metrics` readable without a key although keys are configured: for scrapers that
    /// cannot send one, such as the Gateway API Inference Extension's endpoint picker (its
    /// metrics data source has no credentials). It then shows every service's series and
    /// every module's name to whoever reaches the port: route only `/v1` to the server from
    /// outside (deploy/kubernetes does).
    #[serde(default)]
    pub public: bool,
}

/// The whole `modu.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// SQLite file for usage records (relative paths are relative to the config file).
    #[serde(default)]
    pub database: Option<PathBuf>,
    #[serde(default)]
    pub machine: MachineConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[metrics]`: keys that may read `/metrics` and nothing else (for scrapers), or
    /// `public = true`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Services by name, in file order.
    #[serde(default)]
    pub services: OrderedServices,
    /// LoRA modules to register at start: name = adapter file or PEFT directory (relative
    /// paths are relative to the config file).
    #[serde(default)]
    pub modules: std::collections::BTreeMap<String, PathBuf>,
}

/// `[services.NAME]` tables in file order, deserialized in place so that an error in one
/// carries its line number.
#[derive(Debug, Clone, Default)]
pub struct OrderedServices(pub Vec<(String, ServiceConfig)>);

impl<'de> Deserialize<'de> for OrderedServices {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedServices;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a table of services")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some((k, s)) = m.next_entry::<String, ServiceConfig>()? {
                    v.push((k, s));
                }
                Ok(OrderedServices(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// A parsed and checked services configuration.
#[derive(Debug, Clone)]
pub struct ServicesConfig {
    /// In file order.
    pub services: Vec<(String, ServiceConfig)>,
    pub admin_key_hashes: Vec<String>,
    /// Keys that may only scrape `/metrics`.
    pub metrics_key_hashes: Vec<String>,
    /// `[metrics] public`: `/metrics` needs no key.
    pub metrics_public: bool,
    pub machine: MachineConfig,
    pub database: Option<PathBuf>,
    /// `[modules]`: name → adapter path.
    pub modules: Vec<(String, PathBuf)>,
}

impl ServicesConfig {
    /// No config: one open service.
    pub fn open() -> ServicesConfig {
        ServicesConfig {
            services: vec![(
                DEFAULT_SERVICE.to_string(),
                ServiceConfig {
                    priority: 1,
                    ..Default::default()
                },
            )],
            admin_key_hashes: vec![],
            metrics_key_hashes: vec![],
            metrics_public: false,
            machine: MachineConfig::default(),
            database: None,
            modules: vec![],
        }
    }

    pub fn load(path: &Path) -> Result<ServicesConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = ServicesConfig::parse(&text, path)?;
        // Usage is persisted whenever there is a config: by default beside it.
        let db = c
            .database
            .take()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATABASE));
        let dir = path.parent().unwrap_or(Path::new("."));
        c.database = Some(if db.is_relative() { dir.join(db) } else { db });
        for (_, p) in &mut c.modules {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        Ok(c)
    }

    /// Parse a config text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<ServicesConfig, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: FileConfig = toml::from_str(text).map_err(parse_err)?;
        let mut services = Vec::new();
        for (name, s) in file.services.0 {
            if name.trim().is_empty() {
                return Err(invalid("a service name must not be empty".into()));
            }
            let l = &s.limits;
            let zero = [
                ("requests_per_minute", l.requests_per_minute == Some(0)),
                ("tokens_per_minute", l.tokens_per_minute == Some(0)),
                ("max_concurrent", l.max_concurrent == Some(0)),
                (
                    "max_tokens_per_request",
                    l.max_tokens_per_request == Some(0),
                ),
            ];
            if let Some((field, _)) = zero.iter().find(|(_, z)| *z) {
                return Err(invalid(format!(
                    "[services.{name:?}]: {field} must be at least 1 (leave it out for no limit)"
                )));
            }
            if s.priority == 0 {
                return Err(invalid(format!(
                    "[services.{name:?}]: priority must be at least 1"
                )));
            }
            if let (Some(d), Some(allowed)) = (&s.default_module, &s.allowed_modules) {
                if !allowed.contains(d) {
                    return Err(invalid(format!(
                        "[services.{name:?}]: default_module {d:?} is not in allowed_modules"
                    )));
                }
            }
            services.push((name, s));
        }
        let all_hashes = services
            .iter()
            .flat_map(|(n, s)| s.key_hashes.iter().map(move |h| (n.as_str(), h)))
            .chain(file.admin.key_hashes.iter().map(|h| ("admin", h)))
            .chain(file.metrics.key_hashes.iter().map(|h| ("metrics", h)));
        let mut seen = HashMap::new();
        for (owner, h) in all_hashes {
            if parse_hash(h).is_none() {
                return Err(invalid(format!(
                    "{owner}: {h:?} is not a key hash (expected \"sha256:\" and 64 hex digits; \
                     create keys with `modu key new`)"
                )));
            }
            if let Some(prev) = seen.insert(h.to_ascii_lowercase(), owner) {
                return Err(invalid(format!(
                    "the same key hash is listed for {prev} and {owner}"
                )));
            }
        }
        if services.is_empty() {
            services = ServicesConfig::open().services;
        }
        if file.machine.watts_busy < file.machine.watts_idle || file.machine.watts_idle < 0.0 {
            return Err(invalid(
                "[machine]: watts_busy must be at least watts_idle, both non-negative".into(),
            ));
        }
        Ok(ServicesConfig {
            services,
            admin_key_hashes: file.admin.key_hashes,
            metrics_key_hashes: file.metrics.key_hashes,
            metrics_public: file.metrics.public,
            machine: file.machine,
            database: file.database,
            modules: file.modules.into_iter().collect(),
        })
    }

    /// Whether requests must carry a key (any key is configured).
    pub fn auth_enabled(&self) -> bool {
        !self.admin_key_hashes.is_empty()
            || !self.metrics_key_hashes.is_empty()
            || self.services.iter().any(|(_, s)| !s.key_hashes.is_empty())
    }
}

/// `sha256:<hex>` of a key, the form stored in the config.
pub fn hash_key(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn parse_hash(h: &str) -> Option<&str> {
    let hex = h.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Admin,
    /// A key that may read `/metrics` only.
    Metrics,
    Service(usize),
}

/// Why a request is refused before it reaches the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// 401.
    Unauthorized(String),
    /// 403.
    Forbidden(String),
    /// 429: retry after this many seconds.
    Limited { message: String, retry_after: u64 },
}

/// Sliding-window usage of one service over the last minute.
#[derive(Default)]
struct Window {
    /// (when, tokens) per request started in the last minute.
    requests: VecDeque<Instant>,
    tokens: VecDeque<(Instant, u64)>,
}

const MINUTE: Duration = Duration::from_secs(60);

impl Window {
    fn trim(&mut self, now: Instant) {
        while self.requests.front().is_some_and(|&t| now - t >= MINUTE) {
            self.requests.pop_front();
        }
        while self.tokens.front().is_some_and(|&(t, _)| now - t >= MINUTE) {
            self.tokens.pop_front();
        }
    }
}

/// Seconds until `t` is a minute old (at least 1).
fn secs_until_expiry(t: Instant, now: Instant) -> u64 {
    let left = (t + MINUTE).saturating_duration_since(now);
    left.as_secs_f64().ceil().max(1.0) as u64
}

/// Runtime state of one service.
pub struct Service {
    pub name: String,
    pub config: ServiceConfig,
    window: Mutex<Window>,
    active: Arc<AtomicUsize>,
}

/// Held while a request of a service is being answered; releases its concurrency slot.
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Services at run time: key lookup and limit enforcement.
pub struct Services {
    pub list: Vec<Service>,
    by_hash: HashMap<String, Caller>,
    pub auth: bool,
    /// `[metrics] public`.
    pub metrics_public: bool,
    pub machine: MachineConfig,
}

impl Services {
    pub fn new(c: &ServicesConfig) -> Services {
        let mut by_hash = HashMap::new();
        for (i, (_, s)) in c.services.iter().enumerate() {
            for h in &s.key_hashes {
                by_hash.insert(h.to_ascii_lowercase(), Caller::Service(i));
            }
        }
        for h in &c.admin_key_hashes {
            by_hash.insert(h.to_ascii_lowercase(), Caller::Admin);
        }
        for h in &c.metrics_key_hashes {
            by_hash.insert(h.to_ascii_lowercase(), Caller::Metrics);
        }
        Services {
            list: c
                .services
                .iter()
                .map(|(n, s)| Service {
                    name: n.clone(),
                    config: s.clone(),
                    window: Mutex::new(Window::default()),
                    active: Arc::new(AtomicUsize::new(0)),
                })
                .collect(),
            by_hash,
            auth: c.auth_enabled(),
            metrics_public: c.metrics_public,
            machine: c.machine.clone(),
        }
    }

    /// Who sent a request with this `Authorization` header value. With authentication off,
    /// everyone is the first service (a key, if sent, is ignored).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Refusal> {
        if !self.auth {
            return Ok(Caller::Service(0));
        }
        let Some(h) = authorization else {
            return Err(Refusal::Unauthorized(
                "missing API key: send it as `Authorization: Bearer KEY`".into(),
            ));
        };
        let key = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .unwrap_or(h)
            .trim();
        self.by_hash
            .get(&hash_key(key))
            .cloned()
            .ok_or_else(|| Refusal::Unauthorized("invalid API key".into()))
    }

    /// The module a request of service `i` names: the base model's names all mean `base_id`;
    /// none means the service's default, else the base model.
    pub fn module_name(
        &self,
        i: usize,
        requested: Option<&str>,
        base_id: &str,
        base_names: &[String],
    ) -> String {
        match requested {
            None | Some("") => self.list[i]
                .config
                .default_module
                .clone()
                .unwrap_or_else(|| base_id.to_string()),
            Some(m) if base_names.iter().any(|n| n.eq_ignore_ascii_case(m)) => base_id.to_string(),
            Some(m) => m.to_string(),
        }
    }

    /// 403 unless service `i` may use `module`.
    pub fn check_allowed(&self, i: usize, module: &str) -> Result<(), Refusal> {
        let s = &self.list[i];
        match &s.config.allowed_modules {
            Some(allowed) if !allowed.iter().any(|a| a == module) => Err(Refusal::Forbidden(
                format!("the service `{}` may not use the module `{module}`", s.name),
            )),
            _ => Ok(()),
        }
    }

    /// Whether any service names `module` (so it is a module of this deployment, loaded or
    /// not, rather than a typo).
    pub fn knows_module(&self, module: &str) -> bool {
        self.list.iter().any(|s| {
            s.config.default_module.as_deref() == Some(module)
                || s.config
                    .allowed_modules
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|m| m == module))
        })
    }

    /// Check service `i`'s limits for a request of `prompt_tokens` and take a concurrency slot
    /// and a request in its window; the caller adds completion tokens with [`Services::add_tokens`].
    pub fn admit(&self, i: usize, prompt_tokens: u64) -> Result<ActiveGuard, Refusal> {
        let s = &self.list[i];
        let l = &s.config.limits;
        let now = Instant::now();
        let mut w = s.window.lock().unwrap_or_else(|p| p.into_inner());
        w.trim(now);
        if let Some(rpm) = l.requests_per_minute {
            if w.requests.len() as u64 >= rpm {
                // The window frees when enough of the oldest requests age out.
                let k = (w.requests.len() as u64 - rpm) as usize;
                let t = w.requests[k.min(w.requests.len() - 1)];
                return Err(Refusal::Limited {
                    message: format!(
                        "the service `{}` is over its limit of {rpm} requests per minute",
                        s.name
                    ),
                    retry_after: secs_until_expiry(t, now),
                });
            }
        }
        tpm_check(s, &w, now, prompt_tokens)?;
        if let Some(max) = l.max_concurrent {
            let mut cur = s.active.load(Ordering::SeqCst);
            loop {
                if cur >= max {
                    return Err(Refusal::Limited {
                        message: format!(
                            "the service `{}` already has {max} requests in progress",
                            s.name
                        ),
                        retry_after: 1,
                    });
                }
                match s
                    .active
                    .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
                {
                    Ok(_) => break,
                    Err(now) => cur = now,
                }
            }
        } else {
            s.active.fetch_add(1, Ordering::SeqCst);
        }
        w.requests.push_back(now);
        if prompt_tokens > 0 {
            w.tokens.push_back((now, prompt_tokens));
        }
        Ok(ActiveGuard(s.active.clone()))
    }

    /// After [`Services::admit`] with no prompt tokens (before the prompt was tokenized): count
    /// the prompt's tokens, or refuse it (429) if they do not fit the tokens-per-minute window.
    pub fn charge_prompt(&self, i: usize, prompt_tokens: u64) -> Result<(), Refusal> {
        let s = &self.list[i];
        let now = Instant::now();
        let mut w = s.window.lock().unwrap_or_else(|p| p.into_inner());
        w.trim(now);
        tpm_check(s, &w, now, prompt_tokens)?;
        if prompt_tokens > 0 {
            w.tokens.push_back((now, prompt_tokens));
        }
        Ok(())
    }

    /// Count generated tokens against service `i`'s tokens-per-minute window.
    pub fn add_tokens(&self, i: usize, n: u64) {
        if n == 0 {
            return;
        }
        let mut w = self.list[i]
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        w.tokens.push_back((Instant::now(), n));
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|s| s.name == name)
    }
}

/// 429 unless `prompt_tokens` more fit service `s`'s tokens-per-minute window now.
fn tpm_check(s: &Service, w: &Window, now: Instant, prompt_tokens: u64) -> Result<(), Refusal> {
    let l = &s.config.limits;
    if let Some(tpm) = l.tokens_per_minute {
        if prompt_tokens > tpm {
            // Waiting would not help; say so rather than send the client into a retry loop.
            return Err(Refusal::Limited {
                message: format!(
                    "the prompt has {prompt_tokens} tokens, more than the service `{}`'s \
                     limit of {tpm} tokens per minute",
                    s.name
                ),
                retry_after: 60,
            });
        }
        let used: u64 = w.tokens.iter().map(|&(_, n)| n).sum();
        if used + prompt_tokens > tpm {
            // Wait until enough old tokens leave the window; a request that alone exceeds
            // the limit waits a whole minute after the window empties.
            let mut freed = 0;
            let mut at = now;
            for &(t, n) in &w.tokens {
                freed += n;
                at = t;
                if used - freed + prompt_tokens <= tpm {
                    break;
                }
            }
            return Err(Refusal::Limited {
                message: format!(
                    "the service `{}` is over its limit of {tpm} tokens per minute \
                     ({used} used, this prompt has {prompt_tokens})",
                    s.name
                ),
                retry_after: if w.tokens.is_empty() {
                    60
                } else {
                    secs_until_expiry(at, now)
                },
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_toml_names_the_line() {
        let e = ServicesConfig::parse("[services.a]\npriority = = 2\n", Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn zero_limits_are_config_errors() {
        let e = ServicesConfig::parse(
            "[services.a]\nrequests_per_minute = 0\n",
            Path::new("m.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("requests_per_minute must be at least 1"), "{e}");
        let e = ServicesConfig::parse("[services.a]\npriority = -1\n", Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("priority"), "{e}");
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = ServicesConfig::parse("[services.a]\nprioritee = 2\n", Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prioritee"), "{e}");
    }

    #[test]
    fn keys_and_limits() {
        let key = "modu-test-key";
        let text = format!(
            "[services.\"검색\"]\nkey_hashes = [\"{}\"]\nrequests_per_minute = 2\n",
            hash_key(key)
        );
        let c = ServicesConfig::parse(&text, Path::new("m.toml")).unwrap();
        let s = Services::new(&c);
        assert!(s.auth);
        assert_eq!(
            s.authenticate(Some(&format!("Bearer {key}"))),
            Ok(Caller::Service(0))
        );
        assert!(matches!(
            s.authenticate(None),
            Err(Refusal::Unauthorized(_))
        ));
        assert!(matches!(
            s.authenticate(Some("Bearer x")),
            Err(Refusal::Unauthorized(_))
        ));
        let _a = s.admit(0, 1).unwrap();
        let _b = s.admit(0, 1).unwrap();
        match s.admit(0, 1) {
            Err(Refusal::Limited { retry_after, .. }) => assert!((59..=60).contains(&retry_after)),
            _ => panic!("expected 429"),
        }
    }

    #[test]
    fn tokens_per_minute_window_and_oversized_prompts() {
        let text = "[services.t]\ntokens_per_minute = 100\n";
        let s = Services::new(&ServicesConfig::parse(text, Path::new("m.toml")).unwrap());
        assert!(!s.auth);
        drop(s.admit(0, 60).unwrap());
        s.add_tokens(0, 30);
        // 90 used: a 20-token prompt waits until the first entry leaves the window.
        match s.admit(0, 20) {
            Err(Refusal::Limited {
                retry_after,
                message,
            }) => {
                assert!((59..=60).contains(&retry_after), "{retry_after}");
                assert!(message.contains("90 used"), "{message}");
            }
            _ => panic!("expected 429"),
        }
        assert!(s.admit(0, 10).is_ok());
        match s.admit(0, 101) {
            Err(Refusal::Limited { message, .. }) => {
                assert!(message.contains("more than"), "{message}")
            }
            _ => panic!("expected 429"),
        }
    }

    #[test]
    fn max_concurrent_slots_come_back_with_the_guard() {
        let text = "[services.c]\nmax_concurrent = 1\n";
        let s = Services::new(&ServicesConfig::parse(text, Path::new("m.toml")).unwrap());
        let g = s.admit(0, 1).unwrap();
        assert!(matches!(
            s.admit(0, 1),
            Err(Refusal::Limited { retry_after: 1, .. })
        ));
        drop(g);
        assert!(s.admit(0, 1).is_ok());
    }
}
