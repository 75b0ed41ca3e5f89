//! The official `openai` Python client against the server. The client is installed once into a
//! venv cached under `~/.cache/modu/pytest-venv` (a file lock keeps concurrent test runs from
//! building it twice; a marker file written last marks it complete).

mod common;
mod pyvenv;

use pyvenv::venv;

use std::path::Path;
use std::process::Command;

#[test]
fn official_openai_python_client_works_unchanged() {
    let py = venv().join("bin/python");
    let h = common::start(2, 4);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(py)
        .arg(script)
        .arg(format!("http://{}/v1", h.addr))
        .arg(common::MODEL)
        .output()
        .expect("running the python script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "chat ok",
        "stream ok",
        "completion ok",
        "models ok",
        "not found ok",
        "bad request ok",
        "ALL OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    h.stop().unwrap();
}

/// Structured output and tool calls through the official clients — Python (`parse` with
/// Pydantic models, `pydantic_function_tool`, a tool round trip, streamed tool calls) and npm
/// (`zodResponseFormat`, `zodFunction`) — on Qwen2.5-Coder-0.5B, whose template renders tools
/// itself.
#[test]
fn official_openai_python_client_parses_and_calls_tools() {
    let py = venv().join("bin/python");
    let name = "qwen2.5-coder-0.5b-instruct";
    let served = common::served_named(name);
    let id = served.id.clone();
    let config = modu_server::ServeConfig {
        port: 0,
        parallel: 2,
        ctx: 1024,
        ..modu_server::ServeConfig::default()
    };
    let h = modu_server::start(served, config, false).expect("starting the server");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_structured.py");
    let out = Command::new(py)
        .arg(script)
        .arg(format!("http://{}/v1", h.addr))
        .arg(&id)
        .output()
        .expect("running the python script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in [
        "parse ok",
        "tool call ok",
        "round trip ok",
        "stream tool calls ok",
        "bad schema ok",
        "ALL OK",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    // The npm client: `zodResponseFormat` and `zodFunction` (installed by `npm ci` in
    // tests/e2e, as scripts/test does for the dashboard test).
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    assert!(
        e2e.join("node_modules/openai").exists() && e2e.join("node_modules/zod").exists(),
        "the npm openai and zod packages are not installed: run `npm ci` in {}",
        e2e.display()
    );
    let out = Command::new("node")
        .arg(e2e.join("openai_zod.mjs"))
        .arg(format!("http://{}/v1", h.addr))
        .arg(&id)
        .current_dir(&e2e)
        .output()
        .expect("running node (install Node.js)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "node script failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in ["zod parse ok", "zod tool ok", "ALL OK"] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    h.stop().unwrap();
}
