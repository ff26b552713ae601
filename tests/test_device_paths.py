"""What the GPU paths promise, checked where it shows on a CPU: the caller's modules are never mutated, outputs come
back to the CPU, the OOM fallback retries with smaller batches, batches pin, precisions are what they say."""

from __future__ import annotations

import pytest
import torch

import vox2vec
from conftest import tiny_model
from vox2vec.errors import ArgumentError, DeviceError
from vox2vec.inference import embed
from vox2vec.inference.embed import embed_image
from vox2vec.inference.placement import inference_copy
from vox2vec.inference.precision import autocast, local_device, strict_fp32, training_precision
from vox2vec.modeling import FPNLinearHead
from vox2vec.probing.apply import apply_head


def _formats(module: torch.nn.Module) -> list[bool]:
    return [p.is_contiguous() for p in module.parameters()]


def test_embedding_leaves_the_callers_model_as_it_was(abdomen_crop):
    model = tiny_model(base_channels=4, num_scales=4).train()
    requires_grad = [p.requires_grad for p in model.parameters()]
    pyramid = vox2vec.embed_volume(abdomen_crop, model=model, device="cpu", progress=False)
    assert model.training and all(_formats(model)) and requires_grad == [p.requires_grad for p in model.parameters()]
    model.eval()
    again = vox2vec.embed_volume(abdomen_crop, model=model, device="cpu", progress=False)
    torch.testing.assert_close(pyramid.levels[0], again.levels[0])  # the copy ran in eval mode both times


def test_the_inference_copy_follows_the_callers_weight_updates():
    model = tiny_model(base_channels=2, num_scales=3)
    first = inference_copy(model.backbone, torch.device("cpu"), channels_last=True)
    assert inference_copy(model.backbone, torch.device("cpu"), channels_last=True) is first  # cached
    with torch.no_grad():
        model.backbone.first_conv.weight.add_(1.0)  # what an optimiser step does
    second = inference_copy(model.backbone, torch.device("cpu"), channels_last=True)
    assert second is not first
    torch.testing.assert_close(second.first_conv.weight, model.backbone.first_conv.weight)
    assert inference_copy(model.backbone, torch.device("cpu")) is model.backbone  # already usable as it is


def test_sliding_window_head_returns_cpu_and_leaves_the_head_in_training_mode(abdomen_crop):
    model = tiny_model(base_channels=2, num_scales=3)
    head = FPNLinearHead(2, 3, 2).train()
    image = model.preprocessor(abdomen_crop).image
    logits = vox2vec.sliding_window_head(image, model.backbone, head, window=(64, 64, 16), device="cpu")
    assert logits.device.type == "cpu" and logits.shape[0] == 2 and tuple(logits.shape[1:]) == tuple(image.shape)
    assert head.training and model.backbone.training is False


def test_apply_head_leaves_the_head_untouched(abdomen_crop):
    model = tiny_model(base_channels=2, num_scales=3)
    pyramid = vox2vec.embed_volume(abdomen_crop, model=model, progress=False)
    head = FPNLinearHead(2, 3, 2).train()
    apply_head(head, pyramid)
    assert head.training


def test_out_of_memory_retries_the_same_windows_in_smaller_batches(abdomen_crop, monkeypatch):
    model = tiny_model(base_channels=2, num_scales=3)
    image = model.preprocessor(abdomen_crop).image
    reference = embed_image(image, model.backbone, window=(32, 32, 16), batch_size=1, progress=False)
    real_forward, sizes = embed._forward, []

    def forward_with_a_small_memory(backbone, crops, *args):
        sizes.append(len(crops))  # windows in this forward pass
        if len(crops) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(backbone, crops, *args)

    monkeypatch.setattr(embed, "_forward", forward_with_a_small_memory)
    levels = embed_image(image, model.backbone, window=(32, 32, 16), batch_size=8, progress=False)
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) <= 2
    for got, want in zip(levels, reference):
        torch.testing.assert_close(got, want)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one window that does not fit is the user's to see
        monkeypatch.setattr(embed, "_forward", lambda *a: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()))
        embed_image(image, model.backbone, window=(32, 32, 16), batch_size=1, progress=False)


def test_pair_batches_pin_their_tensors(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    from vox2vec.pretrain.sampling import PairBatch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self.shape) or self.clone())
    batch = PairBatch(torch.zeros(2, 3, 1, 8, 8, 4, dtype=torch.int16), [torch.zeros(5, 3)] * 3,
                      [torch.ones(5, 3)] * 3, "case")
    out = pin_memory(batch)  # what the DataLoader does with pin_memory=True
    assert isinstance(out, PairBatch) and out.case == "case" and len(pinned) == 7
    assert out.patches is not batch.patches and torch.equal(out.patches, batch.patches)


def test_training_precisions():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert training_precision("auto", cpu) == "fp32" and training_precision("auto", cuda) == "bf16"
    assert training_precision("bf16", cpu) == "bf16"
    with pytest.raises(ArgumentError, match="loss scaling"):
        training_precision("fp16", cuda)
    with pytest.raises(vox2vec.InputError, match="fp16 training would need loss scaling"):
        from vox2vec.probing.finetune import _checked_config

        _checked_config(None, {"precision": "fp16"})


def test_fp32_on_cuda_switches_tf32_off_and_restores_it():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with strict_fp32():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before
    assert type(autocast("fp32", torch.device("cpu"))).__name__ == "nullcontext"


@pytest.mark.parametrize(("rank", "count", "expected"), [(0, 1, 0), (1, 1, 0), (1, 4, 1), (3, 4, 3)])
def test_each_rank_finds_its_gpu(monkeypatch, rank, count, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert local_device(rank) == torch.device("cuda", expected)


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match="LOCAL_RANK 2 but this process sees 2 GPUs"):
        local_device(2)

