"""components.resources.usable_cpus: the affinity mask capped by the cgroup CPU quota."""

import os

import pytest

from components.resources import usable_cpus

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [
        ("max 100000\n", None),  # no limit
        ("100000 100000\n", 1),  # a limit of 1 CPU
        ("150000 100000\n", 2),  # 1.5 CPUs: a second process still gets half a core
        ("50000 100000\n", 1),  # under one CPU: still one worker
        ("garbage\n", None),  # unreadable: the affinity mask alone
    ],
)
def test_the_cgroup_quota_caps_the_affinity_mask(tmp_path, cpu_max, cap):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (affinity if cap is None else min(affinity, cap))
    assert usable_cpus(tmp_path / "missing") == affinity
