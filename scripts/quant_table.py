#!/usr/bin/env python3
"""Markdown table from `modu eval kld --json` results: res-NAME-{ko,en}.json in DIR.

    python3 scripts/quant_table.py DIR NAME [NAME ...]

Each NAME also needs NAME.gguf in DIR (for the size); tg-NAME.json (`modu bench -p 0 -n 64
--json`), when present, adds the decode speed.
"""
import json
import os
import sys

d = sys.argv[1]
print("| model | size MB | PPL ko (base) | PPL ko | bits/byte ko | mean KLD ko | same top ko | "
      "PPL en (base) | PPL en | bits/byte en | mean KLD en | same top en | decode t/s |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for n in sys.argv[2:]:
    row = [n, f"{os.path.getsize(os.path.join(d, n + '.gguf')) / 1e6:.1f}"]
    for lang in ("ko", "en"):
        p = os.path.join(d, f"res-{n}-{lang}.json")
        try:
            r = json.load(open(p))
        except (OSError, ValueError):
            row += ["–"] * 5
            continue
        row += [f"{r['ppl_base']:.3f}", f"{r['ppl_quant']:.3f}", f"{r['bpb_quant']:.4f}",
                f"{r['kld_mean']:.5f}", f"{r['same_top_pct']:.1f} %"]
    try:
        tg = json.load(open(os.path.join(d, f"tg-{n}.json")))
        row.append(f"{tg[0]['avg_ts']:.1f}")
    except (OSError, ValueError, IndexError, KeyError):
        row.append("–")
    print("| " + " | ".join(row) + " |")
