"""The probe's door to lm-eval's model backends: load a model by name, draw N distinct samples.

lm-eval's ``generate_until`` takes one request per completion and has no "n samples" knob,
so every prompt is sent N times. How the N copies are made to differ depends on the backend:

- ``hf`` (``HFLM`` and subclasses): lm-eval loads the model (dtype, device, parallelize,
  PEFT, ...) and encodes the prompts (``tok_batch_encode``: padding, BOS, truncation); then
  each prompt is prefilled once and its cache expanded N times, so one batched
  multinomial draw per step gives every copy its own random numbers; a row leaves the
  batch as soon as it emits a token whose text contains a stop string
  (``Sampler._decode_compacting``; stop strings are also cut afterwards with lm-eval's
  ``postprocess_generated_text``). This replaces ``generate_until`` only for speed: lm-eval
  has no N-samples knob, and ``generate`` keeps finished rows in the batch.
  ``torch`` is seeded once per call, so a fixed seed and batch size reproduce every sample.
- ``vllm``: every copy carries its own ``seed`` in its generation kwargs (vLLM's
  per-request generator), derived from the run seed, so samples differ and reproduce
  independently of batching; tensor and data parallelism are vLLM's, set in ``model_args``.
- any other backend: copies are sent as they are (no per-request seed); whether they
  differ is the backend's business.

No response cache is used (lm-eval's ``CachingLM`` would return one answer for identical
requests).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from typing import Any

from sftknow_eval.errors import UserError

logger = logging.getLogger(__name__)


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def load_model(model: str, model_args: str = "", *, batch_size: int | str = 64,
               device: str | None = None) -> Any:
    """An lm-eval LM from the same ``--model`` / ``--model_args`` strings as ``lm_eval``.

    Any failure to build it (unknown backend, missing folder or repo, bad argument, missing
    weights) becomes a UserError that names the model and the cause.
    """
    from lm_eval.api.registry import get_model

    try:
        model_class = get_model(model)
    except (ValueError, KeyError, ImportError) as error:
        raise UserError(f"lm-eval has no model backend {model!r}: {error}") from None
    if device is None:  # lm-eval's hf default is "cuda" even on a machine without one
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    extra: dict[str, Any] = {"batch_size": batch_size, "device": device}
    try:
        lm = model_class.create_from_arg_string(model_args, extra)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - backends raise OSError, ValueError, RuntimeError, ...
        raise UserError(
            f"cannot load model {model!r} with model_args {model_args!r}: "
            f"{type(error).__name__}: {error}"
        ) from None
    uncap_generation(lm)
    return lm


def uncap_generation(lm: Any) -> None:
    """Let lm-eval's ``max_gen_toks`` rule: drop ``max_new_tokens`` from an hf model's
    generation config (transformers prefers it over the ``max_length`` lm-eval passes, so a
    checkpoint shipping ``max_new_tokens: 16`` would silently cut a 32-token probe)."""
    config = getattr(getattr(lm, "model", None), "generation_config", None)
    if config is not None and getattr(config, "max_new_tokens", None) is not None:
        logger.debug("ignoring the model's generation_config max_new_tokens=%s",
                     config.max_new_tokens)
        config.max_new_tokens = None


def backend_family(lm: Any) -> str:
    """"hf", "vllm" or "other": decides how N distinct samples are obtained."""
    try:
        from lm_eval.models.huggingface import HFLM

        if isinstance(lm, HFLM):
            return "hf"
    except ImportError:  # pragma: no cover - lm-eval always ships HFLM
        pass
    if "vllm" in type(lm).__name__.lower():
        return "vllm"
    return "other"


def generation_settings(lm: Any) -> dict[str, Any]:
    """The hf model's own generation defaults (e.g. top_p) that apply on top of our kwargs."""
    config = getattr(getattr(lm, "model", None), "generation_config", None)
    if config is None:
        return {}
    return {key: value for key, value in config.to_diff_dict().items()
            if key not in ("transformers_version",)}


