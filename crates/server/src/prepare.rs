//! Everything between a parsed body and the scheduler: the modules a request runs with, its
//! prompt (chat template, tokenizer), context fit and the service's limits.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode};
use modu_engine::generate::GenerateParams;
use modu_engine::{ChatMessage, ModuleRef};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::api::{check_logprobs, ChatRequest, Common, CompletionRequest, Content, PromptField};
use crate::error::ApiError;
use crate::modules::ModuleError;
use crate::scheduler::{SeqConstraint, SeqEvent, SeqRequest, ServiceTag, SubmitError};
use crate::tools::{Choice, ToolPlan};

use crate::accounting::*;
use crate::auth::*;
use crate::routes::*;
use crate::server::*;

impl AppState {
    /// Check the prompt fits and cap `max_tokens` at the room left in the context.
    pub(crate) fn fit(
        &self,
        prompt: &[u32],
        params: &mut GenerateParams,
        param: &str,
    ) -> Result<(), ApiError> {
        if prompt.is_empty() {
            return Err(ApiError::invalid(param, "the prompt is empty"));
        }
        if prompt.len() >= self.ctx {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    param,
                    format!(
                        "the prompt is {} tokens but this server's context limit is {} tokens \
                         (including at least one generated token)",
                        prompt.len(),
                        self.ctx
                    ),
                )
            });
        }
        params.max_tokens = params.max_tokens.min(self.ctx - prompt.len());
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerateParams,
        arrived: Instant,
        service: ServiceTag,
        modules: (Vec<ModuleRef>, u64),
        cancelled: tokio::sync::mpsc::UnboundedSender<crate::scheduler::Cancelled>,
        constraint: Option<SeqConstraint>,
    ) -> Result<UnboundedReceiver<SeqEvent>, ApiError> {
        let (tx, rx) = unbounded_channel();
        match self.sched.submit(SeqRequest {
            prompt,
            params,
            events: tx,
            arrived,
            service,
            modules: modules.0,
            cache_key: modules.1,
            cancelled,
            constraint,
        }) {
            Ok(()) => Ok(rx),
            Err(SubmitError::QueueFull) => {
                self.metrics
                    .requests_rejected
                    .fetch_add(1, Ordering::Relaxed);
                Err(ApiError::queue_full(1))
            }
            Err(SubmitError::Stopped) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the server is shutting down",
            )),
        }
    }
}

/// The label of refused requests whose `model` names nothing this deployment knows.
pub(crate) const UNKNOWN_MODULE: &str = "unknown";

/// What the endpoint-specific code needs to shape responses.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

impl AppState {
    /// The metrics label for a request's `model` that was refused: the module it names when that
    /// is one this deployment knows (a bounded set), else `unknown`, so that made-up names never
    /// create label sets.
    pub(crate) fn module_label<'a>(&'a self, requested: Option<&'a str>) -> &'a str {
        let Some(m) = requested.map(|m| m.strip_prefix("base:").unwrap_or(m)) else {
            return &self.id;
        };
        if m == self.id || self.names.iter().any(|n| n == m) {
            &self.id
        } else if self.modules.contains(m) || self.services.knows_module(m) {
            m
        } else {
            UNKNOWN_MODULE
        }
    }

