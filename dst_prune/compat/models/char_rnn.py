"""A character-level recurrent language model (the seed's char-RNN; the DSR paper's RNN experiments)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CharRNN"]

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class CharRNN(nn.Module):
    """Embedding, a `depth`-layer LSTM (or GRU/RNN) and a linear decoder to the vocabulary.

    The recurrent `weight_ih_l*`/`weight_hh_l*` are dst_prune's default sparse targets; the decoder is the
    classifier head (dense unless `dense_stem_and_head=False`).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 256, depth: int = 2, cell: str = "lstm",
                 embedding_size: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding_size)
        self.rnn = CELLS[cell](embedding_size, hidden_size, num_layers=depth, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        """Logits `(batch, time, vocab)` and the recurrent state, for truncated backpropagation."""
        out, state = self.rnn(self.embed(tokens), state)
        return self.decoder(out), state
