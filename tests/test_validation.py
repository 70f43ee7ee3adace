"""Image and training-pair validation with the Great Expectations suites in validation/."""

import io
import json
import re
import shutil

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from ccflow.cli import app
from ccflow.data import list_samples
from ccflow.errors import DatasetError
from ccflow.validation import (
    IMAGE_COLUMNS,
    ImageValidator,
    check_training_samples,
    image_metadata,
    mask_metadata,
    pair_metadata,
)

GOOD = "Mar19bS1C4R2_LHr_200x"


def png(image: np.ndarray) -> bytes:
    """Encode an RGB (H, W, 3) or grey (H, W) uint8/uint16 array as PNG bytes."""
    if image.ndim == 3:
        image = image[:, :, ::-1]
    ok, buffer = cv2.imencode(".png", image)
    assert ok
    return buffer.tobytes()


def failed_columns(failures: list[str]) -> set[str]:
    """Return the metadata columns named in failure texts such as '... (focus=1e-07)'."""
    return {name for text in failures for name in re.findall(r"(\w+)=", text)}


@pytest.fixture(scope="module")
def good_image(fnc_sample_dir) -> np.ndarray:
    return cv2.imread(str(fnc_sample_dir / "images" / f"{GOOD}.png"))[:, :, ::-1].copy()


@pytest.fixture(scope="module")
def good_mask(fnc_sample_dir) -> np.ndarray:
    return cv2.imread(str(fnc_sample_dir / "masks" / f"{GOOD}.png"), cv2.IMREAD_GRAYSCALE)


def one_bit_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.mean(axis=2) > 20).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


