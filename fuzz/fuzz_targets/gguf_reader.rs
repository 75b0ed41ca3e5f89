//! Any byte string through the GGUF reader: parse, walk every key and tensor, touch each
//! tensor's data. Errors are fine; panics, hangs and out-of-bounds reads are not.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = modu_gguf::GgufFile::from_bytes(data.to_vec()) {
        let _ = f.get_str("general.architecture");
        for t in f.tensors() {
            let d = f.tensor_data(t);
            std::hint::black_box(d.first());
        }
    }
});
