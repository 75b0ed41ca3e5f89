//! `modu run`, `modu chat`, `modu tokenize`, `modu info`.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use modu_engine::chat::{ChatMessage, ChatTemplate};
use modu_engine::generate::{
    generate_constrained, generate_drafted, generate_with, GenerateParams,
};
use modu_engine::{load_model, Grammar, GrammarEngine, Model, SamplingParams, Tokenizer};
use modu_gguf::GgufFile;

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// Model: a GGUF path, a known name (pulled on demand) or hf:OWNER/REPO/FILE.gguf.
    #[arg(short, long, default_value = "qwen2.5-coder-0.5b-instruct")]
    pub model: String,
    /// Worker threads (default: all cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Context size in tokens (default: min(4096, the model's training context)).
    #[arg(long)]
    pub ctx: Option<usize>,
}

#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Maximum tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n_predict: usize,
    /// Temperature; 0 = greedy.
    #[arg(long = "temp", default_value_t = 0.8, allow_negative_numbers = true)]
    pub temp: f32,
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// Tokens of history the penalties look at (-1 = all, 0 = none).
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub repeat_last_n: i32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// RNG seed: same seed and settings give the same output.
    #[arg(long, default_value_t = 0xC0FFEE)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    /// Do not stop at end-of-generation tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    #[command(flatten)]
    pub spec: SpecArgs,
}

/// Speculative decoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SpecMode {
    None,
    Ngram,
}

#[derive(Args, Clone, Copy)]
pub struct SpecArgs {
    /// Speculative decoding: `ngram` drafts the next tokens by finding the text's last few
    /// tokens earlier in the prompt or output (prompt lookup) and checks the draft in one
    /// forward pass; the output is the same as without. Pays off when answers copy from the
    /// prompt (edits, extraction); backs off when drafts miss. Not used with a grammar.
    #[arg(long = "spec", value_enum, default_value = "none")]
    pub spec: SpecMode,
    /// Most draft tokens checked per forward pass (with --spec ngram, or `modu run --draft`).
    #[arg(long = "spec-draft", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub spec_draft: u16,
}

impl SpecArgs {
    pub fn config(&self) -> Option<modu_engine::SpecConfig> {
        (self.spec == SpecMode::Ngram).then(|| modu_engine::SpecConfig {
            max_draft: self.spec_draft as usize,
            ..Default::default()
        })
    }
}

impl SamplingArgs {
    fn params(&self, logprobs: Option<usize>) -> Result<GenerateParams> {
        let sampling = SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        };
        sampling.validate().map_err(anyhow::Error::msg)?;
        Ok(GenerateParams {
            max_tokens: self.n_predict,
            sampling,
            stop: self.stop.clone(),
            logprobs,
            ignore_eos: self.ignore_eos,
            speculative: self.spec.config(),
        })
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Prompt text. Special tokens written in it (e.g. <|im_start|>) are parsed as such.
    #[arg(short, long, allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file", conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System prompt (with --chat).
    #[arg(long, requires = "chat", allow_hyphen_values = true)]
    pub system: Option<String>,
    /// Use this Jinja chat template instead of the model's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Report the K most likely tokens with log-probabilities at each step.
    #[arg(long)]
    pub logprobs: Option<usize>,
    /// Print one JSON object (prompt tokens, generated tokens with log-probabilities) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print timings to stderr.
    #[arg(short, long)]
    pub verbose: bool,
    /// Apply a LoRA module (a .gguf adapter or a PEFT directory), optionally at a scale
    /// (default 1); repeat to sum several.
    #[arg(long = "module", value_name = "PATH[=SCALE]")]
    pub modules: Vec<String>,
    /// Constrain the output to JSON that validates against this JSON schema file.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["grammar", "regex", "json_object"])]
    pub json_schema: Option<PathBuf>,
    /// Constrain the output to any JSON object.
    #[arg(long, conflicts_with_all = ["grammar", "regex"])]
    pub json_object: bool,
    /// Constrain the output to this Lark grammar file (llguidance's Lark dialect).
    #[arg(long, value_name = "FILE", conflicts_with = "regex")]
    pub grammar: Option<PathBuf>,
    /// Constrain the output to match this regular expression.
    #[arg(long, value_name = "REGEX", allow_hyphen_values = true)]
    pub regex: Option<String>,
    /// Speculative decoding with a draft model of the same vocabulary (a path, known name or
    /// hf: source; e.g. a smaller model of the family): each forward pass of MODEL checks up to
    /// --spec-draft of its greedy tokens. The output is the same as without.
    #[arg(long, value_name = "MODEL", conflicts_with_all = ["grammar", "regex", "json_object", "json_schema"])]
    pub draft: Option<String>,
}

