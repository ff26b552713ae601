"""The backbone is the published FPN3d: same state_dict names and shapes, same function, same pyramid shapes."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vox2vec.modeling import FPN3d, FPNLinearHead, FPNNonLinearHead, ProjectionHead

REFERENCE_JSON = Path(__file__).resolve().parents[2] / "shared/reference/vox2vec_fpn_state_dict.json"
REFERENCE = json.loads(REFERENCE_JSON.read_text())


def test_state_dict_matches_published_names_shapes_and_order():
    model = FPN3d(1, 16, 6)
    mine = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert mine == [[k, list(s)] for k, s in REFERENCE["state_dict"]]
    assert len(mine) == 340
    assert sum(p.numel() for p in model.parameters()) == REFERENCE["num_parameters"] == 47_624_448


def test_heads_match_original_layouts():
    heads = REFERENCE["heads_for_reference"]
    for cls, key in [(FPNLinearHead, "FPNLinearHead(16,6,num_classes=13)"),
                     (FPNNonLinearHead, "FPNNonLinearHead(16,6,num_classes=13)")]:
        head = cls(16, 6, 13)
        assert [[k, list(v.shape)] for k, v in head.state_dict().items()] == heads[key]["state_dict"]
        assert sum(p.numel() for p in head.parameters()) == heads[key]["num_parameters"]
    proj = next(v for k, v in heads.items() if k.startswith("Vox2Vec.proj_head"))
    assert [[k, list(v.shape)] for k, v in ProjectionHead().state_dict().items()] == \
        proj["state_dict_keys_if_standalone_Sequential"]


@pytest.mark.parametrize("shape", ["(1,1,128,128,32)", "(1,1,100,100,30)_non_divisible_example"])
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_pyramid_shapes_match_reference(shape):
    expected = REFERENCE["pyramid_output_shapes_eval_mode"][shape]
    size = [int(n) for n in shape.split(")")[0].strip("(").split(",")]
    model = FPN3d(1, 16, 6).eval()
    with torch.inference_mode():
        out = model(torch.rand(size))
    assert [list(t.shape) for t in out] == expected


def _reference_forward(state: dict, x: torch.Tensor, num_scales: int) -> list[torch.Tensor]:
    """The published FPN3d written out functionally from its state_dict names (eval-mode BN)."""

    def bn(prefix, t):
        return F.batch_norm(t, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                            state[prefix + ".weight"], state[prefix + ".bias"], False, 0.0, 1e-5)

    def conv(prefix, t, padding):
        return F.conv3d(t, state[prefix + ".weight"], state[prefix + ".bias"], padding=padding)

    def stack(prefix, t):
        for k in range(2):
            p = f"{prefix}.layers.{k}.layers"
            h = conv(f"{p}.2", F.relu(bn(f"{p}.0", t)), 1)
            t = t + conv(f"{p}.5", F.relu(bn(f"{p}.3", h)), 1)
        return t

    x = conv("first_conv", x, 1)
    skips = []
    for i in range(num_scales - 1):
        x = stack(f"left_blocks.{i}", x)
        skips.append(x)
        x = conv(f"down_blocks.{i}.1", F.max_pool3d(x, 2, ceil_mode=True), 0)
    x = stack("bottom_block", x)
    outs = [x]
    for j in range(num_scales - 1):
        e = skips[-1 - j]
        up = F.interpolate(conv(f"up_blocks.{j}.0", x, 0), scale_factor=2, mode="nearest")
        x = up[:, :, : e.shape[2], : e.shape[3], : e.shape[4]] + conv(f"skip_blocks.{j}", e, 0)
        x = stack(f"right_blocks.{j}", x)
        outs.append(x)
    return outs[::-1]


def _backbone_and_input(seed: int) -> tuple[FPN3d, torch.Tensor]:
    """A small eval-mode FPN3d with random batch-norm statistics, and an input of odd size (ceil-mode pooling)."""
    from conftest import randomise_batchnorm

    torch.manual_seed(seed)
    model = FPN3d(1, 4, 4)
    randomise_batchnorm(model)
    return model.eval(), torch.rand(2, 1, 20, 18, 9)


def test_backbone_computes_the_published_function():
    model, x = _backbone_and_input(0)
    with torch.inference_mode():
        ours = model(x)
        ref = _reference_forward(model.state_dict(), x, 4)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_head_is_a_linear_map_of_the_concatenated_embedding():
    torch.manual_seed(0)
    head = FPNLinearHead(2, 4, 3)
    pyramid = [torch.randn(1, 2 * 2**i, *(-(-n // 2**i) for n in (9, 7, 5))) for i in range(4)]
    logits = head(pyramid)
    weight = torch.cat([layer.weight[:, :, 0, 0, 0] for layer in head.layers], dim=1)
    point = (7, 3, 4)
    embedding = torch.cat([lv[0, :, point[0] >> i, point[1] >> i, point[2] >> i] for i, lv in enumerate(pyramid)])
    torch.testing.assert_close(logits[0, :, point[0], point[1], point[2]], weight @ embedding + head.layers[0].bias)


@pytest.mark.parametrize("head_type", [FPNLinearHead, FPNNonLinearHead])
@pytest.mark.parametrize("training", [False, True])
def test_voxel_wise_forward_is_the_module_on_one_voxel_pyramids(head_type, training):
    """Heads train on sampled voxel rows (forward_voxels); that must be the module's own forward, BatchNorm included."""
    torch.manual_seed(0)
    head = head_type(2, 4, 3)
    for layer in head.modules():
        if isinstance(layer, torch.nn.BatchNorm3d):
            layer.running_mean.uniform_(-0.5, 0.5)
            layer.running_var.uniform_(0.5, 2.0)
    twin = copy.deepcopy(head)
    head.train(training), twin.train(training)
    channels = [2, 4, 8, 16]
    rows = torch.randn(64, sum(channels))
    pyramid = [part[:, :, None, None, None] for part in torch.split(rows, channels, dim=1)]
    torch.testing.assert_close(head.forward_voxels(rows), twin(pyramid)[:, :, 0, 0, 0], atol=1e-5, rtol=1e-5)
    for a, b in zip(head.buffers(), twin.buffers()):  # running statistics updated alike in training mode
        torch.testing.assert_close(a, b)


def test_the_backbone_is_the_published_function_bit_for_bit_and_in_its_gradients():
    """The decoder adds in place and frees encoder maps early (memory); values must not move by a single bit, and
    autograd must see the same function (the in-place add is on a fresh tensor no backward needs)."""
    model, x = _backbone_and_input(1)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(model(x), _reference_forward(model.state_dict(), x, 4)))
    ours_input = x.clone().requires_grad_()
    ref_input = x.clone().requires_grad_()
    weights = [torch.rand_like(level) for level in _reference_forward(model.state_dict(), x, 4)]
    sum((w * level).sum() for w, level in zip(weights, model(ours_input))).backward()
    parameters = dict(model.named_parameters())
    state = {name: t.detach().clone().requires_grad_(name in parameters) for name, t in model.state_dict().items()}
    sum((w * level).sum() for w, level in zip(weights, _reference_forward(state, ref_input, 4))).backward()
    torch.testing.assert_close(ours_input.grad, ref_input.grad, rtol=1e-5, atol=1e-6)
    for name, parameter in parameters.items():
        torch.testing.assert_close(parameter.grad, state[name].grad, rtol=1e-4, atol=1e-6)
