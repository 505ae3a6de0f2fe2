"""Options that several commands share, each defined once.

Single options are `Annotated` aliases (`LayerOpt`, `CacheOpt`, `JsonOpt`, `NoBlurOpt`, ...). Options that
always travel together are an `OptionSet`: the command declares ONE parameter for the whole set, and
`@uses` puts the set's options in its place in the command line (and in --help) and hands the command the
object the set builds from them:

    @app.command("scan", short_help="...")
    @command
    @uses(model=MODEL, data=DATASET, loader=LOADER)
    def scan(layer: LayerOpt = "image_block_4_5", model: ModelChoice = None, data: DatasetChoice = None,
             loader: LoaderChoice = None, ...):
        clip = model.load(quiet=as_json)
        dataset = data.open()

A set's defaults can differ per command (`MODEL.with_defaults(pretrained="none")`), and an option can be
dropped (`DATASET.without("caption_column")`) or given another help text (`DATASET.replace(...)`).
"""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import typer
from typing_extensions import Annotated

from ..datasets.decode import DECODERS
from ..datasets.open import open_dataset
from ..errors import NeurolensError
from ..labels.lexicon import read_list
from ..models.names import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ..labels.concepts import BUILTIN, read_concept_set
from ..pipelines.settings import ConceptSettings, LabelSettings, SweepSettings
from ..scoring.flags import FlagRule
from ..types import RenderSettings

# ------------------------------------------------------------------------------------- single options

ModelOpt = Annotated[str, typer.Option("--model", help="Any open_clip model name (neurolens also ships nl-tiny-RN, "
                                                        "nl-tiny-ViT, nl-toy-RN).")]
PretrainedOpt = Annotated[str, typer.Option(
    "--pretrained",
    help="open_clip pretrained tag, or 'none' for random weights (seeded; a ResNet's BatchNorms are "
         "re-initialized to natural-image statistics, so activations are of order 1).")]
CheckpointOpt = Annotated[Optional[str], typer.Option(
    "--checkpoint", help="Local .pt/.bin/.safetensors weights (read with weights_only / safetensors). "
                         "A neurolens checkpoint carries its model config, so --model is not needed.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
CacheOpt = Annotated[Optional[str], typer.Option(
    "--cache", help="Folder of the HDF5 cache (default: $NEUROLENS_CACHE or outputs/cache).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of text and progress.")]
LayerOpt = Annotated[str, typer.Option("--layer", help="Layer name (see `neurolens layers`), alias, or dotted "
                                                       "module path, e.g. image_block_4_5.")]
DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="A folder of images (recursive), tar shard(s) (x.tar, a glob or shard-{000..009}.tar), or a "
                      "parquet/CSV file with an image-path column. Default: the built-in scikit-image samples.")]
