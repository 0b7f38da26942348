"""The parameter tape: every random draw of one IPMix view, as one flat float32 record per sample.

DALI draws the raw uniforms (seeded and checkpointable, like any DALI random op); ``decode`` turns
them into IPMix parameters with the official code's distributions (``IPMix_utils.py`` and
``imagenet.py``: the chain kind and depth, the op and level of every step, the patch window, get_ab's
a and b, the mask threshold; README "One record drives every implementation").  ``decode`` is
written once against a tiny array namespace and runs on NumPy arrays (the reference sampler) and
on DALI DataNodes (the readable backend's graph); the fused backend's Triton decoder follows the
same rules and is tested equal to it bit for bit.

The record drives every implementation: the readable DALI graph (``dali_ipmix.ops``), the fused
backend (``dali_ipmix.fused``, ``dali_ipmix.triton_kernels``) and the NumPy/PIL reference
(``dali_ipmix.reference``).  Layout (``TapeLayout``): ``[skip | chain fields (k x C) | step
fields (k x t x S)]``; raw uniforms per view: ``uniform_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import config as C

# Per-chain fields.
CHAIN_FIELDS = ("weight", "kind", "depth")
# Per-step fields.  Inactive steps (j >= depth) have active_img = active_p = 0 and are the
# identity in every backend.  top/left/height/width are the patch window in pixels.
STEP_FIELDS = (
    "active_img", "active_p", "op", "mag",
    "mix", "self_mix", "self_op", "self_mag",
    "top", "left", "height", "width",
    "a", "b", "p", "seed",
)
CF = {n: i for i, n in enumerate(CHAIN_FIELDS)}
SF = {n: i for i, n in enumerate(STEP_FIELDS)}

# Raw uniforms consumed per step, per chain and per view.
STEP_DRAWS = (
    "img_op", "img_level", "img_sign",
    "size", "mix", "partner", "self_op", "self_level", "self_sign",
    "top", "left", "square", "height", "width",
    "ab_branch", "a", "b", "p", "seed",
)
CHAIN_DRAWS = ("weight", "kind", "depth")
SD = {n: i for i, n in enumerate(STEP_DRAWS)}
CD = {n: i for i, n in enumerate(CHAIN_DRAWS)}

SEED_RANGE = 1 << 24          # noise seeds are integers below 2^24: exact in float32


@dataclass(frozen=True)
class TapeLayout:
    k: int
    t: int

    @property
    def size(self) -> int:
        return 1 + self.k * len(CHAIN_FIELDS) + self.k * self.t * len(STEP_FIELDS)

    SKIP = 0                  # the skip weight's offset

    def chain_field(self, i: int, name: str) -> int:
        """The offset of chain ``i``'s field ``name`` (``CHAIN_FIELDS``)."""
        return 1 + i * len(CHAIN_FIELDS) + CF[name]

    def step_slice(self, i: int, j: int) -> slice:
        """The offsets of step ``j`` of chain ``i``: its ``STEP_FIELDS`` record."""
        start = 1 + self.k * len(CHAIN_FIELDS) + (i * self.t + j) * len(STEP_FIELDS)
        return slice(start, start + len(STEP_FIELDS))

    def unpack(self, tape):
        """Split tapes ``[..., size]`` (NumPy or torch) into ``skip [...]``,
        ``chains [..., k, C]`` and ``steps [..., k, t, S]`` views."""
        lead = tuple(tape.shape[:-1])
        if tape.shape[-1] != self.size:
            raise ValueError(f"tape has {tape.shape[-1]} values, layout k={self.k} t={self.t} "
                             f"needs {self.size}")
        c0, s0 = 1, 1 + self.k * len(CHAIN_FIELDS)
        skip = tape[..., self.SKIP]
        chains = tape[..., c0:s0].reshape(lead + (self.k, len(CHAIN_FIELDS)))
        steps = tape[..., s0:].reshape(lead + (self.k, self.t, len(STEP_FIELDS)))
        return skip, chains, steps


