"""Probe speed: our batched path vs a naive loop (one generate call per prompt and sample).

Both probe facts of a tiny world's training pool with the same settings (10 mapping templates,
10 samples at temperature 0.7, 32 new tokens, stop at newline or period, 2 torch threads) in
the same process. The machine is shared, so the two are interleaved: each round probes
--facts-per-round facts with our path, then --naive-per-round other facts with the naive loop,
and the times are summed per path; load from other processes then hits both alike.

    .venv/bin/python benchmarks/probe/run.py                      # shipped world
    .venv/bin/python benchmarks/probe/run.py --world /tmp/w --rounds 2 --batch-size 500
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


class Ours:
    """``probe_facts`` through lm-eval's hf backend, model loaded once."""

    def __init__(self, model: Path, batch_size: int, settings: ProbeSettings):
        self.lm = load_model("hf", f"pretrained={model}", batch_size=batch_size, device="cpu")
        self.spec = ModelSpec(model_args=f"pretrained={model}", key="bench", batch_size=batch_size)
        self.settings = settings

    def probe(self, facts) -> float:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            probe_facts(facts, self.spec, Path(folder) / "out", self.settings, lm=self.lm,
                        progress=False, save_dataset=False)
            return time.perf_counter() - start


class Naive:
    """The loop a first attempt would write: one generate call per prompt and per sample."""

    def __init__(self, model_dir: Path, settings: ProbeSettings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.settings = settings
        self.stop_ids = [self.tokenizer.eos_token_id]
        for stop in settings.until:  # stop tokens, so the loop is not handicapped by running long
            ids = self.tokenizer(stop, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                self.stop_ids.append(ids[0])

    @torch.no_grad()
    def probe(self, facts) -> float:
        settings, tokenizer = self.settings, self.tokenizer
        start = time.perf_counter()
        for fact in facts:
            for prompt in mapping_prompts(fact, settings.templates):
                encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                for _ in range(settings.samples):
                    output = self.model.generate(
                        **encoded, do_sample=True, temperature=settings.temperature,
                        max_new_tokens=settings.max_new_tokens, eos_token_id=self.stop_ids,
                        pad_token_id=tokenizer.pad_token_id)
                    text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
                    contains_answer(text, fact.answers())
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default=None, help="a built world folder (default: the shipped one)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--facts-per-round", type=int, default=40, help="facts for our path per round")
    parser.add_argument("--naive-per-round", type=int, default=1, help="facts for the naive loop per round")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per generate call (ours)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = ProbeSettings(templates=10).resolved()
    facts = load_split("train", args.world)
    model = model_path(args.world)
    ours, naive = Ours(model, args.batch_size, settings), Naive(model, settings)
    ours.probe(facts[:2])  # warm-up (first-call allocations) for both, not timed
    naive.probe(facts[:1][:1])
    times = {"ours": 0.0, "naive": 0.0}
    counts = {"ours": 0, "naive": 0}
    cursor = 2
    for round_index in range(args.rounds):
        chunk = facts[cursor:cursor + args.facts_per_round]
        cursor += len(chunk)
        times["ours"] += ours.probe(chunk)
        counts["ours"] += len(chunk)
        chunk = facts[cursor:cursor + args.naive_per_round]
        cursor += len(chunk)
        times["naive"] += naive.probe(chunk)
        counts["naive"] += len(chunk)
        print(f"round {round_index + 1}: ours {counts['ours'] / times['ours']:.2f} facts/s, "
              f"naive {counts['naive'] / times['naive']:.3f} facts/s", flush=True)
    rates = {name: counts[name] / times[name] for name in times}
    ratio = rates["ours"] / rates["naive"]
    print(f"ours (lm-eval hf backend, {args.batch_size} rows per generate call): "
          f"{rates['ours']:.2f} facts/s ({counts['ours']} facts, {times['ours']:.1f} s)")
    print(f"naive loop (one generate call per prompt and sample): "
          f"{rates['naive']:.3f} facts/s ({counts['naive']} facts, {times['naive']:.1f} s)")
    print(f"ratio: {ratio:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "counts": counts, "seconds": times,
                                               "ratio": ratio, "batch_size": args.batch_size}, indent=2))


if __name__ == "__main__":
    main()
