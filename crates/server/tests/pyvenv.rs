//! A Python venv for the tests that drive modu with official Python packages (the `openai`
//! client, `prometheus_client`'s text parser), cached under `~/.cache/modu/pytest-venv` (a file
//! lock keeps concurrent test runs from building it twice; a marker file written last marks it
//! complete).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use fs4::FileExt;

pub fn venv() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let cache = Path::new(&home).join(".cache/modu");
    std::fs::create_dir_all(&cache).unwrap();
    let dir = cache.join("pytest-venv");
    let marker = dir.join(".modu-ready-2");
    let lock = std::fs::File::create(cache.join("pytest-venv.lock")).unwrap();
    FileExt::lock(&lock).unwrap();
    if !marker.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .expect("running python3 -m venv");
        assert!(ok.success(), "creating the venv failed");
        let ok = Command::new(dir.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai",
                "prometheus-client",
            ])
            .status()
            .expect("running pip");
        assert!(ok.success(), "pip install openai prometheus-client failed");
        std::fs::write(&marker, "ok\n").unwrap();
    }
    FileExt::unlock(&lock).unwrap();
    dir
}