# ---------------------------------------------------------------------------------------------
# Array namespaces: the handful of primitives ``decode`` needs.

class NumpyArrays:
    @staticmethod
    def const(a):
        return np.asarray(a, dtype=np.float32)

    f32 = staticmethod(lambda x: np.asarray(x, dtype=np.float32))
    floor = staticmethod(np.floor)
    log = staticmethod(np.log)
    pow = staticmethod(lambda x, y: np.power(x, np.float32(y), dtype=np.float32))
    minimum = staticmethod(lambda x, c: np.minimum(x, np.float32(c)))
    sum_last = staticmethod(lambda x: x.sum(-1, dtype=np.float32))
    sum_keep = staticmethod(lambda x: x.sum(-1, keepdims=True, dtype=np.float32))
    expand_last = staticmethod(lambda x: x[..., None])
    stack_last = staticmethod(lambda xs: np.stack(xs, -1))
    flat_cat = staticmethod(lambda xs: np.concatenate([x.reshape(x.shape[:1] + (-1,)) for x in xs], 1))

    @staticmethod
    def col(u, index, ndim):
        return u[..., index]


class DaliArrays:
    """The same primitives on DALI DataNodes (CPU per-sample tensors)."""

    def __init__(self):
        from nvidia.dali import fn, types
        import nvidia.dali.math as dmath
        self.fn, self.types, self.dmath = fn, types, dmath

    def const(self, a):
        return self.types.Constant(np.asarray(a, dtype=np.float32), device="cpu")

    def f32(self, x):
        return self.fn.cast(x, dtype=self.types.FLOAT)

    def floor(self, x):
        return self.dmath.floor(x)

    def log(self, x):
        return self.dmath.log(x)

    def pow(self, x, y):
        return self.dmath.pow(x, float(y))

    def minimum(self, x, c):
        return self.dmath.min(x, float(c))

    def sum_last(self, x):
        return self.fn.reductions.sum(x, axes=[-1])

    def sum_keep(self, x):
        return self.fn.reductions.sum(x, axes=[-1], keep_dims=True)

    def expand_last(self, x):
        return self.fn.stack(x, axis=-1)

    def stack_last(self, xs):
        return self.fn.stack(*xs, axis=-1)

    def flat_cat(self, xs):
        return self.fn.cat(*[self.fn.reshape(x, shape=[-1]) for x in xs], axis=0)

    @staticmethod
    def col(u, index, ndim):
        # DataNode indexing has no Ellipsis: spell out the per-sample dimensions.
        return u[(slice(None),) * (ndim - 1) + (index,)]


# ---------------------------------------------------------------------------------------------

def _table(values):
    return np.asarray(values, dtype=np.float32)


def _op_tables(cfg: C.IPMixConfig):
    """The op table's level -> magnitude coefficients as arrays indexed by op, so that ``mag = B +
    A * maybe_floor(level * M / 10)`` and the sign flip are table look-ups (``config.OP_TABLE``)."""
    recs = [C.OPS_BY_NAME[op] for op in cfg.ops]
    return tuple(_table(v) for v in (
        [r.scale for r in recs], [r.maxval_for(cfg.image_size) for r in recs],
        [r.offset for r in recs], [float(r.truncate) for r in recs], [float(r.signed) for r in recs]))


def _randint(xp, u, lo, hi):
    """Uniform integer in [lo, hi] (both inclusive) from u in [0, 1)."""
    n = hi - lo + 1
    return xp.minimum(xp.floor(u * n), n - 1) + lo


def _lookup(xp, index, table):
    """table[index] elementwise, as a one-hot dot product (DALI has no per-element gather)."""
    onehot = xp.f32(xp.expand_last(index) == xp.const(np.arange(len(table), dtype=np.float32)))
    return xp.sum_last(onehot * xp.const(table))


