"""Chunked scalar-decay kernels' helpers: the torch step that decodes one
token, and the apply that differentiates the kernels' custom op (no
autograd of its own, runtime/triton/ops.py custom_op) through
runtime/torch/autograd.py's adjoint backward.

The rendered kernels (codegen/triton/templates/triton_chunked.py.jinja) are
a forward with an initial state in and the final state and the state
entering each chunk out. The backward runs that same forward on the
three adjoint problems (dq causal; dk and dv on reversed time) and sums the
decay gradient in reverse: `ChunkedFn`, shared with the torch backend, which
also takes q, k and v at a divisor of the H heads (B and C shared by a group
of heads in SSD) and sums their per-head gradients over each group. It also
takes what the kernels compute on load (a key scale, a normalizer's ones
column and its division, a skip term): see ChunkedFn; the paths without the
kernels (float64, a single torch step while traced or with gradients) apply
them in torch here; a decode step's kernel computes them too."""

import os
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from mixerc.runtime.torch.autograd import ChunkedFn, _decay_grad, chunk_heads, quotient_of, reversible
from mixerc.runtime.torch.autograd import quotient_grad as torch_quotient_grad
from mixerc.runtime.triton.ops import custom_op, grads_through_maps, recompute_maps

def chunk_step(q, k, v, a, state, H, strict, chunk, chunk_states=False):
    """The chunked mixer on T <= 1 tokens by torch ops (decode), float32."""
    B, T, _, K = q.shape
    V = v.shape[-1]
    if state is None:
        state = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    if T == 0:
        y = torch.zeros(B, 0, H, V, dtype=torch.float32, device=q.device)
        entering = state.new_zeros(B, H, 0, K, V)
        return (y, state, entering) if chunk_states else (y, state)
    q1, k1, v1 = (chunk_heads(x, H)[:, 0].float() for x in (q, k, v))
    entering = state
    if a is not None:
        state = torch.exp(a[:, 0].float())[..., None, None] * state
    if strict:
        y = torch.einsum("bhk,bhkv->bhv", q1, state)
    state = state + k1[..., :, None] * v1[..., None, :]
    if not strict:
        y = torch.einsum("bhk,bhkv->bhv", q1, state)
    if chunk_states:
        return y[:, None], state, entering[:, :, None]
    return y[:, None], state


