"""Parses Prometheus text exposition from stdin with prometheus_client's own parser (the
reference implementation) and prints the families as JSON: [{name, type, samples: [{name,
labels, value}]}]. Fails on anything the parser rejects."""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families

out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    out.append({
        "name": fam.name,
        "type": fam.type,
        "samples": [
            {"name": s.name, "labels": s.labels, "value": None if math.isnan(s.value) else s.value}
            for s in fam.samples
        ],
    })
print(json.dumps(out))