impl RunArgs {
    /// The grammar the output must follow, from --json-schema, --json-object, --grammar or
    /// --regex, and what to call it in errors.
    fn grammar(&self) -> Result<Option<(Grammar, String)>> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(if let Some(p) = &self.json_schema {
            let text = read(p)?;
            let schema: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", p.display()))?;
            Some((
                Grammar::JsonSchema(schema),
                format!("the JSON schema in {}", p.display()),
            ))
        } else if self.json_object {
            Some((Grammar::JsonObject, "--json-object".into()))
        } else if let Some(p) = &self.grammar {
            Some((
                Grammar::Lark(read(p)?),
                format!("the grammar in {}", p.display()),
            ))
        } else {
            self.regex
                .clone()
                .map(|r| (Grammar::Regex(r), "the --regex".into()))
        })
    }
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long, allow_hyphen_values = true)]
    pub system: Option<String>,
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Apply a LoRA module (a .gguf adapter or a PEFT directory), optionally at a scale
    /// (default 1); repeat to sum several.
    #[arg(long = "module", value_name = "PATH[=SCALE]")]
    pub modules: Vec<String>,
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print the ids as a JSON array.
    #[arg(long)]
    pub json: bool,
    /// Do not parse special-token text.
    #[arg(long)]
    pub no_parse_special: bool,
    /// Do not add BOS/EOS even if the model asks for them.
    #[arg(long)]
    pub no_bos: bool,
    /// The text (it may start with `-`).
    #[arg(allow_hyphen_values = true)]
    pub text: String,
}

#[derive(Args)]
pub struct InfoArgs {
    /// Model: a GGUF path, a known name or hf: source.
    pub model: String,
    /// Also list every tensor.
    #[arg(long)]
    pub tensors: bool,
}

/// The `--draft` model `spec`, loaded with `main`'s settings (threads, context), and checked to
/// share `loaded`'s vocabulary.
pub fn load_draft(main: &ModelArgs, spec: &str, loaded: &Loaded) -> Result<Loaded> {
    let d = load(&ModelArgs {
        model: spec.to_string(),
        ..main.clone()
    })?;
    modu_engine::speculate::same_vocabulary(&loaded.file, &d.file)
        .map_err(|e| anyhow::anyhow!("--draft {spec}: {e}"))?;
    Ok(d)
}

/// A model ready to generate.
pub struct Loaded {
    pub model: Box<dyn Model>,
    pub tokenizer: Tokenizer,
    pub file: Arc<GgufFile>,
    pub ctx: usize,
}

/// Opens a model file to read it as GGUF data (metadata, tokenizer, tensors in the file's
/// format): a private copy on transparent huge pages ([`GgufFile::open_resident`]) when the
/// kernel offers them, else (or with `MODU_MMAP=1`, to share the pages between processes) a
/// memory map.
pub fn open_gguf(spec: &str) -> Result<Arc<GgufFile>> {
    open(spec, false)
}

/// Opens a model file to run it: as [`open_gguf`], and in the private copy the matmul weights
/// that the kernels read faster regrouped are rewritten so
/// ([`modu_engine::layers::regroup_for_inference`]; the memory-mapped file stays as it is).
pub fn open_model(spec: &str) -> Result<Arc<GgufFile>> {
    open(spec, true)
}

fn open(spec: &str, regroup: bool) -> Result<Arc<GgufFile>> {
    let path = crate::pull::resolve_with_progress(spec)?;
    let file = if use_mmap() {
        GgufFile::open(&path)
    } else if regroup {
        GgufFile::open_resident_with(&path, modu_engine::layers::regroup_for_inference)
    } else {
        GgufFile::open_resident(&path)
    }
    .with_context(|| format!("opening {}", path.display()))?;
    Ok(Arc::new(file))
}

/// Whether to memory-map model files instead of copying them onto huge pages.
fn use_mmap() -> bool {
    if let Some(v) = std::env::var_os("MODU_MMAP") {
        return v != "0";
    }
    // Without transparent huge pages a private copy only costs load time and sharing.
    match std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled") {
        Ok(s) => s.contains("[never]"),
        Err(_) => true,
    }
}

pub fn load(args: &ModelArgs) -> Result<Loaded> {
    if let Some(t) = args.threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .ok();
    }
    if args.ctx == Some(0) {
        bail!("--ctx must be at least 1");
    }
    let file = open_model(&args.model)?;
    let tokenizer =
        Tokenizer::from_gguf(&file).context("building the tokenizer from GGUF metadata")?;
    let model = load_model(file.clone()).context("loading the model")?;
    let ctx = args
        .ctx
        .unwrap_or_else(|| model.info().n_ctx_train.min(4096))
        .max(1);
    Ok(Loaded {
        model,
        tokenizer,
        file,
        ctx,
    })
}

