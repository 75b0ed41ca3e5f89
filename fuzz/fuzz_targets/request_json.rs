//! Request bodies as the server reads them: JSON → chat / completion request → validated
//! generation parameters, content parts, prompt forms, unknown fields, response formats,
//! tools and tool choices (with the call grammar they make) and messages' tool calls.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modu_server::api::{ChatRequest, CompletionRequest};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(r) = serde_json::from_value::<ChatRequest>(value.clone()) {
        let _ = r.common.params(None);
        let _ = modu_server::api::check_chat_fields(&r);
        for (i, m) in r.messages.iter().enumerate() {
            let _ = m.content(i);
        }
    }
    if let Ok(r) = serde_json::from_value::<CompletionRequest>(value) {
        let _ = r.common.params(Some(1));
        let _ = r.prompt();
    }
});
