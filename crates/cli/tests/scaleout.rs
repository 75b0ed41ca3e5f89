//! A backend that dies mid-stream and comes back, on loopback: two `modu serve` processes
//! behind HAProxy (Debian's package; `scripts/test` installs it), the front end
//! `bench/scaleout/run.sh` measures, with health checks every 200 ms.
//!
//! * The client of the stream whose server is killed (SIGKILL) gets a stream that ends early:
//!   no `[DONE]`, no `finish_reason` (the proxy cannot re-send half a response). A client must
//!   treat a stream without `[DONE]` as failed; tokens it received are not billed (the dead
//!   server recorded nothing, usage is written when a request ends).
//! * Requests after the failure go to the surviving server (HAProxy's health check takes the dead
//!   one out; `retry-on conn-failure` plus `option redispatch` re-send a request whose
//!   connection was refused before the check noticed), so none fails. The check must send a
//!   loopback `Host` (an open modu server refuses other hosts).
//! * The restarted server rejoins once its `/health` answers, and its modules load on demand:
//!   a request for an evicted module reloads it (`modu_module_reloads_total`).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use common::Server as Proc;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn lora(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/lora")
        .join(name)
}

fn serve(port: u16) -> Proc {
    let a = lora("lora-a.gguf");
    let size = std::fs::metadata(&a).unwrap().len();
    let child = Command::new(env!("CARGO_BIN_EXE_modu"))
        .args([
            "serve",
            "-m",
            "qwen2.5-coder-0.5b-instruct",
            "-t",
            "1",
            "--parallel",
            "2",
        ])
        .args(["--ctx", "512", "--port", &port.to_string()])
        .arg("--module")
        .arg(format!("m0={}", a.display()))
        .arg("--module")
        .arg(format!("m1={}", lora("lora-b.gguf").display()))
        // Room for one of the two modules: alternating them reloads.
        .args([
            "--module-mem",
            &(size * 3 / 2 / 1_048_576).max(1).to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn modu serve");
    Proc(child)
}

fn get(url: &str) -> Option<(u16, String)> {
    match ureq::get(url).timeout(Duration::from_secs(5)).call() {
        Ok(r) => Some((r.status(), r.into_string().unwrap_or_default())),
        Err(ureq::Error::Status(c, r)) => Some((c, r.into_string().unwrap_or_default())),
        Err(_) => None,
    }
}

fn wait_healthy(base: &str) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        if get(&format!("{base}/health")).is_some_and(|(s, _)| s == 200) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{base} did not become healthy");
}

fn counter(base: &str, name: &str) -> f64 {
    let (_, t) = get(&format!("{base}/metrics")).expect("metrics");
    t.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn complete(front: &str, model: &str) -> u16 {
    let body = serde_json::json!({"model": model, "prompt": "Hi", "max_tokens": 2});
    match ureq::post(&format!("{front}/v1/completions"))
        .timeout(Duration::from_secs(120))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(c, r)) => {
            eprintln!("{c}: {}", r.into_string().unwrap_or_default());
            c
        }
        Err(e) => panic!("request failed: {e}"),
    }
}

#[test]
fn a_backend_dying_mid_stream_and_restarting() {
    let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("haproxy is required (scripts/test installs Debian's package)");
    let (p1, p2, pf) = (free_port(), free_port(), free_port());
    let ports = [p1, p2];
    let mut servers: Vec<Option<Proc>> = ports.iter().map(|&p| Some(serve(p))).collect();
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    for b in &bases {
        wait_healthy(b);
    }
    let dir = std::env::temp_dir().join(format!("modu-scaleout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode http\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n  \
             retries 3\n  option redispatch\n  retry-on conn-failure empty-response\n\
             frontend fe\n  bind 127.0.0.1:{pf}\n  default_backend be\n\
             backend be\n  balance roundrobin\n  option httpchk\n  \
             http-check send meth GET uri /health ver HTTP/1.1 hdr Host localhost\n  \
             server s1 127.0.0.1:{p1} check inter 200ms fall 2 rise 2\n  \
             server s2 127.0.0.1:{p2} check inter 200ms fall 2 rise 2\n"
        ),
    )
    .unwrap();
    let _proxy = Proc(
        Command::new(haproxy)
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy"),
    );
    let front = format!("http://127.0.0.1:{pf}");
    let t = Instant::now();
    while get(&format!("{front}/health")).is_none_or(|(s, _)| s != 200) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "haproxy did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A long stream; find which server runs it (its running gauge), then kill that server.
    let body = serde_json::json!({"model": "m0", "prompt": "Count:", "max_tokens": 400,
        "ignore_eos": true, "stream": true, "temperature": 0});
    let resp = ureq::post(&format!("{front}/v1/completions"))
        .timeout(Duration::from_secs(120))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    let mut reader = BufReader::new(resp.into_reader());
    let mut events = Vec::new();
    let mut line = String::new();
    while events.len() < 3 {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended before it began"
        );
        if let Some(d) = line.trim().strip_prefix("data: ") {
            events.push(d.to_string());
        }
    }
    let running = |b: &str| counter(b, "vllm:num_requests_running");
    let victim = (0..2)
        .find(|&i| running(&bases[i]) >= 1.0)
        .expect("neither server runs the stream");
    let survivor = bases[1 - victim].clone();
    drop(servers[victim].take()); // SIGKILL
                                  // The rest of the stream: it ends without [DONE] or a finish_reason.
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    for l in rest.lines() {
        if let Some(d) = l.trim().strip_prefix("data: ") {
            events.push(d.to_string());
        }
    }
    assert!(
        !events.iter().any(|e| e == "[DONE]"),
        "a killed server cannot finish its stream"
    );
    assert!(
        events
            .iter()
            .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
            .all(|e| e["choices"][0]["finish_reason"].is_null()),
        "no finish_reason in a cut stream"
    );

    // New requests all succeed, on the survivor.
    let served_before = counter(&survivor, "modu_generation_tokens_total");
    for i in 0..6 {
        assert_eq!(
            complete(&front, if i % 2 == 0 { "m0" } else { "m1" }),
            200,
            "request {i}"
        );
    }
    assert!(counter(&survivor, "modu_generation_tokens_total") >= served_before + 12.0);

    // The killed server restarts on its port and rejoins; alternating modules reload on demand.
    servers[victim] = Some(serve(ports[victim]));
    let rb = bases[victim].clone();
    wait_healthy(&rb);
    let t = Instant::now();
    loop {
        // Pairs, so that round-robin over two servers gives each of them both modules.
        for m in ["m0", "m0", "m1", "m1"] {
            assert_eq!(complete(&front, m), 200);
        }
        if counter(&rb, "modu_generation_tokens_total") > 0.0
            && counter(&rb, "modu_module_reloads_total") >= 1.0
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the restarted server never served (and reloaded) a module"
        );
    }
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}
