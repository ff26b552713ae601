"""vox2vec inside MONAI (issue 21 item 1), on real crops of the shared CTs.

The oracle is vox2vec's own path: ``Preprocessor`` on the file, ``embed_volume`` and ``Head.logits`` — the MONAI path
(``LoadImaged`` → ``Vox2VecPreprocessd`` → ``sliding_window_inference(Vox2VecNet)``) must give the same numbers.
"""

from __future__ import annotations

import importlib
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("monai", reason='the MONAI integration needs the extra: pip install -e ".[monai]"')

from monai.data import DataLoader, Dataset  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MapLabelValued  # noqa: E402

import vox2vec  # noqa: E402
from conftest import crop, ct_path, label_path, read_image, tiny_model  # noqa: E402
from vox2vec.errors import InputError, MissingExtraError  # noqa: E402
from vox2vec.integrations.monai import Vox2VecFeaturesd, Vox2VecNet, Vox2VecPreprocessd  # noqa: E402
from vox2vec.modeling import FPNLinearHead  # noqa: E402
from vox2vec.probing import ClassMap  # noqa: E402

FP32 = vox2vec.Runtime(device="cpu", precision="fp32", progress=False)


@pytest.fixture
def abdomen_files(tmp_path):
    """A 110×100×20 crop of ts_abdomen_dicom20 and its labels as NIfTI files (what a MONAI user loads)."""
    import SimpleITK as sitk

    box = ((150, 150, 0), (110, 100, 20))
    paths = {"image": tmp_path / "ct.nii.gz", "label": tmp_path / "labels.nii.gz"}
    sitk.WriteImage(crop(read_image(ct_path("ts_abdomen_dicom20")), *box), str(paths["image"]))
    sitk.WriteImage(crop(read_image(label_path("ts_abdomen_dicom20")), *box), str(paths["label"]))
    return paths


def _load(files, model, **kwargs):
    transform = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
                         Vox2VecPreprocessd("image", model, label_keys=["label"]), *kwargs.get("more", [])])
    return transform({k: str(v) for k, v in files.items()})


def test_preprocessd_is_the_models_contract(abdomen_files):
    model = vox2vec.load_pretrained("fpn-ct-mini")
    prepared = model.preprocessor(abdomen_files["image"])
    loaded = _load(abdomen_files, model)
    from_path = Vox2VecPreprocessd("image", model)({"image": str(abdomen_files["image"])})
    for image in (loaded["image"], from_path["image"]):
        assert image.shape == (1, *prepared.grid.shape)
        torch.testing.assert_close(image[0].as_tensor(), prepared.image, rtol=0, atol=1e-6)
        world = np.diag([-1.0, -1.0, 1.0, 1.0]) @ prepared.grid.index_to_world_matrix  # RAS, as MONAI writes
        np.testing.assert_allclose(image.affine.numpy(), world, atol=1e-4)
    expected = prepared.from_original(vox2vec.load_volume(abdomen_files["label"]).array)
    assert torch.equal(loaded["label"][0].as_tensor().to(expected.dtype), expected)
    assert set(torch.unique(expected).tolist()) >= {0, 5, 6}  # liver and stomach are in the crop


