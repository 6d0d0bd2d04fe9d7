"""Backward of the chunked scalar-decay mixer, as three more chunked mixers.

Pure torch; `mixerc compile` inlines this file into standalone modules.

Per batch and head, with cs = cumsum(a) and L[t,s] = exp(cs_t - cs_s) on
s <= t (s < t when strict), a rendered chunked forward computes

    y_t = sum_s L[t,s] (q_t . k_s) v_s + exp(cs_t) S0^T q_t
    S   = exp(cs_T) S0 + sum_s exp(cs_T - cs_s) k_s v_s^T    (T = last step)

Given dy and dS (the gradient of the returned state), the adjoints are

    dq_t = sum_s L[t,s] (dy_t . v_s) k_s + exp(cs_t) S0 dy_t
         = the same causal mixer with q <- dy, k <- v, v <- k, S0 <- S0^T;
    dk_s = sum_t L[t,s] (v_s . dy_t) q_t + exp(cs_T - cs_s) dS v_s,
    dv_s = sum_t L[t,s] (k_s . q_t) dy_t + exp(cs_T - cs_s) dS^T k_s:
         anti-causal mixers of the same class. Reversing time (t' = T-1-t),
         the segment (s, t] becomes [t', s'), so the reversed problem's
         log-decay is b_r' = rev(a)_{r'-1} (b_0 = 0) and its initial state is
         dS^T (for dk) or dS (for dv); a strict mask stays strict;
    dS0  = sum_t exp(cs_t) q_t dy_t^T + exp(cs_T) dS
         = exp(a_0) * (final state of the reversed dv problem), because that
         state sums exp(cs_t - a_0) q_t dy_t^T (b skips a_0);
    da_j  = the sum of the pair terms exp(cs_t - cs_s) (q_t . k_s)(dy_t . v_s)
         over s < j <= t (only they hold a_j), by chunks from the chunk
         states the dq and dk runs compute anyway (see _decay_grad), with no
         difference of large sums: q . dq - k . dk per token cancels its
         diagonal and lost digits in float32 and half precision.

So the backward saves only the inputs and the final state (O(T)), never a
chunk intermediate, and costs three forward passes. It is made of torch ops,
so double backward works too (by autograd through those passes).

The scalar-decay class (linear attention, RetNet, SSD, Based's feature map,
each Hydra pass) takes this path. On the torch backend the per-channel class
(GLA, Mamba-1, H3's modal kernel) still differentiates by autograd through
the chunks (its dq adjoint needs a decay along the output dim); the Triton
backend has backward kernels for it (runtime/triton/per_channel.py).
Set MIXERC_CHUNKED_BACKWARD=autograd (or ADJOINT_BACKWARD = False here) to
use autograd through the chunks for the scalar class too, e.g. to compare.
"""

import os

import torch
import torch.nn.functional as F

from mixerc.runtime.torch.chunks import from_chunks, to_chunks  # inline: drop

ADJOINT_BACKWARD = os.environ.get("MIXERC_CHUNKED_BACKWARD", "adjoint") != "autograd"


def chunked_apply(fwd, q, k, v, a, state, chunk):
    """fwd(q, k, v, a, state, chunk) -> (y, final state), with the adjoint
    backward above when anything needs a gradient."""
    tensors = [x for x in (q, k, v, a, state) if x is not None]
    if ADJOINT_BACKWARD and torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return ChunkedFn.apply(fwd, chunk, q, k, v, a, state)
    return fwd(q, k, v, a, state, chunk)


def chunk_dots_dtype(*xs):
    """The dots' operand dtype: the narrowest of the operands' (a float32
    gradient meets bf16 inputs in the backward: it is read in bf16); float64
    only when every operand is. (The chunked kernels' runs read theirs in it:
    runtime/triton/chunked.py.)"""
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        if any(x.dtype == dt for x in xs):
            return dt
    return torch.float64