def chunked_kernels_apply(run, q, k, v, a, state, chunk, *config, key_scale=None,
                          ones_column=False, skip=None, divide=False, leaves=None,
                          out_dtype=None):
    """run(q, k, v, a, state, chunk, *config, chunk_states=..., key_scale=...)
    -> (y, final state[, entering states]), with the adjoint backward when
    anything needs a gradient. key_scale: None, or w [B, T, H] scaling the
    keys k [B, T, G, K] per token and head (scaled on load, never stored).
    ones_column: the values are [v, 1] (a normalizer), the ones added by the
    kernels (the states have V + 1 columns; y too, unless divide). divide: y
    is the quotient n / m of [n, m] = M @ [v, 1] (V columns; the backward
    saves the whole float32 [n / m, m]). skip: None, or d [H]: y
    gets d_h v_t added (a skip term, added in the output kernel's epilogue).
    leaves: None, or the inputs of the maps the kernels compute on load
    (run.prologue, codegen/triton/prologue.py); q and k are then the maps'
    inputs, and a or key_scale None where a map computes them. out_dtype:
    None, or the dtype the output kernel stores y in (the inputs', when y is
    the mixer's output as is; it accumulates in float32 either way): a
    forward whose y the backward reads (the quotient, with divide) keeps
    float32 and converts the quotient; the backward's runs choose their
    own (ChunkedFn)."""
    scaled = {} if key_scale is None else {"key_scale": key_scale}
    if ones_column:
        scaled["ones_column"] = True
    if divide:  # y[..., :V] / y[..., V], the normalizer kept in y[..., V]
        scaled["divide"] = True
    if skip is not None:
        scaled["skip"] = skip

    fwd = kernel_runs(run, config)
    tensors = [x for x in (q, k, v, a, state, key_scale, skip) + tuple(leaves or ())
               if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        if leaves is not None:
            if not torch.compiler.is_compiling():
                return MappedChunkedFn.apply(fwd, run.prologue, chunk, ones_column, divide,
                                             out_dtype, q, k, v, a, state, key_scale, skip,
                                             *leaves)
            # traced: the maps as torch ops before the kernels (inductor fuses them)
            q, k, a, key_scale = run.prologue(q, k, a, key_scale, leaves, _heads(v, leaves))
        return ChunkedFn.apply(fwd, chunk, q, k, v, a, state, key_scale, ones_column, skip,
                               divide, out_dtype)
    if leaves is not None:
        scaled["leaves"] = leaves
    if out_dtype is not None:
        scaled["out_dtype"] = out_dtype
    # no gradient: a short block may take the in-place decode kernel (not while
    # torch.compile traces, which sees through the custom op only)
    y, *rest = run(q, k, v, a, state, chunk, *config,
                   decode=not torch.compiler.is_compiling(), **scaled)
    return (quotient_of(y) if divide else y, *rest)


def kernel_runs(run, config):
    """The chunked kernels' function `run` at `config`, as ChunkedFn's
    backward calls it (fwd(q, k, v, a, state, chunk, chunk_states=..., ...)),
    with the kernels' decay gradient (fwd.decay_grad), the quotient's
    gradient (fwd.quotient_grad) and their runs on reversed time, read and
    written in place (fwd.reversed)."""
    def fwd(q, k, v, a, state, chunk, chunk_states=False, **extra):
        return run(q, k, v, a, state, chunk, *config, chunk_states=chunk_states, **extra)
    fwd.decay_grad = decay_grad  # the backward's decay gradient: one kernel
    fwd.quotient_grad = quotient_grad  # and the quotient's: one kernel

    def reversed_run(q, k, v, a, state, chunk, chunk_states=False, **extra):
        # the dk and dv runs on reversed time, read and written in place
        return run(q, k, v, a, state, chunk, *config, chunk_states=chunk_states, reverse=True,
                   **extra)
    fwd.reversed = reversed_run
    return fwd


def _heads(v, leaves):
    """The matrix's heads H: the values' or the maps' leaves' (v may sit at groups)."""
    return max([v.shape[2]] + [x.shape[-1] for x in leaves])


class MappedChunkedFn(torch.autograd.Function):
    """ChunkedFn for kernels that compute maps on load (feature maps of q and
    k, the log-decay and the key scale from their leaves): the forward runs
    them on the maps' inputs and stores nothing mapped; the backward
    recomputes the maps by torch ops (`prologue`), runs ChunkedFn's adjoint
    backward on the mapped tensors and takes the maps' gradients by autograd.
    On the kernels' path (half or float32, T > 1), the feature maps of q and
    k that `prologue.features` names are not recomputed: the adjoint runs read
    q and k as given and map them on load, and the dq (dk) run multiplies its
    output by the map's derivative at the raw input in its epilogue, storing
    the raw input's gradient (ChunkedFn's `raw`; the kernels' features=)."""

    @staticmethod
    def forward(ctx, fwd, prologue, chunk, ones, divide, out_dtype, q, k, v, a, state, w, d,
                *leaves):
        extra = dict(leaves=list(leaves), **({} if w is None else {"key_scale": w}),
                     **({"ones_column": True} if ones else {}),
                     # (a saved quotient stays float32: ChunkedFn.forward)
                     **({} if out_dtype is None or divide else {"out_dtype": out_dtype}),
                     **({} if d is None else {"skip": d}), **({"divide": True} if divide else {}))
        y, final = fwd(q, k, v, a, state, chunk, **extra)
        ctx.fwd, ctx.prologue, ctx.chunk, ctx.ones = fwd, prologue, chunk, ones
        ctx.save_for_backward(q, k, v, a, state, w, d, final, y if divide else None, *leaves)
        ctx.set_materialize_grads(False)
        return quotient_of(y, out_dtype) if divide else y, final

    @staticmethod
    def backward(ctx, dy, dS):
        q, k, v, a, S0, w, d, final, quotient, *leaves = ctx.saved_tensors
        needs = ctx.needs_input_grad
        H = final.shape[1]
        # the feature maps the adjoint runs compute on load (the kernels' path)
        on_kernels = reversible(q, k, v, *([] if dy is None else [dy]))
        raw = tuple(f and on_kernels for f in getattr(ctx.prologue, "features", (False, False)))
        inputs, mapped = recompute_maps(
            lambda q, k, a, w, *ls: ctx.prologue(q, k, a, w, list(ls), H,
                                                 features=(not raw[0], not raw[1])),
            [q, k, a, w, *leaves], [needs[6] and not raw[0], needs[7] and not raw[1], needs[9],
                                    needs[11], *needs[13:]])
        need = [m is not None and m.requires_grad for m in mapped]
        plain = [None if m is None else m.detach() for m in mapped]
        for i in (0, 1):  # q or k as given, mapped by the runs: its own gradient
            need[i] = need[i] or (raw[i] and needs[6 + i])

        def features():  # q and k mapped, for what reads them so (the decay gradient)
            with torch.no_grad():
                return ctx.prologue(q, k, None, None, leaves, H)[:2]
        inner = SimpleNamespace(  # ChunkedFn's context, on the mapped tensors
            saved_tensors=(plain[0], plain[1], v, plain[2], S0, final, plain[3], d, quotient),
            fwd=ctx.fwd, chunk=ctx.chunk, ones=ctx.ones, raw=raw, features=features,
            # q's and k's gradients are final unless a map's chain rule follows
            final=(mapped[0] is inputs[0], mapped[1] is inputs[1]),
            needs_input_grad=(False, False, need[0], need[1], needs[8], need[2], needs[10],
                              need[3], False, needs[12], False, False))
        g = ChunkedFn.backward(inner, dy, dS)
        gq, gk, ga, gw, *gleaves = grads_through_maps(inputs, mapped, (g[2], g[3], g[5], g[7]))
        # (q's or k's gradient from the runs where they took the map's chain rule)
        gq, gk = (g[2] if raw[0] else gq), (g[3] if raw[1] else gk)
        return (None,) * 6 + (gq, gk, g[4], ga, g[6], gw, g[9]) + tuple(gleaves)


def divided(out, divide):
    """(y[..., :V] / y[..., V] beside y[..., V], *rest) for the paths that do
    not run the output kernel, when it would divide."""
    if not divide:
        return out
    y = out[0]
    return (torch.cat([y[..., :-1] / y[..., -1:], y[..., -1:]], -1),) + tuple(out[1:])


def with_skip(out, v, skip, H):
    """(y + d_h v_t, *rest) for the paths that do not run the output kernel."""
    if skip is None:
        return out
    y = out[0]
    return (y + skip.to(y.dtype)[:, None] * chunk_heads(v, H).to(y.dtype),) + tuple(out[1:])


def scaled_keys(k, key_scale, H):
    """w_s k_s at the H heads (a torch step's token, or float64 inputs on
    the torch backend's chunks, read the keys per head)."""
    return key_scale[..., None] * chunk_heads(k, H).to(key_scale.dtype)


# the decay gradient kernel's K and V blocks: its [C, C] pair tiles (scores,
# their gradient) stay live across both loops beside a [C, BLOCK] state-dot
# accumulator per side
DECAY_GRAD_BLOCK = 32
DECAY_GRAD_WARPS = 8


def decay_grad(q, k, w, v, dy, a, C, fwd_states, adj_states):
    """The backward's log-decay gradient (runtime/torch/autograd.py
    _decay_grad: the formula, and the float64 path) by one kernel launch, a
    program per chunk and head: q, k, v [B, T, Hx, *] at divisors of the H
    heads of dy [B, T, H, V] (read where they are), in their dtype; w None or
    the keys' scale [B, T, H] (scales the pair terms' columns, k stays as
    given); a [B, T, H]; the dq and dk runs' chunk states [B, H, n, V, K]
    (float32). Float32 [B, T, H]. A custom op, so torch.compile traces it."""
    if q.dtype == torch.float64 or not q.is_cuda and not _interpreted():
        return _decay_grad(q, k, w, v, dy, a, C, fwd_states, adj_states)
    return _decay_grad_op()(q, k, w, v, dy, a, C, fwd_states, adj_states)


def _decay_grad_op():
    return custom_op("mixerc::chunked_decay_grad", _launch_decay_grad,
                     lambda q, k, w, v, dy, a, C, S, G: dy.new_empty(dy.shape[:3],
                                                                      dtype=torch.float32))


def _launch_decay_grad(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor | None,
                       v: torch.Tensor, dy: torch.Tensor, a: torch.Tensor, C: int,
                       S: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    B, T, H, DV = dy.shape
    DK = q.shape[-1]
    n = S.shape[2]
    # the dots read one dtype: the inputs' where dy came in it too
    dtype = q.dtype if q.dtype == k.dtype == v.dtype == dy.dtype else torch.float32
    # unit channel strides (a gradient of a sum comes expanded: all strides 0)
    q, k, v, dy = (x.to(dtype).contiguous() for x in (q, k, v, dy))
    a = a.float().contiguous()
    w = a if w is None else w.float().contiguous()  # a placeholder without a scale
    S, G = S.float().contiguous(), G.float().contiguous()
    da = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    if da.numel():
        block = max(16, min(DECAY_GRAD_BLOCK, triton.next_power_of_2(max(DK, DV))))
        _mx_decay_grad[(n, B * H)](
            q, k, v, dy, a, w, S, G, da, T, H, H // q.shape[2], H // k.shape[2],
            H // v.shape[2], DK, DV, n, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *dy.stride()[:3], *a.stride(), *S.stride()[:3], SCALED=w is not a, BT=C, BK=block,
            BV=block, PRECISION="ieee" if dtype == torch.float32 else "tf32",
            num_warps=DECAY_GRAD_WARPS)
    return da


def quotient_grad(dy, y, extra=0, dtype=None):
    """runtime/torch/autograd.py quotient_grad (the gradient of [n, m] from
    dy of y = [n / m, m], or of its quotient columns alone, then `extra`
    zero columns, in `dtype` or float32) by one kernel launch: dy read once
    as given (any dtype and strides: a slice's gradient, an expanded one),
    y (float32) once, the result
    written once; the torch ops wrote and read three float32 temporaries.
    float64 (and a CPU without the interpreter) take the torch ops."""
    if y.dtype == torch.float64 or not y.is_cuda and not _interpreted():
        return torch_quotient_grad(dy, y, extra, dtype)
    return _quotient_grad_op()(dy, y, extra, dtype or torch.float32)


def _quotient_grad_op():
    return custom_op("mixerc::chunked_quotient_grad", _launch_quotient_grad,
                     lambda dy, y, extra, dtype: y.new_empty(
                         *y.shape[:-1], y.shape[-1] + extra, dtype=dtype))


# the quotient gradient kernel's rows per program
QUOTIENT_ROWS = 16


def _launch_quotient_grad(dy: torch.Tensor, y: torch.Tensor, extra: int,
                          dtype: torch.dtype) -> torch.Tensor:
    W = y.shape[-1]  # V + 1: the values' columns and the normalizer's
    rows = y.numel() // W
    out = torch.empty(*y.shape[:-1], W + extra, dtype=dtype, device=y.device)
    if rows:
        # a view where dy's strides allow (an expanded one's too); dy holds the
        # normalizer's column too, or the quotient's alone (its gradient 0)
        dy2 = dy.reshape(rows, dy.shape[-1])
        y2 = y.reshape(rows, W).float()
        _mx_quotient_grad[(triton.cdiv(rows, QUOTIENT_ROWS),)](
            dy2, y2, out, rows, W - 1, *dy2.stride(), *y2.stride(), W + extra, extra,
            HAS_DM=dy.shape[-1] == W, BR=QUOTIENT_ROWS, BV=triton.next_power_of_2(W - 1),
            BE=triton.next_power_of_2(max(extra, 1)))
    return out


@triton.jit
def _mx_quotient_grad(DY, Y, OUT, rows, V, sd_r, sd_c, sy_r, sy_c, width, extra,
                      HAS_DM: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr,
                      BE: tl.constexpr):
    # rows r: dn = dy_n / m, dm = dy_m - sum dn . y_n (y = [n / m, m]; dy_m = 0
    # without HAS_DM), zeros after
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BV)
    r_ok = r < rows
    ok = r_ok[:, None] & (c < V)[None, :]
    m = tl.load(Y + r * sy_r + V * sy_c, mask=r_ok, other=1.0)
    dy = tl.load(DY + r[:, None] * sd_r + c[None, :] * sd_c, mask=ok, other=0.0).to(tl.float32)
    yn = tl.load(Y + r[:, None] * sy_r + c[None, :] * sy_c, mask=ok, other=0.0)
    dn = dy / m[:, None]
    dm = -tl.sum(dn * yn, 1)
    if HAS_DM:
        dm += tl.load(DY + r * sd_r + V * sd_c, mask=r_ok, other=0.0).to(tl.float32)
    out = OUT + r * width
    tl.store(out[:, None] + c[None, :], dn.to(OUT.dtype.element_ty), mask=ok)
    tl.store(out + V, dm.to(OUT.dtype.element_ty), mask=r_ok)
    e = tl.arange(0, BE)
    tl.store(out[:, None] + V + 1 + e[None, :], tl.zeros([BR, BE], dtype=OUT.dtype.element_ty),
             mask=r_ok[:, None] & (e < extra)[None, :])


def _interpreted():
    return bool(os.environ.get("TRITON_INTERPRET"))


@triton.jit
def _mx_rows(base, t, stride_t, cols, in_t, n_cols):
    # the tile of rows t (in_t: before T) and columns cols (< n_cols) at base
    return tl.load(base + t[:, None] * stride_t + cols[None, :],
                   mask=in_t[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _mx_decay_grad(Q, K, V, DO, A, KS, SIN, GOUT, DA, T, H, rep_q, rep_k, rep_v, n_k, n_v, n,
                   sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sy_b, sy_t, sy_h,
                   sa_b, sa_t, sa_h, ss_b, ss_h, ss_c, SCALED: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   PRECISION: tl.constexpr):
    # chunk c of head (b, h): da_j = quadrant + e + f + through (the formula
    # in runtime/torch/autograd.py _decay_grad), every pair term in float32
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t = c * BT + tl.arange(0, BT)
    in_t = t < T
    a = tl.load(A + b * sa_b + t * sa_t + h * sa_h, mask=in_t, other=0.0)
    local = tl.cumsum(a, 0)              # l_t: the chunk's cumulative log-decay
    end = tl.sum(a, 0)                   # l at the chunk's last step
    # G_out = exp(a_c1) G_c1 (the dk run's state at the next chunk's start);
    # the last chunk's is dS itself (a_c1 = 0: nothing past T)
    c1 = (c + 1) * BT
    end_out = end + tl.load(A + b * sa_b + c1 * sa_t + h * sa_h, mask=c1 < T, other=0.0)
    # q, k, v at their heads: head h reads head h // rep of each (rep = H / Hx)
    base_q = Q + b * sq_b + (h // rep_q) * sq_h
    base_k = K + b * sk_b + (h // rep_k) * sk_h
    base_v = V + b * sv_b + (h // rep_v) * sv_h
    base_y = DO + b * sy_b + h * sy_h
    s_in = SIN + b * ss_b + h * ss_h + c * ss_c               # [V, K], entering chunk c
    g_out = GOUT + b * ss_b + h * ss_h + (n - 1 - c) * ss_c    # the dk run's reversed chunks
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)

    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, n_k, BK):
        q = _mx_rows(base_q, t, sq_t, k0 + rk, in_t, n_k)
        k = _mx_rows(base_k, t, sk_t, k0 + rk, in_t, n_k)
        qk = tl.dot(q, tl.trans(k), qk, input_precision=PRECISION)
    dv = tl.zeros([BT, BT], dtype=tl.float32)
    e = tl.zeros([BT], dtype=tl.float32)     # q_t^T S_in dy_t
    f = tl.zeros([BT], dtype=tl.float32)     # k_s^T G_out v_s
    through = 0.0  # <S_in, G_out>
    for v0 in range(0, n_v, BV):
        y = _mx_rows(base_y, t, sy_t, v0 + rv, in_t, n_v)
        vv = _mx_rows(base_v, t, sv_t, v0 + rv, in_t, n_v)
        dv = tl.dot(y, tl.trans(vv), dv, input_precision=PRECISION)
        qs = tl.zeros([BT, BV], dtype=tl.float32)
        kg = tl.zeros([BT, BV], dtype=tl.float32)
        for k0 in range(0, n_k, BK):  # q and k again: kept, they would spill
            q = _mx_rows(base_q, t, sq_t, k0 + rk, in_t, n_k)
            k = _mx_rows(base_k, t, sk_t, k0 + rk, in_t, n_k)
            ms = (v0 + rv < n_v)[:, None] & (k0 + rk < n_k)[None, :]
            at = (v0 + rv)[:, None] * n_k + (k0 + rk)[None, :]
            s_tile = tl.load(s_in + at, mask=ms, other=0.0)
            g_tile = tl.load(g_out + at, mask=ms, other=0.0)
            qs = tl.dot(q.to(tl.float32), tl.trans(s_tile), qs, input_precision=PRECISION)
            kg = tl.dot(k.to(tl.float32), tl.trans(g_tile), kg, input_precision=PRECISION)
            through += tl.sum(tl.sum(s_tile * g_tile, 1), 0)
        e += tl.sum(qs * y.to(tl.float32), 1)
        f += tl.sum(kg * vv.to(tl.float32), 1)

    if SCALED:  # the keys are w_s k_s: the pair terms' columns and f_s take w_s
        w = tl.load(KS + b * sa_b + t * sa_t + h * sa_h, mask=in_t, other=0.0)
        qk = qk * w[None, :]
        f = f * w
    rows = tl.arange(0, BT)
    before = rows[None, :] < rows[:, None]                   # [t, s]: s < t
    # the pairs inside the chunk; the decay never exponentiates a positive sum
    gap = tl.where(before, local[:, None] - local[None, :], 0.0)
    p = tl.where(before, qk * dv * tl.exp(gap), 0.0)
    r = tl.cumsum(p, 1) - p                                  # r[t, j] = sum_{s < j} p[t, s]
    quadrant = tl.sum(tl.where(rows[:, None] >= rows[None, :], r, 0.0), 0)  # over t >= j
    e = tl.exp(local) * e
    f = tl.exp(end_out - local) * f
    e_after = tl.sum(e, 0) - tl.cumsum(e, 0) + e              # sum over t >= j
    f_before = tl.cumsum(f, 0) - f                            # sum over s < j
    da = quadrant + e_after + f_before + tl.exp(end_out) * through
    tl.store(DA + (b * T + t) * H + h, da, mask=in_t)
