"""Load on loopback: concurrent clients against `pyengine serve`, latency percentiles and throughput.

For each dtype and worker layout (`--workers 1 2`: one worker process with all `--threads`, or that many workers
sharing them, CTranslate2's inter_threads; the same cores as offline either way): starts the server in its own
process on 127.0.0.1; one client process (this one) keeps
`--clients` requests in flight on asynchronous connections (aiohttp), each client sending `--requests` requests
(mixed lengths; /v1/translate and LibreTranslate's /translate alternated), so the load generator does not eat the
server's cores; checks every answer against the offline translation of its input (zero lost, failed or swapped
responses); prints p50/p99 latency and the server's throughput against offline `translate()` of the same
sentences in this process after each round, while the server idles (same threads; with --rounds, the median of the
rounds' ratios: this VM's speed drifts between runs). JSON goes to benchmarks/results/.

    python -m benchmarks.load --clients 64 --requests 12 --rounds 3 --dtypes int8 bfloat16 --workers 1 2 --check
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SAMPLE = Path(__file__).parent.parent / "tests" / "data" / "sample.en.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m pyengine serve` on 127.0.0.1 in a child process; a context manager that waits for
    /health and, on exit, stops it with SIGTERM (graceful shutdown)."""

    def __init__(self, model: str = "default", threads: int = 2, extra: list[str] | None = None,
                 start_timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "pyengine", "serve", "-m", model, "--host", "127.0.0.1",
                     "--port", str(self.port), "--threads", str(threads), *(extra or [])]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
        self.log: bytes = b""

    def __enter__(self) -> "ServerProcess":
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log().decode()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer /health within {self.start_timeout} s")

    def read_log(self) -> bytes:
        self._log.seek(0)
        return self._log.read()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait: in-flight requests finish first. Returns the exit code (uvicorn re-raises
        the signal after its graceful shutdown, so a clean stop is -SIGTERM)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log = self.read_log()
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


def post(url: str, body: dict, timeout: float) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@dataclass
class Outcome:
    """One request: what was sent, what came back, how long it took."""

    client: int
    endpoint: str
    texts: list[str]
    status: int = 0
    translations: list[str] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def run_load(url: str, clients: int, requests: int, pool: list[str], options: dict, seed: int = 0,
             deadline_s: float = 300.0, request_timeout: float = 120.0) -> list[Outcome]:
    """`clients` concurrent clients on asynchronous connections, each sending up to `requests` requests of 1-4
    texts from `pool` (one text to LibreTranslate's /translate every other request), all starting together; none
    starts after deadline_s. On uvloop where it is installed (the server's own loop): 0.29 s of client CPU a load
    round against asyncio's 0.36-0.45 s, CPU the server's cores then keep."""
    coroutine = _load(url, clients, requests, pool, options, seed, deadline_s, request_timeout)
    try:
        import uvloop
    except ImportError:  # Windows
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


async def _load(url: str, clients: int, requests: int, pool: list[str], options: dict, seed: int,
                deadline_s: float, request_timeout: float) -> list[Outcome]:
    import aiohttp  # the lightest of the maintained asynchronous clients: the load generator shares the cores

    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + deadline_s
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=request_timeout)) as http:
        async def client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            for j in range(requests):
                if time.monotonic() > stop_at:
                    return
                libre = (k + j) % 2 == 1
                texts = [rng.choice(pool)] if libre else [rng.choice(pool) for _ in range(rng.randint(1, 4))]
                out = Outcome(k, "/translate" if libre else "/v1/translate", texts)
                t0 = time.monotonic()
                try:
                    body = {"q": texts[0], "source": "en", "target": "de"} if libre else \
                        {"texts": texts, "options": options}
                    async with http.post(out.endpoint, json=body) as r:
                        out.status = r.status
                        raw = await r.read()
                    try:
                        data = json.loads(raw)
                    except ValueError:  # a proxy's plain-text answer (Ray Serve's for a replica that died)
                        data = {"error": raw.decode("utf-8", "replace")[:200]}
                    if out.status == 200:
                        out.translations = [data["translatedText"]] if libre else \
                            [t["translation"] for t in data["translations"]]
                    else:
                        out.error = data.get("error", "")
                except Exception as exc:  # noqa: BLE001 - a lost request is a result here
                    out.error = f"{type(exc).__name__}: {exc}"
                out.latency = time.monotonic() - t0
                outcomes.append(out)

        await asyncio.gather(*(client(k) for k in range(clients)))
    return outcomes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(outcomes: list[Outcome], wall: float) -> dict:
    ok = [o for o in outcomes if o.status == 200]
    latencies = [o.latency for o in ok]
    return {"requests": len(outcomes), "ok": len(ok), "failed": len(outcomes) - len(ok),
            "sentences": sum(len(o.texts) for o in ok), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "sentences_per_s": sum(len(o.texts) for o in ok) / wall,
            "latency_p50_s": percentile(latencies, 0.50), "latency_p99_s": percentile(latencies, 0.99),
            "latency_max_s": max(latencies, default=float("nan"))}


