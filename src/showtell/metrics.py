"""Caption metrics: the one place BLEU-1..4, METEOR, ROUGE-L and CIDEr are computed.

pycocoevalcap's scorers are called one by one, as ``COCOEvalCap.evaluate`` does, on the same
PTB-tokenized text, so the numbers are the ones papers report; the COCO object plumbing is left
out. Differences from ``COCOEvalCap`` (none of which changes a score on ordinary captions):

- the PTB tokenizer (same jar, flags and punctuation filter as ``PTBTokenizer``) runs on a
  temporary file outside site-packages, and whitespace in a caption is collapsed first, so a
  ``\\r`` or form feed cannot shift captions onto the wrong image and an empty last caption is
  not lost;
- ``|`` is removed from METEOR's input (``|||`` is its field separator);
- the METEOR java process is closed after use; SPICE never runs (it downloads Stanford CoreNLP);
- without Java, METEOR is skipped and the text is split with :func:`showtell.vocab.tokenize`.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from showtell.errors import ShowtellError
from showtell.vocab import tokenize

if TYPE_CHECKING:
    from pycocoevalcap.meteor.meteor import Meteor

METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
TOKENIZERS = ("auto", "ptb", "showtell")
SPICE_REASON = "needs a Stanford CoreNLP download; not available offline"
NO_JAVA_REASON = "Java not found (install a Java runtime to compute METEOR)"


@dataclass
class Scores:
    values: dict[str, float]  # metric name -> value (a fraction, as pycocoevalcap returns it); only metrics computed
    skipped: dict[str, str]  # metric name -> why it was not computed
    tokenizer: str  # "ptb" or "showtell": how captions were split before scoring
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)  # CIDEr and METEOR of each image by id


def java_available() -> bool:
    """Whether a working ``java`` is on PATH (pycocoevalcap runs it for PTB tokenization and METEOR)."""
    java = shutil.which("java")
    return java is not None and _java_runs(java)


@functools.cache
def _java_runs(java: str) -> bool:
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def score_captions(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    metrics: Iterable[str] = METRIC_NAMES,
    tokenizer: str = "auto",
) -> Scores:
    """Corpus scores of one candidate caption per image against that image's reference captions.

    Keys are image ids (compared as strings); every candidate needs references, and references
    of images without a candidate are ignored. ``tokenizer``: "ptb" (pycocoevalcap's, needs
    Java), "showtell" (:func:`showtell.vocab.tokenize`) or "auto" (ptb when Java is available).
    """
    wanted = list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRIC_NAMES and m != "SPICE"]
    if unknown:
        raise ShowtellError(f"unknown metric {unknown[0]!r} (choose from {', '.join(METRIC_NAMES)})")
    if tokenizer not in TOKENIZERS:
        raise ShowtellError(f"unknown tokenizer {tokenizer!r} (choose from {', '.join(TOKENIZERS)})")
    refs, cands = _check_inputs(references, candidates)
    java = java_available()
    if tokenizer == "auto":
        tokenizer = "ptb" if java else "showtell"
    elif tokenizer == "ptb" and not java:
        raise ShowtellError("the PTB tokenizer needs Java, which was not found (use tokenizer='showtell')")

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    values: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {}
    skipped = {"SPICE": SPICE_REASON}
    if "METEOR" in wanted and not java:
        skipped["METEOR"] = NO_JAVA_REASON
    # METEOR's JVM takes seconds to load its paraphrase table: start it first, let it load meanwhile.
    meteor = Meteor() if "METEOR" in wanted and java else None
    try:
        ids = list(cands)
        texts = [r for i in ids for r in refs[i]] + [cands[i] for i in ids]
        split = _ptb_tokenize(texts) if tokenizer == "ptb" else [" ".join(tokenize(t)) for t in texts]
        gts: dict[str, list[str]] = {}
        pos = 0
        for i in ids:
            gts[i], pos = split[pos : pos + len(refs[i])], pos + len(refs[i])
        res = {i: [split[pos + k]] for k, i in enumerate(ids)}

        with contextlib.redirect_stdout(sys.stderr):  # keep any scorer chatter off the CLI's stdout
            if any(m.startswith("BLEU-") for m in wanted):
                bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
                values.update({f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)})
            if "ROUGE-L" in wanted:
                values["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
            if "CIDEr" in wanted:
                value, each = Cider().compute_score(gts, res)
                values["CIDEr"] = float(value)
                per_image["CIDEr"] = dict(zip(gts, map(float, each)))
            if meteor is not None:
                try:
                    values["METEOR"], per_image["METEOR"] = _meteor(meteor, gts, res)
                except ShowtellError as e:  # the java process died: say so, keep the other metrics
                    skipped["METEOR"] = str(e)
    finally:
        if meteor is not None:
            _close(meteor)
    values = {m: values[m] for m in METRIC_NAMES if m in wanted and m in values}
    return Scores(values=values, skipped=skipped, tokenizer=tokenizer, per_image=per_image)


def _check_inputs(
    references: Mapping[Hashable, Sequence[str]], candidates: Mapping[Hashable, str]
) -> tuple[dict[str, list[str]], dict[str, str]]:
    """String keys, one-line texts; a clear error for whatever cannot be scored."""
    refs = {str(k): v for k, v in references.items()}
    cands = {str(k): v for k, v in candidates.items()}
    if len(refs) != len(references) or len(cands) != len(candidates):
        raise ShowtellError("two image ids are the same once written as text (e.g. 1 and '1')")
    if not cands:
        raise ShowtellError("no candidate captions to score")
    out: dict[str, list[str]] = {}
    for k, text in cands.items():
        if k not in refs:
            raise ShowtellError(f"image {k!r} has a candidate caption but no reference captions")
        if not isinstance(text, str):
            raise ShowtellError(f"candidate caption of image {k!r} is {type(text).__name__}, not a string")
        r = refs[k]
        if isinstance(r, str) or not r or not all(isinstance(s, str) for s in r):
            raise ShowtellError(f"references of image {k!r} must be a non-empty list of strings")
        out[k] = [" ".join(s.split()) for s in r]
        cands[k] = " ".join(text.split())
    return out, cands


def _ptb_tokenize(texts: list[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer`` (same jar, flags and punctuation filter), one text a line."""
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="showtell-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_bytes(("\n".join(texts) + "\n").encode())
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
        proc = subprocess.run([*cmd, str(path)], capture_output=True)
    lines = proc.stdout.decode().split("\n")
    if proc.returncode != 0 or len(lines) != len(texts) + 1:
        why = (proc.stderr.decode(errors="replace").strip().splitlines() or ["wrong number of lines"])[-1]
        raise ShowtellError(f"PTB tokenizer (java) failed: {why}")
    punct = set(ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in lines[:-1]]


def _meteor(meteor: Meteor, gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    """pycocoevalcap's METEOR on texts without "|" (``|||`` separates fields on METEOR's stdin): the corpus
    score and each image's."""

    def clean(texts: list[str]) -> list[str]:
        return [" ".join(s.replace("|", " ").split()) if "|" in s else s for s in texts]

    try:
        score, each = meteor.compute_score({k: clean(v) for k, v in gts.items()},
                                           {k: clean(v) for k, v in res.items()})
    except (OSError, ValueError):  # java died: a broken pipe or an empty reply
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
        why = meteor.meteor_p.stderr.read().decode(errors="replace").strip().splitlines() or ["no reply"]
        raise ShowtellError(f"METEOR (java) failed: {why[-1]}") from None
    return float(score), dict(zip(gts, map(float, each)))


def _close(meteor: Meteor) -> None:
    """End METEOR's java process now (no zombie), so that ``Meteor.__del__`` has nothing left to do."""
    p = meteor.meteor_p
    p.kill()
    p.wait()
    for f in (p.stdin, p.stdout, p.stderr):
        with contextlib.suppress(OSError):
            f.close()
    if meteor.lock.locked():  # left held when compute_score raised; Meteor.__del__ would block on it
        meteor.lock.release()
