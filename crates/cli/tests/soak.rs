//! The 60-second version of `bench/soak` (issue 17): three services with quotas on one
//! `modu serve` (gemma-3-270m), 16 clients — disconnects, malformed requests, a flood past its
//! quota — then `kill -9` under load. Checked: no 5xx, a usage row for every admitted request,
//! no completed request's record lost to the kill. (RSS growth and the good service's TTFT
//! ratio are reported; their goals belong to the 10-minute benchmark, see BENCHMARKS.md.)

use std::process::Command;

#[test]
fn a_minute_of_hostile_load_loses_nothing() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("python3")
        .arg(root.join("bench/soak"))
        .args(["--modu", env!("CARGO_BIN_EXE_modu")])
        .args(["--duration", "60", "--clients", "16", "--parallel", "4"])
        .env("MODU_HOME", modu_home())
        .output()
        .expect("running python3 bench/soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench/soak failed:\n{stdout}\n{stderr}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    let r: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("no JSON report ({e}): {stdout}"));
    eprintln!("soak report: {r}");
    assert_eq!(r["server_5xx"], 0, "{r}");
    let admitted = r["admitted"].as_u64().unwrap();
    assert!(admitted > 20, "too little load got through: {r}");
    assert_eq!(r["usage_rows"].as_u64(), Some(admitted), "{r}");
    assert!(r["kill9_completed"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["kill9_lost"], 0, "{r}");
    // Every kind of client took part: the flood was throttled, malformed bodies refused.
    let statuses = r["statuses"].as_object().unwrap();
    assert!(statuses.keys().any(|k| k == "flood:429"), "{r}");
    assert!(statuses.keys().any(|k| k.starts_with("mixed:4")), "{r}");
    assert!(r["good_requests_load"].as_u64().unwrap() > 0, "{r}");
}

fn modu_home() -> String {
    std::env::var("MODU_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cache/modu",
            std::env::var("HOME").expect("HOME is set")
        )
    })
}
