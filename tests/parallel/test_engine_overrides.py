"""The engine's own instructions refuse to run beside DeepSpeed code they were not checked against."""
from __future__ import annotations

import pytest

from ds_seg3d.parallel import joint_backward, received_inputs


def test_the_installed_deepspeed_is_a_checked_one():
    joint_backward.check_deepspeed()
    received_inputs.check_deepspeed()


@pytest.mark.parametrize("name", ["_exec_backward_pass", "_exec_recv_activations", "_exec_forward_pass"])
def test_changed_deepspeed_source_is_refused_by_name(name):
    with pytest.raises(RuntimeError, match=f"PipelineEngine.{name} differs.*DS_SEG3D_X=0"):
        joint_backward.check_source(name, {"0" * 64: "0.0.0"}, "override", "DS_SEG3D_X")


@pytest.mark.parametrize("module", [joint_backward, received_inputs])
def test_switched_off_by_its_environment_variable(monkeypatch, module):
    monkeypatch.setenv(module.ENV, "0")
    assert not module.enabled() and module.install(object()) is False
    monkeypatch.setenv(module.ENV, "1")
    assert module.enabled()
