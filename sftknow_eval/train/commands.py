"""The ``train`` sub-command: a thin argparse layer over :func:`sftknow_eval.train.train`."""

from __future__ import annotations

import argparse

from sftknow_eval.restore.commands import parse_k_list


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model on select's prompt-completion data with a TRL SFT recipe",
        description=(
            "Run TRL's SFTTrainer from a recipe (flat TRL YAML, recipes/sft/) on select's "
            "prompt-completion jsonl, with answer-only loss; write a complete model folder "
            "(safetensors, config, tokenizer, generation config, model card, run record) "
            "and optionally push it to the Hub."
        ),
        epilog="example: sftknow-eval train --recipe tiny --data sft.jsonl --out runs/sft/D2-240 "
        "num_train_epochs=5",
    )
    parser.add_argument("--recipe", required=True,
                        help="recipe YAML path, or a shipped recipe name (tiny, llama3-8b, ...)")
    parser.add_argument("--data", required=True, help="prompt-completion jsonl from select")
    parser.add_argument("--out", required=True, help="output model folder (written atomically)")
    parser.add_argument("--push-to", metavar="ORG/NAME",
                        help="push the output to this Hub repo (private; token from HF_TOKEN)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --push-to: replace the content of an existing Hub repo")
    parser.add_argument("--restore-k", type=parse_k_list, metavar="K[,K...]",
                        help="also write restored variants: the fine-tune with its k%% most-changed "
                        "weights reset to the base model, one per k, in OUT-restored/top<k>/ "
                        "(as `sftknow-eval restore` would; with --push-to, each to ORG/NAME-top<k>)")
    parser.add_argument("--restore-region", default="transformer",
                        help="with --restore-k: the weights considered (as restore's --region)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="recipe overrides, e.g. learning_rate=1e-4 seed=3")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sftknow_eval.train.sft import train

    result = train(args.recipe, args.data, args.out, overrides=list(args.overrides),
                   push_to=args.push_to, overwrite_remote=args.overwrite,
                   restore_k=args.restore_k, restore_region=args.restore_region)
    loss = result.metrics.get("train_loss")
    state = "already there (same recipe and data)" if result.skipped else f"{result.seconds:.1f} s"
    print(f"model: {result.output}  ({state}; train loss {loss})")
    if result.commit_url:
        print(f"pushed: {result.commit_url}")
    for name, folder in result.restored.items():
        pushed = result.restored_pushed.get(name)
        print(f"restored {name}: {folder}" + (f"  (pushed: {pushed})" if pushed else ""))
    return 0
