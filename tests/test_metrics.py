"""Caption metrics: the same numbers as pycocoevalcap's own COCOEvalCap pipeline, offline, with or without Java."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from showtell.errors import ShowtellError
from showtell.metrics import METRIC_NAMES, java_available, score_captions
from showtell.vocab import tokenize

REPO = Path(__file__).resolve().parents[1]
needs_java = pytest.mark.usefixtures("java")  # fails in CI without Java, skipped (saying why) elsewhere

# ~5 images, 2-5 references each; candidates: a perfect match (up to case and punctuation), two partial
# ones, an unrelated one and an empty one (not last: COCOEvalCap's tokenizer drops an empty last caption).
REFERENCES = {
    1: ["A dog runs across the green grass.", "A brown dog is running on grass.", "The dog runs outside."],
    2: [
        "Two children play in the sand at the beach.",
        "Kids building a sandcastle.",
        "Two kids are playing on a sandy beach, near the water.",
        "Children play at the beach.",
        "A boy and a girl dig in the sand.",
    ],
    3: ["A man in a red jacket climbs a rock wall.", "A climber scales a steep cliff."],
    4: [
        "A woman rides a bicycle down a city street.",
        "A cyclist in a helmet rides through traffic.",
        "A person on a bike on a busy road.",
        "A woman cycling in the city.",
    ],
    5: ["A black and white cat sleeps on a sofa.", "A cat is asleep on the couch.", "A kitten naps on a sofa cushion."],
}
CANDIDATES = {
    1: "a dog runs across the green grass",
    2: "Two children playing on the beach.",
    3: "",
    4: "a man rides a bike on the street",
    5: "a dog sits in the snow",
}
# Stored reference outputs: score_captions on the case above, checked equal to COCOEvalCap (pycocoevalcap 1.2,
# Java 17) when they were stored. A change here means pycocoevalcap (or its jars) now score differently.
PINNED = {
    "BLEU-1": 0.652452698624625,
    "BLEU-2": 0.5220910861962426,
    "BLEU-3": 0.41000904773586305,
    "BLEU-4": 0.3483050668001436,
    "METEOR": 0.250925257953455,
    "ROUGE-L": 0.47895449353350683,
    "CIDEr": 1.2350258905969123,
}
COCO_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
              "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}

# Runs in a fresh interpreter, so that what a CLI user sees is checked too: stdout holds only our JSON,
# nothing is printed at interpreter exit, and no java process is left behind.
_SCRIPT = """
import json, os, sys
from pathlib import Path
from showtell.metrics import score_captions
case = json.loads(sys.stdin.read())
s = score_captions(case["references"], case["candidates"])
def children():
    kids = []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == os.getpid():
            kids.append(state + " " + (p / "cmdline").read_bytes().replace(b"\\0", b" ").decode()[:80])
    return kids
print(json.dumps({"values": s.values, "skipped": s.skipped, "tokenizer": s.tokenizer,
                  "children": children() if Path("/proc/self/stat").exists() else []}))
"""


@pytest.fixture(scope="module")
def ours() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    case = {"references": REFERENCES, "candidates": CANDIDATES}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], input=json.dumps(case), capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout should hold only the result, got: {proc.stdout!r}"
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def coco_eval_cap() -> dict[str, float]:
    """pycocoevalcap's full pipeline on in-memory COCO objects, with SPICE (a CoreNLP download) stubbed out."""
    import pycocoevalcap.eval
    from pycocotools.coco import COCO

    class NoSpice:
        def method(self) -> str:
            return "SPICE"

        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            return 0.0, [0.0] * len(gts)

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i} for i in REFERENCES],
        "annotations": [{"id": 10 * i + n, "image_id": i, "caption": c}
                        for i, refs in REFERENCES.items() for n, c in enumerate(refs)],
    }
    coco.createIndex()
    results = coco.loadRes([{"image_id": i, "caption": c} for i, c in CANDIDATES.items()])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pycocoevalcap.eval, "Spice", NoSpice)
        evaluator = pycocoevalcap.eval.COCOEvalCap(coco, results)
        evaluator.evaluate()
    return {COCO_NAMES[k]: v for k, v in evaluator.eval.items() if k != "SPICE"}


@needs_java
def test_same_numbers_as_coco_eval_cap(ours: dict, coco_eval_cap: dict[str, float]) -> None:
    assert ours["tokenizer"] == "ptb"
    assert list(ours["values"]) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert ours["values"][name] == pytest.approx(coco_eval_cap[name], abs=1e-9, rel=0), name


@needs_java
def test_pinned_reference_values(ours: dict) -> None:
    for name, value in PINNED.items():
        assert ours["values"][name] == pytest.approx(value, abs=1e-9, rel=0), name


@needs_java
def test_clean_stdout_no_leftover_java(ours: dict) -> None:
    assert ours["children"] == []  # METEOR's java is gone (and reaped: no zombie) when score_captions returns
    assert ours["skipped"] == {"SPICE": "needs a Stanford CoreNLP download; not available offline"}


