//! Helpers shared by the integration tests that drive the `modu` binary as a process.

#![allow(dead_code)]

pub mod run;

use std::process::{Child, Command, Output, Stdio};

/// Runs `modu ARGS` to completion (stdin closed).
pub fn modu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modu"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn modu")
}

/// A spawned `modu serve`, killed when the test ends, whatever happens.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
