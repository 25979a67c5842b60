"""Load on ``starflow serve``: bursts of concurrent image requests against the demo, on loopback only.

Starts the server in a child process (127.0.0.1, a free port, a temporary output folder), then
for each round sends ``--requests`` requests at once. Each must either complete (200, its PNGs
in the answer) or be refused with 429 and a Retry-After; anything else, or a server that stops
answering ``/health``, is a failure (exit 1). After each round the server's resident memory (now
and its peak, from /proc on Linux) is printed, so growth from round to round shows.

    python -m starflow_mlx.benchmarks.serve_load --requests 50 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HOST = "127.0.0.1"  # never anything else: this is a load test of the local machine's own server


def start_server(model: str, output_dir: Path, queue_size: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", "from starflow_mlx.apps.cli import main; main()", "serve", "--model", model,
               "--host", HOST, "--port", "0", "--output-dir", str(output_dir), "--queue-size", str(queue_size)]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    for line in server.stderr:
        found = re.search(r"on (http://[\d.]+:\d+) ", line)
        if found:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep its log from filling the pipe
            return server, found.group(1)
        sys.stderr.write(line)
    raise SystemExit(f"error: the server stopped before it listened (exit {server.wait()})")


def post(url: str, body: dict, timeout: float) -> tuple:
    """(status, seconds, headers (any case), json) of one request."""
    request = urllib.request.Request(f"{url}/v1/images/generations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, time.perf_counter() - start, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, time.perf_counter() - start, error.headers, json.loads(error.read() or b"{}")


def memory(pid: int) -> tuple[float, float]:
    """(resident, peak resident) in GB, from /proc (Linux); NaN elsewhere."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan"), float("nan")
    kb = {key: int(value) for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, flags=re.M)}
    return kb["VmRSS"] / 2**20, kb["VmHWM"] / 2**20


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=30) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--requests", type=int, default=50, help="concurrent requests per round (at most 200)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2, help="images per request")
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one request may take")
    a = parser.parse_args()
    if not 1 <= a.requests <= 200:
        raise SystemExit("error: --requests must be from 1 to 200 (this is a bounded test)")
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_server(a.model, Path(tmp) / "out", a.queue_size)
        try:
            print(f"server pid {server.pid} on {url}; {a.requests} concurrent requests of {a.n} images, "
                  f"queue {a.queue_size}; memory after start: {memory(server.pid)[0]:.2f} GB")
            for round_ in range(1, a.rounds + 1):
                start = time.perf_counter()
                with ThreadPoolExecutor(a.requests) as pool:
                    results = list(pool.map(lambda i: post(url, {"prompt": str(i % 10), "n": a.n}, a.timeout),
                                            range(a.requests)))
                took = time.perf_counter() - start
                done = [r for r in results if r[0] == 200 and len(r[3].get("data", [])) == a.n]
                refused = [r for r in results if r[0] == 429 and int(r[2].get("Retry-After", 0)) >= 1]
                other = [r for r in results if r not in done and r not in refused]
                failures += [f"round {round_}: HTTP {r[0]} {r[3]}" for r in other]
                if not healthy(url):
                    failures.append(f"round {round_}: /health stopped answering")
                rss, peak = memory(server.pid)
                latency = [r[1] for r in done]
                print(f"round {round_}: {len(done)} completed, {len(refused)} refused with 429, {len(other)} other; "
                      f"{took:.1f} s; completed in median {statistics.median(latency):.1f} s, max {max(latency):.1f} s; "
                      f"server memory {rss:.2f} GB (peak {peak:.2f} GB)" if latency else
                      f"round {round_}: none completed ({len(refused)} refused, {len(other)} other)")
            jobs = len([p for p in (Path(tmp) / "out").iterdir() if not p.name.startswith(".")])
            print(f"{jobs} finished jobs in the output folder")
        finally:
            server.send_signal(signal.SIGINT)
            try:
                code = server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = "killed after 60 s"
            print(f"server stopped on Ctrl-C: exit {code}")
    for failure in failures:
        print(f"FAILED {failure}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
