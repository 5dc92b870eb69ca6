"""Which tensors a restoration may touch: named regions, user regexes, layer groups, name order.

Pure functions over tensor names (Llama layout: ``model.layers.<i>.self_attn.q_proj.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sftknow_eval.errors import UserError

_ATTN = r"self_attn\.(?:q|k|v|o)_proj\.weight$"
_MLP = r"mlp\.(?:gate|up|down)_proj\.weight$"
_LAYER = r"(?:^|\.)layers\.(\d+)\."

#: Named regions (re.search on the tensor name). ``transformer`` is the paper's: the layers'
#: attention and MLP matrices; norms, embeddings and lm_head excluded.
REGIONS: dict[str, str] = {
    "transformer": _LAYER + r"(?:" + _ATTN + r"|" + _MLP + r")",
    "attention": _LAYER + _ATTN,
    "mlp": _LAYER + _MLP,
    "embedding": r"(?:^|\.)(?:embed_tokens\.weight|lm_head\.weight)$",
    "all": r"",
}


def region_pattern(region: str) -> re.Pattern[str]:
    """A named region, or ``re:<pattern>`` for a user regex (searched in each tensor name)."""
    if region in REGIONS:
        return re.compile(REGIONS[region])
    if region.startswith("re:"):
        try:
            return re.compile(region.removeprefix("re:"))
        except re.error as error:
            raise UserError(
                f"--region {region!r}: not a valid regular expression ({error})") from error
    raise UserError(f"--region {region!r}: use one of {', '.join(REGIONS)} or re:<regex> for your own")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor belongs to (None for embeddings, final norm, lm_head)."""
    match = re.search(_LAYER, name)
    return int(match.group(1)) if match else None


def module_of(name: str) -> str:
    """A short module label for statistics: ``attn.q``, ``mlp.down``, ``input_layernorm``, ..."""
    rest = re.sub(r"^.*?(?:^|\.)layers\.\d+\.", "", name)
    rest = re.sub(r"\.weight$|\.bias$", "", rest)
    rest = re.sub(r"^self_attn\.(\w+)_proj$", r"attn.\1", rest)
    rest = re.sub(r"^mlp\.(\w+)_proj$", r"mlp.\1", rest)
    return rest


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers: layers.2 before layers.10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def select_region(names: Iterable[str], region: str, float_names: set[str]) -> list[str]:
    """Floating tensors matching the region, in natural name order (the global element order)."""
    pattern = region_pattern(region)
    chosen = [n for n in names if n in float_names and pattern.search(n)]
    return sorted(chosen, key=natural_key)


def parse_layer_groups(spec: str) -> list[tuple[int, int]]:
    """``"0-3,4-7"`` -> [(0, 3), (4, 7)]; a single number is a one-layer group."""
    groups: list[tuple[int, int]] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise UserError(f"--layers {spec!r}: expected groups like 0-3 or 0-3,4-7")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise UserError(f"--layers {part.strip()!r}: the first layer must not exceed the last")
        groups.append((first, last))
    return groups


def in_layer_group(name: str, group: tuple[int, int]) -> bool:
    layer = layer_of(name)
    return layer is not None and group[0] <= layer <= group[1]
