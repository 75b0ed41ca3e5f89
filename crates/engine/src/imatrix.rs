//! Importance matrices: for every weight matrix, the mean over calibration tokens of the
//! squared input activation of each input column, `imp[c] = mean_t x[t,c]²`. A quantizer that
//! weights its error by `imp` minimizes (to first order) the expected squared error of the
//! matmul output rather than of the weights.
//!
//! # File format
//! modu writes a GGUF file (not llama.cpp's `imatrix.dat`): one F32 tensor per weight, named
//! after the weight (`blk.0.attn_q.weight`), 1-D with `cols` elements holding the mean of x².
//! Metadata: `general.type = "imatrix"`, `imatrix.chunks` (number of windows evaluated),
//! `imatrix.tokens` (tokens seen) and `imatrix.dataset` (the calibration file name).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use modu_gguf::{GgmlType, GgufFile, GgufWriter, Value};

use crate::layers::observe::MatmulObserver;

/// Accumulates Σx² and token counts per weight (install with
/// [`crate::layers::observe::set_observer`]).
#[derive(Default)]
pub struct ImatrixCollector {
    acc: Mutex<HashMap<String, (Vec<f64>, u64)>>,
}

impl MatmulObserver for ImatrixCollector {
    fn observe(&self, weight: &str, x: &[f32], n_tokens: usize, cols: usize) {
        // Sum outside the lock: the projections of a layer may run concurrently.
        let mut local = vec![0f64; cols];
        for row in x.chunks_exact(cols).take(n_tokens) {
            for (a, &v) in local.iter_mut().zip(row) {
                *a += (v as f64) * (v as f64);
            }
        }
        let mut g = self.acc.lock().unwrap_or_else(|e| e.into_inner());
        let e = g
            .entry(weight.to_string())
            .or_insert_with(|| (vec![0.0; cols], 0));
        if e.0.len() == cols {
            for (a, b) in e.0.iter_mut().zip(&local) {
                *a += b;
            }
            e.1 += n_tokens as u64;
        }
    }
}

impl ImatrixCollector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Mean of x² per column for every weight seen.
    pub fn means(&self) -> HashMap<String, Vec<f32>> {
        let g = self.acc.lock().unwrap_or_else(|e| e.into_inner());
        g.iter()
            .map(|(k, (s, n))| {
                let n = (*n).max(1) as f64;
                (k.clone(), s.iter().map(|v| (v / n) as f32).collect())
            })
            .collect()
    }
}

/// Write an importance matrix file (format in the module docs).
pub fn write_imatrix(
    path: &Path,
    data: &HashMap<String, Vec<f32>>,
    chunks: u64,
    tokens: u64,
    dataset: &str,
) -> Result<(), modu_gguf::GgufError> {
    let mut w = GgufWriter::new();
    w.add("general.type", Value::String("imatrix".into()));
    w.add("imatrix.chunks", Value::U64(chunks));
    w.add("imatrix.tokens", Value::U64(tokens));
    w.add("imatrix.dataset", Value::String(dataset.into()));
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for n in names {
        let v = &data[n];
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        w.add_tensor(n.clone(), &[v.len() as u64], GgmlType::F32, bytes)?;
    }
    w.write_file(path)
}

/// Read an importance matrix file written by [`write_imatrix`].
pub fn read_imatrix(path: &Path) -> Result<HashMap<String, Vec<f32>>, String> {
    let f = GgufFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if f.get_str("general.type") != Some("imatrix") {
        return Err(format!(
            "{}: not a modu importance matrix (general.type != \"imatrix\")",
            path.display()
        ));
    }
    let mut out = HashMap::new();
    for t in f.tensors() {
        if t.ty != GgmlType::F32 || t.dims.len() != 1 {
            return Err(format!(
                "{}: tensor {} is not 1-D F32",
                path.display(),
                t.name
            ));
        }
        let v: Vec<f32> = f
            .tensor_data(t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if v.iter().any(|x| !x.is_finite() || *x < 0.0) {
            return Err(format!(
                "{}: tensor {} has bad values",
                path.display(),
                t.name
            ));
        }
        out.insert(t.name.clone(), v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collects_mean_squares_and_round_trips() {
        let c = ImatrixCollector::new();
        c.observe("w", &[1.0, 2.0, 3.0, 4.0], 2, 2);
        c.observe("w", &[0.0, 0.0], 1, 2);
        let m = c.means();
        assert_eq!(m["w"], vec![10.0 / 3.0, 20.0 / 3.0]);
        let dir = std::env::temp_dir().join(format!("modu-imatrix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("im.gguf");
        write_imatrix(&p, &m, 1, 3, "t").unwrap();
        assert_eq!(read_imatrix(&p).unwrap(), m);
        std::fs::remove_dir_all(&dir).ok();
    }
}