class Sampler:
    """Runs prompts through an lm-eval LM: ``copies`` completions per prompt, in one call."""

    def __init__(self, lm: Any):
        self.lm = lm
        self.family = backend_family(lm)
        self._stop_cache: dict[tuple[str, ...], list[int]] = {}

    def generate(self, prompts: Sequence[str], copies: int, gen_kwargs: dict[str, Any],
                 seed: int) -> list[list[str]]:
        """``copies`` completions for each prompt (outer list: prompts, in order)."""
        if self.family == "hf":
            return self._generate_hf(prompts, copies, gen_kwargs, seed)
        return self._generate_until(prompts, copies, gen_kwargs, seed)

    def _stop_ids(self, stops: Sequence[str]) -> list[int]:
        """Token ids whose text contains a stop string (computed once per stop set)."""
        key = tuple(stops)
        if key not in self._stop_cache:
            tokenizer = self.lm.tokenizer
            pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            ids = {self.lm.eot_token_id}
            for index, piece in enumerate(pieces):
                text = tokenizer.convert_tokens_to_string([piece]) if piece else ""
                if any(stop and stop in text for stop in stops):
                    ids.add(index)
            self._stop_cache[key] = sorted(ids)
        return self._stop_cache[key]

    def _generate_hf(self, prompts: Sequence[str], copies: int, gen_kwargs: dict[str, Any],
                     seed: int) -> list[list[str]]:
        import torch
        from lm_eval.models.utils import postprocess_generated_text

        kwargs = dict(gen_kwargs)
        until = list(kwargs.pop("until", []))
        max_new = int(kwargs.pop("max_gen_toks", 32))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0))
        if do_sample:
            kwargs["temperature"] = temperature
        rows_per_call = self.lm.batch_size if isinstance(self.lm.batch_size, int) else 512
        per_call = max(1, rows_per_call // copies)
        stop_ids = self._stop_ids(until)
        tokenizer = self.lm.tokenizer
        self._seed_everything(seed)
        results: list[list[str]] = []
        for start in range(0, len(prompts), per_call):
            batch = list(prompts[start:start + per_call])
            ids, mask = self.lm.tok_batch_encode(batch, left_truncate_len=self.lm.max_length - max_new)
            ids, mask = ids.to(self.lm.device), mask.to(self.lm.device)
            if set(kwargs) <= {"temperature", "top_k", "top_p"}:
                rows = self._decode_compacting(ids, mask, copies, max_new, do_sample, kwargs, stop_ids)
            else:  # other generation kwargs: transformers' own loop understands them
                with torch.no_grad():
                    output = self.lm.model.generate(
                        input_ids=ids, attention_mask=mask, do_sample=do_sample,
                        max_new_tokens=max_new, num_return_sequences=copies, eos_token_id=stop_ids,
                        pad_token_id=tokenizer.pad_token_id, **kwargs,
                    )
                rows = output[:, ids.shape[1]:].tolist()
            texts = [self.lm.tok_decode(row) for row in rows]
            texts = [postprocess_generated_text(text, until, None) for text in texts]
            results.extend(texts[i * copies:(i + 1) * copies] for i in range(len(batch)))
        return results

    def _decode_compacting(self, ids: Any, mask: Any, copies: int, max_new: int, do_sample: bool,
                           kwargs: dict[str, Any], stop_ids: list[int]) -> list[list[int]]:
        """Sample ``copies`` continuations of each row of ``ids`` (left-padded), dropping rows
        from the batch as soon as they emit a stop token.

        Written by hand because ``model.generate`` keeps finished rows in the batch until the
        last one stops: with 1,000 rows where most answers end after two tokens and a few run
        to 32, that costs ~10x the work. Each prompt is prefilled once and its KV cache
        expanded ``copies`` times; sampling is temperature (+ top-k / top-p when asked or set
        in the model's generation config), as in transformers.
        """
        import torch
        from transformers import DynamicCache
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        model = self.lm.model
        config = getattr(model, "generation_config", None)
        warpers = LogitsProcessorList()
        if do_sample:
            warpers.append(TemperatureLogitsWarper(float(kwargs["temperature"])))
            top_k = kwargs.get("top_k", getattr(config, "top_k", None))
            top_p = kwargs.get("top_p", getattr(config, "top_p", None))
            if top_k:
                warpers.append(TopKLogitsWarper(int(top_k)))
            if top_p is not None and float(top_p) < 1.0:
                warpers.append(TopPLogitsWarper(float(top_p)))
        stops = torch.tensor(stop_ids, device=ids.device)
        with torch.no_grad():
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).logits[:, -1, :]
            cache.batch_repeat_interleave(copies)
            logits = logits.repeat_interleave(copies, dim=0)
            mask = mask.repeat_interleave(copies, dim=0)
            next_position = positions[:, -1].repeat_interleave(copies) + 1
            alive = torch.arange(ids.shape[0] * copies, device=ids.device)
            generated: list[list[int]] = [[] for _ in range(len(alive))]
            for step in range(max_new):
                if do_sample:
                    scores = warpers(None, logits.float())
                    tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
                else:
                    tokens = logits.argmax(dim=-1)
                for row, token in zip(alive.tolist(), tokens.tolist(), strict=True):
                    generated[row].append(token)
                keep = ~torch.isin(tokens, stops)
                if step == max_new - 1 or not bool(keep.any()):
                    break
                if not bool(keep.all()):
                    index = keep.nonzero().squeeze(1)
                    cache.batch_select_indices(index)
                    alive, tokens, mask = alive[index], tokens[index], mask[index]
                    next_position = next_position[index]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                logits = model(input_ids=tokens[:, None], attention_mask=mask,
                               position_ids=next_position[:, None], past_key_values=cache,
                               use_cache=True).logits[:, -1, :]
                next_position = next_position + 1
        return generated

    def _generate_until(self, prompts: Sequence[str], copies: int, gen_kwargs: dict[str, Any],
                        seed: int) -> list[list[str]]:
        from lm_eval.api.instance import Instance

        requests = []
        for p_index, prompt in enumerate(prompts):
            for copy in range(copies):
                kwargs = dict(gen_kwargs)
                if self.family == "vllm" and kwargs.get("do_sample"):
                    kwargs["seed"] = derive_seed(seed, p_index, copy)
                requests.append(Instance(request_type="generate_until", doc={},
                                         arguments=(prompt, kwargs), idx=copy))
        self._seed_everything(seed)
        outputs = self.lm.generate_until(requests, disable_tqdm=True)
        if len(outputs) != len(requests):
            raise RuntimeError(f"backend returned {len(outputs)} outputs for {len(requests)} requests")
        return [list(outputs[i * copies:(i + 1) * copies]) for i in range(len(prompts))]

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        try:
            import numpy as np

            np.random.seed(seed)
        except ImportError:  # pragma: no cover
            pass
        import torch

        torch.manual_seed(seed)
