//! `modu pull` and `modu list`: the model cache from the command line.
//!
//! The hub library reports progress through `ProgressSink`; here it becomes an
//! indicatif bar on stderr (indicatif hides it when stderr is not a terminal,
//! so scripts and logs stay clean).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use modu_hub::{find_known, HubError, ModelCache, ProgressSink};

/// A progress bar per phase (download, verify, …); one phase at a time.
#[derive(Default)]
pub struct BarProgress {
    bar: Mutex<Option<ProgressBar>>,
    label: Mutex<String>,
}

impl BarProgress {
    pub fn new() -> BarProgress {
        BarProgress::default()
    }
}

impl ProgressSink for BarProgress {
    fn start(&self, label: &str, total: Option<u64>) {
        let bar = match total {
            Some(n) => {
                let bar = ProgressBar::new(n);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg:<32!} [{bar:30.cyan/blue}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {eta:>4}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg} {bytes} {bytes_per_sec}")
                        .expect("valid template"),
                );
                bar
            }
        };
        bar.set_message(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        *self.label.lock().unwrap() = label.to_string();
        if let Some(old) = self.bar.lock().unwrap().replace(bar) {
            old.finish();
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &*self.bar.lock().unwrap() {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().unwrap().take() {
            bar.set_message(self.label.lock().unwrap().clone());
            bar.finish();
        }
    }

    fn message(&self, msg: &str) {
        match &*self.bar.lock().unwrap() {
            // Inside a phase: show it in the bar's message slot (no scrolling spam).
            Some(bar) => bar.set_message(msg.to_string()),
            None => eprintln!("{msg}"),
        }
    }
}

/// Resolve a model spec (path, known name or alias, `hf:` spec) to a local
/// file, fetching it with a progress bar if it is not cached yet.
pub fn resolve_with_progress(spec: &str) -> Result<PathBuf> {
    let progress = BarProgress::new();
    ModelCache::from_env()
        .resolve(spec, &progress)
        .with_context(|| format!("resolving model `{spec}`"))
}

/// `modu pull NAME`: fetch a known model (name or alias) or an `hf:` file.
pub fn run_pull(name: &str) -> Result<()> {
    let cache = ModelCache::from_env();
    let progress = BarProgress::new();
    if name.trim().starts_with("hf:") {
        let path = cache
            .resolve(name, &progress)
            .with_context(|| format!("pulling {name}"))?;
        println!("{name} -> {}", path.display());
        return Ok(());
    }
    let Some(model) = find_known(name) else {
        return Err(HubError::unknown_model(name).into());
    };
    if cache.is_cached(model) {
        println!(
            "{} is already cached: {}",
            model.name,
            cache.model_path(model).display()
        );
        return Ok(());
    }
    let path = cache
        .pull(model, &progress)
        .with_context(|| format!("pulling {}", model.name))?;
    println!(
        "{} ({}, sha256 {}) -> {}",
        model.name,
        HumanBytes(model.size),
        &model.sha256[..12],
        path.display()
    );
    Ok(())
}

/// `modu list`: known models with their cache status, then `hf:` downloads.
pub fn run_list() -> Result<()> {
    let cache = ModelCache::from_env();
    println!("cache: {}", cache.home().display());
    println!();
    let rows: Vec<[String; 5]> = cache
        .list()
        .into_iter()
        .map(|row| {
            let m = row.model;
            let status = match (row.cached, m.default) {
                (true, true) => "cached, default",
                (true, false) => "cached",
                (false, true) => "not pulled, default",
                (false, false) => "not pulled",
            };
            [
                m.name.to_string(),
                m.aliases.join(", "),
                HumanBytes(m.size).to_string(),
                status.to_string(),
                row.path.display().to_string(),
            ]
        })
        .collect();
    print_table(&["NAME", "ALIASES", "SIZE", "STATUS", "PATH"], &rows);

    let hf: Vec<[String; 5]> = cache
        .hf_downloads()
        .into_iter()
        .map(|(path, meta)| {
            let (name, size) = match meta {
                Some(m) => (m.name, HumanBytes(m.size).to_string()),
                None => ("?".to_string(), String::new()),
            };
            [
                name,
                String::new(),
                size,
                "cached".to_string(),
                path.display().to_string(),
            ]
        })
        .collect();
    if !hf.is_empty() {
        println!();
        print_table(&["HF DOWNLOAD", "", "SIZE", "STATUS", "PATH"], &hf);
    }
    Ok(())
}

/// Left-aligned columns (SIZE right-aligned), widths fitted to the content.
fn print_table(header: &[&str; 5], rows: &[[String; 5]]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |c: [&str; 5]| {
        println!(
            "{:<w0$}  {:<w1$}  {:>w2$}  {:<w3$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        )
    };
    line(*header);
    for r in rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
}