ImageColumnOpt = Annotated[str, typer.Option("--image-column", help="Image-path column of a parquet/CSV dataset.")]
CaptionColumnOpt = Annotated[str, typer.Option("--caption-column", help="Caption column of a parquet/CSV dataset "
                                                                        "(optional).")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per forward (default 16 on CPU, 64 on "
                                                                       "GPU).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="DataLoader processes decoding images (default "
                                                                      "min(2, CPUs); 0 = in the main process).")]
DecodeOpt = Annotated[str, typer.Option(
    "--decode", help=f"How images are decoded ({', '.join(DECODERS)}): pil (PIL in the decode workers), torchvision "
                     "(JPEGs decoded in batches by torchvision.io.decode_jpeg, on the GPU with nvJPEG, and resized "
                     "with torch; other images by PIL), auto (torchvision on a GPU, pil on the CPU). Named in the "
                     "cache key unless pil.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32 or bf16 (autocast) for the forward.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Top images kept per unit by the scan.")]
NoBlurOpt = Annotated[bool, typer.Option(
    "--no-blur", help="Write RAW pixels, nothing blurred (may show NSFW content). Raw files get a _noblur suffix "
                      "and never replace a blurred one. Without it, neurolens.labels.policy decides what is blurred.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even if the cache has this result.")]
SaeOpt = Annotated[Optional[str], typer.Option(
    "--sae", help="Work on the features of this sparse autoencoder instead of the layer's neurons (--unit is then a "
                  "feature): a name from `neurolens sae train` / `neurolens sae list`, or an SAE folder made "
                  "elsewhere (SAELens cfg.json + sae_weights.safetensors, or Prisma config.json + weights).")]


# ------------------------------------------------------------------------------------------ option sets

@dataclass(frozen=True)
class OptionSet:
    """Options a command receives as one object: `build(**values)` makes it from the parsed options.

    options: parameter name -> (Annotated type, default), in the order shown by --help."""
    build: Callable[..., Any]
    options: Tuple[Tuple[str, Any, Any], ...]

    @classmethod
    def of(cls, build: Callable[..., Any], **options: Tuple[Any, Any]) -> "OptionSet":
        return cls(build, tuple((name, kind, default) for name, (kind, default) in options.items()))

    def with_defaults(self, **defaults: Any) -> "OptionSet":
        self._check(defaults)
        return OptionSet(self.build, tuple((n, k, defaults.get(n, d)) for n, k, d in self.options))

    def replace(self, **options: Tuple[Any, Any]) -> "OptionSet":
        """The same set with some options declared anew: name=(Annotated type, default)."""
        self._check(options)
        return OptionSet(self.build, tuple((n,) + tuple(options[n]) if n in options else (n, k, d)
                                           for n, k, d in self.options))

    def without(self, *names: str) -> "OptionSet":
        """The set without these options (`build` then gets its own defaults for them)."""
        self._check(dict.fromkeys(names))
        return OptionSet(self.build, tuple(o for o in self.options if o[0] not in names))

    def _check(self, names) -> None:
        unknown = set(names) - {n for n, _, _ in self.options}
        if unknown:
            raise TypeError(f"not options of this set: {sorted(unknown)}")


def uses(**sets: OptionSet) -> Callable[[Callable], Callable]:
    """Decorator: each keyword names a parameter of the command that receives one OptionSet's object; on the
    command line (and in --help) that parameter is replaced by the set's options, in place."""
    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func, eval_str=True)
        taken = {name for name in signature.parameters if name not in sets}
        params = []
        for param in signature.parameters.values():
            if param.name not in sets:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))
                continue
            for name, kind, default in sets[param.name].options:
                if name in taken:
                    raise TypeError(f"{func.__name__}: option {name!r} of set {param.name!r} clashes with a parameter")
                taken.add(name)
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=kind))
        missing = set(sets) - set(signature.parameters)
        if missing:
            raise TypeError(f"{func.__name__} has no parameter {sorted(missing)} for its option sets")

        @functools.wraps(func)
        def wrapper(**values: Any) -> Any:
            for target, option_set in sets.items():
                built = option_set.build(**{name: values.pop(name) for name, _, _ in option_set.options})
                values[target] = built
            return func(**values)

        wrapper.__signature__ = signature.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper
    return decorate


# --------------------------------------------------------------------------------------------- the sets

@dataclass(frozen=True)
class ModelChoice:
    """--model/--pretrained/--checkpoint/--device: which weights to inspect, and where."""
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    checkpoint: Optional[str] = None
    device: str = "auto"

    def load(self, quiet: bool = False, cache: Optional[str] = None, card: bool = True):
        """The model (its notes, e.g. about random weights, go to stderr unless quiet). With `card`, the model
        card in `cache` (None: the default cache) answers without loading the model when the weights did not
        change: a LazyClip that loads the model on first use, with a note (neurolens.pipelines.model)."""
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if card:
            from ..pipelines.model import load_model  # lazy: torch only when a command loads a model
            announce = None if quiet else (lambda text: typer.echo(f"note: {text}", err=True))
            clip = load_model(model=self.model, pretrained=self.pretrained, checkpoint=self.checkpoint,
                              device=self.device, cache=cache, announce=announce)
        else:
            from ..models.build import load_clip  # lazy: torch and open_clip only when a command loads a model
            clip = load_clip(model=self.model, pretrained=self.pretrained, checkpoint=self.checkpoint,
                             device=self.device)
        if not quiet:
            for note in clip.notes:
                typer.echo(f"note: {note}", err=True)
        return clip


@dataclass(frozen=True)
class DatasetChoice:
    """--dataset/--image-column/--caption-column."""
    dataset: Optional[str] = None
    image_column: str = "image"
    caption_column: str = "caption"

    def open(self):
        """The ImageDataset (a bad path or table: one line, exit 2)."""
        return open_dataset(self.dataset, image_column=self.image_column, caption_column=self.caption_column)


