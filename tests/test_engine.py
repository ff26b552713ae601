"""The compiled engine: the same pyramid as eager (to float tolerance), compiled once per model, process and input
shape, the caller's model untouched, and refused before any work where it cannot run."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from conftest import randomise_batchnorm, tiny_model
from test_embedding import _one_pass
from vox2vec import ArgumentError, DeviceError, Runtime, embed_volume
from vox2vec.inference import sliding_window_head
from vox2vec.inference import tiling as tiling_module
from vox2vec.inference.engine import check_engine_usable
from vox2vec.inference.placement import inference_copy


def _runtime(**fields) -> Runtime:
    return Runtime(device="cpu", precision="fp32", progress=False, **fields)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.slow  # compiles the tiny backbone (seconds)
@pytest.mark.parametrize("tiling", ["fast", "paper"])
def test_the_compiled_engine_gives_the_eager_pyramid_and_compiles_once(abdomen_crop, tiling, monkeypatch):
    model = tiny_model(base_channels=2, num_scales=4)
    randomise_batchnorm(model.backbone)  # freezing folds batch norms into the convolutions: make them matter
    before = copy.deepcopy(model.backbone.state_dict())
    crop = abdomen_crop[:96, :80, :20]
    with monkeypatch.context() as patch:  # eager on the tiles the compiled engine plans (its fixed tile sides)
        patch.setattr(tiling_module, "fast_tile_sides", lambda engine: "compiled")
        eager = embed_volume(crop, model=model, runtime=_runtime(tiling=tiling), dtype=torch.float32)
    graphs = _compiled_graphs()
    compiled = embed_volume(crop, model=model, runtime=_runtime(tiling=tiling, engine="compile"),
                            dtype=torch.float32)
    assert _compiled_graphs() > graphs  # it did compile (dynamo did not fall back to eager)
    assert compiled.meta["window"] == eager.meta["window"]
    assert compiled.meta.get("tile_sides") == ("compiled" if tiling == "fast" else None)
    for level_eager, level_compiled in zip(eager.levels, compiled.levels, strict=True):
        torch.testing.assert_close(level_compiled, level_eager, rtol=1e-4, atol=1e-4)
    graphs = _compiled_graphs()
    again = embed_volume(crop, model=model, runtime=_runtime(tiling=tiling, engine="compile"), dtype=torch.float32)
    assert _compiled_graphs() == graphs  # the same model and tile shape: nothing compiles a second time
    assert all(torch.equal(a, b) for a, b in zip(again.levels, compiled.levels, strict=True))
    after = model.backbone.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the caller's weights, untouched


@pytest.mark.slow  # compiles the tiny backbone (seconds)
def test_fast_tiles_let_cts_of_different_sizes_share_what_was_compiled(abdomen_crop):
    """Under the compiled engine a smaller CT gets the same fast tile shape, so nothing compiles again — and a grid
    in one tile is still exactly one forward pass of the zero-padded grid."""
    model = tiny_model(base_channels=2, num_scales=4)
    runtime = _runtime(tiling="fast", engine="compile")
    first = embed_volume(abdomen_crop[:96, :80, :20], model=model, runtime=runtime, dtype=torch.float32)
    graphs = _compiled_graphs()
    smaller = abdomen_crop[:90, :76, :18]
    second = embed_volume(smaller, model=model, runtime=runtime, dtype=torch.float32)
    assert _compiled_graphs() == graphs
    assert second.meta["window"] == first.meta["window"] and second.meta["tile_sides"] == "compiled"
    image = model.preprocessor(smaller).image
    assert tiling_module.fast_tiles(image.shape, 4, 10**9).window != tuple(second.meta["window"])  # free sides differ
    for i, (level, expected) in enumerate(zip(second.levels, _one_pass(model.backbone, image, second.meta["window"]),
                                              strict=True)):
        cells = tuple(-(-n // 2**i) for n in image.shape)
        torch.testing.assert_close(level, expected[:, : cells[0], : cells[1], : cells[2]], rtol=1e-4, atol=1e-4)


def test_a_model_gets_a_new_compiled_copy_when_its_weights_change():
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


@pytest.fixture
def no_cpp_compiler(tmp_path, monkeypatch):
    """A PATH without a compiler, and inductor's memory of the one it found earlier in this process cleared."""
    from torch._inductor import cpp_builder

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    cpp_builder.cpp_compiler_search.cache_clear()
    yield
    cpp_builder.cpp_compiler_search.cache_clear()  # searched again, on the real PATH, by the next test that compiles


@pytest.mark.slow  # imports inductor (about a second or more alone): not in the quick loop
def test_compiling_without_a_cpp_compiler_is_refused_before_the_ct_is_read(tmp_path, no_cpp_compiler):
    missing = tmp_path / "not_read.nii.gz"  # reading it would fail differently: the refusal must come first
    with pytest.raises(DeviceError, match=r"needs a C\+\+ compiler .* engine='eager'"):
        embed_volume(missing, model=tiny_model(), runtime=_runtime(engine="compile"))
    model = tiny_model()
    with pytest.raises(DeviceError, match=r"needs a C\+\+ compiler"):  # the paper's protocol, called directly
        sliding_window_head(torch.zeros(40, 40, 16), model.backbone, lambda pyramid: pyramid[0],
                            runtime=_runtime(engine="compile"))


def test_compiling_where_torch_cannot_is_refused_naming_the_fix(monkeypatch):
    with pytest.raises(DeviceError, match=r"runs on the CPU and on CUDA GPUs, not on mps.*engine='eager'"):
        check_engine_usable("compile", torch.device("mps"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton"
                        else real_find_spec(name, *a))
    with pytest.raises(DeviceError, match=r"needs Triton .* pip install triton"):
        check_engine_usable("compile", torch.device("cuda"))
    check_engine_usable("eager", torch.device("mps"))  # eager needs nothing