    /// The modules a request runs with: the one `model` names (or the service's default;
    /// `base:NAME` also names module NAME) at `lora_scale`, plus any in its `lora` list.
    /// Modules the service may not use are refused (403), unknown ones are 404. Returns the
    /// name used for accounting, the modules with their scales, and the prefix-cache key.
    pub(crate) fn module_for(
        &self,
        service: usize,
        common: &Common,
    ) -> Result<(String, Vec<ModuleRef>, u64), ApiError> {
        use crate::api::{MAX_LORA_ENTRIES, MAX_MODEL_NAME};
        let too_long = |n: &str| n.len() > MAX_MODEL_NAME;
        if common.model.as_deref().is_some_and(too_long)
            || common.lora.iter().flatten().any(|l| too_long(&l.name))
        {
            return Err(ApiError::invalid(
                "model",
                format!("model and module names are at most {MAX_MODEL_NAME} bytes"),
            ));
        }
        if common
            .lora
            .as_ref()
            .is_some_and(|l| l.len() > MAX_LORA_ENTRIES)
        {
            return Err(ApiError::invalid(
                "lora",
                format!("at most {MAX_LORA_ENTRIES} lora entries per request"),
            ));
        }
        let requested = common
            .model
            .as_deref()
            .map(|m| m.strip_prefix("base:").unwrap_or(m));
        let module = self
            .services
            .module_name(service, requested, &self.id, &self.names);
        // A name that is no module of this deployment is 404 before any permission check.
        let unknown =
            |m: &str| m != self.id && !self.modules.contains(m) && !self.services.knows_module(m);
        if unknown(&module) {
            return Err(ApiError::model_not_found(&module, &self.id));
        }
        self.services.check_allowed(service, &module)?;
        let scale_of = |s: Option<f32>, param: &str| -> Result<f32, ApiError> {
            match s {
                None => Ok(1.0),
                Some(v) if v.is_finite() && (-16.0..=16.0).contains(&v) => Ok(v),
                Some(v) => Err(ApiError::invalid(
                    param,
                    format!("{param} must be a finite number in [-16, 16], got {v}"),
                )),
            }
        };
        let mut refs: Vec<ModuleRef> = Vec::new();
        let mut key = std::collections::hash_map::DefaultHasher::new();
        let mut add = |name: &str, scale: f32, refs: &mut Vec<ModuleRef>| -> Result<(), ApiError> {
            let h = self.modules.get(name).map_err(|e| match e {
                // Named in the services config but not registered (yet).
                ModuleError::NotFound(_) if self.services.knows_module(name) => ApiError {
                    param: Some("model".into()),
                    code: Some("model_not_found"),
                    ..ApiError::new(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        format!("the module `{name}` is not loaded on this server"),
                    )
                },
                ModuleError::NotFound(_) => ApiError::model_not_found(name, &self.id),
                other => module_error(other),
            })?;
            std::hash::Hash::hash(&(h.generation, scale.to_bits()), &mut key);
            refs.push((h.adapter, scale));
            Ok(())
        };
        // Each module once, its scales summed (a name listed twice would otherwise add its
        // update twice and escape the scale limit).
        let mut wanted: Vec<(String, f32)> = Vec::new();
        let mut want = |name: &str, scale: f32| match wanted.iter_mut().find(|w| w.0 == name) {
            Some(w) => w.1 += scale,
            None => wanted.push((name.to_string(), scale)),
        };
        if module != self.id {
            want(&module, scale_of(common.lora_scale, "lora_scale")?);
        } else if common.lora_scale.is_some() && common.lora.is_none() {
            return Err(ApiError::invalid(
                "lora_scale",
                "lora_scale needs a module: name one in `model`",
            ));
        }
        for spec in common.lora.iter().flatten() {
            if unknown(&spec.name) {
                return Err(ApiError::model_not_found(&spec.name, &self.id));
            }
            self.services.check_allowed(service, &spec.name)?;
            want(&spec.name, scale_of(spec.scale, "lora.scale")?);
        }
        for (name, scale) in &wanted {
            if !(-16.0..=16.0).contains(scale) {
                return Err(ApiError::invalid(
                    "lora",
                    format!("the scales of module `{name}` add up to {scale}, outside [-16, 16]"),
                ));
            }
            add(name, *scale, &mut refs)?;
        }
        let key = if refs.is_empty() {
            0
        } else {
            std::hash::Hasher::finish(&key) | 1
        };
        Ok((module, refs, key))
    }
}

