"""P1 gateway overhead: one stub backend, reached directly, through cortex and through LiteLLM's proxy.

Each server runs in its own process beside the stub, one proxy at a time; the load comes from this
process (aiohttp). Latency is sequential requests on one kept-alive connection (p50/p99); max
requests/s is `--total` requests from `--concurrency` workers. Added latency is a proxy's
percentile minus the direct one. p99 at half load: requests started at a steady half of the
measured max requests/s (open loop). Server CPU per request: the proxy process's CPU time (/proc)
over the max requests/s run. Anthropic translation overhead is /v1/messages minus
/v1/chat/completions through the same proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench import machine
from bench.loadgen import Call, latencies, paced, percentile, throughput
from bench.processes import PYTHON, ROOT, ServerFailed, ServerProcess, cortex_cli, free_port
from bench.report import Report, publish
from bench.stub_backend import STUB_MODEL

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LITELLM_VENV = ROOT / ".venv-litellm"
MESSAGES = [{"role": "user", "content": "Say hello."}]


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    body: dict[str, Any]
    openai: bool  # an OpenAI route (the direct stub answers only these)


SCENARIOS = (
    Scenario(
        "openai",
        "/v1/chat/completions",
        {"model": STUB_MODEL, "messages": MESSAGES, "max_tokens": 16},
        True,
    ),
    Scenario(
        "openai-stream",
        "/v1/chat/completions",
        {"model": STUB_MODEL, "messages": MESSAGES, "max_tokens": 16, "stream": True},
        True,
    ),
    Scenario(
        "anthropic",
        "/v1/messages",
        {"model": STUB_MODEL, "messages": MESSAGES, "max_tokens": 16},
        False,
    ),
    Scenario(
        "anthropic-stream",
        "/v1/messages",
        {"model": STUB_MODEL, "messages": MESSAGES, "max_tokens": 16, "stream": True},
        False,
    ),
)


@dataclass
class Sizes:
    requests: int  # sequential, for latency
    total: int  # concurrent, for throughput
    concurrency: int
    warmup: int
    paced: int  # requests at half the max requests/s, for the p99 under load


@dataclass
class Measured:
    """One target on one scenario."""

    target: str
    scenario: str
    p50_ms: float
    p99_ms: float
    first_byte_p50_ms: float
    requests_per_s: float
    errors: int
    client_cpu_ms_per_request: float
    half_load_p99_ms: float  # p99 with requests started at half of requests_per_s
    server_cpu_ms_per_request: float | None  # the proxy's own CPU time per request (not direct)
    added: dict[str, float] = field(default_factory=dict)


async def measure(
    target: str,
    base_url: str,
    scenarios: list[Scenario],
    sizes: Sizes,
    cpu: Callable[[], float] | None = None,
) -> list[Measured]:
    """Latency of all scenarios interleaved, then each scenario's throughput on its own (with
    the server's CPU time over it, when `cpu` reads it), then its p99 at half that rate."""
    calls = [Call.json(base_url + s.path, s.body) for s in scenarios]
    per_call = await latencies(calls, sizes.requests, sizes.warmup)
    results = []
    for scenario, call, timings in zip(scenarios, calls, per_call, strict=True):
        totals = [t.total * 1000 for t in timings]
        used = cpu() if cpu is not None else 0.0
        load = await throughput(call, sizes.total, sizes.concurrency, sizes.warmup)
        served = sizes.total + min(sizes.warmup, sizes.concurrency)
        server_cpu = (cpu() - used) * 1000 / served if cpu is not None else None
        half = await paced(call, max(load.per_second / 2, 1.0), sizes.paced)
        results.append(
            Measured(
                target=target,
                scenario=scenario.name,
                p50_ms=percentile(totals, 50),
                p99_ms=percentile(totals, 99),
                first_byte_p50_ms=percentile([t.first_byte * 1000 for t in timings], 50),
                requests_per_s=load.per_second,
                errors=load.errors,
                client_cpu_ms_per_request=load.client_cpu_seconds * 1000 / load.requests,
                half_load_p99_ms=percentile([t.total * 1000 for t in half], 99),
                server_cpu_ms_per_request=server_cpu,
            )
        )
    return results


def stub_server(port: int) -> ServerProcess:
    argv = [PYTHON, "-m", "bench.stub_backend", "--port", str(port)]
    return ServerProcess("stub", argv, _get("/health"), base_url=f"http://127.0.0.1:{port}")


