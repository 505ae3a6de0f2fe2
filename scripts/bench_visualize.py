"""Benchmark: neurolens' feature visualization against torch-lucent's render_vis, same model/layer/unit/size/seed.

Prints one JSON line: lucent_s, neurolens_s, lucent_activation, neurolens_activation,
time_to_lucent_activation_s, speedup (= lucent_s / time_to_lucent_activation_s), and the settings.

Both optimize the same objective: the mean over positions of the unit's channel at the layer (for
image_block_4_5: the pre-ReLU residual sum), on the same CLIP-normalized input, with the forward stopped
after the layer. Activations are always measured the same way: the objective of the final image, fp32,
full size, no transforms. lucent runs with its usual render_vis settings: param.image(size) (Fourier,
decorrelated colour), transform.standard_transforms, Adam lr 0.05, `--lucent-steps` steps.
neurolens' time to lucent's activation counts only optimization time: the clean-image evaluations made
every `--eval-every` steps to find that moment are excluded from the clock.

Example:  python scripts/bench_visualize.py --model RN50x4 --layer image_block_4_5 --unit 1543
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from neurolens.hooks import forward_to  # noqa: E402
from neurolens.models import load_clip, resolve_layer  # noqa: E402
from neurolens.render import evaluate, render  # noqa: E402
from neurolens.types import RenderSettings  # noqa: E402


class StopAtLayer(torch.nn.Module):
    """What lucent optimizes: CLIP-normalize, run to the layer, keep its activation for the objective."""

    def __init__(self, clip, spec):
        super().__init__()
        self.clip, self.spec, self.inner, self.last = clip, spec, clip.model, None

    def forward(self, images):
        self.last = forward_to(self.clip.model, self.clip.normalize(images), [self.spec])[self.spec.name]
        return self.last


def remove_all_hooks(model: torch.nn.Module) -> None:
    """lucent's render_vis leaves a forward hook on every module; clear them before neurolens runs."""
    for module in model.modules():
        module._forward_hooks.clear()


def run_lucent(clip, spec, unit, size, steps, seed):
    try:
        from lucent.optvis import objectives, param, render as lucent_render, transform
    except ImportError:
        raise SystemExit("this benchmark compares against torch-lucent: pip install 'neurolens[lucent]'") from None

    wrapper = StopAtLayer(clip, spec).eval()
    objective = objectives.Objective(lambda hook: -wrapper.last[:, unit].mean())
    torch.manual_seed(seed)
    started = time.perf_counter()
    images = lucent_render.render_vis(
        wrapper, objective, param_f=lambda: param.image(size), transforms=transform.standard_transforms,
        thresholds=(steps,), preprocess=False, show_image=False, progress=False, fixed_image_size=size)
    seconds = time.perf_counter() - started
    remove_all_hooks(clip.model)
    final = torch.from_numpy(images[-1]).permute(0, 3, 1, 2).to(clip.device)
    return seconds, float(evaluate(clip, spec, "channel", [unit], final)[0])


def run_neurolens(clip, spec, unit, settings, target, eval_every):
    excluded = [0.0]
    reached = [None]
    started = time.perf_counter()

    def on_step(step, current_images):
        if (step + 1) % eval_every and step + 1 != settings.steps:
            return
        pause = time.perf_counter()
        value = float(evaluate(clip, spec, "channel", [unit], current_images())[0])
        if reached[0] is None and value >= target:
            reached[0] = pause - started - excluded[0]
        excluded[0] += time.perf_counter() - pause

    output = render(clip, spec, [unit], settings, on_step=on_step)
    seconds = time.perf_counter() - started - excluded[0]
    return seconds, float(output.activations[0]), reached[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="RN50x4")
    parser.add_argument("--layer", default="image_block_4_5")
    parser.add_argument("--unit", type=int, default=1543)
    parser.add_argument("--size", type=int, default=0, help="0: the model's input size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lucent-steps", type=int, default=512)
    parser.add_argument("--steps", type=int, default=None, help="neurolens steps (default: its default)")
    parser.add_argument("--lr", type=float, default=None, help="neurolens lr (default: its default)")
    parser.add_argument("--low-res-fraction", type=float, default=None)
    parser.add_argument("--eval-every", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    clip = load_clip(args.model, "none", device=args.device)
    spec = resolve_layer(clip, args.layer)
    size = args.size or clip.image_size
    defaults = RenderSettings()
    settings = RenderSettings(steps=args.steps or defaults.steps, size=size, seeds=(args.seed,),
                              precision=args.precision, lr=args.lr or defaults.lr,
                              low_res_fraction=defaults.low_res_fraction if args.low_res_fraction is None
                              else args.low_res_fraction)
    lucent_s, lucent_activation = run_lucent(clip, spec, args.unit, size, args.lucent_steps, args.seed)
    neurolens_s, neurolens_activation, reached_s = run_neurolens(clip, spec, args.unit, settings,
                                                                 lucent_activation, args.eval_every)
    print(json.dumps({
        "lucent_s": round(lucent_s, 2),
        "neurolens_s": round(neurolens_s, 2),
        "lucent_activation": round(lucent_activation, 4),
        "neurolens_activation": round(neurolens_activation, 4),
        "time_to_lucent_activation_s": None if reached_s is None else round(reached_s, 2),
        "speedup": None if reached_s is None else round(lucent_s / reached_s, 2),
        "model": args.model, "layer": spec.name, "unit": args.unit, "size": size, "seed": args.seed,
        "lucent_steps": args.lucent_steps, "neurolens_steps": settings.steps, "neurolens_lr": settings.lr,
        "low_res_fraction": settings.low_res_fraction, "precision": settings.precision,
        "device": str(clip.device), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
