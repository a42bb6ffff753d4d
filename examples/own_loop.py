"""Your own training script, made fault tolerant by ``launcher.FaultTolerant``.

A small encoder/decoder denoiser, seed 002's diffusion model in miniature: it learns to predict
the noise mixed into points of a synthetic data set at a random noise level. AdamW, linear
warmup then cosine decay, validation every epoch, the best validation loss tracked (and the
best weights written to ``RUN_DIR/best_model.pt``), its own argparse. The lines marked
``# FT`` are everything fault tolerance adds; ``docs/own-loop.md`` walks through them.

Run it (from the repository root)::

    python examples/own_loop.py --run-dir runs/own
    torchrun --nproc_per_node=2 examples/own_loop.py --run-dir runs/own
    ftrun --nnodes=1:2 --nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=127.0.0.1:29400 \\
        examples/own_loop.py --run-dir runs/own

Kill it at any moment and run the same command again: it resumes from the latest verified
checkpoint and ends with the same weights, bit for bit, as a run that was never interrupted.
``--epochs 30`` on a later run extends a finished one; ``--lr`` on a resume fine-tunes with a new
peak learning rate; a changed ``--hidden-dim`` is refused with the values that differ.
Exit codes: 0 done, 2 bad arguments, 3 checkpoint problem, 75 preempted (checkpoint written).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

if __package__ in (None, ""):  # run as a script from a checkout: make ``launcher`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launcher import FaultTolerant, run_main  # FT

ARCHITECTURE = ("dim", "hidden_dim", "num_layers")  # arguments that define tensor shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a small denoiser; rerun the same command to resume.")
    p.add_argument("--run-dir", type=Path, required=True, help="checkpoints, logs, metrics; rerun to resume")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the whole run (raise it to extend a run)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the ranks")
    p.add_argument("--lr", "--learning-rate", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-epochs", type=int, default=2, help="epochs of linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--dim", type=int, default=8, help="dimension of the data points")
    p.add_argument("--hidden-dim", type=int, default=64, help="width of the encoder and decoder")
    p.add_argument("--num-layers", type=int, default=2, help="hidden layers of the encoder")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability")
    p.add_argument("--samples", type=int, default=2048, help="points in the synthetic data set")
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the initial weights and every draw")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (also at epoch ends)")
    p.add_argument("--resume", default="auto", help="auto (default), none, best, or a checkpoint directory")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.samples < 2 * args.batch_size:
        p.error("--epochs and --batch-size must be >= 1, and --samples at least twice --batch-size")
    return args


# ---------------------------------------------------------------------------- data and model

def make_data(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around 8 random centres; the last tenth is held out for validation."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, dim, generator=g) * 2
    points = centres[torch.randint(8, (n,), generator=g)] + 0.3 * torch.randn(n, dim, generator=g)
    split = n - n // 10
    return points[:split], points[split:]


def noise_level(t: torch.Tensor) -> torch.Tensor:
    """Share of signal kept at noise level ``t`` in [0, 1] (a cosine schedule)."""
    return torch.cos(0.5 * math.pi * t) ** 2


class Denoiser(nn.Module):
    """Encoder (point and noise level -> features) and decoder (features -> predicted noise)."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        blocks: list[nn.Module] = [nn.Linear(dim + 1, hidden), nn.SiLU()]
        for _ in range(layers):
            blocks += [nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.SiLU()]
        self.encoder = nn.Sequential(*blocks)
        self.decoder = nn.Linear(hidden, dim)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(torch.cat([noisy, t], dim=1)))


def diffusion_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    keep = noise_level(t)
    noisy = keep.sqrt() * x0 + (1 - keep).sqrt() * eps
    return ((model(noisy, t) - eps) ** 2).mean()


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


@torch.no_grad()
def validate(model: nn.Module, val_x: torch.Tensor, seed: int, rank: int, world: int) -> float:
    """Validation loss with fixed noise, each rank scoring a share of the points."""
    net = model.module if isinstance(model, DDP) else model
    net.eval()
    g = torch.Generator().manual_seed(seed + 1)
    t, eps = torch.rand(len(val_x), 1, generator=g), torch.randn(val_x.shape, generator=g)
    mine = torch.arange(rank, len(val_x), world)
    device = next(net.parameters()).device
    x0, t, eps = val_x[mine].to(device), t[mine].to(device), eps[mine].to(device)
    totals = torch.stack([diffusion_loss(net, x0, t, eps) * len(mine), torch.tensor(float(len(mine)), device=device)])
    dist.all_reduce(totals)
    net.train()
    return float(totals[0] / totals[1])


def save_best(model: nn.Module, path: Path) -> None:
    """The best weights so far, written atomically (a kill never leaves half a file)."""
    net = model.module if isinstance(model, DDP) else model
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- training

def main(args: argparse.Namespace) -> int:
    train_x, val_x = make_data(args.samples, args.dim, args.seed)
    spe = len(train_x) // args.batch_size
    total = args.epochs * spe
    with FaultTolerant(args.run_dir, config=vars(args), shape_keys=ARCHITECTURE, seed=args.seed,  # FT
                       checkpoint={"interval_steps": args.save_every}, resume=args.resume) as ft:  # FT
        torch.manual_seed(args.seed)  # the same initial weights on every rank and every attempt
        net = Denoiser(args.dim, args.hidden_dim, args.num_layers, args.dropout).to(ft.device)
        model = DDP(net, device_ids=[ft.device.index] if ft.device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        factor = warmup_cosine(args.warmup_epochs * spe, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        best = {"val_loss": math.inf, "epoch": 0}
        ft.register(model=model, optim=optimizer, lr_scheduler=scheduler, best=best)  # FT
        start = ft.resume(total_steps=total, steps_per_epoch=spe)  # FT
        scheduler.base_lrs = [args.lr]  # a new --lr on resume takes effect (a no-op otherwise)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * factor(scheduler.last_epoch)
        for step in range(start, total):
            ft.seed_step(step)  # FT: dropout draws depend only on (seed, step, rank)
            idx = ft.batch_indices(len(train_x), args.batch_size, step)  # FT: the step's share of its batch
            x0 = train_x[idx].to(ft.device)
            g = ft.generator(step, "noise")  # FT: the step's noise, without saved RNG state
            t = torch.rand(len(x0), 1, generator=g, device=ft.device)
            eps = torch.randn(x0.shape, generator=g, device=ft.device)
            loss = diffusion_loss(model, x0, t, eps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            evals = None
            if (step + 1) % spe == 0:  # epoch end: validate, keep the best
                evals = {"val_loss": validate(model, val_x, args.seed, ft.rank, ft.world_size)}
                if evals["val_loss"] < best["val_loss"]:
                    best.update(val_loss=evals["val_loss"], epoch=(step + 1) // spe)
                    if ft.is_main:
                        save_best(model, args.run_dir / "best_model.pt")
            if ft.end_step(step, loss=loss.detach(), lr=lr, evals=evals):  # FT: saves, preemption, metrics
                break  # FT
    if ft.is_main and ft.exit_code == 0:
        print(f"best val_loss {best['val_loss']:.5f} at epoch {best['epoch']}: {args.run_dir / 'best_model.pt'}")
    return ft.exit_code  # FT: 0, or 75 after a preemption checkpoint


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))  # FT: a checkpoint problem is one line and exit code 3
