"""The llama.cpp baseline: llama-cpp-python on a GGUF, timed the way benchmarks/decode.py times our engine.

llama-cpp-python is an optional extra (`pip install '.[llamacpp]'`, pinned; it compiles llama.cpp from source
in a few minutes; `make bench` installs it). One sequence at a time (its high-level API has no batching):
the prompt's token ids are evaluated, then `max_new_tokens` greedy tokens are generated, past any end token,
so both engines produce the same number of tokens.

    python -m llmengine_runtime.benchmarks.llamacpp path/to/model.gguf --prompt "1, 2, 3," --max-new-tokens 128 \
        --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"  # the pinned baseline; pyproject.toml's [llamacpp] extra names the same


@dataclass
class LlamaCppRun:
    ttft: float  # seconds: prompt evaluation + the first token
    decode_time: float  # first token -> last token
    decode_tokens: int
    token_ids: list[int]


def load(gguf: Path, threads: int, n_ctx: int = 4096):
    """A llama_cpp.Llama on `gguf` with `threads` threads (for prompt and generation alike), or SystemExit
    saying how to install the baseline."""
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("the llama.cpp baseline needs llama-cpp-python: pip install '.[llamacpp]' "
                         "(compiles llama.cpp, a few minutes; `make bench` does it)") from None
    return llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           n_batch=512, verbose=False, seed=0, logits_all=False)


def run_llamacpp(llm, prompt_ids: list[int], max_new_tokens: int) -> LlamaCppRun:
    """Greedy generation of exactly `max_new_tokens` tokens after `prompt_ids` (no stop token), timed."""
    llm.reset()
    tokens: list[int] = []
    times: list[float] = []
    t0 = time.perf_counter()
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                              reset=True):
        tokens.append(int(token))
        times.append(time.perf_counter())
        if len(tokens) == max_new_tokens:
            break
    return LlamaCppRun(ttft=times[0] - t0, decode_time=times[-1] - times[0], decode_tokens=len(tokens) - 1,
                       token_ids=tokens)


def gguf_weight_bytes(gguf: Path) -> tuple[int, str]:
    """(bytes of the GGUF's tensors one decode step reads: all but an untied token_embd, its tensor types)."""
    from collections import Counter

    from gguf import GGMLQuantizationType, GGUFReader

    tensors = GGUFReader(gguf).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    types = Counter(GGMLQuantizationType(t.tensor_type).name for t in tensors if len(t.shape) > 1)
    return (sum(int(t.n_bytes) for t in tensors if tied or t.name != "token_embd.weight"),
            "GGUF " + ", ".join(f"{name} x{n}" for name, n in sorted(types.items())))


def baseline_gguf(gguf: str | None, folder: Path) -> Path:
    """`gguf` (--gguf), else the GGUF the model folder came from (gguf_source.json, written by the import)."""
    from llmengine_runtime.models.gguf import gguf_source

    gguf = Path(gguf) if gguf else gguf_source(folder)
    if gguf is None:
        raise SystemExit(f"--baseline llama.cpp needs a GGUF: {folder} records none; pass --gguf PATH")
    return gguf


def tokenize(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=True, special=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmengine_runtime.benchmarks.llamacpp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--prompt", default="1, 2, 3, 4, 5, 6,")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    llm = load(args.gguf, args.threads)
    prompt_ids = tokenize(llm, args.prompt)
    run_llamacpp(llm, prompt_ids, 8)  # warm-up
    for _ in range(args.repeats):
        run = run_llamacpp(llm, prompt_ids, args.max_new_tokens)
        print(f"TTFT {run.ttft * 1e3:.1f} ms, decode {run.decode_tokens / run.decode_time:.1f} tok/s "
              f"({len(prompt_ids)} prompt tokens, {len(run.token_ids)} generated)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