pub(crate) fn template(file: &GgufFile, override_path: &Option<PathBuf>) -> Result<ChatTemplate> {
    if let Some(p) = override_path {
        let src = std::fs::read_to_string(p)
            .with_context(|| format!("reading chat template {}", p.display()))?;
        return Ok(ChatTemplate::new(src)?);
    }
    Ok(ChatTemplate::for_model(file)?)
}

pub(crate) fn render_chat(
    l: &Loaded,
    tpl: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<String> {
    let tok = &l.tokenizer;
    let bos = tok
        .bos_id()
        .map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
        .unwrap_or_default();
    let eos = tok
        .eos_id()
        .map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
        .unwrap_or_default();
    Ok(tpl.render(messages, true, &bos, &eos)?)
}

pub fn run(a: RunArgs) -> Result<()> {
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading prompt file {}", f.display()))?,
        (None, None) => bail!("give a prompt with -p TEXT or -f FILE"),
    };
    // Constraint files are read before the model loads, so a bad one fails at once.
    let grammar = a.grammar()?;
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let mut params = a.sampling.params(a.logprobs)?;
    if a.draft.is_some() {
        // The draft model's tokens, as many per pass as --spec-draft allows.
        params.speculative = Some(modu_engine::SpecConfig {
            max_draft: a.sampling.spec.spec_draft as usize,
            ..Default::default()
        });
    }
    let l = load(&a.model)?;
    let modules = crate::module::load_modules(&a.modules, l.model.as_ref())?;
    let text = if a.chat {
        let tpl = template(&l.file, &a.chat_template)?;
        let mut msgs = vec![];
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &prompt));
        render_chat(&l, &tpl, &msgs)?
    } else {
        prompt
    };
    let ids = l.tokenizer.encode(&text, true, true)?;
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    if ids.len() >= l.ctx {
        bail!(
            "the prompt is {} tokens but the context holds only {} (it must leave room to generate; raise --ctx)",
            ids.len(),
            l.ctx
        );
    }
    let mut cache = l.model.new_cache(l.ctx);
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let stdout = std::io::stdout();
    let json = a.json;
    // On a worker of the global pool (see `on_pool`).
    let constraint = match grammar {
        Some((g, what)) => {
            let engine = Arc::new(GrammarEngine::new(&l.tokenizer)?);
            Some(
                engine
                    .compile(&g)
                    .with_context(|| format!("{what} cannot be used"))?,
            )
        }
        None => None,
    };
    let draft = a
        .draft
        .as_deref()
        .map(|spec| load_draft(&a.model, spec, &l))
        .transpose()?;
    let on_piece = |piece: &str, _: &modu_engine::generate::GeneratedToken| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if !json {
            let mut o = stdout.lock();
            let _ = o.write_all(piece.as_bytes());
            let _ = o.flush();
        }
        ControlFlow::Continue(())
    };
    let gen = on_pool(|| match &draft {
        Some(d) => generate_drafted(
            l.model.as_ref(),
            d.model.as_ref(),
            &l.tokenizer,
            &mut cache,
            &ids,
            &params,
            &modules,
            on_piece,
        ),
        None => generate_constrained(
            l.model.as_ref(),
            &l.tokenizer,
            &mut cache,
            &ids,
            &params,
            &modules,
            constraint,
            on_piece,
        ),
    })?;
    let total = t0.elapsed().as_secs_f64();
    if json {
        println!("{}", json_output(&ids, &gen.tokens)?);
    } else {
        println!();
    }
    if a.verbose {
        let n = gen.tokens.len();
        let ttft = first.unwrap_or(total);
        eprintln!(
            "prompt: {} tokens, first token after {:.1} ms; generated {} tokens in {:.2} s ({:.1} tok/s); finish: {}",
            ids.len(),
            ttft * 1e3,
            n,
            total,
            if total > ttft { (n.saturating_sub(1)) as f64 / (total - ttft) } else { 0.0 },
            gen.finish.as_str()
        );
        if params.speculative.is_some() || draft.is_some() {
            eprintln!(
                "speculative ({}): {} draft tokens in {} passes, {} kept ({:.0} %)",
                if draft.is_some() {
                    "draft model"
                } else {
                    "ngram"
                },
                gen.spec.drafted,
                gen.spec.rounds,
                gen.spec.accepted,
                100.0 * gen.spec.acceptance()
            );
        }
    }
    Ok(())
}

