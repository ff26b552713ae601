"""The compiled engine: the same pyramid as eager (to float tolerance), compiled once per model and process, the
caller's model untouched, and refused before any work where it cannot run."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import randomise_batchnorm, tiny_model
from vox2vec import ArgumentError, DeviceError, Runtime, embed_volume
from vox2vec.inference.placement import inference_copy


def _runtime(**fields) -> Runtime:
    return Runtime(device="cpu", precision="fp32", progress=False, **fields)


@pytest.mark.slow  # compiles the tiny backbone (seconds)
@pytest.mark.parametrize("tiling", ["fast", "paper"])
def test_the_compiled_engine_gives_the_eager_pyramid(abdomen_crop, tiling):
    model = tiny_model(base_channels=2, num_scales=4)
    randomise_batchnorm(model.backbone)  # freezing folds batch norms into the convolutions: make them matter
    before = copy.deepcopy(model.backbone.state_dict())
    crop = abdomen_crop[:96, :80, :20]
    eager = embed_volume(crop, model=model, runtime=_runtime(tiling=tiling), dtype=torch.float32)
    compiled = embed_volume(crop, model=model, runtime=_runtime(tiling=tiling, engine="compile"),
                            dtype=torch.float32)
    for level_eager, level_compiled in zip(eager.levels, compiled.levels, strict=True):
        torch.testing.assert_close(level_compiled, level_eager, rtol=1e-4, atol=1e-4)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the caller's weights, untouched
    assert not any(isinstance(m, torch.nn.Module) and type(m).__name__ == "_FrozenCompiled"
                   for m in model.backbone.modules())


@pytest.mark.slow
def test_a_model_is_compiled_once_per_process_and_again_when_its_weights_change():
    model = tiny_model(base_channels=2, num_scales=3)
    cpu = torch.device("cpu")
    first = inference_copy(model.backbone, cpu, compiled=True)
    assert inference_copy(model.backbone, cpu, compiled=True) is first
    assert inference_copy(model.backbone, cpu) is not first  # eager callers never get the compiled copy
    with torch.no_grad():
        next(model.backbone.parameters()).add_(1.0)
    assert inference_copy(model.backbone, cpu, compiled=True) is not first


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(ArgumentError, match=r"engine must be one of 'eager', 'compile', got 'jit'"):
        Runtime(engine="jit")


def test_compiling_without_a_cpp_compiler_is_refused_before_the_ct_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    monkeypatch.delenv("CXX", raising=False)
    missing = tmp_path / "not_read.nii.gz"  # reading it would fail differently: the refusal must come first
    with pytest.raises(DeviceError, match=r"needs a C\+\+ compiler .* engine='eager'"):
        embed_volume(missing, model=tiny_model(), runtime=_runtime(engine="compile"))