def quotient_grad(dy, y, extra=0, dtype=None):
    """The gradient of [n, m] from the gradient dy of y = [n / m, m] (a
    kernel that divided by the normalizer m, its last column, and kept it):
    dn = dy_n / m, dm = dy_m - sum dn . y_n; then `extra` zero columns. dy
    may hold the quotient's columns only (what read y was its quotient:
    dy_m = 0). In `dtype` where given (the kernels' dots dtype: written
    converted once, not converted again by each run that reads it)."""
    V = y.shape[-1] - 1
    m = y[..., V:]
    g = dy[..., :V] / m
    dm = -(g * y[..., :V]).sum(-1, keepdim=True)
    if dy.shape[-1] > V:
        dm = dm + dy[..., V:]
    if dtype is None:
        return torch.cat([g, dm, g.new_zeros(*g.shape[:-1], extra)], -1)
    out = torch.empty(*g.shape[:-1], g.shape[-1] + 1 + extra, dtype=dtype, device=g.device)
    out[..., :g.shape[-1]] = g
    out[..., g.shape[-1]:g.shape[-1] + 1] = dm
    out[..., g.shape[-1] + 1:] = 0
    return out


class ChunkedFn(torch.autograd.Function):
    """The adjoint backward above. q, k and v may each sit at a divisor of the
    H heads (the Triton backend reads SSD's B and C at their groups: head h
    reads group h // (H / Hx)); the adjoint runs then read them where they
    are and their per-head gradients are summed over each group. Half
    inputs: the gradients are computed in float32.

    scale: None, or w [B, T, H] when the keys are w_s k_s with k at its
    groups (SSD's delta * B; fwd then takes key_scale=w and scales on load).
    The dq run scales its values (the forward's keys) by w, the dv run's
    output rows take w, and the dk run gives the scaled key's gradient g:
    dk = w g (folded over each group), dw = k . g (a backend's kernels may
    take both in the dk run's epilogue: fwd.reversed's out_scale=w,
    scale_grad=k; and the dv run's w and skip term: out_scale=w, skip=d).

    ones: the values end with a ones column (a normalizer M @ 1) that the
    forward adds itself (fwd takes ones_column=True; y and the states have
    V + 1 columns); the backward runs on [v, 1] and drops the ones' gradient.
    skip: None, or d [H]: y also holds d_h v_t (fwd takes skip=d); dv gets
    d_h dy_t, dd = sum dy . v per head (a backend's dv run may take both in
    its epilogue: fwd.reversed's skip=d, skip_grad=v, which adds a last
    result, dd). divide (with ones): fwd(divide=True) gives y = [n / m, m],
    which is saved (float32); the output is its quotient n / m alone (in
    out_dtype where given), so dy comes as the caller's gradient of it (no
    normalizer column to pad, nor a conversion in the graph) and the
    backward turns it into the gradient of [n, m] (dn = dy / m,
    dm = -sum dy . y / m) from the saved y.

    raw (a backend's context only, with fwd.reversed): (q, k) flags: that
    operand is a feature map's input, not the map (runtime/triton/chunked.py
    MappedChunkedFn): the runs that read it map it on load (features=, the
    slots' maps: 1 q's, 2 k's), the dq (dk) run multiplies its output by the
    map's derivative at it, and ctx.features() gives both mapped for the
    decay gradient."""

    @staticmethod
    def forward(ctx, fwd, chunk, q, k, v, a, state, scale=None, ones=False, skip=None,
                divide=False, out_dtype=None):
        extra = dict(_scaled(scale), **_ones(ones), **({} if skip is None else {"skip": skip}),
                     **({"divide": True} if divide else {}),
                     # y in the inputs' dtype (the forward's run only; a saved
                     # quotient stays float32 and is converted below)
                     **({} if out_dtype is None or divide else {"out_dtype": out_dtype}))
        y, final = fwd(q, k, v, a, state, chunk, **extra)
        ctx.fwd, ctx.chunk, ctx.ones = fwd, chunk, ones
        ctx.save_for_backward(q, k, v, a, state, final, scale, skip, y if divide else None)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None
        return quotient_of(y, out_dtype) if divide else y, final

    @staticmethod
    def backward(ctx, dy, dS):
        q, k, v, a, S0, final, w, d, quotient = ctx.saved_tensors
        fwd, C = ctx.fwd, ctx.chunk
        need_q, need_k, need_v, need_a, need_S0 = ctx.needs_input_grad[2:7]
        need_w = w is not None and ctx.needs_input_grad[7]
        need_d = d is not None and ctx.needs_input_grad[9]
        B, T, H = q.shape[0], q.shape[1], final.shape[1]
        width = v.shape[-1] + int(ctx.ones)  # y's columns: the values' and the ones'
        given = [] if dy is None else [dy]
        in_place = getattr(fwd, "reversed", None) if reversible(q, k, v, *given) else None
        # The dq and dk runs contract over [v, 1] and dy's columns. On the
        # kernels, zero columns after them make rows of a multiple of 8
        # elements, which load as aligned vectors (at V + 1 columns their
        # states kernel spills on sm_80); zeros add nothing to any sum. dy
        # holds them from here on (the dv run reads its first columns).
        extra = -width % 8 if ctx.ones and in_place is not None else 0
        if dy is None:
            dy = torch.zeros(B, T, H, width + extra, dtype=_wide(v).dtype, device=q.device)
        elif quotient is not None:  # y = [n / m, m]: the gradient of [n, m]
            # on the kernels in their dots' dtype (the narrowest input's), which
            # the runs would convert it to each; kept float32 where the decay
            # gradient or the skip's reads it (sums of products, not dots)
            narrow_dy = in_place is not None and not (need_a or need_d)
            # (the backend's kernel where it has one)
            dy = getattr(fwd, "quotient_grad", quotient_grad)(
                dy, quotient, extra, chunk_dots_dtype(q, k, v) if narrow_dy else None)
        elif extra:
            dy = F.pad(dy, (0, extra))
        given_v = v  # (the skip's gradient reads the values as given)
        if ctx.ones:  # the adjoint runs read the ones column the forward added
            v = torch.cat([v, torch.ones_like(v[..., :1]), v.new_zeros(*v.shape[:-1], extra)],
                          -1)
        # the states as the dq and dk runs read them
        S0c, dSc = (x if x is None or not extra else F.pad(x, (0, extra)) for x in (S0, dS))
        n = -(-T // C)
        # Reversed problems are zero-padded in front (zero steps with log-decay 0
        # carry the state unchanged) so their chunks line up with the forward's.
        # A backend's kernels may run them in place (fwd.reversed: nothing
        # flipped or padded in memory, the outputs in forward order); they also
        # store a gradient that needs nothing more in its input's dtype.
        if in_place is None:
            pad = n * C - T
            rev = lambda x: F.pad(x.flip(1), (0, 0) * (x.dim() - 2) + (pad, 0))  # noqa: E731
            unrev = lambda x: x[:, pad:].flip(1)  # noqa: E731
            b = None if a is None else F.pad(a.flip(1)[:, :-1], (0, 0, 1 + pad, 0))
            reversed_fwd, narrow = fwd, lambda x, final: {}  # noqa: E731
        else:
            rev = unrev = lambda x: x  # noqa: E731
            reversed_fwd, b = in_place, a
            # a run's output in x's dtype where it is x's gradient as is (final:
            # nothing follows it, nor a sum over the heads of x's groups)
            narrow = lambda x, final: {"out_dtype": x.dtype} if final and x.shape[2] == H else {}  # noqa: E731
        # (q's and k's gradient is not final where a map's chain rule follows)
        final_q, final_k = getattr(ctx, "final", (True, True))
        raw_q, raw_k = getattr(ctx, "raw", (False, False))
        if (raw_q or raw_k) and in_place is None:
            raise ValueError("feature maps on load run on the kernels only")

        def mapped(slots, dmap=0, x=None):
            # the runs on a feature map's input: the q, k and v slots' maps on
            # load, the output times map dmap's derivative at x
            if not (raw_q or raw_k):
                return {}
            return {"features": tuple(slots) + (dmap,), "raw": x if dmap else None}
        states = need_a  # the decay gradient reads the states at the chunks' edges
        dq = dk = dv = da = dS0 = dw = dd = None
        if need_q or need_a:
            # w_s scales column s of the scores: here the keys' (v's) rows
            out = fwd(dy, v, k, a, None if S0c is None else S0c.transpose(-1, -2), C,
                      chunk_states=states, **_scaled(w), **narrow(q, final_q),
                      **mapped((0, 0, 2 if raw_k else 0), 1 if raw_q else 0, q))
            dq = out[0]
        # the kernels take the key scale's chain rule in the dk run (its output
        # times w, and w's gradient); not where k's feature map's derivative
        # multiplies that output (the map's chain rule follows)
        keyed = in_place is not None and w is not None and (need_k or need_w) and not raw_k
        if need_k or need_a or need_w:  # the gradient of the scaled key w * k, per head
            back = reversed_fwd(rev(v), rev(dy), rev(q), b,
                                None if dSc is None else dSc.transpose(-1, -2), C,
                                chunk_states=states, **narrow(k, final_k and (w is None or keyed)),
                                **mapped((0, 0, 1 if raw_q else 0), 2 if raw_k else 0, k),
                                **({"out_scale": w, "scale_grad": k} if keyed else {}))
            dk = unrev(back[0])
        if need_v or need_S0:
            # the ones column's gradient is dropped: unless dS0 (whose last
            # column is the normalizer's state) is wanted, the dv run reads
            # dy's value columns only (a whole block less at V = 128)
            trim = ctx.ones and not need_S0
            dyv = dy[..., :width - int(trim)]
            dSv = dS[..., :-1] if trim and dS is not None else dS
            # here w scales the queries' (k's) rows: the output's rows; the
            # skip term d_h v_t adds d_h dy_t and d's gradient sums dy . v
            # (all in the kernels' epilogue; not beside the ones column)
            in_kernel = {} if in_place is None else dict(
                **({} if w is None else {"out_scale": w}), **({} if d is None else {"skip": d}),
                **({"skip_grad": given_v} if need_d and not ctx.ones else {}))
            run = reversed_fwd(rev(k), rev(q), rev(dyv), b, dSv, C, **in_kernel,
                               **narrow(v, True), **mapped((2 if raw_k else 0,
                                                            1 if raw_q else 0, 0)))
            dv, last = unrev(run[0]), run[1]
            if "skip_grad" in in_kernel:
                dd = run[-1].to(d.dtype)
            if in_place is None and w is not None:
                dv = _wide(w)[..., None] * dv
            if in_place is None and d is not None:
                dv = dv + d.to(dv.dtype)[:, None] * dyv
            dv = chunk_fold_heads(dv, v)
            if ctx.ones and not trim:
                dv = dv[..., :-1]
            if need_S0:
                decay = None if a is None else torch.exp(a[:, 0].to(last.dtype))
                dS0 = last if a is None else decay[..., None, None] * last
                dS0 = dS0.to(S0.dtype)
        if need_a:  # the backend's decay gradient kernel where it has one
            qa, ka = ctx.features() if raw_q or raw_k else (q, k)  # q and k mapped
            da = getattr(fwd, "decay_grad", _decay_grad)(qa, ka, w, v, dy, a, C, out[2],
                                                         back[2]).to(a.dtype)
        if keyed:  # dk is k's gradient per head already
            dw = back[-1].to(w.dtype) if need_w else None
        elif w is not None:  # d(w k)/dw = k, d(w k)/dk = w, k at its groups
            dk_groups = dk.reshape(B, T, k.shape[2], H // k.shape[2], dk.shape[-1])
            w_groups = _wide(w).reshape(B, T, k.shape[2], H // k.shape[2])
            if need_w:
                dw = torch.einsum("btgrk,btgk->btgr", dk_groups,
                                  _wide(k)).reshape(B, T, H).to(w.dtype)
            if need_k:
                dk = torch.einsum("btgrk,btgr->btgk", dk_groups, w_groups)
        grads = (None, None, chunk_fold_heads(dq, q) if need_q else None,
                 chunk_fold_heads(dk, k) if need_k else None, dv if need_v else None, da, dS0,
                 dw, None, _skip_grad(dy, v, H, width, d) if need_d and dd is None else dd,
                 None, None)
        return grads[:len(ctx.needs_input_grad)]


def quotient_of(y, out_dtype=None):
    """The quotient columns n / m of a divided y = [n / m, m] (what a program
    reads of it), in out_dtype where given: a view where no conversion is
    needed (an in-place write to it then fails the backward's version check
    instead of changing the saved y)."""
    y = y[..., :-1]
    return y if out_dtype is None or out_dtype == y.dtype else y.to(out_dtype)


def _skip_grad(dy, v, H, width, d):
    """d's gradient sum dy . v per head (d_h v_t in y), by torch ops."""
    return (_wide(dy[..., :width]) * chunk_heads(v[..., :width], H)).sum((0, 1, 3)).to(d.dtype)


def reversible(*xs) -> bool:
    """Whether a backend's kernels take the reversed problems in place (its
    fwd.reversed) on these [B, T, ...] tensors: their path only, not
    float64 nor a single step."""
    return (all(x.dtype != torch.float64 for x in xs) and xs[0].shape[0] > 0
            and xs[0].shape[1] > 1)


def _ones(ones: bool) -> dict:
    """The ones column's keyword for a forward (none without one)."""
    return {"ones_column": True} if ones else {}


def _scaled(w) -> dict:
    """The column scale's keyword for a forward (none without one: the torch
    backend's forwards take no scale)."""
    return {} if w is None else {"key_scale": w}


def _wide(x):
    """x in float32 at least (half inputs' gradients are computed in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def chunk_heads(x, H):
    """[B, T, Hx, ...] at H heads (head h reads group h // (H / Hx))."""
    return x if x.shape[2] == H else x.repeat_interleave(H // x.shape[2], 2)


def chunk_fold_heads(g, like):
    """A per-head gradient [B, T, H, ...] summed over each group of `like`'s
    heads, in like's dtype: a half gradient is summed in g's float32 and
    stored rounded by the sum itself (one pass over g, no float32 sum
    written and read again to convert it), unless autograd records the sum."""
    Hx = like.shape[2]
    if g.shape[2] == Hx:
        return g.to(like.dtype)
    heads = g.reshape(g.shape[0], g.shape[1], Hx, g.shape[2] // Hx, *g.shape[3:])
    if like.dtype == g.dtype or (torch.is_grad_enabled() and g.requires_grad):
        return heads.sum(3).to(like.dtype)
    return torch.sum(heads, 3, out=g.new_empty(heads.shape[:3] + heads.shape[4:],
                                                dtype=like.dtype))


def _decay_grad(q, k, w, v, dy, a, C, fwd_states, adj_states):
    """da_j = the sum of W(s, t) = exp(cs_t - cs_s) (q_t . k_s) (dy_t . v_s)
    over the pairs s < j <= t (only those pairs' decay holds a_j), by chunks
    [c0, c1), summing only terms of one sign structure (no difference of
    large sums):
      - both in the chunk: the quadrant of P = W on the chunk's pairs;
      - s before the chunk (the initial state too), t in it at or after j:
        e_t = exp(l_t) q_t^T S_in dy_t, summed over t >= j;
      - s in it before j, t after the chunk (dS too):
        f_s = exp(l_end - l_s) k_s^T G_out v_s, summed over s < j;
      - s before and t after: exp(l_end) <S_in, G_out>;
    with l the chunk-local cumulative log-decay, S_in the forward state
    entering the chunk and G_out = sum_{t >= c1} exp(cs_t - cs_{c1-1})
    q_t dy_t^T (+ dS), the states the dq and dk runs computed anyway
    ([V, K] there: their k, v are the forward's v, k and dy, q).
    The older q . dq - k . dk per token cancels its large diagonal terms
    and lost digits (10x fla's error on SSD's A_log in half precision),
    because the dq and dk runs round those terms differently.
    q, k, v at divisors of the H heads of dy [B, T, H, V]; w None or the
    keys' scale [B, T, H]; a [B, T, H]; the states [B, H, n, V, K]."""
    T, H = dy.shape[1], dy.shape[2]
    q, k, v, dy, a = (_wide(chunk_heads(x, H)) for x in (q, k, v, dy, a))
    if w is not None:
        k = _wide(w)[..., None] * k
    qc, kc, vc, dyc = (to_chunks(x, C) for x in (q, k, v, dy))  # [B, H, n, C, *]
    local = to_chunks(a, C).cumsum(-1)                               # [B, H, n, C]
    end = local[..., -1:]
    after = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # [t, j]: t >= j
    before = after.tril(-1)                                               # [t, s]: s < t
    L = torch.where(before, local[..., :, None] - local[..., None, :], -torch.inf).exp()
    P = (qc @ kc.transpose(-1, -2)) * (dyc @ vc.transpose(-1, -2)) * L  # [.., t, s]
    R = P.cumsum(-1) - P                                 # R[t, j] = sum_{s < j} P[t, s]
    quadrant = (R * after).sum(-2)  # sum over t >= j
    S = fwd_states.to(q.dtype)
    G = adj_states.flip(2).to(q.dtype)  # at the chunks' ends; the last: dS
    G = torch.cat([torch.exp(to_chunks(a, C)[:, :, 1:, 0])[..., None, None] * G[:, :, :-1],
                   G[:, :, -1:]], 2)
    e = torch.exp(local) * ((qc @ S.transpose(-1, -2)) * dyc).sum(-1)
    f = torch.exp(end - local) * ((kc @ G.transpose(-1, -2)) * vc).sum(-1)
    through = torch.exp(end) * (S * G).sum((-1, -2))[..., None]
    da = quadrant + e.flip(-1).cumsum(-1).flip(-1) + (f.cumsum(-1) - f) + through
    return from_chunks(da[..., None], T)[..., 0]
