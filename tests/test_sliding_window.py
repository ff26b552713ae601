"""Per-window head evaluation reproduces the original sw_predict stitching."""

import itertools

import pytest
import torch

from conftest import tiny_model
from vox2vec.inference import sliding_window_head
from vox2vec.inference.windows import original_starts
from vox2vec.modeling import FPNLinearHead, FPNNonLinearHead


def _reference(image, backbone, head, window, stride, trim):
    """Per voxel: the value of the *last* window (raster order) whose trimmed centre holds it."""
    shape = image.shape
    starts = list(itertools.product(*(original_starts(n, w, s) for n, w, s in zip(shape, window, stride))))
    result = None
    with torch.inference_mode():
        for start in starts:
            crop = image[tuple(slice(s, s + w) for s, w in zip(start, window))]
            logits = head(backbone(crop[None, None]))[0]
            if result is None:
                result = torch.full((logits.shape[0], *shape), float("nan"))
            for local in itertools.product(*(range(w) for w in window)):
                inner = all(
                    (s == 0 or li >= t) and (s + w == n or li < w - t)
                    for li, s, w, t, n in zip(local, start, window, trim, shape)
                )
                if inner:
                    result[(slice(None), *(s + li for s, li in zip(start, local)))] = logits[(slice(None), *local)]
    return result


@pytest.mark.parametrize("head_cls", [FPNLinearHead, FPNNonLinearHead])
def test_matches_original_stitching(head_cls):
    torch.manual_seed(0)
    model = tiny_model(base_channels=2, num_scales=3)
    head = head_cls(2, 3, 3).eval()
    image = torch.rand(21, 19, 11)
    window, overlap = (8, 8, 4), 0.5  # overlap (4, 4, 2), stride (4, 4, 2), trim (2, 2, 1): the 128/32 scheme scaled
    ours = sliding_window_head(image, model.backbone, head, window=window, overlap=overlap, batch_size=3)
    ref = _reference(image, model.backbone, head, window, (4, 4, 2), (2, 2, 1))
    assert not torch.isnan(ref).any()
    torch.testing.assert_close(ours, ref)


def test_paper_window_layout():
    """128×128×32 windows, stride 64×64×16, the last window flush with the border."""
    assert original_starts(300, 128, 64) == [0, 64, 128, 172]
    assert original_starts(147, 32, 16) == [0, 16, 32, 48, 64, 80, 96, 112, 115]
    assert original_starts(128, 128, 64) == [0]


def test_small_volume_is_padded():
    """A volume smaller than one window: zero-padded at the far end to the window, one forward pass, cropped back."""
    torch.manual_seed(0)
    model = tiny_model(base_channels=2, num_scales=3)
    head = FPNLinearHead(2, 3, 2).eval()
    image = torch.rand(5, 6, 3)
    out = sliding_window_head(image, model.backbone, head, window=(8, 8, 4))
    padded = torch.zeros(8, 8, 4)
    padded[:5, :6, :3] = image
    with torch.inference_mode():
        reference = head(model.backbone.eval()(padded[None, None]))[0, :, :5, :6, :3]
    torch.testing.assert_close(out, reference)
