//! The web dashboard in a real browser: headless Chromium driven by Playwright
//! (tests/e2e/dashboard.mjs) enters a service key, sends a chat in the playground, waits for
//! the streamed text and checks that the service's token count and cost on the page went up.
//! Its screenshots are checked here (PNG of the viewport's size, not blank).
//!
//! Never skipped: a missing Chromium, node or `npm ci` fails the test with what to install
//! (`.ci/run` installs them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use modu_server::services::{hash_key, ServicesConfig};
use modu_server::ServeConfig;

const KEY: &str = "modu-dashboard-test-key";
const SERVICE: &str = "검색";

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

fn check_tools() -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install it (apt-get install -y chromium chromium-driver) or set CHROMIUM"
    );
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is missing: install Node.js (apt-get install -y nodejs npm)"
    );
    assert!(
        e2e_dir().join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci` in {}",
        e2e_dir().display()
    );
    chromium
}

/// (width, height, distinct colours among sampled pixels) of a PNG.
fn png_stats(path: &Path) -> (u32, u32, usize) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("no screenshot {}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples();
    let mut colours = std::collections::HashSet::new();
    for chunk in buf[..info.buffer_size()].chunks(px).step_by(7) {
        colours.insert(chunk.to_vec());
    }
    (info.width, info.height, colours.len())
}

#[test]
fn playground_chat_raises_the_services_tokens_and_cost_on_the_page() {
    let chromium = check_tools();
    let text = format!(
        "[machine]\nprice_per_hour = 36.0\ncores = 2\n\n[services.\"{SERVICE}\"]\nkey_hashes = [\"{}\"]\npriority = 2\nrequests_per_minute = 100\n\n[services.\"번역\"]\nkey_hashes = [\"{}\"]\n",
        hash_key(KEY),
        hash_key("modu-other-key")
    );
    let config = ServeConfig {
        host: "127.0.0.1".into(),
        port: 0,
        parallel: 2,
        max_queue: 8,
        ctx: CTX,
        services: ServicesConfig::parse(&text, Path::new("dashboard.toml")).unwrap(),
        ..ServeConfig::default()
    };
    let server = modu_server::start(served(), config, false).expect("starting the server");
    let base = format!("http://{}", server.addr);

    // The page and its assets are served from the binary.
    let (s, html) = get(&base, "/");
    assert_eq!(s, 200);
    assert!(
        html.contains("dashboard.js") && !html.contains("http://") && !html.contains("https://")
    );

    // MODU_SCREENSHOTS=DIR keeps the screenshots there for a look.
    let keep = std::env::var_os("MODU_SCREENSHOTS").map(PathBuf::from);
    let out = keep.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("modu-dashboard-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let run = Command::new("node")
        .current_dir(e2e_dir())
        .arg("dashboard.mjs")
        .args([&base, KEY, SERVICE])
        .arg(&out)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the browser check failed:\n{stderr}\n{stdout}"
    );
    let seen = json(stdout.lines().last().unwrap_or(""));
    eprintln!("browser saw: {seen}");
    assert!(seen["after"]["tokens"].as_f64() > seen["before"]["tokens"].as_f64());
    assert!(seen["after"]["cost"].as_f64() > seen["before"]["cost"].as_f64());
    assert!(!seen["output"].as_str().unwrap().trim().is_empty());
    assert!(
        seen["modules"]
            .as_str()
            .unwrap()
            .contains("no modules registered"),
        "{seen}"
    );

    for name in ["before.png", "after.png"] {
        let (w, h, colours) = png_stats(&out.join(name));
        assert_eq!((w, h), (1280, 900), "{name}");
        assert!(colours > 20, "{name} looks blank ({colours} colours)");
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&out);
    }
}
