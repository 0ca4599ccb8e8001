"""pyengine on a real local Ray cluster started by the test (2 CPUs; every engine on 1 thread): Ray Data corpus
translation equals Engine.translate line for line, also with an actor killed (ray.kill) and another's process killed mid-run; the CLI's --input/--output
--ray output equals single-process `pyengine translate`, and a run killed halfway resumes without redoing finished
shards; Ray Serve with 2 replicas answers 32 concurrent clients like offline translation while a replica is killed.
Without Ray installed, the entry points say how to install it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import pyengine
from conftest import sample_lines

try:
    import ray
except ImportError:  # the [ray] extra; setup.sh --test installs it: say so plainly where it is missing
    pytest.fail("the distributed tests need Ray: pip install 'pyengine[ray]' (scripts/setup.sh --test installs it)",
                pytrace=False)
ROOT = Path(__file__).resolve().parent.parent
TRANSLATOR = "MapWorker(MapBatches(EngineTranslator))"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def engine():
    import torch
    torch.set_num_threads(1)
    return pyengine.Engine.load("default")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """A few hundred mixed-length lines: UI strings, Bible verses, a blank line and a long paragraph."""
    rows = [json.loads(x) for x in (ROOT / "data" / "heldout" / "test.bible.jsonl").read_text().splitlines()]
    lines = sample_lines()[:150] + [r["en"] for r in rows[:150]] + ["", " ".join(r["en"] for r in rows[:4])]
    return lines


@pytest.fixture(scope="module")
def reference(engine, corpus) -> list[str]:
    """The corpus translated by the engine in this process (what every distributed run must give)."""
    return engine.translate(corpus)


def translator_handles() -> list:
    """The handles the driver's Ray Data executor holds to its translator actors (they have no name to look up)."""
    import gc

    return [o for o in gc.get_objects() if isinstance(o, ray.actor.ActorHandle)
            and "EngineTranslator" in o._ray_actor_creation_function_descriptor.class_name]


def actor_pids(class_name: str) -> list[int]:
    """Process ids of the live actors of a class (the GCS's actor table: Ray Data's pool actors have no name to get
    a handle by, and the state API needs the dashboard)."""
    return [info["Pid"] for info in ray._private.state.actors().values()
            if info["ActorClassName"] == class_name and info["State"] == "ALIVE"]


def serve_replicas() -> list:
    """Handles to the live Serve replicas of the pyengine application (named actors in Serve's namespace)."""
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and "PyengineReplica" in a["name"]]
    handles = []
    for name in names:
        try:
            handles.append(ray.get_actor(name, namespace="serve"))
        except ValueError:  # gone between the listing and the lookup
            pass
    return handles


def test_dataset_translation_equals_the_engine(cluster, corpus, reference):
    from pyengine.distributed import translate_dataset

    rows = corpus + [None]  # a row the engine refuses: its error, the others translated
    ds = ray.data.from_items([{"text": t, "id": i} for i, t in enumerate(rows)])
    out = translate_dataset(ds, workers=2, threads=1, batch_size=32).take_all()
    assert [r["id"] for r in out] == list(range(len(rows)))  # the caller's order
    assert [r["translation"] for r in out[:-1]] == reference
    assert out[-1]["translation"] is None and "expected str, got NoneType" in out[-1]["error"]
    with pytest.raises(pyengine.OptionError, match="unknown decoding option"):
        translate_dataset(ds, beam_sise=2)


def test_an_actor_killed_mid_run_loses_and_repeats_nothing(cluster, corpus, reference):
    from pyengine.distributed import translate_dataset

    ds = ray.data.from_items([{"text": t, "id": i} for i, t in enumerate(corpus)])
    rows, killed = [], []
    for row in translate_dataset(ds, workers=2, threads=1, batch_size=8).iter_rows():
        rows.append(row)
        if len(rows) == 40 and not killed:
            handles = translator_handles()
            assert handles, "no translator actor"
            ray.kill(handles[0], no_restart=False)  # Ray Data's actor restarts; its unfinished batches run again
            killed.append(handles[0])
        if len(rows) == 120 and len(killed) == 1:
            pids = actor_pids(TRANSLATOR)
            assert pids, "no translator actor alive"
            os.kill(pids[-1], signal.SIGKILL)  # and a crash of an actor's process
            killed.append(pids[-1])
    assert len(killed) == 2
    assert [r["id"] for r in rows] == list(range(len(corpus)))
    assert [r["translation"] for r in rows] == reference


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], input=stdin, capture_output=True, timeout=900)


