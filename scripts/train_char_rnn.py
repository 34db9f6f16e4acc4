"""The seed's char-RNN experiment: a sparse 2-layer LSTM language model on tinyshakespeare, with accelerate.

    python scripts/train_char_rnn.py                  # DSR at 90%, data from $DATAPATH/tinyshakespeare/input.txt
    python scripts/train_char_rnn.py --smoke          # a few steps on the real text

The seed trained on Penn Treebank characters, which cannot be had here; tinyshakespeare stands in: the
first 90% of the text trains, the last 10% validates (bits per character). The seed's recipe: RMSprop
lr 2e-3, weight decay 1e-5, truncated backpropagation through 100 characters, DSR with threshold 1e-2
reallocating every 100 steps, the period doubling at epochs 10, 20, 30 and stopping at 40. The LSTM's
`weight_ih/weight_hh` are sparse; `--sparse-decoder` makes the decoder sparse too (the DSR paper's RNN
runs are fully sparse).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import safetensors.torch
import torch
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

import dst_prune
from dst_prune.compat.models import CharRNN
from dst_prune.training.data import resolve_data_root

logger = logging.getLogger("train_char_rnn")


def load_text(data: str | None) -> str:
    path = Path(data) if data and Path(data).is_file() else None
    if path is None:
        root = resolve_data_root(data)
        if root is None:
            raise SystemExit("no text: pass --data (a .txt or the folder holding tinyshakespeare/input.txt), or "
                             "set DATAPATH")
        path = root / "tinyshakespeare" / "input.txt"
    return path.read_text()


def streams(ids: torch.Tensor, count: int) -> torch.Tensor:
    """`ids` cut into `count` parallel streams (rows), for truncated backpropagation through time."""
    length = len(ids) // count
    return ids[: length * count].view(count, length)


@torch.no_grad()
def bits_per_character(model: nn.Module, data: torch.Tensor, seq_len: int, accelerator: Accelerator) -> float:
    model.eval()
    state, total, count = None, torch.zeros((), device=accelerator.device, dtype=torch.float64), 0
    for start in range(0, data.shape[1] - 1, seq_len):
        x, y = data[:, start: start + seq_len], data[:, start + 1: start + seq_len + 1]
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                             reduction="sum").double()
        count += y.numel()
    model.train()
    totals = accelerator.reduce(torch.stack([total, torch.tensor(float(count), device=total.device,
                                                                  dtype=torch.float64)]), "sum")
    return float(totals[0] / totals[1] / math.log(2))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--method", default="dsr", choices=dst_prune.list_methods())
    p.add_argument("--sparse-decoder", action="store_true")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn"])
    p.add_argument("--seq-len", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32, help="parallel streams per process")
    p.add_argument("--epochs", type=float, default=50)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--double-at-epochs", type=float, nargs="*", default=[10, 20, 30])
    p.add_argument("--stop-epoch", type=float, default=40)
    p.add_argument("--pruning-threshold", type=float, default=1e-2)
    p.add_argument("--output-dir", type=Path, default=Path("runs/tinyshakespeare-char_lstm"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a few steps on the real text, to check the set-up")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_steps, args.hidden_size, args.update_every = 3, 32, 1
    accelerator = Accelerator(cpu=args.cpu)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)

    text = load_text(args.data)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))
    world, rank = accelerator.num_processes, accelerator.process_index
    train_streams = streams(ids[:split], args.batch_size * world)[rank::world].to(accelerator.device)
    val_streams = streams(ids[split:], 8 * world)[rank::world].to(accelerator.device)
    steps_per_epoch = (train_streams.shape[1] - 1) // args.seq_len
    total_steps = args.max_steps or max(1, int(args.epochs * steps_per_epoch))
    to_step = lambda epochs: max(1, round(epochs * steps_per_epoch))  # noqa: E731

    model = CharRNN(len(vocab), hidden_size=args.hidden_size, depth=2, cell=args.cell)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    dst = dst_prune.apply(model, sparsity=args.sparsity, method=args.method, optimizer=optimizer, init="random",
                          dense_stem_and_head=not args.sparse_decoder, update_every=args.update_every,
                          total_steps=total_steps, double_at=[to_step(e) for e in args.double_at_epochs],
                          stop_step=to_step(args.stop_epoch), seed=args.seed,
                          **({"pruning_threshold": args.pruning_threshold} if args.method == "dsr" else {}))
    dst.prepare_for_ddp()
    model, optimizer = accelerator.prepare(model, optimizer)
    dst.optimizer = optimizer
    logger.info("%d characters (vocabulary %d): %d train, %d validation; %d steps", len(ids), len(vocab), split,
                len(ids) - split, total_steps)

    start, state, step = time.perf_counter(), None, 0
    bar = tqdm(total=total_steps, disable=not accelerator.is_main_process, desc="train", unit="step")
    while step < total_steps:
        position = (step % steps_per_epoch) * args.seq_len
        if position == 0:
            state = None  # a new pass over the text
        x = train_streams[:, position: position + args.seq_len]
        y = train_streams[:, position + 1: position + args.seq_len + 1]
        logits, state = model(x, state)
        state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        dst.step()
        step += 1
        bar.update(1)
        bar.set_postfix(bpc=f"{loss.item() / math.log(2):.3f}")
    bar.close()
    summary = {"steps": step, "updates": dst.update_index, "sparsity": dst.sparsity,
               "val_bits_per_character": bits_per_character(model, val_streams, args.seq_len, accelerator),
               "seconds": time.perf_counter() - start}
    if accelerator.is_main_process:
        out = args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "sum_table.txt").write_text(f"{dst.sum_table}\n")
        (out / "stats_table.txt").write_text(f"{dst.stats_table}\n")
        if dst.history:
            dst.save_history(out / "history.csv")
            dst.plot_history(out / "density.png")
        safetensors.torch.save_model(accelerator.unwrap_model(model), str(out / "model.safetensors"))
        torch.save(dst.state_dict(), out / "dst_state.pt")
        (out / "summary.json").write_text(json.dumps({**summary, "vocabulary": "".join(vocab)}, indent=1))
        print(dst.sum_table)
        print(dst.stats_table)
        print(f"char_lstm on tinyshakespeare: validation {summary['val_bits_per_character']:.3f} bits per character "
              f"at sparsity {dst.sparsity:.4f} ({args.method}) after {step} steps; outputs in {out}")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
