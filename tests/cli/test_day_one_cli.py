"""Day one at the command line, run as a user runs it (the real `cortex` in a subprocess): the
usual mistakes each give one line on stderr and a non-zero exit, never a traceback; `cortex
config check` reads the seed's files; `cortex cache` lists and prunes conversions."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cortex_up import cortex_up

from cortex.core import weights_cache

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed"


def cortex(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": os.environ.get("HOME", "/tmp")}
    env = {k: v for k, v in env.items() if not k.startswith("CORTEX_")}
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exactly one line on stderr, and no traceback."""
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("command", ["gateway", "up"])
@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_gateway_on_a_taken_port(command: str, flag: str, taken_port: int) -> None:
    other = "--metrics-port" if flag == "--port" else "--port"
    line = one_line_error(cortex(command, flag, str(taken_port), other, str(free_port())))
    assert f"127.0.0.1:{taken_port}: already in use" in line and f"({flag})" in line


def test_neuron_on_a_taken_port(taken_port: int) -> None:
    line = one_line_error(cortex("neuron", "--port", str(taken_port)))
    assert f"127.0.0.1:{taken_port}: already in use" in line


def test_preload_of_an_unknown_model_says_how_to_name_its_source() -> None:
    typo = one_line_error(cortex("neuron", "--preload", "smollm2-135m-instrct"))
    assert "preload: model 'smollm2-135m-instrct'" in typo
    assert "--preload MODEL=SOURCE" in typo and "did you mean smollm2-135m-instruct?" in typo


def test_neuron_help_shows_preload_with_a_source() -> None:
    assert "MODEL[=SOURCE]" in cortex("neuron", "--help").stdout


class NotCortex(http.server.BaseHTTPRequestHandler):
    """Some other web service: JSON of another shape on one path, HTML 404s elsewhere."""

    def do_GET(self) -> None:
        body, status = (
            (b'["not", "a", "fleet"]', 200) if self.path == "/fleet" else (b"<h1>no</h1>", 404)
        )
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("fleet_answers", [True, False])
def test_status_against_a_port_that_is_not_cortex(fleet_answers: bool) -> None:
    handler = NotCortex if fleet_answers else http.server.SimpleHTTPRequestHandler
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        line = one_line_error(cortex("status", "--endpoint", endpoint))
    finally:
        server.shutdown()
    # Neither its /fleet (JSON of another shape, or a 404) nor its /status (a 404) is cortex's.
    assert line == f"cortex: {endpoint} answered 404 for /status: is it a cortex gateway or neuron?"


def test_a_missing_models_file_names_the_key_and_the_file(tmp_path: Path) -> None:
    config = tmp_path / "cortex.toml"
    config.write_text('[gateway]\nmodels_file = "nowhere.toml"\n')
    for command in (("gateway", "--config", str(config)), ("config", "check", str(config))):
        line = one_line_error(cortex(*command))
        assert (
            line
            == f"cortex: {config}: gateway.models_file: {tmp_path / 'nowhere.toml'}: no such file"
        )


def test_config_check_reads_the_seed_files_as_they_are() -> None:
    done = cortex("config", "check", str(SEED / "cortex.toml"))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "valid cortex.toml" in out and "models from" in out
    assert "seed key models_config -> gateway.models_file" in out
    assert "vram_mb -> memory (MiB)" in out and "residency_priority -> priority" in out
    assert "min_device_vram_mb: not supported, ignored" in out
    assert "model smollm2-135m-instruct (chat)" in out and "aliases small" in out
    assert "memory 1024 MiB" in out and "priority 10" in out
    assert "limits context 8192, input 7168, output 1024" in out
    assert "cost/Mtok in 0.05 out 0.1 cache read 0.01 write 0.06" in out
    models = cortex("config", "check", str(SEED / "models.toml"))
    assert "valid models.toml" in models.stdout and "aliases embed" in models.stdout
    neuron = cortex("config", "check", str(ROOT / "examples" / "neuron.toml"))
    assert neuron.returncode == 0 and "valid neuron.toml" in neuron.stdout


def test_config_check_names_a_bad_seed_key(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nid = "a"\nsource = "hf:x/a"\nlimit = { context = 10, outptu = 5 }\n'
        '[aliases]\nb = "c"\n'
    )
    line = one_line_error(cortex("config", "check", str(models)))
    assert line == f"cortex: {models}: aliases.b: 'c' is no [[models]] id"
    models.write_text('[[models]]\nid = "a"\nsource = "hf:x/a"\nlimit = { outptu = 5 }\n')
    line = one_line_error(cortex("config", "check", str(models)))
    assert "models[0].limit: unknown key" in line
    models.write_text('[[models]]\nid = "a"\nsource = "hf:x/a"\nvram_mb = "lots"\n')
    line = one_line_error(cortex("config", "check", str(models)))
    assert line == f"cortex: {models}: models[0].vram_mb: expected a number of MiB, got 'lots'"


