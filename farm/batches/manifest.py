"""Batch manifests: JSONL or CSV in, validated rows out, every problem named by its line.

One row per source picture. JSONL (`.jsonl`, `.ndjson`): one JSON object per line; the first
line may be a defaults block, `{"defaults": {...}}`. CSV (`.csv`): a header line, then one row
per line; empty cells count as absent. Row fields:

    image            path (relative to the manifest, or absolute) or an s3:// / file:// URI
                     inside the farm's store; none for txt2img
    mask             path/URI of a mask, or a generator: box | strokes | full, with parameters
                     (`strokes:max_width=0.2`, or a JSON object; see `farm.jobs.masks`), drawn by
                     the worker with a seed per job (or the row's: `strokes:seed=7`). `mask_image`
                     is the same field under diffusers' name
    prompt           the prompt; or `prompt_template`, filled from the row's fields:
                     `"a photo of a {label}"`
    seed             a fixed seed for this row (variation v gets seed + v); else one is derived
    any job field    `model`, `kind`, `negative_prompt`, `num_inference_steps` (or `steps`),
                     `guidance_scale`, `strength`, `scheduler`, `width`, `height`,
                     `num_images_per_prompt` (or `num_images`), `priority`, ... (checked by the
                     job specs in `farm.jobs.specs`)
    anything else    a label: kept with the row and written into the fetched dataset's
                     metadata.jsonl (a near miss of a job field is refused as a typo)

Precedence, lowest first: the specs' own defaults, the defaults block (or `--defaults FILE`),
the command line, the row. One default differs from a single job's: rows of kind inpaint keep
the pixels outside their mask (`preserve_unmasked=true`), so segmentation and box labels stay
valid on the outputs; `preserve_unmasked: false` (or `--no-preserve-unmasked`) gives the pixels
diffusers gives, as `farm submit inpaint` does. `variations` and `seed` in a defaults block or on the command line
are batch-wide (how many jobs per row; the seed every job's seed is derived from).

Rows are numbered by their line in the file (1-based), which is how problems are reported:

    cats.csv:7: image: no such file '/data/cats/007.png'
"""

from __future__ import annotations

import csv
import difflib
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from farm.errors import InvalidJob
from farm.inputs.budgets import Budgets, check_text
from farm.inputs.resolver import URI_SCHEMES, InputInfo, InputResolver
from farm.jobs.masks import MaskGenerator, parse_generator
from farm.jobs.specs import SHORT_NAMES, SPECS, parse_spec

if TYPE_CHECKING:
    from farm.submit import Submission

MAX_PROBLEMS = 20
"""Bad rows reported at once; validation stops after this many."""

MAX_LINE = 64 * 1024
"""Bytes per manifest line by default (`FARM_MAX_MANIFEST_LINE`)."""

JOB_FIELDS = frozenset().union(*(cls.model_fields for cls in SPECS.values())) - {
    "image",
    "mask_image",
    "key",
}
"""Spec fields a row, the defaults block or the command line may set."""

ALIASES = {**SHORT_NAMES, "mask_image": "mask"}
"""Short names (`farm.jobs.specs.SHORT_NAMES`) and diffusers' `mask_image`, mapped onto the
canonical fields."""

BATCH_FIELDS = frozenset({"variations"})
"""Batch-wide settings: allowed in the defaults block and on the command line, not in rows."""

METADATA_FIELDS = frozenset(
    {
        "file_name",
        "mask_file_name",
        "source_file_name",
        "job_id",
        "row",
        "variation",
        "image_index",
        "source_image",
        "mask_source",
        "source",
        "defaults",
    }
)
"""Names the fetched dataset's metadata.jsonl uses for itself; labels may not take them."""

_ROW_FIELDS = JOB_FIELDS | {"image", "mask", "prompt_template"}


@dataclass(frozen=True, slots=True)
class Problem:
    line: int
    message: str


