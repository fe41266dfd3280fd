"""The Show, Attend and Tell decoder: its config and checkpoint, the one decoding loop over it, training, and the
per-word attention maps of the Python API."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from showtell.attention import ATTENTION_REG, AttentionModel
from showtell.checkpoint import load_checkpoint, save_checkpoint
from showtell.config import TrainConfig
from showtell.decoding import DecodingOptions, decode
from showtell.encoders import encoder_info
from showtell.errors import CheckpointError, ShowtellError
from showtell.model import CaptionModel, Ensemble, ModelConfig, create_model
from showtell.vocab import Vocabulary


def make_model(grid: int = 3, dim: int = 16, **kwargs) -> AttentionModel:
    torch.manual_seed(0)
    config = ModelConfig(**{"vocab_size": 30, "feature_dim": dim, "embed_dim": 8, "hidden_dim": 24,
                            "decoder": "attention", "grid": grid, **kwargs})
    return create_model(config).eval()


def captions_of(lengths: list[int]) -> torch.Tensor:
    """<start> w.. <end> <pad>.. with random words 4..29."""
    gen = torch.Generator().manual_seed(1)
    out = torch.zeros(len(lengths), max(lengths) + 2, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0], out[i, n + 1] = 1, 2
        out[i, 1:n + 1] = torch.randint(4, 30, (n,), generator=gen)
    return out


def test_config_selects_the_decoder_and_keeps_show_and_tell_records_as_they_were():
    model = make_model()
    assert isinstance(model, AttentionModel)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == AttentionModel.state_shapes(model.config)
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config
    assert model.config.to_dict()["decoder"] == "attention" and model.config.to_dict()["grid"] == 3
    plain = ModelConfig(vocab_size=30, feature_dim=16)
    assert "decoder" not in plain.to_dict() and "grid" not in plain.to_dict()  # the record older showtells wrote
    assert isinstance(create_model(plain), CaptionModel)
    for bad, message in [({"grid": None}, "grid must be an integer from 1 to 64"),
                         ({"grid": 3, "num_layers": 2}, "one LSTM layer"),
                         ({"decoder": "transformer"}, "decoder must be show-and-tell or attention")]:
        with pytest.raises(ShowtellError, match=message):
            ModelConfig(vocab_size=30, feature_dim=16, **{"decoder": "attention", **bad})
    with pytest.raises(ShowtellError, match="decoder must be 'show-and-tell' or 'attention', got 'lstm'"):
        TrainConfig(decoder="lstm")
    with pytest.raises(ShowtellError, match="ensembles are of show-and-tell models"):
        Ensemble(model.config, 2)


def test_stepping_gives_the_teacher_forced_logits_so_decoding_matches_training():
    model = make_model()
    features, captions = torch.randn(4, 9, 16), captions_of([6, 2, 4, 1])
    with torch.no_grad():
        logits = model(features, captions)
        state = model.init_state(features)
        assert [tuple(s.shape) for s in state] == [(1, 4, 24), (1, 4, 24), (9, 4, 16), (9, 4, 24)]  # batch in dim 1
        stepped = []
        for t in range(captions.shape[1] - 1):
            step_logits, state = model.step(captions[:, t], state)
            stepped.append(step_logits)
    torch.testing.assert_close(torch.stack(stepped, dim=1), logits, atol=1e-5, rtol=1e-5)


def test_greedy_and_beam_search_run_over_it_and_maps_say_where_each_word_looked():
    model = make_model()
    with torch.no_grad():  # sharper weights: captions that differ per image
        for p in model.parameters():
            p.mul_(4)
    features = torch.randn(5, 9, 16) * 3
    greedy = decode(model, features, DecodingOptions(beam_size=1, max_length=8))
    beam1 = decode(model, features, DecodingOptions(beam_size=1, max_length=8))
    beam = decode(model, features, DecodingOptions(beam_size=4, max_length=8, num_return=4))
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam1]
    assert all(len(h) == 4 for h in beam) and len({tuple(h[0].tokens) for h in beam}) > 1
    assert all(h[0].score >= g[0].score - 1e-5 for h, g in zip(beam, greedy))  # beam finds no worse captions
    # the maps are those the words were chosen with: replaying them step by step gives the same alphas
    tokens = [h[0].tokens for h in beam]
    maps = model.attention_maps(features, tokens)
    for i, (toks, grid) in enumerate(zip(tokens, maps)):
        assert grid.shape == (len(toks), 3, 3)
        torch.testing.assert_close(grid.sum((1, 2)), torch.ones(len(toks)))
        a, keys, h, c = model._start(features[i:i + 1])
        for t, word in enumerate([1, *toks[:-1]]):
            alpha, h, c = model._advance(torch.tensor([word]), a, keys, h, c)
            torch.testing.assert_close(alpha.view(3, 3), grid[t])


def test_loss_adds_the_doubly_stochastic_regularisation_and_training_learns():
    model = make_model()
    features, captions = torch.randn(4, 9, 16), captions_of([6, 2, 4, 1])
    logits = model(features, captions)
    targets = captions[:, 1:]
    mask = targets != 0
    xe = F.cross_entropy(logits[mask], targets[mask])
    _, alphas = model._run(features, captions)
    coverage = (alphas * mask.unsqueeze(2)).sum(1)  # [4, 9]: each position's total attention over the words
    torch.testing.assert_close(model.loss(features, captions), xe + ATTENTION_REG * ((1 - coverage) ** 2).mean())
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(features, captions)
    first.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n != "embed.weight")  # attention, gate and init layers all learn
    for _ in range(60):
        opt.zero_grad()
        model.loss(features, captions).backward()
        opt.step()
    assert model.loss(features, captions).item() < 0.5 * first.item()


def test_pooled_features_are_refused_not_silently_used():
    model = make_model()
    for features in (torch.randn(2, 16), torch.randn(2, 4, 16)):  # pooled; a map of another grid
        with pytest.raises(ShowtellError, match=r"reads feature maps \[images, 9, 16\] \(3 x 3 positions\), got "):
            decode(model, features)


@pytest.fixture(scope="module")
def attention_checkpoint(tmp_path_factory):
    """A tiny attention checkpoint on efficientnet_lite0's 7 x 7 x 1280 map, with sharpened random weights."""
    info = encoder_info("efficientnet_lite0")
    vocab = Vocabulary.build(["a cat sits on a mat", "a dog runs on the grass", "a man rides a bike"], min_count=1)
    model = make_model(grid=info["grid"], dim=info["feature_dim"], vocab_size=len(vocab))
    with torch.no_grad():  # larger weights: captions that differ per photo
        for p in model.parameters():
            p.mul_(3)
    path = tmp_path_factory.mktemp("att") / "att.safetensors"
    save_checkpoint(path, model, vocab, "efficientnet_lite0", info["preprocess"], meta={"name": "att"})
    return path