/// Everything before the scheduler: key, body, module, prompt, limits.
///
/// The service's limits are checked before the prompt is built (a throttled service costs no
/// template rendering or tokenizing), and the building runs on the blocking pool, a bounded
/// number at a time, so that the HTTP workers stay free for `/health` and everyone's streams.
/// The prompt's tokens are then charged to the tokens-per-minute window.
pub(crate) async fn admit_request<R: Send + 'static>(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    kind: Kind,
    body: Result<ApiJson<R>, ApiError>,
    prepare: fn(&AppState, R) -> Result<Prepared, ApiError>,
    model_of: fn(&R) -> &Common,
) -> Result<(Prepared, Acct), ApiError> {
    let arrived = Instant::now();
    let service = service_of(st, headers)?;
    let ApiJson(req) = body?;
    let (module, run_modules, cache_key) = match st.module_for(service, model_of(&req)) {
        Ok(m) => m,
        Err(e) => {
            let label = st.module_label(model_of(&req).model.as_deref());
            let name = &st.services.list[service].name;
            st.metrics
                .service(name, label)
                .errors
                .fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    // Cached prompt prefixes are partitioned by service as well as by modules: one service
    // must not learn from `cached_tokens` what another recently sent or was sent.
    let cache_key = {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&(service, cache_key), &mut h);
        std::hash::Hasher::finish(&h)
    };
    let svc = &st.services.list[service];
    let counters = st.metrics.service(&svc.name, &module);
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let count_error = || counters.errors.fetch_add(1, Ordering::Relaxed);
    let guard = st.services.admit(service, 0).inspect_err(|_| {
        count_error();
    })?;
    let mut prepared = {
        let _slot = st
            .prepare_slots
            .acquire()
            .await
            .map_err(|_| ApiError::internal("the server is shutting down"))?;
        let st2 = st.clone();
        tokio::task::spawn_blocking(move || prepare(&st2, req))
            .await
            .unwrap_or_else(|_| Err(ApiError::internal("preparing the request failed")))
            .inspect_err(|_| {
                count_error();
            })?
    };
    if let Some(max) = svc.config.limits.max_tokens_per_request {
        prepared.params.max_tokens = prepared.params.max_tokens.min(max.max(1));
    }
    st.services
        .charge_prompt(service, prepared.prompt.len() as u64)
        .inspect_err(|_| {
            count_error();
        })?;
    counters
        .prompt_tokens
        .fetch_add(prepared.prompt.len() as u64, Ordering::Relaxed);
    let (cancelled_tx, cancelled_rx) = unbounded_channel();
    let acct = Acct {
        st: st.clone(),
        info: Some(AcctInfo {
            service,
            module,
            endpoint: if kind == Kind::Chat {
                "chat"
            } else {
                "completions"
            },
            request_id: new_id(if kind == Kind::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            }),
            arrived,
        }),
        run_modules,
        cache_key,
        prompt_tokens: prepared.prompt.len(),
        received: 0,
        cancelled_rx: Some(cancelled_rx),
        cancelled_tx: Some(cancelled_tx),
        guard: Some(guard),
        waiting: None,
    };
    Ok((prepared, acct))
}

/// A request ready for the scheduler.
pub(crate) struct Prepared {
    pub(crate) prompt: Vec<u32>,
    pub(crate) params: GenerateParams,
    pub(crate) common: Common,
    /// The grammar its output follows (structured output, tool calls).
    pub(crate) constraint: Option<SeqConstraint>,
    /// Tools the model may call: the output is read back for calls.
    pub(crate) tools: Option<ToolPlan>,
}

/// The constraint for a request's `response_format`/`grammar`/`regex`, or for its tool calls;
/// the two cannot be combined.
/// Speculative decoding for a request: its own choice, else the server's default. Drafts are
/// not checked against a grammar, so a constrained request never speculates, and one that asks
/// for both is refused.
fn speculation(
    st: &AppState,
    common: &Common,
    constrained: bool,
) -> Result<Option<modu_engine::SpecConfig>, ApiError> {
    match common.speculative()? {
        Some(Some(_)) if constrained => Err(ApiError::invalid(
            "speculative",
            "speculative decoding cannot be combined with response_format, grammar, regex or tools",
        )),
        Some(choice) => Ok(choice),
        None if constrained => Ok(None),
        None => Ok(st.speculative),
    }
}

fn constraint_for(
    st: &AppState,
    common: &Common,
    tools: Option<&ToolPlan>,
) -> Result<Option<SeqConstraint>, ApiError> {
    let output = crate::structured::output_grammar(common)?;
    let calls = tools.and_then(|t| t.grammar());
    match (output, calls) {
        (Some((_, field)), Some(_)) => Err(ApiError::invalid(
            field,
            format!("{field} cannot be combined with tools (use tool_choice \"none\" or drop one)"),
        )),
        (Some((g, field)), None) => Ok(Some(SeqConstraint {
            constraint: st.compile(&g, field)?,
            trigger: None,
        })),
        (None, Some((lark, trigger))) => Ok(Some(SeqConstraint {
            constraint: st.compile(&modu_engine::Grammar::Lark(lark), "tools")?,
            trigger: trigger.map(str::to_string),
        })),
        (None, None) => Ok(None),
    }
}

