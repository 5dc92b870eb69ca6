"""The ``probe`` command: annotate facts with a base model's mastery (thin layer over probe.run)."""

from __future__ import annotations

import argparse
import codecs
import json
from typing import Any

from sftknow_eval.errors import UserError
from sftknow_eval.probe.categories import SCHEMES, YE2025
from sftknow_eval.probe.requests import DEFAULT_UNTIL, PAPER_TEMPLATES, ProbeSettings

DESCRIPTION = """\
Probe a base model's mastery of every fact (docs/METHOD.md §2) through lm-eval's model backends.

ye2025 (default): each fact's relation's mapping templates (all available up to --templates)
are completed --samples times at --temperature; R = fraction of completions containing the
answer; D0 when R = 0, D_i when (i-1)/4 < R <= i/4.
slick: --fewshot-sets few-shot QA prompts (--shots exemplars of the same relation) answered
greedily and sampled; HighlyKnown / MaybeKnown / WeaklyKnown / Unknown.

Writes OUT/facts/<split>.jsonl, OUT/dataset (datasets.save_to_disk), OUT/README.md (dataset
card) and OUT/probe_config.json (config + library versions, written last). An interrupted
run resumes when rerun with the same arguments; a folder holding another run is refused.
"""

EPILOG = """\
examples:
  sftknow-eval probe --model hf --model-args pretrained=sftknow_eval/world_data/model \\
      --facts sftknow_eval/world_data/facts --out runs/tiny-mastery --batch-size 512
  sftknow-eval probe --model vllm \\
      --model-args pretrained=meta-llama/Meta-Llama-3-8B,tensor_parallel_size=2,dtype=bfloat16 \\
      --facts data/entity_questions --out runs/llama3-mastery --batch-size auto
"""


def _unescape(text: str) -> str:
    return codecs.decode(text, "unicode_escape")


def _batch_size(text: str) -> int | str:
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("batch size must be at least 1")
    return value


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "probe", help="annotate facts with a base model's knowledge mastery (D0..D4 or SliCK)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model (the same strings as lm_eval's --model / --model_args)")
    model.add_argument("--model", default="hf", help="lm-eval backend: hf (CPU/GPU), vllm, ... (default hf)")
    model.add_argument("--model-args", "--model_args", dest="model_args", required=True,
                       help="lm-eval model args, e.g. pretrained=<hub id or folder>,dtype=bfloat16")
    model.add_argument("--batch-size", type=_batch_size, default=64,
                       help="requests per backend batch, or 'auto' (default 64; the N samples "
                            "of a prompt are separate requests)")
    model.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: backend's choice)")
    model.add_argument("--model-key", default=None,
                       help="name the results are filed under in each fact's mastery "
                            "(default: the Hub id, or the local folder's name)")
    data = parser.add_argument_group("facts and output")
    data.add_argument("--facts", nargs="+", required=True, metavar="SOURCE",
                      help="our jsonl, a folder of them, EntityQuestions files or folder, a saved "
                           "datasets folder, or a Hub dataset id; several are concatenated")
    data.add_argument("--split", default=None, help="split to load when a SOURCE is a Hub dataset id")
    data.add_argument("--out", required=True,
                      help="output folder (new or empty, or this run's own to resume)")
    data.add_argument("--no-dataset", action="store_true",
                      help="skip OUT/dataset (the datasets copy of the jsonl files), to save space")
    data.add_argument("--push-to", default=None, metavar="ORG/NAME",
                      help="after probing, push the folder as a Hub dataset repo (private unless --public)")
    data.add_argument("--public", action="store_true", help="make the pushed dataset repo public")
    data.add_argument("--overwrite-remote", action="store_true",
                      help="replace the content of an existing, non-empty Hub repo")
    how = parser.add_argument_group("probing")
    how.add_argument("--scheme", choices=SCHEMES, default=YE2025,
                     help="categorization scheme (default ye2025)")
    how.add_argument("--templates", type=int, default=PAPER_TEMPLATES,
                     help=f"ye2025: mapping templates per relation, all available up to this many "
                          f"(default {PAPER_TEMPLATES}, the paper's count)")
    how.add_argument("--samples", type=int, default=None,
                     help="sampled completions per prompt (default: ye2025 10, slick 16)")
    how.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (default: ye2025 0.7, slick 0.5)")
    how.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion (default 32)")
    how.add_argument("--until", nargs="+", type=_unescape, default=list(DEFAULT_UNTIL), metavar="STOP",
                     help="stop strings, backslash escapes allowed (default: '\\n' '.')")
    how.add_argument("--gen-kwargs", default="", metavar="K=V,...",
                     help="extra generation kwargs for the backend, lm_eval style (e.g. top_k=0)")
    how.add_argument("--seed", type=int, default=0, help="sampling and exemplar seed (default 0)")
    how.add_argument("--shots", type=int, default=4, help="slick: exemplars per prompt (default 4)")
    how.add_argument("--fewshot-sets", type=int, default=10,
                     help="slick: exemplar sets per fact (default 10)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lm_eval.utils import simple_parse_args_string

    from sftknow_eval.probe.run import ModelSpec, probe_facts, push_annotated
    from sftknow_eval.readers import load_facts

    if args.push_to:  # a bad repo id, a missing token or a repo with content fail before probing
        from sftknow_eval import hub

        hub.check_push_target(args.push_to, repo_type="dataset", overwrite=args.overwrite_remote)
    try:
        gen_kwargs = simple_parse_args_string(args.gen_kwargs) if args.gen_kwargs else {}
    except ValueError as error:
        raise UserError(f"--gen-kwargs: {error}") from None
    settings = ProbeSettings(
        scheme=args.scheme, templates=args.templates, samples=args.samples,
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, until=tuple(args.until),
        seed=args.seed, shots=args.shots, fewshot_sets=args.fewshot_sets, gen_kwargs=gen_kwargs,
    )
    facts = []
    for source in args.facts:
        facts.extend(load_facts(source, split=args.split))
    spec = ModelSpec(model=args.model, model_args=args.model_args, batch_size=args.batch_size,
                     device=args.device, key=args.model_key)
    result = probe_facts(facts, spec, args.out, settings, source=" + ".join(args.facts),
                         progress=not args.no_progress, save_dataset=not args.no_dataset)
    print(f"probed {len(result.facts)} facts with {result.model_key} ({result.scheme}); "
          f"{result.resumed_facts} resumed -> {result.out}")
    print(json.dumps(result.counts, indent=2))
    if args.push_to:
        url = push_annotated(result.out, args.push_to, private=not args.public,
                             overwrite=args.overwrite_remote)
        print(f"pushed to {url}")
    return 0