@dataclass(frozen=True)
class LoaderChoice:
    """--batch-size/--workers/--decode: how images are fed to the model (None: the defaults for the device)."""
    batch_size: Optional[int] = None
    workers: Optional[int] = None
    decode: str = "auto"

    def __post_init__(self):
        if self.decode not in DECODERS:
            raise NeurolensError(f"unknown --decode {self.decode!r}; use {', '.join(DECODERS)}")


EngineOpt = Annotated[str, typer.Option("--engine", help="process: scan in this process (DataLoader workers "
                                        "decode); ray: on Ray Data (decode tasks, a model actor pool, a GPU per "
                                        "actor where there are GPUs), resumable shard by shard. Needs "
                                        "`pip install neurolens[ray]`.")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="With --engine ray: the Ray cluster "
                                                      "to join (e.g. ray://head:10001 or auto); default: start a "
                                                      "local Ray on loopback and stop it afterwards.")]
ActorsOpt = Annotated[int, typer.Option("--actors", help="With --engine ray: model actors (each loads the model "
                                                         "once; one GPU each where the cluster has GPUs).")]
GpusPerActorOpt = Annotated[Optional[float], typer.Option("--gpus-per-actor", help="With --engine ray: GPUs per "
                                                          "actor (default 1 where the cluster has GPUs, else 0).")]
CpusPerActorOpt = Annotated[float, typer.Option("--cpus-per-actor", help="With --engine ray: CPUs reserved per "
                                                "actor (also its torch threads); decode tasks use the rest.")]
ShardSizeOpt = Annotated[Optional[int], typer.Option("--shard-size", help="With --engine ray: items per shard when "
                                                     "a folder or table is cut into shards (default 10000; tar "
                                                     "shards are shards as they are).")]
KeepPerImageOpt = Annotated[bool, typer.Option("--keep-per-image", help="With --engine ray: also store every "
                                               "image's per-unit maxima (float16, one record per shard); without "
                                               "it nothing grows with the number of images but the item list.")]


@dataclass(frozen=True)
class EngineChoice:
    """--engine and the Ray engine's options."""
    engine: str = "process"
    ray_address: Optional[str] = None
    actors: int = 1
    gpus_per_actor: Optional[float] = None
    cpus_per_actor: float = 1.0
    shard_size: Optional[int] = None
    keep_per_image: bool = False

    @property
    def ray(self) -> bool:
        if self.engine not in ("process", "ray"):
            raise NeurolensError(f"unknown --engine {self.engine!r}; use process or ray")
        return self.engine == "ray"

    def ray_options(self, batch_size: Optional[int] = None):
        from ..engines.ray.session import RayOptions  # lazy: the Ray engine imports torch; --help must not
        sharding = {"shard_size": self.shard_size} if self.shard_size is not None else {}
        return RayOptions(address=self.ray_address, actors=self.actors, batch_size=batch_size,
                          gpus_per_actor=self.gpus_per_actor, cpus_per_actor=self.cpus_per_actor, **sharding)

    def check_process_only(self, **used: bool) -> None:
        """One line for options that only the in-process engine has (used: --option -> given)."""
        given = [name for name, value in used.items() if value]
        if self.ray and given:
            raise NeurolensError(f"{', '.join(given)} cannot be used with --engine ray; drop it or use "
                                 f"--engine process")
        if not self.ray and self.keep_per_image:
            raise NeurolensError("--keep-per-image is for scan --engine ray (the in-process scan always keeps "
                                 "per-image values)")


MODEL = OptionSet.of(ModelChoice, model=(ModelOpt, DEFAULT_MODEL), pretrained=(PretrainedOpt, DEFAULT_PRETRAINED),
                     checkpoint=(CheckpointOpt, None), device=(DeviceOpt, "auto"))
DATASET = OptionSet.of(DatasetChoice, dataset=(DatasetOpt, None), image_column=(ImageColumnOpt, "image"),
                       caption_column=(CaptionColumnOpt, "caption"))
LOADER = OptionSet.of(LoaderChoice, batch_size=(BatchOpt, None), workers=(WorkersOpt, None),
                      decode=(DecodeOpt, "auto"))