def pool_of_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths: UI strings and Bible verses of the default model's held-out sample."""
    lines = [line for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return random.Random(seed).sample(lines, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtypes", nargs="+", default=["int8", "bfloat16"])
    ap.add_argument("--clients", type=int, default=64, help="requests in flight")
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads of the offline engine, and of the server in all (--threads / --workers per worker)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="the server's worker processes: each layout is run (--threads / workers threads each)")
    ap.add_argument("--beam-size", type=int, default=2)
    ap.add_argument("--max-decoding-length", type=int, default=64)
    ap.add_argument("--pool", type=int, default=96, help="distinct texts the clients draw from")
    ap.add_argument("--rounds", type=int, default=1,
                    help="load rounds, each followed by offline translate() of its sentences (this VM's speed "
                         "drifts: the ratio is the median of the rounds' pairs)")
    ap.add_argument("--check", action="store_true", help="compare every answer with the offline translation")
    args = ap.parse_args()
    options = {"beam_size": args.beam_size, "max_decoding_length": args.max_decoding_length}
    pool = pool_of_texts(args.pool)
    runs = []
    if any(args.threads % w for w in args.workers):
        ap.error("--threads must be a multiple of each --workers (the same cores for the server and offline)")
    offline = None
    for dtype, workers in ((d, w) for d in args.dtypes for w in args.workers):
        if offline is None or offline.dtype != dtype:
            offline = OfflineEngine(args.model, dtype, args.threads)
        rounds, outcomes = [], []
        extra = ["--dtype", dtype, "--workers", str(workers)]
        with ServerProcess(args.model, args.threads // workers, extra=extra) as server:
            for r in range(args.rounds):  # the server idles while this process decodes offline, and back
                t0 = time.monotonic()
                got = run_load(server.url, args.clients, args.requests, pool, options, seed=r)
                wall = time.monotonic() - t0
                rounds.append({**summarize(got, wall), **offline.throughput(got, options, wall)})
                outcomes += got
            exit_code = server.stop()
        summary = {"dtype": dtype, "clients": args.clients, "requests_per_client": args.requests, "options": options,
                   "server_threads": args.threads, "server_workers": workers, "offline_threads": args.threads,
                   "server_exit_code": exit_code, "rounds": rounds,
                   **summarize(outcomes, sum(r["wall_s"] for r in rounds)),
                   "server_over_offline": statistics.median(r["server_over_offline"] for r in rounds)}
        if args.check:
            summary["mismatches"] = count_mismatches(outcomes, args.model, options, dtype)
        print(json.dumps(summary, indent=2))
        runs.append({"summary": summary, "outcomes": [asdict(o) for o in outcomes]})
    from benchmarks import cpu_name
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"cpu": cpu_name(), "runs": runs}))
    print(f"written {path}", file=sys.stderr)


def offline_translations(model: str, texts: list[str], options: dict, dtype: str = "float32") -> tuple[dict, dict]:
    """Each text translated alone, with the /v1 options and with the model's defaults and sentence splitting
    (/translate, LibreTranslate's API, splits paragraphs into sentences)."""
    import pyengine

    engine = pyengine.Engine.load(model, dtype=dtype)
    v1 = {t: engine.translate([t], **options)[0] for t in texts}
    libre = {t: engine.translate([t], split_sentences=True)[0] for t in texts}
    return v1, libre


class OfflineEngine:
    """The engine of the offline side, loaded once in this process with the server's threads."""

    def __init__(self, model: str, dtype: str, threads: int):
        import torch

        import pyengine

        torch.set_num_threads(threads)
        self.dtype, self.engine = dtype, pyengine.Engine.load(model, dtype=dtype)

    def throughput(self, outcomes: list[Outcome], options: dict, wall: float) -> dict:
        """The same sentences translated offline in one call per endpoint's options (length-sorted token-budget
        batches, no HTTP): the throughput the server is compared with."""
        v1 = [t for o in outcomes if o.status == 200 and o.endpoint == "/v1/translate" for t in o.texts]
        libre = [t for o in outcomes if o.status == 200 and o.endpoint == "/translate" for t in o.texts]
        self.engine.translate(v1[:8], **options)  # warm-up
        t0 = time.monotonic()
        self.engine.translate(v1, **options)
        self.engine.translate(libre, split_sentences=True)
        seconds = time.monotonic() - t0
        n = len(v1) + len(libre)
        return {"offline_s": seconds, "offline_sentences_per_s": n / seconds,
                "server_over_offline": n / wall / (n / seconds)}


def count_mismatches(outcomes: list[Outcome], model: str, options: dict, dtype: str = "float32") -> int:
    texts = sorted({t for o in outcomes for t in o.texts})
    v1, libre = offline_translations(model, texts, options, dtype)
    return sum(o.translations != [(libre if o.endpoint == "/translate" else v1)[t] for t in o.texts]
               for o in outcomes if o.status == 200)


if __name__ == "__main__":
    main()
