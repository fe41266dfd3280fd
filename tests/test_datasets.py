import json
import subprocess
import sys

import pytest
from PIL import Image

from showtell.datasets import hash_split, load_corpus, read_coco, read_csv, read_flickr8k, read_karpathy
from showtell.errors import DataError


def test_shared_flickr8k_counts(flickr8k):
    corpus = read_flickr8k(flickr8k)
    splits = ("train", "dev", "test")
    counts = {s: (len(corpus.split(s)), sum(len(r.captions) for r in corpus.split(s))) for s in splits}
    assert counts == {"train": (6000, 30000), "dev": (1000, 5000), "test": (1000, 5000)}
    assert corpus.skipped_captions == 5 and corpus.missing_images == ["2258277193_586949ec62.jpg.1"]
    assert sum(len(r.captions) for r in corpus.records) == 40455
    assert all(r.image.is_file() for r in corpus.split("test")[:50])


def test_data_stats_cli_json(flickr8k):
    out = subprocess.run([sys.executable, "-m", "showtell", "data", "stats", "--dataset", "flickr8k",
                          "--root", str(flickr8k), "--json"], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats["splits"]["train"] == {"images": 6000, "captions": 30000}
    assert stats["splits"]["dev"] == {"images": 1000, "captions": 5000}
    assert stats["splits"]["test"] == {"images": 1000, "captions": 5000}
    assert stats["skipped_captions"] == 5
    assert 2000 < stats["vocab_size"] < 3500
    assert "skipped 5 caption(s)" in out.stderr


def make_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), "red").save(folder / n)


def write_flickr8k(root, token_lines, splits):
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    (text / "Flickr8k.token.txt").write_text("\n".join(token_lines) + "\n")
    for split in ("train", "dev", "test"):
        (text / f"Flickr_8k.{split}Images.txt").write_text("\n".join(splits.get(split, [])) + "\n")


def test_flickr8k_small_and_alternative_folder_name(tmp_path):
    make_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    write_flickr8k(tmp_path, ["a.jpg#0\tA dog .", "a.jpg#1\tA brown dog", "b.jpg#0\tA cat", "gone.jpg#0\tNothing"],
                   {"train": ["a.jpg"], "test": ["b.jpg"]})
    corpus = read_flickr8k(tmp_path)
    assert {r.image.name: (r.split, r.captions) for r in corpus.records} == {
        "a.jpg": ("train", ("A dog .", "A brown dog")), "b.jpg": ("test", ("A cat",))}
    assert corpus.skipped_captions == 1 and corpus.missing_images == ["gone.jpg"]


@pytest.mark.parametrize("line, where", [("a.jpg A dog without a tab", ":2:"), ("a.jpg\tno hash", ":2:"),
                                         ("a.jpg#0\t   ", ":2:")])
def test_flickr8k_malformed_token_line(tmp_path, line, where):
    make_images(tmp_path / "Flicker8k_Dataset", ["a.jpg"])
    write_flickr8k(tmp_path, ["a.jpg#0\tA dog", line], {"train": ["a.jpg"]})
    with pytest.raises(DataError, match=f"Flickr8k.token.txt{where}"):
        read_flickr8k(tmp_path)


def test_flickr8k_image_in_two_splits(tmp_path):
    make_images(tmp_path / "Flicker8k_Dataset", ["a.jpg"])
    write_flickr8k(tmp_path, ["a.jpg#0\tA dog"], {"train": ["a.jpg"], "dev": ["a.jpg"]})
    with pytest.raises(DataError, match="both the train and dev splits"):
        read_flickr8k(tmp_path)


def test_flickr8k_missing_folders(tmp_path):
    with pytest.raises(DataError, match="no image folder"):
        read_flickr8k(tmp_path)


def test_csv_kaggle_captions_txt(tmp_path):
    make_images(tmp_path / "Images", ["x.jpg", "y.jpg"])
    (tmp_path / "captions.txt").write_text('image,caption\nx.jpg,"A dog, running"\nx.jpg,A dog\ny.jpg,A cat\n'
                                           "z.jpg,Missing\n")
    corpus = load_corpus("csv", tmp_path)
    caps = {r.image.name: r.captions for r in corpus.records}
    assert caps == {"x.jpg": ("A dog, running", "A dog"), "y.jpg": ("A cat",)}
    assert corpus.skipped_captions == 1
    assert {r.split for r in corpus.records} == {hash_split("x.jpg"), hash_split("y.jpg")}


