from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from showtell.errors import ShowtellError
from showtell.model import CaptionModel, Ensemble, ModelConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is several times faster than two (and than a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(seed: int = 0, **overrides) -> CaptionModel:
    torch.manual_seed(seed)
    kwargs = {"vocab_size": 30, "feature_dim": 12, "embed_dim": 16, "hidden_dim": 24, "dropout": 0.0} | overrides
    return CaptionModel(ModelConfig(**kwargs)).eval()


def make_captions(lengths: list[int], vocab_size: int = 30, seed: int = 0) -> torch.Tensor:
    """<start> w1..wn <end> <pad>.. rows, words drawn from the non-special ids."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(len(lengths), max(lengths) + 2, dtype=torch.long)
    for i, n in enumerate(lengths):
        out[i, 0] = 1
        out[i, 1 : n + 1] = torch.randint(4, vocab_size, (n,), generator=g)
        out[i, n + 1] = 2
    return out


# ------------------------------------------------------------------------------------------------ config


def test_config_round_trips_through_dict():
    config = ModelConfig(vocab_size=100, feature_dim=1280, embed_dim=64, num_layers=2, batch_norm=True)
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["hidden_dim"] == 512


def test_config_rejects_unknown_and_missing_keys():
    d = ModelConfig(vocab_size=100, feature_dim=8).to_dict()
    with pytest.raises(ShowtellError, match="unknown key.*hiden_dim"):
        ModelConfig.from_dict(d | {"hiden_dim": 3})
    with pytest.raises(ShowtellError, match="missing key.*feature_dim"):
        ModelConfig.from_dict({"vocab_size": 100})


@pytest.mark.parametrize("bad", [{"vocab_size": 3}, {"hidden_dim": 0}, {"dropout": 1.0}, {"num_layers": 1.5},
                                 {"batch_norm": "yes"}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ShowtellError):
        ModelConfig(**({"vocab_size": 100, "feature_dim": 8} | bad))


# ------------------------------------------------------------------------------------------------ model


def test_forward_shape_and_position_meaning():
    model = make_model()
    captions = make_captions([5, 3, 1])
    logits = model(torch.randn(3, 12), captions)
    assert logits.shape == (3, captions.shape[1] - 1, 30)


@pytest.mark.parametrize("layers,batch_norm", [(1, False), (2, False), (1, True), (3, True)])
def test_forward_equals_init_state_then_steps(layers, batch_norm):
    model = make_model(num_layers=layers, batch_norm=batch_norm)
    if batch_norm:  # give the running statistics non-trivial values
        model.train()
        model.init_state(torch.randn(16, 12) * 3 + 1)
        model.eval()
    features, captions = torch.randn(4, 12), make_captions([6, 2, 4, 1])
    with torch.no_grad():
        logits = model(features, captions)
        state = model.init_state(features)
        assert state[0].shape == state[1].shape == (layers, 4, 24)
        stepped = []
        for t in range(captions.shape[1] - 1):
            step_logits, state = model.step(captions[:, t], state)
            stepped.append(step_logits)
    torch.testing.assert_close(torch.stack(stepped, dim=1), logits, atol=1e-5, rtol=1e-5)


def test_trailing_padding_changes_nothing_before_it():
    model = make_model(num_layers=2)
    features, captions = torch.randn(3, 12), make_captions([4, 2, 3])
    padded = torch.cat([captions, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    with torch.no_grad():
        short, long = model(features, captions), model(features, padded)
        torch.testing.assert_close(long[:, : short.shape[1]], short, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model.loss(features, padded), model.loss(features, captions), atol=1e-6, rtol=1e-6)


def test_loss_is_cross_entropy_over_non_pad_targets():
    model = make_model()
    features, captions = torch.randn(3, 12), make_captions([5, 1, 3])
    with torch.no_grad():
        logits = model(features, captions)
        targets = captions[:, 1:]
        total, count = 0.0, 0
        for b in range(3):
            for t in range(targets.shape[1]):
                if targets[b, t] != 0:
                    total -= F.log_softmax(logits[b, t], dim=-1)[targets[b, t]].item()
                    count += 1
        assert count == (5 + 1) + (1 + 1) + (3 + 1)
        assert model.loss(features, captions).item() == pytest.approx(total / count, rel=1e-5)

        # pad targets really are ignored: whatever the model says there does not count
        mask = targets != 0
        expected = F.cross_entropy(logits[mask], targets[mask], label_smoothing=0.1)
        smoothed = model.loss(features, captions, label_smoothing=0.1)
        assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5)
        assert smoothed.item() != pytest.approx(total / count, rel=1e-3)


def test_loss_gradients_reach_every_parameter_but_not_the_pad_embedding():
    model = make_model(num_layers=2, batch_norm=True).train()
    model.loss(torch.randn(4, 12), make_captions([3, 5, 2, 4])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.embed.weight.grad[0].abs().sum() == 0


def test_features_of_another_dtype_are_accepted():
    model = make_model()
    features = torch.randn(2, 12)
    with torch.no_grad():
        a = model.init_state(features)
        b = model.init_state(features.half().float())
        c = model.init_state(features.half())
    torch.testing.assert_close(c, b)
    assert a[0].dtype == torch.float32


def test_batch_norm_model_trains_on_a_batch_of_one() -> None:
    """Length-bucket batches can hold a single caption; BatchNorm must not crash on them."""
    model = CaptionModel(ModelConfig(vocab_size=20, feature_dim=8, embed_dim=8, hidden_dim=8, batch_norm=True))
    model.train()
    loss = model.loss(torch.randn(1, 8), torch.tensor([[1, 5, 6, 2]]))
    loss.backward()
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------- ensemble


@pytest.mark.parametrize("layers", [1, 2])
def test_ensemble_step_is_the_mean_of_its_members_distributions(layers):
    members = [make_model(seed, num_layers=layers) for seed in (1, 2, 3)]
    ensemble = Ensemble.of(members).eval()
    feats, tokens = torch.randn(5, 12), torch.tensor([1, 4, 5, 6, 7])
    with torch.no_grad():
        state = ensemble.init_state(feats)
        assert state[0].shape == (3 * layers, 5, 24)
        logprobs, state = ensemble.step(tokens, state)
        expected = []
        for m in members:
            logits, _ = m.step(tokens, m.init_state(feats))
            expected.append(F.softmax(logits, dim=-1))
    torch.testing.assert_close(logprobs.exp(), torch.stack(expected).mean(0))
    # one member's state, split back out of the stack, is that member's own
    with torch.no_grad():
        own = members[1].step(tokens, members[1].init_state(feats))[1]
    torch.testing.assert_close(state[0][layers:2 * layers], own[0])


def test_ensemble_of_identical_models_decodes_like_one():
    from showtell.decoding import DecodingOptions, decode

    model = make_model(4)
    feats = torch.randn(6, 12)
    with torch.no_grad():
        for beam in (1, 3):
            one = decode(model, feats, DecodingOptions(beam_size=beam, max_length=8))
            two = decode(Ensemble.of([model, model]).eval(), feats, DecodingOptions(beam_size=beam, max_length=8))
            assert [h[0].tokens for h in one] == [h[0].tokens for h in two]


def test_ensemble_members_must_share_a_config():
    with pytest.raises(ShowtellError, match="one model config"):
        Ensemble.of([make_model(0), make_model(0, hidden_dim=32)])
    with pytest.raises(ShowtellError, match="at least 2"):
        Ensemble(make_model(0).config, 1)


def test_image_dropout_defaults_to_the_dropout_rate():
    """Checkpoints from before image_dropout existed (no key) keep the image dropout they were trained with."""
    config = ModelConfig.from_dict({"vocab_size": 30, "feature_dim": 12, "dropout": 0.3})
    assert config.image_dropout is None and CaptionModel(config).image_drop.p == 0.3
    assert CaptionModel(ModelConfig(vocab_size=30, feature_dim=12, image_dropout=0.0)).image_drop.p == 0.0


def test_image_dropout_drops_only_the_image_input():
    """image_dropout acts on the projected image alone: with word/output dropout off, a training-mode model
    gives the eval-mode outputs only when the image dropout is off too."""
    feats, captions = torch.randn(4, 12), make_captions([3, 4, 5, 6])
    for image_dropout, same in ((0.0, True), (0.5, False)):
        model = make_model(5, image_dropout=image_dropout)
        with torch.no_grad():
            expected = model.eval()(feats, captions)
            got = model.train()(feats, captions)
        assert torch.allclose(got, expected) == same
