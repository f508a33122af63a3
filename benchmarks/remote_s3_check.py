"""A store on S3, checked by hand against a local S3 server (moto): upload, attach, train, analyse.

    pip install "moto[server]" s3fs      # not xdiff dependencies: without them the script skips
    python benchmarks/remote_s3_check.py [--tokens 6000] [--steps 200] [--workdir DIR]

Prints each step with its wall time. It builds the tiny test models and corpus, harvests them
into a local run, starts moto's S3 server on 127.0.0.1 and uploads the run's `activations/`
with s3fs (`put`; no aws CLI needed). Then, as a user on another machine would, it attaches a
new run to `s3://xdiff-check/planted/activations` (`xdiff harvest A B --store s3://…`), trains
and analyses it with the real CLI in subprocesses, the endpoint given only by the standard
`AWS_ENDPOINT_URL` (and once by fsspec's `FSSPEC_S3_ENDPOINT_URL`), the cache bounded to three
shards. Checks: the crosscoder trained from S3 equals the one trained on the local store with
the same flags; the cache never holds more than its bound at the end; a damaged shard on S3
stops training with one line naming it; a missing bucket is one line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "xdiff-check"
SHARD_GETS: list[str] = []  # moto's access-log lines of shard downloads


def _xdiff(*args: str, expect: int = 0, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run the real CLI in a fresh process: (seconds, output); stops the script on a surprise."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "xdiff_cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ))
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != expect:
        print(output)
        raise SystemExit(f"FAILED: xdiff {' '.join(args)} exited {proc.returncode}, expected {expect}")
    return seconds, output


def _last_line(output: str) -> str:
    return " ".join(output.strip().splitlines()[-1].split())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workdir", type=Path, help="keep models, runs and cache here (default: a temporary folder)")
    args = parser.parse_args()
    missing = [name for name in ("moto", "s3fs", "flask") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"skipped: needs {', '.join(missing)} (pip install \"moto[server]\" s3fs); nothing was checked")
        return
    with tempfile.TemporaryDirectory(prefix="xdiff-s3-") as temp:
        run(Path(args.workdir or temp), args.tokens, args.steps)


def run(work: Path, tokens: int, steps: int) -> None:
    from moto.server import ThreadedMotoServer

    from xdiff_cli.models.tiny import build_tiny_models, write_corpus_jsonl

    work.mkdir(parents=True, exist_ok=True)
    os.environ.update({"XDIFF_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
        os.environ.pop(name, None)
    start = time.perf_counter()
    models = build_tiny_models(work / "models", names=("llama", "qwen3"))
    corpus = write_corpus_jsonl(work / "corpus.jsonl", n_docs=300, n_chats=60)
    pair = [str(models["llama"]), str(models["qwen3"])]
    print(f"tiny models and corpus: {time.perf_counter() - start:.1f} s")
    harvest = ["--corpus", str(corpus), "--tokens", str(tokens), "--context-length", "128", "--harvest-batch-size", "16",
               "--eval-fraction", "0.25", "--quant", "none", "--device", "cpu", "--seed", "0", "-q"]
    train = ["--steps", str(steps), "--batch-size", "256", "--dict-size", "128", "--k", "8", "--exclusive-frac", "0.1",
             "--lr", "2e-3", "--device", "cpu", "-q"]
    seconds, _ = _xdiff("harvest", *pair, "--name", "local", *harvest)
    source = work / "home" / "runs" / "local" / "activations"
    manifest = json.loads((source / "manifest.json").read_text())
    shard_bytes = [entry["bytes"] for entry in manifest["shards"]]
    print(f"local harvest: {seconds:.1f} s, {manifest['n_tokens']:,} pairs in {len(shard_bytes)} shards "
          f"({sum(shard_bytes) / 1e6:.2f} MB)")

    import logging

    class CountShardGets(logging.Handler):  # moto's access log (werkzeug): count, don't print
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if '"GET /' in message and "/shards/shard-" in message:
                SHARD_GETS.append(message)

    access_log = logging.getLogger("werkzeug")
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    access_log.addHandler(CountShardGets())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"
        check(work, pair, source, manifest, train, steps)
    finally:
        server.stop()


def check(work: Path, pair: list[str], source: Path, manifest: dict, train: list[str], steps: int) -> None:
    import s3fs
    import torch
    from safetensors.torch import load_file

    s3 = s3fs.S3FileSystem()  # endpoint and keys from the environment, as xdiff's will be
    s3.mkdir(BUCKET)
    start = time.perf_counter()
    s3.put(str(source), f"{BUCKET}/planted/activations", recursive=True)
    uploaded = sorted(p.split("/planted/activations/", 1)[1] for p in s3.find(f"{BUCKET}/planted/activations"))
    url = f"s3://{BUCKET}/planted/activations"
    print(f"upload with s3fs put: {time.perf_counter() - start:.2f} s, {len(uploaded)} files at {url} "
          f"(endpoint AWS_ENDPOINT_URL={os.environ['AWS_ENDPOINT_URL']})")

    bound = 3 * max(entry["bytes"] for entry in manifest["shards"])
    os.environ["XDIFF_STORE_CACHE"] = str(bound)
    seconds, output = _xdiff("harvest", *pair, "--store", url, "--name", "by-s3", "--quant", "none", "--device", "cpu")
    assert url in "".join(output.split()), output
    print(f"xdiff harvest A B --store {url} --name by-s3: {seconds:.1f} s (checks the store, copies nothing)")
    timings = {}
    for name in ("local", "by-s3"):
        timings[name], _ = _xdiff("train", "--run", name, *train)
    n_train = manifest["eval_start_shard"]
    print(f"xdiff train --steps {steps}: local store {timings['local']:.1f} s, s3 store {timings['by-s3']:.1f} s "
          f"(cold cache, bound {bound / 1e6:.2f} MB = 3 shards; {len(SHARD_GETS)} shard downloads for "
          f"{n_train} training shards: each pass over them re-fetches what the bound evicted)")
    runs = work / "home" / "runs"
    one = load_file(str(runs / "local" / "crosscoder" / "final" / "model.safetensors"))
    two = load_file(str(runs / "by-s3" / "crosscoder" / "final" / "model.safetensors"))
    same = all(torch.equal(one[k], two[k]) for k in one) and one.keys() == two.keys()
    print(f"crosscoder from S3 equals the one from the local store: {same} ({len(one)} tensors)")
    assert same
    assert not (runs / "by-s3" / "activations").exists(), "the s3 run copied the store"
    cache = work / "home" / "cache" / "stores"
    cached = [p for p in cache.glob("*/shards/*") if not p.name.startswith(".")]
    used = sum(p.stat().st_size for p in cached)
    print(f"store cache after training: {len(cached)} shards, {used / 1e6:.2f} MB of {bound / 1e6:.2f} MB")
    assert used <= bound

    # The same from an empty cache bounded above the store: each shard is downloaded once.
    for copy in cache.glob("*/shards/*"):
        copy.unlink()
    os.environ["XDIFF_STORE_CACHE"] = "20G"
    _xdiff("harvest", *pair, "--store", url, "--name", "by-s3-wide", "--quant", "none", "--device", "cpu")
    before = len(SHARD_GETS)
    seconds, _ = _xdiff("train", "--run", "by-s3-wide", *train)
    three = load_file(str(runs / "by-s3-wide" / "crosscoder" / "final" / "model.safetensors"))
    print(f"again with the default bound (20G, above the store): {seconds:.1f} s, {len(SHARD_GETS) - before} shard "
          f"downloads; crosscoder equal: {all(torch.equal(one[k], three[k]) for k in one)}")
    os.environ["XDIFF_STORE_CACHE"] = str(bound)

    seconds, _ = _xdiff("analyze", "--run", "by-s3")
    print(f"xdiff analyze --run by-s3: {seconds:.1f} s")
    from xdiff_cli.run.runs import load_run

    assert load_run("by-s3").stage_done("analyze"), "analyze did not finish"

    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["FSSPEC_S3_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"]
    seconds, _ = _xdiff("harvest", *pair, "--store", url, "--name", "by-fsspec-env", "--quant", "none",
                        "--device", "cpu", env=env)
    print(f"the endpoint from FSSPEC_S3_ENDPOINT_URL instead: harvest --store attaches ({seconds:.1f} s)")

    name = manifest["shards"][0]["name"]
    path = f"{BUCKET}/planted/activations/shards/{name}"
    data = s3.cat_file(path)
    s3.pipe_file(path, data[:-1] + bytes([data[-1] ^ 0xFF]))
    for copy in cache.glob(f"*/shards/{name.removesuffix('.safetensors')}.*"):
        copy.unlink()
    _, output = _xdiff("train", "--run", "by-s3", *train, "--steps", str(steps + 1), expect=1)
    print(f"a damaged shard on S3, training again: exit 1, `{_last_line(output)}`")
    assert "does not match the store's manifest (checksum differs)" in output and "Traceback" not in output
    _, output = _xdiff("harvest", *pair, "--store", f"s3://no-such-bucket-{os.getpid()}/x/activations", "--name",
                       "nope", "--quant", "none", "--device", "cpu", expect=1)
    print(f"a missing bucket: exit 1, `{_last_line(output)}`")
    assert "Traceback" not in output
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_CONFIG_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    seconds, output = _xdiff("harvest", *pair, "--store", url, "--name", "nokeys", "--quant", "none", "--device", "cpu",
                             expect=1, env=env)
    print(f"no credentials: exit 1 after {seconds:.1f} s, `{_last_line(output)}`")
    assert "Traceback" not in output
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens there
    seconds, output = _xdiff("harvest", *pair, "--store", url, "--name", "noserver", "--quant", "none", "--device",
                             "cpu", expect=1, env=env)
    print(f"an endpoint that does not answer: exit 1 after {seconds:.1f} s, `{_last_line(output)}`")
    assert "Traceback" not in output
    print("all checks passed")


if __name__ == "__main__":
    main()
