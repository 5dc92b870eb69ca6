"""Model weights, streamed: ``checkpoint`` (reader, preflight), ``writer`` (sharded safetensors
output), ``regions`` (which tensors, in which order) and ``topk`` with its compiled ``kernels``
(exact top-k selection over a stream of tensors). Restore and the update analysis both use it.
"""
