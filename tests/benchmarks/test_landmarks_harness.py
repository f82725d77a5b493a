"""benchmarks/landmarks.py: the landmark files, the working-size scaling, the TRE metric
and the harness's handling of a variant (a stand-in, no registration is run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ld = _load("_landmark_data")


@pytest.fixture(scope="module")
def landmarks():
    module = _load("landmarks")
    yield module
    sys.modules.pop("landmarks", None)


def _write_csv(path: Path, rows) -> None:
    path.write_text(",X,Y\n" + "".join(f"{i},{x},{y}\n" for i, x, y in rows))


def test_landmarks_are_read_as_row_col_and_matched_by_index(tmp_path):
    _write_csv(tmp_path / "f.csv", [(1, 10, 20), (2, 30.5, 40), (3, 7, 8)])
    _write_csv(tmp_path / "m.csv", [(2, 31, 41), (1, 11, 22)])  # 3 exists on fixed only
    assert ld.read_landmarks(tmp_path / "f.csv")[2] == (40.0, 30.5)  # (Y, X) = (row, col)
    idx, fp, mp = ld.matched_landmarks(tmp_path / "f.csv", tmp_path / "m.csv")
    assert idx.tolist() == [1, 2]
    np.testing.assert_array_equal(fp, [[20, 10], [40, 30.5]])
    np.testing.assert_array_equal(mp, [[22, 11], [41, 31]])


def test_rescale_keeps_points_on_the_same_structure():
    # a bright pixel at (row 30, col 50) of a 100 x 160 image stays under the scaled point
    img = np.zeros((100, 160, 3), np.float32)
    img[29:32, 49:52] = 1.0
    scale = 64 / 160
    small = ld.rescale_image(img, scale)
    assert small.shape == (40, 64, 3)
    r, c = ld.rescale_points(np.array([[30.0, 50.0]]), scale)[0]
    peak = np.unravel_index(np.argmax(small[..., 0]), small.shape[:2])
    assert abs(peak[0] - r) <= 0.5 and abs(peak[1] - c) <= 0.5


def test_tre_of_a_field_uses_bilinear_samples_of_u_at_the_fixed_point():
    u = np.zeros((2, 20, 30), np.float32)
    u[0] = 3.0  # rows + 3
    u[1] = np.arange(30, dtype=np.float32)[None, :] * 0.5  # cols + c / 2
    mapping = ld.field_mapping(u)
    fixed = np.array([[5.0, 10.0], [2.0, 3.5]])
    np.testing.assert_allclose(mapping(fixed), [[8.0, 15.0], [5.0, 5.25]])
    moving = np.array([[8.0, 18.0], [5.0, 5.25]])
    np.testing.assert_allclose(ld.tre(mapping, fixed, moving), [3.0, 0.0])


def _pair(shift=(4.0, -3.0)) -> ld.LandmarkPair:
    fp = np.array([[10.0, 10.0], [20.0, 30.0], [30.0, 15.0], [35.0, 40.0]])
    return ld.LandmarkPair(
        name="toy",
        real=True,
        fixed=np.zeros((40, 50, 3), np.float32),
        moving=np.zeros((44, 48, 3), np.float32),
        fixed_points=fp,
        moving_points=fp + np.asarray(shift),
        indices=np.arange(1, 5),
        scale=1.0,
    )


def test_pair_metrics_median_relative_tre_and_robustness():
    pair = _pair()
    before = ld.pair_metrics(pair, ld.identity_mapping)
    assert before["median_tre"] == pytest.approx(5.0)
    assert before["median_rtre"] == pytest.approx(5.0 / np.hypot(40, 50))
    assert before["robustness"] == 0.0  # nothing is closer than itself
    u = np.zeros((2, 40, 50), np.float32)
    u[0], u[1] = 4.0, -3.0
    after = ld.pair_metrics(pair, ld.field_mapping(u))
    assert after["median_tre"] == pytest.approx(0.0, abs=1e-6)
    assert after["robustness"] == 1.0


def test_harness_rows_for_a_stand_in_variant_an_error_and_a_bad_shape(landmarks):
    pair = _pair()

    def exact(fixed, moving):  # a stand-in for register(): the true shift
        assert fixed.shape == (40, 50, 3) and moving.shape == (44, 48, 3)  # RGB, own sizes
        u = np.zeros((2, *fixed.shape[:2]), np.float32)
        u[0], u[1] = 4.0, -3.0
        return u

    def refuses(fixed, moving):
        raise ValueError("fixed and moving must have the same shape")

    methods = {
        "exact": (landmarks.field_method(exact), True),
        "refuses": (landmarks.field_method(refuses), True),
        "wrong grid": (landmarks.field_method(lambda f, m: np.zeros((2, 3, 3))), True),
    }
    real = landmarks.run_real([pair], methods)
    rows = real["toy"]["rows"]
    assert rows["no registration"]["median_tre"] == pytest.approx(5.0)
    assert rows["exact"]["median_tre"] == pytest.approx(0.0, abs=1e-6)
    assert rows["exact"]["seconds"] >= 0
    assert rows["refuses"]["error"].startswith("error: fixed and moving must have")
    assert "expected (2, 40, 50)" in rows["wrong grid"]["error"]
    summary = landmarks.summarise(real, list(methods))
    assert summary["exact"]["robustness"] == 1.0 and "error" in summary["refuses"]
    text = landmarks.markdown(
        {
            "meta": {
                "command": "python benchmarks/landmarks.py",
                "wall_seconds": 1.0,
                "size": 50,
                "machine": {
                    "cpu": "cpu",
                    "cpus": 1,
                    "threads": 1,
                    "load_average_start": [0.0],
                    "versions": {},
                },
                "self_check": {},
            },
            "methods": {"no registration": {"kind": "baseline"}}
            | {k: {"kind": "variant"} for k in methods},
            "real": real,
            "summary": summary,
            "synthetic": None,
        }
    )
    assert "error: fixed and moving must have" in text and "| register() `exact` | 0.00" in text


def test_variants_from_names_and_json(landmarks):
    built = landmarks.build_variants(
        ["default", "network"], ['mine={"method": "network", "refine": {"levels": 2}}']
    )
    assert list(built) == ["default", "network", "mine"]
    assert built["network"][0] == {"method": "network"}
    assert landmarks.variant_kwargs(built["mine"][0])["refine"].levels == 2
    with pytest.raises(ValueError, match="unknown variant"):
        landmarks.build_variants(["nope"])
    with pytest.raises(ValueError, match="name=JSON"):
        landmarks.build_variants([], ["just-a-name"])


def test_missing_data_exits_2(landmarks, tmp_path, capsys):
    assert landmarks.main(["--data", str(tmp_path / "nowhere"), "--no-write"]) == 2
    assert "histology data is missing" in capsys.readouterr().err


def test_the_shipped_data_when_present():
    data_dir = ld.default_data_dir()
    if ld.missing_files(data_dir):
        pytest.skip(f"no histology data at {data_dir}")
    pair = ld.load_pair(data_dir, ld.PAIRS[0], 448)  # rat kidney: 70 and 71 on HE only
    assert max(pair.fixed.shape[:2]) == 448 and pair.fixed.shape[2] == 3
    assert len(pair.indices) == 69 and 70 not in pair.indices
    assert 0.0 <= pair.fixed.min() and pair.fixed.max() <= 1.0