class InvalidManifest(InvalidJob):
    """A manifest with bad rows; `problems` holds up to `MAX_PROBLEMS` of them, by line."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        more = " (validation stopped there)" if len(problems) >= MAX_PROBLEMS else ""
        noun = "row" if len(problems) == 1 else "rows"
        super().__init__(
            f"{path.name}: {len(problems)} bad {noun}{more}; nothing was submitted",
            field="manifest",
        )
        self.path = path
        self.problems = problems

    def lines(self) -> list[str]:
        """One line per bad row, `file:line: field: what is wrong`, then the summary."""
        return [f"{self.path.name}:{p.line}: {p.message}" for p in self.problems] + [str(self)]


@dataclass(slots=True)
class Row:
    """One validated manifest row: its job fields, inputs, labels and content identity."""

    line: int
    kind: str
    fields: dict[str, Any]
    """Spec fields (model, prompt, steps, ...); no image, mask, seed or key."""
    image: InputInfo | None = None
    image_given: str | None = None
    mask: InputInfo | None = None
    mask_given: str | None = None
    mask_gen: MaskGenerator | None = None
    seed: int | None = None
    labels: dict[str, Any] = field(default_factory=dict)
    mask_desc: str | None = None
    """The mask as metadata shows it: a generator's canonical form, or the path given."""
    identity: str = ""
    """sha256 of what the row renders: spec fields, input contents, mask generator, seed."""
    alike: str = ""
    """What the client's checks see of the row (`validate_rows`): rows alike but for their
    prompts and seeds pass or fail them alike, and their jobs' records differ only there."""


def normalize(layer: dict[str, Any], where: str, *, row: bool) -> dict[str, Any]:
    """Keys stripped and aliases resolved; empty values dropped. `InvalidJob` on clashes and,
    outside rows, on unknown fields."""
    out: dict[str, Any] = {}
    for raw_key, value in layer.items():
        if raw_key is None:
            raise InvalidJob(f"{where}: more cells than header columns", field="manifest")
        key = ALIASES.get(raw_key.strip(), raw_key.strip())
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if key in out:
            raise InvalidJob(f"{key}: given twice ({raw_key!r} is the same field)", field=key)
        if not row and key not in _ROW_FIELDS | BATCH_FIELDS | {"seed"}:
            raise InvalidJob(f"{key}: unknown job field in {where}", field=key)
        out[key] = value
    return out


@functools.lru_cache(maxsize=1024)
def _check_label(name: str) -> None:
    if name == "key":
        raise InvalidJob("key: set by the batch from the row's content; remove it", field="key")
    if name in BATCH_FIELDS:
        raise InvalidJob(
            f"{name}: set per batch (command line or defaults block), not per row", field=name
        )
    if name in METADATA_FIELDS:
        raise InvalidJob(f"{name}: reserved for the fetched dataset's metadata", field=name)
    close = difflib.get_close_matches(name, sorted(_ROW_FIELDS | set(ALIASES)), 1, 0.85)
    if close:
        raise InvalidJob(
            f"{name}: unknown field; did you mean {close[0]!r}? (other columns are labels)",
            field=name,
        )


