"""A quasiseparable matrix's two scalar-decay low-rank passes (Hydra: a
lower one, its reversed twin over the same operand) and its diagonal in two
launches in all, instead of two per pass plus torch flips and sums.

Direction 0 is the lower pass, direction 1 the upper (reversed) pass; both
read their inputs in real time order: the reversed pass walks the chunks
from the last and sums log-decays from each chunk's end (a suffix sum,
total - L + a from the prefix sum L), so no tensor is ever flipped. The
states launch runs both directions (the direction folded into the grid's
batch-head axis); the output launch owns one chunk's [BT, BV] tile of y and
adds both directions' contributions and d_t v_t there, writing y once.

A direction's mode: 0 non-strict (s <= t), 1 strict (s < t), 2 shifted by
one (shift(M): row t is the unshifted row t - 1, i.e. q read one row earlier
in that direction's time, the decay exclusive of a_t, the mask strict).

`quasiseparable_apply` is what a generated module calls: the two launches
when no gradient is needed; with one, today's separate passes (each the
chunked kernels' adjoint backward, runtime/triton/chunked.py, on flipped
copies for the upper pass) recompute the forward under autograd, so the
gradient is theirs; float64 and empty inputs take the separate passes."""

import torch
import triton
import triton.language as tl

from mixerc.runtime.torch.tokens import shift_tokens
from mixerc.runtime.triton.chunked import chunked_kernels_apply


