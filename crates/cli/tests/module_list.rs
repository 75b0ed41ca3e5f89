//! `modu module list` against a running `modu serve` with a module registered at start (a
//! Korean name, the golden LoRA adapter from `tests/golden/lora`), and against an address
//! where nothing listens.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
#[path = "../../../tests/lora_fixture.rs"]
mod lora_fixture;
use common::{modu, Server};

use serde_json::Value;

fn lora_a() -> PathBuf {
    lora_fixture::lora("lora-a.gguf")
}

#[test]
fn module_list_shows_the_servers_modules() {
    let spec = format!("한국어={}", lora_a().display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_modu"))
        .args([
            "serve",
            "-m",
            "qwen2.5-coder-0.5b-instruct",
            "--ctx",
            "256",
            "--port",
            "0",
            "--module",
            &spec,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn modu serve");
    let stderr = child.stderr.take().unwrap();
    let _server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let base = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("modu serve did not say where it listens");
        if let Some(rest) = line.split("http://").nth(1) {
            break format!("http://{}", rest.split('/').next().unwrap());
        }
    };

    let out = modu(&["module", "list", "--url", &base]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 module(s)"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("한국어"))
        .unwrap_or_else(|| panic!("no row for the module:\n{text}"));
    assert!(row.contains("yes") && row.contains("lora-a.gguf"), "{row}");

    let out = modu(&["module", "list", "--url", &base, "--json"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let m = &v["data"][0];
    assert_eq!(m["name"], "한국어");
    assert_eq!(m["rank"], 8);
    assert_eq!(m["resident"], true);
    assert!(m["resident_bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(m["targets"].as_array().unwrap().len(), 7);
}

#[test]
fn module_list_without_a_server_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there for an unprivileged test.
    let out = modu(&["module", "list", "--url", "http://127.0.0.1:1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot reach the server"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
