"""The decode step of a fixed-state low-rank term on the Triton backend: one
launch per step runs the recurrence S_t = exp(a_t) S_{t-1} + k_t v_t^T,
y_t = q_t S_t (strict masks: y_t = q_t exp(a_t) S_{t-1}) over the step's few
tokens, with the state [B, H, K, V] held in registers between them. The
log-decay a is per head ([B, T, H]), per channel ([B, T, H, K]) or absent;
q, k and v may sit at fewer heads (B/C groups: head h reads h // (H / Hq)).

The state is updated in place when it is the newest state of its buffer: each
state a step returns is a fresh alias of the buffer carrying a shared record
of which alias is the newest, so an older state (one that was already
continued, whose numbers the update overwrote) is refused clearly instead of
silently continuing from the wrong state; MixerState.clone() keeps a state
reusable. A state without the record (a prefill's, a moved or cloned one) is
never written: its first step writes a fresh buffer. step_state keeps this
record for any decode kernel that reads a state and writes its update: this
one (the per-channel chunked family's steps, and the scan's with a log-decay
that does not factor: GLA's), the per-channel scan's own forward kernel for a
factored log-decay (codegen/triton/templates/triton_scan.py.jinja `_decode`:
Mamba-1's delta, delta * x and skip term D * x computed as it loads, no
checkpoints) and the chunked scalar-decay family's fused decode kernel
(codegen/triton/templates/triton_chunked.py.jinja, which computes its maps,
key scale, normalizer and skip term as it loads)."""

import torch
import triton
import triton.language as tl

from mixerc.runtime.bind import MixerValueError  # inline: drop


@triton.jit
def _mx_recurrent_step(Q, K, V, A, S_IN, S_OUT, Y, T, H, n_hq, n_hk, n_hv, n_k, n_v,
                       DECAY: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       STRICT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    # one (batch, head) x BLOCK_V columns of the state, over the step's T tokens
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = pid % H
    hq = h // (H // n_hq)
    hk = h // (H // n_hk)
    hv = h // (H // n_hv)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok = offs_k < n_k
    v_ok = offs_v < n_v
    tile = ((b * H + h) * n_k + offs_k[:, None]) * n_v + offs_v[None, :]
    ok = k_ok[:, None] & v_ok[None, :]
    s = tl.load(S_IN + tile, mask=ok, other=0.0).to(tl.float32)
    for t in range(0, T):
        bt = b * T + t
        q = tl.load(Q + (bt * n_hq + hq) * n_k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(K + (bt * n_hk + hk) * n_k + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(V + (bt * n_hv + hv) * n_v + offs_v, mask=v_ok, other=0.0).to(tl.float32)
        if DECAY:
            if PER_CHANNEL:
                g = tl.exp(tl.load(A + (bt * H + h) * n_k + offs_k, mask=k_ok,
                                   other=0.0).to(tl.float32))[:, None]
            else:
                g = tl.exp(tl.load(A + bt * H + h).to(tl.float32))
            s = s * g
        if STRICT:  # y_t reads the state before token t's own key and value
            y = tl.sum(q[:, None] * s, 0)
            s = s + k[:, None] * v[None, :]
        else:
            s = s + k[:, None] * v[None, :]
            y = tl.sum(q[:, None] * s, 0)
        tl.store(Y + (bt * H + h) * n_v + offs_v, y, mask=v_ok)  # in Y's dtype
    tl.store(S_OUT + tile, s, mask=ok)


_NEWEST = "_mixerc_newest"  # on a state alias: [the token of the newest alias of its buffer]
_TOKEN = "_mixerc_token"    # on a state alias: its own token


def _alias(buf, record):
    """A new tensor object over buf's storage, recorded as the newest."""
    out = buf.view(buf.shape)
    token = object()
    record[0] = token
    setattr(out, _NEWEST, record)
    setattr(out, _TOKEN, token)
    return out


def recurrent_step(q, k, v, a, state, strict, what, heads=None, out_dtype=None):
    """(y [B, T, H, V], state after the T tokens [B, H, K, V] float32).

    q, k, v: [B, T, Hq, K], [B, T, Hk, K], [B, T, Hv, V], at divisors of the
    H heads (default: v's); a: None, [B, T, H] or [B, T, H, K]; state:
    [B, H, K, V] or None (zeros). `what` names the term in the error for a
    state that was already continued. y is accumulated in float32 and
    stored in out_dtype where it is float16 or bfloat16 (the inputs', when y
    is the mixer's output as is: no float32 y converted after), else float32."""
    B, T, _, DV = v.shape
    H = heads or v.shape[2]
    DK = q.shape[-1]
    out_dtype = out_dtype if out_dtype in (torch.float16, torch.bfloat16) else torch.float32
    y = torch.empty(B, T, H, DV, dtype=out_dtype, device=v.device)

    def launch(source, out):
        block_k = max(16, triton.next_power_of_2(DK))
        block_v = max(16, min(triton.next_power_of_2(DV), 4096 // block_k))  # no spills
        _mx_recurrent_step[(B * H, triton.cdiv(DV, block_v))](
            q.contiguous(), k.contiguous(), v.contiguous(),
            q if a is None else a.contiguous(), source, out, y, T, H, q.shape[2], k.shape[2],
            v.shape[2], DK, DV, DECAY=a is not None, PER_CHANNEL=a is not None and a.dim() == 4,
            STRICT=strict, BLOCK_K=block_k, BLOCK_V=block_v,
            num_warps=4 if block_k * block_v <= 4096 else 8)
    return y, step_state(state, (B, H, DK, DV), v.device, what, launch if B * H and T else None)


def step_state(state, shape, device, what, launch):
    """The state after a decode step whose kernel reads the state entering it
    and writes the state after it: launch(source, out) launches it (source
    and out are the same buffer when updating in place), or None when there is
    nothing to compute (no token or no sequence). In place when `state` is the
    newest alias of its buffer; a state without the record (None: zeros, a
    prefill's, a moved or cloned one) is read into a fresh buffer of `shape`
    (float32), and one that was already continued is refused (`what` names the
    term). Returns the new state: the newest alias of the buffer written."""
    record = None if state is None else getattr(state, _NEWEST, None)
    if record is not None and record[0] is not getattr(state, _TOKEN, None):
        raise MixerValueError(
            f"{what}: this decode state was already continued, and that step updated its "
            "state in place; continue the newest state, or keep a copy with "
            "state.clone() before stepping")
    in_place = (record is not None and state.dtype == torch.float32 and state.is_contiguous()
                and (not state.is_inference() or torch.is_inference_mode_enabled()))
    if in_place:
        out = state
    else:
        out = torch.empty(shape, dtype=torch.float32, device=device)
        record = [None]
    source = out if in_place else (out.zero_() if state is None else
                                   state.to(torch.float32).contiguous())
    if launch is not None:
        launch(source, out)
    elif source is not out:
        out.copy_(source)
    return _alias(out, record)
