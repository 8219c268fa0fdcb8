"""Train a small Mixtral-style MoE language model with expert parallelism, balanced per microbatch, on CPU.

    torchrun --nproc_per_node=4 examples/train_moe.py               # balanced (replicas of hot experts)
    torchrun --nproc_per_node=4 examples/train_moe.py --no-balance  # same model, masters only

Byte-level tokens, 2 transformer blocks (RMSNorm, causal attention, MoE with 8 SwiGLU experts and a
top-2 softmax router), trained on a 2 KB public-domain text. Each rank has ``8 / world_size``
master slots plus one redundant slot. Dense parameters are replicated and their gradients summed
over the ranks (data parallelism); expert gradients arrive complete through the all-to-all backward
and grad reduce. Rank 0 prints, per step, the loss and each MoE layer's imbalance before and after
balancing. Both runs print the same losses up to float32 rounding (last printed digit at most), because
balancing does not change the model's math; only the order of some floating-point sums differs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

try:
    import ultraep  # noqa: F401
except ImportError:  # running from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ultraep.layout import ExpertLayout
from ultraep.runtime import ManagerConfig, MoELayer, ReplicaManager, swiglu_weight_shapes

DATA_FILE = Path(__file__).resolve().parent / "data" / "gettysburg_preamble.txt"
VOCAB_SIZE = 256  # bytes


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then the MoE layer, each with a residual."""

    def __init__(self, manager: ReplicaManager, layer_id: int, args: argparse.Namespace) -> None:
        super().__init__()
        self.num_heads = args.num_heads
        self.attn_norm = nn.RMSNorm(args.hidden_size)
        self.qkv = nn.Linear(args.hidden_size, 3 * args.hidden_size, bias=False)
        self.attn_out = nn.Linear(args.hidden_size, args.hidden_size, bias=False)
        self.moe_norm = nn.RMSNorm(args.hidden_size)
        self.moe = MoELayer(
            manager, layer_id, args.hidden_size, args.ffn_hidden_size, topk=2, balance=not args.no_balance, seed=args.seed
        )

    def forward(self, x: torch.Tensor, microbatch_id: int) -> torch.Tensor:
        batch, seq_len, hidden = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, seq_len, 3, self.num_heads, -1).unbind(dim=2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(batch, seq_len, hidden))
        return x + self.moe(self.moe_norm(x), microbatch_id)


class MoELanguageModel(nn.Module):
    def __init__(self, manager: ReplicaManager, args: argparse.Namespace) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, args.hidden_size)
        self.blocks = nn.ModuleList(Block(manager, layer_id, args) for layer_id in range(args.num_layers))
        self.norm = nn.RMSNorm(args.hidden_size)
        self.lm_head = nn.Linear(args.hidden_size, VOCAB_SIZE, bias=False)

    def forward(self, tokens: torch.Tensor, microbatch_id: int = 0) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, microbatch_id)
        return self.lm_head(self.norm(x))

    def expert_parameters(self) -> set[nn.Parameter]:
        return {w for block in self.blocks for w in block.moe.master_weights()}