def test_checkpoint_round_trips_and_a_grid_that_disagrees_with_the_encoder_is_refused(attention_checkpoint,
                                                                                       tmp_path):
    ckpt = load_checkpoint(attention_checkpoint)
    assert isinstance(ckpt.model, AttentionModel) and ckpt.model.config.grid == 7
    original = make_model(grid=7, dim=1280, vocab_size=len(ckpt.vocab))  # the weights that were saved
    with torch.no_grad():
        for p in original.parameters():
            p.mul_(3)
    features, tokens = torch.randn(2, 49, 1280), torch.tensor([1, 1])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.model.step(tokens, ckpt.model.init_state(features))[0],
                                   original.step(tokens, original.init_state(features))[0])
    wrong = ModelConfig(**{**ckpt.model.config.to_dict(), "grid": 9})  # lite2's grid on a lite0 checkpoint
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, create_model(wrong), ckpt.vocab, "efficientnet_lite0", ckpt.preprocess)
    with pytest.raises(CheckpointError, match="attends over a 9 x 9 x 1280 feature map, but encoder "
                                              "efficientnet_lite0 gives 7 x 7 x 1280"):
        load_checkpoint(bad)
    run = subprocess.run([sys.executable, "-m", "showtell", "caption", "--model", bad, "nothing.jpg"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [f"showtell: error: {bad}: the attention decoder attends over a 9 x 9 x "
                                               "1280 feature map, but encoder efficientnet_lite0 gives 7 x 7 x 1280"]


def test_python_api_returns_a_map_for_every_word(attention_checkpoint, photos):
    import numpy as np

    import showtell

    captioner = showtell.load(attention_checkpoint, device="cpu")
    assert captioner.spatial and captioner.precision == "fp32"
    results = captioner.caption(sorted(photos.iterdir()), beam_size=3, tags=2)
    for r in results:
        assert r.ok and r.attention is not None and len(r.tags) == 2
        assert [w for w, _ in r.attention] == r.caption.split()
        for _, grid in r.attention:
            assert grid.shape == (7, 7) and abs(float(grid.sum()) - 1) < 1e-4 and (grid >= 0).all()
        assert "attention" not in r.to_dict()  # the JSON lines stay as they are
    assert not np.allclose(results[0].attention[0][1], results[1].attention[0][1])  # maps differ per photo


def test_overlay_lights_where_the_word_looked(photos):
    import numpy as np
    from PIL import Image

    from showtell.overlay import attention_figure, center_crop, overlay

    grey = Image.new("RGB", (200, 100), (200, 200, 200))
    assert center_crop(grey).size == (100, 100) and center_crop(grey, 0.875).size == (88, 88)
    corner = np.zeros((7, 7), dtype=np.float32)
    corner[0, 0] = 1.0  # all attention on the top-left position
    lit = np.asarray(overlay(grey, corner, 70), dtype=np.float32)
    assert lit[:5, :5].mean() > 190 and lit[-10:, -10:].mean() == pytest.approx(200 * 0.25, abs=1)
    uniform = np.asarray(overlay(grey, np.full((7, 7), 1 / 49), 70), dtype=np.float32)
    assert np.abs(uniform - 200).max() <= 1  # looking everywhere alike dims nothing
    sheet = attention_figure(sorted(photos.iterdir())[0], [("a", corner), ("cat", corner.T)], size=64, per_row=5)
    assert sheet.size == (3 * 70 + 6, 64 + 22 + 12)  # the photo and two words in one row


@pytest.mark.slow
def test_trained_from_the_cli_and_its_gallery_shows_each_word_over_the_photo(flickr8k, feature_cache, tmp_path,
                                                                                photos):
    def showtell_cli(*args):
        return subprocess.run([sys.executable, "-m", "showtell", *map(str, args)], capture_output=True, text=True)

    out = tmp_path / "att"
    run = showtell_cli("train", "--dataset", "flickr8k", "--root", flickr8k, "--decoder", "attention", "--limit", 40,
                       "--epochs", 1, "--encoder", "efficientnet_lite0", "--hidden-dim", 32, "--embed-dim", 16,
                       "--eval-max-length", 8, "--cache-dir", feature_cache, "--out", out, "--quiet")
    assert run.returncode == 0, run.stderr
    ckpt = load_checkpoint(out / "best.safetensors")
    assert isinstance(ckpt.model, AttentionModel) and ckpt.meta["config"]["decoder"] == "attention"
    caches = [p.name for p in feature_cache.iterdir()]
    assert any(name.startswith("efficientnet_lite0-spatial-flip-") for name in caches)  # the train split's maps
    page = tmp_path / "g.html"
    run = showtell_cli("caption", "--model", out / "best.safetensors", photos, "--html", page, "--tags", 0)
    assert run.returncode == 0, run.stderr
    captions = [line.split("\t")[1] for line in run.stdout.strip().splitlines()]
    html = page.read_text()
    words = sum(len(c.split()) for c in captions)
    assert words and html.count('alt="where it looked for ') == words
    run = showtell_cli("caption", "--model", out / "best.safetensors", photos, "--html", page, "--no-attention")
    assert run.returncode == 0 and "where it looked" not in page.read_text()


def test_onnx_export_matches_torch_and_captions_alike(attention_checkpoint, photos, tmp_path):
    pytest.importorskip("onnxruntime")
    from showtell.captioner import load
    from showtell.export import TOLERANCE, export_onnx
    from showtell.onnx_runtime import load_onnx

    record = export_onnx(attention_checkpoint, tmp_path / "onnx", quiet=True)
    assert record["model"]["decoder"] == "attention" and record["model"]["grid"] == 7
    assert all(record["parity"][k] <= TOLERANCE[k] for k in TOLERANCE)  # max |onnxruntime - torch| per graph
    onnx = load_onnx(tmp_path / "onnx")
    assert [i.name for i in onnx.sessions["decoder_step"].get_inputs()] == ["tokens", "h_in", "c_in", "map_in",
                                                                           "keys_in"]
    images = sorted(photos.iterdir())
    torch_results = load(attention_checkpoint, device="cpu").caption(images, beam_size=3, tags=3)
    onnx_results = onnx.caption(images, beam_size=3, tags=3)
    assert len({r.caption for r in torch_results}) > 1  # captions that differ per photo, so the match means something
    for t, o in zip(torch_results, onnx_results):
        assert o.caption == t.caption and o.score == pytest.approx(t.score, abs=1e-4)
        assert [label for label, _ in o.tags] == [label for label, _ in t.tags]  # the tagger reads the pooled map


def test_self_critical_loss_runs_through_the_same_step_interface():
    from showtell.scst import Reward, scst_loss

    model = make_model().train()
    itos = ["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(4, 30)]]
    reward = Reward([[["w5", "w6", "w7"], ["w5", "w8"]], [["w9", "w10"]]])
    loss, mean_reward = scst_loss(model, torch.randn(2, 9, 16), [0, 1], reward, Vocabulary(itos), samples=3,
                                  max_length=6, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and mean_reward >= 0
    loss.backward()
    assert model.att.weight.grad is not None and model.att.weight.grad.abs().sum() > 0  # attention learns from it


@pytest.mark.slow
def test_web_page_lights_where_each_word_looked_on_hover(attention_checkpoint, photos):
    from conftest import missing
    from test_browser import CHROMIUM, CHROMIUM_ARGS, served

    if not CHROMIUM.is_file():
        missing(f"{CHROMIUM} not found (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    with served(attention_checkpoint) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.set_input_files("#picker", [str(photos / "chelsea.jpg")])
            card = page.locator(".card.ok")
            expect(card).to_have_count(1, timeout=60_000)
            words = card.locator(".caption .word")
            caption = card.locator(".caption").inner_text()
            assert words.count() == len(caption.rsplit(" (", 1)[0].split()) > 0  # every word, then the score
            canvas = card.locator("canvas.where")
            expect(canvas).to_be_hidden()
            words.first.hover()
            expect(canvas).to_be_visible()
            # the crop the encoder saw is shaded by the map: dimmed in places, clear where it looked
            alphas = canvas.evaluate("""c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height)
                .data; const a = []; for (let k = 3; k < d.length; k += 4) a.push(d[k]);
                return [Math.min(...a), Math.max(...a)]; }""")
            assert alphas[0] < 60 and alphas[1] > 150, alphas
            page.mouse.move(5, 5)
            expect(canvas).to_be_hidden()
            assert not errors, errors
        finally:
            browser.close()
