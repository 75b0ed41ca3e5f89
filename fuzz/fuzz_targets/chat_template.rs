//! Both models' chat templates over arbitrary conversations (roles and contents from the
//! input): render, locate the contents, tokenize with them as text.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modu_engine::ChatMessage;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let m = if sel & 1 == 0 { modu_fuzz::qwen() } else { modu_fuzz::gemma() };
    let text = String::from_utf8_lossy(rest);
    let roles = ["system", "user", "assistant", "tool"];
    let messages: Vec<ChatMessage> = text
        .split('\u{0}')
        .take(16)
        .enumerate()
        .map(|(i, c)| {
            let role = roles[(i + (sel as usize >> 1)) % roles.len()];
            ChatMessage::new(role, c)
        })
        .collect();
    // Half the time with a tools list (Qwen's template renders it; Gemma's ignores it).
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "description": "d",
        "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}]);
    let tools = (sel & 8 == 0).then_some(&tools);
    if let Ok((rendered, spans)) = m.template.render_with_spans(&messages, tools, sel & 2 == 0, &m.bos, &m.eos) {
        if let Some(spans) = spans {
            for &(a, b) in &spans {
                assert!(a <= b && b <= rendered.len() && rendered.is_char_boundary(a) && rendered.is_char_boundary(b));
            }
            let _ = m.tokenizer.encode_with_literal_spans(&rendered, true, &spans);
        }
    }
});