def _magnitude(xp, op, u_level, u_sign, cfg, tables):
    A, M, B, F, SIGN = tables
    level = u_level * (cfg.severity - 0.1) + 0.1            # sample_level: U[0.1, severity)
    raw = level * _lookup(xp, op, M) / 10
    floored = _lookup(xp, op, F)
    v = floored * xp.floor(raw) + (1 - floored) * raw
    mag = _lookup(xp, op, B) + _lookup(xp, op, A) * v
    flip = xp.f32(u_sign > 0.5) * _lookup(xp, op, SIGN)    # official: if uniform() > 0.5: negate
    return mag * (1 - 2 * flip)


def decode(u_view, u_chain, u_step, cfg: C.IPMixConfig, xp=NumpyArrays):
    """Turn raw uniforms into one tape per sample.

    u_view  [..., 1]                 (skip weight)
    u_chain [..., k, len(CHAIN_DRAWS)]
    u_step  [..., k, t, len(STEP_DRAWS)]
    All uniforms in [0, 1).  Returns (skip, chains, steps) arrays of the same library.
    """
    k, t = cfg.k, cfg.t
    tables = _op_tables(cfg)
    nops = len(cfg.ops)
    S = cfg.image_size

    # Dirichlet(1,...,1) = normalised Exp(1) draws; Beta(1,1) = U(0,1).
    expo = -xp.log(1 - xp.col(u_chain, CD["weight"], 2))
    weight = expo / xp.sum_keep(expo)
    skip = xp.col(u_view, 0, 1)
    kind = xp.f32(xp.col(u_chain, CD["kind"], 2) >= 0.5)        # random.choice(['IMG', 'P'])
    depth = _randint(xp, xp.col(u_chain, CD["depth"], 2), cfg.depth_min, t)
    chains = xp.stack_last([weight, kind, depth])

    col = lambda name: xp.col(u_step, SD[name], 3)  # noqa: E731
    step_index = xp.const(np.broadcast_to(np.arange(t, dtype=np.float32), (k, t)))
    active = xp.f32(step_index < xp.expand_last(depth))
    kind_s = xp.expand_last(kind)
    active_p = active * kind_s
    active_img = active - active_p

    op = _randint(xp, col("img_op"), 0, nops - 1)
    mag = _magnitude(xp, op, col("img_level"), col("img_sign"), cfg, tables)

    size = _lookup(xp, _randint(xp, col("size"), 0, len(cfg.patch_sizes) - 1), _table(cfg.patch_sizes))
    mix = _randint(xp, col("mix"), 0, len(C.MIXING_OPS) - 1)
    # official: if random.random() > 0.5: partner = fractal, else an augmented copy of x
    self_mix = xp.f32(col("partner") <= 0.5) * (1.0 if cfg.self_mix else 0.0)
    self_op = _randint(xp, col("self_op"), 0, nops - 1)
    self_mag = _magnitude(xp, self_op, col("self_level"), col("self_sign"), cfg, tables)
    top = xp.floor(col("top") * (S - size + 1))              # random.randint(0, S - s)
    left = xp.floor(col("left") * (S - size + 1))
    square = xp.f32(col("square") < cfg.square_prob)
    rect_h = xp.floor(col("height") * (size - 1)) + 2        # random.randint(2, s)
    rect_w = xp.floor(col("width") * (size - 1)) + 2
    height = square * size + (1 - square) * rect_h
    width = square * size + (1 - square) * rect_w

    # get_ab(beta): Beta(b,1) = U^(1/b), Beta(1,b) = 1 - U^(1/b) (two independent draws).
    inv_beta = 1.0 / cfg.beta
    beta_b1 = xp.pow(col("a"), inv_beta)
    beta_1b_a = 1 - beta_b1
    beta_1b_b = 1 - xp.pow(col("b"), inv_beta)
    interp = xp.f32(col("ab_branch") < 0.5)
    a = interp * beta_b1 + (1 - interp) * (1 + beta_1b_a)
    b = interp * beta_1b_b - (1 - interp) * beta_1b_b
    p = col("p")
    seed = xp.floor(col("seed") * SEED_RANGE)

    steps = xp.stack_last([active_img, active_p, op, mag, mix, self_mix, self_op, self_mag,
                           top, left, height, width, a, b, p, seed])
    return skip, chains, steps