def cortex_server(stub_port: int, workdir: Path) -> ServerProcess:
    port, metrics_port = free_port(), free_port()
    config = workdir / "cortex.toml"
    config.write_text(
        "[gateway]\n"
        f'listen = "127.0.0.1:{port}"\n'
        f'metrics_listen = "127.0.0.1:{metrics_port}"\n'
        "[[neurons]]\n"
        'name = "stub"\n'
        f'endpoint = "http://127.0.0.1:{stub_port}"\n'
    )
    argv = [*cortex_cli(), "gateway", "--config", str(config)]
    return ServerProcess("cortex", argv, _chat_ok(), base_url=f"http://127.0.0.1:{port}")


def litellm_server(venv: Path, stub_port: int, workdir: Path) -> ServerProcess:
    """LiteLLM's proxy, one worker, no auth (as cortex here), routing `stub` to the stub."""
    port = free_port()
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {STUB_MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{STUB_MODEL}\n"
        f"      api_base: http://127.0.0.1:{stub_port}/v1\n"
        "      api_key: sk-stub\n"
        "general_settings:\n"
        "  dangerously_permit_weak_or_unset_master_key: true\n"
        "litellm_settings:\n"
        # /v1/messages for openai/ models goes to the Responses API by default; the stub (like
        # a neuron) speaks chat completions, which is also what cortex translates to.
        "  use_chat_completions_url_for_anthropic_messages: true\n"
        "router_settings:\n"
        "  disable_cooldowns: true\n"
    )
    argv = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num_workers", "1"]
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no network: do not fetch the price list
        "LITELLM_USE_CHAT_COMPLETIONS_URL_FOR_ANTHROPIC_MESSAGES": "True",
    }
    return ServerProcess(
        "litellm",
        argv,
        _chat_ok(),
        base_url=f"http://127.0.0.1:{port}",
        env=env,
        startup_timeout=180,
    )


def _get(path: str) -> Callable[[httpx.Client], bool]:
    return lambda client: client.get(path).status_code == 200


def _chat_ok() -> Callable[[httpx.Client], bool]:
    """Ready when a chat completion for the stub model goes through end to end."""
    body = SCENARIOS[0].body
    return lambda client: client.post("/v1/chat/completions", json=body).status_code == 200


