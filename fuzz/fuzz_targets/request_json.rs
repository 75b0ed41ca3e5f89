//! Request bodies as the server reads them: JSON → chat / completion request → validated
//! generation parameters, content parts and prompt forms.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modu_server::api::{ChatRequest, CompletionRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(r) = serde_json::from_value::<ChatRequest>(value.clone()) {
        let _ = r.common.params(None);
        for (i, m) in r.messages.iter().enumerate() {
            let _ = m.content(i);
        }
    }
    if let Ok(r) = serde_json::from_value::<CompletionRequest>(value) {
        let _ = r.common.params(Some(1));
        let _ = r.prompt();
    }
});
