/// Receives progress of long operations (downloads, extraction, hashing).
///
/// The library reports, the caller renders: the CLI draws a bar, tests and
/// library users pass [`NoProgress`]. A pull runs several phases one after the
/// other; each is `start` → any number of `advance` → `finish`. Methods take
/// `&self` so one sink can be shared; implementations use interior mutability.
pub trait ProgressSink {
    /// A new phase begins. `total` is its size in bytes when known.
    fn start(&self, label: &str, total: Option<u64>);
    /// `bytes` more bytes of the current phase are done (a delta, not a total).
    fn advance(&self, bytes: u64);
    /// The current phase is over.
    fn finish(&self);
    /// A one-off status line (e.g. "waiting for another process"). Ignored by default.
    fn message(&self, _msg: &str) {}
}

/// A [`ProgressSink`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn start(&self, _label: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}
