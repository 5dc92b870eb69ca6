"""Restoration inside a training run: a ``transformers.TrainerCallback`` (it works with TRL's
``SFTTrainer``) that runs the restore engine on what the trainer saved.

At the end of training (and, with ``at_each_save``, after every checkpoint) the callback
streams the base model and the saved shards through :func:`sftknow_eval.restore.restore`, so
memory stays bounded as in ``sftknow-eval restore``: it reads the files the trainer wrote, never
a second in-memory copy of the model. Each variant of a saved folder ``F`` is written to
``F-restored/<strategy><k>/`` beside it, with the same folders, statistics and cards as the
``restore`` command (and byte-identical weights). When the trainer pushes to the Hub
(``push_to_hub`` with ``hub_model_id: org/name``), each final variant goes to a repo of its own,
``org/name-top5`` and so on. A base model whose architecture differs from the model being
trained stops the run in ``on_train_begin``, before the first step.

    trainer = SFTTrainer(model=..., args=..., train_dataset=...,
                         callbacks=[RestoreCallback(base="meta-llama/Meta-Llama-3-8B", k=[5, 20])])
    trainer.train()   # writes <output_dir>/ and <output_dir>-restored/top5, top20
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sftknow_eval.errors import UserError
from sftknow_eval.restore.pipeline import RestoreConfig, RestoreResult, restore, variant_name
from sftknow_eval.weights.checkpoint import ARCH_KEYS, Checkpoint
from sftknow_eval.weights.regions import region_pattern
from sftknow_eval.weights.topk import STRATEGIES, validate_k

RESTORED_SUFFIX = "-restored"


def variants_folder(saved: str | Path) -> Path:
    """Where the restored variants of a saved model folder go: ``<folder>-restored`` beside it."""
    saved = Path(saved)
    return saved.parent / f"{saved.name}{RESTORED_SUFFIX}"


class RestoreCallback(TrainerCallback):
    """Restore the most-changed weights of what a trainer saves (see the module docstring).

    base          the base model (Hub id or folder) the fine-tune started from.
    k             percentages of the region's elements to reset, one variant each.
    region, strategy, seed, base_revision, threads   as for ``sftknow-eval restore``.
    at_train_end  save the final model into ``output_dir`` when training ends and restore it
                  (leave off when the caller saves and restores the final model itself).
    at_each_save  also restore every checkpoint the trainer saves.
    push          push the final variants when the trainer pushes (``push_to_hub``).
    """

    def __init__(self, base: str, k: Sequence[float] = (5.0, 20.0), *, region: str = "transformer",
                 strategy: str = "top", seed: int = 0, base_revision: str | None = None,
                 at_train_end: bool = True, at_each_save: bool = False, push: bool = True,
                 threads: int = 0, progress: bool = False) -> None:
        if not k:
            raise UserError("RestoreCallback: give at least one k")
        if strategy not in STRATEGIES:
            raise UserError(f"RestoreCallback: strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.base = str(base)
        self.k = [validate_k(float(value)) for value in k]
        region_pattern(region)  # a bad region fails here, not after training
        self.region, self.strategy, self.seed = region, strategy, seed
        self.base_revision = base_revision
        self.at_train_end, self.at_each_save, self.push = at_train_end, at_each_save, push
        self.threads, self.progress = threads, progress
        self.results: dict[Path, RestoreResult] = {}

    # -- the work --------------------------------------------------------------------------

    def variant_names(self) -> list[str]:
        """The variant folders each restore writes (``top5``, ``top20``, ...)."""
        return [variant_name(self.strategy, k) for k in self.k]

    def restore_folder(self, saved: str | Path, push_to: str | None = None) -> RestoreResult:
        """Restore one saved model folder into :func:`variants_folder` (``push_to``: a repo id
        prefix; variant ``top5`` goes to ``<push_to>-top5``)."""
        saved = Path(saved)
        config = RestoreConfig(
            base=self.base, tuned=str(saved), out=variants_folder(saved), k=list(self.k),
            region=self.region, strategy=self.strategy, seed=self.seed,
            base_revision=self.base_revision, push_to=push_to, progress=self.progress,
            threads=self.threads,
        )
        result = restore(config)  # logs each variant it writes
        self.results[saved] = result
        return result

    def check_model(self, model: Any) -> None:
        """The model being trained must have the base model's architecture: its config and the
        names and shapes of every tensor of the restore region (read from the base model's
        safetensors headers, no weights loaded)."""
        from sftknow_eval import hub

        folder = hub.resolve_model(self.base, self.base_revision)
        base_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        config = model.config.to_dict()
        for key in ARCH_KEYS:  # a model built in memory may not name its architectures yet
            if base_config.get(key) is not None and config.get(key) is not None \
                    and base_config[key] != config[key]:
                raise UserError(f"RestoreCallback: the base model {self.base} has {key} "
                                f"{base_config[key]!r} but the model being trained has "
                                f"{config[key]!r}: restoration needs the same architecture")
        if hasattr(model, "get_base_model"):  # a PEFT adapter: the config check is what applies
            return
        pattern = region_pattern(self.region)
        base = Checkpoint.open(folder)  # the one weights reader: shard headers, no data read
        base.close()
        base_shapes = {name: list(info.shape) for name, info in base.tensors.items()
                       if pattern.search(name)}
        model_shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()
                        if pattern.search(name)}
        for name in sorted(set(base_shapes) | set(model_shapes)):
            if base_shapes.get(name) != model_shapes.get(name):
                raise UserError(
                    f"RestoreCallback: tensor {name} is {base_shapes.get(name) or 'absent'} in the "
                    f"base model {self.base} but {model_shapes.get(name) or 'absent'} in the model "
                    "being trained: restoration needs the same architecture")

    # -- trainer events --------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if model is not None:
            self.check_model(model)
        if self.at_train_end and self.push and args.push_to_hub:
            self._push_prefix(args)  # a hub_model_id without a namespace fails before training

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.at_each_save and state.is_world_process_zero:
            self.restore_folder(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     processing_class: Any = None, **kwargs: Any) -> None:
        if not self.at_train_end or not state.is_world_process_zero or model is None:
            return
        # The trainer saves its final model only after train() returns (trainer.save_model):
        # write it here the same way so that there are shards to stream.
        output = Path(args.output_dir)
        model.save_pretrained(output)
        if processing_class is not None:
            processing_class.save_pretrained(output)
        push_to = self._push_prefix(args) if self.push and args.push_to_hub else None
        self.restore_folder(output, push_to=push_to)

    @staticmethod
    def _push_prefix(args: Any) -> str:
        repo = args.hub_model_id
        if not repo or "/" not in repo:
            raise UserError("RestoreCallback: pushing restored variants needs hub_model_id as "
                            f"org/name (got {repo!r}); each variant goes to org/name-<variant>")
        return repo
