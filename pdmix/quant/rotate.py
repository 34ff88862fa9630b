"""QuaRot's offline rotation (msModelSlim's `quarot` processor with `online: False`): the float model
seen in a rotated basis before anything is quantized.

The residual stream is rotated by one orthonormal Hadamard matrix Q (hidden x hidden): the embeddings
become E Q, every linear reading the residual W diag(g) Q (its RMSNorm weight g folded in, the norm
set to ones: RMSNorm commutes with Q only when its weight is uniform), every linear writing to it
Q^T W, and the lm_head (with the final norm's weight) likewise. Each attention head's values are
rotated too, by a head_dim Hadamard H: v_proj's output per head H^T, o_proj's input per head H.
The model computes the same function in exact arithmetic; its activations, the attention sink's
massive channels included, are spread over every channel, which is what per-token and per-tensor
int8 need. Nothing runs online, so the checkpoint is an ordinary W8A8_MIX one; a tied lm_head
becomes a tensor of its own (E Q cannot serve both ends once the final norm is folded in).

Each matrix is the Kronecker product of a Paley matrix of order m (a prime q = 3 mod 4 gives order
q + 1, q = 1 mod 4 order 2(q + 1)) and Sylvester's of order 2^k, as in QuaRot's and msModelSlim's tables;
it is applied factor by factor, so a row costs O(n (m + 2^k)) rather than O(n^2).
"""

from functools import lru_cache

import torch

from pdmix.errors import PdmixError
from pdmix.models.arch import BY_NAME, ROUTER

ROTATIONS = ("none", "quarot")
ROW_BLOCK = 8192  # rows of an embedding table rotated at a time


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = the quadratic character of (j - i) mod q."""
    squares = {(i * i) % q for i in range(1, q)}
    d = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)[d]


def _paley(m: int) -> torch.Tensor | None:
    """A {-1, 1} Hadamard matrix of order m by Paley's constructions, or None."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(m - 1)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), {-1, 1} Hadamard matrices of orders m and 2^k with m 2^k = n, the largest 2^k Paley allows:
    the orthonormal rotation is kron(A, B) / sqrt(n). Raises ValueError when no such pair exists."""
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        a = _paley(n // p)
        if a is not None:
            return a, _sylvester(p)
        p //= 2
    raise ValueError(f"no Hadamard matrix of order {n} from Paley's constructions and powers of two")


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal n x n rotation (float64)."""
    a, b = hadamard_factors(n)
    return torch.kron(a, b) / n ** 0.5


def rotate(x: torch.Tensor, n: int) -> torch.Tensor:
    """x @ Q over x's last dimension, blocks of n at a time (n < the dimension: each head's), in fp32."""
    a, b = (f.to(torch.float32) for f in hadamard_factors(n))
    shape = x.shape
    y = x.to(torch.float32).reshape(-1, a.shape[0], b.shape[0])
    y = torch.einsum("rab,ac,bd->rcd", y, a, b) / n ** 0.5
    return y.reshape(shape)


def check_rotatable(cfg) -> None:
    """--rotation quarot needs a Hadamard matrix of hidden_size and of head_dim."""
    for field, n in (("hidden_size", cfg.hidden_size), ("head_dim", cfg.head_dim)):
        try:
            hadamard_factors(n)
        except ValueError:
            raise PdmixError(f"--rotation quarot: the model's {field} {n} has no Hadamard matrix pdmix can build "
                             "(m x 2^k with m - 1 a prime = 3 mod 4, or m / 2 - 1 a prime = 1 mod 4)") from None


class RotatedSource:
    """A float checkpoint (format.reader.SafetensorsFolder) read through the rotation: the same tensor
    names, shapes and dtypes, each computed when read; `lm_head.weight` exists even where the source ties it."""

    HEAD, EMBED, NORM = "lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"

    def __init__(self, st, cfg, dtype: torch.dtype | None = None):
        """dtype: of the rotated tensors (None: each source tensor's own)."""
        check_rotatable(cfg)
        self.st, self.cfg, self.dtype = st, cfg, dtype

    def names(self) -> list[str]:
        return self.st.names() + ([self.HEAD] if self.HEAD not in self.st else [])

    def __contains__(self, name: str) -> bool:
        return name == self.HEAD or name in self.st

    def release(self) -> None:
        self.st.release()

    def get_rows(self, name: str, rows: list[int]) -> dict[int, torch.Tensor]:
        assert name == self.EMBED, name
        return {r: self._rows(v, None) for r, v in self.st.get_rows(name, rows).items()}

    def get(self, name: str) -> torch.Tensor:
        if name == self.EMBED:
            return self._rows(self.st.get(name), None)
        if name == self.HEAD:
            head = self.st.get(self.HEAD if self.HEAD in self.st else self.EMBED)
            return self._rows(head, self.st.get(self.NORM))
        w = self.st.get(name)
        dtype = self.dtype or w.dtype
        if name == self.NORM or name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            return torch.ones_like(w, dtype=dtype)
        parts = name.split(".")  # model.layers.<i>.<block>[.experts.<e>].<linear>.<weight|bias>
        if not name.startswith("model.layers.") or parts[-1] not in ("weight", "bias"):
            return w.to(dtype)
        block, linear, weight = parts[3], parts[-2], parts[-1] == "weight"
        lin = BY_NAME.get(linear)
        h, hd = self.cfg.hidden_size, self.cfg.head_dim
        x = w.to(torch.float32)
        if f"{block}.{linear}" == ROUTER or (lin is not None and lin.in_dim == "hidden"):
            if weight:  # W diag(g) Q
                norm = f"model.layers.{parts[2]}.{'input' if block == 'self_attn' else 'post_attention'}_layernorm.weight"
                x = rotate(x * self.st.get(norm).to(torch.float32), h)
            if linear == "v_proj":  # each kv head's outputs: H^T W_head, b_head H
                x = rotate(x.T, hd).T if weight else rotate(x, hd)
        elif lin is not None and lin.out_dim == "hidden":  # Q^T W, b Q
            x = rotate(x.T, h).T if weight else rotate(x, h)
            if linear == "o_proj" and weight:  # each head's inputs: W_head H
                x = rotate(x, hd)
        else:
            return w.to(dtype)
        return x.to(dtype)

    def _rows(self, w: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """Embedding rows (norm None: E Q) or the lm_head after the final norm (W diag(g) Q); in blocks of
        rows, so a vocabulary-sized table never has an fp32 copy."""
        out = torch.empty_like(w, dtype=self.dtype or w.dtype)
        g = None if norm is None else norm.to(torch.float32)
        for s in range(0, w.shape[0], ROW_BLOCK):
            x = w[s:s + ROW_BLOCK].to(torch.float32)
            out[s:s + ROW_BLOCK] = rotate(x if g is None else x * g, self.cfg.hidden_size)
        return out