def _source(value: Any, base: Path, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidJob(f"{field}: expected a path or URI, got {value!r:.80}", field=field)
    return _resolve(value.strip(), base, field)


@functools.lru_cache(maxsize=4096)
def _resolve(value: str, base: Path, field: str) -> str:
    if value.startswith(URI_SCHEMES):
        return value
    if "://" in value:
        raise InvalidJob(
            f"{field}: only paths and s3:// / file:// URIs in the farm's store, got {value!r}",
            field=field,
        )
    return str((base / Path(value).expanduser()).resolve())


def _local_lora(lora: Any, folder: Path) -> Any:
    """A row's adapter with a relative path resolved against the manifest's folder, as images
    are; `job:<id>` refs and URIs as they are."""
    ref = lora.get("ref") if isinstance(lora, dict) else lora
    if not isinstance(ref, str) or ref.startswith("job:") or "://" in ref:
        return lora
    path = str((folder / Path(ref.strip()).expanduser()).resolve())
    return {**lora, "ref": path} if isinstance(lora, dict) else path


def _prompt(merged: dict[str, Any], row: dict[str, Any], labels: dict[str, Any]) -> None:
    template = merged.pop("prompt_template", None)
    if template is None or "prompt" in row:
        return
    values = {**merged, **labels}
    try:
        merged["prompt"] = str(template).format_map(values)
    except KeyError as e:
        have = ", ".join(sorted(values))
        raise InvalidJob(
            f"prompt_template: no field {e.args[0]!r} in this row (it has {have})",
            field="prompt_template",
        ) from None
    except (ValueError, IndexError, AttributeError) as e:
        raise InvalidJob(f"prompt_template: {e} in {template!r}", field="prompt_template") from None


MANIFEST_KINDS = ("txt2img", "img2img", "inpaint")
"""What a batch row may be; fine-tunes and style jobs are submitted one by one."""


def resolve_row(
    line: int,
    raw: dict[str, Any],
    base: dict[str, Any],
    folder: Path,
    inputs: InputResolver,
    budgets: Budgets | None = None,
    checked_before: dict[str, tuple[Any, dict[str, Any]]] | None = None,
) -> Row:
    """One row merged over the batch's defaults (`base`), checked, its inputs read once, its
    job measured against the `budgets` (prompts too: the dry runs skip them).

    `checked_before` (kept across a manifest's rows): job fields checked already, by all but
    their prompt and seed. A row whose other fields were checked before has only its prompt
    and seed checked (assigned to a copy of that spec: pydantic validates the assignment)."""
    # 1. Split the row into job fields and labels.
    row = normalize(raw, f"line {line}", row=True)
    labels = {k: v for k, v in row.items() if k not in _ROW_FIELDS}
    for name in labels:
        _check_label(name)
    merged = {**base, **{k: v for k, v in row.items() if k not in labels}}
    seed = merged.pop("seed", None)  # `base` holds no seed: the batch's is not a row's
    _prompt(merged, row, labels)
    # 2. Inputs: the image, and a mask file or generator.
    image_given, mask_given = merged.pop("image", None), merged.pop("mask", None)
    mask_gen, mask_desc = _mask_of(mask_given)
    kind = merged.pop("kind", None) or (
        "inpaint" if mask_given is not None else "img2img" if image_given is not None else "txt2img"
    )
    if kind not in MANIFEST_KINDS:
        raise InvalidJob(
            f"kind: batch rows are {', '.join(MANIFEST_KINDS)}, got {kind!r}"
            + (" (submit it with `farm submit`)" if kind in SPECS else ""),
            field="kind",
        )
    if kind == "txt2img" and image_given is not None:
        raise InvalidJob("image: txt2img jobs take no image", field="image")
    if kind != "inpaint" and mask_given is not None:
        raise InvalidJob(f"mask: only inpaint jobs take a mask (kind is {kind})", field="mask")
    if kind != "txt2img" and image_given is None:
        raise InvalidJob(f"image: is required for {kind}", field="image")
    if kind == "inpaint" and mask_given is None:
        raise InvalidJob(
            "mask: is required for inpaint (a path, or box | strokes | full)", field="mask"
        )
    if "model" not in merged:
        raise InvalidJob(
            "model: is required (--model, the defaults block, or a column)", field="model"
        )
    if kind == "inpaint":  # a dataset's labels stay valid: outside the mask, the source's pixels
        merged.setdefault("preserve_unmasked", True)
    elif "preserve_unmasked" not in row:  # `--no-preserve-unmasked` speaks of inpaint rows only
        merged.pop("preserve_unmasked", None)
    if isinstance(merged.get("loras"), list):  # local adapter files: next to the manifest
        merged["loras"] = [_local_lora(lora, folder) for lora in merged["loras"]]
    # 3. The job fields, checked by the spec itself (inputs stand in as placeholders).
    budgets = budgets or Budgets()
    fields, checked = _checked_fields(merged, kind, seed, budgets, checked_before)
    check_text(labels, "label")
    out = Row(line, kind, fields, seed=checked.seed, labels=labels, mask_gen=mask_gen)
    out.mask_desc = mask_desc if mask_gen else mask_given
    if kind != "txt2img":
        out.image_given = str(image_given)
        src = _source(image_given, folder, "image")
        out.image = inputs.info(src, mask=False, field="image")
        budgets.check_size(checked, out.image.size)  # the working size taken from the image
    if kind == "inpaint" and mask_gen is None:
        out.mask_given = mask_given if isinstance(mask_given, str) else None
        out.mask = inputs.info(_source(mask_given, folder, "mask"), mask=True, field="mask")
        if out.image and out.mask.size != out.image.size:
            (iw, ih), (mw, mh) = out.image.size, out.mask.size
            raise InvalidJob(f"mask: mask is {mw}x{mh} but the image is {iw}x{ih}", field="mask")
    # 4. What the row renders, as one hash: the batch's keys and seeds derive from it.
    content = {
        "fields": fields,
        "image": out.image.sha256 if out.image else None,
        "mask": out.mask.sha256 if out.mask else out.mask_desc,
        "seed": out.seed,
    }
    out.identity = hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return out


def _checked_fields(
    merged: dict[str, Any],
    kind: str,
    seed: Any,
    budgets: Budgets,
    checked_before: dict[str, tuple[Any, dict[str, Any]]] | None,
) -> tuple[dict[str, Any], Any]:
    """(the row's job fields, its spec) checked by the spec itself (inputs stand in as
    placeholders) and measured by `budgets`; from `checked_before` where all but the prompt
    and seed were checked before (a manifest's rows mostly differ only there)."""
    known = None
    if checked_before is not None and isinstance(merged.get("prompt"), str):
        try:
            known = json.dumps([kind, {k: v for k, v in merged.items() if k != "prompt"}])
        except (TypeError, ValueError):
            known = None
    if checked_before is not None and known is not None and known in checked_before:
        spec, fields = checked_before[known]
        try:
            checked = spec.model_copy()
            checked.prompt, checked.seed = merged["prompt"], seed  # validated as assigned
        except ValidationError:
            pass  # checked whole below, for the error it names
        else:
            budgets.check_texts({"prompt": checked.prompt})
            return {**fields, "prompt": checked.prompt}, checked
    spec = {**merged, "kind": kind, "seed": seed}
    if kind != "txt2img":
        spec["image"] = "file:///placeholder"
    if kind == "inpaint":
        spec["mask_image"] = "file:///placeholder"
    checked = parse_spec(spec)
    budgets.check(checked)
    fields = checked.model_dump(mode="json", exclude={"image", "mask_image", "seed", "key"})
    fields = {k: v for k, v in fields.items() if k in merged or k == "kind"}
    if checked_before is not None and known is not None:
        # Not imported at the top: farm.submit brings Celery and Redis, which reading a
        # manifest needs neither of (as before templates were bounded).
        from farm.submit import remember

        remember(checked_before, known, (checked, fields))
    return fields, checked


def _mask_of(given: Any) -> tuple[MaskGenerator | None, str | None]:
    """(the generator `given` names, its canonical form), or (None, None) for a path or
    nothing; a manifest's few mask texts parsed once each."""
    if isinstance(given, str):
        return _mask_text(given)
    return _described(parse_generator(given)) if given is not None else (None, None)


@functools.lru_cache(maxsize=1024)
def _mask_text(given: str) -> tuple[MaskGenerator | None, str | None]:
    return _described(parse_generator(given))


def _described(gen: MaskGenerator | None) -> tuple[MaskGenerator | None, str | None]:
    return gen, gen.describe() if gen else None


def read_rows(
    path: Path, max_line: int = MAX_LINE
) -> tuple[dict[str, Any], Iterator[tuple[int, dict[str, Any] | str]]]:
    """(the defaults block, (line, row) pairs). A row that cannot be parsed, or whose line is
    longer than `max_line` bytes (`FARM_MAX_MANIFEST_LINE`), comes as a string: what is wrong
    with it. `InvalidJob` if the file itself cannot be read."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".ndjson", ".csv"):
        raise InvalidJob(
            f"manifest: expected a .jsonl or .csv file, got {path.name!r}", field="manifest"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidJob(f"manifest: no such file {str(path)!r}", field="manifest") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidJob(f"manifest: cannot read {str(path)!r} ({e})", field="manifest") from None
    long = {
        n: size for n, t in enumerate(text.splitlines(), 1) if (size := len(t.encode())) > max_line
    }
    if suffix == ".csv":
        return {}, _csv_rows(text, long, max_line)
    lines = [(n, s) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    if lines and lines[0][0] in long:
        raise InvalidJob(f"{path.name}:{lines[0][0]}: {_too_long(long[lines[0][0]], max_line)}")
    defaults: dict[str, Any] = {}
    if lines:
        try:
            first = json.loads(lines[0][1])
        except json.JSONDecodeError:
            first = None
        if isinstance(first, dict) and set(first) == {"defaults"}:
            if not isinstance(first["defaults"], dict):
                raise InvalidJob(
                    f"{path.name}:{lines[0][0]}: defaults: must be an object", field="defaults"
                )
            defaults = first["defaults"]
            lines = lines[1:]
    return defaults, _jsonl_rows(lines, long, max_line)


def _too_long(size: int, max_line: int) -> str:
    return f"the line is {size} bytes, over FARM_MAX_MANIFEST_LINE ({max_line})"


def _jsonl_rows(
    lines: list[tuple[int, str]], long: dict[int, int], max_line: int
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    for n, text in lines:
        if n in long:
            yield n, _too_long(long[n], max_line)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield n, f"not valid JSON ({e.msg} at column {e.colno})"
            continue
        yield n, obj if isinstance(obj, dict) else f"expected a JSON object, got {text:.60}"


def _csv_rows(
    text: str, long: dict[int, int], max_line: int
) -> Iterator[tuple[int, dict[str, Any] | str]]:
    if 1 in long:  # the header
        yield 1, _too_long(long[1], max_line)
        return
    reader = csv.DictReader(text.splitlines(keepends=True))
    first = 2
    for row in reader:
        over = [n for n in range(first, reader.line_num + 1) if n in long]
        first = reader.line_num + 1
        yield reader.line_num, _too_long(long[over[0]], max_line) if over else row


def validate_rows(
    sub: Submission,
    path: Path,
    raw_rows: Iterable[tuple[int, dict[str, Any] | str]],
    base: dict[str, Any],
) -> list[Row]:
    """Every row resolved and checked as the client would check its job, nothing written;
    `InvalidManifest` naming up to `MAX_PROBLEMS` bad rows by line. Inputs are read through
    the submission's resolver, so the submit that follows reads none of them again."""
    rows: list[Row] = []
    problems: list[Problem] = []
    tried: set[str] = set()
    checked: dict[str, tuple[Any, dict[str, Any]]] = {}
    for line, raw in raw_rows:
        try:
            if isinstance(raw, str):
                raise InvalidJob(raw)
            row = resolve_row(line, raw, base, path.parent, sub.inputs, sub.budgets, checked)
            # The client's own checks see the fields and the inputs, not the prompts: rows
            # that differ only in prompts pass or fail them alike.
            row.alike = _dry_run_key(row)
            if row.alike not in tried:
                _dry_run(sub, row)
                tried.add(row.alike)
            rows.append(row)
        except InvalidJob as e:
            problems.append(Problem(line, str(e)))
            if len(problems) >= MAX_PROBLEMS:
                break
    if problems:
        raise InvalidManifest(path, problems)
    if not rows:
        raise InvalidJob(f"{path.name}: the manifest has no rows", field="manifest")
    return rows


def _dry_run_key(row: Row) -> str:
    fields = {k: v for k, v in row.fields.items() if k not in ("prompt", "negative_prompt")}
    inputs = [row.image, row.mask, row.mask_desc if row.mask_gen else None]
    return json.dumps([fields, [i if isinstance(i, str | None) else i.sha256 for i in inputs]])


def _dry_run(sub: Submission, row: Row) -> None:
    """Prepare the row's job through the submit pipeline as a dry run: every check the client
    makes, nothing encoded, stored or written."""
    spec: dict[str, Any] = {**row.fields, "seed": 0}
    if row.image:
        spec["image"] = row.image.source
    if row.mask:
        spec["mask_image"] = row.mask.source
    elif row.mask_gen:
        spec["mask_image"] = row.mask_gen  # checked as it is, never drawn here
    sub.prepare(parse_spec(spec), dry=True)
