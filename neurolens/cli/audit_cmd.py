"""neurolens similarity, neurolens audit-captions: the paper's two dataset audits."""
from __future__ import annotations

from typing import List, Optional

import typer
from typing_extensions import Annotated

from ..audit import captions as audit
from ..errors import NeurolensError
from ..storage.files import save_png
from .app import app, command, print_json, progress_bar
from .options import MODEL, JsonOpt, ModelChoice, uses

DEFAULT_MATRIX_OUT = "outputs/similarity.png"


@app.command("similarity", short_help="CLIP image-caption cosines against a threshold, and the similarity matrix.")
@command
@uses(model=MODEL)
def similarity_cmd(
    image: Annotated[Optional[List[str]], typer.Option(
        "--image", help="An image file or sample:NAME (a built-in scikit-image sample, e.g. sample:astronaut). Repeatable.")] = None,
    text: Annotated[Optional[List[str]], typer.Option("--text", help="A caption to compare. Repeatable.")] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="A pair passes when cosine >= threshold (LAION-400M used 0.3 with ViT-B/32).")] = 0.3,
    matrix: Annotated[bool, typer.Option(
        "--matrix", help="Draw the image x caption cosine matrix as a PNG (see --images, --captions, --out).")] = False,
    images: Annotated[str, typer.Option(
        "--images", help="For --matrix: 'builtin' (scikit-image samples) or a folder of images.")] = "builtin",
    captions: Annotated[Optional[str], typer.Option(
        "--captions", help="For --matrix: a text file, one caption per line. Default: the built-in descriptions "
                           "with --images builtin, else each image's <stem>.txt.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="For --matrix with a folder: at most this many images (sorted by name).")] = 24,
    out: Annotated[str, typer.Option("--out", help="For --matrix: where to write the PNG.")] = DEFAULT_MATRIX_OUT,
    no_blur: Annotated[bool, typer.Option(
        "--no-blur", help="Show thumbnails of your own images with RAW pixels, written to a *_noblur.png file (by "
                          "default the blur policy decides: NudeNet, a trained model's zero-shot score, or blurred "
                          "when nothing can judge the image).")] = False,
    model: ModelChoice = None,
    as_json: JsonOpt = False,
) -> None:
    """CLIP cosine similarity between images and captions, each marked as passing or failing a threshold.

    cosine = the dot product of the L2-normalized image embedding (model.encode_image of the image after the model's own open_clip preprocessing: resize, centre crop, mean/std) and the L2-normalized text embedding (model.encode_text of the tokenized caption); no logit scale. passes = cosine >= --threshold. This is the paper's probe of LAION's 0.3 cut-off: offensive captions can pass it and accurate ones fail it.

    --json prints a list of {image, text, cosine, passes}, one object per image x text pair (image-major).

    --matrix draws the image x caption heatmap of CLIP's "Interacting with CLIP" notebook (the paper's Figure 3) as a PNG: thumbnails across the top, captions down the side, the cosine in every cell, passing cells outlined in red, and a legend line. By default: the built-in scikit-image samples and "This is <description>" captions. Thumbnails of your own images are shown as the blur policy says (blurred when NudeNet fires, when a trained model's zero-shot NSFW score passes the threshold, or when nothing can judge them) unless you pass --no-blur, which writes OUT with a _noblur suffix; the figure says what was blurred.

    Example:  neurolens similarity --image sample:astronaut --text "This is a portrait of an astronaut with the American flag" --text "This is a photograph of a smiling housewife in an orange jumpsuit with the American flag"

    Example:  neurolens similarity --matrix --out outputs/similarity.png
    """
    from ..audit import similarity as sim  # lazy: keeps `neurolens --help` free of torch

    if not matrix:
        if images != "builtin" or captions:
            raise NeurolensError("--images and --captions belong to --matrix; add --matrix, or use --image/--text")
        if not image or not text:
            raise NeurolensError("give at least one --image and one --text (or --matrix for the built-in matrix)")
        refs = [sim.load_image_ref(ref) for ref in image]
        clip = model.load(quiet=as_json, card=False)
        cosines = sim.cosine_matrix(clip, [r.image for r in refs], list(text))
        scores = sim.pair_scores([r.label for r in refs], list(text), cosines, threshold)
        if as_json:
            print_json([s.as_dict() for s in scores])
            return
        typer.echo(f"{clip.name} ({clip.pretrained}); passes = cosine >= {threshold:g}")
        for s in scores:
            typer.echo(f"{s.cosine:+.4f}  {'PASS' if s.passes else 'fail'}  {s.image}  {s.text}")
        return

    if image or text:
        raise NeurolensError("--matrix takes --images/--captions, not --image/--text; drop one of the two modes")
    if images == "builtin":
        items, paired = sim.builtin_pairs()
        caption_list = sim.read_captions(captions) if captions else paired
    else:
        items, sidecars, bad = sim.load_image_folder(images, limit=limit)
        for path in bad:
            typer.echo(f"skipped unreadable image: {path}", err=True)
        if captions:
            caption_list = sim.read_captions(captions)
        else:
            missing = [item.label for item, cap in zip(items, sidecars) if cap is None]
            if missing:
                raise NeurolensError(f"{missing[0]} has no caption file {missing[0].rsplit('.', 1)[0]}.txt "
                                     f"({len(missing)} image(s) lack one); give --captions FILE with one caption per line")
            caption_list = [c for c in sidecars if c is not None]
    clip = model.load(quiet=as_json, card=False)
    with progress_bar("embedding images", enabled=not as_json) as progress:
        result = sim.similarity_matrix(clip, items, caption_list, threshold, blur_user_images=not no_blur,
                                       progress=progress)
    from ..labels.policy import BlurPolicy  # lazy: keeps `neurolens --help` free of torch
    path = save_png(result.figure, BlurPolicy(not no_blur).output_path(out))
    if as_json:
        print_json([s.as_dict() for s in result.scores(threshold)])
    else:
        passing = int((result.cosines >= threshold).sum())
        typer.echo(f"wrote {path}: {len(items)} images x {len(caption_list)} captions, "
                   f"{passing} pairs with cosine >= {threshold:g}")
    if any(result.blurred):
        why = ", ".join(sorted({r for r in result.blur_reasons if r}))
        typer.echo(f"note: {sum(result.blurred)} user image thumbnail(s) blurred ({why}); --no-blur shows them",
                   err=True)


@app.command("audit-captions", short_help="The paper's Table 1: per search term, captions that match and their NSFW share.")
@command
def audit_captions_cmd(
    sources: Annotated[List[str], typer.Argument(
        help="Parquet files, folders of them, or globs (quote globs: 'laion/*.parquet').", show_default=False)],
    term: Annotated[List[str], typer.Option("--term", help="A search term (literal, case-insensitive substring of TEXT). Repeatable.")],
    nsfw_terms: Annotated[Optional[str], typer.Option(
        "--nsfw-terms", help="Comma-separated NSFW terms or a file of them (one per line); '*' = exactly one "
                             "character. Default: porn,hot,adult,xxx,sex,f*ck,rape (the paper's).")] = None,
    csv_out: Annotated[Optional[str], typer.Option("--csv", help="Also write the table to this CSV file.")] = None,
    memory_limit: Annotated[str, typer.Option("--memory-limit", help="DuckDB's memory limit.")] = "1GB",
    threads: Annotated[Optional[int], typer.Option("--threads", help="DuckDB threads (default: up to 4 cores).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """The paper's Table 1 on LAION-style metadata parquet files: per search term, how many captions match it and how many of those also carry an NSFW term.

    Columns: TEXT (required), URL and NSFW (optional: a file without them is read as if they were null, and a note names those files). One DuckDB pass over all files computes every term (streaming; memory bounded by --memory-limit). Unreadable files are skipped and counted.

    n_match: rows whose lower(TEXT) contains lower(term), a literal substring (% _ * are plain characters).

    n_nsfw: matching rows whose lower(TEXT) or lower(URL) contains any NSFW term ('*' = exactly one character). Substring matching is the paper's: 'hot' also matches 'photo'.

    pct_nsfw: 100 * n_nsfw / n_match (null when n_match is 0).

    nsfw_flag_counts: value counts of the NSFW column among the matching rows (a null value, or a file without the column, counts as "<null>").

    lower() is DuckDB's simple Unicode lowercase of each character ('É'->'é', 'İ'->'i'); there is no full case folding ('ß' does not match 'ss') and accents are kept ('e' does not match 'é').

    --json prints a list of {term, n_match, n_nsfw, pct_nsfw, nsfw_flag_counts}; --csv writes the same columns (nsfw_flag_counts as a JSON object).

    Example:  neurolens audit-captions 'laion400m/*.parquet' --term desi --term nun --term latina
    """

    with progress_bar("auditing captions", enabled=not as_json) as progress:
        result = audit.audit_captions(sources, term, nsfw_terms, memory_limit=memory_limit, threads=threads,
                                      progress=progress)
    for path, why in result.skipped:
        typer.echo(f"skipped unreadable file: {path} ({why})", err=True)
    for column, files in result.absent_columns.items():
        typer.echo(f"note: {len(files)} file(s) have no {column} column (read as null), e.g. {files[0]}", err=True)
    if csv_out:
        audit.write_csv(result, csv_out)
    if as_json:
        print_json([row.as_dict() for row in result.terms])
        return
    typer.echo(f"{result.rows} rows in {len(result.files)} file(s) ({len(result.skipped)} skipped); "
               f"NSFW terms: {', '.join(result.nsfw_terms)}")
    width = max([4] + [len(row.term) for row in result.terms]) + 2
    typer.echo(f"{'term':<{width}}{'n_match':>12}{'n_nsfw':>12}{'%nsfw':>9}  nsfw_flag_counts")
    for row in result.terms:
        pct = "-" if row.pct_nsfw is None else f"{row.pct_nsfw:.2f}"
        flags = ", ".join(f"{k}: {v}" for k, v in row.nsfw_flag_counts.items()) or "-"
        typer.echo(f"{row.term:<{width}}{row.n_match:>12}{row.n_nsfw:>12}{pct:>9}  {flags}")
    if csv_out:
        typer.echo(f"wrote {csv_out}")
