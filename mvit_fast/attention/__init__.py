"""Pooling attention of MViTv2: the functional op and a drop-in for SlowFast's module.

`pooled_attention` is steps 3-6 of the MViTv2 attention (scores, decomposed
relative-position bias, softmax, P @ V, residual pooling) on q, k, v that are
already pooled and normed. `backend` selects the implementation; `"eager"`
materializes the scores and the bias and is the float64 oracle every other
backend is tested against.

`MultiScaleAttention` takes the constructor arguments of
`slowfast.models.attention.MultiScaleAttention`, has the same state_dict keys and
`forward(x, thw_shape) -> (x, q_shape)`, so it can replace that class inside a
SlowFast or mmaction2 MViTv2 (`from_module` copies an existing instance).
"""

from .functional import BACKENDS, pooled_attention
from .module import MultiScaleAttention, attention_pool
from .reference import decomposed_rel_pos, eager_attention, rel_pos_index, resize_rel_pos

__all__ = [
    "BACKENDS",
    "MultiScaleAttention",
    "attention_pool",
    "decomposed_rel_pos",
    "eager_attention",
    "pooled_attention",
    "rel_pos_index",
    "resize_rel_pos",
]
