//! The services config (`modu.toml`) parser and validator.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = modu_server::services::ServicesConfig::parse(text, std::path::Path::new("fuzz.toml")) {
            let _ = modu_server::services::Services::new(&c);
        }
    }
});