def test_csv_captions_csv_is_found_beside_other_csv_files(tmp_path):
    make_images(tmp_path / "images", ["x.jpg"])
    (tmp_path / "captions.csv").write_text("image,caption,split\nx.jpg,A red train,dev\n")
    (tmp_path / "objects.csv").write_text("image,object,imagenet\nx.jpg,train,466\n")
    corpus = load_corpus("csv", tmp_path)
    assert [(r.image.name, r.captions, r.split) for r in corpus.records] == [("x.jpg", ("A red train",), "dev")]
    (tmp_path / "captions.csv").rename(tmp_path / "other.csv")
    with pytest.raises(DataError, match="several caption CSV files"):
        load_corpus("csv", tmp_path)


def test_csv_flickr30k_pipe_and_split_column(tmp_path):
    make_images(tmp_path / "imgs", ["1.jpg", "2.jpg"])
    (tmp_path / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| A man\n2.jpg| 0| A kid\n")
    corpus = read_csv(tmp_path / "results.csv", tmp_path / "imgs", split="test")
    assert sorted((r.image.name, r.captions, r.split) for r in corpus.records) == [
        ("1.jpg", ("A man",), "test"), ("2.jpg", ("A kid",), "test")]
    (tmp_path / "s.csv").write_text("image,caption,split\n1.jpg,A man,val\n2.jpg,A kid,train\n")
    assert {r.image.name: r.split for r in read_csv(tmp_path / "s.csv", tmp_path / "imgs").records} == {
        "1.jpg": "dev", "2.jpg": "train"}


@pytest.mark.parametrize("content, match", [
    ("", "empty file"),
    ("picture,text_en\n1.jpg,a\n", "no image column"),
    ("image,caption\n1.jpg\n", r"s.csv:2: expected 2 fields"),
    ("image,caption\n", "no caption rows"),
])
def test_csv_malformed(tmp_path, content, match):
    make_images(tmp_path, ["1.jpg"])
    (tmp_path / "s.csv").write_text(content)
    with pytest.raises(DataError, match=match):
        read_csv(tmp_path / "s.csv", tmp_path)


def test_csv_not_utf8(tmp_path):
    (tmp_path / "s.csv").write_bytes(b"image,caption\n1.jpg,caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        read_csv(tmp_path / "s.csv", tmp_path)


def coco_json(images, annotations):
    return json.dumps({"images": images, "annotations": annotations})


def test_coco(tmp_path):
    make_images(tmp_path / "val2014", ["COCO_1.jpg", "COCO_2.jpg"])
    (tmp_path / "c.json").write_text(coco_json(
        [{"id": 1, "file_name": "COCO_1.jpg"}, {"id": 2, "file_name": "COCO_2.jpg"}, {"id": 3, "file_name": "n.jpg"}],
        [{"image_id": 1, "id": 10, "caption": "A bus. "}, {"image_id": 1, "id": 11, "caption": "A red bus"},
         {"image_id": 2, "id": 12, "caption": "A plane"}, {"image_id": 3, "id": 13, "caption": "gone"}]))
    corpus = read_coco(tmp_path / "c.json", tmp_path / "val2014", split="dev")
    assert {r.image.name: (r.captions, r.split) for r in corpus.records} == {
        "COCO_1.jpg": (("A bus.", "A red bus"), "dev"), "COCO_2.jpg": (("A plane",), "dev")}
    assert corpus.skipped_captions == 1


@pytest.mark.parametrize("data, match", [
    ('{"images": []}', "missing field 'annotations'"),
    ('{"images": [{"id": 1}], "annotations": []}', r"images\[0\]: missing field 'file_name'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}',
     "duplicate image id 1"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}',
     r"annotations\[0\]: image_id 2 is not in 'images'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": 5}]}',
     "field 'caption' has the wrong type"),
    ('{"images": [], "annotations": [', "invalid JSON at line 1"),
])
def test_coco_malformed(tmp_path, data, match):
    (tmp_path / "c.json").write_text(data)
    with pytest.raises(DataError, match=match):
        read_coco(tmp_path / "c.json", tmp_path)


def test_karpathy(tmp_path):
    make_images(tmp_path, ["train2014/a.jpg", "val2014/b.jpg", "val2014/c.jpg"])
    data = {"images": [
        {"filepath": "train2014", "filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A cat"}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "val", "sentences": [{"raw": "A cow"}]},
        {"filepath": "val2014", "filename": "d.jpg", "split": "test", "sentences": [{"raw": "x"}, {"raw": "y"}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    corpus = load_corpus("karpathy", tmp_path)
    assert {r.image.name: r.split for r in corpus.records} == {"a.jpg": "train", "b.jpg": "train", "c.jpg": "dev"}
    assert corpus.skipped_captions == 2


def test_karpathy_flickr_without_filepath_and_malformed(tmp_path):
    make_images(tmp_path, ["a.jpg"])
    (tmp_path / "d.json").write_text(json.dumps(
        {"images": [{"filename": "a.jpg", "split": "test", "sentences": [{"raw": "A dog"}]}]}))
    assert [r.split for r in read_karpathy(tmp_path / "d.json", tmp_path).records] == ["test"]
    (tmp_path / "d.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test",
                                                             "sentences": [{"tokens": []}]}]}))
    with pytest.raises(DataError, match=r"images\[0\].sentences\[0\]: missing field 'raw'"):
        read_karpathy(tmp_path / "d.json", tmp_path)


