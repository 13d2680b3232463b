"""How a tensor-parallel rank cuts its parameters from the checkpoint's whole tensors.

The rules ride on the parameters as attributes the `WeightLoader` reads:
- `tp_pieces`: [(the piece's whole size, this rank's rows of it)] along the output
  dimension, one entry per piece a fused parameter is made of (q, k, v; gate, up);
- `tp_cols`: this rank's columns along the last (input) dimension;
- `tp_zero`: a row-parallel bias that only rank 0 adds (the all-reduce sums it);
- `tp_rows`: the rows this parameter holds in all, more than it loads where a
  vocabulary does not divide over the ranks (the tail stays zero).
"""

import torch
from torch import nn

Pieces = list[tuple[int, range]]


def column_parallel(linear: nn.Linear, pieces: Pieces) -> None:
    linear.weight.tp_pieces = pieces
    if linear.bias is not None:
        linear.bias.tp_pieces = pieces


def row_parallel(linear: nn.Linear, cols: range, rank: int) -> None:
    linear.weight.tp_cols = cols
    if linear.bias is not None and rank != 0:
        linear.bias.tp_zero = True


def shard_piece(param: nn.Parameter, piece: int | None, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a checkpoint tensor: piece `piece` of a fused parameter, or
    (None) the whole parameter, which for a checkpoint that fuses the pieces itself
    (Phi-3's qkv_proj) is cut into them first."""
    pieces = getattr(param, "tp_pieces", None)
    if pieces is not None:
        # Output rows are the second to last dimension of a weight, also of stacked
        # experts [E, out, in]; a bias has only them.
        dim = 0 if tensor.dim() == 1 else -2
        if piece is None and len(pieces) > 1:
            parts = tensor.split([size for size, _ in pieces], dim=dim)
            tensor = torch.cat([p.narrow(dim, r.start, len(r))
                                for p, (_, r) in zip(parts, pieces, strict=True)], dim=dim)
        else:
            r = pieces[piece or 0][1]
            tensor = tensor.narrow(dim, r.start, len(r))
    cols = getattr(param, "tp_cols", None)
    if cols is not None:
        tensor = tensor[..., cols.start:cols.stop]
    if getattr(param, "tp_zero", False):
        tensor = torch.zeros_like(tensor)
    rows = getattr(param, "tp_rows", None)
    if rows is not None and len(tensor) < rows:
        tensor = torch.cat([tensor, tensor.new_zeros(rows - len(tensor), *tensor.shape[1:])])
    return tensor
