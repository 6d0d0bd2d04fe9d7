"""The dense float64 interpreter: the meaning of a mixer program.

Every sequence matrix is materialized (per batch and dims, T x T, float64)
and applied by an explicit sum over s. Slow and obviously right; every other
path is tested against it.

Values are named tensors (`V`): a torch tensor plus the names of its axes.
Leading axes are "b" (batch), "t" (time, or matrix row), "s" (matrix
column), "l" (kernel lag); then the dims of the value's IR type, laid out
exactly in the type's order. Elementwise ops line axes up by name; a group
dim G (`G divides H`) is expanded to H by repeating each group H/G times, so
head h reads group h // (H/G).

Matrices are evaluated on a block of rows `ti` and columns `si` (absolute
time positions), which bounds memory at long T and lets a decode step
evaluate only its last row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ir
from .errors import MixerValueError
from .ir import MATRIX, STATIC, TOKEN
from .runtime.bind import signature_of
from .runtime.state import MixerState, check_state

PREFIX = ("b", "t", "s", "l")
BLOCK_ELEMENTS = 1 << 23  # float64 elements per materialized row block (64 MiB)


@dataclass
class V:
    data: torch.Tensor
    axes: tuple

    def __post_init__(self):
        assert self.data.dim() == len(self.axes), (self.data.shape, self.axes)


def _unary(op: str, x: torch.Tensor) -> torch.Tensor:
    if op == "neg":
        return -x
    if op == "not":
        return ~x
    if op == "softplus":  # exact for all x (F.softplus switches to x above 20)
        return torch.logaddexp(x, torch.zeros((), dtype=x.dtype, device=x.device))
    if op == "silu":
        return x * torch.sigmoid(x)
    return {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "sigmoid": torch.sigmoid,
            "elu": F.elu, "relu": torch.relu, "tanh": torch.tanh, "abs": torch.abs,
            "logsigmoid": F.logsigmoid}[op](x)


def _binary(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if op == "mul":
        if a.dtype == torch.bool and b.dtype == torch.bool:
            return a & b
        if a.dtype == torch.bool:  # select, so masked overflow never turns into NaN
            return torch.where(a, b, torch.zeros((), dtype=b.dtype, device=b.device))
        if b.dtype == torch.bool:
            return torch.where(b, a, torch.zeros((), dtype=a.dtype, device=a.device))
        return a * b
    return {"add": torch.add, "sub": torch.sub, "div": torch.div, "pow": torch.pow,
            "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq,
            "ne": torch.ne, "and": torch.logical_and, "or": torch.logical_or}[op](a, b)


class Evaluator:
    """Evaluates one program on bound float64 tensors.

    env: name -> tensor for inputs ([B, T, *dims]), params ([*dims]) and
    kernels ([L, *dims]). sizes: dim name -> int. B, T: batch and sequence length.
    """

    def __init__(self, program: ir.Program, env: dict, sizes: dict, B: int, T: int):
        self.p = program
        self.env = env
        self.sizes = dict(sizes)
        for d in program.dims.values():
            if d.size is not None:
                self.sizes.setdefault(d.name, d.size)
        self.B, self.T = B, T
        self.groups = program.groups
        self.device = next((v.device for v in env.values()), torch.device("cpu"))
        self.memo: dict = {}

    # ------------------------------------------------------------- layout
    def layout(self, v: V, axes: tuple) -> V:
        """Permute v to `axes` (a superset of v's axes up to group renames),
        inserting size-1 axes for the ones it lacks."""
        v = self.regroup(v, axes)
        missing = [a for a in v.axes if a not in axes]
        assert not missing, (v.axes, axes)
        present = [a for a in axes if a in v.axes]
        data = v.data.permute([v.axes.index(a) for a in present])
        shape = [data.shape[present.index(a)] if a in v.axes else 1 for a in axes]
        return V(data.reshape(shape), tuple(axes))

    def regroup(self, v: V, target: tuple) -> V:
        """Expand group dims of v that `target` names by their head dim."""
        data, axes = v.data, list(v.axes)
        for i, a in enumerate(list(axes)):
            h = self.groups.get(a)
            if h and h in target and a not in target and h not in axes:
                rep = self.sizes[h] // self.sizes[a]
                data = data.repeat_interleave(rep, dim=i) if data.shape[i] > 1 else data
                axes[i] = h
        return V(data, tuple(axes))

    def union(self, a: V, b: V) -> tuple:
        a = self.regroup(a, b.axes)
        b = self.regroup(b, a.axes)
        prefix = tuple(p for p in PREFIX if p in a.axes or p in b.axes)
        rest = tuple(x for x in dict.fromkeys(a.axes + b.axes) if x not in PREFIX)
        axes = prefix + rest
        return self.layout(a, axes), self.layout(b, axes), axes

    def finish(self, node: ir.Node, v: V) -> V:
        """Lay v out as node's type says: prefix axes, then type.dims + contracted."""
        prefix = tuple(p for p in PREFIX if p in v.axes)
        return self.layout(v, prefix + node.type.axes)

    # ------------------------------------------------------------- dispatch
    def value(self, node: ir.Node, rows=None) -> V:
        """Token, static or kernel value. rows: absolute time positions or None.

        Whole-sequence values (and statics) are memoized; a row block's values
        are not: kept for the whole call, thousands of small blocks interleaved
        with the big temporaries fragmented the heap (RSS grew ~T^2, 22 GB for
        linear_attention at T=2048)."""
        kind = node.type.kind
        if kind == MATRIX:
            raise TypeError("internal: value() of a matrix")
        if rows is not None and (kind == STATIC or self._all_rows(rows)):
            rows = None
        if rows is None and id(node) in self.memo:
            return self.memo[id(node)]
        out = self.finish(node, getattr(self, "v_" + type(node).__name__)(node, rows))
        if rows is None:
            self.memo[id(node)] = out
        return out

    def _all_rows(self, rows: torch.Tensor) -> bool:
        return len(rows) == self.T and bool((rows == self.full_rows()).all())

    def matrix(self, node: ir.Node, ti: torch.Tensor, si: torch.Tensor) -> V:
        if node.type.kind != MATRIX:  # statics inside matrix expressions
            return self.value(node)
        return self.finish(node, getattr(self, "m_" + type(node).__name__)(node, ti, si))

    def subtree_axes(self, node: ir.Node) -> tuple:
        """Every named axis materialized while evaluating node (sizes a row block)."""
        return tuple(dict.fromkeys(a for n in ir.walk(node) for a in n.type.axes))

    def full_rows(self) -> torch.Tensor:
        return torch.arange(self.T, device=self.device)

    # ------------------------------------------------------------- leaves
    def v_Input(self, node, rows):
        x = self.env[node.name]
        if rows is not None:
            x = x[:, rows]
        return V(x, ("b", "t") + node.type.dims)

    def v_Param(self, node, rows):
        return V(self.env[node.name], node.type.dims)

    def v_KernelRef(self, node, rows):
        return V(self.env[node.name], ("l",) + node.type.dims)

    def v_Const(self, node, rows):
        return V(torch.tensor(node.value, dtype=torch.float64, device=self.device), ())

    def v_DimSize(self, node, rows):
        return V(torch.tensor(float(self.sizes[node.dim]), dtype=torch.float64,
                              device=self.device), ())

    def v_Random(self, node, rows):
        a, b = (float(self.value(x).data) for x in node.args)
        shape = tuple(self.sizes[d] for d in node.type.dims)
        g = getattr(self, "generator", None)
        if node.dist == "uniform":
            x = torch.rand(shape, generator=g, dtype=torch.float64) * (b - a) + a
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64) * b + a
        return V(x.to(self.device), node.type.dims)

    def v_Taps(self, node, rows):
        w = self.value(node.w)
        return V(w.data.movedim(-1, 0), ("l",) + w.axes[:-1])

    # ------------------------------------------------------------- elementwise
    def _map(self, node, get):
        vals = [get(a) for a in node.args]
        if len(vals) == 1:
            return V(_unary(node.op, vals[0].data), vals[0].axes)
        a, b, axes = self.union(*vals)
        return V(_binary(node.op, a.data, b.data), axes)

    def v_Map(self, node, rows):
        return self._map(node, lambda a: self.value(a, rows))

    def m_Map(self, node, ti, si):
        return self._map(node, lambda a: self.matrix(a, ti, si))

    def _sum(self, v: V, dim: str) -> V:
        i = v.axes.index(dim)
        return V(v.data.sum(i), v.axes[:i] + v.axes[i + 1:])

    def v_Sum(self, node, rows):
        return self._sum(self.value(node.x, rows), node.dim)

    def m_Sum(self, node, ti, si):
        return self._sum(self.matrix(node.x, ti, si), node.dim)

    def m_Contract(self, node, ti, si):
        v = self.matrix(node.x, ti, si)
        for d in node.x.type.contracted:
            v = self._sum(v, d)
        return v

    # ------------------------------------------------------------- token ops
    def v_Shift(self, node, rows):
        rows = self.full_rows() if rows is None else rows
        src = rows - node.k
        valid = (src >= 0) & (src < self.T)
        x = self.value(node.x, src.clamp(0, self.T - 1))
        mask = valid.view(1, -1, *([1] * (x.data.dim() - 2)))
        return V(torch.where(mask, x.data, torch.zeros((), dtype=x.data.dtype)), x.axes)

    def v_Rev(self, node, rows):
        rows = self.full_rows() if rows is None else rows
        return self.value(node.x, self.T - 1 - rows)

    def v_Apply(self, node, rows):
        rows = self.full_rows() if rows is None else rows
        si = self.full_rows()
        u = self.value(node.u)
        if node.u.type.kind == TOKEN:
            u = V(u.data, tuple("s" if a == "t" else a for a in u.axes))
        width = self.T * self.B * _numel(self.sizes, self.subtree_axes(node))
        block = max(1, BLOCK_ELEMENTS // max(width, 1))
        out = None  # written block by block: no small buffers kept between big ones
        for start in range(0, len(rows), block):
            ti = rows[start:start + block]
            m = self.matrix(node.m, ti, si)
            a, b, axes = self.union(m, u)
            y = a.data * b.data
            if y.shape[axes.index("s")] == 1 and len(si) != 1:
                # the same value in every column (row(z) @ 1): the sum over s is T of it
                y = y * float(len(si))
            y = y.sum(axes.index("s"))
            axes = tuple(x for x in axes if x != "s")
            t = axes.index("t")
            if out is None:
                shape = list(y.shape)
                shape[t] = len(rows)
                out = V(y.new_empty(shape), axes)
            out.data.narrow(t, start, len(ti)).copy_(y)
            del m, a, b, y
        if out is not None and "b" not in out.axes:  # M @ 1 with M free of tokens: a
            out = V(out.data.unsqueeze(0), ("b",) + out.axes)  # token all the same per batch
        return out

    # ------------------------------------------------------------- matrices
    def m_Index(self, node, ti, si):
        if node.which == "t":
            return V(ti.to(torch.float64).view(-1, 1), ("t", "s"))
        return V(si.to(torch.float64).view(1, -1), ("t", "s"))

    def m_LowRank(self, node, ti, si):
        u = self.value(node.u, ti)
        w = self.value(node.w, si)
        w = V(w.data, tuple("s" if a == "t" else a for a in w.axes))
        a, b, axes = self.union(u, w)
        return V(a.data * b.data, axes)

    def m_Decay(self, node, ti, si):
        lower = ti.view(-1, 1) >= si.view(1, -1)
        a = self.value(node.a)
        if node.a.type.kind == STATIC:  # constant decay: sum over (s, t] = a * (t - s)
            lag = (ti.view(-1, 1) - si.view(1, -1)).to(torch.float64)
            seg = V(lag.view(lag.shape + (1,) * a.data.dim()) * a.data, ("t", "s") + a.axes)
        else:
            cs = a.data.cumsum(1)  # inclusive; segment (s, t] = cs[t] - cs[s]
            ct = V(cs[:, ti], a.axes)
            cs_ = V(cs[:, si], tuple("s" if x == "t" else x for x in a.axes))
            x, y, axes = self.union(ct, cs_)
            seg = V(x.data - y.data, axes)
        mask = self.layout(V(lower, ("t", "s")), seg.axes).data
        return V(seg.data.masked_fill(~mask, float("-inf")).exp(), seg.axes)

    def m_Toeplitz(self, node, ti, si):
        h = self.value(node.h)
        L = h.data.shape[0]
        lag = ti.view(-1, 1) - si.view(1, -1)
        valid = (lag >= 0) & (lag < L)
        taps = h.data[lag.clamp(0, L - 1)]  # [t, s, *dims]
        mask = valid.view(*valid.shape, *([1] * (taps.dim() - 2)))
        return V(torch.where(mask, taps, torch.zeros((), dtype=taps.dtype)),
                 ("t", "s") + h.axes[1:])

    def m_Softmax(self, node, ti, si):
        full = self.full_rows()  # a row's normalizer needs every column
        scores = self.matrix(node.scores, ti, full)
        scores = self.layout(scores, _with_ts(scores.axes))
        if node.mask is not None:
            mask = self.matrix(node.mask, ti, full)
            scores, mask, axes = self.union(scores, mask)
            ninf = torch.tensor(float("-inf"), dtype=scores.data.dtype)
            scores = V(torch.where(mask.data, scores.data, ninf), axes)
        sdim = scores.axes.index("s")
        data = scores.data.expand(*[self.T if a == "s" else n
                                    for a, n in zip(scores.axes, scores.data.shape)])
        p = torch.softmax(data, dim=sdim)
        if node.mask is not None:  # a row with no allowed key is 0 (a nan score stays nan)
            anything = (data > -math.inf).any(dim=sdim, keepdim=True) | data.isnan().any(
                dim=sdim, keepdim=True)
            p = torch.where(anything, p, torch.zeros((), dtype=p.dtype))
        if len(si) != self.T or not torch.equal(si, full):
            p = p.index_select(sdim, si)
        return V(p, scores.axes)

    def m_Shift(self, node, ti, si):
        src = ti - node.k
        valid = (src >= 0) & (src < self.T)
        m = self.matrix(node.x, src.clamp(0, self.T - 1), si)
        m = self.layout(m, _with_ts(m.axes))
        shape = [1] * m.data.dim()
        shape[m.axes.index("t")] = len(ti)
        zero = torch.zeros((), dtype=m.data.dtype)
        return V(torch.where(valid.view(shape), m.data, zero), m.axes)

    def m_Rev(self, node, ti, si):
        return self.matrix(node.x, self.T - 1 - ti, self.T - 1 - si)

    def m_Transpose(self, node, ti, si):
        m = self.matrix(node.m, si, ti)
        m = self.layout(m, _with_ts(m.axes))
        axes = tuple({"t": "s", "s": "t"}.get(a, a) for a in m.axes)
        return V(m.data, axes)

    def m_Row(self, node, ti, si):
        u = self.value(node.u, ti)
        return self.layout(u, _with_ts(u.axes))

    def m_Col(self, node, ti, si):
        u = self.value(node.u, si)
        u = V(u.data, tuple("s" if a == "t" else a for a in u.axes))
        return self.layout(u, _with_ts(u.axes))


def _with_ts(axes: tuple) -> tuple:
    prefix = tuple(p for p in PREFIX if p in axes or p in ("t", "s"))
    return prefix + tuple(a for a in axes if a not in PREFIX)


def _numel(sizes: dict, dims) -> int:
    n = 1
    for d in dict.fromkeys(dims):
        n *= sizes.get(d, 1)
    return n


# ------------------------------------------------------------------ backend


class DenseBackend:
    """Runs a program through the Evaluator in float64; casts back at the end.

    Its decode state is a MixerState holding every token input seen so far
    (name -> [batch, t, *dims]): exact for any causal mixer (the next output
    is the last row of the dense program over the history); O(t) memory."""

    name = "dense"

    def __init__(self, program: ir.Program):
        self.p = program
        self.owner = (program.name, program.hash(), "dense")

    def _history(self, state, bound) -> dict | None:
        """The inputs a state of this program holds, checked against it."""
        what = "initial_state" if bound.time is not None else "state"  # a call / a step
        if check_state(state, self.owner, bound.sizes, bound.batch, what) is None:
            return None
        if set(state.tensors) != set(bound.inputs):
            raise MixerValueError(f"{what} does not belong to {self.p.name}: it holds "
                                  f"{sorted(state.tensors)}, expected {sorted(bound.inputs)}")
        for n, x in state.tensors.items():
            want = bound.inputs[n].shape[2:] if bound.time is not None else \
                bound.inputs[n].shape[1:]
            if x.dim() < 2 or x.shape[1] != state.length or x.shape[2:] != want:
                raise MixerValueError(f"{what}[{n!r}] has shape {list(x.shape)}, not "
                                      f"[batch, {state.length}, {', '.join(map(str, want))}]")
        return state.tensors

    def _env(self, bound, history: dict | None):
        env = {}
        for n, x in bound.inputs.items():
            x = x.to(torch.float64)
            if history is not None:
                x = torch.cat([history[n].to(device=x.device, dtype=torch.float64), x], 1)
            env[n] = x
        for n, x in list(bound.params.items()) + list(bound.kernels.items()):
            env[n] = x.to(torch.float64)
        return env

    def run(self, bound, history: dict | None, rows_from: int):
        """Outputs at time rows_from..end of the (history + new) sequence."""
        env = self._env(bound, history)
        T = next(iter(env[n] for n in bound.inputs)).shape[1]
        sizes = dict(bound.sizes)
        sizes.update({d.name: d.size for d in self.p.dims.values() if d.size is not None})
        shapes = [(bound.batch, T - rows_from) + tuple(sizes[d] for d in node.type.dims)
                  for node in self.p.outs.values()]
        if T == rows_from or bound.batch == 0 or bound.device.type == "meta":
            # nothing to evaluate (no new token, no sequence), or shapes only (meta)
            return [torch.zeros(s, dtype=bound.dtype, device=bound.device) for s in shapes], env
        ev = Evaluator(self.p, env, bound.sizes, bound.batch, T)
        rows = torch.arange(rows_from, T, device=bound.device)
        outs = []
        for node, shape in zip(self.p.outs.values(), shapes):
            v = ev.value(node, rows)
            v = ev.layout(v, ("b", "t") + node.type.dims)
            outs.append(v.data.expand(shape).to(bound.dtype))
        return outs, env

    def _state(self, bound, env) -> MixerState:
        history = {n: env[n].to(bound.dtype) for n in bound.inputs}
        return MixerState(history, next(iter(history.values())).shape[1], self.owner,
                          tuple(sorted(bound.sizes.items())))

    def forward(self, bound, initial_state=None, return_state=False):
        history = self._history(initial_state, bound)
        outs, env = self.run(bound, history, 0 if history is None else initial_state.length)
        return outs, (self._state(bound, env) if return_state else None)

    def step(self, bound, state):
        history = self._history(state, bound)
        bound.inputs = {n: x.unsqueeze(1) for n, x in bound.inputs.items()}
        outs, env = self.run(bound, history, 0 if history is None else state.length)
        return [o[:, 0] for o in outs], self._state(bound, env)

    def materialize(self, bound, names: dict) -> dict:
        env = self._env(bound, None)
        T = next(iter(env[n] for n in bound.inputs)).shape[1]
        ev = Evaluator(self.p, env, bound.sizes, bound.batch, T)
        rows = ev.full_rows()
        out = {}
        for apply in (n for n in self.p.nodes() if isinstance(n, ir.Apply)):
            name = names.get(id(apply))
            if name is None or name in out:
                continue
            m = ev.matrix(apply.m, rows, rows)
            dims = apply.m.type.dims
            m = ev.layout(m, ("b",) + dims + ("t", "s"))
            shape = (bound.batch,) + tuple(ev.sizes[d] for d in dims) + (T, T)
            out[name] = m.data.expand(shape).clone()
        return out


class DenseRunner(DenseBackend):
    """The dense interpreter as a backend runner (mixerc/backends.py)."""

    check_finite = True  # the reference checks every tensor for NaN/Inf

    def __init__(self, mixer):
        super().__init__(mixer.program)
        self.signature = signature_of(mixer.program)

    def source(self) -> str:
        return self.p.text()  # the typed IR is what runs


class _Dense:
    name = "dense"

    def compile(self, mixer) -> DenseRunner:
        return DenseRunner(mixer)


BACKEND = _Dense()
