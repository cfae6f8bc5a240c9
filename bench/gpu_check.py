"""The GPU check: a neuron on `cuda-dev-0`, a chat through its API, and P2 against HF generate().

Made for a lent GPU machine with torch and transformers and no registry, in a 15-minute budget
(docs/benchmarks.md, "GPU check"): installs what is missing from carried wheels (bench/gpu_wheels.py),
builds a random-weight ~1B Llama in bf16 on the GPU (bench/random_llama.py), starts `cortex neuron`
on it, sends one chat, then at each level of streams times the neuron (streamed greedy chats,
aggregate tokens/s, TTFT) against one static `generate()` batch of that many prompts on the same
GPU and weights; last, issue #15's P2 mixed scenario (bench/gpu_mixed.py). Results go to
`<out>/gpu-check.json`, rewritten after every phase, so a run cut short still leaves what it
measured. `--device cpu-0 --size tiny` is the CI run of the same path.

    make gpu-wheels     # here: the wheels, into .gpu-wheels/ (ignored, ~16 MiB)
    make gpu-check      # there: OUT=<folder> (default gpu-check-out/)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def sources() -> list[Path]:
    """The folders the `cortex` namespace package is built from (pyproject.toml's wheel
    `sources`), put on the path instead of installing cortex on the GPU machine."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [
        ROOT / part for part in project["tool"]["hatch"]["build"]["targets"]["wheel"]["sources"]
    ]


SOURCES = sources()
MODEL = "gpu-check-llama"
LEVELS = (1, 16, 64)


class Check:
    """The JSON being filled in, and the budget it must fit."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s = out, budget_s
        self.started = time.perf_counter()
        self.data: dict[str, Any] = {"phases": {}, "errors": []}
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def phase(self, name: str, value: Any) -> None:
        self.data["phases"][name] = value
        self.data["elapsed_s"] = self.elapsed()
        self.write()
        print(f"[{self.elapsed():6.1f}s] {name}: {json.dumps(value)[:300]}", flush=True)

    def write(self) -> None:
        path = self.out / "gpu-check.json"
        path.write_text(json.dumps(self.data, indent=1, default=str))


def machine(device: str) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": props.total_memory / 2**30}
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def neuron(
    workdir: Path, model_dir: Path, device: str, dtype: str, max_running: int, kv_tokens: int
) -> Any:
    """A `cortex neuron` process on `device` that preloads the random model."""
    from bench.processes import ServerProcess, cortex_cli, free_port

    port = free_port()
    config = workdir / "neuron.toml"
    config.write_text(
        f'[neuron]\nport = {port}\ndevices = ["{device}"]\ndtype = "{dtype}"\n'
        f'max_running = {max_running}\ncache_dir = "{workdir / "cache"}"\n'
        f"kv_tokens = {kv_tokens}\n"
    )
    argv = [*cortex_cli(), "neuron", "--config", str(config)]
    argv += ["--preload", f"{MODEL}=file:{model_dir}"]
    path = os.pathsep.join([str(p) for p in SOURCES] + [os.environ.get("PYTHONPATH", "")])

    def ready(client: Any) -> bool:
        models = client.get("/status").json().get("models", [])
        return any(m["id"] == MODEL and m["state"] == "ready" for m in models)

    return ServerProcess(
        "gpu-check-neuron",
        argv,
        ready,
        base_url=f"http://127.0.0.1:{port}",
        env={"PYTHONPATH": path},
        startup_timeout=300,
    )


def status(base_url: str) -> dict[str, Any]:
    """What the neuron says of its devices and of the model (where it sits, its memory)."""
    import httpx

    answer = httpx.get(base_url + "/status", timeout=30).json()
    model = next(m for m in answer["models"] if m["id"] == MODEL)
    return {"devices": answer.get("devices"), "model": model}


def chat(base_url: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    import httpx

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    started = time.perf_counter()
    answer = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120).json()
    return {
        "wall_s": time.perf_counter() - started,
        "content": answer["choices"][0]["message"]["content"][:200],
        "usage": answer["usage"],
        "finish_reason": answer["choices"][0]["finish_reason"],
    }


async def stream_level(base_url: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat per prompt, all at once: aggregate tokens/s and TTFT."""
    import asyncio

    import httpx

    from bench.gpu_mixed import stream_chat

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(stream_chat(client, MODEL, p, max_tokens) for p in prompts)
        )
        wall = time.perf_counter() - started
    ttfts = sorted(r.ttft for r in results)
    tokens = sum(r.tokens for r in results)
    return {
        "streams": len(prompts),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": ttfts[len(ttfts) // 2] * 1000,
        "ttft_max_ms": ttfts[-1] * 1000,
    }


