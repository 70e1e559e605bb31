"""`--fsdp`: FSDP2 (`fully_shard`) instead of DDP, so that parameters, gradients and optimizer
state are split over the ranks (MViTv2-L: 213M parameters, 3.4 GB of fp32 weights, gradients
and AdamW state in every DDP replica).

Each transformer block is one FSDP unit (all-gathered just before its forward and backward,
freed after); the root unit holds the rest (patch embedding, cls token, final norm, head).
Checkpoints keep the single-file format of unsharded runs: the full state is gathered to rank 0
and the optimizer state re-keyed by parameter index, so a checkpoint written under FSDP resumes
under DDP or one process and the other way round, and loads with `load_checkpoint`.

Evaluation runs on `Sharded.full()`, an unsharded twin of the model: the test shards of the
ranks differ by up to one video, and a sharded forward is a collective that every rank must
run the same number of times.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .dist import Dist


class Sharded:
    """`model` sharded in place over all ranks (`fully_shard` per block, then the root).

    No `MixedPrecisionPolicy`: the parameters stay fp32, are all-gathered in fp32 and the
    trainer's autocast casts them per op, exactly as under DDP. A bf16 `param_dtype` would round
    every parameter to bf16 for every op, also for those autocast runs in fp32 (LayerNorm), and
    give bf16 gradients before the reduce: FSDP and DDP runs would no longer agree. What it would
    save, half of the all-gather traffic, has not been measured.

    Activation checkpointing (the model's own flag) wraps each block's call in the model's
    forward, inside the blocks' FSDP hooks; FSDP skips its hooks in the recomputation.
    """

    def __init__(self, model: nn.Module, d: Dist) -> None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise TypeError(
                f"--fsdp shards a model's transformer blocks; {type(model).__name__} has no .blocks"
            )
        # Before sharding: an unsharded copy holding no memory, filled on demand by `full`.
        self.twin = copy.deepcopy(model).to("meta")
        self.model = model
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        for i, block in enumerate(blocks):
            # backward starts with the last block: keeping it gathered saves an all-gather
            fully_shard(block, mesh=mesh, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mesh=mesh)

    def full(self, *, rank0_cpu: bool = False) -> nn.Module:
        """The twin with the current full weights (a collective: every rank calls it). With
        `rank0_cpu` only rank 0's twin gets them, on the CPU (for saving); `release` frees them."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=rank0_cpu)
        state = get_model_state_dict(self.model, options=options)
        if state:  # empty on ranks other than 0 with cpu_offload
            self.twin.load_state_dict(state, assign=True)
        return self.twin

    def release(self) -> None:
        self.twin.to("meta")

    def optimizer_state(self, optimizer) -> dict:
        """`optimizer.state_dict()` of the unsharded model (parameters by index) on rank 0, {}
        elsewhere; a collective."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        if not state:
            return {}
        index = {name: i for i, name in enumerate(self._names(optimizer))}
        return {
            "state": {index[name]: v for name, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]
            ],
        }

    def load(self, model_state: dict, optimizer_state: dict, optimizer) -> None:
        """Load full states (the same on every rank, as read from a checkpoint): each rank keeps
        its shard."""
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=options)
        names = self._names(optimizer)
        by_name = {
            "state": {names[i]: v for i, v in optimizer_state["state"].items()},
            "param_groups": [
                {**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]
            ],
        }
        set_optimizer_state_dict(self.model, optimizer, by_name, options=options)

    def _names(self, optimizer) -> list[str]:
        """Parameter names in `optimizer.state_dict()`'s index order (group by group)."""
        name_of = {id(p): n for n, p in self.model.named_parameters()}
        return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
