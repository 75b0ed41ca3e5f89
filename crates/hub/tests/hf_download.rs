//! `hf:` downloads against a local HTTP server.

mod common;

use std::fs;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{fake_gguf, sha256_hex, Reply, Server};
use modu_hub::{HubConfig, HubError, ModelCache, ModelMeta, NoProgress};

fn cache_for(server: &Server, home: &std::path::Path) -> ModelCache {
    let mut cfg = HubConfig::with_home(home);
    cfg.hf_endpoint = server.url.clone();
    ModelCache::new(cfg)
}

const PATH: &str = "/owner/repo/resolve/main/model.gguf";
const SPEC: &str = "hf:owner/repo/model.gguf";

#[test]
fn download_verify_and_cache() {
    let data = fake_gguf(300_000, 1);
    let sha = sha256_hex(&data);
    let d = data.clone();
    let server = Server::start(move |req, _| {
        if req.path == PATH {
            Reply::file(req, &d, true).header("ETag", &format!("\"{sha}\""))
        } else {
            Reply::status(404)
        }
    });
    let home = tempfile::tempdir().unwrap();
    let cache = cache_for(&server, home.path());
    let path = cache.resolve(SPEC, &NoProgress).unwrap();
    assert_eq!(path, home.path().join("hf/owner/repo/main/model.gguf"));
    assert_eq!(fs::read(&path).unwrap(), data);
    let meta = ModelMeta::read_for(&path).unwrap();
    assert_eq!(meta.sha256, sha256_hex(&data));
    assert_eq!(meta.size, data.len() as u64);
    assert_eq!(server.requests().len(), 1);
    assert!(server.requests()[0].header("authorization").is_none());

    // Cached: no second request.
    assert_eq!(cache.resolve(SPEC, &NoProgress).unwrap(), path);
    assert_eq!(server.requests().len(), 1);
    // No leftovers.
    let leftovers: Vec<_> = walk(&home.path().join("downloads"))
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn subdir_revision_and_token() {
    let data = fake_gguf(10_000, 2);
    let d = data.clone();
    let server = Server::start(move |req, _| {
        if req.path == "/o/r/resolve/v1.0/sub/dir/f.gguf" {
            Reply::file(req, &d, true)
        } else {
            Reply::status(404)
        }
    });
    let home = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_home(home.path());
    cfg.hf_endpoint = format!("{}/", server.url);
    cfg.hf_token = Some("hf_secret".into());
    let cache = ModelCache::new(cfg);
    let p = cache
        .resolve("hf:o/r/sub/dir/f.gguf@v1.0", &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    assert!(p.ends_with("hf/o/r/v1.0/sub/dir/f.gguf"));
    let reqs = server.requests();
    assert_eq!(reqs[0].header("authorization"), Some("Bearer hf_secret"));
}

/// Like the Hub: a redirect whose hop carries X-Linked-Etag/X-Linked-Size, to
/// another host (here `localhost` vs `127.0.0.1`) that must not see the token.
#[test]
fn redirect_linked_etag_and_no_token_to_cdn() {
    let data = fake_gguf(50_000, 3);
    let sha = sha256_hex(&data);
    let d = data.clone();
    let port = Arc::new(AtomicUsize::new(0));
    let p2 = port.clone();
    let server = Server::start(move |req, _| match req.path.as_str() {
        PATH => Reply::status(302)
            .header(
                "Location",
                &format!(
                    "http://localhost:{}/cdn/blob?sig=1",
                    p2.load(Ordering::SeqCst)
                ),
            )
            .header("X-Linked-Etag", &format!("\"{sha}\""))
            .header("X-Linked-Size", &d.len().to_string()),
        "/cdn/blob?sig=1" => Reply::file(req, &d, true).header("ETag", "\"not-a-sha\""),
        _ => Reply::status(404),
    });
    port.store(server.port as usize, Ordering::SeqCst);
    let home = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_home(home.path());
    cfg.hf_endpoint = server.url.clone();
    cfg.hf_token = Some("tok".into());
    let cache = ModelCache::new(cfg);
    let p = cache.resolve(SPEC, &NoProgress).unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].header("authorization"), Some("Bearer tok"));
    assert_eq!(reqs[1].header("authorization"), None);
}

