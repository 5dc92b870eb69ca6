"""Model weights, streamed: ``checkpoint`` (reader), ``writer`` (sharded output), ``regions`` and
exact top-k selection (``topk``, compiled ``kernels``); used by restore and the update analysis."""
