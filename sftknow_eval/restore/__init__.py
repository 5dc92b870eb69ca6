"""Parameter restoration (docs/METHOD.md §6): reset the most-changed fine-tuned weights to base values.

Built on the weights layer (``sftknow_eval.weights``: checkpoint reader, sharded writer, regions,
exact top-k): ``passes`` streams the model (two read-only passes find every k's exact cut, a
third writes every variant at once), ``pipeline`` owns everything around the passes, ``stats``
and ``card`` describe each variant and ``commands`` is the CLI.
"""

from sftknow_eval.restore.pipeline import RestoreConfig, RestoreResult, restore

__all__ = ["RestoreConfig", "RestoreResult", "restore"]