pub(crate) fn prepare_chat(st: &AppState, req: ChatRequest) -> Result<Prepared, ApiError> {
    crate::api::check_other_fields(&req.other)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let tools = ToolPlan::parse(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    // Under tool_choice "none" the tools are not shown at all.
    let shown_tools = tools.as_ref().filter(|t| t.choice != Choice::None);
    let native_tools = st.template.supports_tools();
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => "system",
            r @ ("system" | "user" | "assistant" | "tool") => r,
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!(
                    "unknown role {other:?} (expected system, developer, user, assistant or tool)"
                ),
                ))
            }
        };
        let content = match m.content(i)? {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content"),
                            format!(
                                "content parts of type {:?} are not supported; only text",
                                p.kind
                            ),
                        ));
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        let mut msg = ChatMessage::new(role, content);
        if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) {
            if role != "assistant" {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].tool_calls"),
                    "only assistant messages carry tool_calls",
                ));
            }
            let calls = crate::tools::template_calls(calls, i)?;
            if native_tools {
                msg.tool_calls = Some(calls);
            } else {
                let text = crate::tools::calls_as_text(&calls);
                msg.content = if msg.content.is_empty() {
                    text
                } else {
                    format!("{}\n{text}", msg.content)
                };
            }
        }
        if role == "tool" && !native_tools {
            msg.role = "user".into();
            msg.content = format!("<tool_response>\n{}\n</tool_response>", msg.content);
        }
        messages.push(msg);
    }
    if let (Some(t), false) = (shown_tools, native_tools) {
        let text = crate::tools::fallback_system_text(&t.tools);
        match messages.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
            _ => messages.insert(0, ChatMessage::new("system", text)),
        }
    }
    // What the template writes outside message contents is parsed for control tokens: the
    // tool definitions and calls must not spell one.
    if native_tools {
        let outside = shown_tools.map(|t| t.tools.to_string()).into_iter().chain(
            messages
                .iter()
                .filter_map(|m| m.tool_calls.as_ref().map(|c| c.to_string())),
        );
        for text in outside {
            if let Some(id) = st.tok.find_control_text(&text) {
                return Err(ApiError::invalid(
                    "tools",
                    format!(
                        "tool definitions and calls may not contain the control token {:?}",
                        String::from_utf8_lossy(st.tok.token_bytes(id))
                    ),
                ));
            }
        }
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), k) => Some(check_logprobs("top_logprobs", k.unwrap_or(0))?),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ))
        }
        _ => None,
    };
    let mut params = req.common.params(logprobs)?;
    let (text, spans) = st
        .template
        .render_with_spans(
            &messages,
            shown_tools.filter(|_| native_tools).map(|t| &t.tools),
            true,
            &st.bos,
            &st.eos,
        )
        .map_err(|e| {
            ApiError::invalid(
                "messages",
                format!("the chat template rejected the messages: {e}"),
            )
        })?;
    // Message text is text: only the template's own control tokens are parsed as such.
    let prompt = match spans {
        Some(spans) => st.tok.encode_with_literal_spans(&text, true, &spans),
        None => {
            // The template transformed the contents, so they cannot be told apart from its own
            // text: refuse contents that spell a control token rather than parse them.
            for (i, m) in messages.iter().enumerate() {
                if let Some(id) = st.tok.find_control_text(&m.content) {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        format!(
                            "the content contains the control token {:?}, which this model's chat template does not allow in message text",
                            String::from_utf8_lossy(st.tok.token_bytes(id))
                        ),
                    ));
                }
            }
            st.tok.encode(&text, true, true)
        }
    }
    .map_err(|e| ApiError::invalid("messages", format!("tokenizing the messages: {e}")))?;
    st.fit(&prompt, &mut params, "messages")?;
    let constraint = constraint_for(st, &req.common, shown_tools)?;
    params.speculative = speculation(st, &req.common, constraint.is_some())?;
    Ok(Prepared {
        prompt,
        params,
        common: req.common,
        constraint,
        tools: tools.filter(|t| t.choice != Choice::None),
    })
}

pub(crate) fn prepare_completion(
    st: &AppState,
    req: CompletionRequest,
) -> Result<Prepared, ApiError> {
    crate::api::check_other_fields(&req.other)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let logprobs = req
        .logprobs
        .map(|k| check_logprobs("logprobs", k))
        .transpose()?;
    let mut params = req.common.params(logprobs)?;
    let encode = |text: &str| {
        st.tok
            .encode(text, true, true)
            .map_err(|e| ApiError::invalid("prompt", format!("tokenizing the prompt: {e}")))
    };
    let prompt = match &req.prompt()? {
        PromptField::Text(t) => encode(t)?,
        PromptField::Texts(v) if v.len() == 1 => encode(&v[0])?,
        PromptField::Texts(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "exactly one prompt per request is supported, got {}",
                    v.len()
                ),
            ))
        }
        PromptField::Tokens(ids) => {
            let n = st.tok.vocab_size();
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("token id {bad} is out of range (the vocabulary has {n} tokens)"),
                ));
            }
            ids.clone()
        }
    };
    st.fit(&prompt, &mut params, "prompt")?;
    let constraint = constraint_for(st, &req.common, None)?;
    params.speculative = speculation(st, &req.common, constraint.is_some())?;
    Ok(Prepared {
        prompt,
        params,
        common: req.common,
        constraint,
        tools: None,
    })
}
