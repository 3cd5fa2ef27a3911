"""Before the first lesson notebook that needs them, build the course LM and the trained captioner once.

Lessons 03 and 05–09 load the pretrained course LM and the trained captioner from the cache
(`minivlm.lm.course_lm`, `minivlm.train.course_captioner`) and would otherwise make them inside a
notebook cell, a run of minutes with a progress bar: right for a learner in JupyterLab, but a cell of
several minutes that streams a progress bar is fragile under nbval (it waits at most 5 seconds for
each output message once a cell finishes). So the test run makes them here, with every CPU thread, and
the notebooks then load them in seconds. Their time counts in the suite's time as this setup's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

NEEDS_ARTIFACTS = re.compile(r"^(0[3-9])_")  # lessons 03 and later use the course LM or the trained captioner
_built = False


def pytest_runtest_setup(item):
    global _built
    path = Path(str(item.fspath))
    if _built or path.suffix != ".ipynb" or not NEEDS_ARTIFACTS.match(path.name):
        return
    _built = True
    import torch

    from minivlm.lm import course_lm
    from minivlm.train import course_captioner

    threads = torch.get_num_threads()  # a notebook may have set fewer; building uses the whole machine
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(threads, cores))
    try:  # its time shows as the setup of that notebook's first cell (pytest --durations=0)
        course_lm("cpu", progress=False)
        course_captioner("cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