ENGINE = OptionSet.of(EngineChoice, engine=(EngineOpt, "process"), ray_address=(RayAddressOpt, None),
                      actors=(ActorsOpt, 1), gpus_per_actor=(GpusPerActorOpt, None),
                      cpus_per_actor=(CpusPerActorOpt, 1.0), shard_size=(ShardSizeOpt, None),
                      keep_per_image=(KeepPerImageOpt, False))


# ------------------------------------------------------------------------------- NSFW sweep and drawing

VocabOpt = Annotated[str, typer.Option("--vocab", help="Vocabulary for the unit texts: builtin, a .txt file (one "
                                       "entry a line), or file.parquet:column / file.csv:column.")]
SweepTopKOpt = Annotated[int, typer.Option("--top-k", help="Top images kept per unit by the scan (top_nsfw_share "
                                                           "counts them all).")]
TextTopKOpt = Annotated[int, typer.Option("--text-top-k", help="Top texts ranked per unit.")]
UnsafeOpt = Annotated[Optional[str], typer.Option("--unsafe-prompts", help="Text file of unsafe concept prompts "
                                                  "(default: neurolens/data/nsfw_prompts_unsafe.txt).")]
SafeOpt = Annotated[Optional[str], typer.Option("--safe-prompts", help="Text file of safe concept prompts "
                                                "(default: neurolens/data/nsfw_prompts_safe.txt).")]
TermsOpt = Annotated[Optional[str], typer.Option("--caption-terms", help="Text file of caption/URL string-match terms "
                                                 "for the captions label source ('*' = any one character; default: "
                                                 "the NSFW lexicon, neurolens/data/nsfw_terms.txt).")]
CaptionMatchOpt = Annotated[str, typer.Option("--caption-match", help="How captions are matched: word (whole words "
                                              "and inflections), exact (whole words only), substring (the paper's "
                                              "literal filter), or off.")]
LabelsOpt = Annotated[Optional[List[str]], typer.Option(
    "--labels", help="Where the per-image NSFW labels come from (repeat to combine): captions (caption/URL match "
                     "against the NSFW lexicon), column:NAME[=V1,V2] (a dataset column, e.g. column:NSFW=NSFW,UNSURE), "
                     "nudenet (NudeNet's offline detector, installed with neurolens), zero-shot (the inspected "
                     "model's own score; never with random weights), or auto (default: captions + nudenet + "
                     "zero-shot, each kept only if it agrees with the others).")]
MinAgreementOpt = Annotated[float, typer.Option(
    "--min-agreement", help="Reliability check: a label source whose AUC against the other sources is below this "
                            "is dropped (unless named with --labels).")]
MaxQOpt = Annotated[float, typer.Option("--max-q", help="Flag rule: Benjamini-Hochberg q-value at most this.")]
MinAucOpt = Annotated[float, typer.Option("--min-auc", help="Flag rule: ROC AUC of the unit's activation, positive "
                                          "against negative images, at least this.")]
MinTextOpt = Annotated[float, typer.Option("--min-text-share", help="Text flag: share of NSFW top texts (texts "
                                           "alone never flag a unit).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimization steps of a feature visualization that is not "
                                                       "cached.")]
SeedsOpt = Annotated[str, typer.Option("--seeds", help="Comma-separated seeds of the feature visualizations.")]


AucMemoryOpt = Annotated[int, typer.Option("--auc-memory", help="MB the exact AUC may keep; beyond it, a streaming "
                                           "binned estimate (error <= 0.005).")]

_SWEEP = SweepSettings()           # the defaults of every sweep option
_AUC_MEMORY_MB = _SWEEP.auc_memory // 2 ** 20


def sweep_settings(vocab: str = _SWEEP.vocab, top_k: int = _SWEEP.top_k, text_top_k: int = _SWEEP.text_top_k,
                   labels: Optional[List[str]] = None, min_agreement: float = _SWEEP.labels.min_agreement,
                   max_q: float = _SWEEP.rule.max_q, min_auc: float = _SWEEP.rule.min_auc,
                   min_text_share: float = _SWEEP.rule.min_text_share, unsafe_prompts: Optional[str] = None,
                   safe_prompts: Optional[str] = None, caption_terms: Optional[str] = None,
                   caption_match: str = _SWEEP.labels.caption_mode, auc_memory: int = _AUC_MEMORY_MB) -> SweepSettings:
    """The SweepSettings of the sweep, figure and grid commands: the prompt and term files are read, every
    value is checked (one line naming the option)."""
    if auc_memory < 0:
        raise NeurolensError(f"--auc-memory must be a number of MB >= 0, got {auc_memory}")
    label_settings = LabelSettings(
        sources=tuple(labels or ("auto",)), min_agreement=min_agreement, caption_mode=caption_match,
        caption_terms=read_list(caption_terms) if caption_terms else None,
        unsafe_prompts=read_list(unsafe_prompts) if unsafe_prompts else None,
        safe_prompts=read_list(safe_prompts) if safe_prompts else None)
    rule = FlagRule(max_q=max_q, min_auc=min_auc, min_text_share=min_text_share)
    return SweepSettings(vocab=vocab, top_k=top_k, text_top_k=text_top_k, rule=rule, labels=label_settings,
                         auc_memory=int(auc_memory) * 2 ** 20)