def sample_batch(data: torch.Tensor, args: argparse.Namespace, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of the text, different on every rank and step, the same in every run."""
    generator = torch.Generator().manual_seed((args.seed * 10_007 + step) * 101 + rank)
    starts = torch.randint(0, data.numel() - args.seq_len - 1, (args.batch_size,), generator=generator)
    windows = torch.stack([data[s : s + args.seq_len + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-balance", action="store_true", help="route with the masters-only plan (no replicas)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps")
    parser.add_argument("--num-experts", type=int, default=8, help="logical experts per MoE layer")
    parser.add_argument("--redundant-slots", type=int, default=1, help="redundant slots per rank")
    parser.add_argument("--num-layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument("--ffn-hidden-size", type=int, default=128, help="expert SwiGLU width")
    parser.add_argument("--num-heads", type=int, default=4, help="attention heads")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens (bytes) per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    parser.add_argument("--sync-mode", default="auto", choices=("direct", "relay", "auto"), help="weight sync mode")
    parser.add_argument(
        "--buffer-layers", action="store_true", help="one redundant-slot weight buffer set per layer (ManagerConfig.buffer_layers)"
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="forward weight sync and grad reduce in the background (ManagerConfig.overlap_sync and overlap_grad_reduce)",
    )
    parser.add_argument(
        "--pipeline-replicas",
        action="store_true",
        help="with --overlap: compute replicas chunk by chunk as their copy arrives, in 4 chunks "
        "(ManagerConfig.pipeline_replicas, num_chunks=4)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the parameters and the batches")
    args = parser.parse_args()
    if args.pipeline_replicas and not args.overlap:
        parser.error("--pipeline-replicas needs --overlap: replicas compute early chunks only while the sync runs in the background")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()

    layout = ExpertLayout.from_num_experts(args.num_experts, world_size, args.redundant_slots)
    manager = ReplicaManager(
        layout,
        swiglu_weight_shapes(args.hidden_size, args.ffn_hidden_size),
        config=ManagerConfig(
            sync_mode=args.sync_mode,
            buffer_layers=args.num_layers if args.buffer_layers else 0,
            overlap_sync=args.overlap,
            overlap_grad_reduce=args.overlap,
            pipeline_replicas=args.pipeline_replicas,
        ),
    )
    torch.manual_seed(args.seed)  # dense parameters: the same on every rank and in every run
    model = MoELanguageModel(manager, args)
    expert_params = model.expert_parameters()
    dense_params = [p for p in model.parameters() if p not in expert_params]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.tensor(list(DATA_FILE.read_bytes()), dtype=torch.long)

    if rank == 0:
        mode = "masters only (--no-balance)" if args.no_balance else f"balanced, sync_mode={args.sync_mode}"
        for flag, used in (("buffer layers", args.buffer_layers), ("overlap", args.overlap), ("pipelined replicas", args.pipeline_replicas)):
            mode += f", {flag}" if used else ""
        print(f"{world_size} ranks (gloo), {layout}, {args.num_layers} MoE layers, top-2, {mode}")
        print(f"training text: {DATA_FILE.name}, {data.numel()} bytes; {args.batch_size}x{args.seq_len} tokens per rank and step")

    losses = []
    for step in range(args.steps):
        # Step 1: forward and backward of this rank's batch. The loss is divided by the number of ranks,
        # so the gradients summed over ranks are those of the mean loss.
        inputs, targets = sample_batch(data, args, step, rank)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        (loss / world_size).backward()

        # Step 2: sum the dense gradients over the ranks (expert gradients are already complete).
        flat = torch.cat([p.grad.reshape(-1) for p in dense_params])
        dist.all_reduce(flat)
        offset = 0
        for p in dense_params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        optimizer.step()

        # Step 3: report the mean loss over the ranks and each layer's imbalance.
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world_size)
        if rank == 0:
            parts = []
            for layer_id, stats in sorted(manager.stats.items()):
                if args.no_balance:
                    parts.append(f"layer {layer_id} {stats.imbalance_before:.3f}")
                else:
                    parts.append(
                        f"layer {layer_id} {stats.imbalance_before:.3f} -> {stats.imbalance_after:.3f} "
                        f"({stats.num_replicas} replicas)"
                    )
            print(f"step {step:2d} | loss {losses[-1]:.6f} | imbalance {' | '.join(parts)}")

    if rank == 0:
        print("losses: " + " ".join(f"{value:.6f}" for value in losses))
        print(f"finished in {time.perf_counter() - started:.1f} s")
    # Objects in reference cycles (two Parameters among them) collected at interpreter exit aborted a gloo
    # rank now and then. Free them while the process group still exists, then tear the group down.
    del model, manager, optimizer, logits, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