def test_label_on_another_grid_is_refused(abdomen_files, tmp_path):
    import SimpleITK as sitk

    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(crop(read_image(label_path("ts_abdomen_dicom20")), (140, 150, 0), (110, 100, 20)), str(other))
    with pytest.raises(InputError, match="label map 'label'"):
        Vox2VecPreprocessd("image", tiny_model(), label_keys=["label"])(
            {"image": str(abdomen_files["image"]), "label": str(other)})


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_monai_features_and_logits_equal_vox2vecs_own(abdomen_files):
    """One window: sliding_window_inference(Vox2VecNet) == embed_volume levels and Head.logits (fp32)."""
    model = vox2vec.load_pretrained("fpn-ct-mini")
    image = _load(abdomen_files, model)["image"]
    shape = tuple(image.shape[1:])
    assert all(n <= w for n, w in zip(shape, model.config.inference.window))  # fits one of the model's windows
    window = tuple(16 * math.ceil(n / 16) for n in shape)  # embed_volume pads its one window like the net pads
    pyramid = vox2vec.embed_volume(abdomen_files["image"], model, runtime=FP32, dtype=torch.float32, window=window)

    with torch.no_grad():
        levels = Vox2VecNet.from_pretrained(model).eval()(image[None].as_tensor())
    assert len(levels) == pyramid.num_levels
    for ours, theirs in zip(levels, pyramid.levels):
        torch.testing.assert_close(ours[0], theirs, rtol=1e-4, atol=1e-4)
    added = Vox2VecFeaturesd("image", model, runtime=FP32)({"image": image})["image_features"]
    assert [tuple(level.shape) for level in added] == [tuple(level.shape) for level in pyramid.levels]

    with torch.no_grad():  # the full-resolution outputs go through MONAI's inferer at any size
        dense = sliding_window_inference(image[None].as_tensor(), shape, 1,
                                         Vox2VecNet.from_pretrained(model, output="features").eval())[0]
    voxels = np.argwhere(np.ones(shape, dtype=bool))[::7]
    torch.testing.assert_close(dense[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]].T,
                               pyramid.at_grid_indices(voxels), rtol=1e-4, atol=1e-4)
    torch.manual_seed(3)
    head = vox2vec.Head(FPNLinearHead(8, 5, 3), "linear", ClassMap(("liver", "stomach"), ((5,), (6,))),
                        model.record(), model=model)
    expected, _ = head.logits(pyramid)
    with torch.no_grad():
        logits = sliding_window_inference(image[None].as_tensor(), shape, 1,
                                          Vox2VecNet.from_pretrained(model, head=head).eval())
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)


def _batches(files, model):
    more = [MapLabelValued("label", [5, 6], [1, 2])]  # liver, stomach → 1, 2; every other id → background
    item = _load(files, model, more=more)
    item["label"] = torch.where(item["label"] > 2, 0, item["label"]).float()
    return DataLoader(Dataset([item]), batch_size=1)


@pytest.mark.parametrize("freeze", ["none", "encoder", "backbone"])
@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_monai_training_changes_weights_and_lowers_the_loss(abdomen_files, freeze):
    base = tiny_model(base_channels=4, num_scales=4, seed=2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    net = Vox2VecNet.from_pretrained(base, num_classes=3, seed=0, freeze=freeze)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    net.train()
    loader = _batches(abdomen_files, base)
    for _ in range(6):
        for batch in loader:
            loss = loss_function(net(batch["image"]), batch["label"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss))
    assert losses[-1] < losses[0]
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, start[k])}
    encoder = ("model.backbone.first_conv", "model.backbone.left_blocks", "model.backbone.down_blocks",
               "model.backbone.bottom_block")
    assert any(k.startswith("head.") for k in changed)
    assert any(k.startswith("model.backbone.right_blocks") for k in changed) == (freeze != "backbone")
    assert any(k.startswith(encoder) for k in changed) == (freeze == "none")  # BN statistics included
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # the caller's model is untouched

    head = net.to_head({5: "liver", 6: "stomach"})
    assert head.model.name == (base.name if freeze == "backbone" else f"{base.name}-monai")
    assert head.backbone["fingerprint"] == head.model.fingerprint()


def test_wrong_input_and_choices_are_clear():
    net = Vox2VecNet.from_pretrained(tiny_model())
    with pytest.raises(InputError, match=r"expects \(B, 1, X, Y, Z\)"):
        net(torch.zeros(1, 8, 8, 8))
    with pytest.raises(InputError, match="freeze must be one of"):
        Vox2VecNet.from_pretrained(tiny_model(), freeze="decoder")
    with pytest.raises(InputError, match="needs a head"):
        Vox2VecNet.from_pretrained(tiny_model(), output="logits")
    other = tiny_model(seed=1)
    head = vox2vec.Head(FPNLinearHead(2, 4, 2), "linear", ClassMap(("liver",), ((5,),)), other.record(), model=other)
    with pytest.raises(InputError, match="head was trained on backbone 'tiny-2-4-1'"):
        Vox2VecNet.from_pretrained(tiny_model(seed=0), head=head)


def test_missing_monai_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai.transforms", None)
    monkeypatch.delitem(sys.modules, "vox2vec.integrations.monai")
    with pytest.raises(MissingExtraError, match=r'pip install "vox2vec\[monai\]"'):
        importlib.import_module("vox2vec.integrations.monai")


@pytest.mark.parametrize("keys", [[], "", [3]])
def test_features_transform_without_a_key_is_one_clear_error(keys):
    with pytest.raises(InputError, match="keys must name at least one image key"):  # before: MONAI's raw ValueError
        Vox2VecFeaturesd(keys, tiny_model())
