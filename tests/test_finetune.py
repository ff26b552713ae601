"""finetune: the paper's schedule, a few CPU steps on real crops, checkpoints, exact resume, loadable outputs."""

import pytest
import torch

import vox2vec
from conftest import chest_training_pair, coarse_model
from vox2vec.probing.finetune import FinetuneConfig, finetune

FAST = dict(patch_size=(32, 32, 16), batch_size=2, total_steps=6, frozen_steps=2, warmup_steps=2,
            checkpoint_every=2)


def test_schedule_matches_the_paper():
    config = FinetuneConfig()
    assert (config.batch_size, config.patch_size, config.total_steps) == (7, (128, 128, 32), 45_000)
    assert config.backbone_lr_at(0) == config.backbone_lr_at(14_999) == 0.0
    assert config.backbone_lr_at(15_000) == pytest.approx(3e-5)
    assert config.backbone_lr_at(15_600) == pytest.approx((3e-5 * 3e-4) ** 0.5)
    assert config.backbone_lr_at(16_200) == config.backbone_lr_at(40_000) == pytest.approx(3e-4)


def _pairs():
    ct, labels = chest_training_pair()
    return [(ct[200:300, 200:300, 20:40], labels[200:300, 200:300, 20:40])]


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_runs_resumes_exactly_and_loads_back(tmp_path):
    model = coarse_model()
    classes = {5: "liver", 52: "aorta"}
    straight, head = finetune(_pairs(), tmp_path / "straight", model=model, classes=classes, progress=False, **FAST)
    # stop after 4 steps, then continue to 6 from the checkpoint
    finetune(_pairs(), tmp_path / "resumed", model=model, classes=classes, progress=False, **{**FAST, "total_steps": 4})
    resumed, resumed_head = finetune(_pairs(), tmp_path / "resumed", model=model, classes=classes, progress=False,
                                     **FAST)
    for key, value in straight.backbone.state_dict().items():
        assert torch.equal(resumed.backbone.state_dict()[key], value), key
    for key, value in head.module.state_dict().items():
        assert torch.equal(resumed_head.module.state_dict()[key], value), key
    # the backbone changed only after the frozen phase, and the outputs load back
    assert not torch.equal(straight.backbone.first_conv.weight, model.backbone.first_conv.weight)
    loaded = vox2vec.load_pretrained(tmp_path / "straight" / "backbone")
    loaded_head = vox2vec.load_head(tmp_path / "straight" / "head")
    assert loaded.fingerprint() == straight.fingerprint() == loaded_head.backbone["fingerprint"]
    assert loaded_head.classes.names == ("liver", "aorta")
    checkpoints = sorted(p.name for p in (tmp_path / "straight" / "checkpoints").iterdir())
    assert checkpoints == [".vox2vec-outputs.json", "step_00000004.pt", "step_00000006.pt"]


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_truncated_checkpoint_falls_back_to_the_previous(tmp_path):
    model = coarse_model()
    options = dict(model=model, classes={5: "liver"}, progress=False, **{**FAST, "total_steps": 4})
    straight, straight_head = finetune(_pairs(), tmp_path / "straight", **options)
    run = tmp_path / "run"
    finetune(_pairs(), run, **options)
    newest = run / "checkpoints" / "step_00000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable|damaged"):
        resumed, resumed_head = finetune(_pairs(), run, **options)
    # redone from the step-2 checkpoint, it ends exactly where an uninterrupted run does
    for key, value in straight.backbone.state_dict().items():
        assert torch.equal(resumed.backbone.state_dict()[key], value), key
    for key, value in straight_head.module.state_dict().items():
        assert torch.equal(resumed_head.module.state_dict()[key], value), key
    assert not torch.equal(resumed.backbone.first_conv.weight, model.backbone.first_conv.weight)  # it did train
    again = torch.load(newest, map_location="cpu", weights_only=True)
    assert again["step"] == 4 and torch.equal(again["backbone"]["first_conv.weight"],
                                              straight.backbone.state_dict()["first_conv.weight"])
