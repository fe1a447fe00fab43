"""The native kernels' tiled weight layout (`matrix.blocked` in pregate/native/native.h), in place.

A native product reads a matrix eight rows at a time (one `dot8` call). In the rows' own layout that is
eight streams at once, which an AVX2-only AMD EPYC read about a third slower than one stream (2 threads,
one bfloat16 row per call, the MLP shapes of smollm2-135m; side-by-side C scripts outside the
repository). Tiled, the eight rows of a call lie together, a cache line of each in turn, so a call of
one row streams one run of memory. A call of more rows reads its tile once too, chunk by chunk (native.h's
BLOCKED_DOTS). Against rows, tiles made steps of one to four tokens faster and those of eight and sixteen
even (docs/serving.md). The sums are the same either way (each row's terms meet its accumulator in the
same order), so the tiled kernels give the bits of the rows' ones.

Both kernels read tiles: AVX2's products (BLOCKED_DOTS) and AVX512-BF16's pair dot products, where a
chunk of a row is one pair vector (PAIR_BLOCKED). The native path tiles where every step runs natively
(pregate.native.default_tiles: a CPU whose oneDNN cannot pack bfloat16), or as `--native-tiles` /
`--no-native-tiles` says (bfloat16 weights only). The tiles reuse each weight's own storage
(nothing copied, nothing added), so torch cannot read those weights: `Tiling` puts the rows back, in
place, the first time torch would read them (a torch forward of a module that holds them or of a
decoder layer's attention or MLP, or a state_dict), and from then on the kernels read rows. A serving
step that runs wholly natively never does. A tied LM head is the input embedding's table, so its
lookups read the tiles (`TiledEmbedding`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

TILE_ROWS = 8  # rows a native call reads at once (native.h's dot8)
CHUNK = 32  # terms of a row that lie together in a tile: a cache line of bfloat16 (native.h's CHUNK)


def tile(w: torch.Tensor, order: torch.Tensor | None = None, cols: int | None = None) -> None:
    """The [N, K] matrix w (a view; its rows contiguous), tiled in place from the start of its storage:
    its rows `order` (None: all in order; else an order of rows 0..len(order)-1), their first `cols` terms
    (None: K). Tile t holds rows order[8t..8t+7]: their terms 0-31 one row after another, then their
    terms 32-63, and so on, then each row's terms past its last whole chunk of 32, one row after another
    (native.h's CHUNK layout). The rows past the last whole tile stay rows, after the tiles."""
    rows = (w if order is None else w[order])[:, :cols].contiguous()
    w.view(-1)[: rows.numel()].copy_(_tiled(rows))


def untile(w: torch.Tensor, order: torch.Tensor | None = None, cols: int | None = None) -> None:
    """The inverse of `tile(w, order, cols)`; the terms past `cols` come back as zeros (`Tiling.fits`
    tiles only matrices whose terms past cols are zero)."""
    n, k = w.shape[0] if order is None else len(order), w.shape[1] if cols is None else cols
    rows = _rows(w.view(-1)[: n * k].clone(), n, k)
    if cols is not None:
        w[:, cols:] = 0
    if order is None:
        w[:, :k] = rows
    else:
        w[order, :k] = rows


def _tiled(rows: torch.Tensor) -> torch.Tensor:
    n, k = rows.shape
    whole, kc = n - n % TILE_ROWS, k - k % CHUNK
    tiles = rows[:whole].reshape(whole // TILE_ROWS, TILE_ROWS, k)
    chunks = tiles[:, :, :kc].reshape(len(tiles), TILE_ROWS, kc // CHUNK, CHUNK).transpose(1, 2)
    t = len(tiles)
    parts = torch.cat(
        [chunks.reshape(t, TILE_ROWS * kc), tiles[:, :, kc:].reshape(t, TILE_ROWS * (k - kc))], 1
    )
    return torch.cat([parts.reshape(-1), rows[whole:].reshape(-1)])


def _rows(flat: torch.Tensor, n: int, k: int) -> torch.Tensor:
    whole, kc = n - n % TILE_ROWS, k - k % CHUNK
    parts = flat[: whole * k].view(whole // TILE_ROWS, TILE_ROWS * k)
    t = len(parts)
    chunks = parts[:, : TILE_ROWS * kc].reshape(t, kc // CHUNK, TILE_ROWS, CHUNK).transpose(1, 2)
    rest = parts[:, TILE_ROWS * kc :].reshape(t, TILE_ROWS, k - kc)
    tiles = torch.cat([chunks.reshape(t, TILE_ROWS, kc), rest], dim=2).reshape(whole, k)
    return torch.cat([tiles, flat[whole * k :].view(n - whole, k)])


def tiled_rows(w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the [N, K] matrix w tiled by `tile(w)`, as the rows held them (a copy: the same
    bits), shaped ids.shape + (K,)."""
    n, k = w.shape
    whole = n - n % TILE_ROWS
    flat = ids.reshape(-1)
    in_tiles = flat < whole
    start = torch.where(in_tiles, flat // TILE_ROWS * TILE_ROWS * k, whole * k + (flat - whole) * k)
    rows = torch.arange(k, device=w.device)
    within = torch.where(in_tiles[:, None], _tile_offsets(k, w.device)[flat % TILE_ROWS], rows)
    return w.view(-1)[start[:, None] + within].view(*ids.shape, k)


@functools.cache  # one per row length: a lookup a step must not rebuild it
def _tile_offsets(k: int, device: torch.device) -> torch.Tensor:
    """[TILE_ROWS, k]: where term j of a tile's row i lies from the tile's start (native.h's CHUNK layout),
    read off `_tiled` itself."""
    where = _tiled(torch.arange(TILE_ROWS * k, device=device).view(TILE_ROWS, k))
    offsets = torch.empty_like(where)
    offsets[where] = torch.arange(len(where), device=device)
    return offsets.view(TILE_ROWS, k)


def gate_up_order(channels: int, up: int) -> torch.Tensor:
    """Rows of a gate|up matrix in its tiles' order: each channel's gate row, then its up row (from
    `up`), so a tile of 8 rows holds 4 channels, as native/moe_mlp.c's gate_up reads them."""
    c = torch.arange(channels)
    return torch.stack([c, up + c], dim=1).reshape(-1)


class Tiling:
    """A model's decoder weights tiled for the native kernels. `add(owner, name, view, order, cols)`: the
    matrix view(getattr(owner, name)), a 2-d [N, K] one, tiled as `tile(matrix, order, cols)`; `flags`:
    the native structs whose `blocked` field says how the kernels read them. `hook(module)` makes a torch
    forward of module, and a state_dict of it, put the rows back first (`untile`)."""

    def __init__(self):
        self.matrices: list[tuple] = []
        self.flags: list = []
        self.tiled = False

    def add(self, owner, name: str, view=lambda t: t, order: torch.Tensor | None = None, cols=None) -> None:
        self.matrices.append((owner, name, view, order, cols))

    def fits(self) -> bool:
        """Whether every matrix can be tiled in place: its rows contiguous, its terms past `cols` zero."""
        for owner, name, view, _, cols in self.matrices:
            w = view(getattr(owner, name))
            if not _contiguous_rows(w) or (cols is not None and w[:, cols:].any()):
                return False
        return True

    @torch.no_grad()
    def tile(self) -> None:
        for owner, name, view, order, cols in self.matrices:
            tile(view(getattr(owner, name)), order, cols)
        for struct in self.flags:
            struct.blocked = 1
        self.tiled = True

    @torch.no_grad()
    def untile(self) -> None:
        if not self.tiled:
            return
        for struct in self.flags:
            struct.blocked = 0
        for owner, name, view, order, cols in self.matrices:
            untile(view(getattr(owner, name)), order, cols)
        self.tiled = False

    @torch.no_grad()
    def include(self, owner: nn.Module, name: str, flag) -> bool:
        """Tile one more matrix, the rows of owner's `name`, now (while tiled), its kernel reading
        flag.blocked, and hook owner. False: it cannot be tiled in place (its rows stay)."""
        if not (self.tiled and _contiguous_rows(getattr(owner, name))):
            return False
        tile(getattr(owner, name))
        self.add(owner, name)
        self.flags.append(flag)
        flag.blocked = 1
        self.hook(owner)
        return True

    def hook(self, module: nn.Module, forward: bool = True) -> None:
        """Put the rows back before a state_dict of module, and (forward) before a torch forward of it."""
        if forward:
            module.register_forward_pre_hook(lambda *_: self.untile())
        module.register_state_dict_pre_hook(lambda *_: self.untile())


class TiledEmbedding(nn.Embedding):
    """An input embedding whose table (the same parameter as `table`'s) is also a tied LM head that
    `tiling` tiled: a lookup reads its rows from the tiles while they stand (`tiled_rows`), else as
    nn.Embedding does. Its state_dict puts the rows back first, as every tiled module's does."""

    def __init__(self, table: nn.Embedding, tiling: Tiling):
        super().__init__(table.num_embeddings, table.embedding_dim, table.padding_idx, device="meta")
        self.weight = table.weight  # the same parameter: nothing allocated, nothing copied
        self.tiling = tiling
        tiling.hook(self, forward=False)  # its own lookups read the tiles

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return tiled_rows(self.weight, ids) if self.tiling.tiled else super().forward(ids)


def _contiguous_rows(w: torch.Tensor) -> bool:
    return w.stride(1) == 1 and w.stride(0) == w.shape[1]
