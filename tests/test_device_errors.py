"""Asking for a GPU on a machine without one is a one-line user error, not a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from xdiff_cli.cli import app
from xdiff_cli.errors import XdiffError

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_run_with_device_cuda_and_no_gpu_is_a_user_error():
    result = CliRunner().invoke(app, ["run", "--preset", "tiny", "--device", "cuda", "--dry-run"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit) or result.exception is None or isinstance(
        result.exception, XdiffError
    )
    assert "no CUDA GPU is visible" in result.output
    assert "Traceback" not in result.output


def test_planner_memory_probe_refuses_cuda_without_a_gpu():
    from xdiff_cli.models.planner import available_memory

    with pytest.raises(XdiffError, match="no CUDA GPU"):
        available_memory("cuda")
