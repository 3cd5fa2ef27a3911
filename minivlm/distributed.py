"""Training on several GPUs at once: data parallelism with PyTorch's DistributedDataParallel (DDP).

What it teaches: how `torchrun --nproc_per_node W -m minivlm train ...` turns one training run into W
processes that learn as one (Li et al., 2020, "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training"). torchrun starts W copies of the program, the *ranks*, and tells each who it is
through environment variables: RANK (0 .. W-1), WORLD_SIZE (W), LOCAL_RANK (which GPU of this machine)
and where rank 0 listens (MASTER_ADDR, MASTER_PORT). Every rank holds a whole captioner and computes
the gradient of its own slice of the step's batch; during the backward pass DDP all-reduces (sums,
then divides by W) the gradients, bucket by bucket so that sending overlaps computing, and every rank
then takes the same optimiser step from the same weights: the W copies never drift apart.

Four things make W ranks learn what one process learns from the same global batch:

1. The batch. `TrainConfig.batch_size` is the *global* batch B, whatever W is. Every rank computes
   step s's B indices (`minivlm.train.batch_indices`, a pure function of the seed and s) and keeps
   items r, r + W, r + 2W, ... (`shard`, the deal of torch's DistributedSampler): the W shards are
   disjoint and together are the batch one process would see.
2. The loss. The captioner's loss is a mean over the labelled caption tokens of its batch, and two
   shards hold different numbers of tokens (captions differ in length), so the average of W shard
   means is *not* the mean over the global batch. Each rank therefore backpropagates its mean times
   W n_r / n (n_r its tokens, n all ranks' tokens, one all-reduce of a count): that is W times its
   share of the global sum, and DDP's average of those gradients is the global mean's (`token_mean`).
3. The frozen LM. DDP's reducer all-reduces only parameters that require a gradient: the encoder's
   and the mapper's (and the LM's in the train_lm control). The frozen LM is simply replicated: each
   rank builds it from the same spec. What DDP does send of it: once, at construction, it broadcasts
   every parameter and buffer from rank 0, the frozen LM's too (0.5 GB for GPT-2 124M in float32),
   which makes sure that the replicas start equal; and before every forward pass it broadcasts the
   buffers (here the mapper's target scale; with the resnet18 encoder, BatchNorm's statistics). A
   rank never writes the LM cache while another could: rank 0 loads (pretrains, downloads) first,
   the others wait and then read what it wrote (`main_first`).
4. One voice. Rank 0 alone draws progress bars, prints sample captions and writes checkpoints: the
   ranks hold the same weights, so one copy is enough, and two writers could clash.

What stays inexact is the order of float additions: a shard's forward pass runs on a smaller batch,
which kernels may block differently, and the all-reduce adds W partial gradients in its own order.
Weights agree with one process to float32 rounding, not bit for bit (tests/test_distributed.py).
BatchNorm, in the resnet18 encoder only, normalises each shard by its own statistics, so that encoder
trains slightly differently from one process; SmallCNN's GroupNorm works per image and is exact.

Axis letters: B global batch, W ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "launched_by_torchrun", "world_size", "rank", "is_main", "process_group", "device", "main_first", "shard",
    "share_of_mean", "token_mean", "wrap",
]  # fmt: skip

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in every process it starts


def launched_by_torchrun() -> bool:
    """Whether torchrun (`python -m torch.distributed.run`) started this process: it sets RANK and the others."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def world_size() -> int:
    """W, the number of ranks training together: 1 without a process group."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank, 0 .. W-1: 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this is rank 0, the one that prints and writes."""
    return rank() == 0


@contextmanager
def process_group() -> Iterator[None]:
    """Join torchrun's process group for the block (NCCL between GPUs, gloo between CPUs); leave it, on errors too.

    Does nothing when torchrun did not start this process, or when a group is already up (whoever
    started it ends it), so train() and the command line may both use it.
    """
    if dist.is_initialized() or not launched_by_torchrun():
        yield
        return
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per rank
        torch.cuda.set_device(gpu)  # before any CUDA work, so nothing lands on GPU 0 by default
    # The rank, the world size and rank 0's address come from torchrun's environment variables.
    dist.init_process_group("nccl" if gpu is not None else "gloo", device_id=gpu)
    try:
        yield
    finally:
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank computes: its own GPU in a process group (set by process_group), a GPU, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _rank_zero_says(message: str | None) -> str | None:
    """Rank 0's `message` on every rank (the others' argument is ignored): a collective, so also a barrier."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks: for work that fills a cache they share.

    Rank 0 pretrains the course LM (or downloads GPT-2) and writes the cache while the others wait;
    then they run the block too and find the cache full, so no two processes ever write the same
    folder. If rank 0 fails, the others stop with its message instead of trying the same work at once.
    """
    if world_size() == 1:
        yield
        return
    if not is_main():
        failure = _rank_zero_says(None)  # waits for rank 0 to finish the block
        if failure is not None:
            raise RuntimeError(f"rank 0 failed before this rank could start: {failure}")
        yield
        return
    try:
        yield
    except BaseException as err:
        _rank_zero_says(f"{type(err).__name__}: {err}")
        raise
    _rank_zero_says(None)


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s share of a global batch: items rank, rank + W, rank + 2W, ..., as DistributedSampler deals them.

    The W shares are disjoint and make up the batch; equal when W divides B (`minivlm.train.StepBatches` checks).
    """
    return indices[rank::world]  # (B / W,)


def share_of_mean(loss: Tensor, count: Tensor, total: Tensor, world: int) -> Tensor:
    """What a rank backpropagates so that the average over ranks (DDP's) is the gradient of the global mean.

    loss: the rank's mean over its `count` labelled tokens; total: the tokens of all ranks. loss * count
    is the rank's sum of token losses, and W * sum / total averaged over W ranks is sum of sums / total.
    """
    return loss * (world * count / total)


def token_mean(loss: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """(what this rank backpropagates, the global batch's mean loss) from this rank's mean loss over `count` tokens.

    One process: (loss, loss). W ranks: two all-reduces of a number, the token count before the
    backward pass and the loss for the log.
    """
    world = world_size()
    if world == 1:
        return loss, loss.detach()
    total = count.detach().clone()
    dist.all_reduce(total)  # n, the labelled tokens of the global batch
    local = share_of_mean(loss, count, total, world)
    mean = local.detach().clone()
    dist.all_reduce(mean)  # the sum over ranks of W * (their token losses) / n ...
    return local, mean / world  # ... over W: the mean over the global batch


def wrap(model: nn.Module) -> nn.Module:
    """The model as a rank trains it: in DDP, which all-reduces its trainable weights' gradients; alone, itself."""
    if world_size() == 1:
        return model
    here = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[here.index] if here.type == "cuda" else None)