@triton.jit
def _mx_qs_states(K, V, A, KS, SC, T, H, rk, n_chunks, B,
                  DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr):
    # the state entering each chunk in its direction's order, SC [2, B, H, n, DK, DV]
    pid_k = tl.program_id(0)
    pid_v = tl.program_id(1)
    pid = tl.program_id(2)
    d = pid // (B * H)
    b = ((pid % (B * H)) // H).to(tl.int64)
    h = pid % H
    Hk = H // rk
    offs_t = tl.arange(0, BT)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    k_ok = offs_k < DK
    v_ok = offs_v < DV
    # the two directions' keys, decays and scales are stacked along a leading axis
    k_base = K + ((d * B + b) * T * Hk + h // rk) * DK
    a_base = A + (d * B + b) * T * H + h
    w_base = KS + (d * B + b) * T * H + h
    v_base = V + (b * T * H + h) * DV
    s_offs = offs_k[:, None] * DV + offs_v[None, :]
    s_mask = k_ok[:, None] & v_ok[None, :]
    sc_base = SC + ((d * B + b) * H + h) * n_chunks * DK * DV
    state = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(0, n_chunks):
        c = j + d * (n_chunks - 1 - 2 * j)  # the reversed pass starts at the end
        tl.store(sc_base + c * DK * DV + s_offs, state, mask=s_mask)
        t = c * BT + offs_t
        t_ok = t < T
        k = tl.load(k_base + t[:, None] * (Hk * DK) + offs_k[None, :],
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        v = tl.load(v_base + t[:, None] * (H * DV) + offs_v[None, :],
                    mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        if SCALED:
            w = tl.load(w_base + t * H, mask=t_ok, other=0.0)
        else:
            w = tl.full([BT], 1.0, tl.float32)
        a = tl.load(a_base + t * H, mask=t_ok, other=0.0)  # padding decays nothing
        cs = tl.cumsum(a, 0)
        total = tl.sum(a, 0)
        # the decay from row s to the chunk's far end: lower pass total - L_s,
        # upper pass L_s - a_s (the rows before s in real time)
        rows = tl.exp(tl.where(d == 0, total - cs, cs - a)) * w
        v = (v * rows[:, None]).to(k.dtype)
        state = tl.dot(tl.trans(k), v, state * tl.exp(total), input_precision=PRECISION)


@triton.jit
def _mx_qs_output(Q, K, V, A, KS, D, SC, Y, T, H, rq, rk, n_chunks, B,
                  DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, PRECISION: tl.constexpr, SCALED: tl.constexpr,
                  MODE_F: tl.constexpr, MODE_B: tl.constexpr, HAS_D: tl.constexpr):
    # one chunk's [BT, BV] tile of y: both directions and the diagonal, written once
    pid_v = tl.program_id(0)
    c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    Hq, Hk = H // rq, H // rk
    offs_t = tl.arange(0, BT)
    offs_kb = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    v_ok = offs_v < DV
    t = c * BT + offs_t
    t_ok = t < T
    v_ptrs = V + (b * T * H + h) * DV + t[:, None] * (H * DV) + offs_v[None, :]
    y = tl.zeros([BT, BV], dtype=tl.float32)
    # a runtime loop, not unrolled: both passes' tiles live at once spill on sm_80
    for dd in range(2):
        mode = tl.where(dd == 0, MODE_F, MODE_B)
        # a shifted pass reads q one row earlier in its own time
        tq = t - (1 - 2 * dd) * (mode == 2).to(tl.int32)
        q_ok = (tq >= 0) & (tq < T)
        q_base = Q + ((dd * B + b) * T * Hq + h // rq) * DK + tq[:, None] * (Hq * DK)
        k_base = K + ((dd * B + b) * T * Hk + h // rk) * DK + t[:, None] * (Hk * DK)
        s_base = SC + (((dd * B + b) * H + h) * n_chunks + c) * DK * DV + offs_v[None, :]
        s = tl.zeros([BT, BT], dtype=tl.float32)
        yd = tl.zeros([BT, BV], dtype=tl.float32)
        for k0 in range(0, DK, BK):
            offs_k = k0 + offs_kb
            k_ok = offs_k < DK
            q = tl.load(q_base + offs_k[None, :], mask=q_ok[:, None] & k_ok[None, :], other=0.0)
            k = tl.load(k_base + offs_k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            state = tl.load(s_base + offs_k[:, None] * DV, mask=k_ok[:, None] & v_ok[None, :],
                            other=0.0)
            s = tl.dot(q, tl.trans(k), s, input_precision=PRECISION)
            yd = tl.dot(q, state.to(q.dtype), yd, input_precision=PRECISION)
        if SCALED:
            w = tl.load(KS + (dd * B + b) * T * H + t * H + h, mask=t_ok, other=0.0)
        else:
            w = tl.full([BT], 1.0, tl.float32)
        a = tl.load(A + (dd * B + b) * T * H + t * H + h, mask=t_ok, other=0.0)
        cs = tl.cumsum(a, 0)
        # the log-decay from the chunk's start through row s (lower pass), or
        # from the chunk's end back through it (upper pass)
        kc = tl.where(dd == 0, cs, tl.sum(a, 0) - cs + a)
        st = (mode >= 1).to(tl.int32)
        pairs = tl.where(dd == 0, offs_t[:, None] >= offs_t[None, :] + st,
                         offs_t[None, :] >= offs_t[:, None] + st)
        qc = kc - tl.where(mode == 2, a, 0.0)  # shifted: exclusive of the row's own step
        # masked to -inf before exp: the other triangle's exponents (> 0) never exist
        s = s * (w[None, :] * tl.exp(tl.where(pairs, qc[:, None] - kc[None, :], float("-inf"))))
        y += yd * tl.exp(qc)[:, None]
        v = tl.load(v_ptrs, mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        y = tl.dot(s.to(v.dtype), v, y, input_precision=PRECISION)
    if HAS_D:
        dg = tl.load(D + (b * T + t) * H + h, mask=t_ok, other=0.0)
        v = tl.load(v_ptrs, mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        y += dg[:, None] * v.to(tl.float32)
    tl.store(Y + (b * T * H + h) * DV + t[:, None] * (H * DV) + offs_v[None, :], y,
             mask=t_ok[:, None] & v_ok[None, :])


# the output kernel's warps (static fitness at chunk = blocks = 64, bf16: 4
# warps spill on sm_90a and sm_80, 8 fit both); the states kernel takes the config's
OUTPUT_WARPS = 8


def quasiseparable_launch(q, k, v, a, w, diag, modes, chunk, block_k=64, block_v=64,
                          num_warps=4, num_stages=2, output_warps=OUTPUT_WARPS):
    """y [B, T, H, V] float32 = lower pass + upper pass + diag v, in one states
    launch and one output launch. q, k: [2, B, T, G, DK] (direction 0 lower,
    1 upper, both in real time order, at a divisor G of H); v [B, T, H, DV];
    a, w: [2, B, T, H] log-decays and key scales (w may be None); diag:
    [B, T, H] or None; modes: (lower, upper) each 0, 1 or 2 (module doc)."""
    _, B, T, _, DK = q.shape
    H, DV = v.shape[2], v.shape[3]
    n = -(-T // chunk)
    dtype = v.dtype
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    a = a.float().contiguous()
    y = torch.empty(B, T, H, DV, dtype=torch.float32, device=v.device)
    entering = torch.empty(2, B, H, n, DK, DV, dtype=torch.float32, device=v.device)
    meta = dict(DK=DK, DV=DV, BT=chunk, BK=min(max(16, triton.next_power_of_2(DK)), block_k),
                BV=min(max(16, triton.next_power_of_2(DV)), block_v),
                PRECISION="ieee" if dtype == torch.float32 else "tf32", SCALED=w is not None)
    w = a if w is None else w.float().contiguous()
    rq, rk = H // q.shape[3], H // k.shape[3]
    _mx_qs_states[(triton.cdiv(DK, meta["BK"]), triton.cdiv(DV, meta["BV"]), 2 * B * H)](
        k, v, a, w, entering, T, H, rk, n, B, **meta, num_warps=num_warps,
        num_stages=num_stages)
    diag_ = y if diag is None else diag.float().contiguous()
    _mx_qs_output[(triton.cdiv(DV, meta["BV"]), n, B * H)](
        q, k, v, a, w, diag_, entering, y, T, H, rq, rk, n, B, **meta,
        MODE_F=modes[0], MODE_B=modes[1], HAS_D=diag is not None, num_warps=output_warps,
        num_stages=num_stages)
    return y


def _separate(runs, q, k, v, a, w, diag, modes, chunk, config):
    """The passes one by one (the chunked kernels, torch flips and sums): the
    path with a gradient, and float64's."""
    y = None
    for d in range(2):
        rev = (lambda x: x.flip(1)) if d else (lambda x: x)  # noqa: E731
        scale = {} if w is None else {"key_scale": rev(w[d])}
        yd, _ = chunked_kernels_apply(runs[d], rev(q[d]), rev(k[d]), rev(v), rev(a[d]), None,
                                      chunk, *config, **scale)
        if modes[d] == 2:
            yd, _ = shift_tokens(yd, 1, None)
        yd = rev(yd)
        y = yd if y is None else y + yd
    return y if diag is None else y + diag[..., None] * v


class _QuasiseparableFn(torch.autograd.Function):
    """The two launches forward; the backward recomputes the separate passes
    under autograd and takes their gradient (no adjoint of the fused
    launches yet)."""

    @staticmethod
    def forward(ctx, runs, modes, chunk, config, q, k, v, a, w, diag):
        ctx.save_for_backward(q, k, v, a, w, diag)
        ctx.args = runs, modes, chunk, config
        return quasiseparable_launch(q, k, v, a, w, diag, modes, chunk, *config)

    @staticmethod
    def backward(ctx, dy):
        runs, modes, chunk, config = ctx.args
        saved = [None if x is None else x.detach().requires_grad_(x.requires_grad)
                 for x in ctx.saved_tensors]
        with torch.enable_grad():
            y = _separate(runs, *saved, modes, chunk, config)
            wanted = [x for x in saved if x is not None and x.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, dy.to(y.dtype), allow_unused=True))
        return (None,) * 4 + tuple(None if x is None or not x.requires_grad else next(grads)
                                   for x in saved)


def quasiseparable_apply(runs, q, k, v, a, w, diag, modes, chunk, *config):
    """y [B, T, H, V] of a quasiseparable matrix's lower pass, its reversed
    twin and its diagonal (quasiseparable_launch's arguments; runs: each
    pass's chunked kernel function, for the separate passes). No decode
    state: a matrix that reads the future has none."""
    _, B, T = q.shape[:3]
    if any(x.dtype == torch.float64 for x in (q, k, v)) or B == 0 or T == 0:
        return _separate(runs, q, k, v, a, w, diag, modes, chunk, config)
    tensors = [x for x in (q, k, v, a, w, diag) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return _QuasiseparableFn.apply(runs, modes, chunk, config, q, k, v, a, w, diag)
    return quasiseparable_launch(q, k, v, a, w, diag, modes, chunk, *config)