def test_perfect_candidates() -> None:
    perfect = {i: refs[1] for i, refs in REFERENCES.items()}
    s = score_captions(REFERENCES, perfect, metrics=("BLEU-1", "BLEU-4", "CIDEr"))
    assert list(s.values) == ["BLEU-1", "BLEU-4", "CIDEr"]
    # pycocoevalcap's BLEU adds 1e-15 / 1e-9 guards to its ratios, so "1.0" is 1.0 to within 1e-9
    assert s.values["BLEU-1"] == pytest.approx(1.0, abs=1e-9)
    assert s.values["BLEU-4"] > 0.99
    assert s.values["CIDEr"] > 1.0
    assert "SPICE" in s.skipped


def test_without_java(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java on PATH: pycocoevalcap's java steps would crash
    assert not java_available()
    s = score_captions(REFERENCES, CANDIDATES)
    assert s.tokenizer == "showtell"
    assert list(s.values) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert s.skipped["METEOR"].startswith("Java not found")
    assert "CoreNLP" in s.skipped["SPICE"]
    with pytest.raises(ShowtellError, match="needs Java"):
        score_captions(REFERENCES, CANDIDATES, tokenizer="ptb")


@needs_java
def test_showtell_tokenizer_gives_ptb_numbers_on_plain_captions(ours: dict) -> None:
    s = score_captions(REFERENCES, CANDIDATES, metrics=("BLEU-4", "ROUGE-L", "CIDEr"), tokenizer="showtell")
    assert s.tokenizer == "showtell"
    for name, value in s.values.items():
        assert value == pytest.approx(ours["values"][name], abs=1e-12, rel=0), name


@needs_java
def test_awkward_text_stays_aligned() -> None:
    """Line breaks of any kind inside a caption and an empty last candidate must not shift captions between images."""
    messy_refs = {"a": ["A dog\rruns\u2028on grass.", "a dog\x0cruns"], "b": ["A cat\nsleeps | here."], 7: ["x"]}
    messy = {"a": "a dog runs\r\n", 7: "x", "b": ""}
    clean_refs = {"a": ["A dog runs on grass.", "a dog runs"], "b": ["A cat sleeps | here."], "7": ["x"]}
    clean = {"a": "a dog runs", "7": "x", "b": ""}
    metrics = ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr")  # METEOR's input is the same tokenized text
    got = score_captions(messy_refs, messy, metrics=metrics, tokenizer="ptb")
    want = score_captions(clean_refs, clean, metrics=metrics, tokenizer="ptb")
    assert got.values == want.values and list(got.values) == list(metrics)
    assert got.values["ROUGE-L"] == pytest.approx(2 / 3)  # "a" and 7 match their own references, "b" is empty


@needs_java
def test_meteor_crash_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import pycocoevalcap.meteor.meteor as meteor

    monkeypatch.setattr(meteor, "METEOR_JAR", "missing.jar")  # java starts, then exits at once
    s = score_captions(REFERENCES, CANDIDATES, metrics=("BLEU-1", "METEOR"))
    assert list(s.values) == ["BLEU-1"]
    assert s.skipped["METEOR"].startswith("METEOR (java) failed: ") and "missing.jar" in s.skipped["METEOR"]


def test_input_errors() -> None:
    with pytest.raises(ShowtellError, match="no reference captions"):
        score_captions({1: ["a dog"]}, {2: "a dog"})
    with pytest.raises(ShowtellError, match="unknown metric"):
        score_captions({1: ["a dog"]}, {1: "a dog"}, metrics=("BLEU-5",))
    with pytest.raises(ShowtellError, match="list of strings"):
        score_captions({1: "a dog"}, {1: "a dog"})
    with pytest.raises(ShowtellError, match="same once written as text"):
        score_captions({1: ["a dog"], "1": ["a cat"]}, {1: "a dog"})


# Measured on the 5000 Flickr8k test-split references: 4998 agree (99.96 %). The two that differ
# hold the symbols "&" and "#", which PTB keeps and tokenize() drops.
MAX_DISAGREEING = 2


@needs_java
def test_tokenizer_agrees_with_ptb_on_flickr8k(flickr8k: Path) -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    text = flickr8k / "Flickr8k_text"
    test_images = set((text / "Flickr_8k.testImages.txt").read_text().split())
    captions = [c for line in (text / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines()
                for key, c in [line.split("\t", 1)] if key.split("#")[0] in test_images]
    assert len(captions) == 5000
    ptb = PTBTokenizer().tokenize({n: [{"caption": c}] for n, c in enumerate(captions)})
    differing = 0
    for n, caption in enumerate(captions):
        theirs, mine = ptb[n][0].split(), tokenize(caption)
        if theirs == mine:
            continue
        # every disagreement must be a symbol PTB keeps and tokenize() drops
        assert [t for t in theirs if any(ch.isalnum() for ch in t)] == mine, f"{caption!r}: PTB {theirs} vs {mine}"
        differing += 1
    assert differing <= MAX_DISAGREEING