#[test]
fn unauthorized_mentions_hf_token() {
    let server = Server::start(|_, _| Reply::status(401).body("{\"error\":\"gated\"}"));
    let home = tempfile::tempdir().unwrap();
    let e = cache_for(&server, home.path())
        .resolve(SPEC, &NoProgress)
        .unwrap_err();
    assert!(
        matches!(e, HubError::Unauthorized { status: 401, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("HF_TOKEN"), "{e}");
    assert!(!home.path().join("hf/owner/repo/main/model.gguf").exists());
}

#[test]
fn not_found_names_the_url() {
    let server = Server::start(|_, _| Reply::status(404));
    let home = tempfile::tempdir().unwrap();
    let e = cache_for(&server, home.path())
        .resolve(SPEC, &NoProgress)
        .unwrap_err();
    assert!(matches!(e, HubError::NotFound { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&format!("{}{}", server.url, PATH)),
        "{e}"
    );
}

#[test]
fn server_error_is_reported() {
    let server = Server::start(|_, _| Reply::status(500).body("boom"));
    let home = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_home(home.path());
    cfg.hf_endpoint = server.url.clone();
    cfg.max_attempts = 2;
    let e = ModelCache::new(cfg).resolve(SPEC, &NoProgress).unwrap_err();
    assert!(matches!(e, HubError::Http { status: 500, .. }), "{e:?}");
    assert!(e.to_string().contains("boom"), "{e}");
    assert_eq!(server.requests().len(), 2, "5xx is retried");
}

#[test]
fn connection_refused_is_a_network_error() {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let home = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_home(home.path());
    cfg.hf_endpoint = format!("http://127.0.0.1:{port}");
    cfg.max_attempts = 1;
    let e = ModelCache::new(cfg).resolve(SPEC, &NoProgress).unwrap_err();
    assert!(matches!(e, HubError::Network { .. }), "{e:?}");
}

/// First response dies mid-body; the next run resumes with Range.
#[test]
fn resume_after_interrupted_download() {
    let data = fake_gguf(400_000, 4);
    let sha = sha256_hex(&data);
    let d = data.clone();
    let server = Server::start(move |req, idx| {
        let mut r = Reply::file(req, &d, true).header("X-Linked-Etag", &format!("\"{sha}\""));
        if idx == 0 {
            r.cut_after = Some(150_000);
        }
        r
    });
    let home = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_home(home.path());
    cfg.hf_endpoint = server.url.clone();
    cfg.max_attempts = 1;
    let cache = ModelCache::new(cfg);
    let e = cache.resolve(SPEC, &NoProgress).unwrap_err();
    assert!(matches!(e, HubError::Network { .. }), "{e:?}");
    let final_path = home.path().join("hf/owner/repo/main/model.gguf");
    assert!(!final_path.exists());
    let partial = home
        .path()
        .join("downloads/hf/owner/repo/main/model.gguf.partial");
    assert_eq!(fs::metadata(&partial).unwrap().len(), 150_000);

    let p = cache.resolve(SPEC, &NoProgress).unwrap();
    assert_eq!(p, final_path);
    assert_eq!(sha256_hex(&fs::read(&p).unwrap()), sha256_hex(&data));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].range_start(), None);
    assert_eq!(reqs[1].range_start(), Some(150_000));
    assert!(!partial.exists());
}

/// With retries allowed, one call recovers by itself.
#[test]
fn retry_resumes_within_one_call() {
    let data = fake_gguf(200_000, 5);
    let d = data.clone();
    let server = Server::start(move |req, idx| {
        let mut r = Reply::file(req, &d, true);
        if idx == 0 {
            r.cut_after = Some(70_001);
        }
        r
    });
    let home = tempfile::tempdir().unwrap();
    let p = cache_for(&server, home.path())
        .resolve(SPEC, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    assert_eq!(server.requests()[1].range_start(), Some(70_001));
}

/// A server that ignores Range (always 200 with the whole file): restart from 0.
#[test]
fn server_ignoring_range_restarts() {
    let data = fake_gguf(100_000, 6);
    let sha = sha256_hex(&data);
    let d = data.clone();
    let server = Server::start(move |req, idx| {
        let mut r = Reply::file(req, &d, false).header("ETag", &format!("\"{sha}\""));
        if idx == 0 {
            r.cut_after = Some(30_000);
        }
        r
    });
    let home = tempfile::tempdir().unwrap();
    let p = cache_for(&server, home.path())
        .resolve(SPEC, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range_start(), Some(30_000));
}

/// The partial is already complete (crash between download and rename): 416 → verify.
#[test]
fn complete_partial_with_416() {
    let data = fake_gguf(20_000, 7);
    let sha = sha256_hex(&data);
    let d = data.clone();
    let server = Server::start(move |req, _| {
        Reply::file(req, &d, true).header("ETag", &format!("\"{sha}\""))
    });
    let home = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_home(home.path());
    cfg.hf_endpoint = server.url.clone();
    let cache = ModelCache::new(cfg);
    // Simulate: full bytes in .partial plus its sidecar from a previous run.
    let partial = home
        .path()
        .join("downloads/hf/owner/repo/main/model.gguf.partial");
    fs::create_dir_all(partial.parent().unwrap()).unwrap();
    fs::write(&partial, &data).unwrap();
    let state = serde_json_state(
        &format!("{}{}", server.url, PATH),
        &sha_of(&data),
        data.len(),
    );
    fs::write(partial.with_extension("partial.json"), state).unwrap();
    let p = cache.resolve(SPEC, &NoProgress).unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    assert_eq!(server.requests()[0].range_start(), Some(20_000));
}

#[test]
fn sha_mismatch_leaves_no_file() {
    let data = fake_gguf(60_000, 8);
    let wrong = sha256_hex(b"something else");
    let d = data.clone();
    let server = Server::start(move |req, _| {
        Reply::file(req, &d, true).header("X-Linked-Etag", &format!("\"{wrong}\""))
    });
    let home = tempfile::tempdir().unwrap();
    let e = cache_for(&server, home.path())
        .resolve(SPEC, &NoProgress)
        .unwrap_err();
    assert!(matches!(e, HubError::ChecksumMismatch { .. }), "{e:?}");
    assert!(!home.path().join("hf/owner/repo/main/model.gguf").exists());
    assert!(!home
        .path()
        .join("downloads/hf/owner/repo/main/model.gguf.partial")
        .exists());
}

#[test]
fn short_body_without_sha_is_a_size_error_then_resumes() {
    // Content-Length says 50_000 but only 10_000 arrive, every time: retries
    // resume, then give up with a network error, keeping the partial.
    let data = fake_gguf(50_000, 9);
    let d = data.clone();
    let server = Server::start(move |req, _| {
        let mut r = Reply::file(req, &d, true);
        r.cut_after = Some(10_000);
        r
    });
    let home = tempfile::tempdir().unwrap();
    let e = cache_for(&server, home.path())
        .resolve(SPEC, &NoProgress)
        .unwrap_err();
    assert!(matches!(e, HubError::Network { .. }), "{e:?}");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[2].range_start(), Some(20_000));
}

/// Two threads resolving the same spec: one downloads, the other waits and reuses.
#[test]
fn concurrent_resolves_download_once() {
    let data = fake_gguf(2_000_000, 10);
    let sha = sha256_hex(&data);
    let d = data.clone();
    let server = Server::start(move |req, _| {
        std::thread::sleep(std::time::Duration::from_millis(200));
        Reply::file(req, &d, true).header("ETag", &format!("\"{sha}\""))
    });
    let home = tempfile::tempdir().unwrap();
    let cache = cache_for(&server, home.path());
    let paths: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| cache.resolve(SPEC, &NoProgress).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(fs::read(&paths[0]).unwrap(), data);
    assert_eq!(server.requests().len(), 1);
}

fn sha_of(d: &[u8]) -> String {
    sha256_hex(d)
}

fn serde_json_state(url: &str, sha: &str, total: usize) -> String {
    format!("{{\"url\":\"{url}\",\"sha256\":\"{sha}\",\"total\":{total}}}")
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}
