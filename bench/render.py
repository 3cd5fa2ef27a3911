"""How fast does the shapes world make images? Scenes sampled, then rendered one by one and in batches, CPU.

Every sample is drawn from its own random generator, `np.random.default_rng([seed, split, index])`,
so sampling a scene is a little Python per image. Rendering is numpy: `render_batch` draws every
object of one size and shape in all N images in one vectorised step, 4 × 4 supersampled for
anti-aliasing, so its cost per image falls far below that of `render` called once per image.
The line that matters for the course: a whole training set at 32 px takes seconds, not minutes.

Each time is one cold run (the scenes are not cached). The numbers depend on the machine and on what
else runs on it.

Run from the repository root:
    .venv/bin/python bench/render.py          # 60,000 images at 32 px and 6,000 at 64 px (about 10 s on 2 cores)
    .venv/bin/python bench/render.py --quick  # a few hundred images: proves the script runs
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from minivlm.data.shapes import ShapesWorld, render, render_batch

FULL = ((32, 60_000), (64, 6_000))  # (image size, images) per row of the table
QUICK = ((32, 600), (64, 60))
SINGLE = 0.02  # the fraction of the images also rendered one call per image (it is slow)


def seconds(fn) -> tuple[float, object]:
    """Wall-clock seconds of one call of `fn()`, and what it returned."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    """Time sampling, one-by-one and batched rendering for each size; print images per second."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred images: a smoke run of about a second")
    args = parser.parse_args()
    print(f"shapes world render benchmark ({'quick' if args.quick else 'full'}), CPU, numpy {np.__version__}, "
          f"python {platform.python_version()}, {platform.processor() or platform.machine()}")  # fmt: skip
    print(f"  {'size':>4}  {'images':>7}  {'sample scenes':>13}  {'render 1 by 1':>13}  {'render batch':>13}  "
          f"{'sample + batch':>14}  {'total time':>10}")  # fmt: skip
    for size, n in QUICK if args.quick else FULL:
        world = ShapesWorld(image_size=size, length=n)
        sample_s, scenes = seconds(lambda: [world.scene(i) for i in range(n)])
        few = scenes[: max(1, int(n * SINGLE))]
        single_s, _ = seconds(lambda: [render(scene, size) for scene in few])
        batch_s, images = seconds(lambda: render_batch(scenes, size))  # what world.images does after sampling
        assert images.shape == (n, size, size, 3)
        total = sample_s + batch_s
        print(f"  {size:>4}  {n:>7,}  {n / sample_s:>11,.0f}/s  {len(few) / single_s:>11,.0f}/s  "
              f"{n / batch_s:>11,.0f}/s  {n / total:>12,.0f}/s  {total:>8.1f} s")  # fmt: skip
    print("  images (or scenes) per second; 'sample + batch' is what ShapesWorld.images(range(N)) costs")


if __name__ == "__main__":
    main()
