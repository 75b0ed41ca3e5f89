//! `hf:OWNER/REPO/PATH.gguf[@REVISION]`: files from a Hugging Face endpoint.
//!
//! The file is fetched from `{endpoint}/{owner}/{repo}/resolve/{revision}/{path}`.
//! The Hub answers LFS files with a redirect to a CDN whose first hop carries
//! `X-Linked-Etag: "<sha256>"` and `X-Linked-Size`; redirects are therefore
//! followed by hand so those headers are seen (and so the token is only ever
//! sent to the endpoint's own host, never to the CDN).
//!
//! Bytes stream to `downloads/hf/<owner>/<repo>/<rev>/<path>.partial`; the next
//! attempt (same call, or a later run) sends `Range: bytes=N-` and appends. A
//! `<path>.partial.json` remembers the sha256 the partial belongs to, so a file
//! that changed upstream restarts instead of splicing two versions. The result
//! is hashed as it streams, checked against the advertised sha256 (when there
//! is one) and size, then renamed to `hf/<owner>/<repo>/<rev>/<path>`.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::{ModelCache, ModelMeta};
use crate::error::{HubError, IoContext};
use crate::progress::ProgressSink;
use crate::util::{self, CopyError, FileLock};

/// A parsed `hf:` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfSpec {
    pub owner: String,
    pub repo: String,
    /// Path of the file inside the repository (may contain `/`).
    pub file: String,
    /// Branch, tag or commit; `None` means `main`.
    pub revision: Option<String>,
}

impl HfSpec {
    /// Parse `hf:OWNER/REPO/PATH[@REVISION]` (the `hf:` prefix is optional).
    /// The revision follows the last `@`; it may itself contain `/` (`refs/pr/1`).
    pub fn parse(spec: &str) -> Result<HfSpec, HubError> {
        let invalid = |reason: &str| HubError::InvalidSpec {
            spec: spec.to_string(),
            reason: format!("{reason}; expected hf:OWNER/REPO/FILE.gguf[@REVISION]"),
        };
        let body = spec.trim();
        let body = body.strip_prefix("hf:").unwrap_or(body);
        let (path, revision) = match body.rsplit_once('@') {
            Some((p, r)) => {
                if r.is_empty() {
                    return Err(invalid("empty revision after `@`"));
                }
                if r.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
                    return Err(invalid("bad revision"));
                }
                (p, Some(r.to_string()))
            }
            None => (body, None),
        };
        let segs: Vec<&str> = path.split('/').collect();
        if segs.len() < 3 {
            return Err(invalid("missing file path"));
        }
        if segs
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('\\'))
        {
            return Err(invalid("empty or relative path segment"));
        }
        let file = segs[2..].join("/");
        if !file.to_ascii_lowercase().ends_with(".gguf") {
            return Err(invalid("the file must be a .gguf"));
        }
        Ok(HfSpec {
            owner: segs[0].to_string(),
            repo: segs[1].to_string(),
            file,
            revision,
        })
    }

    pub fn revision(&self) -> &str {
        self.revision.as_deref().unwrap_or("main")
    }

    /// One directory name for the revision (`refs/pr/1` → `refs--pr--1`).
    pub(crate) fn revision_dir(&self) -> String {
        self.revision().replace('/', "--")
    }

    /// `{endpoint}/{owner}/{repo}/resolve/{revision}/{file}`, percent-encoded.
    pub fn url(&self, endpoint: &str) -> String {
        let file: Vec<String> = self.file.split('/').map(pct).collect();
        format!(
            "{}/{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            pct(&self.owner),
            pct(&self.repo),
            pct(self.revision()),
            file.join("/")
        )
    }

    /// A file-name-safe key for the lock of this download.
    fn lock_key(&self) -> String {
        let raw = format!(
            "hf--{}--{}--{}--{}",
            self.owner,
            self.repo,
            self.revision(),
            self.file
        );
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

impl fmt::Display for HfSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hf:{}/{}/{}", self.owner, self.repo, self.file)?;
        if let Some(r) = &self.revision {
            write!(f, "@{r}")?;
        }
        Ok(())
    }
}

