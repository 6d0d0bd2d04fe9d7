"""Toeplitz terms: direct taps for short kernels and decode steps, FFT
convolution padded to >= T + L - 1 for long ones (runtime/torch/conv.py).
Template: codegen/torch/templates/toeplitz.py.jinja."""

from mixerc.codegen.torch.emit import axes_of


def emit(tp, mp, w, key, values):
    heads = mp.heads
    dst = ("l",) + tuple(heads)
    h = tp.operands["h"].node
    kern = w.convert(w.value(h), axes_of(h), dst, expand=True)
    for name, o in tp.operands.items():
        if name.startswith("scale"):  # static scale factors fold into the kernel
            kern = f"{kern} * {w.convert(w.value(o.node), axes_of(o.node), dst)}"
    if len(heads) > 1:  # one axis of channels
        kern = kern if kern.isidentifier() else f"({kern})"
        kern = f"{kern}.reshape(-1, {w.size_expr(heads)})"
    first, stop = tp.flags["first"], tp.flags["stop"]
    if stop is not None:  # mask t - s <= stop - 1: drop the later taps
        kern = f"{w.assign(kern, hint='h')}[:{stop}]"
    if first:  # mask t - s >= first: zero the earlier taps
        kern = w.assign(kern, hint="h")
        kern = f"torch.cat([torch.zeros_like({kern}[:{first}]), {kern}[{first}:]])"
    hk = w.assign(kern, hint="h")
    fn = w.function("toeplitz.py.jinja", base="toeplitz", title=mp.info.cls)
    y = w.fresh("y")
    read, write = w.state(key)
    w.line(f"{y}, {write} = {fn}({values}, {hk}, {read}, {w.config_key(key, 'direct_max', tp)})")
    return y


def space(tp):
    # taps cost O(L T), the FFT O(T log T) flat in L: on a 2-core CPU (float32,
    # 512 channels, T = 2k..8k) they cross near L = 28
    return {"direct_max": ([4, 8, 16, 24, 32, 64, 128], 24)}
