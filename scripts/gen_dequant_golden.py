#!/usr/bin/env python3
"""Generate the golden dequantization vectors of crates/kernels/tests/golden/.

The expected values come from the numpy dequantization of the PyPI `gguf` package (the
reference implementation maintained with llama.cpp), independent of our Rust code.

Install:  pip install gguf numpy
Run:      python scripts/gen_dequant_golden.py [--qwen /tmp/models/qwen.gguf] [--gemma /tmp/models/gemma.gguf]

For every tensor type present in each real model (Q4_K, Q5_0, Q6_K, Q8_0, F32) it takes the
first two rows of the first tensor of that type (each truncated to at most MAX_ELEMS elements,
a whole number of blocks). For the types the models lack, it generates random blocks with a
fixed seed (finite f16 scales, including subnormals and negatives) and dequantizes those.

Output, per vector `<stem>`:
  <stem>.bin  raw block bytes, rows back to back
  <stem>.f32  expected values, little-endian f32, rows back to back
and one line per vector in manifest.txt:  <stem> <TYPE> <rows> <elems_per_row> <source>

It also writes quant_q8_0_input.f32 / quant_q8_0_expected.bin: random activations and their
Q8_0 quantization by gguf-py (bit-exact with ggml's reference quantizer), including exact
rounding ties and an all-zero block.
"""

import argparse
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

MAX_ELEMS = 1024
ROWS = 2
SEED = 20240607

MODEL_TYPES = ["Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"]
RANDOM_TYPES = [
    "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
]
# Byte offsets of the f16 fields in one block.
F16_FIELDS = {
    "Q4_0": [0], "Q5_0": [0], "Q8_0": [0],
    "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
    "Q2_K": [80, 82], "Q3_K": [108], "Q6_K": [208],
}


def row_bytes(qtype, n):
    bs, ts = GGML_QUANT_SIZES[qtype]
    assert n % bs == 0
    return n // bs * ts


def write_vector(out_dir, manifest, stem, type_name, raw_rows, n, source):
    qtype = Q[type_name]
    rb = row_bytes(qtype, n)
    raw = np.frombuffer(b"".join(raw_rows), dtype=np.uint8).reshape((len(raw_rows), rb))
    expected = np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape((len(raw_rows), n))
    if not np.all(np.isfinite(expected)):
        sys.exit(f"{stem}: non-finite values")
    with open(os.path.join(out_dir, stem + ".bin"), "wb") as f:
        f.write(raw.tobytes())
    with open(os.path.join(out_dir, stem + ".f32"), "wb") as f:
        f.write(expected.astype("<f4").tobytes())
    manifest.append(f"{stem} {type_name} {len(raw_rows)} {n} {source}")


def from_model(out_dir, manifest, label, path):
    reader = gguf.GGUFReader(path)
    done = set()
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in MODEL_TYPES or name in done:
            continue
        cols = int(t.shape[0])
        bs, _ = GGML_QUANT_SIZES[t.tensor_type]
        n = min(cols, MAX_ELEMS) // bs * bs
        data = np.asarray(t.data).view(np.uint8).reshape(-1)
        full_rb = row_bytes(t.tensor_type, cols)
        n_rows = min(ROWS, data.size // full_rb)
        rows = [data[r * full_rb : r * full_rb + row_bytes(t.tensor_type, n)].tobytes() for r in range(n_rows)]
        src = f"{label}:{t.name}:rows0-{n_rows - 1}:first{n}"
        write_vector(out_dir, manifest, f"{label}_{name.lower()}", name, rows, n, src)
        done.add(name)
    missing = set(MODEL_TYPES) - done
    if missing:
        print(f"note: {label} has no tensors of {sorted(missing)}", file=sys.stderr)


def random_f16(rng, count, scale_bits=False):
    """Random finite f16 bit patterns (exponent field != 31)."""
    bits = rng.integers(0, 1 << 16, size=count, dtype=np.uint32).astype(np.uint16)
    bad = (bits & 0x7C00) == 0x7C00
    bits[bad] &= np.uint16(0xBFFF)  # clear the top exponent bit: finite
    if scale_bits:
        # Keep scales modest: exponents below 2^0 (avoid overflow to inf in products).
        bits &= np.uint16(0xB7FF)
    return bits


def from_random(out_dir, manifest):
    rng = np.random.default_rng(SEED)
    for name in RANDOM_TYPES:
        qtype = Q[name]
        bs, ts = GGML_QUANT_SIZES[qtype]
        n = 8 * 32 if bs == 1 else (4 * bs if bs == 256 else 8 * bs)
        rows = []
        for _ in range(ROWS):
            if name == "F16":
                raw = random_f16(rng, n).astype("<u2").tobytes()
            elif name == "BF16":
                bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint32).astype(np.uint16)
                bad = (bits & 0x7F80) == 0x7F80
                bits[bad] &= np.uint16(0xBFFF)
                raw = bits.astype("<u2").tobytes()
            else:
                nb = n // bs
                blocks = rng.integers(0, 256, size=(nb, ts), dtype=np.uint16).astype(np.uint8)
                for off in F16_FIELDS[name]:
                    f = random_f16(rng, nb, scale_bits=True).astype("<u2").view(np.uint8).reshape(nb, 2)
                    blocks[:, off : off + 2] = f
                raw = blocks.tobytes()
            rows.append(raw)
        write_vector(out_dir, manifest, f"random_{name.lower()}", name, rows, n, f"random:seed{SEED}")


def quantizer_vectors(out_dir):
    """Q8_0 activation quantization by gguf-py (bit-exact with ggml's quantize_row_q8_0_ref).

    Writes quant_q8_0_input.f32 (values) and quant_q8_0_expected.bin (blocks)."""
    rng = np.random.default_rng(SEED + 1)
    n_blocks = 64
    x = (rng.standard_normal(n_blocks * 32) * rng.uniform(0.01, 10.0, size=n_blocks * 32)).astype(np.float32)
    # Exact .5 ties after scaling: blocks whose max is 127 hold multiples of 0.5.
    for b in range(0, n_blocks, 8):
        x[b * 32 : b * 32 + 32] = rng.integers(-254, 255, size=32).astype(np.float32) / 2
        x[b * 32] = 127.0
    x[5 * 32 : 6 * 32] = 0.0  # an all-zero block
    q = gguf.quants.quantize(x.reshape(1, -1), Q.Q8_0)
    with open(os.path.join(out_dir, "quant_q8_0_input.f32"), "wb") as f:
        f.write(x.astype("<f4").tobytes())
    with open(os.path.join(out_dir, "quant_q8_0_expected.bin"), "wb") as f:
        f.write(np.asarray(q, dtype=np.uint8).tobytes())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qwen", default="/tmp/models/qwen.gguf")
    ap.add_argument("--gemma", default="/tmp/models/gemma.gguf")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "crates", "kernels", "tests", "golden"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    manifest = []
    for label, path in (("qwen", args.qwen), ("gemma", args.gemma)):
        if os.path.exists(path):
            from_model(args.out, manifest, label, path)
        else:
            print(f"warning: {path} not found, skipping {label}", file=sys.stderr)
    from_random(args.out, manifest)
    quantizer_vectors(args.out)
    with open(os.path.join(args.out, "manifest.txt"), "w") as f:
        f.write("# stem type rows elems_per_row source  (generated by scripts/gen_dequant_golden.py)\n")
        f.write("\n".join(manifest) + "\n")
    total = sum(os.path.getsize(os.path.join(args.out, p)) for p in os.listdir(args.out))
    print(f"{len(manifest)} vectors, {total} bytes in {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
