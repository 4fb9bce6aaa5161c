"""Worker functions run by ``torch.multiprocessing.spawn`` in the distributed tests (gloo on CPU).

They live in an importable module (``tests`` is on the path) because spawned children import the
function by name. Each worker writes what it computed to ``out/rank{r}.pt``; the test compares.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import relprune
from relprune.train.regularizers import ContributionEntropy


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).double()


def batches(kind: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (5, 6) if kind == "mlp" else (3, 2, 6, 6)
    out = []
    for i in range(n):
        x = torch.randn(*shape, generator=g, dtype=torch.float64) + 0.3 * i
        out.append((x, torch.randint(0, 3, (shape[0],), generator=g)))
    return out


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def stats_worker(rank: int, world: int, init_file: str, out: str, kind: str, shares: list[list[int]],
                 statistics: list[str] | None) -> None:
    """Statistics and masks over this rank's share of the batches (indices in ``shares[rank]``)."""
    _init(rank, world, init_file)
    try:
        model = mlp() if kind == "mlp" else cnn()
        everything = batches(kind, sum(len(s) for s in shares))
        mine = [everything[i] for i in shares[rank]]
        stats = relprune.collect_stats(model, mine, statistics=statistics)
        result = {n: {s: ls.get(s) for s in sorted(stats.statistics)} for n, ls in stats.items()}
        masks = relprune.prune(model, stats, sparsity=0.5, criterion="rc" if statistics is None else "wanda")
        torch.save({"stats": result, "masks": dict(masks)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def failing_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Rank 1 feeds a NaN; every rank must raise (and none may hang)."""
    _init(rank, world, init_file)
    try:
        x = torch.randn(4, 6, dtype=torch.float64)
        if rank == 1:
            x[0, 0] = float("nan")
        try:
            relprune.collect_stats(mlp(), [x])
            message = "no error"
        except relprune.RelpruneError as err:
            message = f"{type(err).__name__}: {err}"
        (Path(out) / f"rank{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


def ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One SGD step of a DDP-wrapped MLP with the contribution-entropy term on this rank's half batch."""
    _init(rank, world, init_file)
    try:
        model = mlp().float()
        x, y = (t[rank::world] for t in ddp_batch())
        ddp = nn.parallel.DistributedDataParallel(model)
        reg = ContributionEntropy(ddp, x[:2])
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        loss = nn.functional.cross_entropy(ddp(x), y) + 0.5 * reg()
        loss.backward()
        opt.step()
        reg.detach()
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
        # DDP's reducer holds gloo work on the group: free it on every rank before the group goes,
        # or a rank can abort at exit ("terminate called without an active exception").
        del ddp, opt, loss
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def sequential_worker(rank: int, world: int, init_file: str, out: str, shares: list[list[int]]) -> None:
    """Block-by-block pruning of a tiny Llama with this rank's share of the calibration batches."""
    _init(rank, world, init_file)
    try:
        from relprune.llm import prune_sequential

        model = tiny_llama()
        everything = llama_batches()
        masks = prune_sequential(model, [everything[i] for i in shares[rank]], sparsity=0.5, criterion="obs",
                                 reconstruct="obs")
        torch.save({"masks": dict(masks), "state": model.state_dict()}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def tiny_llama() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 30, (2, 12), generator=g),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]


def toy_data():
    from relprune.experiments.data import Data, Split

    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 1, 2, 3, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    return Data("toy", Split(x[:64], y[:64]), Split(x[64:80], y[64:80]), Split(x[80:], y[80:]), 2)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def train_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """Two epochs of the experiment loop with a checkpoint and the entropy term, on this rank's slices."""
    _init(rank, world, init_file)
    try:
        from relprune.experiments.training import TrainConfig, train

        model = toy_model()
        reg = ContributionEntropy(model, toy_data().train.x[:8])
        lines: list[str] = []
        train(model, toy_data(), TrainConfig(epochs=2, batch_size=16, lr=1e-2), penalty=reg,
              checkpoint=Path(out) / "train.ckpt", log=lines.append)
        reg.detach()
        torch.save({"state": model.state_dict(), "lines": lines}, Path(out) / f"rank{rank}.pt")
        gc.collect()  # the loop's DDP wrapper, before the group goes (see ddp_worker)
        dist.barrier()
    finally:
        dist.destroy_process_group()
