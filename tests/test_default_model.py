"""The model shipped inside the package: offline captioning the minute showtell is installed."""

import json
import subprocess
import sys

from conftest import REPO

import showtell
from showtell.captioner import WEIGHTS_DIR
from showtell.checkpoint import read_metadata

SHIPPED = WEIGHTS_DIR / "flickr8k.safetensors"
EXAMPLES = REPO / "examples" / "images"


def test_shipped_checkpoint_is_small_and_records_how_it_was_made():
    assert SHIPPED.stat().st_size < 20e6
    meta = read_metadata(SHIPPED)
    assert meta["encoder"] == "efficientnet_lite0+2" and meta["name"] == "flickr8k"
    assert meta["training"]["command"] == "python scripts/build_default_model.py"
    for split in ("dev", "test"):
        for beam in (1, 3, 5):
            scores = meta["metrics"][f"{split}_beam{beam}"]
            assert 0.1 < scores["BLEU-4"] < 1 and 0.2 < scores["CIDEr"] < 3 and scores["images"] == 1000


PERSON_WORDS = {"man", "men", "woman", "women", "person", "people", "boy", "boys", "girl", "girls", "child",
                "children", "player", "crowd"}


def test_load_without_arguments_captions_the_example_photos():
    photos = sorted(EXAMPLES.glob("*.jpg"))
    results = showtell.load().caption(photos, beam_size=3)
    assert len(results) == 8 and all(r.ok and r.caption for r in results)
    assert len({r.caption for r in results}) >= 7  # distinct photos, distinct captions
    by_name = {p.stem: r for p, r in zip(photos, results)}
    # The photos of people are captioned as people by the model itself (camera.jpg's own caption is overruled by
    # its sure "tripod" tag, and kept as model_caption).
    for person_photo in ("astronaut", "camera"):
        r = by_name[person_photo]
        assert set((r.model_caption or r.caption).split()) & PERSON_WORDS, r
    # Every caption has tags and a confidence; the cat, outside Flickr8k's world, is called a cat because its tags
    # are sure of it, while the model's own caption (a man on a couch) stays available.
    assert all(r.tags and 0 <= r.confidence <= 1 for r in results)
    cat = by_name["chelsea"]
    assert "cat" in cat.caption.split() and cat.model_caption and "cat" not in cat.model_caption.split()
    assert cat.tags[0][0] in ("Egyptian cat", "tabby", "tiger cat")
    # Photos it has no words for get a low confidence: the galaxies, the coins and the rocket under 0.25
    assert all(by_name[name].confidence < 0.25 for name in ("hubble_deep_field", "coins", "rocket"))


def test_shipped_confidence_was_fitted_on_dev_data_and_says_how():
    meta = read_metadata(SHIPPED)
    fitted = meta["confidence"]["fitted"]
    assert fitted["right"] == "per-image CIDEr-D >= 0.25"
    assert fitted["photos"] == {"flickr8k_dev": 1000, "ood": 109}
    assert fitted["flickr8k_dev"]["cider_before"] - fitted["flickr8k_dev"]["cider_after"] <= 0.01
    assert fitted["ood"]["cider_after"] > fitted["ood"]["cider_before"]
    assert 0 <= meta["grounding"]["low_confidence"] <= 1 and 0.2 <= meta["grounding"]["sure_tag"] <= 1


def test_readme_main_command_captions_offline():
    out = subprocess.run([sys.executable, "-m", "showtell", "caption", str(EXAMPLES), "--format", "jsonl"],
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 8 and all(r["caption"] and r["score"] < 0 for r in rows)
    assert all(0 <= r["confidence"] <= 1 and r["tags"] and {"label", "p"} == set(r["tags"][0]) for r in rows)
