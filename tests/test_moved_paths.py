"""Module paths of dst_prune 0.2 still import (with a DeprecationWarning) and give the very same objects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from dst_prune import _moved


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_an_old_module_path_warns_and_is_the_new_module(old):
    new = importlib.import_module(_moved.MOVED[old])
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {_moved.MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is new


def test_the_documented_old_imports_work_in_a_fresh_process():
    probe = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
             "import dst_prune\n"
             "try:\n    from dst_prune.distributed_checkpoint import save\nexcept DeprecationWarning as w: print(w)\n"
             "warnings.simplefilter('ignore')\n"
             "from dst_prune.distributed_checkpoint import save\n"
             "from dst_prune.distributed.checkpoint import save as new\n"
             "from dst_prune.models.lenet import lenet_300_100\n"
             "from dst_prune.compat.models.lenet import lenet_300_100 as new_lenet\n"
             "from dst_prune.sparsity import DynamicSparsity\n"
             "assert save is new and lenet_300_100 is new_lenet and DynamicSparsity is dst_prune.DynamicSparsity\n"
             "print('same objects')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dst_prune.distributed_checkpoint moved to dst_prune.distributed.checkpoint" in result.stdout
    assert "same objects" in result.stdout
