"""Parameter restoration (docs/METHOD.md §6): reset the most-changed fine-tuned weights to base values.

Three rooms, as in mergekit: ``reader`` (shards, one tensor at a time), ``selector`` (pure
selection rules), ``writer`` (streamed safetensors output); ``streaming`` runs the two passes
over them on worker threads, ``pipeline`` owns everything around the passes and ``commands``
is the CLI.
"""

from sftknow_eval.restore.pipeline import RestoreConfig, RestoreResult, restore

__all__ = ["RestoreConfig", "RestoreResult", "restore"]