SWEEP = OptionSet.of(sweep_settings, vocab=(VocabOpt, _SWEEP.vocab), top_k=(SweepTopKOpt, _SWEEP.top_k),
                     text_top_k=(TextTopKOpt, _SWEEP.text_top_k), labels=(LabelsOpt, None),
                     min_agreement=(MinAgreementOpt, _SWEEP.labels.min_agreement),
                     max_q=(MaxQOpt, _SWEEP.rule.max_q), min_auc=(MinAucOpt, _SWEEP.rule.min_auc),
                     min_text_share=(MinTextOpt, _SWEEP.rule.min_text_share), unsafe_prompts=(UnsafeOpt, None),
                     safe_prompts=(SafeOpt, None), caption_terms=(TermsOpt, None),
                     caption_match=(CaptionMatchOpt, _SWEEP.labels.caption_mode),
                     auc_memory=(AucMemoryOpt, _AUC_MEMORY_MB))


# ------------------------------------------------------------------------------------------ concept audit

ConceptsOpt = Annotated[str, typer.Option("--concepts", help="A concept-set YAML file (docs/concepts.md), or builtin "
                                          "(nsfw as the sweep labels it, people, text, animals, vehicles).")]
ConceptTopKOpt = Annotated[int, typer.Option("--top-k", help="Top images kept per unit by the scan.")]


def concept_settings(concepts: str = BUILTIN, top_k: int = _SWEEP.top_k,
                     min_agreement: float = _SWEEP.labels.min_agreement, max_q: float = _SWEEP.rule.max_q,
                     min_auc: float = _SWEEP.rule.min_auc, auc_memory: int = _AUC_MEMORY_MB) -> ConceptSettings:
    """The ConceptSettings of the concepts command: the concept set is read and checked (a bad file is one
    line naming the file, the concept and the field), every value is checked as the sweep's."""
    if auc_memory < 0:
        raise NeurolensError(f"--auc-memory must be a number of MB >= 0, got {auc_memory}")
    return ConceptSettings(concepts=read_concept_set(concepts), top_k=top_k, min_agreement=min_agreement,
                           rule=FlagRule(max_q=max_q, min_auc=min_auc), auc_memory=int(auc_memory) * 2 ** 20)


CONCEPTS = OptionSet.of(concept_settings, concepts=(ConceptsOpt, BUILTIN), top_k=(ConceptTopKOpt, _SWEEP.top_k),
                        min_agreement=(MinAgreementOpt, _SWEEP.labels.min_agreement),
                        max_q=(MaxQOpt, _SWEEP.rule.max_q), min_auc=(MinAucOpt, _SWEEP.rule.min_auc),
                        auc_memory=(AucMemoryOpt, _AUC_MEMORY_MB))


_RENDER_STEPS = RenderSettings().steps


@dataclass(frozen=True)
class RenderChoice:
    """--steps/--seeds of the feature visualizations that figure and grid draw (the fast preset otherwise)."""
    steps: int = _RENDER_STEPS
    seeds: str = "0"

    def settings(self):
        try:
            seeds = tuple(int(s) for s in self.seeds.split(",") if s.strip())
        except ValueError:
            raise NeurolensError(f"--seeds must be comma-separated integers such as 0,1, got {self.seeds!r}") from None
        if not seeds:
            raise NeurolensError("--seeds needs at least one seed, e.g. --seeds 0")
        return RenderSettings(steps=self.steps, seeds=seeds)


RENDER = OptionSet.of(RenderChoice, steps=(StepsOpt, _RENDER_STEPS), seeds=(SeedsOpt, "0"))
