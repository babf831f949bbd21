#!/usr/bin/env python3
"""kernel-anchors.py: the anchors of `splitq bench kernels` on the GPU host.

Times the ops of `splitq bench kernels` written the way a PyTorch user would write them,
in eager mode and under torch.compile, on the same shapes, dtypes and bit widths, and
joins them with our figures by case name:

    build-gpu/splitq bench kernels --device cuda --json ours.json
    python3 scripts/kernel-anchors.py --ours ours.json [--json anchors.json] [--iters 50]

Without --ours it times the default table (the same names `splitq bench kernels` prints)
and prints the anchors alone. Each figure is the mean of --iters back-to-back calls after
3 warm-ups, the device synchronised around the loop (what `splitq bench kernels` does).

Case names are OP:SHAPE:DTYPE[:BITS] (kernels/op_table.h), e.g. unpack:nc_16384x4096:float32:b4.
Anchors per op (every one returns a new tensor, as ours do):
  copy        out.copy_(x) into a preallocated tensor (the bandwidth limit)
  fake_quant  eager: torch.fake_quantize_per_channel_affine; compile: the same formula in
              tensor ops under torch.compile
  lsq         forward + backward of a learned per-channel step (x and scale grads); eager:
              torch._fake_quantize_learnable_per_channel_affine; compile: LSQ in tensor ops
              (straight-through rounding, LSQ's gradient scale) under torch.compile
  pack        min-max quantize + pack to 4 bits in tensor ops. Two layouts: "ours" (each
              channel's codes contiguous, two codes per byte, low nibble first: the wire's
              layout byte for byte) and "rows" (two neighbouring channels of a row per
              byte, the layout a PyTorch user would pick); eager and compiled
  unpack      the inverse of pack, both layouts
  rotate      the randomized Hadamard rotation along channels in blocks (kernels/rotate.h):
              eager: random signs then a [block, block] matmul on the channels moved last;
              compile: the fast Walsh-Hadamard transform in tensor ops (log2(block) passes
              of view, add, subtract, cat) under torch.compile; compile_matmul: the eager
              version compiled
Mixed widths and stochastic rounding have no anchor (null).
"""
import argparse
import json
import math
import sys
import time

try:
    import torch
