"""The masked editor (cfedit.image.editor) and its adversarial training (cfedit.image.masked_training),
on the synthetic squares world of test_mechanism.py: a 3x3 or 6x6 square in the red or green channel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfedit import load_graph
from cfedit.image import MaskedEditor, mechanism_from_config
from cfedit.image.losses import AttributeDiscriminator
from cfedit.image.masked_training import train_masked_editor
from cfedit.image.train import WeightAverage, _warm_start, lr_scale
from tests.image.test_mechanism import ItemsOnly, Squares

TINY = {"width": 8, "blocks": 1, "d_width": 8, "batch_size": 16, "d_warmup": 0}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_editor(seed: int = 0) -> MaskedEditor:
    torch.manual_seed(seed)
    return MaskedEditor(["color", "big"], [2, 2], channels=3, size=16, width=8, blocks=1).eval()


def test_the_null_edit_is_the_photo_exactly_and_other_edits_change_it():
    ds = Squares(12)
    e = tiny_editor()
    u = e.abduct(ds.images, ds.factors)
    assert u.shape == (12, e.u_dim) and e.u_dim == 3 * 16 * 16 + 4
    same = e.decode(ds.factors, u)
    assert np.array_equal((same * 255).round().astype(np.uint8), ds.images)
    flipped = ds.factors.copy()
    flipped[:, 0] = 1 - flipped[:, 0]
    other = e.decode(flipped, u)
    assert other.shape == (12, 3, 16, 16) and 0 <= other.min() and other.max() <= 1
    assert np.abs(other - ds.images / 255.0).mean() > 0  # an untrained editor still draws something
    masks = e.masks(ds.images, ds.factors, flipped)
    assert masks.shape == (12, 1, 16, 16) and (masks > 0).all() and (masks < 1).all()
    assert (e.masks(ds.images, ds.factors, ds.factors) == 0).all()


def test_an_edit_changes_the_photo_only_as_much_as_its_mask_allows():
    ds = Squares(8, seed=3)
    e = tiny_editor(1)
    flipped = ds.factors.copy()
    flipped[:, 1] = 1 - flipped[:, 1]
    x = ds.images / 255.0
    out = e.edit(ds.images, ds.factors, flipped)
    m = e.masks(ds.images, ds.factors, flipped)
    # edit = x + m (C - x) with C in [0, 1]: |edit - x| <= m * max(x, 1 - x) per pixel
    assert (np.abs(out - x) <= m * np.maximum(x, 1 - x) + 1e-5).all()


def test_the_editor_round_trips_its_config_and_refuses_bad_input():
    e = tiny_editor()
    again = mechanism_from_config(e.config())
    assert isinstance(again, MaskedEditor) and again.config() == e.config()
    again.load_state_dict(e.state_dict())
    ds = Squares(4)
    cf = 1 - ds.factors
    assert np.array_equal(again.edit(ds.images, ds.factors, cf), e.edit(ds.images, ds.factors, cf))
    with pytest.raises(ValueError, match="u must be"):
        e.decode(ds.factors, np.zeros((4, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="out of range"):
        e.abduct(ds.images, ds.factors + 5)
    with pytest.raises(ValueError, match="cannot sample"):
        e.sample(ds.factors)
    with pytest.raises(ValueError, match="unknown image mechanism kind"):
        mechanism_from_config({"kind": "diffusion"})


def test_the_discriminator_reads_realism_per_patch_and_every_factor():
    d = AttributeDiscriminator(3, 64, [2, 3, 2], width=8)
    adv, cls = d(torch.rand(5, 3, 64, 64))
    assert [a.shape for a in adv] == [(5, 16)] and [c.shape for c in cls] == [(5, 2), (5, 3), (5, 2)]
    torch.manual_seed(0)
    both = AttributeDiscriminator(3, 64, [2, 3, 2], width=8, local=True, project=True)
    x, v = torch.rand(5, 3, 64, 64), torch.tensor([[0, 2, 1]] * 5)
    adv, _ = both(x, v)
    assert [a.shape for a in adv] == [(5, 16), (5, 64)]  # the whole face in 4x4 patches, and 8x8 smaller ones
    # a local patch reads only its neighbourhood: a change in one corner leaves the far corner's score
    y = x.clone()
    y[:, :, :8, :8] = 1 - y[:, :, :8, :8]
    both.eval()
    with torch.no_grad():
        near, far = both(x, v)[0][1].reshape(5, 8, 8), both(y, v)[0][1].reshape(5, 8, 8)
    assert not torch.allclose(near[:, 0, 0], far[:, 0, 0]) and torch.allclose(near[:, 7, 7], far[:, 7, 7])


def test_training_resumes_exactly_from_inside_an_epoch():
    ds = Squares(96, seed=5)
    full, m_full = train_masked_editor(ds, ds.graph, epochs=2, seed=3, **TINY)
    saved = []

    class Stop(Exception):
        pass

    def on_epoch(state):
        saved.append(state)
        if state.get("batch") == 4 and state["epoch"] == 1:  # inside the second epoch, after 4 batches
            raise Stop

    with pytest.raises(Stop):
        train_masked_editor(ds, ds.graph, epochs=2, seed=3, on_epoch=on_epoch, save_every=2, **TINY)
    assert saved[-1]["epoch"] == 1 and saved[-1]["batch"] == 4
    resumed, m_res = train_masked_editor(ds, ds.graph, epochs=2, seed=3, state=saved[-1], save_every=2, **TINY)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert m_res["steps"] == m_full["steps"] == 12
    assert m_res["cycle"] == pytest.approx(m_full["cycle"], rel=1e-6)


def test_a_weight_average_closes_half_the_gap_to_a_still_model_in_its_half_life():
    model = torch.nn.Linear(3, 2)
    model.register_buffer("seen", torch.zeros(1))
    start = {k: t.clone() for k, t in model.state_dict().items()}
    average = WeightAverage.start(model, half_life=4)
    with torch.no_grad():
        model.weight.add_(1.0)
        model.seen.fill_(7.0)
    for _ in range(4):
        average.update(model)
    assert torch.allclose(average.weights["weight"], start["weight"] + 0.5, atol=1e-6)
    assert torch.equal(average.weights["bias"], start["bias"])  # a parameter that did not move
    assert average.weights["seen"].item() == 7.0  # buffers are copied, not averaged
    assert WeightAverage.start(model, half_life=0) is None
    with pytest.raises(ValueError, match="ema_half_life"):
        WeightAverage.start(model, half_life=-1)


def test_an_editor_trained_with_a_weight_average_returns_the_average_of_its_steps_and_resumes_it_exactly():
    ds = Squares(96, seed=5)
    torch.manual_seed(11)  # the weights the fit starts from (the shape TINY trains)
    init = MaskedEditor.for_graph(ds.graph, width=8, blocks=1, colour_pool=2, delta_bound=3.0, colour="luma",
                                  gate=0.5).state_dict()
    opts = dict(TINY, ema_half_life=3)
    steps = []
    full, _ = train_masked_editor(ds, ds.graph, epochs=2, seed=3, init=init, save_every=1,
                                  on_epoch=steps.append, **opts)
    assert [s["step"] for s in steps] == list(range(1, 13))
    # the recurrence by hand over the raw weights after every step, from the warm start's weights
    decay = 0.5 ** (1 / 3)
    expect = {k: t.clone() for k, t in init.items()}
    for s in steps:
        for k in expect:  # the region maps, a buffer, are copied
            expect[k] = s["model"][k] if k == "regions" else decay * expect[k] + (1 - decay) * s["model"][k]
    got, raw = full.state_dict(), steps[-1]["model"]
    for k, t in expect.items():
        assert torch.allclose(got[k], t, atol=1e-6), k
    assert not torch.allclose(got["head.weight"], raw["head.weight"])  # the average, not the last step
    # interrupted inside the second epoch and resumed: the same average, exactly
    resumed, _ = train_masked_editor(ds, ds.graph, epochs=2, seed=3, init=init, state=steps[8], **opts)
    for k, t in got.items():
        assert torch.equal(resumed.state_dict()[k], t), k


def test_the_learning_rate_stays_then_falls_linearly_over_the_last_epochs_or_on_a_cosine():
    # 60 steps of 10 per epoch, the last 3 epochs decaying: 1 through step 30, then (60 - step) / 30
    assert [lr_scale(s, 60, 10, {"lr_decay_epochs": 3}) for s in (0, 29, 30, 31, 45, 59)] == pytest.approx(
        [1, 1, 1, 29 / 30, 0.5, 1 / 30])
    assert lr_scale(0, 60, 10, {"lr_decay_epochs": 9}) == 1.0  # more epochs than the run: all of it decays
    assert lr_scale(59, 60, 10, {"lr_decay_epochs": 9}) == pytest.approx(1 / 60)
    assert lr_scale(59, 60, 10, {}) == lr_scale(59, 60, 10, {"lr_decay_epochs": 0}) == 1.0
    assert lr_scale(30, 60, 10, {"lr_decay": True}) == pytest.approx(0.5)  # the cosine at half way


def test_an_editor_trained_with_a_decaying_learning_rate_follows_it_step_by_step_and_resumes_exactly():
    ds = Squares(96, seed=5)
    opts = dict(TINY, lr=1e-3, save_every=1)
    steady, decayed = [], []
    train_masked_editor(ds, ds.graph, epochs=2, seed=3, on_epoch=steady.append, **opts)
    full, _ = train_masked_editor(ds, ds.graph, epochs=2, seed=3, on_epoch=decayed.append, lr_decay_epochs=1, **opts)
    # 12 steps of 6 per epoch: the first 7 (the last epoch's first one too) at the full rate, then 5/6 ... 1/6
    lrs = [s["optimizer"]["param_groups"][0]["lr"] for s in decayed[:12]]
    assert lrs == pytest.approx([1e-3] * 7 + [1e-3 * k / 6 for k in (5, 4, 3, 2, 1)])
    assert {s["optimizer"]["param_groups"][0]["lr"] for s in steady} == {1e-3}
    # the same run as the steady one until the decay begins, a different one after
    for k, t in steady[6]["model"].items():
        assert torch.equal(decayed[6]["model"][k], t), k
    assert not torch.equal(decayed[7]["model"]["head.weight"], steady[7]["model"]["head.weight"])
    # interrupted inside the decay and resumed: the same editor, exactly
    resumed, _ = train_masked_editor(ds, ds.graph, epochs=2, seed=3, state=decayed[8], lr_decay_epochs=1, **opts)
    for k, t in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], t), k


def test_unknown_training_options_are_refused():
    ds = Squares(16)
    with pytest.raises(TypeError, match="unknown training option"):
        train_masked_editor(ds, ds.graph, epochs=1, latent=4)


def test_a_pooled_bounded_colour_field_is_smooth_and_never_shifts_more_than_its_bound():
    torch.manual_seed(0)
    e = MaskedEditor(["color", "big"], [2, 2], channels=3, size=16, width=8, blocks=1, colour_pool=4,
                     delta_bound=0.5).eval()
    with torch.no_grad():
        e.head.weight.mul_(200.0)  # a wild head: without the bound its colour shift would saturate
        e.head.bias[-1] = 20.0  # mask fully on, so the edit is the colour layer itself
    x = torch.full((2, 3, 16, 16), 0.5)
    v = torch.tensor([[0, 0], [1, 1]])
    out, m = e(x, v, 1 - v)
    assert (m > 0.99).all()
    logit = torch.log(out) - torch.log1p(-out)  # = delta, as x is 0.5 everywhere
    assert logit.abs().max() <= 0.5 + 1e-4
    assert logit.abs().max() > 0.3  # the wild head does reach toward the bound
    # bilinear upsampling of a 4x4 field: neighbouring pixels differ by at most a quarter of the range
    assert (logit[..., 1:] - logit[..., :-1]).abs().max() <= 0.5 + 1e-4
    assert mechanism_from_config(e.config()).config() == e.config()
    with pytest.raises(ValueError, match="colour_pool"):
        MaskedEditor(["c"], [2], channels=3, size=16, colour_pool=3)


def test_a_warm_start_continues_from_the_given_weights_and_refuses_another_architecture():
    ds = Squares(32, seed=2)
    first, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=0, **TINY)
    again, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=0, init=first.state_dict(), **TINY)
    fresh, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=0, **TINY)
    w = "head.weight"
    # the same seed from scratch repeats the first run; started from its weights, the run moves on
    assert torch.equal(fresh.state_dict()[w], first.state_dict()[w])
    assert not torch.equal(again.state_dict()[w], first.state_dict()[w])
    assert (again.state_dict()[w] - first.state_dict()[w]).abs().max() < 0.05
    with pytest.raises(ValueError, match="another architecture"):  # narrower, or another depth
        train_masked_editor(ds, ds.graph, epochs=1, seed=0, init=first.state_dict(), **dict(TINY, width=6))
    with pytest.raises(ValueError, match="another architecture"):
        train_masked_editor(ds, ds.graph, epochs=1, seed=0, init=first.state_dict(), **dict(TINY, blocks=2))
    deeper, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=0, **dict(TINY, blocks=2))
    with pytest.raises(ValueError, match="another architecture"):  # its second block would be dropped
        train_masked_editor(ds, ds.graph, epochs=1, seed=0, init=deeper.state_dict(), **TINY)


@pytest.mark.parametrize("width, head_width", [(8, 16), (12, 8), (12, 20)])
def test_a_wider_editor_warm_started_from_a_narrower_one_draws_what_it_drew_and_its_new_channels_learn(
        width, head_width):
    ds = Squares(12, seed=3)
    narrow = tiny_editor(seed=4)
    with torch.no_grad():  # weights far from the initial ones, so that every old channel matters
        for p in narrow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    torch.manual_seed(5)
    wide = MaskedEditor(["color", "big"], [2, 2], channels=3, size=16, width=width, blocks=1,
                        head_width=head_width)
    _warm_start(wide, narrow.state_dict())
    wide.eval()
    flipped = ds.factors.copy()
    flipped[:, 1] = 1 - flipped[:, 1]
    a, b = narrow.masks(ds.images, ds.factors, flipped), wide.masks(ds.images, ds.factors, flipped)
    assert np.abs(a - b).max() < 1e-5 and a.std() > 0.01
    a, b = narrow.edit(ds.images, ds.factors, flipped), wide.edit(ds.images, ds.factors, flipped)
    assert np.abs(a - b).max() < 1e-5 and np.abs(a - ds.images / 255.0).mean() > 0.01
    # the old channels read none of the new ones, and the head's weights on the new channels learn
    assert (wide.head.weight[:, 8:head_width] == 0).all()
    x = torch.from_numpy(ds.images).float() / 255
    out, mask = wide.train()(x, torch.from_numpy(ds.factors), torch.from_numpy(flipped))
    (out.sum() + mask.sum()).backward()
    if head_width > 8:
        assert wide.head.weight.grad[:, 8:head_width].abs().sum() > 0
    else:
        assert wide.final[1].weight.grad[:, 8:12].abs().sum() > 0  # the trunk's new channels reach the head


def test_the_tone_colour_layer_lightens_darkens_or_grays_but_never_changes_a_hue():
    torch.manual_seed(0)
    e = MaskedEditor(["color", "big"], [2, 2], channels=3, size=16, width=8, blocks=1, colour="tone",
                     colour_pool=2, delta_bound=3.0).eval()
    with torch.no_grad():
        e.head.weight.mul_(100.0)
        e.head.bias[-1] = 20.0  # mask fully on: the edit is the colour layer
    v = torch.tensor([[0, 0], [1, 1]])
    gray = torch.rand(2, 1, 16, 16).expand(-1, 3, -1, -1).contiguous()
    out, _ = e(gray, v, 1 - v)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    assert (out - gray).abs().mean() > 0.05  # it does change the brightness
    red = torch.zeros(2, 3, 16, 16)
    red[:, 0] = 0.8
    red[:, 1:] = 0.1
    out, _ = e(red, v, 1 - v)
    assert (out[:, 0] >= out[:, 1] - 1e-6).all() and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)
    assert mechanism_from_config(e.config()).config() == e.config()
    with pytest.raises(ValueError, match="colour must be"):
        MaskedEditor(["c"], [2], channels=3, size=16, colour="hsv")


def test_the_luma_colour_layer_shifts_the_gray_and_keeps_or_removes_the_chroma_without_amplifying_it():
    x = torch.tensor([0.06, 0.10, 0.14]).reshape(1, 3, 1, 1).expand(1, 3, 4, 4).contiguous()  # dark, bluish
    gray = (x * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    zero, off, on = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), -30.0), torch.full((1, 1, 4, 4), 30.0)
    assert torch.allclose(MaskedEditor._luma_colour(x, zero, off), x, atol=1e-6)  # no shift, no desaturation
    lift = torch.full((1, 1, 4, 4), 2.5)
    lit = MaskedEditor._luma_colour(x, lift, off)
    new_gray = torch.sigmoid(torch.logit(gray) + 2.5)
    # brightened: the gray moves in logits, the chroma x - gray stays as it was (0.04 apart, not more)
    assert torch.allclose(lit - new_gray, x - gray, atol=1e-6)
    assert float(lit[0, 2, 0, 0] - lit[0, 0, 0, 0]) == pytest.approx(0.08, abs=1e-6)
    grayed = MaskedEditor._luma_colour(x, lift, on)  # fully desaturated: a neutral gray, all channels equal
    assert torch.allclose(grayed, new_gray.expand(1, 3, 4, 4), atol=1e-6)
    e = MaskedEditor(["c"], [2], channels=3, size=16, width=8, blocks=1, colour="luma", colour_pool=2,
                     delta_bound=3.0)
    assert mechanism_from_config(e.config()).config() == e.config() and e.config()["colour"] == "luma"


def test_a_warm_start_may_change_the_colour_mode_and_the_warm_up_trains_only_the_discriminator():
    ds = Squares(32, seed=2)
    rgb, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=0, **dict(TINY, colour="rgb"))
    tone, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=0, init=rgb.state_dict(),
                                  **dict(TINY, colour="tone", d_warmup=10_000))
    # all but the output layer come from the rgb editor and, in the warm-up, the editor does not move
    for k, t in tone.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(t, rgb.state_dict()[k]), k
    assert tone.state_dict()["head.weight"].shape[0] == 3 and rgb.state_dict()["head.weight"].shape[0] == 4


class Corners:
    """Images uint8 [n, 1, 16, 16]: factor a lights the top-left 4x4 corner, factor b (three values)
    the bottom-right one at brightness 0, 120 or 240; everything else is black."""

    def __init__(self, factors):
        self.factors = np.asarray(factors, dtype=np.int64)
        self.images = np.zeros((len(self.factors), 1, 16, 16), dtype=np.uint8)
        for i, (a, b) in enumerate(self.factors):
            self.images[i, 0, :4, :4] = 255 * a
            self.images[i, 0, -4:, -4:] = 120 * b

    def __len__(self):
        return len(self.factors)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i] / 255.0).float(), torch.from_numpy(self.factors[i])


def test_attribute_regions_are_where_photos_with_different_values_differ():
    from cfedit.image.masked_training import REGION_BLUR, attribute_regions

    ds = Corners([[0, 0], [1, 1], [0, 2], [1, 0], [0, 1], [1, 2]])
    r = attribute_regions(ds, [2, 3])
    assert r.shape == (2, 16, 16) and r.min() >= 0 and torch.allclose(r.amax((1, 2)), torch.ones(2))
    # a's map is the top-left corner only (spread by the blur), b's the bottom-right one
    far = REGION_BLUR // 2 + 4
    assert (r[0, :4, :4] > 0.3).all() and r[0, far:, :].abs().max() < 1e-6 and r[0, :, far:].abs().max() < 1e-6
    assert (r[1, -4:, -4:] > 0.3).all() and r[1, :-far, :].abs().max() < 1e-6 and r[1, :, :-far].abs().max() < 1e-6
    # the same from the generic item path, and a factor with one value seen gets no preference
    assert torch.allclose(attribute_regions(ItemsOnly(ds), [2, 3]), r, atol=1e-6)
    flat = attribute_regions(Corners([[0, 1], [1, 1]]), [2, 3])
    assert torch.equal(flat[1], torch.ones(16, 16))


def test_a_factors_region_holds_the_others_fixed():
    from cfedit.image.masked_training import attribute_regions

    # a and b go together in 5 of 6 photos: the mean photos of a = 0 and a = 1 differ in b's corner
    # too, but a's effect with b held fixed is its own corner only
    ds = Corners([[0, 0], [0, 0], [1, 2], [1, 2], [1, 1], [0, 1]])
    means = [ds.images[ds.factors[:, 0] == a].mean(0)[0] for a in (0, 1)]
    assert abs(means[1] - means[0])[-4:, -4:].min() > 50  # the raw difference leaks
    r = attribute_regions(ds, [2, 3])
    assert r[0, 8:, 8:].abs().max() < 1e-6 and (r[0, :4, :4] > 0.3).all()


def test_a_diffuse_region_is_replaced_by_the_union_of_the_focused_ones():
    from cfedit.image.masked_training import FLAT_REGION, focus_regions

    maps = torch.zeros(3, 10, 10)
    maps[0, :2, :2] = 1.0  # 4% of the picture
    maps[1, 8:, 5:] = 0.8  # 10%
    maps[2, :8] = 0.9  # 80%: diffuse
    out = focus_regions(maps, 0.5)
    assert torch.equal(out[:2], maps[:2]) and torch.equal(out[2], torch.maximum(maps[0], maps[1]))
    # with no focused factor at all, flat maps that leave any gate fully open
    flat = focus_regions(maps[2:], 0.8)
    assert torch.equal(flat, torch.full((1, 10, 10), 0.8)) and FLAT_REGION <= 0.8
    e = MaskedEditor(["a"], [2], channels=1, size=10, width=8, blocks=1, gate=0.8)
    e.set_regions(flat)
    assert (e.gate_map(torch.tensor([[True]])) == 1).all()


def test_a_diffuse_factor_leaves_out_the_regions_of_the_factors_it_must_not_draw():
    from cfedit.image.masked_training import focus_regions

    maps = torch.zeros(3, 10, 10)
    maps[0, :2] = 1.0  # hair: rows 0-1
    maps[1, 5:7] = 1.0  # mouth: rows 5-6 ...
    maps[1, 7] = 0.375  # ... and a half-open row under it (gate 0.5: open 0.5 there)
    maps[2, :8] = 0.9  # diffuse
    out = focus_regions(maps, 0.5, exclude=[1])
    assert torch.equal(out[:2], maps[:2])  # the focused factors keep their own maps
    expect = torch.maximum(maps[0], maps[1])
    expect[5:7] = 0.0  # closed where the mouth's gate is fully open ...
    expect[7] = 0.375 * 0.5  # ... and scaled by 1 - its opening where it is half open
    assert torch.allclose(out[2], expect)
    assert torch.equal(focus_regions(maps, 0.5, exclude=[]), focus_regions(maps, 0.5))


def test_the_gate_confines_an_edit_to_the_changed_factors_regions():
    e = MaskedEditor(["color", "big"], [2, 2], channels=3, size=16, width=8, blocks=1, gate=0.5).eval()
    regions = torch.zeros(2, 16, 16)
    regions[0, :8] = 1.0  # color lives in the top half
    regions[1, :, :4] = 0.375  # big in the left quarter, half open
    e.set_regions(regions)
    g = e.gate_map(torch.tensor([[True, False], [False, True], [True, True], [False, False]]))
    assert torch.equal(g[0, 0], regions[0]) and (g[1, 0, :, :4] == 0.5).all() and (g[1, 0, :, 4:] == 0).all()
    assert torch.equal(g[2, 0], torch.maximum(regions[0], g[1, 0])) and (g[3] == 0).all()
    ds = Squares(6, seed=2)
    cf = ds.factors.copy()
    cf[:, 0] = 1 - cf[:, 0]
    out = e.edit(ds.images, ds.factors, cf)
    x = ds.images / 255.0
    assert np.abs(out - x)[:, :, 8:].max() < 1e-6 < np.abs(out - x)[:, :, :8].max()
    # the gate and its maps go with the editor; bad maps are refused
    again = mechanism_from_config(e.config())
    again.load_state_dict(e.state_dict())
    assert again.config()["gate"] == 0.5 and np.array_equal(again.edit(ds.images, ds.factors, cf), out)
    with pytest.raises(ValueError, match="regions must be"):
        e.set_regions(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="no gate"):
        tiny_editor().set_regions(regions)


def test_a_gated_editor_trains_its_maps_from_the_data_and_warm_starts_from_an_ungated_one():
    from cfedit.image.masked_training import attribute_regions, focus_regions

    ds = Squares(64, seed=4)
    plain, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=1, gate=0.0, **TINY)
    gated, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=1, gate=0.5, init=plain.state_dict(), **TINY)
    assert gated.gate == 0.5
    assert torch.allclose(gated.regions, focus_regions(attribute_regions(ds, [2, 2]), 0.5))


def test_a_trained_editor_keeps_a_diffuse_factor_out_of_the_excluded_regions():
    from cfedit.image.masked_training import attribute_regions, focus_regions

    ds = Squares(64, seed=4)
    e, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=1, gate=0.5, diffuse_exclude=["color"], **TINY)
    maps = attribute_regions(ds, [2, 2])
    assert torch.allclose(e.regions, focus_regions(maps, 0.5, exclude=[0]))
    assert not torch.allclose(e.regions, focus_regions(maps, 0.5))  # here both factors are diffuse
    with pytest.raises(ValueError, match="diffuse_exclude names 'colour', which is no variable"):
        train_masked_editor(ds, ds.graph, epochs=1, seed=1, gate=0.5, diffuse_exclude=["colour"], **TINY)
    with pytest.raises(ValueError, match="must be a list of variable names"):
        train_masked_editor(ds, ds.graph, epochs=1, seed=1, gate=0.5, diffuse_exclude="color", **TINY)


def test_an_editor_trains_with_its_heads_balanced_within_strata(monkeypatch):
    import cfedit.image.masked_training as mt

    seen = []
    real = mt.head_weights
    monkeypatch.setattr(mt, "MIN_STRATUM", 1)
    monkeypatch.setattr(mt, "head_weights", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    ds = Squares(64, seed=4)
    editor, metrics = train_masked_editor(ds, ds.graph, epochs=1, seed=1, cls_strata=True, **TINY)
    assert seen[0].strata == [(), (0,)]  # big is balanced within color, its parent
    assert seen[0].table(1).shape == (2, 2) and bool((seen[0].table(1) > 0).all())
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))


def test_head_weights_weigh_a_value_by_its_rarity_up_to_the_cap():
    from cfedit.image.masked_training import BALANCE_CAP, head_weights

    # a: 3 of 4 photos have 0; b: value 2 never occurs, value 1 once in 4
    w = head_weights(Corners([[0, 0], [0, 0], [0, 1], [1, 0]]), [2, 3])
    assert torch.allclose(w.table(0), torch.tensor([[1 / (2 * 0.75), 1 / (2 * 0.25)]]))
    assert torch.allclose(w.table(1), torch.tensor([[1 / (2 * 0.75), 1 / (2 * 0.25), BALANCE_CAP]]))


def test_head_weights_balance_each_value_within_its_strata_and_drop_a_stratum_too_rare_to_balance():
    from cfedit.image.masked_training import BALANCE_CAP, MIN_STRATUM, head_weights

    assert MIN_STRATUM == 50
    rows = [[0, 0]] * 100 + [[0, 1]] * 100 + [[1, 0]] * 60 + [[1, 1]] * 10
    w = head_weights(Corners(rows), [2, 3], strata=[(1,), (0,)])
    # b within a: a = 0 holds 100 and 100 (b = 2 is in no photo: the cap); a = 1 has only 10 of b = 1
    assert torch.allclose(w.table(1), torch.tensor([[1.0, 1.0, BALANCE_CAP], [0.0, 0.0, 0.0]]))
    # a within b: b = 0 holds 100 and 60 of a; b = 1 has 10 of a = 1, b = 2 no photo at all
    assert torch.allclose(w.table(0), torch.tensor([[160 / 200, 160 / 120], [0.0, 0.0], [0.0, 0.0]]))
    # every kept stratum keeps its photos' total weight
    v = torch.tensor(rows)
    kept = v[:, 1] == 0
    assert torch.isclose(w(0, v)[kept].sum(), torch.tensor(160.0))
    assert torch.isclose(w(1, v)[v[:, 0] == 0].sum(), torch.tensor(200.0))
    # a factor whose every stratum is too rare falls back to one stratum of all photos
    few = head_weights(Corners([[0, 0], [0, 1], [1, 0], [1, 1]]), [2, 3], strata=[(1,), (0,)])
    assert torch.allclose(few.table(0), torch.ones(3, 2))
    assert torch.allclose(few(0, torch.tensor([[1, 2]])), torch.tensor([1.0]))


def test_the_weighted_attribute_loss_is_the_class_weighted_cross_entropy_without_strata():
    from torch.nn import functional as F

    from cfedit.image.losses import HeadWeights, _ce

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(8, 2, generator=g), torch.randn(8, 3, generator=g)]
    v = torch.stack([torch.randint(0, 2, (8,), generator=g), torch.randint(0, 3, (8,), generator=g)], 1)
    tables = [torch.tensor([[0.5, 2.0]]), torch.tensor([[1.0, 3.0, 0.25]])]
    weights = HeadWeights([2, 3], [(), ()], tables)
    expected = sum(F.cross_entropy(lg, v[:, j], weight=tables[j][0]) for j, lg in enumerate(logits))
    assert torch.isclose(_ce(logits, v, weights), expected)
    # a batch in which no photo counts for a factor adds nothing for it
    none = HeadWeights([2, 3], [(1,), ()], [torch.zeros(3, 2), tables[1]])
    assert torch.isclose(_ce(logits, v, none), F.cross_entropy(logits[1], v[:, 1], weight=tables[1][0]))
    with pytest.raises(ValueError, match="does not fit its strata"):
        HeadWeights([2, 3], [(1,), ()], [torch.zeros(2, 2), tables[1]])


def test_attribute_heads_are_balanced_within_parents_and_confounded_factors():
    from cfedit.image.masked_training import balance_strata

    g = load_graph("celeba")
    strata = dict(zip(g.names, balance_strata(g)))
    named = {n: {g.names[i] for i in s} for n, s in strata.items()}
    assert named["gray_hair"] == {"age", "gender"}
    assert named["eyeglasses"] == {"gender", "age"} and named["smiling"] == {"gender", "age"}
    assert named["age"] == {"gender", "eyeglasses", "smiling"} and named["beard"] == {"gender"}


def test_the_mask_costs_less_inside_the_changed_factors_regions():
    from cfedit.image.losses import MaskedGANLoss
    from cfedit.image.masked_training import MASKED_DEFAULTS

    e = MaskedEditor(["a", "b"], [2, 3], channels=1, size=16, width=8, blocks=1)
    regions = torch.zeros(2, 16, 16)
    regions[0, :4, :4] = 1.0
    regions[1, -4:, -4:] = 0.5
    loss = MaskedGANLoss(e, AttributeDiscriminator(1, 16, [2, 3], width=8), {**MASKED_DEFAULTS, "region": 4.0},
                         regions=regions)
    v = torch.tensor([[0, 0], [0, 0], [0, 0]])
    v_new = torch.tensor([[0, 0], [1, 0], [1, 2]])
    price = loss.mask_price(v, v_new)
    assert price.shape == (3, 1, 16, 16)
    assert (price[0] == 5.0).all()  # nothing changes: every masked pixel at the full price
    assert (price[1, 0, :4, :4] == 1.0).all() and (price[1, 0, 4:, 4:] == 5.0).all()
    assert (price[2, 0, :4, :4] == 1.0).all() and (price[2, 0, -4:, -4:] == 3.0).all()  # the union
    assert MaskedGANLoss(e, AttributeDiscriminator(1, 16, [2, 3], width=8), MASKED_DEFAULTS).mask_price(v, v_new) == 1.0


def test_the_sparsity_term_prices_the_mask_or_the_change_itself():
    from cfedit.image.losses import MaskedGANLoss
    from cfedit.image.masked_training import MASKED_DEFAULTS

    torch.manual_seed(0)
    e = MaskedEditor(["a", "b"], [2, 3], channels=3, size=16, width=8, blocks=1, colour="luma")
    with torch.no_grad():
        e.head.bias[-1] = 0.0  # a mask of about 0.5, so the mask and the change differ by far
    regions = torch.rand(2, 16, 16)
    x, v, v_new = torch.rand(4, 3, 16, 16), torch.tensor([[0, 0]] * 4), torch.tensor([[1, 0], [0, 2], [1, 1], [0, 0]])
    terms = {}
    for sparsity in ("mask", "change"):
        loss = MaskedGANLoss(e, AttributeDiscriminator(3, 16, [2, 3], width=8),
                             {**MASKED_DEFAULTS, "sparsity": sparsity}, regions=regions)
        terms[sparsity] = loss(x, v, v_new)["mask"]
        price = loss.mask_price(v, v_new)
    edited, m = e(x, v, v_new)
    back, m2 = e(edited, v_new, v)
    cost = {"mask": (m, m2), "change": ((edited - x).abs().mean(1, keepdim=True), (back - edited).abs().mean(1, keepdim=True))}
    for sparsity, (c1, c2) in cost.items():
        assert torch.allclose(terms[sparsity], 0.5 * ((price * c1).mean() + (price * c2).mean()))
    assert terms["change"] < terms["mask"]  # |edit - photo| <= mask * |colour - photo| <= mask
    with pytest.raises(ValueError, match="sparsity"):
        MaskedGANLoss(e, AttributeDiscriminator(3, 16, [2, 3], width=8), {**MASKED_DEFAULTS, "sparsity": "l2"})


def test_a_projection_discriminator_judges_realism_given_the_factors_and_an_editor_trains_against_it():
    torch.manual_seed(0)
    plain = AttributeDiscriminator(3, 32, [2, 3], width=8)
    projected = AttributeDiscriminator(3, 32, [2, 3], width=8, project=True)
    x = torch.rand(4, 3, 32, 32)
    a, b = torch.tensor([[0, 1]] * 4), torch.tensor([[0, 2]] * 4)
    with torch.no_grad():
        for _ in range(20):  # let the spectral norms' power iterations settle, then read in eval mode
            plain(x, a), projected(x, a)
    plain.eval(), projected.eval()
    with torch.no_grad():
        assert torch.equal(plain(x, a)[0][0], plain(x, b)[0][0])  # without projection the factors are not read
        (same,), (other,) = projected(x, a)[0], projected(x, b)[0]
        assert same.shape == (4, 16) and not torch.allclose(same, other)
        # the projection adds <embed(a0) + embed(a1), h> to the plain patch score: linear in the embeddings
        h = projected.body(x * 2 - 1)
        e = projected.embed.weight  # spectrally normalised, as the forward reads it in eval mode
        diff = ((e[2 + 1] - e[2 + 2])[None, :, None, None] * h).sum(1).flatten(1)
        assert torch.allclose(same - other, diff, atol=1e-5)
        assert torch.allclose(projected(x, a)[1][1], projected(x, b)[1][1])  # attribute heads do not read v
    with pytest.raises(ValueError, match="factors"):
        projected(x)
    ds = Squares(64, seed=4)
    editor, metrics = train_masked_editor(ds, ds.graph, epochs=1, seed=1, d_project=True, d_local=True, **TINY)
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float))
    again, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=1, d_project=True, d_local=True, **TINY)
    assert all(torch.equal(p, q) for p, q in zip(editor.state_dict().values(), again.state_dict().values()))


def test_the_keep_term_is_the_keepers_divergence_on_the_factors_the_target_keeps():
    from cfedit.image.labeller import Labeller
    from cfedit.image.losses import MaskedGANLoss
    from cfedit.image.masked_training import MASKED_DEFAULTS

    torch.manual_seed(0)
    e = MaskedEditor(["a", "b"], [2, 3], channels=3, size=16, width=8, blocks=1)
    keeper = Labeller(["a", "b"], [2, 3], channels=3, size=16, width=4, hidden=16)
    loss = MaskedGANLoss(e, AttributeDiscriminator(3, 16, [2, 3], width=8), {**MASKED_DEFAULTS, "keep": 2.0},
                         keeper=keeper)
    x = torch.rand(4, 3, 16, 16)
    v, v_new = torch.tensor([[0, 0]] * 4), torch.tensor([[1, 0], [0, 2], [1, 1], [0, 0]])
    assert loss.keep_loss(x, x, v, v_new) == 0  # an edit that reads exactly like its photo
    y = torch.rand(4, 3, 16, 16)
    p, q = [lg.log_softmax(1) for lg in keeper(x)], [lg.log_softmax(1) for lg in keeper(y)]
    kl = [(pj.exp() * (pj - qj)).sum(1) for pj, qj in zip(p, q)]
    # factor a is kept by rows 1 and 3, factor b by rows 0 and 3: a changed factor is not priced
    by_hand = (kl[0][1] + kl[0][3]) / 2 + (kl[1][0] + kl[1][3]) / 2
    assert torch.allclose(loss.keep_loss(x, y, v, v_new), by_hand)
    assert torch.allclose(loss.keep_loss(x, y, v, v), sum(k.mean() for k in kl))
    out = loss(x, v, v_new)
    assert "keep" in out and out["keep"] >= 0
    assert not any(p.requires_grad for p in loss.keeper.parameters())  # frozen: only the editor answers for it
    assert all(p.requires_grad for p in keeper.parameters())  # a copy: the caller's labeller is left alone
    with pytest.raises(ValueError, match="labeller"):
        MaskedGANLoss(e, AttributeDiscriminator(3, 16, [2, 3], width=8), {**MASKED_DEFAULTS, "keep": 1.0})
    off = MaskedGANLoss(e, AttributeDiscriminator(3, 16, [2, 3], width=8), MASKED_DEFAULTS, keeper=keeper)
    assert off.keeper is None and "keep" not in off(x, v, v_new)  # keep 0: the labeller is not read


def test_an_editor_trains_against_its_keeper_without_moving_it_and_reproducibly():
    from cfedit.image import train_labeller
    from tests.image.test_mechanism import TINY_LAB

    ds = Squares(64, seed=4)
    lab, _ = train_labeller(ds, ds.graph, epochs=1, seed=0, batch_size=32, **TINY_LAB)
    before = {k: t.clone() for k, t in lab.state_dict().items()}
    editor, metrics = train_masked_editor(ds, ds.graph, epochs=1, seed=1, keep=1.0, labeller=lab, **TINY)
    assert np.isfinite(metrics["loss"])
    assert all(torch.equal(t, lab.state_dict()[k]) for k, t in before.items())  # the keeper is a frozen copy
    again, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=1, keep=1.0, labeller=lab, **TINY)
    assert all(torch.equal(p, q) for p, q in zip(editor.state_dict().values(), again.state_dict().values()))
    plain, _ = train_masked_editor(ds, ds.graph, epochs=1, seed=1, labeller=lab, **TINY)
    assert not all(torch.equal(p, q) for p, q in zip(editor.state_dict().values(), plain.state_dict().values()))
    with pytest.raises(ValueError, match="labeller"):
        train_masked_editor(ds, ds.graph, epochs=1, seed=1, keep=1.0, **TINY)
