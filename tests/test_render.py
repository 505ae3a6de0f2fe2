"""Activation maximization: parameterization, objectives, quality against natural images, determinism."""
import numpy as np
import pytest
import torch

from neurolens.optvis import objectives
from neurolens.activations.hooks import forward_to, hook_count
from neurolens.models.layer_table import resolve_layer
from neurolens.optvis.param import FourierImage
from neurolens.optvis.loop import evaluate, render
from neurolens.types import RenderSettings

LAYER = "image_block_4_0"
QUICK = RenderSettings(steps=128, lr=0.2, seeds=(0,))


def test_fourier_image_matches_lucent():
    """Our batched parameterization computes lucent's fft_image + decorrelated to_valid_rgb exactly."""
    from lucent.optvis.param.color import to_valid_rgb
    from lucent.optvis.param.spatial import fft_image

    torch.manual_seed(3)
    (spectrum,), image_f = fft_image((2, 3, 48, 48))
    lucent_images = to_valid_rgb(image_f, decorrelate=True)()
    ours = FourierImage([0, 1], 48, 48)
    with torch.no_grad():
        ours.spectrum.copy_(spectrum.detach().cpu())
    assert torch.allclose(ours(), lucent_images.detach().cpu(), atol=1e-6)


def test_fourier_image_seeds_are_independent_of_batch():
    alone = FourierImage([7], 32, 32)()
    together = FourierImage([1, 7], 32, 32)()
    assert torch.equal(alone[0], together[1])


def _optimize(clip, objective, layer_names, steps=12, batch=2):
    specs = [resolve_layer(clip, name) for name in layer_names]
    param = FourierImage(list(range(batch)), 64, 64)
    optimizer = torch.optim.Adam(param.parameters(), lr=0.1)

    def value():
        return objective(forward_to(clip.model, clip.normalize(param()), specs))

    before = value().detach()
    for _ in range(steps):
        optimizer.zero_grad()
        (-value().sum()).backward()
        optimizer.step()
    return before, value().detach()


@pytest.mark.parametrize("factory", [objectives.channel, objectives.neuron])
def test_unit_objectives_increase(tiny_clip, factory):
    before, after = _optimize(tiny_clip, factory(LAYER, [3, 10]), [LAYER])
    assert torch.all(after > before)


def test_direction_objective_increases(tiny_clip):
    direction = torch.randn(512, generator=torch.Generator().manual_seed(0))
    before, after = _optimize(tiny_clip, objectives.direction(LAYER, direction), [LAYER])
    assert torch.all(after > before)


def test_diversity_objective_increases(tiny_clip):
    before, after = _optimize(tiny_clip, objectives.diversity("image_block_3_0", [0, 0, 0]), ["image_block_3_0"],
                              batch=3)
    assert after.mean() > before.mean()


def test_objectives_compose(tiny_clip):
    spec = resolve_layer(tiny_clip, LAYER)
    acts = forward_to(tiny_clip.model, torch.rand(2, 3, 64, 64), [spec])
    combined = objectives.channel(LAYER, 3) - 0.5 * objectives.neuron(LAYER, 3)
    expected = acts[LAYER][:, 3].mean((1, 2)) - 0.5 * acts[LAYER][:, 3, 1, 1]
    assert torch.allclose(combined(acts), expected)


@pytest.mark.parametrize("kind", ["channel", "neuron"])
def test_visualization_beats_natural_images_and_noise(tiny_clip, natural_images, kind):
    spec = resolve_layer(tiny_clip, LAYER)
    units = [3, 10, 100]
    settings = RenderSettings(steps=QUICK.steps, lr=QUICK.lr, seeds=(0,), objective=kind)
    output = render(tiny_clip, spec, units, settings)
    noise = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for index, unit in enumerate(units):
        natural = evaluate(tiny_clip, spec, kind, [unit] * len(natural_images), natural_images)
        noisy = evaluate(tiny_clip, spec, kind, [unit] * len(noise), noise)
        assert output.activations[index] > natural.max().item(), (kind, unit)
        assert output.activations[index] > noisy.mean().item(), (kind, unit)
    # the saved activation is the objective of the saved (quantized) image
    saved = torch.from_numpy(output.images).permute(0, 3, 1, 2).float() / 255
    again = evaluate(tiny_clip, spec, kind, units, saved)
    assert np.allclose(again.numpy(), output.activations, rtol=0.05, atol=1e-5)
    assert hook_count(tiny_clip.model) == 0


def test_render_is_deterministic_and_batch_independent(tiny_clip):
    spec = resolve_layer(tiny_clip, LAYER)
    settings = RenderSettings(steps=8, seeds=(0, 1), diversity=0.0)
    first = render(tiny_clip, spec, [3, 10], settings)
    second = render(tiny_clip, spec, [3, 10], settings)
    alone = render(tiny_clip, spec, [10], settings)
    assert np.array_equal(first.images, second.images)
    assert np.abs(first.images[2:].astype(int) - alone.images.astype(int)).max() <= 1
    assert first.images.shape == (4, 64, 64, 3) and first.curve.shape == (8, 4)


def test_learning_rate_schedule_warms_up_holds_and_decays():
    from neurolens.optvis.loop import learning_rate
    settings = RenderSettings(steps=100, lr=0.5, lr_warmup=0.1, lr_decay_start=0.6, lr_final=0.2)
    rates = [learning_rate(settings, step) for step in range(100)]
    assert rates[0] == pytest.approx(0.5 / 11) and rates[9] == pytest.approx(0.5 * 10 / 11)
    assert all(rate == 0.5 for rate in rates[10:61])
    assert all(later < earlier for earlier, later in zip(rates[60:], rates[61:]))
    assert rates[-1] == pytest.approx(0.1)
    constant = RenderSettings(steps=50, lr=0.3, lr_warmup=0.0, lr_decay_start=1.0)
    assert {learning_rate(constant, step) for step in range(50)} == {0.3}