def pack(skip, chains, steps, xp=NumpyArrays):
    """Concatenate (skip, chains, steps) into flat tapes [batch, size] (NumPy) or a 1-D per-sample
    DALI tensor."""
    if xp is NumpyArrays:
        return np.concatenate([skip.reshape(-1, 1), chains.reshape(len(chains), -1),
                               steps.reshape(len(steps), -1)], 1).astype(np.float32)
    return xp.flat_cat([skip, chains, steps])


def uniform_size(cfg: C.IPMixConfig) -> int:
    """Raw uniforms per view, flat: ``[skip | chain draws (k x CD) | step draws (k x t x SD)]``."""
    return 1 + cfg.k * len(CHAIN_DRAWS) + cfg.k * cfg.t * len(STEP_DRAWS)


def split_uniforms(u, cfg: C.IPMixConfig):
    """Flat uniforms ``[..., uniform_size(cfg)]`` -> the (u_view, u_chain, u_step) that ``decode``
    takes (views of the same array)."""
    lead = tuple(u.shape[:-1])
    if u.shape[-1] != uniform_size(cfg):
        raise ValueError(f"uniforms have {u.shape[-1]} values per view, k={cfg.k} t={cfg.t} "
                         f"needs {uniform_size(cfg)}")
    c0, s0 = 1, 1 + cfg.k * len(CHAIN_DRAWS)
    return (u[..., :c0], u[..., c0:s0].reshape(lead + (cfg.k, len(CHAIN_DRAWS))),
            u[..., s0:].reshape(lead + (cfg.k, cfg.t, len(STEP_DRAWS))))


def decode_flat(u: np.ndarray, cfg: C.IPMixConfig) -> np.ndarray:
    """Tapes ``[..., L]`` from flat uniforms ``[..., uniform_size(cfg)]`` with NumPy."""
    u = np.asarray(u, dtype=np.float32)
    lead = u.shape[:-1]
    flat = u.reshape(-1, u.shape[-1])
    return pack(*decode(*split_uniforms(flat, cfg), cfg)).reshape(lead + (-1,))


def draw_uniforms(rng: np.random.Generator, cfg: C.IPMixConfig, batch: int):
    """Raw uniforms for ``batch`` tapes from a NumPy generator (the reference sampler)."""
    f = lambda *shape: rng.random((batch,) + shape, dtype=np.float32)  # noqa: E731
    return f(1), f(cfg.k, len(CHAIN_DRAWS)), f(cfg.k, cfg.t, len(STEP_DRAWS))


def sample(rng: np.random.Generator, cfg: C.IPMixConfig, batch: int) -> np.ndarray:
    """``batch`` tapes drawn with NumPy: [batch, TapeLayout(k, t).size] float32."""
    return pack(*decode(*draw_uniforms(rng, cfg, batch), cfg))


def dali_tape(cfg: C.IPMixConfig, seed=None):
    """Inside a pipeline definition: one tape per sample as a CPU DataNode [size] float32."""
    from nvidia.dali import fn
    xp = DaliArrays()
    kw = {} if seed is None else {"seed": seed}
    u = lambda *shape: fn.random.uniform(range=[0.0, 1.0], shape=list(shape), **kw)  # noqa: E731
    return pack(*decode(u(1), u(cfg.k, len(CHAIN_DRAWS)), u(cfg.k, cfg.t, len(STEP_DRAWS)), cfg, xp), xp=xp)


def dali_uniforms(cfg: C.IPMixConfig, views: int, seed=None):
    """Inside a pipeline definition: the raw uniforms of ``views`` IPMix views per sample as one
    CPU DataNode ``[views, uniform_size(cfg)]`` float32, for a backend that decodes them itself
    (the fused kernels).  Seeded and checkpointed like every DALI random op."""
    from nvidia.dali import fn
    kw = {} if seed is None else {"seed": seed}
    return fn.random.uniform(range=[0.0, 1.0], shape=[views, uniform_size(cfg)], **kw)