except ImportError:  # pragma: no cover
    sys.exit("kernel-anchors: python3 cannot import torch")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The default table (kernels/op_table.cc's PerfCases on CUDA, the ops with anchors): used
# without --ours.
DEFAULT_CASES = [
    {"op": op, "shape_name": name, "shape": shape, "axis": 1, "dtype": dt, "bits": bits}
    for name, shape, dtypes in (
        ("nc_16384x4096", [16384, 4096], ("float32", "bfloat16", "float16")),
        ("nchw_256x64x32x32", [256, 64, 32, 32], ("float32", "bfloat16")),
        ("nchw_8192x64x7x7", [8192, 64, 7, 7], ("float32", "bfloat16")))
    for dt in dtypes
    for op, bits in (("copy", None), ("fake_quant", 8), ("lsq", 8), ("pack", 4), ("unpack", 4),
                     ("rotate", None))
]
for _c in DEFAULT_CASES:
    if _c["op"] == "rotate":
        _c["block"] = min(256, _c["shape"][1])


def case_name(c):
    name = "%s:%s:%s" % (c["op"], c["shape_name"], c["dtype"])
    if c["op"] == "rotate":
        return name + ":r%d" % c["block"]
    if c.get("bits") is not None and c["op"] != "copy":
        name += ":b%s" % c["bits"]
    return name


def sync():
    torch.cuda.synchronize()


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / iters


# ---- the ops written in tensor ops ------------------------------------------------------

def channels_first(x, axis):
    """[groups, M]: each group's elements in the wire's code order (m = o * inner + j)."""
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def view_shape(x, axis):
    shape = [1] * x.dim()
    shape[axis] = x.shape[axis]
    return shape


def fake_quant_ops(x, scale, axis):
    s = scale.view(view_shape(x, axis))
    return (torch.clamp(torch.round(x * (1.0 / s)), -128, 127) * s).to(x.dtype)


def lsq_ops(x, scale, axis):
    s = scale.view(view_shape(x, axis))
    grad_scale = 1.0 / math.sqrt((x.numel() // x.shape[axis]) * 127)
    s = s * grad_scale + (s - s * grad_scale).detach()  # LSQ's gradient scale
    v = torch.clamp(x / s, -128, 127)
    v = v + (torch.round(v) - v).detach()  # straight-through rounding
    return (v * s).to(x.dtype)


def pack_ours(x, scale, offset, axis):
    xc = channels_first(x, axis).float()
    q = torch.clamp(torch.round((xc - offset[:, None]) / scale[:, None]), 0, 15).to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_ours(packed, scale, offset, shape, axis, dtype):
    q = torch.stack((packed & 15, packed >> 4), dim=2).view(packed.shape[0], -1).float()
    y = q * scale[:, None] + offset[:, None]
    moved = [shape[axis]] + [d for i, d in enumerate(shape) if i != axis]
    return y.view(moved).movedim(0, axis).to(dtype).contiguous()


def pack_rows(x, scale, offset, axis):
    s = scale.view(view_shape(x, axis))
    o = offset.view(view_shape(x, axis))
    q = torch.clamp(torch.round((x.float() - o) / s), 0, 15).to(torch.uint8)
    q = q.reshape(-1, 2)
    return q[:, 0] | (q[:, 1] << 4)


def unpack_rows(packed, scale, offset, shape, axis, dtype):
    q = torch.stack((packed & 15, packed >> 4), dim=1).view(shape).float()
    return (q * scale.view(view_shape(q, axis)) + offset.view(view_shape(q, axis))).to(dtype)


def hadamard(b, device):
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < b:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / math.sqrt(b)


def rotate_matmul(x, signs, h, axis):
    """R x along `axis` in blocks: (x * s) H / sqrt(b) on the channels moved last."""
    last = x.movedim(axis, -1)
    b = h.shape[0]
    v = last.reshape(*last.shape[:-1], last.shape[-1] // b, b)
    v = torch.matmul(v * signs.view(-1, b).to(x.dtype), h.to(x.dtype))
    return v.reshape(last.shape).movedim(-1, axis)


def rotate_fwht(x, signs, b, axis):
    """The same R as log2(b) butterfly passes in tensor ops (fp32 inside, as ours)."""
    last = x.movedim(axis, -1).float() * signs
    shape = last.shape
    v = last.reshape(-1, b)
    h = 1
    while h < b:
        v = v.view(-1, b // (2 * h), 2, h)
        v = torch.cat((v[:, :, :1] + v[:, :, 1:], v[:, :, :1] - v[:, :, 1:]), 2)
        h *= 2
    return (v.reshape(shape) * (1.0 / math.sqrt(b))).to(x.dtype).movedim(-1, axis).contiguous()


# ---- one case ---------------------------------------------------------------------------

def measure(c, iters, compile_mode):
    dtype = DTYPES[c["dtype"]]
    axis = c["axis"]
    torch.manual_seed(0)
    x = torch.randn(c["shape"], device="cuda", dtype=torch.float32).to(dtype)
    groups = x.shape[axis]
    amax = channels_first(x, axis).float().abs().amax(1)
    scale8 = (amax / 127.0).clamp_min(1e-8)
    lo = channels_first(x, axis).float().amin(1)
    hi = channels_first(x, axis).float().amax(1)
    scale4 = ((hi - lo) / 15.0).clamp_min(1e-8)
    out = {"name": case_name(c)}
    op = c["op"]
    bits = c.get("bits")
    compiled = lambda f: torch.compile(f, mode=compile_mode, dynamic=False)

    if op == "copy":
        buf = torch.empty_like(x)
        out["eager_ms"] = time_ms(lambda: buf.copy_(x), iters)
    elif op == "fake_quant" and bits == 8:
        zp = torch.zeros(groups, device="cuda", dtype=torch.int32)
        try:
            out["eager_ms"] = time_ms(
                lambda: torch.fake_quantize_per_channel_affine(x, scale8, zp, axis, -128, 127),
                iters)
        except RuntimeError as e:  # e.g. a dtype the op does not take
            out["eager_error"] = str(e).splitlines()[0]
        f = compiled(lambda t: fake_quant_ops(t, scale8, axis))
        out["compile_ms"] = time_ms(lambda: f(x), iters)
    elif op == "lsq" and bits == 8:
        dy = torch.randn_like(x)
        xg = x.detach().requires_grad_(True)
        sg = scale8.detach().clone().requires_grad_(True)
        zg = torch.zeros(groups, device="cuda", dtype=torch.float32, requires_grad=True)

        def eager():
            y = torch._fake_quantize_learnable_per_channel_affine(xg, sg, zg, axis, -128, 127, 1.0)
            torch.autograd.grad([y], [xg, sg, zg], [dy])
        try:
            out["eager_ms"] = time_ms(eager, iters)
        except RuntimeError as e:
            out["eager_error"] = str(e).splitlines()[0]
        f = compiled(lambda t, s: lsq_ops(t, s, axis))

        def comp():
            y = f(xg, sg)
            torch.autograd.grad([y], [xg, sg], [dy])
        out["compile_ms"] = time_ms(comp, iters)
    elif op == "pack" and bits == 4:
        out["eager_ms"] = time_ms(lambda: pack_ours(x, scale4, lo, axis), iters)
        f = compiled(lambda t: pack_ours(t, scale4, lo, axis))
        out["compile_ms"] = time_ms(lambda: f(x), iters)
        out["eager_rows_ms"] = time_ms(lambda: pack_rows(x, scale4, lo, axis), iters)
        g = compiled(lambda t: pack_rows(t, scale4, lo, axis))
        out["compile_rows_ms"] = time_ms(lambda: g(x), iters)
        # The compiled "ours" layout is our wire layout: the share of bytes that differ from
        # the eager version (same formula; compiled code may round a tie the other way).
        out["compile_vs_eager_bytes_differ"] = float(
            (f(x) != pack_ours(x, scale4, lo, axis)).float().mean())
    elif op == "unpack" and bits == 4:
        shape = list(x.shape)
        p_ours = pack_ours(x, scale4, lo, axis).contiguous()
        p_rows = pack_rows(x, scale4, lo, axis).contiguous()
        out["eager_ms"] = time_ms(lambda: unpack_ours(p_ours, scale4, lo, shape, axis, dtype), iters)
        f = compiled(lambda p: unpack_ours(p, scale4, lo, shape, axis, dtype))
        out["compile_ms"] = time_ms(lambda: f(p_ours), iters)
        out["eager_rows_ms"] = time_ms(lambda: unpack_rows(p_rows, scale4, lo, shape, axis, dtype),
                                       iters)
        g = compiled(lambda p: unpack_rows(p, scale4, lo, shape, axis, dtype))
        out["compile_rows_ms"] = time_ms(lambda: g(p_rows), iters)
    elif op == "rotate":
        b = c["block"]
        signs = (torch.randint(0, 2, (groups,), device="cuda") * 2 - 1).float()
        h = hadamard(b, "cuda")
        out["eager_ms"] = time_ms(lambda: rotate_matmul(x, signs, h, axis), iters)
        f = compiled(lambda t: rotate_fwht(t, signs, b, axis))
        out["compile_ms"] = time_ms(lambda: f(x), iters)
        g = compiled(lambda t: rotate_matmul(t, signs, h, axis))
        out["compile_matmul_ms"] = time_ms(lambda: g(x), iters)
        out["fwht_vs_matmul_max_abs"] = float(
            (f(x).float() - rotate_matmul(x.float(), signs, h, axis)).abs().max())
    return out


def fmt(v):
    return "-" if v is None else "%.3f" % v


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ours", help="JSON written by `splitq bench kernels --json`")
    ap.add_argument("--json", help="write the anchors (and the join) here")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--compile-mode", default="max-autotune-no-cudagraphs",
                    help="torch.compile mode (default: %(default)s)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel-anchors: no CUDA device")

    ours = {}
    cases = DEFAULT_CASES
    if args.ours:
        with open(args.ours) as f:
            doc = json.load(f)
        cases = []
        for c in doc["cases"]:
            ours[c["name"]] = c
            if "op" in c:
                cases.append(c)
    print("kernel-anchors: %s, torch %s, %d cases, mean of %d calls, compile mode %s" %
          (torch.cuda.get_device_name(), torch.__version__, len(cases), args.iters,
           args.compile_mode), flush=True)

    rows = []
    for c in cases:
        try:
            a = measure(c, args.iters, args.compile_mode)
        except Exception as e:  # report and go on: one failed anchor must not hide the rest
            a = {"name": case_name(c), "error": "%s: %s" % (type(e).__name__, e)}
        rows.append(a)
        print("  %-44s eager %s ms, compile %s ms%s" % (
            a["name"], fmt(a.get("eager_ms")), fmt(a.get("compile_ms")),
            (", rows layout: eager %s, compile %s" % (fmt(a.get("eager_rows_ms")),
                                                      fmt(a.get("compile_rows_ms"))))
            if "compile_rows_ms" in a else "") +
            ("  ERROR " + a["error"] if "error" in a else ""), flush=True)

    if ours:
        print("\n| case | ours ms | % of copy | % of rw bound | eager ms | compile ms |"
              " compile (rows layout; rotate: matmul) ms |"
              " best torch / ours |")
        print("|---|---|---|---|---|---|---|---|")
        for a in rows:
            o = ours.get(a["name"], {})
            ours_ms = o.get("ours_ms")
            torch_best = min([v for v in (a.get("eager_ms"), a.get("compile_ms"),
                                          a.get("eager_rows_ms"), a.get("compile_rows_ms"),
                                          a.get("compile_matmul_ms"))
                              if v is not None] or [float("nan")])
            if a["name"].startswith("copy:"):
                torch_best = float("nan")
            pct = o.get("pct_of_copy")
            rw = o.get("pct_of_rw_bound")
            print("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                a["name"], fmt(ours_ms), "-" if pct is None else "%.0f%%" % pct,
                "-" if not rw else "%.0f%%" % rw,
                fmt(a.get("eager_ms")), fmt(a.get("compile_ms")),
                fmt(a.get("compile_rows_ms", a.get("compile_matmul_ms"))),
                "-" if ours_ms is None or math.isnan(torch_best)
                else "%.2fx" % (torch_best / ours_ms)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "iters": args.iters, "compile_mode": args.compile_mode,
                       "anchors": rows}, f, indent=1)
        print("wrote %s" % args.json)


if __name__ == "__main__":
    main()