/// `{"prompt_tokens":[..],"tokens":[{"id":..,"text":"..","logprob":..,"top":[{"id":..,"logprob":..},..]},..]}`
/// with the keys in this order (serde_json's maps would sort them). A non-finite log-probability
/// is written as null.
fn json_output(prompt: &[u32], tokens: &[modu_engine::generate::GeneratedToken]) -> Result<String> {
    let mut s = format!(
        r#"{{"prompt_tokens":{},"tokens":["#,
        serde_json::to_string(prompt)?
    );
    for (i, t) in tokens.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s += &format!(
            r#"{{"id":{},"text":{},"logprob":{},"top":["#,
            t.id,
            serde_json::to_string(&t.piece)?,
            serde_json::to_string(&t.logprob)?
        );
        for (j, &(id, lp)) in t.top.iter().enumerate() {
            if j > 0 {
                s.push(',');
            }
            s += &format!(r#"{{"id":{id},"logprob":{}}}"#, serde_json::to_string(&lp)?);
        }
        s += "]}";
    }
    s += "]}";
    Ok(s)
}

pub fn chat(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params(None)?;
    let l = load(&a.model)?;
    let modules = crate::module::load_modules(&a.modules, l.model.as_ref())?;
    let tpl = template(&l.file, &a.chat_template)?;
    let mut msgs = vec![];
    if let Some(s) = &a.system {
        msgs.push(ChatMessage::new("system", s));
    }
    let mut cache = l.model.new_cache(l.ctx);
    let mut cached_ids: Vec<u32> = Vec::new();
    eprintln!(
        "modu chat: {} — type a message, an empty line or Ctrl-D to quit.",
        l.model.info().name.as_deref().unwrap_or(&a.model.model)
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        msgs.push(ChatMessage::new(
            "user",
            line.trim_end_matches(['\n', '\r']),
        ));
        let text = render_chat(&l, &tpl, &msgs)?;
        let ids = l.tokenizer.encode(&text, true, true)?;
        if ids.len() + params.max_tokens > l.ctx {
            bail!(
                "the conversation ({} tokens) no longer fits the context of {} tokens",
                ids.len(),
                l.ctx
            );
        }
        // The cache keeps the longest common prefix with the previous turn.
        cache.truncate(common_prefix(&cached_ids, &ids));
        let gen = on_pool(|| {
            generate_with(
                l.model.as_ref(),
                &l.tokenizer,
                &mut cache,
                &ids,
                &params,
                &modules,
                |piece, _| {
                    print!("{piece}");
                    let _ = std::io::stdout().flush();
                    ControlFlow::Continue(())
                },
            )
        })?;
        println!();
        // Everything but the last sampled token has been through the model.
        cached_ids = ids;
        cached_ids.extend(gen.tokens.iter().map(|t| t.id));
        cached_ids.truncate(cache.len());
        msgs.push(ChatMessage::new("assistant", gen.text.trim()));
    }
    Ok(())
}

/// Run `f` on a worker thread of the global rayon pool (after [`load`] has sized it). The
/// forward pass makes ~200 parallel calls per token; from a thread outside the pool each one is
/// injected and the caller sleeps on a latch until the workers finish, which costs a context
/// switch or two per call. From inside, the calling worker takes part and the join is cheap.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let file = open_gguf(&a.model.model)?;
    let tok = Tokenizer::from_gguf(&file)?;
    let ids = tok.encode(&a.text, !a.no_bos, !a.no_parse_special)?;
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            println!("{id:>8} {:?}", String::from_utf8_lossy(tok.token_bytes(id)));
        }
    }
    Ok(())
}

pub fn info(a: InfoArgs) -> Result<()> {
    let file = open_gguf(&a.model)?;
    println!(
        "GGUF version {}; {} metadata keys; {} tensors",
        file.version(),
        file.metadata().len(),
        file.tensors().len()
    );
    for (k, v) in file.metadata() {
        let s = format!("{v}");
        let s = if s.chars().count() > 120 {
            format!("{}…", s.chars().take(120).collect::<String>())
        } else {
            s
        };
        println!("  {k} = {s}");
    }
    let mut by_type: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    for t in file.tensors() {
        let e = by_type.entry(t.ty.to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes();
    }
    println!("tensor types:");
    for (ty, (n, bytes)) in by_type {
        println!("  {ty:>6}: {n:>4} tensors, {:>8.1} MB", bytes as f64 / 1e6);
    }
    if a.tensors {
        for t in file.tensors() {
            println!("  {:<40} {:>6} {:?}", t.name, t.ty.to_string(), t.dims);
        }
    }
    Ok(())
}
