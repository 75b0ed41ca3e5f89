#!/usr/bin/env python3
"""A minimal endpoint picker with GAIE's LoRA-affinity rule, as a forwarding HTTP proxy, to
show that modu's GAIE metrics carry the signal the real picker uses. Per request it reads the
body's `model`, looks at every backend's `vllm:lora_requests_info` and
`vllm:num_requests_waiting` (scraped at most every 50 ms) and picks the highest score:
1.0 if the module is running (resident) there, 0.8 if the server has room for another module
(fewer running than `max_lora`), 0.6 if it is among the waiting ones, else 0; ties go to the
shorter queue. The response is streamed back as it arrives.

    router.py --port 18100 --backend http://127.0.0.1:18101 --backend ...
"""
import argparse
import http.server
import json
import re
import socketserver
import threading
import time
import urllib.request

LORA = re.compile(r'^vllm:lora_requests_info\{(.*)\}\s+(\S+)$', re.M)
LABEL = re.compile(r'(\w+)="([^"]*)"')
WAITING = re.compile(r'^vllm:num_requests_waiting(?:\{[^}]*\})?\s+(\S+)$', re.M)


class Backends:
    def __init__(self, urls):
        self.urls = urls
        self.lock = threading.Lock()
        self.state = {u: ({"running": set(), "waiting": set(), "max": 0}, 0.0) for u in urls}
        self.at = 0.0

    def refresh(self):
        with self.lock:
            if time.monotonic() - self.at < 0.05:
                return
            for u in self.urls:
                try:
                    text = urllib.request.urlopen(u + "/metrics", timeout=2).read().decode()
                except Exception:
                    continue
                m = LORA.search(text)
                labels = dict(LABEL.findall(m.group(1))) if m else {}
                split = lambda s: {x for x in s.split(",") if x}
                w = WAITING.search(text)
                self.state[u] = ({"running": split(labels.get("running_lora_adapters", "")),
                                  "waiting": split(labels.get("waiting_lora_adapters", "")),
                                  "max": int(labels.get("max_lora", "0") or 0)},
                                 float(w.group(1)) if w else 0.0)
            self.at = time.monotonic()

    def pick(self, model):
        self.refresh()
        with self.lock:
            def score(u):
                lora, queue = self.state[u]
                if model in lora["running"]:
                    s = 1.0
                elif len(lora["running"]) < lora["max"]:
                    s = 0.8
                elif model in lora["waiting"]:
                    s = 0.6
                else:
                    s = 0.0
                return (s, -queue)
            best = max(self.urls, key=score)
            # The request will make its module resident there: count it until the next scrape.
            self.state[best][0]["running"].add(model)
            return best


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            model = json.loads(body).get("model", "")
        except ValueError:
            model = ""
        target = self.server.backends.pick(model)
        req = urllib.request.Request(target + self.path, data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            r = urllib.request.urlopen(req, timeout=300)
            status, headers = r.status, r.headers
        except urllib.error.HTTPError as e:
            r, status, headers = e, e.code, e.headers
        self.send_response(status)
        self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Backend", target)
        self.end_headers()
        while True:
            chunk = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
            if not chunk:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *a):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", action="append", required=True)
    a = ap.parse_args()
    s = Server(("127.0.0.1", a.port), Handler)
    s.backends = Backends(a.backend)
    s.serve_forever()


if __name__ == "__main__":
    main()