def broken_images(image: np.ndarray) -> dict[str, tuple[bytes, set[str]]]:
    """Return, per case, the file bytes and the columns whose expectation it must break."""
    data = png(image)
    as_float = image.astype(np.float32)
    sixteen = np.clip(as_float * 257 * 20, 0, 65535).astype(np.uint16)
    ok, jpeg = cv2.imencode(".jpg", image[:, :, ::-1])
    assert ok
    return {
        "truncated file": (data[: len(data) // 2], {"readable"}),
        "jpeg file": (jpeg.tobytes(), {"readable", "format"}),
        "too small": (png(image[:150, :200]), {"width", "height"}),
        "grey image": (png(image.mean(axis=2).astype(np.uint8)), {"channels"}),
        "one-bit image": (one_bit_png(image), {"bit_depth"}),
        "uniform glare": (png(np.clip(as_float + 160, 0, 255).astype(np.uint8)), {"min_intensity"}),
        "dark frame": (png((as_float * 0.03).astype(np.uint8)), {"max_intensity"}),
        "16-bit saturated": (png(sixteen), {"saturated_fraction"}),
        "blank frame": (png(np.full_like(image, 40)), {"dynamic_range"}),
        "blurred frame": (png(cv2.GaussianBlur(image, (0, 0), 4)), {"focus"}),
    }


@pytest.fixture(scope="module")
def counting_validator() -> ImageValidator:
    return ImageValidator("counting")


def test_good_fnc_pairs_pass_every_expectation(fnc_sample_dir):
    samples = list_samples(fnc_sample_dir, require_masks=True)
    rows = pd.DataFrame([pair_metadata(sample) for sample in samples])

    failures = ImageValidator("training").failures(rows)

    assert failures == [[] for _ in samples]
    assert rows["readable"].all()
    assert rows["cells"].tolist() == [13, 4, 6, 35]


def test_each_image_expectation_breaks(good_image, counting_validator):
    cases = broken_images(good_image)
    rows = pd.DataFrame([image_metadata(f"{name}.png", data)[0] for name, (data, _) in cases.items()])

    failures = counting_validator.failures(rows)

    assert len(failures) == len(cases)
    for (name, (_, expected)), found in zip(cases.items(), failures, strict=True):
        assert expected <= failed_columns(found), f"{name}: {found}"
    # Every expectation of the suite is broken by at least one case.
    suite_columns = {e["kwargs"]["column"] for e in counting_validator.suite_dict["expectations"]}
    assert suite_columns <= set().union(*(expected for _, expected in cases.values()))


def test_targeted_breaks_fail_only_their_expectation(good_image, counting_validator):
    cases = broken_images(good_image)
    only = ["too small", "grey image", "16-bit saturated", "blurred frame", "uniform glare"]
    rows = pd.DataFrame([image_metadata(name, cases[name][0])[0] for name in only])

    failures = counting_validator.failures(rows)

    for name, found in zip(only, failures, strict=True):
        assert failed_columns(found) == cases[name][1], f"{name}: {found}"


def test_metadata_of_unreadable_file():
    row, image = image_metadata("broken.png", b"\x89PNG\r\n\x1a\nnot really")

    assert image is None
    assert row["readable"] is False
    assert row["format"] == "png"
    assert "broken.png" in row["error"]
    assert set(row) == set(IMAGE_COLUMNS)


def test_metadata_of_sixteen_bit_image(good_image):
    sixteen = good_image.astype(np.uint16) * 257
    row, image = image_metadata("deep.png", png(sixteen))

    assert image.dtype == np.uint16
    assert row["bit_depth"] == 16
    assert row["channels"] == 3
    assert row["max_intensity"] == pytest.approx(good_image.max() / 255)


def broken_masks(mask: np.ndarray) -> dict[str, tuple[bytes, set[str]]]:
    stray = mask.copy()
    stray[:20, :20] = 128
    coloured = np.stack([mask, np.zeros_like(mask), np.zeros_like(mask)], axis=2)
    salt = np.zeros_like(mask)
    salt[::8, ::8] = 255
    data = png(mask)
    return {
        "stray grey value": (png(stray), {"mask_levels"}),
        "mask of another size": (png(cv2.resize(mask, (800, 600), interpolation=cv2.INTER_NEAREST)), {"mask_width", "width", "mask_height", "height"}),
        "coloured mask": (png(coloured), {"mask_channels_equal"}),
        "truncated mask": (data[: len(data) // 2], {"mask_readable"}),
        "speckled mask": (png(salt), {"cells"}),
        "inverted mask": (png(255 - mask), {"mask_foreground_fraction"}),
    }


def test_each_mask_expectation_breaks(good_image, good_mask):
    image_row, _ = image_metadata(f"{GOOD}.png", png(good_image))
    cases = broken_masks(good_mask)
    rows = pd.DataFrame([{**image_row, **mask_metadata(f"{name}.png", data)} for name, (data, _) in cases.items()])
    validator = ImageValidator("training")

    failures = validator.failures(rows)

    for (name, (_, expected)), found in zip(cases.items(), failures, strict=True):
        assert failed_columns(found) == expected, f"{name}: {found}"
    # Every expectation of the training-pair suite is broken by at least one case.
    counting = ImageValidator("counting").suite_dict["expectations"]
    pair_expectations = [e for e in validator.suite_dict["expectations"] if e not in counting]
    pair_columns = {e["kwargs"].get("column") or e["kwargs"]["column_A"] for e in pair_expectations}
    assert pair_columns <= set().union(*(expected for _, expected in cases.values()))


def write_pair(folder, name, image_bytes: bytes, mask_bytes: bytes) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    (folder / "images" / f"{name}.png").write_bytes(image_bytes)
    (folder / "masks" / f"{name}.png").write_bytes(mask_bytes)


def test_training_check_lists_every_bad_pair(tmp_path, fnc_sample_dir, good_image, good_mask):
    shutil.copytree(fnc_sample_dir, tmp_path / "data")
    write_pair(tmp_path / "data", "blurred", png(cv2.GaussianBlur(good_image, (0, 0), 4)), png(good_mask))
    stray = good_mask.copy()
    stray[:20, :20] = 128
    write_pair(tmp_path / "data", "stray", png(good_image), png(stray))
    samples = list_samples(tmp_path / "data", require_masks=True)

    with pytest.raises(DatasetError) as raised:
        check_training_samples(samples)

    message = str(raised.value)
    assert "2 of 6 training pairs failed validation" in message
    assert "blurred.png" in message
    assert "focus=" in message
    assert "stray.png" in message
    assert "mask_levels=3" in message
    assert GOOD not in message


def test_validate_command_writes_report_and_data_docs(tmp_path, fnc_sample_dir, good_image, mlflow_backend):
    folder = tmp_path / "incoming"
    folder.mkdir()
    shutil.copy(fnc_sample_dir / "images" / f"{GOOD}.png", folder / "good.png")
    (folder / "blank.png").write_bytes(png(np.full_like(good_image, 40)))
    output = tmp_path / "report"

    result = CliRunner().invoke(app, ["validate", str(folder), "--output", str(output)])

    assert result.exit_code == 1, result.output
    report = pd.read_csv(output / "validation.csv").set_index("file")
    assert report.loc[str(folder / "good.png"), "status"] == "valid"
    assert report.loc[str(folder / "blank.png"), "status"] == "invalid"
    assert "dynamic_range=" in report.loc[str(folder / "blank.png"), "failures"]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["images"] == 2
    assert summary["invalid"] == 1
    assert summary["suite"] == "counting"
    assert (output / "data_docs" / "index.html").is_file()

    run = mlflow.get_run(summary["mlflow_run_id"])
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.name == "ccflow-validation"
    assert run.data.metrics["images_invalid"] == 1
    docs = mlflow.artifacts.list_artifacts(run_id=run.info.run_id, artifact_path="validation/data_docs")
    assert "validation/data_docs/index.html" in {entry.path for entry in docs}


def test_validator_survives_pickling(good_image, counting_validator):
    import pickle

    rows = pd.DataFrame([image_metadata("good.png", png(good_image))[0]])
    counting_validator.failures(rows)

    copy = pickle.loads(pickle.dumps(counting_validator))

    assert copy.failures(rows) == [[]]
