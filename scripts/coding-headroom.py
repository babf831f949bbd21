#!/usr/bin/env python3
"""coding-headroom.py: what other table and framing schemes would cost on a run's own frames.

    scripts/coding-headroom.py DUMPDIR GROUPS BITS [--way up|down] [--frames N]

DUMPDIR comes from `splitq bench coding ... --dump DUMPDIR` (one byte per code, group after
group, in `<way>_NNN.codes`); GROUPS and BITS are the frames' group count and (uniform) code
width. For each frame it prints, as a ratio to the order-0 entropy of the codes (one histogram
per group, the `code_entropy` the runs report), an estimate of the payload under:

  own-each      every group with its own table (3 bytes + 1.5 a nonzero frequency, an average
                of the format's 1- and 2-byte varints), one mode byte, in one stream per frame
                (no per-group states or length)
  shared-only   one frame-wide table for all groups (cross-entropy), one stream
  own|shared    the cheaper of the two per group, one stream
  geo2          a two-sided geometric table per group (integer centre, one decay rate each
                side from 64 levels: 2 bytes), cross-entropy, one stream
  geo2|own      the cheaper of geo2 and an own table per group, one stream

These are estimates from counts (ideal coding of the stated probabilities, table bytes as
stated), not a coder: docs/results.md says how they compare with the coder's real sizes. The
current format (coding version 1) pays per group a stream length and 8 bytes of final states on
top of own-each / own|shared.
"""
import argparse
import glob
import math
import os
import sys

THETAS = [(i + 0.5) / 64 for i in range(64)]


def entropy_bits(counts):
    n = sum(counts)
    return sum(c * math.log2(n / c) for c in counts if c)


def cross_bits(counts, q):
    return sum(c * -math.log2(q[s]) for s, c in enumerate(counts) if c)


def geometric(alphabet, centre, left, right):
    w = [0.0] * alphabet
    w[centre] = 1.0
    for s in range(centre - 1, -1, -1):
        w[s] = w[s + 1] * left
    for s in range(centre + 1, alphabet):
        w[s] = w[s - 1] * right
    t = sum(w)
    return [max(x / t, 1e-12) for x in w]


def geo2_bytes(counts):
    alphabet = len(counts)
    mode = max(range(alphabet), key=lambda s: counts[s])
    best = math.inf
    for centre in (mode - 1, mode, mode + 1):
        if not 0 <= centre < alphabet:
            continue
        left = min(THETAS, key=lambda t: cross_bits(counts, geometric(alphabet, centre, t, 0.5)))
        right = min(THETAS, key=lambda t: cross_bits(counts, geometric(alphabet, centre, left, t)))
        left = min(THETAS, key=lambda t: cross_bits(counts, geometric(alphabet, centre, t, right)))
        best = min(best, cross_bits(counts, geometric(alphabet, centre, left, right)) / 8 + 2)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dump")
    ap.add_argument("groups", type=int)
    ap.add_argument("bits", type=int)
    ap.add_argument("--way", default="up", choices=("up", "down"))
    ap.add_argument("--frames", type=int, default=3)
    args = ap.parse_args()
    paths = sorted(glob.glob(os.path.join(args.dump, "%s_*.codes" % args.way)))[:args.frames]
    if not paths:
        sys.exit("coding-headroom: no %s_*.codes in %s" % (args.way, args.dump))
    alphabet = 1 << args.bits
    print("frame  M  entropy_bytes  own-each  shared-only  own|shared  geo2  geo2|own")
    for path in paths:
        data = open(path, "rb").read()
        m = len(data) // args.groups
        if m * args.groups != len(data):
            sys.exit("coding-headroom: %s holds %d codes, not a multiple of %d groups" %
                     (path, len(data), args.groups))
        counts = []
        for g in range(args.groups):
            c = [0] * alphabet
            for b in data[g * m:(g + 1) * m]:
                if b >= alphabet:
                    sys.exit("coding-headroom: code %d in %s is not a %d-bit code" %
                             (b, path, args.bits))
                c[b] += 1
            counts.append(c)
        ent = sum(entropy_bits(c) for c in counts) / 8
        total = [sum(c[s] for c in counts) for s in range(alphabet)]
        shared_q = [(t + 0.5) / (sum(total) + 0.5 * alphabet) for t in total]
        own_table = [3 + 1.5 * sum(1 for x in c if x) for c in counts]
        own = [entropy_bits(c) / 8 + tb + 1 for c, tb in zip(counts, own_table)]
        shared = [cross_bits(c, shared_q) / 8 + 1 for c in counts]
        geo = [geo2_bytes(c) + 1 for c in counts]
        states = 8  # one stream per frame: two final states
        r = lambda v: (sum(v) + states) / ent
        print("%s  %d  %.0f  %.3f  %.3f  %.3f  %.3f  %.3f" % (
            os.path.basename(path), m, ent, r(own), (sum(shared) + states) / ent,
            r([min(a, b) for a, b in zip(own, shared)]), r(geo),
            r([min(a, b) for a, b in zip(own, geo)])))


if __name__ == "__main__":
    main()