def test_cli_file_equals_single_process_and_resumes(cluster, corpus, tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    single = run_cli("translate", "--threads", "1", "--quiet", stdin=source.read_bytes())
    assert single.returncode == 0, single.stderr.decode()[-2000:]
    args = ["translate", "--input", str(source), "--output", str(tmp_path / "out.txt"), "--ray", cluster,
            "--workers", "2", "--threads", "1", "--shard-lines", "16", "--quiet"]
    # a run killed halfway: some shards written, then SIGKILL
    proc = subprocess.Popen([sys.executable, "-m", "pyengine", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    parts = tmp_path / "out.txt.parts"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list(parts.glob("0*.json"))) < 4 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in parts.glob("0*.json"))
    total = (len(corpus) + 15) // 16
    assert 4 <= len(finished) < total, finished
    mtimes = {name: (parts / name).stat().st_mtime_ns for name in finished}
    assert not (tmp_path / "out.txt").exists()
    # restarted with the same arguments: the finished shards are kept as they are, the rest translated
    seen: list[int] = []
    from pyengine.distributed.files import translate_corpus

    counts = translate_corpus(source, tmp_path / "out.txt", address=cluster, workers=2, threads=1, shard_lines=16,
                              progress=False, on_shard=seen.append)
    assert counts["skipped"] == len(finished) and counts["translated"] == total - len(finished)
    assert sorted(seen) == sorted(set(range(total)) - {int(n[:6]) for n in finished})  # nothing redone
    assert (tmp_path / "out.txt").read_bytes() == single.stdout and not parts.exists()
    assert all(mtimes)  # the parts were read as written (their removal at the end is the last step)
    # the CLI, from scratch, gives the same file
    again = run_cli(*args[:4], str(tmp_path / "again.txt"), *args[5:])
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert (tmp_path / "again.txt").read_bytes() == single.stdout
    assert f"{total} shards: 0 done before, {total} translated now" in again.stderr.decode()


def test_cli_jsonl_and_a_changed_input_is_refused(cluster, engine, tmp_path):
    source = tmp_path / "c.jsonl"
    texts = ["Open the file.", "Save the changes!", "Close the window."]
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    run = run_cli("translate", "--input", str(source), "--output", str(tmp_path / "o.jsonl"), "--ray", cluster,
                  "--threads", "1", "--quiet")
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    out = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["translation"] for r in out] == engine.translate(texts) and [r["id"] for r in out] == [0, 1, 2]
    parts = tmp_path / "x.txt.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"input": "elsewhere"}))
    run = run_cli("translate", "--input", str(source), "--output", str(tmp_path / "x.txt"), "--ray", cluster)
    assert run.returncode == 2 and "holds shards of a run with another input" in run.stderr.decode()


def test_ray_serve_two_replicas_one_killed_under_load(cluster, tmp_path):
    from benchmarks.load import free_port, offline_translations, pool_of_texts, run_load

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "pyengine", "serve", "--ray", cluster, "--replicas", "2",
                             "--threads", "1", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("Ray Serve did not answer /health")
        options = {"beam_size": 2, "max_decoding_length": 48}
        pool = pool_of_texts(32, seed=5)
        v1, libre = offline_translations("default", pool, options)
        replicas = serve_replicas()
        assert len(replicas) == 2
        killed_at: list[float] = []

        def kill() -> None:
            ray.kill(replicas[0])
            killed_at.append(time.monotonic())
        killer = threading.Timer(1.0, kill)
        killer.start()
        outcomes = run_load(url, clients=32, requests=3, pool=pool, options=options, seed=2, deadline_s=300)
        ended_at = time.monotonic()
        killer.join()
        assert killed_at and killed_at[0] < ended_at  # the replica died while the load ran
        assert len(outcomes) == 32 * 3  # every request answered: none hung
        answered = [o for o in outcomes if o.status == 200]
        failed = [o for o in outcomes if o.status != 200]
        for o in answered:
            want = [libre[o.texts[0]]] if o.endpoint == "/translate" else [v1[t] for t in o.texts]
            assert o.translations == want, (o.endpoint, o.texts)
        assert all(o.status >= 500 for o in failed), [(o.status, o.error) for o in failed]
        import collections
        kinds = collections.Counter((o.status, o.error[:120]) for o in failed)
        print(f"\nkilled a replica under load: {len(answered)} answered, {len(failed)} failed: {dict(kinds)}")
        assert len(failed) <= 32  # at most the requests in flight on the killed replica
        deadline = time.monotonic() + 120  # Serve starts a new replica
        while time.monotonic() < deadline and len(serve_replicas()) < 2:
            time.sleep(1)
        assert len(serve_replicas()) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_without_ray_the_entry_points_say_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from pyengine.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    for args in (["translate", "--input", "a.txt", "--output", "b.txt", "--ray"], ["serve", "--ray"]):
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=300, cwd=tmp_path)
        assert run.returncode == 2 and "pip install 'pyengine[ray]'" in run.stderr.decode(), run.stderr.decode()
    run = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None; "
                          "from pyengine.distributed import translate_dataset; translate_dataset(None)"],
                         capture_output=True, timeout=300)
    assert run.returncode == 1 and "pip install 'pyengine[ray]'" in run.stderr.decode()
