//! What the fuzz targets share: the two real models (fetched into `$MODU_HOME` by modu's own
//! `pull` when missing, never skipped), loaded once per process.

use std::sync::{Arc, OnceLock};

use modu_engine::{BaseShapes, ChatTemplate, Tokenizer};
use modu_gguf::GgufFile;

pub struct Model {
    pub file: Arc<GgufFile>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub shapes: BaseShapes,
    pub bos: String,
    pub eos: String,
}

fn load(name: &str) -> Model {
    let path = modu_hub::resolve(name, &modu_hub::NoProgress)
        .unwrap_or_else(|e| panic!("fetching {name}: {e}"));
    let file = Arc::new(GgufFile::open(&path).expect("opening the model"));
    let tokenizer = Tokenizer::from_gguf(&file).expect("tokenizer");
    let template = ChatTemplate::for_model(&file).expect("chat template");
    let shapes = BaseShapes::from_gguf(&file).expect("shapes");
    let text = |id: Option<u32>| {
        id.map(|i| String::from_utf8_lossy(tokenizer.token_bytes(i)).into_owned())
            .unwrap_or_default()
    };
    let (bos, eos) = (text(tokenizer.bos_id()), text(tokenizer.eos_id()));
    Model {
        file,
        tokenizer,
        template,
        shapes,
        bos,
        eos,
    }
}

/// Qwen2.5-Coder-0.5B (BPE vocabulary).
pub fn qwen() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load("qwen2.5-coder-0.5b-instruct"))
}

/// Gemma-3-270M (SentencePiece vocabulary).
pub fn gemma() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load("gemma-3-270m"))
}
