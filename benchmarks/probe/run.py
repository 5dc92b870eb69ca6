"""Probe speed: our batched lm-eval path vs a naive loop (one generate call per prompt and sample).

Both probe the same facts of a tiny world's training pool with the same settings (10 mapping
templates, 10 samples at temperature 0.7, 32 new tokens, stop at newline or period) in the
same process, and report facts per second and the ratio. The naive loop is slow, so it runs
on the first --naive-facts facts only (its rate per fact does not depend on how many).

    .venv/bin/python benchmarks/probe/run.py                    # shipped world
    .venv/bin/python benchmarks/probe/run.py --world /tmp/w --facts 40 --batch-size 200 400
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sftknow_eval.matching import contains_answer
from sftknow_eval.probe.backend import load_model
from sftknow_eval.probe.requests import ProbeSettings, mapping_prompts
from sftknow_eval.probe.run import ModelSpec, probe_facts
from sftknow_eval.world.shipped import load_split, model_path


def ours(facts, model, batch_size: int, settings: ProbeSettings) -> tuple[float, list[str]]:
    lm = load_model("hf", f"pretrained={model}", batch_size=batch_size, device="cpu")
    spec = ModelSpec(model_args=f"pretrained={model}", key="bench", batch_size=batch_size)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        result = probe_facts(facts, spec, Path(folder) / "out", settings, lm=lm, progress=False,
                             chunk_facts=max(1, batch_size // 100))
        elapsed = time.perf_counter() - start
    return len(facts) / elapsed, [f.category("bench") for f in result.facts]


@torch.no_grad()
def naive(facts, model_dir, settings: ProbeSettings) -> float:
    """The loop a first attempt would write: one generate call per prompt and per sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop_ids = [tokenizer.eos_token_id]
    for stop in settings.until:  # stop tokens, so the loop is not handicapped by running long
        ids = tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            stop_ids.append(ids[0])
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    for fact in facts:
        for prompt in mapping_prompts(fact, settings.templates):
            encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            for _ in range(settings.samples):
                output = model.generate(**encoded, do_sample=True, temperature=settings.temperature,
                                        max_new_tokens=settings.max_new_tokens,
                                        eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:],
                                        skip_special_tokens=True)
                contains_answer(text, fact.answers())
    return len(facts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default=None, help="a built world folder (default: the shipped one)")
    parser.add_argument("--facts", type=int, default=60, help="facts probed by our path")
    parser.add_argument("--naive-facts", type=int, default=4, help="facts probed by the naive loop")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = ProbeSettings(templates=10).resolved()
    facts = load_split("train", args.world)
    model = model_path(args.world)
    rows = {}
    for batch_size in args.batch_size:
        rate, _ = ours(facts[:args.facts], model, batch_size, settings)
        rows[f"ours_batch_{batch_size}"] = rate
        print(f"ours (lm-eval hf, batch {batch_size}): {rate:.3f} facts/s", flush=True)
    naive_rate = naive(facts[:args.naive_facts], model, settings)
    print(f"naive loop (1 generate per prompt and sample): {naive_rate:.3f} facts/s")
    best = max(rows.values())
    print(f"ratio (best ours / naive): {best / naive_rate:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({**rows, "naive": naive_rate,
                                               "ratio": best / naive_rate}, indent=2))


if __name__ == "__main__":
    main()