def test_cli_bad_dataset_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "showtell", "data", "stats", "--dataset", "flickr8k",
                          "--root", str(tmp_path / "nope")], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "no such directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_flickr8k_duplicate_caption_id(tmp_path):
    make_images(tmp_path / "Flicker8k_Dataset", ["a.jpg"])
    write_flickr8k(tmp_path, ["a.jpg#0\tA dog", "a.jpg#0\tA dog again"], {"train": ["a.jpg"]})
    with pytest.raises(DataError, match=r"token.txt:2: caption id a.jpg#0 repeats line 1"):
        read_flickr8k(tmp_path)


def test_karpathy_image_without_sentences(tmp_path):
    make_images(tmp_path, ["a.jpg"])
    (tmp_path / "d.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}))
    with pytest.raises(DataError, match=r"images\[0\]: no sentences for a.jpg"):
        read_karpathy(tmp_path / "d.json", tmp_path)


@pytest.mark.parametrize("delimiter", [",", "\t", ";"])
def test_csv_quotes_inside_captions_as_csv_writers_write_them(tmp_path, delimiter):
    import csv

    make_images(tmp_path / "Images", ["a.jpg", "b.jpg"])
    rows = [("a.jpg", 'Adults with " X " on their hands , smiling .', "train"),
            ("a.jpg", f'a "quoted{delimiter} word"', "train"), ("b.jpg", "A dog", "dev")]
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)
    corpus = read_csv(tmp_path / "captions.csv", tmp_path / "Images")
    assert sorted((r.image.name, r.captions, r.split) for r in corpus.records) == [
        ("a.jpg", (rows[0][1], rows[1][1]), "train"), ("b.jpg", ("A dog",), "dev")]


def test_csv_spaces_after_the_delimiter_with_quoted_fields(tmp_path):
    make_images(tmp_path / "Images", ["a.jpg"])
    (tmp_path / "c.csv").write_text('image, caption, split\na.jpg, "a dog, running", train\n')
    corpus = read_csv(tmp_path / "c.csv", tmp_path / "Images")
    assert [(r.captions, r.split) for r in corpus.records] == [(("a dog, running",), "train")]


def test_missing_images_are_said_once_per_data_set(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_images(tmp_path / "one" / "Images", ["a.jpg"])
    make_images(tmp_path / "two" / "Images", ["a.jpg"])
    for root in ("one", "two"):
        (tmp_path / root / "captions.txt").write_text("image,caption,split\na.jpg,A dog,train\ngone.jpg,A cow,dev\n")
    said = "skipped 1 caption(s) of 1 missing image(s): gone.jpg"
    assert [load_corpus("csv", tmp_path / "one").first_skipped_message() for _ in range(3)] == [said, None, None]
    assert load_corpus("csv", tmp_path / "two").first_skipped_message() == said  # another data set: said again
    with open(tmp_path / "one" / "captions.txt", "a") as f:
        f.write("lost.jpg,A hen,dev\n")  # what it skips changed: said again
    both = "skipped 2 caption(s) of 2 missing image(s): gone.jpg, lost.jpg"
    assert load_corpus("csv", tmp_path / "one").first_skipped_message() == both
    (tmp_path / "ro").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "ro"))  # a file: no marker can be written there
    assert [load_corpus("csv", tmp_path / "one").first_skipped_message() for _ in range(2)] == [both, both]


@pytest.mark.slow
def test_features_warns_about_missing_images_on_the_first_run_only(tmp_path, monkeypatch, capsys):
    from showtell.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    make_images(tmp_path / "Images", ["a.jpg"])
    (tmp_path / "captions.txt").write_text("image,caption,split\na.jpg,A dog,dev\ngone.jpg,A cow,dev\n")
    argv = ["features", "--dataset", "csv", "--root", str(tmp_path), "--splits", "dev", "--encoder",
            "efficientnet_lite0", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    errs = []
    for _ in range(2):
        assert main(argv) == 0
        errs.append(capsys.readouterr().err)
    assert main(["data", "stats", "--dataset", "csv", "--root", str(tmp_path)]) == 0  # the command to look: always
    errs.append(capsys.readouterr().err)
    said = "showtell: warning: skipped 1 caption(s) of 1 missing image(s): gone.jpg\n"
    assert errs == [said, "", said]
