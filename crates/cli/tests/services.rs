//! Services through the `modu` binary: `modu key new` edits the config in place, `modu serve
//! --config` enforces keys and records usage, and a completed request's record survives
//! `kill -9` of the server; `modu usage` reads the database back (table and CSV).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{modu, Server};

use serde_json::{json, Value};

fn stdout_of(args: &[&str]) -> String {
    let out = modu(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "modu {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("modu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Start `modu serve --config` on a free port; returns the server and its base URL.
fn serve(config: &Path) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_modu"))
        .args([
            "serve",
            "-m",
            "gemma-3-270m",
            "--ctx",
            "512",
            "--port",
            "0",
            "--config",
        ])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn modu serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("modu serve did not say where it listens");
        if let Some(rest) = line.split("http://").nth(1) {
            let addr = rest.split('/').next().unwrap();
            return (server, format!("http://{addr}"));
        }
    }
}

fn chat(base: &str, key: &str, stream: bool) -> (u16, String) {
    let r = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("Authorization", &format!("Bearer {key}"))
        .send_json(
            // ignore_eos: a sampled end-of-generation token must not shorten the 4 tokens
            // the records are checked against.
            json!({"messages": [{"role": "user", "content": "안녕하세요"}],
                          "max_tokens": 4, "stream": stream, "ignore_eos": true}),
        );
    match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

/// The response id of a chat completion (streamed or not).
fn response_id(body: &str, stream: bool) -> String {
    let v: Value = if stream {
        let first = body.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
        serde_json::from_str(first).unwrap()
    } else {
        serde_json::from_str(body).unwrap()
    };
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn key_new_keeps_comments_and_completed_requests_survive_kill_9() {
    let dir = TempDir::new("svc-kill9");
    let config = dir.0.join("modu.toml");
    std::fs::write(
        &config,
        "# 서비스 설정: comments survive `modu key new`\n\
         [machine]\nprice_per_hour = 0.5 # per machine-hour\n\n\
         [services.\"검색\"]\npriority = 2 # twice 번역's share\n",
    )
    .unwrap();
    let cfg = config.to_str().unwrap();
    let key_a = stdout_of(&["key", "new", "검색", "--config", cfg])
        .trim()
        .to_string();
    let key_b = stdout_of(&["key", "new", "번역", "--config", cfg])
        .trim()
        .to_string();
    assert!(key_a.starts_with("modu-") && key_a.len() > 60, "{key_a}");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.contains("# 서비스 설정") && text.contains("# twice 번역's share"),
        "{text}"
    );
    assert!(!text.contains(&key_a), "the key itself must not be stored");
    assert!(text.contains("sha256:"), "{text}");

    let (mut server, base) = serve(&config);
    // Requests without a key are refused.
    let r = ureq::post(&format!("{base}/v1/chat/completions"))
        .send_json(json!({"messages": [{"role": "user", "content": "hi"}]}));
    assert!(matches!(r, Err(ureq::Error::Status(401, _))));

    // Complete requests from both services, some streamed, some concurrently.
    let mut ids = Vec::new();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let (base, key) = (
                base.clone(),
                if i % 2 == 0 {
                    key_a.clone()
                } else {
                    key_b.clone()
                },
            );
            std::thread::spawn(move || {
                let stream = i % 3 == 0;
                let (s, body) = chat(&base, &key, stream);
                assert_eq!(s, 200, "{body}");
                if stream {
                    assert!(body.contains("[DONE]"));
                }
                response_id(&body, stream)
            })
        })
        .collect();
    for h in handles {
        ids.push(h.join().unwrap());
    }
    // One more in flight while the server dies: it may or may not be recorded.
    let in_flight = {
        let (base, key) = (base.clone(), key_a.clone());
        std::thread::spawn(move || {
            let _ = ureq::post(&format!("{base}/v1/chat/completions"))
                .set("Authorization", &format!("Bearer {key}"))
                .send_json(json!({"messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 300, "ignore_eos": true}));
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();
    in_flight.join().unwrap();

    let db = dir.0.join("modu-usage.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stmt = conn
        .prepare("SELECT request_id, service, status, completion_tokens FROM requests")
        .unwrap();
    let rows: Vec<(String, String, String, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for id in &ids {
        let r = rows
            .iter()
            .find(|r| &r.0 == id)
            .unwrap_or_else(|| panic!("completed request {id} lost; records: {rows:?}"));
        assert!(r.1 == "검색" || r.1 == "번역");
        assert_eq!(r.3, 4, "{r:?}");
    }

    // `modu usage` reads it back, per service, as a table and as CSV.
    let table = stdout_of(&[
        "usage",
        "--db",
        db.to_str().unwrap(),
        "--group-by",
        "service",
    ]);
    assert!(table.contains("검색") && table.contains("번역"), "{table}");
    let csv = stdout_of(&[
        "usage",
        "--config",
        cfg,
        "--service",
        "번역",
        "--group-by",
        "service,day",
        "--csv",
    ]);
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("period,service,module,requests"),
        "{csv}"
    );
    assert_eq!(lines.len(), 2, "{csv}");
    let fields: Vec<&str> = lines[1].split(',').collect();
    assert_eq!(fields[1], "번역");
    assert_eq!(fields[3], "3", "{csv}");
}

#[test]
fn bad_config_is_a_clear_error_naming_the_line() {
    let dir = TempDir::new("svc-bad");
    let config = dir.0.join("modu.toml");
    std::fs::write(&config, "[services.a]\npriority = \n").unwrap();
    let out = modu(&[
        "serve",
        "-m",
        "gemma-3-270m",
        "--config",
        config.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("line 2") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let out = modu(&["key", "new", "a", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    // Without keys, a non-loopback address is refused before the model loads.
    let out = modu(&["serve", "-m", "gemma-3-270m", "--host", "0.0.0.0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no API keys"), "{stderr}");
}