/// Percent-encode one URL path segment (RFC 3986 unreserved characters pass).
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sidecar of a `.partial`: what the bytes so far belong to.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PartialState {
    url: String,
    sha256: Option<String>,
    total: Option<u64>,
}

/// One attempt's failure: retry (resuming) or give up.
enum Attempt {
    Retry(HubError),
    Fatal(HubError),
}

impl From<HubError> for Attempt {
    fn from(e: HubError) -> Self {
        Attempt::Fatal(e)
    }
}

/// Headers seen on redirect hops.
#[derive(Debug, Default)]
struct Linked {
    sha256: Option<String>,
    size: Option<u64>,
}

pub(crate) fn download(
    cache: &ModelCache,
    spec: &HfSpec,
    progress: &dyn ProgressSink,
) -> Result<PathBuf, HubError> {
    let final_path = cache.hf_path(spec);
    // A file under hf/ was verified before it was renamed there.
    if final_path.is_file() {
        return Ok(final_path);
    }
    let _lock = FileLock::acquire(
        &cache.lock_path(&spec.lock_key()),
        &spec.to_string(),
        progress,
    )?;
    if final_path.is_file() {
        return Ok(final_path);
    }
    let rel = final_path
        .strip_prefix(cache.hf_dir())
        .expect("hf_path is under hf_dir")
        .to_path_buf();
    let partial = util::with_suffix(&cache.downloads_dir().join("hf").join(&rel), ".partial");
    let state_path = util::with_suffix(&partial, ".json");

    let cfg = cache.config();
    let url = spec.url(&cfg.hf_endpoint);
    let agent = ureq::AgentBuilder::new()
        .redirects(0)
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("modu/", env!("CARGO_PKG_VERSION")))
        .build();
    let attempts = cfg.max_attempts.max(1);
    let mut n = 0;
    let (size, sha) = loop {
        n += 1;
        match attempt(
            &agent,
            &url,
            cfg.hf_token.as_deref(),
            &partial,
            &state_path,
            spec,
            progress,
        ) {
            Ok(done) => break done,
            Err(Attempt::Retry(e)) if n < attempts => {
                progress.message(&format!("{e}; retrying ({}/{attempts})", n + 1));
                std::thread::sleep(Duration::from_millis(250 * n as u64));
            }
            Err(Attempt::Retry(e)) | Err(Attempt::Fatal(e)) => return Err(e),
        }
    };

    let meta = ModelMeta {
        name: spec.to_string(),
        file_name: spec
            .file
            .rsplit('/')
            .next()
            .unwrap_or(&spec.file)
            .to_string(),
        sha256: sha,
        size,
        source: url,
        fetched_at: ModelMeta::now(),
    };
    if let Some(dir) = final_path.parent() {
        util::create_dir_all(dir)?;
    }
    meta.write_for(&final_path)?;
    fs::rename(&partial, &final_path)
        .ctx(|| format!("moving {} into place", final_path.display()))?;
    if let Some(dir) = final_path.parent() {
        util::sync_dir(dir);
    }
    let _ = fs::remove_file(&state_path);
    Ok(final_path)
}

