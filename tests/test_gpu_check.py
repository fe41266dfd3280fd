"""scripts/gpu_check.py in its CPU smoke mode: every stage runs, the last line is the JSON of figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_smoke_on_cpu(flickr8k, tmp_path):
    folder = tmp_path / "folder"
    subprocess.run([sys.executable, SCRIPT, "--prepare", folder, "--root", flickr8k, "--train", "8", "--dev", "4",
                    "--test", "4"], check=True, capture_output=True)
    assert len(list((folder / "flickr8k" / "Flicker8k_Dataset").iterdir())) == 16
    assert (folder / "site" / "pycocoevalcap" / "cider" / "cider.py").is_file()  # the scorers, without the jars
    r = subprocess.run([sys.executable, SCRIPT, "--data", folder, "--device", "cpu", "--tiny", "--workers", "1",
                        "--work", tmp_path / "work"], capture_output=True, text=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and out["failed"] == [], out
    stages = out["stages"]
    assert set(stages) == {"features", "train_cached", "train_end_to_end", "torchrun", "caption", "evaluate"}
    assert stages["features"]["images"] == 8 * 2 + 4 + 4  # mirror images of the training photos
    for name in ("train_cached", "train_end_to_end", "torchrun"):
        assert len(stages[name]["epoch_seconds"]) == 1 and stages[name]["epoch_seconds"][0] > 0
    assert stages["torchrun"]["backend"] == "gloo"
    assert stages["caption"]["photos"] == 4 and stages["caption"]["failed"] == 0
    assert "CIDEr" in stages["evaluate"]