def hf_generate(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """One static, left-padded, greedy generate() batch of every prompt, to max_tokens each."""
    import torch

    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in prompts
    ]
    ids = [tokenizer.encode(r, add_special_tokens=False) for r in rows]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    sync()
    wall = time.perf_counter() - started
    tokens = int(output[:, width:].numel())
    return {"batch": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def compare(check: Check, args: argparse.Namespace, model_dir: Path, base_url: str) -> None:
    """At each level: the neuron's streams, then one generate() batch of the same prompts."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.random_llama import SIZES, prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = getattr(torch, args.dtype)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    reference.to(args.torch_device).eval()
    texts = prompts(max(args.levels), args.prompt_words, SIZES[args.size]["vocab_size"])
    hf_generate(reference, tokenizer, texts[:1], 4)  # warm-up: kernels, allocator
    levels = check.data.setdefault("levels", [])
    for streams in args.levels:
        if check.elapsed() > args.budget_s * 0.8:
            check.data["errors"].append(f"budget: skipped {streams} streams and beyond")
            break
        served = asyncio.run(stream_level(base_url, texts[:streams], args.max_tokens))
        generated = hf_generate(reference, tokenizer, texts[:streams], args.max_tokens)
        ratio = served["tokens_per_s"] / generated["tokens_per_s"]
        levels.append({"streams": streams, "neuron": served, "generate": generated, "x": ratio})
        check.phase(f"{streams} streams", {"neuron x generate()": round(ratio, 3)})


def mixed_phase(check: Check, args: argparse.Namespace, base_url: str) -> None:
    """Issue #15's P2 mixed scenario (bench/gpu_mixed.py): shorts alone, beside the long
    streams, then the longs alone."""
    from bench.gpu_mixed import mixed
    from bench.random_llama import SIZES, prompts

    if check.elapsed() > args.budget_s * 0.8:
        check.data["errors"].append("budget: skipped the mixed phase")
        return
    vocab = SIZES[args.size]["vocab_size"]
    shorts = prompts(args.mixed_shorts, args.prompt_words, vocab)
    # one word is one token of the random model's tokenizer; other seeds: no shared prefix
    longs = [prompts(1, n, vocab, seed=n)[0] for n in args.long_tokens]
    result = mixed(base_url, MODEL, shorts, longs, args.max_tokens, args.long_max_tokens)
    check.data["mixed"] = {"long_prompt_tokens": args.long_tokens, **result}
    summary = {"shorts mixed/alone": round(result["shorts_ratio"], 3)}
    summary["longs mixed/alone"] = [round(r, 3) for r in result["longs_ratio"]]
    check.phase("mixed", summary)


def kv_tokens(args: argparse.Namespace) -> int:
    """Room for every stream's prompt and output at once, the largest level's or the mixed
    phase's, plus the quarter the neuron keeps for prefixes (the default admits ~12k tokens)."""
    short = args.prompt_words + 16 + args.max_tokens  # the template's few tokens, rounded up
    levels = max(args.levels) * max(512, short)
    mixed = args.mixed_shorts * short + sum(args.long_tokens)
    mixed += len(args.long_tokens) * (16 + args.long_max_tokens)
    return max(16384, levels, mixed * 4 // 3 + 1024)


def run(check: Check, args: argparse.Namespace) -> None:
    check.phase("installed", {"from_wheels": install(args.wheels)})
    for path in SOURCES:  # the repo's namespace package, without installing cortex
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from bench.random_llama import build

    check.data["machine"] = machine(args.device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        workdir = Path(scratch)
        model_dir = workdir / "model"
        context = max(args.long_tokens) + args.long_max_tokens + 64  # the longest stream fits
        built = build(model_dir, args.size, args.torch_device, args.dtype, context)
        check.phase("model", built)
        running = max(*args.levels, args.mixed_shorts + len(args.long_tokens))
        server = neuron(workdir, model_dir, args.device, args.dtype, running, kv_tokens(args))
        try:
            server.start()
            check.phase("neuron ready", {"startup_s": server.startup_s, **status(server.base_url)})
            check.phase("chat", chat(server.base_url, "w1 w2 w3 say hello", 16))
            compare(check, args, model_dir, server.base_url)
            mixed_phase(check, args, server.base_url)
        finally:
            server.stop()
            check.data["neuron_log_tail"] = server.tail(40)
            check.write()


def install(wheels: Path | None) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from bench.gpu_wheels import install_missing

    return install_missing(wheels, fallback=Path(tempfile.gettempdir()) / "cortex-gpu-site")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench gpu-check", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check-out"))
    parser.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--device", default="cuda-dev-0", help="cuda-dev-0, or cpu-0 (CI)")
    parser.add_argument("--size", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop adding phases after")
    parser.add_argument("--mixed-shorts", type=int, default=16, help="short streams, mixed phase")
    parser.add_argument(
        "--long-tokens",
        default=None,
        help="mixed phase's long prompts (1b: 2000,6000; tiny: 200,600)",
    )
    parser.add_argument("--long-max-tokens", type=int, default=None, help="default 3x max tokens")
    args = parser.parse_args(argv)
    args.levels = [int(n) for n in str(args.levels).split(",")]
    longs = args.long_tokens or ("2000,6000" if args.size == "1b" else "200,600")
    args.long_tokens = [int(n) for n in str(longs).split(",")]
    args.long_max_tokens = args.long_max_tokens or 3 * args.max_tokens  # outlast the shorts
    cuda = args.device.startswith("cuda-dev-")
    args.torch_device = f"cuda:{args.device.removeprefix('cuda-dev-')}" if cuda else "cpu"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    check = Check(args.out, args.budget_s)
    check.data["args"] = {k: str(v) for k, v in vars(args).items()}
    try:
        run(check, args)
    except BaseException as exc:  # recorded, then raised: the JSON says how far it got
        check.data["errors"].append(f"{type(exc).__name__}: {exc}")
        check.write()
        raise
    finally:
        check.data["elapsed_s"] = check.elapsed()
        check.write()
    return 0 if not check.data["errors"] else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main(sys.argv[1:]))