/// One GET (resuming when a partial exists). Returns (size, sha256) of the
/// complete, verified partial file.
fn attempt(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    partial: &Path,
    state_path: &Path,
    spec: &HfSpec,
    progress: &dyn ProgressSink,
) -> Result<(u64, String), Attempt> {
    let saved: Option<PartialState> = fs::read(state_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    if have > 0 && !matches!(&saved, Some(s) if s.url == url) {
        // Bytes of unknown origin: start over.
        have = 0;
    }

    // One request, plus a full (unranged) one when the partial can't be resumed.
    let (resp, linked, start) = loop {
        let (resp, linked) = get(agent, url, token, have)?;
        let status = resp.status();
        let mut sha = linked
            .sha256
            .clone()
            .or_else(|| resp.header("etag").and_then(etag_sha256));
        if have > 0 {
            let old = saved.as_ref().and_then(|s| s.sha256.clone());
            if sha.is_some() && old.is_some() && sha != old {
                // The remote file changed since the partial was written.
                have = 0;
                continue;
            }
            // A ranged reply may omit the hash header: keep the one we recorded.
            sha = sha.or(old);
        }
        match status {
            200 => {
                break (
                    resp,
                    Linked {
                        sha256: sha,
                        size: linked.size,
                    },
                    0,
                )
            }
            206 => {
                let (from, _total) = content_range(resp.header("content-range"));
                if from == Some(have) {
                    break (
                        resp,
                        Linked {
                            sha256: sha,
                            size: linked.size,
                        },
                        have,
                    );
                }
                have = 0; // a range we didn't ask for: restart cleanly
            }
            416 if have > 0 => {
                // Nothing left past `have`: complete already, or longer than the file.
                let (_, total) = content_range(resp.header("content-range"));
                let total = total.or(linked.size);
                if total == Some(have) {
                    let s = Linked {
                        sha256: sha,
                        size: Some(have),
                    };
                    return finish_partial(partial, state_path, spec, &s, have, progress);
                }
                have = 0;
            }
            _ => return Err(status_error(status, url, resp)),
        }
    };

    let status = resp.status();
    // Full size of the file: from Content-Range on 206, Content-Length on 200.
    let total = if status == 206 {
        content_range(resp.header("content-range")).1
    } else {
        resp.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }
    .or(linked.size);
    if let (Some(t), Some(l)) = (total, linked.size) {
        if t != l {
            return Err(Attempt::Fatal(HubError::SizeMismatch {
                what: format!("{url} (Content-Length vs X-Linked-Size)"),
                expected: l,
                actual: t,
            }));
        }
    }
    let state = PartialState {
        url: url.to_string(),
        sha256: linked.sha256.clone(),
        total,
    };
    if let Some(dir) = partial.parent() {
        util::create_dir_all(dir)?;
    }
    util::write_atomic(
        state_path,
        &serde_json::to_vec(&state).expect("state serializes"),
    )?;

    let file = if start == 0 {
        File::create(partial)
    } else {
        OpenOptions::new().append(true).open(partial)
    }
    .ctx(|| format!("opening {}", partial.display()))?;
    // A 200 after asking for a range means the server ignored it: rewrite from 0.
    if start == 0 {
        file.set_len(0)
            .ctx(|| format!("truncating {}", partial.display()))?;
    }

    progress.start(&spec.to_string(), total);
    let r = stream(resp, file, partial, start, total, url, progress);
    progress.finish();
    let got = r?;
    let s = Linked {
        sha256: linked.sha256,
        size: total,
    };
    finish_partial(partial, state_path, spec, &s, got, progress)
}

/// Append the response body to the partial file. Returns the partial's new length.
fn stream(
    resp: ureq::Response,
    file: File,
    partial: &Path,
    start: u64,
    total: Option<u64>,
    url: &str,
    progress: &dyn ProgressSink,
) -> Result<u64, Attempt> {
    progress.advance(start);
    let mut reader = resp.into_reader();
    let mut out = BufWriter::with_capacity(1 << 20, file);
    // The hash is recomputed over the whole partial at the end (it is cheap
    // next to the network and covers bytes from earlier runs), so this one is unused.
    let mut scratch = Sha256::new();
    let r = util::copy_hashing(&mut reader, &mut out, &mut scratch, progress);
    // Keep whatever arrived, even on error: the next attempt resumes after it.
    let flushed = out.flush();
    let copied = match r {
        Ok(n) => n,
        Err(CopyError::Read(e)) => {
            return Err(Attempt::Retry(HubError::Network {
                url: url.to_string(),
                message: format!("connection lost: {e}"),
            }))
        }
        Err(CopyError::Write(e)) => {
            return Err(Attempt::Fatal(HubError::io(
                format!("writing {}", partial.display()),
                e,
            )))
        }
    };
    flushed.ctx(|| format!("writing {}", partial.display()))?;
    let got = start + copied;
    if let Some(t) = total {
        if got < t {
            return Err(Attempt::Retry(HubError::Network {
                url: url.to_string(),
                message: format!("connection closed after {got} of {t} bytes"),
            }));
        }
    }
    Ok(got)
}

/// Check a complete partial file's size and sha256. On mismatch the partial
/// is deleted (its bytes are wrong; resuming would keep them wrong).
fn finish_partial(
    partial: &Path,
    state_path: &Path,
    spec: &HfSpec,
    expect: &Linked,
    got: u64,
    progress: &dyn ProgressSink,
) -> Result<(u64, String), Attempt> {
    let discard = || {
        let _ = fs::remove_file(partial);
        let _ = fs::remove_file(state_path);
    };
    if let Some(t) = expect.size {
        if got != t {
            discard();
            return Err(Attempt::Fatal(HubError::SizeMismatch {
                what: spec.to_string(),
                expected: t,
                actual: got,
            }));
        }
    }
    progress.start(&format!("verifying {spec}"), Some(got));
    let sha = util::sha256_file(partial, progress);
    progress.finish();
    let sha = sha?;
    if let Some(want) = &expect.sha256 {
        if *want != sha {
            discard();
            return Err(Attempt::Fatal(HubError::ChecksumMismatch {
                what: spec.to_string(),
                expected: want.clone(),
                actual: sha,
            }));
        }
    }
    Ok((got, sha))
}

/// GET `url`, following up to 10 redirects by hand. Any final status is
/// returned as a response; only transport failures are errors.
fn get(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    range_from: u64,
) -> Result<(ureq::Response, Linked), Attempt> {
    let net = |e: String| {
        Attempt::Retry(HubError::Network {
            url: url.to_string(),
            message: e,
        })
    };
    let origin = url::Url::parse(url).map_err(|e| {
        Attempt::Fatal(HubError::InvalidSpec {
            spec: url.to_string(),
            reason: format!("bad URL: {e}"),
        })
    })?;
    let mut current = origin.clone();
    let mut linked = Linked::default();
    for _ in 0..10 {
        let mut req = agent
            .request_url("GET", &current)
            .set("Accept-Encoding", "identity");
        let same_origin = current.host_str() == origin.host_str()
            && current.port_or_known_default() == origin.port_or_known_default();
        if let (Some(t), true) = (token, same_origin) {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if range_from > 0 {
            req = req.set("Range", &format!("bytes={range_from}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(net(transport_message(&t))),
        };
        // The first hop that names the LFS object wins (the CDN's own ETag is not a sha256).
        if linked.sha256.is_none() {
            linked.sha256 = resp.header("x-linked-etag").and_then(etag_sha256);
        }
        if linked.size.is_none() {
            linked.size = resp
                .header("x-linked-size")
                .and_then(|v| v.trim().parse().ok());
        }
        if !(300..400).contains(&resp.status()) {
            return Ok((resp, linked));
        }
        let Some(loc) = resp.header("location") else {
            return Err(Attempt::Fatal(HubError::Http {
                url: url.to_string(),
                status: resp.status(),
                detail: "redirect without a Location header".into(),
            }));
        };
        current = current.join(loc).map_err(|e| {
            Attempt::Fatal(HubError::Http {
                url: url.to_string(),
                status: resp.status(),
                detail: format!("bad redirect target {loc:?}: {e}"),
            })
        })?;
    }
    Err(Attempt::Fatal(HubError::Http {
        url: url.to_string(),
        status: 310,
        detail: "too many redirects".into(),
    }))
}

/// "kind: detail: cause" without the URL (the error names it already).
fn transport_message(t: &ureq::Transport) -> String {
    let mut m = t.kind().to_string();
    if let Some(msg) = t.message() {
        m.push_str(": ");
        m.push_str(msg);
    }
    if let Some(src) = std::error::Error::source(t) {
        m.push_str(": ");
        m.push_str(&src.to_string());
    }
    m
}

/// The sha256 inside an ETag value (`"<hex>"`, possibly weak `W/"…"`), if it is one.
fn etag_sha256(v: &str) -> Option<String> {
    let v = v.trim();
    let v = v.strip_prefix("W/").unwrap_or(v).trim_matches('"');
    util::is_sha256_hex(v).then(|| v.to_ascii_lowercase())
}

/// `bytes START-END/TOTAL` or `bytes */TOTAL` → (START, TOTAL).
fn content_range(v: Option<&str>) -> (Option<u64>, Option<u64>) {
    let Some(v) = v.and_then(|v| v.trim().strip_prefix("bytes")) else {
        return (None, None);
    };
    let (range, total) = v.trim().split_once('/').unwrap_or((v.trim(), "*"));
    let start = range
        .split_once('-')
        .and_then(|(s, _)| s.trim().parse().ok());
    (start, total.trim().parse().ok())
}

fn status_error(status: u16, url: &str, resp: ureq::Response) -> Attempt {
    let url = url.to_string();
    match status {
        401 | 403 => Attempt::Fatal(HubError::Unauthorized { url, status }),
        404 => Attempt::Fatal(HubError::NotFound { url }),
        _ => {
            let mut detail = resp
                .header("x-error-message")
                .map(str::to_string)
                .unwrap_or_default();
            if detail.is_empty() {
                let mut body = Vec::new();
                let _ = resp.into_reader().take(300).read_to_end(&mut body);
                detail = String::from_utf8_lossy(&body).trim().to_string();
            }
            let e = HubError::Http {
                url,
                status,
                detail,
            };
            // Server-side trouble and rate limits are worth another try.
            if status >= 500 || status == 429 || status == 408 {
                Attempt::Retry(e)
            } else {
                Attempt::Fatal(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_specs() {
        let s = HfSpec::parse("hf:Qwen/Qwen2.5-0.5B-GGUF/q4.gguf").unwrap();
        assert_eq!(
            (s.owner.as_str(), s.repo.as_str(), s.file.as_str()),
            ("Qwen", "Qwen2.5-0.5B-GGUF", "q4.gguf")
        );
        assert_eq!(s.revision(), "main");
        assert_eq!(
            s.url("https://huggingface.co/"),
            "https://huggingface.co/Qwen/Qwen2.5-0.5B-GGUF/resolve/main/q4.gguf"
        );
        let s = HfSpec::parse("hf:o/r/sub/dir/f.gguf@refs/pr/1").unwrap();
        assert_eq!(s.file, "sub/dir/f.gguf");
        assert_eq!(s.revision(), "refs/pr/1");
        assert_eq!(
            s.url("http://h"),
            "http://h/o/r/resolve/refs%2Fpr%2F1/sub/dir/f.gguf"
        );
        assert_eq!(s.to_string(), "hf:o/r/sub/dir/f.gguf@refs/pr/1");
        for bad in [
            "hf:o/r",
            "hf:o/r/f.bin",
            "hf:o/../f.gguf",
            "hf:o/r/f.gguf@",
            "hf://r/f.gguf",
        ] {
            assert!(HfSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn headers() {
        let h = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
        assert_eq!(etag_sha256(&format!("\"{h}\"")).as_deref(), Some(h));
        assert_eq!(etag_sha256(&format!("W/\"{h}\"")).as_deref(), Some(h));
        assert_eq!(etag_sha256("\"abc123\""), None);
        assert_eq!(
            content_range(Some("bytes 100-199/200")),
            (Some(100), Some(200))
        );
        assert_eq!(content_range(Some("bytes */200")), (None, Some(200)));
        assert_eq!(content_range(None), (None, None));
    }
}