def test_conversions_are_keyed_by_content(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, second = tmp_path / "venv-a" / "m.gguf", tmp_path / "venv-b" / "m.gguf"
    for gguf in (first, second):
        gguf.parent.mkdir()
        gguf.write_bytes(b"GGUF" + b"\0" * 1000)
    assert weights_cache.conversion_dir(first, cache) == weights_cache.conversion_dir(second, cache)
    # Hashed once: while path, size and mtime match, the remembered hash is used.
    stat = first.stat()
    remembered = weights_cache.content_hash(first, cache)
    first.write_bytes(b"GGUF" + b"\1" * 1000)
    os.utime(first, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_cache.content_hash(first, cache) == remembered
    first.write_bytes(b"GGUF" + b"\2" * 1000)  # a new mtime: hashed again
    assert weights_cache.content_hash(first, cache) != remembered


def test_cache_list_and_prune(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kept, gone = tmp_path / "kept.gguf", tmp_path / "gone.gguf"
    kept.write_bytes(b"kept")
    gone.write_bytes(b"gone")
    for gguf in (kept, gone):
        conversion = weights_cache.conversion_dir(gguf, cache)
        conversion.mkdir(parents=True)
        (conversion / "model.safetensors").write_bytes(b"\0" * 2**20)
        weights_cache.record_source(conversion, gguf)
    gone.unlink()
    listing = cortex("cache", "--cache-dir", str(cache), "list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert any(line.startswith("kept-") and "orphaned" not in line for line in lines)
    assert any(line.startswith("gone-") and "(orphaned)" in line for line in lines)
    assert str(kept) in listing.stdout
    pruned = cortex("cache", "--cache-dir", str(cache), "prune")
    assert pruned.stdout.strip() == "removed 1 conversions (1 MiB)"
    after = cortex("cache", "--cache-dir", str(cache), "list").stdout
    assert "kept-" in after and "gone-" not in after
    cortex("cache", "--cache-dir", str(cache), "prune", "--all")
    assert "no conversions" in cortex("cache", "--cache-dir", str(cache), "list").stdout


def test_preload_model_equals_source_becomes_a_catalogue_entry(tmp_path: Path) -> None:
    from cortex.cli.commands import neuron_config
    from cortex.cli.main import _parser

    gguf = tmp_path / "mine.gguf"
    args = _parser().parse_args(["neuron", "--preload", f"mine=file:{gguf}", "smollm2"])
    config = neuron_config(args)
    assert config.neuron.preload == ["mine", "smollm2"]
    assert [(m.id, m.source) for m in config.models] == [("mine", f"file:{gguf}")]


def test_gateway_prints_its_banner_on_start() -> None:
    port, metrics = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    argv = [
        sys.executable,
        "-m",
        "cortex.cli",
        "gateway",
        "--config",
        str(SEED / "cortex.toml"),
    ]
    argv += ["--port", str(port), "--metrics-port", str(metrics)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    watchdog = threading.Timer(60, proc.kill)  # a missing banner line fails, never hangs
    watchdog.start()
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(6)]  # blocks until printed, or EOF
        # Both servers (API and metrics) up, then Ctrl-C: a clean stop, no traceback.
        for url in (f"http://127.0.0.1:{port}/livez", f"http://127.0.0.1:{metrics}/metrics"):
            while True:
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)  # polling a starting process's port; the watchdog bounds it
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    text = "".join(banner)
    assert f"API      http://127.0.0.1:{port}/v1" in text
    assert f"metrics  http://127.0.0.1:{metrics}/metrics" in text
    assert f"config   {SEED / 'cortex.toml'}" in text
    assert "model    smollm2-135m-instruct (chat)" in text
    assert "model    all-minilm-l6-v2 (embedding)" in text
    assert "no [[neurons]] in the config" in err and "Traceback" not in err


class SinglePageApp(http.server.BaseHTTPRequestHandler):
    """A web app answering every path with 200 and HTML."""

    def _html(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body>app</body></html>")

    do_GET = do_POST = _html

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("action", [["list"], ["unload", "m"], ["load", "m"]])
def test_models_against_a_port_that_is_not_cortex(action: list[str]) -> None:
    """Not a gateway is not yet a neuron: a 200 of HTML was read as a neuron (a traceback for
    list, 'unloaded m' for unload)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SinglePageApp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        line = one_line_error(cortex("models", *action, "--endpoint", endpoint))
    finally:
        server.shutdown()
    assert line == f"cortex: {endpoint} is not a cortex gateway or neuron"


def test_ctrl_c_stops_cortex_up_cleanly(tmp_path: Path, model_cache: Path) -> None:
    """Ctrl-C: the gateway's two servers and the in-process neuron stop, the neuron's models are
    unloaded, no traceback, exit 130 (uvicorn used to re-raise the signal into the next server
    still stopping, which cancelled its lifespan mid-shutdown)."""
    with cortex_up(tmp_path, model_cache) as up:
        up.process.send_signal(signal.SIGINT)
        code = up.process.wait(timeout=60)
    log = up.log.read_text()
    assert code == 130 and "Traceback" not in log and "neuron stopped: " in log, log[-3000:]


def test_a_file_model_added_on_sighup_loads_under_cortex_up(
    tmp_path: Path, model_cache: Path
) -> None:
    """SIGHUP under `cortex up` reaches its neuron too: a `file:` model the reload adds is an
    allowed path there (it was a 404 "outside this neuron's allowed_paths" until a restart)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "neuron"))
    from tiny_models import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny")
    with cortex_up(tmp_path, model_cache, config="[gateway]\n") as up:
        (tmp_path / "cortex.toml").write_text(f"[[models]]\nid = 'tiny'\nsource = 'file:{tiny}'\n")
        up.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "config reloaded" not in up.log.read_text():
            assert time.monotonic() < deadline and up.process.poll() is None, up.log.read_text()
            time.sleep(0.05)  # polling the process's log for the reload's line
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
        answer = httpx.post(f"{up.url}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert "local neuron: models: added tiny" in up.log.read_text()