def test_low_resolution_steps_only_where_the_layer_keeps_a_grid(tiny_clip):
    """tiny RN at 64 px: image_block_2_0 is 8x8 (4x4 at 32 px: low-resolution steps run), image_block_4_0 is
    2x2 (1x1 at half size: skipped, every step at full size)."""
    from neurolens.optvis.loop import low_res_size
    assert low_res_size(tiny_clip, resolve_layer(tiny_clip, "image_block_2_0"), 64, 0.5) == 32
    assert low_res_size(tiny_clip, resolve_layer(tiny_clip, "image_block_4_0"), 64, 0.5) == 0
    for layer, low_steps in [("image_block_2_0", 3), ("image_block_4_0", 0)]:
        sizes = []
        handle = tiny_clip.model.visual.conv1.register_forward_hook(lambda m, a, out: sizes.append(out.shape[-1]))
        try:
            render(tiny_clip, resolve_layer(tiny_clip, layer), [3],
                   RenderSettings(steps=6, low_res_fraction=0.5, low_res_scale=0.5))
        finally:
            handle.remove()
        steps = sizes[:6]  # the final evaluation adds one full-size forward
        assert steps == [16] * low_steps + [32] * (6 - low_steps), layer


def test_quality_presets():
    from neurolens.errors import NeurolensError
    from neurolens.types import quality_settings
    assert quality_settings("fast") == RenderSettings()
    microscope = quality_settings("microscope")
    assert microscope.steps == 4096 and len(microscope.seeds) >= 2 and microscope.diversity > 0
    assert microscope.lr == 0.05 and microscope.low_res_fraction == 0
    assert quality_settings("microscope", steps=3).steps == 3
    with pytest.raises(NeurolensError, match="unknown quality"):
        quality_settings("slow")


def test_keep_best_returns_the_best_checked_image_and_its_clean_activation(tiny_clip):
    """keep_best checks the clean objective every N steps; what is returned is the best of those checks, and
    its activation is the image's own (re-evaluated here), never below the last image's."""
    from neurolens.models.layer_table import resolve_layer
    from neurolens.optvis.loop import evaluate, render
    from neurolens.types import RenderSettings
    spec = resolve_layer(tiny_clip, "image_block_3_0")
    seen = []
    common = dict(steps=12, size=64, seeds=(0, 1), low_res_fraction=0.0, lr=2.0)
    last = render(tiny_clip, spec, [5], RenderSettings(keep_best=0, **common))
    kept = render(tiny_clip, spec, [5], RenderSettings(keep_best=4, **common),
                  on_step=lambda step, current: seen.append(evaluate(tiny_clip, spec, "channel", [5, 5], current())))
    checks = torch.stack([seen[3], seen[7], seen[11]])            # the states after steps 4, 8 and 12
    assert np.allclose(kept.activations, checks.max(0).values.numpy(), atol=1e-5)
    assert (kept.activations >= last.activations - 1e-5).all()
    again = evaluate(tiny_clip, spec, "channel", [5, 5], torch.from_numpy(kept.images).permute(0, 3, 1, 2).float() / 255)
    assert np.allclose(again.numpy(), kept.activations, atol=0.05 * np.abs(kept.activations).max() + 1e-3)


def test_short_budgets_keep_their_last_64_steps_at_full_size(tiny_clip, tmp_path):
    """The budget rule: the low-resolution share leaves at least 64 steps at full size. The default 256 steps are
    not touched (same settings, same cache key); a 64-step run takes every step at full size, a 128-step run
    half; the record of a bound run names the share it used."""
    from neurolens.pipelines.visualize import resolved_settings, run_visualize
    from neurolens.storage.cache import Cache
    from neurolens.types import budget_settings, quality_settings
    assert budget_settings(RenderSettings()) == RenderSettings()
    assert budget_settings(quality_settings("microscope")) == quality_settings("microscope")
    low_steps = {steps: round(steps * budget_settings(RenderSettings(steps=steps)).low_res_fraction)
                 for steps in (16, 64, 100, 128, 160, 256, 1000)}
    assert low_steps == {16: 0, 64: 0, 100: 36, 128: 64, 160: 96, 256: 154, 1000: 600}
    bound = budget_settings(RenderSettings(steps=128, lr=0.3, keep_best=4))
    assert (bound.lr, bound.keep_best, bound.steps) == (0.3, 4, 128)          # only the low-resolution share
    assert bound.lr_decay_start == RenderSettings().lr_decay_start < 1.0      # 128 steps still decay
    decays = {steps: budget_settings(RenderSettings(steps=steps)).lr_decay_start for steps in (16, 64, 65, 256)}
    assert decays == {16: 1.0, 64: 1.0, 65: 0.75, 256: 0.75}                # 64 steps or fewer: no decay
    assert resolved_settings(tiny_clip, RenderSettings(steps=64)).low_res_fraction == 0.0
    # through the job: no low-resolution forward in a short run of a layer that has a low-resolution phase
    sizes = []
    handle = tiny_clip.model.visual.conv1.register_forward_hook(lambda m, a, out: sizes.append(out.shape[-1]))
    try:
        [result] = run_visualize(tiny_clip, "image_block_2_0", [3], RenderSettings(steps=6), cache=Cache(tmp_path))
    finally:
        handle.remove()
    assert set(sizes) == {32} and result.settings.low_res_fraction == 0.0
