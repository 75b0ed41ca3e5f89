//! Small file-system helpers shared by the fetchers: atomic writes, hashing
//! copies, the cross-process lock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{HubError, IoContext};
use crate::progress::ProgressSink;

/// Copy buffer size: large enough that syscalls don't dominate a 500 MB copy.
const BUF: usize = 1 << 20;

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// True for a 64-digit hex string, i.e. something that can be a sha256.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<(), HubError> {
    fs::create_dir_all(dir).ctx(|| format!("creating directory {}", dir.display()))
}

/// `path` with `suffix` appended to its file name (`a.gguf` → `a.gguf.tmp`).
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Make a completed rename durable: fsync the directory holding the entry.
pub(crate) fn sync_dir(dir: &Path) {
    // Best effort: some file systems refuse to open or fsync directories.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Write `bytes` to `path` through a temp file + rename, so readers see either
/// the old content or the new, never a torn file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), HubError> {
    let tmp = with_suffix(path, ".tmp");
    let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .ctx(|| format!("writing {}", tmp.display()))?;
    drop(f);
    fs::rename(&tmp, path).ctx(|| format!("renaming {} into place", tmp.display()))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

/// Copy `reader` into `writer`, feeding the hasher and the progress sink.
/// Returns the number of bytes copied. Read and write errors are kept apart so
/// a caller can tell a dropped connection from a full disk.
pub(crate) fn copy_hashing(
    reader: &mut dyn Read,
    writer: &mut dyn Write,
    hasher: &mut Sha256,
    progress: &dyn ProgressSink,
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        writer.write_all(&buf[..n]).map_err(CopyError::Write)?;
        hasher.update(&buf[..n]);
        total += n as u64;
        progress.advance(n as u64);
    }
}

#[derive(Debug)]
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// sha256 of a whole file, reporting progress.
pub(crate) fn sha256_file(path: &Path, progress: &dyn ProgressSink) -> Result<String, HubError> {
    let mut hasher = Sha256::new();
    hash_file_into(path, &mut hasher, progress)?;
    Ok(hex(&hasher.finalize()))
}

/// Feed a whole file into `hasher`; returns its length.
pub(crate) fn hash_file_into(
    path: &Path,
    hasher: &mut Sha256,
    progress: &dyn ProgressSink,
) -> Result<u64, HubError> {
    let mut f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    copy_hashing(&mut f, &mut io::sink(), hasher, progress).map_err(|e| match e {
        CopyError::Read(e) | CopyError::Write(e) => {
            HubError::io(format!("reading {}", path.display()), e)
        }
    })
}

/// An exclusive advisory lock on `locks/<key>.lock`, held until dropped.
///
/// flock(2)-style locks belong to the open file description, so they exclude
/// other processes *and* other threads of this process that opened the file
/// separately (parallel tests), and the kernel drops them when a process dies:
/// no stale lock files to detect. The lock files themselves are never removed
/// (removing one while another process waits on it would split the lock).
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn acquire(
        path: &Path,
        what: &str,
        progress: &dyn ProgressSink,
    ) -> Result<FileLock, HubError> {
        if let Some(dir) = path.parent() {
            create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx(|| format!("opening lock file {}", path.display()))?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                progress.message(&format!(
                    "waiting for another modu process to finish fetching {what}"
                ));
                fs4::FileExt::lock(&file).ctx(|| format!("locking {}", path.display()))?;
            }
            Err(fs4::TryLockError::Error(e)) => {
                return Err(HubError::io(format!("locking {}", path.display()), e))
            }
        }
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_sha_shape() {
        assert_eq!(hex(&[0x00, 0xab, 0x5f]), "00ab5f");
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"a".repeat(40)));
        assert!(!is_sha256_hex(&"g".repeat(64)));
    }
}