def ensure_litellm(venv: Path) -> str | None:
    """Create the LiteLLM venv on first use (kept apart: its pins would fight ours); None if ready."""
    if (venv / "bin" / "litellm").exists():
        return None
    print(f"installing litellm[proxy] into {venv} (first use only) ...", flush=True)
    steps = [
        [PYTHON, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`{' '.join(step)}` failed: {exc}"
        if done.returncode != 0:
            return f"`{' '.join(step)}` exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return None


async def run_target(
    name: str, server: ServerProcess, scenarios: list[Scenario], sizes: Sizes
) -> list[Measured]:
    with server:
        print(f"measuring {name} ({server.base_url}) ...", flush=True)
        return await measure(name, server.base_url, scenarios, sizes, server.cpu_seconds)


def litellm_version(venv: Path) -> str:
    probe = "import importlib.metadata as m; print(m.version('litellm'))"
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True
    )
    return done.stdout.strip() or "unknown"


async def run(sizes: Sizes, use_litellm: bool, venv: Path) -> tuple[list[Measured], list[str]]:
    results: list[Measured] = []
    notes: list[str] = []
    openai = [s for s in SCENARIOS if s.openai]
    with (
        tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp,
        stub_server(free_port()) as stub,
    ):
        stub_port = int(stub.base_url.rsplit(":", 1)[1])
        print(f"measuring direct ({stub.base_url}) ...", flush=True)
        results += await measure("direct", stub.base_url, openai, sizes)
        results += await run_target(
            "cortex", cortex_server(stub_port, Path(tmp)), list(SCENARIOS), sizes
        )
        missing = ensure_litellm(venv) if use_litellm else "skipped (--no-litellm)"
        if missing is None:
            try:
                results += await run_target(
                    "litellm", litellm_server(venv, stub_port, Path(tmp)), list(SCENARIOS), sizes
                )
                notes.append(
                    f"LiteLLM {litellm_version(venv)} (litellm[proxy], one worker, from {venv})"
                )
            except ServerFailed as exc:
                missing = str(exc)
        if missing is not None:
            notes.append(f"LiteLLM not measured: {missing}")
    return results, notes


def add_overheads(results: list[Measured]) -> None:
    """Added latency against the direct run of the same OpenAI scenario (stream or not)."""
    direct = {m.scenario: m for m in results if m.target == "direct"}
    for m in results:
        base = direct.get(m.scenario.replace("anthropic", "openai"))
        if base is not None and m.target != "direct":
            m.added = {"p50_ms": m.p50_ms - base.p50_ms, "p99_ms": m.p99_ms - base.p99_ms}


def verdicts(results: list[Measured]) -> list[str]:
    """The issue's targets, each with the figure behind it, met or not."""
    found = {(m.target, m.scenario): m for m in results}
    lines = []
    cortex, litellm = found.get(("cortex", "openai")), found.get(("litellm", "openai"))
    if cortex is not None:
        added = cortex.added["p50_ms"]
        lines.append(
            f"target added p50 <= 1 ms (non-stream): {added:.2f} ms -> {'met' if added <= 1 else 'NOT met'}"
        )
    if cortex is not None and litellm is not None:
        ratio = cortex.requests_per_s / litellm.requests_per_s
        lines.append(
            f"target cortex req/s >= 5x LiteLLM (non-stream): {ratio:.2f}x -> {'met' if ratio >= 5 else 'NOT met'}"
        )
    for m in results:
        if m.server_cpu_ms_per_request is not None:
            lines.append(
                f"{m.target} {m.scenario}: p99 at half its max req/s {m.half_load_p99_ms:.2f} ms, "
                f"server CPU {m.server_cpu_ms_per_request:.3f} ms/request"
            )
    for target in ("cortex", "litellm"):
        for stream in ("", "-stream"):
            openai, anthropic = (
                found.get((target, "openai" + stream)),
                found.get((target, "anthropic" + stream)),
            )
            if openai and anthropic:
                lines.append(
                    f"{target} Anthropic translation overhead ({'stream' if stream else 'non-stream'}): "
                    f"p50 {anthropic.p50_ms - openai.p50_ms:+.2f} ms, "
                    f"req/s {anthropic.requests_per_s:.0f} vs {openai.requests_per_s:.0f}"
                )
    return lines


def draw(results: list[Measured]) -> Callable[[Figure], None]:
    def plot(figure: Figure) -> None:
        latency, rate = figure.subplots(1, 2)
        labels = [f"{m.target}\n{m.scenario}" for m in results]
        xs = range(len(results))
        latency.bar([x - 0.2 for x in xs], [m.p50_ms for m in results], 0.4, label="p50")
        latency.bar([x + 0.2 for x in xs], [m.p99_ms for m in results], 0.4, label="p99")
        latency.set_xticks(list(xs), labels, fontsize=7, rotation=45, ha="right")
        latency.set_ylabel("ms per request (sequential)")
        latency.legend()
        rate.bar(list(xs), [m.requests_per_s for m in results], color="tab:green")
        rate.set_xticks(list(xs), labels, fontsize=7, rotation=45, ha="right")
        rate.set_yscale("log")
        rate.set_ylabel("max requests/s (log scale)")

    return plot


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench gateway", description=__doc__)
    parser.add_argument("--requests", type=int, default=500, help="sequential requests for latency")
    parser.add_argument("--total", type=int, default=2000, help="requests for max requests/s")
    parser.add_argument("--concurrency", type=int, default=32, help="workers for max requests/s")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--paced", type=int, default=1000, help="requests at half max req/s")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM (no install)")
    parser.add_argument("--litellm-venv", type=Path, default=LITELLM_VENV)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.total, args.concurrency, args.warmup, args.paced = 20, 40, 4, 3, 20
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    sizes = Sizes(args.requests, args.total, args.concurrency, args.warmup, args.paced)
    info = machine.describe(**machine.versions("cortex", "fastapi", "uvicorn", "aiohttp"))
    watch = machine.CpuWatch()
    results, notes = asyncio.run(run(sizes, not args.no_litellm, args.litellm_venv))
    cpu = {"run": watch.shares()}
    add_overheads(results)
    notes = [*verdicts(results), *notes, machine.cpu_note(cpu)]
    columns = [
        "target",
        "scenario",
        "p50 ms",
        "p99 ms",
        "added p50 ms",
        "added p99 ms",
        "max req/s",
        "errors",
        "client cpu ms/req",
        "p99 ms at half load",
        "server cpu ms/req",
    ]
    rows = [
        [
            m.target,
            m.scenario,
            m.p50_ms,
            m.p99_ms,
            m.added.get("p50_ms", "-"),
            m.added.get("p99_ms", "-"),
            m.requests_per_s,
            m.errors,
            m.client_cpu_ms_per_request,
            m.half_load_p99_ms,
            m.server_cpu_ms_per_request if m.server_cpu_ms_per_request is not None else "-",
        ]
        for m in results
    ]
    publish(
        Report(
            name="gateway",
            title="P1 gateway overhead (stub backend): direct vs cortex vs LiteLLM",
            columns=columns,
            rows=rows,
            data={
                "machine": info,
                "cpu_shares": cpu,
                "sizes": vars(sizes),
                "results": [vars(m) for m in results],
            },
            notes=notes,
            draw=draw(results),
        )
    )
    return 1 if any(m.errors for m in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
